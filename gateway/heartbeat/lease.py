"""What the coalescer keeps per lease: its lanes, their flights, and what the upstream last said. Pure: no I/O.

A *lane* is one flight at a time and the beats waiting behind it. Every
lease has a main lane (credentials the gateway vouches for, and the holder's)
and up to a few side lanes, one per other credential (`core` says why). The
two are one type: what differs is decided by `Lane.main`, in `core`.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .wire import HeartbeatAnswer, LastOutcome, LeaseState

__all__ = ["Beat", "Flight", "Lane", "Lease", "LeaseKey", "Success", "presents"]

R = TypeVar("R")  # the driver's upstream response

# (environment id, work id)
LeaseKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Beat:
    """One worker heartbeat, as far as the decision needs it."""

    waiter: int
    key: LeaseKey
    expected: str | None
    # Requests are merged, handed off or absorbed only between equal
    # identities: the same upstream credential and the same requested TTL.
    identity: Hashable
    # The gateway vouches for the credential (it injected it, or saw it issued
    # for this item): the beat queues in the main lane before any acceptance.
    vouched: bool = True

    @property
    def conditional(self) -> bool:
        return self.expected is not None


def presents(beat: Beat, current: str | None) -> bool:
    """The beat echoes the lease's last accepted value: the holder's, as far as anyone can tell."""
    return beat.expected is not None and beat.expected == current


@dataclass(slots=True)
class Success(Generic[R]):
    """An upstream success, kept to answer from (absorbed) or for a worker's retry (handed off)."""

    answer: HeartbeatAnswer
    response: R
    identity: Hashable
    expected: str | None
    sent_at: float
    # The waiter it was delivered to, while the driver may still report it unwritten.
    delivered_to: int | None = None

    def surely_held_until(self) -> float:
        return self.sent_at + self.answer.ttl_seconds


@dataclass(slots=True)
class Flight:
    """One upstream heartbeat out: the worker whose request it is, and those riding along."""

    id: int
    owner: int
    expected: str | None
    identity: Hashable
    sent_at: float
    waiters: list[int]
    owner_gone: bool = False
    # A stop for the item passed through while this flight was out: its
    # answer may predate the stop, so it must not be kept as known state.
    after_stop: bool = False
    # The lease's epoch when sent: if a side flight may have moved the lease since, the answer is not kept.
    epoch: int = 0
    # Another flight of the lease was out at some point while this one was.
    overlapped: bool = False

    def takes(self, beat: Beat) -> bool:
        """Whether `beat` may ride along: unconditional beats only, with the same credential and TTL."""
        return self.expected is None and not beat.conditional and beat.identity == self.identity

    def still_waiting(self) -> list[int]:
        """The workers this flight's answer is still for."""
        return list(self.waiters) if self.owner_gone else [self.owner, *self.waiters]


@dataclass(slots=True)
class Lane:
    """One flight at a time, and the beats waiting behind it."""

    main: bool
    flight: Flight | None = None
    # Lists, not deques: at most a few beats wait, and an empty deque costs ten times an empty list.
    queue: list[Beat] = field(default_factory=list)

    @property
    def idle(self) -> bool:
        return self.flight is None and not self.queue

    def queue_ahead(self, beat: Beat, current: str | None, bound: int) -> Beat | None:
        """Queue `beat`, which presents the lease's `current` value, behind no beat that does not.

        A flood with a credential the gateway vouches for (a leaked token, a worker
        replaying stale values) would otherwise fill the queue ahead of the holder and
        cost it its lease. Order among current beats is kept; the queue's bound still
        holds: past it, the newest beat that does not present the current value is
        returned, to be refused.
        """
        queue = self.queue
        position = next((i for i, b in enumerate(queue) if not presents(b, current)), len(queue))
        queue.insert(position, beat)
        return queue.pop() if len(queue) > bound else None

    def waiting(self) -> int:
        """Workers waiting on this lane: queued, or riding its flight."""
        return len(self.queue) + (len(self.flight.waiters) + 1 if self.flight is not None else 0)


@dataclass(slots=True)
class Lease(Generic[R]):
    key: LeaseKey
    main: Lane = field(default_factory=lambda: Lane(main=True))
    # Other credentials' lanes, by identity (or a one-off key for a beat sent without a lane).
    side: dict[Hashable, Lane] = field(default_factory=dict)
    known: Success[R] | None = None
    undelivered: Success[R] | None = None
    # The last few values seen superseded, newest last.
    superseded: list[str] = field(default_factory=list)
    # Observation, kept even when `known` is dropped: for the lease table and expiry.
    state: str = LeaseState.UNKNOWN
    last_heartbeat: str | None = None
    ttl_seconds: int | None = None
    last_success_sent_at: float | None = None
    last_outcome: LastOutcome | None = None
    last_seen: float = 0.0
    reported_stopping: bool = False
    ended: bool = False  # stopped, lost or expired: kept only for the retention time
    # A stop for the item passed through: whatever happens to the lease now, it was let go, not lost.
    stop_requested: bool = False
    # The one pending table check for this lease (the heap may hold stale ones).
    next_check: float | None = None
    # The identity the upstream last accepted a beat from.
    holder: Hashable | None = None
    # Bumped whenever a side flight may have moved the lease.
    epoch: int = 0
    # The ttl_seconds of the last success a worker was given for this lease (sets its interval).
    delivered_ttl: int | None = None

    def lanes(self) -> Iterator[Lane]:
        """Every lane of the lease, the main one first."""
        yield self.main
        yield from self.side.values()

    def flights(self) -> list[Flight]:
        """Every flight of the lease still out (a list: asked for on every beat sent)."""
        flights = [self.main.flight] if self.main.flight is not None else []
        if self.side:
            flights += [lane.flight for lane in self.side.values() if lane.flight is not None]
        return flights

    def lane_of(self, flight_id: int) -> Lane | None:
        """The lane whose flight is `flight_id` (the main lane's first: asked for on every completion)."""
        main = self.main
        if main.flight is not None and main.flight.id == flight_id:
            return main
        for lane in self.side.values():
            if lane.flight is not None and lane.flight.id == flight_id:
                return lane
        return None

    def drop_idle_side_lanes(self) -> None:
        for identity in [i for i, lane in self.side.items() if lane.idle]:
            del self.side[identity]

    @property
    def confirmed(self) -> bool:
        """The upstream has accepted a beat for this lease: it belongs in the table."""
        return self.last_success_sent_at is not None

    @property
    def side_in_flight(self) -> bool:
        return any(lane.flight is not None for lane in self.side.values())

    @property
    def idle(self) -> bool:
        return self.main.idle and not self.side
