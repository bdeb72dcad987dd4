"""What a flight's end teaches about its lease, and who gets which answer. Pure: no I/O.

One function per kind of result (`learn` picks it), for either kind of
lane. What differs by lane is written where it differs: a side flight
(another credential's beat) may have moved the lease under the main lane, so
its answers take knowledge away rather than add it, and its refusals say
nothing about the holder's lease.

Known state is dropped on any 412, any other error, any answer that is not
an active, extended lease, and when a stop for the item passes through.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from .actions import Action, Deliver, DeliverError, Failed, FlightResult, LeaseEvent, Rejected, Succeeded, Unsuccessful
from .lease import Flight, Lane, Lease, Success
from .table import LeaseTable
from .wire import (
    NO_HEARTBEAT,
    HeartbeatAnswer,
    LeaseEventKind,
    LeaseState,
    LostReason,
    Outcome,
    UpstreamVerdict,
    rejection_reason,
)

__all__ = ["learn"]

R = TypeVar("R")
E = TypeVar("E")

# How many superseded values per lease are remembered for local rejection.
_SUPERSEDED_MEMORY = 8


def learn(
    table: LeaseTable[R], lease: Lease[R], lane: Lane, flight: Flight, outcome: FlightResult[R, E], waiting: list[int]
) -> list[Action[R, E]]:
    """Record what `outcome` (the end of `flight`, in `lane`) says about the lease; the answers for `waiting`."""
    return _LEARN[type(outcome)](table, lease, lane, flight, outcome, waiting)


def _on_success(
    table: LeaseTable[R], lease: Lease[R], lane: Lane, flight: Flight, outcome: Succeeded[R], waiting: list[int]
) -> list[Action[R, E]]:
    answer = outcome.answer
    events: list[Action[R, E]] = _observe_success(table, lease, flight, answer)
    _supersede(lease, flight, answer)
    # The upstream accepted this credential: it is the holder's now.
    lease.holder = flight.identity
    lease.undelivered = None
    if lane.main:
        # Not kept if a side flight that may have moved the lease came back while this one was out.
        fresh = flight.epoch == lease.epoch
    else:
        # Kept only if alone on the lease all along: then it is as current as a main-lane answer.
        fresh = not flight.overlapped
        lease.epoch += 1
    keep = fresh and answer.holds_lease and not flight.after_stop
    success = Success(answer, outcome.response, flight.identity, flight.expected, flight.sent_at)
    lease.known = success if keep else None
    if answer.holds_lease and waiting:
        lease.delivered_ttl = answer.ttl_seconds
    if waiting:
        success.delivered_to = waiting[0]
    elif keep and flight.expected is not None:
        lease.undelivered = success
    # A conditional beat's answer has one worker (conditional flights take no riders).
    return [*events, *(Deliver(w, _name(flight, w), outcome.response) for w in waiting)]


def _on_rejected(
    table: LeaseTable[R], lease: Lease[R], lane: Lane, flight: Flight, outcome: Rejected[R], waiting: list[int]
) -> list[Action[R, E]]:
    moved_from = lease.undelivered if lane.main else lease.known
    if outcome.current_state != LeaseState.ACTIVE or (
        moved_from is not None and outcome.current_last_heartbeat != moved_from.answer.last_heartbeat
    ):
        # The 412 shows the lease has moved on from what was kept.
        lease.known = lease.undelivered = None
    answers: list[Action[R, E]] = [Deliver(w, _name(flight, w), outcome.response) for w in waiting]
    if not lane.main:
        return answers
    lease.known = None
    if flight.expected is not None and flight.expected != NO_HEARTBEAT:
        _supersede_value(lease, flight.expected)
    events: list[Action[R, E]] = []
    if (
        not lease.stop_requested
        and lease.state in (LeaseState.ACTIVE, LeaseState.STARTING, LeaseState.UNKNOWN)
        and outcome.current_last_heartbeat != lease.last_heartbeat
    ):
        events.append(LeaseEvent(lease.key, LeaseEventKind.LOST, rejection_reason(outcome.current_state)))
    if outcome.current_state is not None:
        table.observed(lease, outcome.current_state, lease.ttl_seconds)
    lease.last_outcome = UpstreamVerdict.REJECTED
    return [*events, *answers]


def _on_unsuccessful(
    table: LeaseTable[R], lease: Lease[R], lane: Lane, flight: Flight, outcome: Unsuccessful[R], waiting: list[int]
) -> list[Action[R, E]]:
    _failed(lease, lane, outcome.may_have_applied)
    return [Deliver(w, _name(flight, w), outcome.response) for w in waiting]


def _on_failed(
    table: LeaseTable[R], lease: Lease[R], lane: Lane, flight: Flight, outcome: Failed[E], waiting: list[int]
) -> list[Action[R, E]]:
    _failed(lease, lane, outcome.may_have_applied)
    return [DeliverError(w, outcome.error) for w in waiting]


def _failed(lease: Lease[R], lane: Lane, may_have_applied: bool) -> None:
    if lane.main:
        # The holder's beat came back without a verdict: nothing is answered here until one comes.
        lease.known = None
        lease.last_outcome = UpstreamVerdict.ERROR
    if may_have_applied:
        # The lease may have moved on: a kept answer could now be stale.
        lease.known = lease.undelivered = None
        lease.epoch += 1


def _supersede(lease: Lease[R], flight: Flight, answer: HeartbeatAnswer) -> None:
    """Anything older is history now: its values can never match again."""
    for old in (lease.known, lease.undelivered):
        if old is not None and old.answer.last_heartbeat != answer.last_heartbeat:
            _supersede_value(lease, old.answer.last_heartbeat)
    if flight.expected not in (None, NO_HEARTBEAT) and flight.expected != answer.last_heartbeat:
        _supersede_value(lease, flight.expected)


def _observe_success(
    table: LeaseTable[R], lease: Lease[R], flight: Flight, answer: HeartbeatAnswer
) -> list[Action[R, E]]:
    events: list[Action[R, E]] = []
    if flight.expected == NO_HEARTBEAT and answer.holds_lease:
        events.append(LeaseEvent(lease.key, LeaseEventKind.CLAIMED))
    if answer.state == LeaseState.STOPPING and not lease.reported_stopping:
        lease.reported_stopping = True
        events.append(LeaseEvent(lease.key, LeaseEventKind.STOPPING))
    elif answer.state == LeaseState.STOPPED and lease.state != LeaseState.STOPPED:
        events.append(LeaseEvent(lease.key, LeaseEventKind.STOPPED))
    elif answer.state == LeaseState.ACTIVE and not answer.lease_extended:
        events.append(LeaseEvent(lease.key, LeaseEventKind.LOST, LostReason.NOT_EXTENDED))
    if not lease.confirmed:
        events += [LeaseEvent(key, LeaseEventKind.EVICTED) for key in table.confirm(lease)]
    table.observed(lease, answer.state, answer.ttl_seconds)
    lease.last_heartbeat = answer.last_heartbeat
    lease.last_success_sent_at = flight.sent_at
    # A stopping lease is on its way out: if it lapses now, nothing was lost.
    table.mark_ended(
        lease,
        lease.stop_requested or answer.state in (LeaseState.STOPPING, LeaseState.STOPPED) or not answer.lease_extended,
    )
    table.schedule(lease, flight.sent_at + answer.ttl_seconds + table.tracking.expiry_grace_seconds)
    return events


def _name(flight: Flight, waiter: int) -> Outcome:
    return Outcome.FORWARDED if waiter == flight.owner else Outcome.JOINED


_Learn = Callable[[LeaseTable[Any], Lease[Any], Lane, Flight, Any, list[int]], list[Action[Any, Any]]]
_LEARN: Mapping[type, _Learn] = MappingProxyType(
    {
        Succeeded: _on_success,
        Rejected: _on_rejected,
        Unsuccessful: _on_unsuccessful,
        Failed: _on_failed,
    }
)


def _supersede_value(lease: Lease[Any], value: str) -> None:
    """Remember `value` as superseded: it can never match again. Only the last few are kept."""
    lease.superseded.append(value)
    if len(lease.superseded) > _SUPERSEDED_MEMORY:
        del lease.superseded[0]
