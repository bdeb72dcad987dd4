"""Lease-safe heartbeat coalescing, as a sans-IO state machine: time passed in, decisions out.

Nothing here awaits, sleeps or reads a clock. The driver (`.driver`)
feeds in what happened (a worker's heartbeat arrived, an upstream call came
back, a worker went away, a stop passed through, time passed) and carries out
the actions returned: send this request upstream, answer that worker, a
lease event happened, wake me at this time.

Per lease, meaning one (environment id, work id):

- At most one upstream heartbeat is in flight. Requests arriving meanwhile
  wait in arrival order and are decided, one by one, against the state the
  flight leaves behind. The only exception is an unconditional heartbeat (no
  `expected_last_heartbeat`) with the same credential and TTL as an
  unconditional flight and nothing queued ahead of it: it joins the flight
  and gets its result.
- **One holder.** The answer to a conditional heartbeat (`NO_HEARTBEAT` or
  an echo) goes to exactly one worker: the one whose request produced it, or,
  if that worker is gone before the answer could be written, the next
  request that presents the same `expected_last_heartbeat` (*handoff*).
  Conditional requests never join each other, so two claims are never
  merged. A success is therefore delivered at most once, to a worker that
  presented exactly what the upstream checked.
- A request is answered locally only when that is provably what the
  upstream would answer, or a safe under-statement of it:
  - *absorbed*: it presents the current `last_heartbeat` with the same
    credential and TTL, the last upstream success is younger than
    `max_signal_delay` and at least `min_remaining_fraction` of its TTL is
    left, and the answer keeps the SDK workers' pace (`worker_model`): the
    seconds it can promise give the worker an interval and per-beat timeout
    no shorter than the upstream's answer would, and leave twice the recent
    upstream heartbeat latency after that interval. The answer repeats that
    success with `ttl_seconds` cut to the whole seconds left.
  - *rejected*: it presents a value this gateway saw superseded (heartbeat
    values are unique and only move forward, so it can never match again),
    or claims with `NO_HEARTBEAT` while a lease this gateway saw granted is
    surely still held. The answer is a 412 shaped like the upstream's.
- Lease time is measured on the gateway's monotonic clock from when the
  request that earned it was *sent*: the upstream applied it no earlier, so
  "surely held until sent + ttl" never overstates the lease. Upstream
  timestamps are never compared with the local clock.
- No timer renews a lease: the state machine only sends what a waiting worker
  asked for, and a retry only while one of the flight's workers still waits.
- **Lanes.** The rules above are the lease's *main lane*: beats with a
  credential the gateway vouches for (`Beat.vouched`: its own injected key,
  or a sessions token it saw issued for the item) or the one the upstream
  last accepted on the lease (the holder's). Any other credential (a junk
  Bearer, a foreign key) gets a *side lane* of its own: its own flight, one
  at a time, its own short queue (the excess answered locally with a 429),
  for up to a few side credentials per lease; beyond them, each beat is sent
  on its own, as it would go directly. A side flight never waits for
  the main lane nor makes it wait, so no other credential can delay the
  holder's beats. Side beats are never answered locally, and while a side
  flight is out (it may move the lease) nothing is answered locally at all;
  a side answer only ever takes knowledge away (a side success makes its
  credential the holder's, but is not kept for local answers), and a main
  success that overlapped a side flight which may have applied is not kept.
- Each lease's main queue is bounded too; the excess gets a local 429.
- A worker's retry window: the SDK workers abort a beat after one interval,
  `clamp(ttl/2, 1, 30)` s from the last answer's `ttl_seconds`
  (`worker_interval`). `retry_deadline` tells the driver until when a retry
  of a flight can still reach every worker waiting for it.
- A lease enters the table for good only once the upstream accepted a beat
  for it (`confirmed`); other entries go as soon as nothing waits on them,
  and only confirmed leases count toward, and are evicted by, the size cap.

Known state is dropped on any 412, any other error, any answer that is not
an active, extended lease, and when a stop for the item passes through.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from gateway.config.settings import AbsorbSettings, LeaseTrackingSettings

from .wire import (
    NO_HEARTBEAT,
    HeartbeatAnswer,
    LeaseEventKind,
    LeaseState,
    LostReason,
    Outcome,
    precondition_failed_body,
    rejection_reason,
    success_body,
    throttled_body,
)
from .worker_model import keeps_pace, worker_interval

__all__ = [
    "Action",
    "Beat",
    "Coalescer",
    "Deliver",
    "DeliverError",
    "DeliverLocal",
    "Failed",
    "FlightResult",
    "LeaseEvent",
    "LeaseKey",
    "LeaseView",
    "Rejected",
    "Send",
    "Succeeded",
    "TableCounts",
    "Unsuccessful",
    "Wakeup",
]

_STATES = frozenset(s.value for s in LeaseState)
# A lapsed lease whose holder's beat is in flight is looked at again this much later.
EXPIRY_RECHECK_SECONDS = 1.0
# How many superseded values per lease are remembered for local rejection.
_SUPERSEDED_MEMORY = 8
# Beats waiting in one lease's main lane: a worker beats once per interval, so
# more than a few means a flood, not a fleet.
MAX_MAIN_QUEUE = 32
# Credentials nobody vouches for, per lease, each with its own lane, and the
# beats each may queue behind its flight. Beyond that many credentials, a beat
# goes out on its own (no queue, no lane kept after it).
MAX_SIDE_CREDENTIALS = 4
_UNLANED = object()
MAX_SIDE_QUEUE = 2
# How many recent upstream heartbeat round trips the absorption margin looks at.
LATENCY_MEMORY = 32
# The margin is this many times the slowest of them.
LATENCY_MARGIN_FACTOR = 2.0
# A kept answer is handed over only with at least this much lease surely left:
# less would give the worker a lease that lapses before it can beat again.
MIN_HANDOFF_SECONDS = 1.0

R = TypeVar("R")  # the driver's upstream response
E = TypeVar("E")  # the driver's upstream error

LeaseKey = tuple[str, str]
# Rows by (environment id, state), and the shortest active TTL by environment id.
TableCounts = tuple[Mapping[tuple[str, str], int], Mapping[str, int]]


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


# -- what the driver reports back about a flight ------------------------------


@dataclass(frozen=True, slots=True)
class Succeeded(Generic[R]):
    answer: HeartbeatAnswer
    response: R


@dataclass(frozen=True, slots=True)
class Rejected(Generic[R]):
    """A 412, with the lease state its body reports (None when it has none)."""

    response: R
    current_state: str | None
    current_last_heartbeat: str | None


@dataclass(frozen=True, slots=True)
class Unsuccessful(Generic[R]):
    """Any other upstream answer: passed on as it is."""

    response: R
    # A 5xx may come from a server that applied the beat before failing; a
    # 4xx (or a 429/503 asking to retry) means it was refused.
    may_have_applied: bool = False


@dataclass(frozen=True, slots=True)
class Failed(Generic[E]):
    """No answer (connection, timeout): the error is passed on."""

    error: E
    # False only when the request surely never reached the upstream.
    may_have_applied: bool = True


FlightResult = Succeeded[R] | Rejected[R] | Unsuccessful[R] | Failed[E]


# -- actions for the driver -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Start flight `flight` for `key` by sending the request of `waiter`."""

    flight: int
    key: LeaseKey
    waiter: int
    # The main lane (lease-critical capacity), or a side lane (a credential nobody vouches for).
    main: bool = True


