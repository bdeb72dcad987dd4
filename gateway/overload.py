"""Overload: how late the event loop runs, and what a replica sheds when it cannot keep up.

A replica is one process on one event loop. Past the core it can use, every
request waits behind every other, heartbeats included: at 10,000 SDK workers
on one replica of this machine, heartbeat p99 rose by 170 ms and thousands of
requests a minute failed, while the Service kept sending it more. Work that is
always safe to shed went on costing the same as work that is not.

The signal is event-loop lag: how late a timer set for now runs, the time a
ready request waits before the loop gets to it. It is what workers feel, on
any core and whatever the mix (CPU alone says a replica is fully used, not
that it is late; `process_cpu_seconds_total` reports it). The `Governor`
decides, sans-IO, from the median lag of the last second:

- `CALM`: everything is served.
- `SHED_POLLS` (lag above `overload.shed_polls_lag_seconds`): long polls the
  gateway injected a key for are held (half to all of
  `overload.hold_polls_seconds`, 15 s) and answered `200 null`, as the API answers
  a poll when the queue is empty, with no upstream call. A held poll costs a
  timer; answered after its `block_ms` it would be back within 1-3 s, so an
  idle fleet's polls, most of its requests, come a fifth as often. (The SDKs
  give a request 10 minutes.) Two polls per environment stay upstream all the same
  (`PICKUP_POLLS`): one open poll picks up new work as fast as a thousand,
  so queued work is still found within a poll's round trip.
- `SHED_REQUESTS` (lag above `overload.shed_requests_lag_seconds`): every new
  request but a lease call, polls included, gets 503
  `overloaded_error` with `retry-after`. The SDKs' pollers back off on an
  error (1 s, 2 s, 4 s ... up to 60 s), so a fleet that a `null` alone cannot
  quieten falls away within seconds; other calls are retried later, or land
  on another replica.

Shedding polls that has not brought the lag below its threshold within
`overload.escalate_seconds` goes a level up: under a quota (a pod's CPU
limit) the lag of a saturated replica stays near the quota's period, short
of the requests threshold, while every request waits for the next period.

A heartbeat, ack or stop is never shed, whatever its credential: losing one
could cost a lease, which is what the gateway is for. (Not even one the
gateway does not vouch for: the holder's own sessions token is vouched only
on a replica that saw it issued or accepted, and after a replica is lost its
workers' beats arrive on another that saw neither.)
While the replica refuses requests, `/readyz` answers 503 `overloaded`, so
the Service sends new connections to other replicas (not at the first level:
were every replica unready at once, a worker's new connection after an
aborted beat would find no endpoint). A level is entered as soon as the
lag passes its threshold and left one step at a time, once the lag has
stayed below half that threshold for `overload.recover_seconds`, so the
replica does not flap in and out of rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import statistics
import time
from collections import deque
from collections.abc import Callable
from enum import IntEnum
from typing import Literal, Protocol

from .routing import RouteName
from .settings import OverloadSettings

__all__ = ["LEASE_ROUTES", "PICKUP_POLLS", "Governor", "LagProbe", "Load", "OverloadObserver", "PollHold", "Shed"]

log = logging.getLogger("gateway.overload")

# The lag signal: the median of the samples of this many seconds (one GC pause is no overload).
WINDOW_SECONDS = 1.0
# How often the probe looks: often enough for a second's median, cheap enough to be free.
PROBE_INTERVAL_SECONDS = 0.05
# Polls per environment kept upstream whatever the level: work is picked up within a poll's round trip.
PICKUP_POLLS = 2
# Lease calls: never shed.
LEASE_ROUTES = frozenset({RouteName.HEARTBEAT, RouteName.ACK, RouteName.STOP})

Shed = Literal["poll", "request"]


class Load(IntEnum):
    CALM = 0
    SHED_POLLS = 1
    SHED_REQUESTS = 2


class Governor:
    """The overload level, from lag samples with the time they were taken: time passed in, the level out."""

    def __init__(self, settings: Callable[[], OverloadSettings]) -> None:
        self._settings = settings
        self.level = Load.CALM
        self.lag = 0.0
        self._samples: deque[tuple[float, float]] = deque()
        # Since when the lag has stayed below the current level's way out (None: it has not).
        self._calm_since: float | None = None
        # Since when the lag has stayed past the polls threshold while polls were shed (None: it has not).
        self._shedding_since: float | None = None

    def observe(self, now: float, lag: float) -> Load:
        """One sample of the loop's lag, taken at `now`; returns the level it leaves."""
        samples = self._samples
        samples.append((now, lag))
        while samples[0][0] <= now - WINDOW_SECONDS:
            samples.popleft()
        self.lag = statistics.median(s for _, s in samples)
        settings = self._settings()
        if not settings.enabled:
            self.level, self._calm_since = Load.CALM, None
            return self.level
        wanted = self._level_for(self.lag, settings)
        if self.level is not Load.SHED_POLLS or self.lag < settings.shed_polls_lag_seconds / 2:
            self._shedding_since = None  # not shedding polls, or calm enough to start recovering
        elif self._shedding_since is None:
            self._shedding_since = now
        elif now - self._shedding_since >= settings.escalate_seconds:
            # Shedding polls has not brought the lag down: a replica far past its capacity needs more.
            wanted = Load.SHED_REQUESTS
        if wanted >= self.level:
            self.level, self._calm_since = wanted, None
        elif self.lag >= self._threshold(self.level, settings) / 2:
            self._calm_since = None
        elif self._calm_since is None:
            self._calm_since = now
        elif now - self._calm_since >= settings.recover_seconds:
            # One step down at a time, each after its own calm spell.
            self.level, self._calm_since = Load(self.level - 1), now
        return self.level

    @staticmethod
    def _level_for(lag: float, settings: OverloadSettings) -> Load:
        if lag >= settings.shed_requests_lag_seconds:
            return Load.SHED_REQUESTS
        if lag >= settings.shed_polls_lag_seconds:
            return Load.SHED_POLLS
        return Load.CALM

    @staticmethod
    def _threshold(level: Load, settings: OverloadSettings) -> float:
        if level is Load.SHED_REQUESTS:
            return settings.shed_requests_lag_seconds
        return settings.shed_polls_lag_seconds

    @property
    def overloaded(self) -> bool:
        return self.level > Load.CALM

    @property
    def refusing(self) -> bool:
        """The second level: requests are refused, so new connections are better sent elsewhere."""
        return self.level is Load.SHED_REQUESTS

    def verdict(self, route: RouteName, *, injected_poll: bool, polls_upstream: int = 0) -> Shed | None:
        """What to shed of a request arriving now: nothing, a poll (answered empty) or a request (503).

        `polls_upstream`: the polls of the request's environment upstream now. A few are never
        shed, so queued work is still picked up (one open poll finds it as fast as a thousand).
        """
        level = self.level
        if level is Load.CALM or route in LEASE_ROUTES:
            # Never a lease call, vouched or not: the holder's own sessions token is vouched only on a
            # replica that saw it issued or accepted, and a lost replica's workers land on the others.
            return None
        if route is RouteName.POLL and injected_poll and polls_upstream < PICKUP_POLLS:
            return None
        if level is Load.SHED_REQUESTS:
            return "request"
        return "poll" if route is RouteName.POLL and injected_poll else None


