"""What a heartbeat answer says about the lease, read once from its status and body.

Pure: used by the heartbeat driver to decide, and by the proxy to count
conflicts and lost leases. An answer that cannot be read is no signal at all,
never a guess.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .coalescer import NO_HEARTBEAT, HeartbeatAnswer

__all__ = ["AnswerSummary", "read_answer"]


@dataclass(frozen=True, slots=True)
class AnswerSummary:
    status: int
    # A readable 200 answer.
    answer: HeartbeatAnswer | None = None
    # A 412's `error.details.current_state`, when it has one.
    current_state: str | None = None
    current_last_heartbeat: str | None = None

    @property
    def lost_reason(self) -> str | None:
        """Why the worker receiving this answer does not hold the lease, if it does not."""
        if self.status == 412:
            return "requeued" if self.current_state == "queued" else "conflict"
        if self.answer is not None and not self.answer.lease_extended and self.answer.state == "active":
            return "not_extended"
        return None


def read_answer(status: int, body: bytes) -> AnswerSummary:
    if status == 412:
        current: object = _json(body)
        for key in ("error", "details", "current_state"):
            current = current.get(key) if isinstance(current, dict) else None
        if not isinstance(current, dict):
            return AnswerSummary(status)
        return AnswerSummary(status, None, _str(current.get("state")), _str(current.get("last_heartbeat")))
    if status == 200:
        data = _json(body)
        return AnswerSummary(status, _answer(data) if data is not None else None)
    return AnswerSummary(status)


def _answer(body: dict[str, object]) -> HeartbeatAnswer | None:
    last, state, extended, ttl = (body.get(k) for k in ("last_heartbeat", "state", "lease_extended", "ttl_seconds"))
    if not isinstance(last, str) or not isinstance(state, str) or not isinstance(extended, bool):
        return None
    if not isinstance(ttl, int) or isinstance(ttl, bool) or last == NO_HEARTBEAT:
        return None
    return HeartbeatAnswer(last, state, extended, ttl)


def _json(body: bytes) -> dict[str, object] | None:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None