@dataclass(frozen=True, slots=True)
class Deliver(Generic[R]):
    waiter: int
    outcome: Outcome
    response: R


@dataclass(frozen=True, slots=True)
class DeliverError(Generic[E]):
    waiter: int
    error: E


@dataclass(frozen=True, slots=True)
class DeliverLocal:
    """An answer built here: a 200 (absorbed, handed off), a 412 (rejected) or a 429 (throttled)."""

    waiter: int
    outcome: Outcome
    status: int
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LeaseEvent:
    key: LeaseKey
    kind: LeaseEventKind
    # For LOST: not_extended, requeued or conflict.
    reason: LostReason | None = None


@dataclass(frozen=True, slots=True)
class Wakeup:
    """Call `tick` at `at` (or later): a lease may lapse or be due to leave the table then.

    Emitted whenever the core's next deadline moves earlier than the last one
    it asked for; a driver keeps one timer, moved to the earliest `at`.
    """

    at: float


Action = Send | Deliver[R] | DeliverError[E] | DeliverLocal | LeaseEvent | Wakeup


# -- state ------------------------------------------------------------------------


@dataclass(slots=True)
class _Success(Generic[R]):
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
class _Flight:
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
    # None: the main lane; else the side lane of this identity.
    side: Hashable | None = None
    # Another flight of the lease was out at some point while this one was.
    overlapped: bool = False


@dataclass(slots=True)
class _SideLane:
    """The flight and queue of one credential nobody vouches for, on one lease."""

    flight: _Flight | None = None
    # Lists, not deques: at most a few beats wait, and an empty deque costs ten times an empty list.
    queue: list[Beat] = field(default_factory=list)


@dataclass(slots=True)
class _Lease(Generic[R]):
    key: LeaseKey
    known: _Success[R] | None = None
    undelivered: _Success[R] | None = None
    flight: _Flight | None = None
    # Lists, not deques (a lease row should cost little; see `_SideLane.queue`).
    queue: list[Beat] = field(default_factory=list)
    # The last few values seen superseded, newest last.
    superseded: list[str] = field(default_factory=list)
    # Observation, kept even when `known` is dropped: for the lease table and expiry.
    state: str = LeaseState.UNKNOWN
    last_heartbeat: str | None = None
    ttl_seconds: int | None = None
    last_success_sent_at: float | None = None
    last_outcome: str | None = None
    last_seen: float = 0.0
    reported_stopping: bool = False
    ended: bool = False  # stopped, lost or expired: kept only for the retention time
    # A stop for the item passed through: whatever happens to the lease now, it was let go, not lost.
    stop_requested: bool = False
    # The one pending table check for this lease (the heap may hold stale ones).
    next_check: float | None = None
    # The identity the upstream last accepted a beat from.
    holder: Hashable | None = None
    side: dict[Hashable, _SideLane] = field(default_factory=dict)
    # Bumped whenever a side flight may have moved the lease.
    epoch: int = 0
    # The ttl_seconds of the last success a worker was given for this lease (sets its interval).
    delivered_ttl: int | None = None

    @property
    def confirmed(self) -> bool:
        """The upstream has accepted a beat for this lease: it belongs in the table."""
        return self.last_success_sent_at is not None

    @property
    def side_in_flight(self) -> bool:
        return any(lane.flight is not None for lane in self.side.values())

    @property
    def idle(self) -> bool:
        return self.flight is None and not self.queue and not self.side


