"""The coalescing core against a model upstream, under random interleavings (hypothesis).

The model upstream is the simulator's own control plane (pure, clock passed
in). Workers claim, echo, beat unconditionally, repeat stale values, go away
mid-request; flights come back applied, failed before or after applying, or
with upstream errors; operators stop items; time passes and leases lapse.
Checked after every step:

- one flight per lease in its main lane, one per credential in a side lane,
  and every `Send` is for a worker that still waits (nothing is ever sent
  that no worker asked for; time alone sends nothing);
- a hostile credential (a junk Bearer the upstream refuses with 401, nobody
  vouches for it) interleaved with the holder never delays the holder's
  beats: they are sent at once whenever the main lane is free;
- one holder: a success earned by a conditional request reaches at most one
  worker, and local answers never grant what the upstream would not: an
  absorbed answer repeats the upstream's current lease with no more time
  than it has left, a local 412 is given only where the upstream would not
  have granted an active lease;
- a lost answer is handed only to a retry of the same request, while its
  lease is current;
- every worker is answered at most once, and by the end exactly once unless
  it went away.

Profiles: HYPOTHESIS_PROFILE=deep runs many more examples than the default.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gateway.config.settings import AbsorbSettings, LeaseTrackingSettings
from gateway.heartbeat.actions import (
    Action,
    Deliver,
    DeliverError,
    DeliverLocal,
    Failed,
    FlightResult,
    LeaseEvent,
    Rejected,
    Send,
    Succeeded,
    Unsuccessful,
    Wakeup,
)
from gateway.heartbeat.core import Coalescer
from gateway.heartbeat.lease import Beat
from gateway.heartbeat.wire import HeartbeatAnswer
from gateway.simulator import ControlPlane, SimError, TtlPolicy

settings.register_profile("fast", max_examples=200, stateful_step_count=50, deadline=None)
settings.register_profile("deep", max_examples=5000, stateful_step_count=80, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

ENV = "env_1"
# Long enough for absorbed answers to keep the SDK workers' 30 s pace (more than 90 s).
TTL = 100
IDENTITIES = ("shared-token", "sessions-token")
# A credential the upstream refuses (401), and nobody vouches for.
HOSTILE = "junk-bearer"
WORKERS = 4
MAX_SIGNAL_DELAY = 2.0


@dataclass
class Response:
    """What the model upstream answered, as the driver would hold it."""

    status: int
    body: dict[str, Any]


@dataclass
class Waiter:
    worker: int
    key: tuple[str, str]
    expected: str | None
    identity: str
    state: str = "waiting"  # waiting, answered, gone
    answers: int = 0
    outcome: str | None = None


class CoalescerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.plane = ControlPlane([ENV], ttl=TtlPolicy(default_seconds=TTL, min_seconds=1, max_seconds=TTL))
        self.items = [self._ready_item() for _ in range(2)]
        self.core: Coalescer[Response, str] = Coalescer(
            absorb=AbsorbSettings(enabled=True, max_signal_delay_seconds=MAX_SIGNAL_DELAY, min_remaining_fraction=0.3),
            tracking=LeaseTrackingSettings(max_tracked=1000, retention_seconds=30.0, expiry_grace_seconds=1.0),
        )
        # What each worker would echo next, per item.
        self.last: dict[tuple[int, str], str] = {}
        self.waiters: dict[int, Waiter] = {}
        self.next_waiter = 1
        self.flights: dict[int, tuple[tuple[str, str], int]] = {}
        # Per flight: its lane, None for the main one, else the side lane's identity.
        self.lanes: dict[int, str | None] = {}
        self.conditional_successes: dict[str, int] = {}
        self.holders: set[tuple[int, str]] = set()
        # When each item was first stopped, and whether the stop passed through the gateway.
        self.stopped_at: dict[str, float] = {}
        self.stop_seen: set[str] = set()
        self.outcomes: dict[str, int] = {}
        self.wakeup: float | None = None

    @initialize()
    def claim_both_items(self) -> None:
        """Start from two held leases, so steps exercise renewals, not only claims."""
        for item in (0, 1):
            self.beat(item, item, "claim", other_identity=False)
            self.complete(0, "apply")

    def _ready_item(self) -> str:
        item = self.plane.enqueue(ENV, self.now)
        self.plane.poll(ENV, self.now, worker_id="w", reclaim_older_than_ms=0)
        self.plane.ack(ENV, item.id, self.now)
        return item.id

    # -- carrying out the core's actions ----------------------------------------------------

    def carry_out(self, actions: list[Action[Response, str]]) -> None:
        for action in actions:
            if isinstance(action, Send):
                waiter = self.waiters[action.waiter]
                assert waiter.state == "waiting", "sent a request nobody waits for"
                lane = None if action.main else waiter.identity
                assert waiter.identity != HOSTILE or lane == HOSTILE, "a hostile credential in the main lane"
                busy = {(key, self.lanes[f]) for f, (key, _) in self.flights.items()}
                assert (action.key, lane) not in busy, "two flights in one lane of a lease"
                self.flights[action.flight] = (action.key, action.waiter)
                self.lanes[action.flight] = lane
            elif isinstance(action, Deliver | DeliverError | DeliverLocal):
                self.answered(action)
            elif isinstance(action, Wakeup):
                # A driver keeps one timer, at the earliest wakeup asked for since its last tick.
                self.wakeup = action.at if self.wakeup is None else min(self.wakeup, action.at)
            else:
                assert isinstance(action, LeaseEvent)

    def answered(self, action: Deliver[Response] | DeliverError[str] | DeliverLocal[Response]) -> None:
        waiter = self.waiters[action.waiter]
        assert waiter.state == "waiting", f"answered a worker that is {waiter.state}"
        waiter.state = "answered"
        waiter.answers += 1
        outcome = "error" if isinstance(action, DeliverError) else action.outcome
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        waiter.outcome = outcome
        item = self.plane.items(ENV)[[i.id for i in self.plane.items(ENV)].index(waiter.key[1])]
        if isinstance(action, DeliverLocal):
            self.check_local(action, waiter, item)
            if action.outcome != "handed_off":
                return
            body = action.body
        elif isinstance(action, DeliverError) or action.response.status != 200:
            return
        else:
            body = action.response.body
        if waiter.expected is not None and body["state"] == "active":
            value = body["last_heartbeat"]
            self.conditional_successes[value] = self.conditional_successes.get(value, 0) + 1
            assert self.conditional_successes[value] == 1, "one success delivered to two workers"
            self.holders = {h for h in self.holders if h[1] != waiter.key[1]} | {(waiter.worker, waiter.key[1])}
        self.last[(waiter.worker, waiter.key[1])] = body["last_heartbeat"]

    def unseen_stop(self, work_id: str) -> bool:
        return work_id in self.stopped_at and work_id not in self.stop_seen

    def check_local(self, action: DeliverLocal[Response], waiter: Waiter, item: Any) -> None:
        self.plane.expire(self.now)
        if action.outcome == "handed_off":
            assert waiter.expected is not None
            # Never a stale lease, and never more time than it has left.
            if item.state == "active":
                assert action.body["last_heartbeat"] == item.last_heartbeat, "handed a stale lease"
                assert action.body["ttl_seconds"] <= item.lease_expires - self.now
            else:
                assert self.unseen_stop(item.id), "handed a lease that is gone"
            return
        if action.outcome == "absorbed":
            assert waiter.expected == action.body["last_heartbeat"]
            if item.state == "active":
                assert item.last_heartbeat == action.body["last_heartbeat"]
                assert action.body["ttl_seconds"] <= item.lease_expires - self.now
            else:
                # Only a stop the gateway did not see, and only within the signal delay.
                assert self.unseen_stop(item.id), f"absorbed a beat on a {item.state} item"
            stopped_at = self.stopped_at.get(item.id)
            if stopped_at is not None:
                assert self.now - stopped_at < MAX_SIGNAL_DELAY, "a stop took longer than the signal delay"
        elif action.outcome == "throttled":
            assert action.status == 429  # grants nothing; the worker's own retry decides
        else:
            assert action.outcome == "rejected"
            assert action.status == 412
            would_grant = item.state in ("starting", "active") and (
                (waiter.expected == "NO_HEARTBEAT" and item.last_heartbeat is None)
                or (waiter.expected is not None and waiter.expected == item.last_heartbeat)
            )
            assert not would_grant, "a local 412 where the upstream would have granted the lease"

    # -- rules ----------------------------------------------------------------------------

    @rule(
        worker=st.integers(0, WORKERS - 1),
        item=st.integers(0, 1),
        mode=st.sampled_from(["echo", "echo", "claim", "unconditional", "stale"]),
        other_identity=st.booleans(),
    )
    def beat(self, worker: int, item: int, mode: str, other_identity: bool) -> None:
        work_id = self.items[item]
        last = self.last.get((worker, work_id))
        expected = {
            "echo": last or "NO_HEARTBEAT",
            "claim": "NO_HEARTBEAT",
            "unconditional": None,
            "stale": "2000-01-01T00:00:00.000000Z",
        }[mode]
        identity = IDENTITIES[1] if other_identity and worker == WORKERS - 1 else IDENTITIES[0]
        # The sessions token is one the gateway may not have seen issued: not always vouched for.
        self.submit(worker, work_id, expected, identity, vouched=identity == IDENTITIES[0] or worker % 2 == 0)

    def submit(self, worker: int, work_id: str, expected: str | None, identity: str, *, vouched: bool) -> int:
        waiter_id = self.next_waiter
        self.next_waiter += 1
        self.waiters[waiter_id] = Waiter(worker, (ENV, work_id), expected, identity)
        beat = Beat(waiter_id, (ENV, work_id), expected, identity, vouched=vouched)
        self.carry_out(self.core.submit(beat, self.now))
        return waiter_id

    @rule(item=st.integers(0, 1), mode=st.sampled_from(["echo", "claim", "unconditional"]))
    def hostile_beat(self, item: int, mode: str) -> None:
        """A junk credential beats on a held lease, presenting whatever it saw or guessed."""
        work_id = self.items[item]
        current = next(i for i in self.plane.items(ENV) if i.id == work_id).last_heartbeat
        expected = {"echo": current or "NO_HEARTBEAT", "claim": "NO_HEARTBEAT", "unconditional": None}[mode]
        main_busy = any(k == (ENV, work_id) and self.lanes[f] is None for f, (k, _) in self.flights.items())
        waiter = self.submit(WORKERS, work_id, expected, HOSTILE, vouched=False)
        if not main_busy:
            # The holder's next beat must find the main lane free, whatever the junk does.
            holder = next((w for w, wid in sorted(self.holders) if wid == work_id), None)
            if holder is not None:
                before = len(self.flights)
                probe = self.submit(holder, work_id, self.last.get((holder, work_id)), IDENTITIES[0], vouched=True)
                assert len(self.flights) == before + 1 or self.waiters[probe].state == "answered", (
                    "the holder's beat waited behind a hostile credential"
                )
        del waiter

    @precondition(lambda self: bool(self.holders))
    @rule(choice=st.integers(0, 100))
    def holder_echoes(self, choice: int) -> None:
        """The worker that last got a conditional success beats again, as a holder does."""
        (worker, work_id) = sorted(self.holders)[choice % len(self.holders)]
        self.beat(worker, self.items.index(work_id), "echo", other_identity=False)

    @precondition(lambda self: bool(self.holders))
    @rule(
        choice=st.integers(0, 100),
        beat_after=st.sampled_from([0.0, 2.5]),
        retry_after=st.sampled_from([0.0, 0.0, 0.5, 6.0]),
    )
    def holder_loses_an_answer_and_retries(self, choice: int, beat_after: float, retry_after: float) -> None:
        """Contract 3: the answer a worker never got goes to its retry, once, without a new upstream call."""
        (worker, work_id) = sorted(self.holders)[choice % len(self.holders)]
        key = (ENV, work_id)
        if beat_after:
            self.time_passes(beat_after)  # past the signal delay: the beat is not absorbed
        if self.core.in_flight(key):
            return
        before = self.next_waiter
        self.beat(worker, self.items.index(work_id), "echo", other_identity=False)
        flight = next((f for f, (k, owner) in self.flights.items() if owner == before), None)
        if flight is None:
            return  # answered locally: nothing was lost
        self.waiters[before].state = "gone"
        self.carry_out(self.core.abandoned(before, self.now))
        self.flights.pop(flight)
        self.lanes.pop(flight)
        expected = self.waiters[before].expected
        try:
            body = self.plane.heartbeat(ENV, work_id, self.now, expected=expected, desired_ttl=None)
        except SimError as exc:
            state = exc.details["current_state"] if exc.details else {}
            rejected = Rejected(Response(exc.status, exc.body("r")), state.get("state"), state.get("last_heartbeat"))
            self.carry_out(self.core.completed(key, flight, rejected, self.now))
            return
        answer = HeartbeatAnswer(body["last_heartbeat"], body["state"], body["lease_extended"], body["ttl_seconds"])
        self.carry_out(self.core.completed(key, flight, Succeeded(answer, Response(200, body)), self.now))
        if retry_after:
            self.time_passes(retry_after)
        sent_before = len(self.flights)
        retry = self.next_waiter
        self.beat(worker, self.items.index(work_id), "echo", other_identity=False)
        if answer.holds_lease and retry_after < answer.ttl_seconds:
            assert self.waiters[retry].outcome == "handed_off", "a lost answer did not reach the retry"
            assert len(self.flights) == sent_before, "the retry went upstream"
            assert self.last[(worker, work_id)] == answer.last_heartbeat

    @precondition(lambda self: bool(self.flights))
    @rule(choice=st.integers(0, 100), fate=st.sampled_from(["apply", "apply", "apply", "lost", "not_sent", "error"]))
    def complete(self, choice: int, fate: str) -> None:
        flight = sorted(self.flights)[choice % len(self.flights)]
        key, owner = self.flights.pop(flight)
        self.lanes.pop(flight)
        waiter = self.waiters[owner]
        outcome: FlightResult[Response, str]
        if waiter.identity == HOSTILE:
            # The upstream refuses the credential before looking at the lease.
            outcome = Unsuccessful(Response(401, {"type": "error"}))
        elif fate == "not_sent":
            outcome = Failed("connect")
        elif fate == "error":
            outcome = Unsuccessful(Response(500, {"type": "error"}))
        else:
            try:
                body = self.plane.heartbeat(ENV, key[1], self.now, expected=waiter.expected, desired_ttl=None)
            except SimError as exc:
                state = exc.details["current_state"] if exc.details else {}
                outcome = Rejected(Response(exc.status, exc.body("r")), state.get("state"), state.get("last_heartbeat"))
            else:
                answer = HeartbeatAnswer(
                    body["last_heartbeat"], body["state"], body["lease_extended"], body["ttl_seconds"]
                )
                outcome = Succeeded(answer, Response(200, body)) if fate == "apply" else Failed("reset after apply")
        self.carry_out(self.core.completed(key, flight, outcome, self.now))

    @precondition(lambda self: any(w.state == "waiting" for w in self.waiters.values()))
    @rule(choice=st.integers(0, 100))
    def go_away(self, choice: int) -> None:
        waiting = [i for i, w in self.waiters.items() if w.state == "waiting"]
        waiter = waiting[choice % len(waiting)]
        self.waiters[waiter].state = "gone"
        self.carry_out(self.core.abandoned(waiter, self.now))

    @rule(
        item=st.integers(0, 1),
        action=st.sampled_from(["graceful_stop", "force_stop", "reacquire", "reacquire", "reacquire"]),
        through_gateway=st.booleans(),
    )
    def operator(self, item: int, action: str, through_gateway: bool) -> None:
        """Stops (seen by the gateway or not), or a re-queued item acked again by some worker."""
        work_id = self.items[item]
        (state,) = [i for i in self.plane.items(ENV) if i.id == work_id]
        if action == "reacquire":
            if state.state == "queued":
                state.polled_at = self.now  # polled by some worker (poll hands out the oldest item)
                self.plane.ack(ENV, work_id, self.now)
            return
        if through_gateway:
            self.core.stop_seen((ENV, work_id), self.now)
            self.stop_seen.add(work_id)
        with contextlib.suppress(SimError):
            self.plane.stop(ENV, work_id, self.now, force=action == "force_stop")
            self.stopped_at.setdefault(work_id, self.now)

    @rule(seconds=st.sampled_from([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 6.0, 45.0, 110.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.plane.expire(self.now)
        # The timer fired (or time passed it): the tick answers it, and may ask for the next.
        self.wakeup = None
        actions = self.core.tick(self.now)
        assert not any(isinstance(a, Send) for a in actions), "time alone sent a heartbeat"
        self.carry_out(actions)

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def the_table_counts_are_the_rows(self) -> None:
        """The counts the metrics read at no cost per lease are what counting the rows gives."""
        rows: dict[tuple[str, str], int] = {}
        shortest: dict[str, int] = {}
        for view in self.core.leases(self.now):
            rows[(view.environment_id, view.state)] = rows.get((view.environment_id, view.state), 0) + 1
            if view.state == "active" and view.ttl_seconds:
                env = view.environment_id
                shortest[env] = min(shortest.get(env, view.ttl_seconds), view.ttl_seconds)
        by_state, active_ttls = self.core.table_counts()
        assert dict(by_state) == rows
        assert dict(active_ttls) == shortest

    @invariant()
    def no_deadline_without_a_wakeup(self) -> None:
        """A driver that sleeps until the wakeups it was asked for never misses one of the core's deadlines."""
        due = self.core.next_deadline()
        if due is not None:
            assert self.wakeup is not None, "a deadline the driver was never asked to wake for"
            assert self.wakeup <= due, "the driver was asked to wake only after a deadline"

    @invariant()
    def one_flight_per_lane(self) -> None:
        lanes = [(key, self.lanes[f]) for f, (key, _) in self.flights.items()]
        assert len(lanes) == len(set(lanes))
        for key in {key for key, _ in lanes}:
            assert self.core.in_flight(key) == sum(1 for k, _ in lanes if k == key)

    @invariant()
    def nobody_is_answered_twice(self) -> None:
        assert all(w.answers <= 1 for w in self.waiters.values())

    def teardown(self) -> None:
        # Drain: every flight comes back (as a failure); then every worker that
        # did not go away must have exactly one answer.
        while self.flights:
            flight = min(self.flights)
            key, _ = self.flights.pop(flight)
            self.lanes.pop(flight)
            self.carry_out(self.core.completed(key, flight, Failed("drained"), self.now))
        for waiter in self.waiters.values():
            assert waiter.state in ("answered", "gone")
            assert waiter.answers == (1 if waiter.state == "answered" else 0)


CoalescerMachine.TestCase.settings = settings(
    settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast")),
    suppress_health_check=[HealthCheck.too_slow],
)
TestCoalescer = CoalescerMachine.TestCase
