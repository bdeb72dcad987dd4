"""Absorption against the SDK workers' own rules: never a lease lost through the gateway that going direct keeps.

A discrete-event model: one worker following the SDK's heartbeat rules
(environments-api.md §6.2: the next beat one interval after the last
answer, the interval `clamp(ttl/2, 1, 30)` from that answer's `ttl_seconds`,
each beat aborted after one interval, the lease assumed lost when no beat
has succeeded for the last answer's TTL), against a one-lease upstream
(the beat applied half-way through its round trip, the lease lasting the
TTL from then, a 412 once it lapsed). The same upstream weather (latency by
time, and outages where every beat gets a 503) is played to the worker
going direct and to the same worker through the sans-IO core with
absorption on; hypothesis draws the weather and the settings.

The weather the property is claimed for: latencies within the workers'
per-beat timeout, and windows in which no beat can succeed (outages, or
latency past the timeout, up to 1.6 times it: beats are aborted, directly
and through the gateway alike) shorter than the slack absorption keeps,
`ttl - max_signal_delay - 2 x 30 s` (absorption
defers renewals by up to `max_signal_delay`, so a longer outage that starts
right then can outlast a lease that direct renewals would have stretched;
README, "Absorption", says so).

Checks `gateway/heartbeat/worker_model.py`.
"""

from __future__ import annotations

import heapq
import itertools
import os
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config.settings import AbsorbSettings
from gateway.heartbeat.actions import Deliver, DeliverLocal, Rejected, Send, Succeeded, Unsuccessful
from gateway.heartbeat.core import Coalescer
from gateway.heartbeat.lease import Beat
from gateway.heartbeat.wire import NO_HEARTBEAT, HeartbeatAnswer
from gateway.heartbeat.worker_model import worker_interval

settings.register_profile("model-fast", max_examples=150, deadline=None)
settings.register_profile("model-deep", max_examples=3000, deadline=None)
PROFILE = "model-deep" if os.environ.get("HYPOTHESIS_PROFILE") == "deep" else "model-fast"

KEY = ("env_1", "work_1")
RUN_SECONDS = 1800.0
# The SDK assumes this TTL until its first answer (TS and Python).
SDK_FIRST_TTL = 90


@dataclass
class Weather:
    """Upstream latency by time (piecewise constant) and outage windows."""

    latency: list[tuple[float, float]]  # (from, seconds), sorted
    outages: list[tuple[float, float]]  # (start, end)
    # Windows of latency past the workers' per-beat timeout: (start, end, seconds).
    spikes: list[tuple[float, float, float]] = field(default_factory=list)

    def latency_at(self, t: float) -> float:
        for start, end, seconds in self.spikes:
            if start <= t < end:
                return seconds
        current = self.latency[0][1]
        for start, seconds in self.latency:
            if start <= t:
                current = seconds
        return current

    def out(self, t: float) -> bool:
        return any(start <= t < end for start, end in self.outages)


@dataclass
class Upstream:
    ttl: int
    weather: Weather
    expires: float = 0.0
    last: str | None = None
    values: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    calls: int = 0

    def beat(self, expected: str, applied_at: float) -> tuple[int, HeartbeatAnswer | None]:
        """The answer to a beat applied at `applied_at`: (status, answer)."""
        self.calls += 1
        if self.weather.out(applied_at):
            return 503, None
        if expected == NO_HEARTBEAT:
            if self.last is not None and applied_at < self.expires:
                return 412, None
        elif expected != self.last or applied_at >= self.expires:
            return 412, None  # moved on, or lapsed and requeued
        self.last = f"T{next(self.values)}"
        self.expires = applied_at + self.ttl
        return 200, HeartbeatAnswer(self.last, "active", True, self.ttl)


@dataclass
class Run:
    lost_at: float | None = None
    worker_beats: int = 0