@dataclass(frozen=True, slots=True)
class LeaseView:
    """One row of the lease table, for the admin API."""

    environment_id: str
    work_id: str
    state: str
    last_heartbeat: str | None
    ttl_seconds: int | None
    seconds_left: float | None
    last_outcome: str | None
    in_flight: bool
    waiting: int


class Coalescer(Generic[R, E]):
    def __init__(self, *, absorb: AbsorbSettings | None = None, tracking: LeaseTrackingSettings | None = None) -> None:
        self.absorb = absorb or AbsorbSettings()
        self.tracking = tracking or LeaseTrackingSettings()
        self._leases: dict[LeaseKey, _Lease[R]] = {}
        self._waiting: dict[int, LeaseKey] = {}
        # When each waiting worker gives up on its beat (arrival plus its interval).
        self._windows: dict[int, float] = {}
        self._confirmed = 0
        self._flight_ids = itertools.count(1)
        # (when, key): times at which a lease may need expiring or forgetting.
        self._deadlines: list[tuple[float, LeaseKey]] = []
        # The earliest Wakeup asked for and not yet answered by a tick.
        self._wakeup_asked: float | None = None
        # Rows of the table by (environment id, state), and the TTLs of active ones by environment:
        # kept as leases change, so reading them (a metrics scrape) costs nothing per lease.
        self._by_state: Counter[tuple[str, str]] = Counter()
        # Ended leases, in the order they ended (the table itself is in the order leases were beaten).
        self._ended: dict[LeaseKey, None] = {}
        self._active_ttls: dict[str, Counter[int]] = {}
        # Recent upstream heartbeat round trips (main lane, retries included): the absorption margin.
        self._latencies: deque[float] = deque(maxlen=LATENCY_MEMORY)

    # -- inputs -------------------------------------------------------------------

    def submit(self, beat: Beat, now: float) -> list[Action[R, E]]:
        """A worker's heartbeat arrived."""
        return self._asking_wakeup(self._submit(beat, now))

    def _submit(self, beat: Beat, now: float) -> list[Action[R, E]]:
        lease = self._lease(beat.key, now)
        self._waiting[beat.waiter] = beat.key
        self._windows[beat.waiter] = now + worker_interval(lease.delivered_ttl)
        if not self._in_main_lane(lease, beat):
            return self._submit_side(lease, beat, now)
        flight = lease.flight
        if flight is not None:
            if self._can_join(flight, beat) and not lease.queue:
                flight.waiters.append(beat.waiter)
                return []
            if self._presents_current(lease, beat):
                return self._queue_ahead(lease, beat)
            if len(lease.queue) >= MAX_MAIN_QUEUE:
                return self._throttled(lease, beat)
            lease.queue.append(beat)
            return []
        return self._decide_queue(lease, [beat], now)

    @staticmethod
    def _presents_current(lease: _Lease[R], beat: Beat) -> bool:
        """The beat echoes the lease's last accepted value: the holder's, as far as anyone can tell."""
        return beat.expected is not None and beat.expected == lease.last_heartbeat

    def _queue_ahead(self, lease: _Lease[R], beat: Beat) -> list[Action[R, E]]:
        """The holder's beat waits behind no beat that does not present the current value.

        A flood with a credential the gateway vouches for (a leaked token, a worker
        replaying stale values) would otherwise fill the queue ahead of the holder and
        cost it its lease. Order among current beats is kept; the queue's bound still
        holds, and the newest beat that does not present the current value makes room.
        """
        queue = lease.queue
        position = next((i for i, b in enumerate(queue) if not self._presents_current(lease, b)), len(queue))
        queue.insert(position, beat)
        if len(queue) <= MAX_MAIN_QUEUE:
            return []
        return self._throttled(lease, queue.pop())

    def completed(self, key: LeaseKey, flight_id: int, outcome: FlightResult[R, E], now: float) -> list[Action[R, E]]:
        """The upstream call of flight `flight_id` came back (after any retries)."""
        return self._asking_wakeup(self._completed(key, flight_id, outcome, now))

    def _completed(self, key: LeaseKey, flight_id: int, outcome: FlightResult[R, E], now: float) -> list[Action[R, E]]:
        lease = self._leases.get(key)
        if lease is None:
            return []
        if lease.flight is None or lease.flight.id != flight_id:
            return self._side_completed(lease, flight_id, outcome, now)
        flight, lease.flight = lease.flight, None
        lease.last_seen = now
        self._latencies.append(now - flight.sent_at)
        waiting = self._still_waiting(flight)
        actions: list[Action[R, E]] = []
        if isinstance(outcome, Succeeded):
            actions += self._succeeded(lease, flight, outcome, waiting, now)
        elif isinstance(outcome, Rejected):
            actions += self._rejected(lease, outcome, waiting, flight)
        elif isinstance(outcome, Unsuccessful):
            self._failed(lease, outcome.may_have_applied)
            actions += [Deliver(w, self._name(flight, w), outcome.response) for w in waiting]
        else:
            self._failed(lease, outcome.may_have_applied)
            actions += [DeliverError(w, outcome.error) for w in waiting]
        self._done_waiting(flight)
        actions += self._decide_queue(lease, [], now)
        self._forget_if_unconfirmed(lease)
        return actions

    def _done_waiting(self, flight: _Flight) -> None:
        for w in (flight.owner, *flight.waiters):
            self._waiting.pop(w, None)
            self._windows.pop(w, None)

    @staticmethod
    def _still_waiting(flight: _Flight) -> list[int]:
        return [w for w in ([] if flight.owner_gone else [flight.owner]) + flight.waiters]

    @staticmethod
    def _failed(lease: _Lease[R], may_have_applied: bool) -> None:
        lease.known = None
        lease.last_outcome = "upstream_error"
        if may_have_applied:
            # The lease may have moved on: a kept answer could now be stale.
            lease.undelivered = None

    def abandoned(self, waiter: int, now: float) -> list[Action[R, E]]:
        """A worker went away (disconnect or its own timeout) before it was answered."""
        key = self._waiting.pop(waiter, None)
        self._windows.pop(waiter, None)
        lease = self._leases.get(key) if key is not None else None
        if lease is None:
            return []
        lease.last_seen = now
        lanes = [(lease.flight, lease.queue)] + [(lane.flight, lane.queue) for lane in lease.side.values()]
        for flight, queue in lanes:
            if flight is not None and flight.owner == waiter:
                # The call goes on: it may already have been applied. Its answer is kept for a retry.
                flight.owner_gone = True
                return []
            if flight is not None and waiter in flight.waiters:
                flight.waiters.remove(waiter)
                return []
            if any(b.waiter == waiter for b in queue):
                # Never sent: nobody asks for it any more, so it never will be.
                remaining = [b for b in queue if b.waiter != waiter]
                queue.clear()
                queue.extend(remaining)
                break
        for identity, lane in list(lease.side.items()):
            if lane.flight is None and not lane.queue:
                del lease.side[identity]
        self._forget_if_unconfirmed(lease)
        return []

    def unwritten(self, waiter: int, key: LeaseKey, now: float) -> None:
        """The driver delivered a success to `waiter` but could not write it: keep it for a retry."""
        lease = self._leases.get(key)
        if lease is None or lease.known is None or lease.known.delivered_to != waiter:
            return
        if lease.known.expected is not None and lease.known.surely_held_until() - now >= MIN_HANDOFF_SECONDS:
            lease.undelivered = lease.known
            lease.known.delivered_to = None

    def stop_seen(self, key: LeaseKey, now: float) -> None:
        """A stop for the item passed through the gateway: whatever was known may change."""
        lease = self._leases.get(key)
        if lease is not None:
            lease.known = lease.undelivered = None
            lease.last_seen = now
            lease.stop_requested = True
            self._mark_ended(lease, True)
            for flight in (lease.flight, *(lane.flight for lane in lease.side.values())):
                if flight is not None:
                    flight.after_stop = True

    def reset(self, key: LeaseKey, finished: int | None = None) -> list[int]:
        """Answer for a decision that could not be carried out (a bug, not weather): returns the waiters to fail.

        Every worker waiting on the lease is returned, except those riding a
        flight still out: the driver always reports a flight's end, so they get
        its answer (a holder failed while its beat is applied upstream would
        retry with a value the API has moved past, and lose the lease).
        `finished` is the flight whose completion failed: it is over, and its
        waiters are returned. What was known goes, so nothing is answered
        locally until the upstream speaks again; queued beats are returned
        unsent. Who waits is read from the waiter index, not from the lease's
        lanes alone, which may be what went wrong.
        """
        lease = self._leases.get(key)
        riding: set[int] = set()
        if lease is not None:
            lanes = [(None, lease)] + [(identity, lane) for identity, lane in lease.side.items()]
            for identity, lane in lanes:
                flight = lane.flight
                if flight is not None and flight.id == finished:
                    lane.flight = None
                    flight = None
                if flight is not None:
                    riding.update((flight.owner, *flight.waiters))
                lane.queue.clear()
                if identity is not None and flight is None:
                    del lease.side[identity]
            lease.known = lease.undelivered = None
            lease.epoch += 1
        waiters = [w for w, k in self._waiting.items() if k == key and w not in riding]
        for waiter in waiters:
            del self._waiting[waiter]
            self._windows.pop(waiter, None)
        if lease is not None and lease.idle:
            self._remove(lease)
        return waiters

    def tick(self, now: float) -> list[Action[R, E]]:
        """Time passed: record leases that lapsed unrenewed, forget ended ones, enforce the size cap."""
        events: list[Action[R, E]] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            when, key = heapq.heappop(self._deadlines)
            lease = self._leases.get(key)
            if lease is None or lease.next_check != when:
                continue  # forgotten, or superseded by an earlier check
            lease.next_check = None
            events += self._check_lease(lease, now)
        # Whatever wakeup was asked for is answered by this tick: ask for the next one afresh.
        self._wakeup_asked = None
        return self._asking_wakeup(events)

    def next_deadline(self) -> float | None:
        """When `tick` next has something to do (stale checks, superseded or forgotten, are skipped)."""
        deadlines = self._deadlines
        while deadlines:
            when, key = deadlines[0]
            lease = self._leases.get(key)
            if lease is not None and lease.next_check == when:
                return when
            heapq.heappop(deadlines)
        return None

    def _asking_wakeup(self, actions: list[Action[R, E]]) -> list[Action[R, E]]:
        """`actions`, plus a Wakeup if the next deadline is earlier than any asked for."""
        when = self.next_deadline()
        if when is not None and (self._wakeup_asked is None or when < self._wakeup_asked):
            self._wakeup_asked = when
            actions.append(Wakeup(when))
        return actions

    # -- queries ------------------------------------------------------------------

    def is_waiting(self, waiter: int) -> bool:
        """Whether the core still owes `waiter` an answer."""
        return waiter in self._waiting

    def in_flight(self, key: LeaseKey) -> int:
        """Flights out for the lease: its main lane's, plus one per side lane."""
        lease = self._leases.get(key)
        if lease is None:
            return 0
        return (lease.flight is not None) + sum(lane.flight is not None for lane in lease.side.values())

    def _flight(self, key: LeaseKey, flight_id: int) -> _Flight | None:
        lease = self._leases.get(key)
        if lease is None:
            return None
        for flight in (lease.flight, *(lane.flight for lane in lease.side.values())):
            if flight is not None and flight.id == flight_id:
                return flight
        return None

    def flight_wanted(self, key: LeaseKey, flight_id: int) -> bool:
        """Whether any worker still waits for flight `flight_id`: retries need one."""
        flight = self._flight(key, flight_id)
        return flight is not None and (not flight.owner_gone or bool(flight.waiters))

    def retry_deadline(self, key: LeaseKey, flight_id: int) -> float | None:
        """The time by which the flight's answer must be back for every worker still waiting on it to use it."""
        flight = self._flight(key, flight_id)
        if flight is None:
            return None
        windows = [self._windows[w] for w in self._still_waiting(flight) if w in self._windows]
        return min(windows, default=None)

    def holder(self, key: LeaseKey) -> Hashable | None:
        """The identity the upstream last accepted on the lease."""
        lease = self._leases.get(key)
        return lease.holder if lease is not None else None

    def lease_time_left(self, key: LeaseKey, now: float) -> float | None:
        """Seconds the lease is surely still held, if this gateway knows it."""
        lease = self._leases.get(key)
        if lease is None or lease.known is None:
            return None
        return lease.known.surely_held_until() - now

    def leases(self, now: float) -> Iterator[LeaseView]:
        for lease in self._leases.values():
            left = None
            if lease.last_success_sent_at is not None and lease.ttl_seconds and not lease.ended:
                left = max(0.0, lease.last_success_sent_at + lease.ttl_seconds - now)
            yield LeaseView(
                environment_id=lease.key[0],
                work_id=lease.key[1],
                state=lease.state,
                last_heartbeat=lease.last_heartbeat,
                ttl_seconds=lease.ttl_seconds,
                seconds_left=left,
                last_outcome=lease.last_outcome,
                in_flight=lease.flight is not None or lease.side_in_flight,
                waiting=len(lease.queue)
                + (len(lease.flight.waiters) + 1 if lease.flight else 0)
                + sum(len(lane.queue) + (lane.flight is not None) for lane in lease.side.values()),
            )

    def __len__(self) -> int:
        return len(self._leases)

    def table_counts(self) -> TableCounts:
        """Rows by (environment id, state), and the shortest TTL among active leases per environment.

        States outside `LeaseState` count as unknown. Constant time in the table's size.
        """
        shortest = {env: min(ttls) for env, ttls in self._active_ttls.items() if ttls}
        return MappingProxyType(self._by_state), shortest

    def _observed(self, lease: _Lease[R], state: str, ttl_seconds: int | None) -> None:
        """The lease's state or TTL changed: the counts follow."""
        self._count(lease, -1)
        lease.state, lease.ttl_seconds = state, ttl_seconds
        self._count(lease, 1)

    def _count(self, lease: _Lease[R], sign: int) -> None:
        env = lease.key[0]
        state = lease.state if lease.state in _STATES else LeaseState.UNKNOWN
        key = (env, str(state))
        self._by_state[key] += sign
        if not self._by_state[key]:
            del self._by_state[key]
        if state == LeaseState.ACTIVE and lease.ttl_seconds:
            ttls = self._active_ttls.setdefault(env, Counter())
            ttls[lease.ttl_seconds] += sign
            if not ttls[lease.ttl_seconds]:
                del ttls[lease.ttl_seconds]
                if not ttls:
                    del self._active_ttls[env]

    # -- decisions ------------------------------------------------------------------

    def _lease(self, key: LeaseKey, now: float) -> _Lease[R]:
        lease = self._leases.pop(key, None)
        if lease is None:
            # Unconfirmed until the upstream accepts a beat: it costs no confirmed lease its row.
            # No check is scheduled yet: an unconfirmed row leaves as soon as nothing waits on it
            # (a junk flood must not leave a heap entry per beat), a confirmed one schedules its own.
            lease = _Lease(key, last_seen=now)
            self._count(lease, 1)
        # Re-inserted last: the table's order is the order leases were last beaten, oldest first.
        self._leases[key] = lease
        lease.last_seen = now
        return lease

    def _forget_if_unconfirmed(self, lease: _Lease[R]) -> None:
        """A lease no upstream answer confirmed leaves the table as soon as nothing waits on it."""
        if not lease.confirmed and lease.idle and self._leases.get(lease.key) is lease:
            del self._leases[lease.key]
            self._ended.pop(lease.key, None)
            self._count(lease, -1)

    def _in_main_lane(self, lease: _Lease[R], beat: Beat) -> bool:
        return beat.vouched or (lease.holder is not None and beat.identity == lease.holder)

    def _submit_side(self, lease: _Lease[R], beat: Beat, now: float) -> list[Action[R, E]]:
        """A beat with a credential nobody vouches for: its own lane, never in the main lane's way."""
        lane = lease.side.get(beat.identity)
        if lane is None:
            if len(lease.side) >= MAX_SIDE_CREDENTIALS:
                # No lane of its own: sent as it comes, as the worker would send it directly. Refusing it
                # would let a few junk credentials lock out an honest one (its own key, passed through);
                # what bounds these flights is the general capacity class they draw on.
                lane = lease.side[(_UNLANED, beat.waiter)] = _SideLane()
                return [self._send_side(lease, lane, beat, now)]
            lane = lease.side[beat.identity] = _SideLane()
        if lane.flight is not None:
            if len(lane.queue) >= MAX_SIDE_QUEUE:
                return self._throttled(lease, beat)
            lane.queue.append(beat)
            return []
        return [self._send_side(lease, lane, beat, now)]

    def _send_side(self, lease: _Lease[R], lane: _SideLane, beat: Beat, now: float) -> Send:
        flight = _Flight(next(self._flight_ids), beat.waiter, beat.expected, beat.identity, now, [], epoch=lease.epoch)
        flight.side = beat.identity
        self._mark_overlaps(lease, flight)
        lane.flight = flight
        return Send(flight.id, lease.key, beat.waiter, main=False)

    @staticmethod
    def _mark_overlaps(lease: _Lease[R], sent: _Flight) -> None:
        """`sent` is about to go out: every flight of the lease still out overlaps it, and it them."""
        for other in (lease.flight, *(lane.flight for lane in lease.side.values())):
            if other is not None and other is not sent:
                other.overlapped = sent.overlapped = True

    def _side_completed(
        self, lease: _Lease[R], flight_id: int, outcome: FlightResult[R, E], now: float
    ) -> list[Action[R, E]]:
        identity, lane = next(
            ((i, lane) for i, lane in lease.side.items() if lane.flight is not None and lane.flight.id == flight_id),
            (None, None),
        )
        if lane is None or lane.flight is None:
            return []
        flight, lane.flight = lane.flight, None
        lease.last_seen = now
        waiting = self._still_waiting(flight)
        actions: list[Action[R, E]] = []
        if isinstance(outcome, Succeeded):
            # The upstream accepted this credential: it is the holder's now.
            answer = outcome.answer
            actions += self._observe_success(lease, flight, answer)
            self._supersede(lease, flight, answer)
            lease.holder = flight.identity
            lease.known = lease.undelivered = None
            lease.epoch += 1
            if answer.holds_lease and waiting:
                lease.delivered_ttl = answer.ttl_seconds
            actions += [Deliver(w, Outcome.FORWARDED, outcome.response) for w in waiting]
            if not flight.overlapped and not flight.after_stop and answer.holds_lease:
                # Alone on the lease all along: the answer is as current as a main-lane one,
                # and may be kept (for local answers to this, now the holder's, credential).
                success = _Success(answer, outcome.response, flight.identity, flight.expected, flight.sent_at)
                lease.known = success
                if waiting:
                    success.delivered_to = waiting[0]
                elif flight.expected is not None:
                    lease.undelivered = success
        elif isinstance(outcome, Rejected):
            if outcome.current_state != LeaseState.ACTIVE or (
                lease.known is not None and outcome.current_last_heartbeat != lease.known.answer.last_heartbeat
            ):
                lease.known = lease.undelivered = None
            actions += [Deliver(w, Outcome.FORWARDED, outcome.response) for w in waiting]
        else:
            if outcome.may_have_applied:
                lease.known = lease.undelivered = None
                lease.epoch += 1
            if isinstance(outcome, Unsuccessful):
                actions += [Deliver(w, Outcome.FORWARDED, outcome.response) for w in waiting]
            else:
                actions += [DeliverError(w, outcome.error) for w in waiting]
        self._done_waiting(flight)
        if lane.queue:
            actions.append(self._send_side(lease, lane, lane.queue.pop(0), now))
        else:
            del lease.side[identity]
        self._forget_if_unconfirmed(lease)
        return actions

    def _throttled(self, lease: _Lease[R], beat: Beat) -> list[Action[R, E]]:
        """Too many beats waiting on this lease: refused here, as the API refuses a flood."""
        self._waiting.pop(beat.waiter, None)
        self._windows.pop(beat.waiter, None)
        self._forget_if_unconfirmed(lease)
        return [DeliverLocal(beat.waiter, Outcome.THROTTLED, 429, throttled_body())]

    @staticmethod
    def _can_join(flight: _Flight, beat: Beat) -> bool:
        return flight.expected is None and not beat.conditional and beat.identity == flight.identity

    def _decide_queue(self, lease: _Lease[R], arrivals: list[Beat], now: float) -> list[Action[R, E]]:
        """Decide waiting requests in arrival order until one has to go upstream."""
        lease.queue.extend(arrivals)
        actions: list[Action[R, E]] = []
        while lease.queue and lease.flight is None:
            beat = lease.queue.pop(0)
            local = self._answer_locally(lease, beat, now)
            if local is not None:
                actions.append(local)
                lease.last_outcome = local.outcome
                self._waiting.pop(beat.waiter, None)
                self._windows.pop(beat.waiter, None)
                continue
            flight = _Flight(
                next(self._flight_ids), beat.waiter, beat.expected, beat.identity, now, [], epoch=lease.epoch
            )
            self._mark_overlaps(lease, flight)
            lease.flight = flight
            lease.last_outcome = Outcome.FORWARDED
            # Unconditional beats right behind it ride along.
            while lease.queue and self._can_join(flight, lease.queue[0]):
                flight.waiters.append(lease.queue.pop(0).waiter)
            actions.append(Send(flight.id, lease.key, beat.waiter))
        return actions

    def _answer_locally(self, lease: _Lease[R], beat: Beat, now: float) -> Deliver[R] | DeliverLocal | None:
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
            body = self._answer_body(undelivered, now)
            lease.delivered_ttl = body["ttl_seconds"]
            return DeliverLocal(beat.waiter, Outcome.HANDED_OFF, 200, body)
        known = lease.known
        # Local answers only for the credential the upstream last accepted on
        # this lease: anyone else gets the upstream's own verdict (maybe a 401).
        if known is None or beat.identity != known.identity:
            return None
        if beat.expected == known.answer.last_heartbeat and self._absorbable(known, beat, now):
            body = self._answer_body(known, now)
            lease.delivered_ttl = body["ttl_seconds"]
            return DeliverLocal(beat.waiter, Outcome.ABSORBED, 200, body)
        if beat.expected is not None and beat.expected in lease.superseded:
            return self._rejected_locally(beat, known)
        if beat.expected == NO_HEARTBEAT and now < known.surely_held_until():
            return self._rejected_locally(beat, known)
        return None

    def _absorbable(self, known: _Success[R], beat: Beat, now: float) -> bool:
        policy = self.absorb
        if not policy.enabled or beat.identity != known.identity or not known.answer.holds_lease:
            return False
        left = known.surely_held_until() - now
        return (
            now - known.sent_at < policy.max_signal_delay_seconds
            and left >= policy.min_remaining_fraction * known.answer.ttl_seconds
            # The SDK workers pace themselves by the answer: only what keeps their pace is absorbed.
            and keeps_pace(known.answer.ttl_seconds, int(left), self.latency_margin())
        )

    def latency_margin(self) -> float:
        """Lease time an absorbed answer must leave after the worker's next interval, for a forwarded beat."""
        return LATENCY_MARGIN_FACTOR * self.round_trip()

    def round_trip(self) -> float:
        """The slowest recent upstream heartbeat round trip (0 before the first)."""
        return max(self._latencies, default=0.0)

    @staticmethod
    def _answer_body(success: _Success[R], now: float) -> dict[str, Any]:
        # Whole seconds surely left: never more than the upstream would say.
        return success_body(success.answer, int(success.surely_held_until() - now))

    @staticmethod
    def _rejected_locally(beat: Beat, known: _Success[R]) -> DeliverLocal:
        return DeliverLocal(beat.waiter, Outcome.REJECTED, 412, precondition_failed_body(beat.expected, known.answer))

    def _succeeded(
        self, lease: _Lease[R], flight: _Flight, outcome: Succeeded[R], waiting: list[int], now: float
    ) -> list[Action[R, E]]:
        answer = outcome.answer
        events = self._observe_success(lease, flight, answer)
        success = _Success(answer, outcome.response, flight.identity, flight.expected, flight.sent_at)
        self._supersede(lease, flight, answer)
        lease.undelivered = None
        lease.holder = flight.identity
        # Not kept if a side flight that may have moved the lease came back while this one was out.
        keep = answer.holds_lease and not flight.after_stop and flight.epoch == lease.epoch
        lease.known = success if keep else None
        if answer.holds_lease and waiting:
            lease.delivered_ttl = answer.ttl_seconds
        if flight.expected is not None:
            if waiting:
                success.delivered_to = waiting[0]
                return [*events, Deliver(waiting[0], Outcome.FORWARDED, outcome.response)]
            if keep:
                lease.undelivered = success
            return events
        return [*events, *(Deliver(w, self._name(flight, w), outcome.response) for w in waiting)]

    @staticmethod
    def _supersede(lease: _Lease[R], flight: _Flight, answer: HeartbeatAnswer) -> None:
        """Anything older is history now: its values can never match again."""
        for old in (lease.known, lease.undelivered):
            if old is not None and old.answer.last_heartbeat != answer.last_heartbeat:
                _supersede_value(lease, old.answer.last_heartbeat)
        if flight.expected not in (None, NO_HEARTBEAT) and flight.expected != answer.last_heartbeat:
            _supersede_value(lease, flight.expected)

    def _observe_success(self, lease: _Lease[R], flight: _Flight, answer: HeartbeatAnswer) -> list[Action[R, E]]:
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
            events += self._evict_if_full()
            self._confirmed += 1
        self._observed(lease, answer.state, answer.ttl_seconds)
        lease.last_heartbeat = answer.last_heartbeat
        lease.last_success_sent_at = flight.sent_at
        # A stopping lease is on its way out: if it lapses now, nothing was lost.
        self._mark_ended(
            lease,
            lease.stop_requested
            or answer.state in (LeaseState.STOPPING, LeaseState.STOPPED)
            or not answer.lease_extended,
        )
        self._schedule(lease, flight.sent_at + answer.ttl_seconds + self.tracking.expiry_grace_seconds)
        return events

    def _rejected(
        self, lease: _Lease[R], outcome: Rejected[R], waiting: list[int], flight: _Flight
    ) -> list[Action[R, E]]:
        lease.known = None
        undelivered = lease.undelivered
        if undelivered is not None and (
            outcome.current_state != LeaseState.ACTIVE
            or outcome.current_last_heartbeat != undelivered.answer.last_heartbeat
        ):
            # The 412 shows the lease has moved on from the answer nobody received.
            lease.undelivered = None
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
            self._observed(lease, outcome.current_state, lease.ttl_seconds)
        lease.last_outcome = "rejected_upstream"
        return [*events, *(Deliver(w, self._name(flight, w), outcome.response) for w in waiting)]

    @staticmethod
    def _name(flight: _Flight, waiter: int) -> Outcome:
        return Outcome.FORWARDED if waiter == flight.owner else Outcome.JOINED

    # -- table upkeep -----------------------------------------------------------------

    def _schedule(self, lease: _Lease[R], when: float) -> None:
        """Make sure the lease is checked no later than `when`; one pending check per lease.

        A check that comes due recomputes when the next one is needed, so a
        later time never needs its own entry while an earlier one is pending.
        """
        if lease.next_check is not None and lease.next_check <= when:
            return
        lease.next_check = when
        heapq.heappush(self._deadlines, (when, lease.key))

    def _check_lease(self, lease: _Lease[R], now: float) -> list[Action[R, E]]:
        sent, ttl = lease.last_success_sent_at, lease.ttl_seconds
        if not lease.ended and sent is not None and ttl is not None:
            if now < sent + ttl + self.tracking.expiry_grace_seconds:
                self._schedule(lease, sent + ttl + self.tracking.expiry_grace_seconds)  # renewed since
                return []
            if lease.flight is not None or lease.queue:
                # The holder's beat is on its way and may renew it: look again shortly. (Side lanes,
                # other credentials' beats, do not hold the check off: a junk stream must not hide a loss.)
                self._schedule(lease, now + EXPIRY_RECHECK_SECONDS)
                return []
            # Nobody renewed it through this gateway: a loss no one else reports.
            self._observed(lease, LeaseState.EXPIRED, lease.ttl_seconds)
            self._mark_ended(lease, True)
            lease.known = None
            lease.last_seen = now
            self._schedule(lease, now + self.tracking.retention_seconds)
            return [LeaseEvent(lease.key, LeaseEventKind.EXPIRED)]
        # Ended, or never granted: forget it once it has been quiet for the retention time.
        if not lease.idle:
            self._schedule(lease, now + self.tracking.retention_seconds)
        elif now - lease.last_seen >= self.tracking.retention_seconds:
            self._remove(lease)
        else:
            self._schedule(lease, lease.last_seen + self.tracking.retention_seconds)
        return []

    def _remove(self, lease: _Lease[R]) -> None:
        del self._leases[lease.key]
        self._ended.pop(lease.key, None)
        self._count(lease, -1)
        if lease.confirmed:
            self._confirmed -= 1

    def _evict_if_full(self) -> list[Action[R, E]]:
        """Room for one more confirmed lease. Only confirmed ones count, and only they are evicted:
        beats no upstream accepted (a junk credential's) never take a real lease's row."""
        if self._confirmed < self.tracking.max_tracked:
            return []
        # One per new lease: ended leases first (longest ended), then the longest since a beat. Both
        # orders are kept as leases change, so this costs the same at 100 or 100,000 leases.
        for key in itertools.chain(self._ended, self._leases):
            lease = self._leases[key]
            if lease.idle and lease.confirmed:
                self._remove(lease)
                return [LeaseEvent(key, LeaseEventKind.EVICTED)]
        return []

    def _mark_ended(self, lease: _Lease[R], ended: bool) -> None:
        """Stopped, lost or expired (or not): ended leases are the first to go from a full table."""
        lease.ended = ended
        if ended:
            self._ended.setdefault(lease.key, None)
        else:
            self._ended.pop(lease.key, None)


def _supersede_value(lease: _Lease[Any], value: str) -> None:
    """Remember `value` as superseded: it can never match again. Only the last few are kept."""
    lease.superseded.append(value)
    if len(lease.superseded) > _SUPERSEDED_MEMORY:
        del lease.superseded[0]