class PollHold:
    """Shed polls waiting for their `null`, each for its own time; all at once only when the replica drains.

    Never released together when the replica is calm again: thousands of polls
    answered in one burst, and back 1-3 s later, are the storm that overloaded
    it (seen in bench/storm_bench.py: heartbeat p99 +2 s behind the bursts).
    Each waits between half and all of its hold, so a fleet that arrived
    together leaves spread out.
    """

    def __init__(self, jitter: Callable[[], float] = random.random) -> None:
        self._drained = asyncio.Event()
        self._jitter = jitter

    async def hold(self, seconds: float) -> None:
        if self._drained.is_set() or seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), seconds * (0.5 + self._jitter() / 2))

    def drain(self) -> None:
        """The replica is going away: every held poll is answered now, and later ones at once."""
        self._drained.set()


class OverloadObserver(Protocol):
    def loop_lag(self, seconds: float) -> None: ...

    def overload_level(self, level: int) -> None: ...


class LagProbe:
    """Measures the loop's lag: sleeps a moment and notes how late it woke (the edge of `Governor`)."""

    def __init__(self, governor: Governor, observer: OverloadObserver) -> None:
        self._governor = governor
        self._observer = observer

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        level = self._governor.level
        while True:
            due = loop.time() + PROBE_INTERVAL_SECONDS
            await asyncio.sleep(PROBE_INTERVAL_SECONDS)
            lag = max(0.0, loop.time() - due)
            self._observer.loop_lag(lag)
            now = self._governor.observe(time.monotonic(), lag)
            if now is not level:
                self._observer.overload_level(now)
                log.warning(
                    "overload level %s (event-loop lag %.0f ms)",
                    now.name.lower(),
                    self._governor.lag * 1000,
                    extra={"fields": {"event": "overload", "overload_level": now.name.lower()}},
                )
                level = now
