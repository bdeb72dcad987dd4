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
- The rows themselves (which leases are kept, their counts, when each is
  looked at again, eviction) are the lease table's (`table`); what is kept
  per lease, and the lane type both kinds of lane share, is `lease`; what a
  flight's end teaches is `verdicts`, what may be answered here is `local`,
  and the results in and actions out are `actions`.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

from gateway.config.settings import AbsorbSettings, LeaseTrackingSettings

from .actions import (
    Action,
    DeliverLocal,
    FlightResult,
    LeaseEvent,
    Send,
    Wakeup,
)
from .lease import Beat, Flight, Lane, Lease, LeaseKey, presents
from .local import MIN_HANDOFF_SECONDS, answer_locally
from .table import LeaseTable, LeaseView, TableCounts
from .verdicts import learn
from .wire import LeaseEventKind, Outcome, throttled_body
from .worker_model import worker_interval

__all__ = ["MAX_MAIN_QUEUE", "MAX_SIDE_CREDENTIALS", "MAX_SIDE_QUEUE", "Coalescer"]

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

R = TypeVar("R")  # the driver's upstream response
E = TypeVar("E")  # the driver's upstream error


# -- the coalescer ----------------------------------------------------------------


class Coalescer(Generic[R, E]):
    def __init__(self, *, absorb: AbsorbSettings | None = None, tracking: LeaseTrackingSettings | None = None) -> None:
        self.absorb = absorb or AbsorbSettings()
        self.table: LeaseTable[R] = LeaseTable(tracking)
        self._waiting: dict[int, LeaseKey] = {}
        # When each waiting worker gives up on its beat (arrival plus its interval).
        self._windows: dict[int, float] = {}
        self._flight_ids = itertools.count(1)
        # The earliest Wakeup asked for and not yet answered by a tick.
        self._wakeup_asked: float | None = None
        # Recent upstream heartbeat round trips (main lane, retries included): the absorption margin.
        self._latencies: deque[float] = deque(maxlen=LATENCY_MEMORY)

    # -- inputs -------------------------------------------------------------------

    def submit(self, beat: Beat, now: float) -> list[Action[R, E]]:
        """A worker's heartbeat arrived."""
        return self._asking_wakeup(self._submit(beat, now))

    def _submit(self, beat: Beat, now: float) -> list[Action[R, E]]:
        lease = self.table.touch(beat.key, now)
        self._waiting[beat.waiter] = beat.key
        self._windows[beat.waiter] = now + worker_interval(lease.delivered_ttl)
        lane = self._lane_for(lease, beat)
        flight = lane.flight
        if flight is None:
            return self._decide_queue(lease, lane, [beat], now)
        if lane.main and flight.takes(beat) and not lane.queue:
            flight.waiters.append(beat.waiter)
            return []
        if lane.main and presents(beat, lease.last_heartbeat):
            # The holder's beat waits behind no beat that does not present the current value.
            refused = lane.queue_ahead(beat, lease.last_heartbeat, MAX_MAIN_QUEUE)
            return [] if refused is None else self._throttled(lease, refused)
        if len(lane.queue) >= (MAX_MAIN_QUEUE if lane.main else MAX_SIDE_QUEUE):
            return self._throttled(lease, beat)
        lane.queue.append(beat)
        return []

    def _lane_for(self, lease: Lease[R], beat: Beat) -> Lane:
        """The main lane for a credential the gateway vouches for or the holder's; else the credential's own.

        A side lane never waits for the main lane nor makes it wait. Beyond a few
        side credentials, a beat is sent as it comes, as the worker would send it
        directly: refusing it would let a few junk credentials lock out an honest
        one (its own key, passed through); what bounds these flights is the
        general capacity class they draw on.
        """
        if beat.vouched or (lease.holder is not None and beat.identity == lease.holder):
            return lease.main
        lane = lease.side.get(beat.identity)
        if lane is None:
            identity = beat.identity if len(lease.side) < MAX_SIDE_CREDENTIALS else (_UNLANED, beat.waiter)
            lane = lease.side[identity] = Lane(main=False)
        return lane

    def completed(self, key: LeaseKey, flight_id: int, outcome: FlightResult[R, E], now: float) -> list[Action[R, E]]:
        """The upstream call of flight `flight_id` came back (after any retries)."""
        return self._asking_wakeup(self._completed(key, flight_id, outcome, now))

    def _completed(self, key: LeaseKey, flight_id: int, outcome: FlightResult[R, E], now: float) -> list[Action[R, E]]:
        lease = self.table.get(key)
        lane = lease.lane_of(flight_id) if lease is not None else None
        if lease is None or lane is None:
            return []  # a completion for a flight the lease no longer has
        flight = lane.flight
        assert flight is not None  # lane_of found it there
        lane.flight = None
        lease.last_seen = now
        if lane.main:
            self._latencies.append(now - flight.sent_at)
        waiting = flight.still_waiting()
        actions = learn(self.table, lease, lane, flight, outcome, waiting)
        self._done_waiting(flight)
        actions += self._decide_queue(lease, lane, [], now)
        self.table.forget_if_unconfirmed(lease)
        return actions

    def _done_waiting(self, flight: Flight) -> None:
        for waiter in (flight.owner, *flight.waiters):
            self._answered(waiter)

    def _answered(self, waiter: int) -> LeaseKey | None:
        """`waiter` is owed nothing more (answered, gone, or refused): the lease it waited on, if any."""
        self._windows.pop(waiter, None)
        return self._waiting.pop(waiter, None)

    def abandoned(self, waiter: int, now: float) -> list[Action[R, E]]:
        """A worker went away (disconnect or its own timeout) before it was answered."""
        key = self._answered(waiter)
        lease = self.table.get(key) if key is not None else None
        if lease is None:
            return []
        lease.last_seen = now
        for lane in lease.lanes():
            flight = lane.flight
            if flight is not None and flight.owner == waiter:
                # The call goes on: it may already have been applied. Its answer is kept for a retry.
                flight.owner_gone = True
                return []
            if flight is not None and waiter in flight.waiters:
                flight.waiters.remove(waiter)
                return []
            if any(b.waiter == waiter for b in lane.queue):
                # Never sent: nobody asks for it any more, so it never will be.
                lane.queue[:] = [b for b in lane.queue if b.waiter != waiter]
                break
        lease.drop_idle_side_lanes()
        self.table.forget_if_unconfirmed(lease)
        return []

    def unwritten(self, waiter: int, key: LeaseKey, now: float) -> None:
        """The driver delivered a success to `waiter` but could not write it: keep it for a retry."""
        lease = self.table.get(key)
        if lease is None or lease.known is None or lease.known.delivered_to != waiter:
            return
        if lease.known.expected is not None and lease.known.surely_held_until() - now >= MIN_HANDOFF_SECONDS:
            lease.undelivered = lease.known
            lease.known.delivered_to = None

    def stop_seen(self, key: LeaseKey, now: float) -> None:
        """A stop for the item passed through the gateway: whatever was known may change."""
        lease = self.table.get(key)
        if lease is not None:
            lease.known = lease.undelivered = None
            lease.last_seen = now
            lease.stop_requested = True
            self.table.mark_ended(lease, True)
            for flight in lease.flights():
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
        lease = self.table.get(key)
        riding: set[int] = set()
        if lease is not None:
            for lane in lease.lanes():
                if lane.flight is not None and lane.flight.id == finished:
                    lane.flight = None
                if lane.flight is not None:
                    riding.update((lane.flight.owner, *lane.flight.waiters))
                lane.queue.clear()
            lease.drop_idle_side_lanes()
            lease.known = lease.undelivered = None
            lease.epoch += 1
        waiters = [w for w, k in self._waiting.items() if k == key and w not in riding]
        for waiter in waiters:
            self._answered(waiter)
        if lease is not None and lease.idle:
            self.table.remove(lease)
        return waiters

    def tick(self, now: float) -> list[Action[R, E]]:
        """Time passed: record leases that lapsed unrenewed, forget ended ones, enforce the size cap."""
        events: list[Action[R, E]] = [LeaseEvent(key, LeaseEventKind.EXPIRED) for key in self.table.due(now)]
        # Whatever wakeup was asked for is answered by this tick: ask for the next one afresh.
        self._wakeup_asked = None
        return self._asking_wakeup(events)

    def next_deadline(self) -> float | None:
        """When `tick` next has something to do."""
        return self.table.next_deadline()

    def _asking_wakeup(self, actions: list[Action[R, E]]) -> list[Action[R, E]]:
        """`actions`, plus a Wakeup if the next deadline is earlier than any asked for."""
        when = self.table.next_deadline()
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
        lease = self.table.get(key)
        return len(lease.flights()) if lease is not None else 0

    def _flight(self, key: LeaseKey, flight_id: int) -> Flight | None:
        lease = self.table.get(key)
        lane = lease.lane_of(flight_id) if lease is not None else None
        return lane.flight if lane is not None else None

    def flight_wanted(self, key: LeaseKey, flight_id: int) -> bool:
        """Whether any worker still waits for flight `flight_id`: retries need one."""
        flight = self._flight(key, flight_id)
        return flight is not None and (not flight.owner_gone or bool(flight.waiters))

    def retry_deadline(self, key: LeaseKey, flight_id: int) -> float | None:
        """The time by which the flight's answer must be back for every worker still waiting on it to use it."""
        flight = self._flight(key, flight_id)
        if flight is None:
            return None
        windows = [self._windows[w] for w in flight.still_waiting() if w in self._windows]
        return min(windows, default=None)

    def holder(self, key: LeaseKey) -> Hashable | None:
        """The identity the upstream last accepted on the lease."""
        lease = self.table.get(key)
        return lease.holder if lease is not None else None

    def lease_time_left(self, key: LeaseKey, now: float) -> float | None:
        """Seconds the lease is surely still held, if this gateway knows it."""
        lease = self.table.get(key)
        if lease is None or lease.known is None:
            return None
        return lease.known.surely_held_until() - now

    def leases(self, now: float) -> Iterator[LeaseView]:
        return self.table.views(now)

    def __len__(self) -> int:
        return len(self.table)

    def table_counts(self) -> TableCounts:
        return self.table.counts()

    def latency_margin(self) -> float:
        """Lease time an absorbed answer must leave after the worker's next interval, for a forwarded beat."""
        return LATENCY_MARGIN_FACTOR * self.round_trip()

    def round_trip(self) -> float:
        """The slowest recent upstream heartbeat round trip (0 before the first)."""
        return max(self._latencies, default=0.0)

    # -- sending, and answering here ---------------------------------------------------

    def _throttled(self, lease: Lease[R], beat: Beat) -> list[Action[R, E]]:
        """Too many beats waiting on this lease: refused here, as the API refuses a flood."""
        self._answered(beat.waiter)
        self.table.forget_if_unconfirmed(lease)
        return [DeliverLocal(beat.waiter, Outcome.THROTTLED, 429, throttled_body())]

    def _decide_queue(self, lease: Lease[R], lane: Lane, arrivals: list[Beat], now: float) -> list[Action[R, E]]:
        """Decide a lane's waiting requests in arrival order until one has to go upstream.

        Only the main lane answers anything locally, and only its unconditional
        beats ride along on a flight; a side lane sends its next beat as it is.
        An idle side lane is dropped.
        """
        lane.queue.extend(arrivals)
        actions: list[Action[R, E]] = []
        while lane.queue and lane.flight is None:
            beat = lane.queue.pop(0)
            local = (
                answer_locally(lease, beat, now, absorb=self.absorb, margin=self.latency_margin) if lane.main else None
            )
            if local is not None:
                actions.append(local)
                lease.last_outcome = local.outcome
                self._answered(beat.waiter)
                continue
            flight = Flight(
                next(self._flight_ids), beat.waiter, beat.expected, beat.identity, now, [], epoch=lease.epoch
            )
            for other in lease.flights():
                other.overlapped = flight.overlapped = True
            lane.flight = flight
            if lane.main:
                lease.last_outcome = Outcome.FORWARDED
                # Unconditional beats right behind it ride along.
                while lane.queue and flight.takes(lane.queue[0]):
                    flight.waiters.append(lane.queue.pop(0).waiter)
            actions.append(Send(flight.id, lease.key, beat.waiter, main=lane.main))
        if not lane.main and lane.idle:
            lease.drop_idle_side_lanes()
        return actions
