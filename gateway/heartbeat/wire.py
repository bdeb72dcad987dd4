"""The heartbeat's wire format, both ways: the API's answers read, the gateway's own answers written.

Pure. Everything that knows what a heartbeat answer looks like lives here
(environments-api.md §2.2): the 200 `work_heartbeat` body, the 412
`heartbeat_precondition_failed` body with the lease's `current_state`, the
`NO_HEARTBEAT` claim value, and the names the core, the metrics and the
logs share for lease states, answer outcomes, lost reasons and lease events.

An answer is read once, into an `Answer`; an answer that cannot be read is
no signal at all, never a guess. The answer types, from the wire up:

- `upstream.client.BufferedResponse`: the HTTP answer, bytes and headers;
- `HeartbeatAnswer`: the lease fields of a 200 (value, state, TTL, extended);
- `Answer`: what any answer says about the lease (its status, the 200's
  `HeartbeatAnswer`, or a 412's current state);
- `sending.Reply`: a `BufferedResponse` with its `Answer`, the core's
  response type;
- `driver.HeartbeatResult`: a `Reply` as a worker gets it, with its outcome.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "NO_HEARTBEAT",
    "Answer",
    "HeartbeatAnswer",
    "LastOutcome",
    "LeaseEventKind",
    "LeaseState",
    "LostReason",
    "Outcome",
    "UpstreamVerdict",
    "encode",
    "precondition_failed_body",
    "read_answer",
    "read_body",
    "rejection_reason",
    "success_body",
    "throttled_body",
]

# The `expected_last_heartbeat` that claims an unclaimed item.
NO_HEARTBEAT = "NO_HEARTBEAT"


class LeaseState(StrEnum):
    """A lease's state: the API's five, and two of the gateway's own."""

    UNKNOWN = "unknown"  # the gateway has seen no answer for it yet
    STARTING = "starting"
    ACTIVE = "active"
    STOPPING = "stopping"
    STOPPED = "stopped"
    QUEUED = "queued"
    EXPIRED = "expired"  # it lapsed with no renewal through this gateway


class Outcome(StrEnum):
    """How a worker's heartbeat was answered (the `outcome` label and response header)."""

    FORWARDED = "forwarded"  # sent upstream for this request
    JOINED = "joined"  # rode along an identical unconditional flight
    HANDED_OFF = "handed_off"  # an answer whose first worker left, given to its retry
    ABSORBED = "absorbed"  # answered here from a fresh upstream success
    REJECTED = "rejected"  # a 412 here: the value presented is surely stale
    THROTTLED = "throttled"  # a 429 here: too many beats wait on the lease


class UpstreamVerdict(StrEnum):
    """How a lease's last forwarded beat ended when it was not a success: shown as the lease's `last_outcome`."""

    ERROR = "upstream_error"  # no answer, or an answer that was not a verdict on the lease (a 5xx, a 429)
    REJECTED = "rejected_upstream"  # the API's own 412


# A lease's `last_outcome` in the admin API: how its last beat was answered.
LastOutcome = Outcome | UpstreamVerdict


class LostReason(StrEnum):
    NOT_EXTENDED = "not_extended"  # a 200 for an active lease that was not extended
    REQUEUED = "requeued"  # a 412 showing the item back in the queue
    CONFLICT = "conflict"  # a 412: someone else's beat moved the lease on
    EXPIRED = "expired"  # nobody renewed it through this gateway


class LeaseEventKind(StrEnum):
    CLAIMED = "claimed"
    LOST = "lost"
    STOPPING = "stopping"
    STOPPED = "stopped"
    EXPIRED = "expired"
    EVICTED = "evicted"


def rejection_reason(current_state: str | None) -> LostReason:
    """Why a 412 means the worker lost the lease."""
    return LostReason.REQUEUED if current_state == LeaseState.QUEUED else LostReason.CONFLICT


@dataclass(frozen=True, slots=True)
class HeartbeatAnswer:
    """The fields of a 200 heartbeat answer the decisions use."""

    last_heartbeat: str
    state: str
    lease_extended: bool
    ttl_seconds: int

    @property
    def holds_lease(self) -> bool:
        return self.state == LeaseState.ACTIVE and self.lease_extended and self.ttl_seconds > 0


@dataclass(frozen=True, slots=True)
class Answer:
    """What one heartbeat answer says about the lease."""

    status: int
    # A readable 200 answer.
    success: HeartbeatAnswer | None = None
    # A 412's `error.details.current_state`, when it has one.
    current_state: str | None = None
    current_last_heartbeat: str | None = None

    @property
    def lost_reason(self) -> LostReason | None:
        """Why the worker receiving this answer does not hold the lease, if it does not."""
        if self.status == 412:
            return rejection_reason(self.current_state)
        success = self.success
        if success is not None and not success.lease_extended and success.state == LeaseState.ACTIVE:
            return LostReason.NOT_EXTENDED
        return None


# -- reading --------------------------------------------------------------------


def read_answer(status: int, body: bytes) -> Answer:
    """An upstream answer, from its status and raw body."""
    return read_body(status, _json(body)) if status in (200, 412) else Answer(status)


def read_body(status: int, body: dict[str, Any] | None) -> Answer:
    """An answer from its decoded JSON body (the gateway's own answers are never encoded to be read)."""
    if body is None:
        return Answer(status)
    if status == 412:
        current: object = body
        for key in ("error", "details", "current_state"):
            current = current.get(key) if isinstance(current, dict) else None
        if not isinstance(current, dict):
            return Answer(status)
        return Answer(status, None, _str(current.get("state")), _str(current.get("last_heartbeat")))
    if status == 200:
        return Answer(status, _success(body))
    return Answer(status)


def _success(body: dict[str, Any]) -> HeartbeatAnswer | None:
    last, state, extended, ttl = (body.get(k) for k in ("last_heartbeat", "state", "lease_extended", "ttl_seconds"))
    if not isinstance(last, str) or not isinstance(state, str) or not isinstance(extended, bool):
        return None
    if not isinstance(ttl, int) or isinstance(ttl, bool) or last == NO_HEARTBEAT:
        return None
    return HeartbeatAnswer(last, state, extended, ttl)


def _json(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


# -- writing ----------------------------------------------------------------------


def success_body(answer: HeartbeatAnswer, ttl_seconds: int) -> dict[str, Any]:
    """A 200 repeating `answer`, promising only `ttl_seconds` (never more than the upstream would)."""
    return {
        "type": "work_heartbeat",
        "last_heartbeat": answer.last_heartbeat,
        "lease_extended": answer.lease_extended,
        "state": answer.state,
        "ttl_seconds": ttl_seconds,
    }


def precondition_failed_body(expected: str | None, current: HeartbeatAnswer) -> dict[str, Any]:
    """A 412 shaped like the API's, for a value `current` shows is stale."""
    actual = current.last_heartbeat
    return {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": f"Heartbeat precondition failed: expected {expected}, actual was {actual}",
            "details": {
                "error_code": "heartbeat_precondition_failed",
                "error_visibility": "user_facing",
                "current_state": {
                    "state": current.state,
                    "last_heartbeat": actual,
                    # ASSUMPTION: the lease was updated by the heartbeat that set last_heartbeat.
                    "lease_updated_at": actual,
                    "lease_extended": False,
                    "ttl_seconds": current.ttl_seconds,
                },
            },
        },
    }


def throttled_body() -> dict[str, Any]:
    """A 429 for a beat refused because too many wait on its lease."""
    return {
        "type": "error",
        "error": {
            "type": "rate_limit_error",
            "message": "too many heartbeats are waiting for this work item; retry after the current one",
        },
    }


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()
