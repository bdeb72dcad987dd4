"""What the gateway may answer itself, without an upstream call. Pure: no I/O.

Only what is provably the upstream's answer, or a safe under-statement of it
(`core` gives the rules): a success kept for a worker whose answer was lost
(*handed off*), the current success repeated with the seconds surely left
(*absorbed*), or the API's 412 for a value seen superseded or a claim on a
lease surely held (*rejected*).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from gateway.config.settings import AbsorbSettings

from .actions import DeliverLocal
from .lease import Beat, Lease, Success
from .wire import NO_HEARTBEAT, Outcome, precondition_failed_body, success_body
from .worker_model import keeps_pace

__all__ = ["MIN_HANDOFF_SECONDS", "answer_locally"]

R = TypeVar("R")

# A kept answer is handed over only with at least this much lease surely left:
# less would give the worker a lease that lapses before it can beat again.
MIN_HANDOFF_SECONDS = 1.0


def answer_locally(
    lease: Lease[R], beat: Beat, now: float, *, absorb: AbsorbSettings, margin: Callable[[], float]
) -> DeliverLocal[R] | None:
    """The answer the gateway may give itself, if any: a kept answer handed over, one absorbed, or a 412.

    `margin` gives the lease time an absorbed answer must leave after the
    worker's next interval (`Coalescer.latency_margin`), asked for only when
    absorption is otherwise possible.
    """
    if lease.side_in_flight:
        # Another credential's beat is out and may move the lease: only the upstream can tell.
        return None
    undelivered = lease.undelivered
    if (
        undelivered is not None
        and beat.expected == undelivered.expected
        and beat.identity == undelivered.identity
        and undelivered.surely_held_until() - now >= MIN_HANDOFF_SECONDS
    ):
        # The lost answer finds its worker: once, with only the time surely left.
        lease.undelivered = None
        undelivered.delivered_to = beat.waiter
        body = _answer_body(undelivered, now)
        lease.delivered_ttl = body["ttl_seconds"]
        return DeliverLocal(beat.waiter, Outcome.HANDED_OFF, 200, body, kept=undelivered.response)
    known = lease.known
    # Local answers only for the credential the upstream last accepted on
    # this lease: anyone else gets the upstream's own verdict (maybe a 401).
    if known is None or beat.identity != known.identity:
        return None
    if beat.expected == known.answer.last_heartbeat and _absorbable(known, beat, now, absorb, margin):
        body = _answer_body(known, now)
        lease.delivered_ttl = body["ttl_seconds"]
        return DeliverLocal(beat.waiter, Outcome.ABSORBED, 200, body)
    if beat.expected is not None and beat.expected in lease.superseded:
        return _rejected_locally(beat, known)
    if beat.expected == NO_HEARTBEAT and now < known.surely_held_until():
        return _rejected_locally(beat, known)
    return None


def _absorbable(known: Success[R], beat: Beat, now: float, policy: AbsorbSettings, margin: Callable[[], float]) -> bool:
    if not policy.enabled or beat.identity != known.identity or not known.answer.holds_lease:
        return False
    left = known.surely_held_until() - now
    return (
        now - known.sent_at < policy.max_signal_delay_seconds
        and left >= policy.min_remaining_fraction * known.answer.ttl_seconds
        # The SDK workers pace themselves by the answer: only what keeps their pace is absorbed.
        and keeps_pace(known.answer.ttl_seconds, int(left), margin())
    )


def _answer_body(success: Success[R], now: float) -> dict[str, Any]:
    # Whole seconds surely left: never more than the upstream would say.
    return success_body(success.answer, int(success.surely_held_until() - now))


def _rejected_locally(beat: Beat, known: Success[R]) -> DeliverLocal[R]:
    return DeliverLocal(beat.waiter, Outcome.REJECTED, 412, precondition_failed_body(beat.expected, known.answer))