class World:
    """Events in time order: the worker's beats and the answers it gets, directly or through the core."""

    def __init__(self, upstream: Upstream, absorb: AbsorbSettings | None) -> None:
        self.upstream = upstream
        self.core: Coalescer[tuple[int, HeartbeatAnswer | None], str] | None = (
            Coalescer(absorb=absorb) if absorb is not None else None
        )
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = itertools.count()
        self.waiters = itertools.count(1)
        self.run = Run()
        # The worker's state, as the SDK keeps it.
        self.ttl = SDK_FIRST_TTL
        self.interval = worker_interval(None)
        self.last_ok = 0.0
        self.expected = NO_HEARTBEAT
        self.pending: int | None = None  # the waiter id of the beat in progress
        # What each beat presented, and so what the flight it caused sends upstream.
        self.presented: dict[int, str] = {}
        self.flights: dict[int, str] = {}

    def at(self, t: float, kind: str, data: Any = None) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, data))

    def play(self) -> Run:
        self.at(0.0, "beat")
        while self.events and self.run.lost_at is None:
            t, _, kind, data = heapq.heappop(self.events)
            if t > RUN_SECONDS:
                break
            getattr(self, f"on_{kind}")(t, data)
        return self.run

    # -- the worker --------------------------------------------------------------------

    def on_beat(self, t: float, _: object) -> None:
        if t - self.last_ok > self.ttl:
            self.run.lost_at = t  # "lease assumed lost"
            return
        self.run.worker_beats += 1
        waiter = next(self.waiters)
        self.pending = waiter
        self.presented[waiter] = self.expected
        self.at(t + self.interval, "abort", waiter)
        if self.core is None:
            latency = self.upstream.weather.latency_at(t)
            answer = self.upstream.beat(self.expected, t + latency / 2)
            self.at(t + latency, "answer", (waiter, answer))
        else:
            self.carry_out(self.core.submit(Beat(waiter, KEY, self.expected, "holder"), t), t)

    def on_answer(self, t: float, data: tuple[int, tuple[int, HeartbeatAnswer | None]]) -> None:
        waiter, (status, answer) = data
        if waiter != self.pending:
            return  # aborted already
        self.pending = None
        if status == 200 and answer is not None:
            self.last_ok, self.ttl, self.expected = t, answer.ttl_seconds, answer.last_heartbeat
            self.interval = worker_interval(answer.ttl_seconds)
        elif status == 412:
            self.run.lost_at = t
            return
        self.at(t + self.interval, "beat")

    def on_abort(self, t: float, waiter: int) -> None:
        if waiter != self.pending:
            return
        self.pending = None
        if self.core is not None:
            self.carry_out(self.core.abandoned(waiter, t), t)
        self.at(t + self.interval, "beat")

    # -- the gateway ---------------------------------------------------------------------

    def carry_out(self, actions: list[Any], t: float) -> None:
        assert self.core is not None
        for action in actions:
            if isinstance(action, Send):
                latency = self.upstream.weather.latency_at(t)
                self.at(t + latency, "flight_back", (action.flight, t + latency / 2))
                self.flights[action.flight] = self.presented[action.waiter]
            elif isinstance(action, Deliver):
                self.at(t, "answer", (action.waiter, action.response))
            elif isinstance(action, DeliverLocal):
                body = action.body
                answer = HeartbeatAnswer(body["last_heartbeat"], body["state"], True, body["ttl_seconds"])
                self.at(t, "answer", (action.waiter, (200, answer)))

    def on_flight_back(self, t: float, data: tuple[int, float]) -> None:
        assert self.core is not None
        flight, applied_at = data
        status, answer = self.upstream.beat(self.flights.pop(flight), applied_at)
        response = (status, answer)
        outcome: Any
        if status == 200 and answer is not None:
            outcome = Succeeded(answer, response)
        elif status == 412:
            outcome = Rejected(response, "queued", None)
        else:
            outcome = Unsuccessful(response, may_have_applied=False)
        self.carry_out(self.core.completed(KEY, flight, outcome, t), t)


def play(ttl: int, weather: Weather, absorb: AbsorbSettings | None) -> tuple[Run, Upstream]:
    upstream = Upstream(ttl, weather)
    return World(upstream, absorb).play(), upstream


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, float, float, Weather]:
    ttl = draw(st.integers(2, 600))
    interval = worker_interval(ttl)
    # Signal delays past the point where the pace rule, not the delay, stops absorption.
    delay = draw(st.floats(interval + 0.5, 2 * ttl + 1))
    fraction = draw(st.sampled_from([0.01, 0.05, 0.1, 0.25, 0.5]))
    # Latency within the per-beat timeout, changing now and then.
    changes = draw(st.lists(st.tuples(st.floats(0, RUN_SECONDS), st.floats(0.005, 0.9 * interval)), max_size=8))
    latency = sorted([(0.0, draw(st.floats(0.005, 0.9 * interval))), *changes])
    # Outages (503s), and spikes past the per-beat timeout (the worker aborts; the gateway's flight goes
    # on, and its answer may be handed to the retry). While one lasts no beat succeeds, so it is bounded
    # like an outage, and spaced so that the lease can recover in between.
    slack = ttl - delay - 2 * interval
    outages: list[tuple[float, float]] = []
    spikes: list[tuple[float, float, float]] = []
    last_end = -float(ttl)
    for start in sorted(draw(st.lists(st.floats(1, RUN_SECONDS - ttl), max_size=4))):
        length = draw(st.floats(0, max(0.0, slack - 1)))
        if start <= last_end + ttl:
            continue
        if draw(st.booleans()):
            outages.append((start, start + length))
        else:
            spikes.append((start, start + length, draw(st.floats(interval, 1.6 * interval))))
        last_end = start + length
    return ttl, delay, fraction, Weather(latency, outages, spikes)


@settings(settings.get_profile(PROFILE))
@given(scenarios())
def test_absorption_never_costs_a_lease_that_going_direct_keeps(scenario: tuple[int, float, float, Weather]) -> None:
    ttl, delay, fraction, weather = scenario
    direct, _ = play(ttl, weather, None)
    absorb = AbsorbSettings(enabled=True, max_signal_delay_seconds=delay, min_remaining_fraction=fraction)
    through, upstream = play(ttl, weather, absorb)
    if direct.lost_at is None:
        assert through.lost_at is None, f"lost at {through.lost_at} through the gateway, kept directly"
    # And it saves: never more upstream beats than the worker sent.
    assert upstream.calls <= through.worker_beats


def test_the_recommended_settings_save_what_the_arithmetic_says() -> None:
    """300 s leases, the SDK's 30 s beat: a 60 s signal delay saves 1 beat in 2, 120 s saves 3 in 4."""
    calm = Weather([(0.0, 0.05)], [])
    for delay, ratio in ((60.0, 1 / 2), (120.0, 1 / 4)):
        absorb = AbsorbSettings(enabled=True, max_signal_delay_seconds=delay, min_remaining_fraction=0.5)
        run, upstream = play(300, calm, absorb)
        assert run.lost_at is None
        assert abs(upstream.calls / run.worker_beats - ratio) < 0.02, (delay, upstream.calls, run.worker_beats)
