"""Overload: how late the event loop runs, and what a replica sheds when it cannot keep up.

A replica is one process on one event loop. Past the core it can use, every
request waits behind every other, heartbeats included: at 10,000 SDK workers
on one replica of this machine, heartbeat p99 rose by 170 ms and thousands of
requests a minute failed, while the Service kept sending it more. Work that is
always safe to shed went on costing the same as work that is not.

Two signals, over the last second. Event-loop lag: how late a timer set for
now runs, the time a ready request waits before the loop gets to it; it is
what workers feel, and under a CPU quota (a pod's `limits.cpu`) a throttled
replica shows it at once. And CPU: the share of what the replica may use (one
core, or its cgroup quota if less) that it used. A replica on a whole core
that is saturated still runs its timers every 10-20 ms, far below any lag
worth shedding for, while work piles up until it stalls for a second (seen
at 8,400 workers: five seconds at 100% with a median lag of 15 ms, then a
1.1 s stall). The `Governor` decides, sans-IO:

- `CALM`: everything is served.
- `SHED_POLLS` (median lag above `overload.shed_polls_lag_seconds`, or CPU
  above `overload.shed_polls_cpu`): a share of the
  long polls the gateway injected a key for are held (half to all of
  `overload.hold_polls_seconds`, 15 s) and answered `200 null`, as the API answers
  a poll when the queue is empty, with no upstream call. A held poll costs a
  timer; answered after its `block_ms` it would be back within 1-3 s, so an
  idle fleet's polls, most of its requests, come a fifth as often. (The SDKs
  give a request 10 minutes.) Two polls per environment stay upstream all the same
  (`PICKUP_POLLS`): one open poll picks up new work as fast as a thousand,
  so queued work is still found within a poll's round trip.
  The share is graduated, as Envoy scales its overload actions: it rises
  fast while either signal is past its threshold (all polls within half a
  second when the loop is late, a few seconds when the CPU alone nears its
  limit) and falls slowly once both are well below (the lag below half its
  threshold, the CPU below 85% of its own; to none over 15 s). All or nothing, a replica that calmed down
  forwarded every poll again at once, stalled for a second under them (heartbeat
  p99 +1.3 s at 8,400 workers, bench/scale_bench.py) and shed them all again:
  graduated, it settles at the share it can serve.
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
aborted beat would find no endpoint). The second level is entered as soon
as the lag passes its threshold and left, to the first at its full share,
once the lag has stayed below half that threshold for
`overload.recover_seconds`, so the replica does not flap in and out of rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import statistics
import time
from collections import deque
from collections.abc import Callable
from enum import IntEnum
from typing import Literal, Protocol

from gateway.config.settings import OverloadSettings
from gateway.policy.routing import RouteName

__all__ = [
    "LEASE_ROUTES",
    "PICKUP_POLLS",
    "Governor",
    "LagProbe",
    "Load",
    "OverloadObserver",
    "PollHold",
    "Shed",
    "cpu_capacity",
]

log = logging.getLogger("gateway.overload")

# The lag signal: the median of the samples of this many seconds (one GC pause is no overload).
WINDOW_SECONDS = 1.0
# How often the probe looks: often enough for a second's median, cheap enough to be free.
PROBE_INTERVAL_SECONDS = 0.05
# Polls per environment kept upstream whatever the level: work is picked up within a poll's round trip.
PICKUP_POLLS = 2
# How fast the share of polls shed rises, from none to all: at once when the loop is late (workers feel
# it now), over a few seconds when the CPU alone nears its limit (a shed poll's effect shows only when
# its worker would have come back: after its block_ms and 1-3 s asleep).
LATE_RISE_SECONDS = 0.5
BUSY_RISE_SECONDS = 3.0
# How slowly it falls once both signals are well below: several times that delay, or each fall
# overshoots into the next saturation (a sawtooth whose peaks stall the loop).
SHARE_FALL_SECONDS = 15.0
# The share falls only once the CPU is below this share of its threshold: a band, so it does not flap.
CPU_BAND = 0.85
# Lease calls: never shed.
LEASE_ROUTES = frozenset({RouteName.HEARTBEAT, RouteName.ACK, RouteName.STOP})

Shed = Literal["poll", "request"]


class Load(IntEnum):
    CALM = 0
    SHED_POLLS = 1
    SHED_REQUESTS = 2


class Governor:
    """The overload level, from lag samples with the time they were taken: time passed in, the level out."""

    def __init__(
        self,
        settings: Callable[[], OverloadSettings],
        *,
        cpu_capacity: float = 1.0,
        chance: Callable[[], float] = random.random,
    ) -> None:
        self._settings = settings
        self._cpu_capacity = cpu_capacity
        self._chance = chance
        self.level = Load.CALM
        self.lag = 0.0
        # The share of the replica's CPU used over the last second (0 until a second's samples are in).
        self.cpu = 0.0
        # The share of polls shed at the first level (0 when calm, 1 at the second level).
        self.poll_share = 0.0
        self._samples: deque[tuple[float, float, float]] = deque()
        # Since when the lag has stayed below the current level's way out (None: it has not).
        self._calm_since: float | None = None
        # Since when the lag has stayed past the polls threshold while polls were shed (None: it has not).
        self._shedding_since: float | None = None

    def observe(self, now: float, lag: float, cpu_seconds: float | None = None) -> Load:
        """One sample of the loop's lag and the process's CPU time, taken at `now`; returns the level it leaves."""
        samples = self._samples
        elapsed = now - samples[-1][0] if samples else 0.0
        samples.append((now, lag, cpu_seconds if cpu_seconds is not None else 0.0))
        while samples[0][0] <= now - WINDOW_SECONDS:
            samples.popleft()
        self.lag = statistics.median(s[1] for s in samples)
        first = samples[0]
        if cpu_seconds is not None and now - first[0] >= WINDOW_SECONDS / 2:
            self.cpu = (cpu_seconds - first[2]) / (now - first[0]) / self._cpu_capacity
        settings = self._settings()
        if not settings.enabled:
            self.level, self.poll_share, self._calm_since = Load.CALM, 0.0, None
            return self.level
        if self.level is Load.SHED_REQUESTS:
            self._leave_requests(now, settings)
        elif self.lag >= settings.shed_requests_lag_seconds or self._shed_polls_in_vain(now, settings):
            self.level, self.poll_share, self._calm_since = Load.SHED_REQUESTS, 1.0, None
        else:
            self._steer_poll_share(elapsed, settings)
        return self.level

    def _leave_requests(self, now: float, settings: OverloadSettings) -> None:
        if self.lag >= settings.shed_requests_lag_seconds / 2:
            self._calm_since = None
        elif self._calm_since is None:
            self._calm_since = now
        elif now - self._calm_since >= settings.recover_seconds:
            # Down to the first level, every poll still shed: the share falls from there.
            self.level, self.poll_share, self._calm_since = Load.SHED_POLLS, 1.0, None
            self._shedding_since = None

    def _shed_polls_in_vain(self, now: float, settings: OverloadSettings) -> bool:
        """Every poll shed, and the lag still past the polls threshold for `escalate_seconds`."""
        if self.poll_share < 1.0 or self.lag < settings.shed_polls_lag_seconds / 2:
            self._shedding_since = None  # not all shed yet, or calm enough to start recovering
            return False
        if self._shedding_since is None:
            self._shedding_since = now
        return now - self._shedding_since >= settings.escalate_seconds

    def _steer_poll_share(self, elapsed: float, settings: OverloadSettings) -> None:
        threshold = settings.shed_polls_lag_seconds
        if self.lag >= threshold:
            self.poll_share = min(1.0, max(self.poll_share, 0.1) + elapsed / LATE_RISE_SECONDS)
        elif settings.shed_polls_cpu < 1.0 and self.cpu >= settings.shed_polls_cpu:  # (1: the CPU signal is off)
            self.poll_share = min(1.0, max(self.poll_share, 0.1) + elapsed / BUSY_RISE_SECONDS)
        elif self.lag < threshold / 2 and self.cpu < settings.shed_polls_cpu * CPU_BAND:
            self.poll_share = max(0.0, self.poll_share - elapsed / SHARE_FALL_SECONDS)
        self.level = Load.SHED_POLLS if self.poll_share > 0.0 else Load.CALM

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
        if route is RouteName.POLL and injected_poll and self._chance() < self.poll_share:
            return "poll"
        return None


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

    async def hold(self, block: float, seconds: float) -> None:
        """At least the poll's own `block` (as an empty queue answers), or half to all of `seconds` if longer."""
        wait = max(block, seconds * (0.5 + self._jitter() / 2))
        if self._drained.is_set() or wait <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), wait)

    def drain(self) -> None:
        """The replica is going away: every held poll is answered now, and later ones at once."""
        self._drained.set()


def cpu_capacity(root: str = "/sys/fs/cgroup", membership: str = "/proc/self/cgroup") -> float:
    """The cores this process may use: one (it runs one event loop), or its cgroup's CPU quota if less."""
    quota = _cgroup_quota(root, membership)
    return 1.0 if quota is None else min(1.0, quota)


def _cgroup_quota(root: str, membership: str) -> float | None:
    """Cores allowed by the CPU quota of the cgroup this process is in (v2, else v1); None if unlimited.

    The path `membership` names is the cgroup's full path, but a container sees only its own subtree
    mounted at `root` (a cgroup namespace, or on v1 a bind mount of its own group): the full path
    first, then the mount's root.
    """
    try:
        with open(membership) as f:
            lines = f.read().splitlines()
    except (OSError, ValueError):
        return None
    for line in lines:
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        path = path.lstrip("/")
        if controllers == "":  # v2
            for group in _candidates(root, path):
                with contextlib.suppress(OSError, ValueError):
                    return _v2_quota(group)
        elif "cpu" in controllers.split(","):  # v1
            for mount in dict.fromkeys((os.path.join(root, controllers), os.path.join(root, "cpu"))):
                for group in _candidates(mount, path):
                    with contextlib.suppress(OSError, ValueError):
                        return _v1_quota(group)
    return None


def _candidates(mount: str, path: str) -> list[str]:
    return [os.path.join(mount, path), mount] if path else [mount]


def _v2_quota(group: str) -> float | None:
    with open(os.path.join(group, "cpu.max")) as f:
        text_quota, text_period = f.read().split()  # "max 100000" when unlimited
    return None if text_quota == "max" else float(text_quota) / float(text_period)


def _v1_quota(group: str) -> float | None:
    with open(os.path.join(group, "cpu.cfs_quota_us")) as q, open(os.path.join(group, "cpu.cfs_period_us")) as p:
        quota, period = float(q.read()), float(p.read())  # quota -1 when unlimited
    return None if quota <= 0 or period <= 0 else quota / period


class OverloadObserver(Protocol):
    def loop_lag(self, seconds: float) -> None: ...

    def overload_level(self, level: int) -> None: ...

    def polls_shed_share(self, share: float) -> None: ...


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
            # The loop's own thread: the one core it can use (other threads, such as the resolver's, are not it).
            now = self._governor.observe(time.monotonic(), lag, time.thread_time())
            self._observer.polls_shed_share(self._governor.poll_share)
            if now is not level:
                self._observer.overload_level(now)
                # Into or out of refusing requests is news; the first level comes and goes with the load.
                log.log(
                    logging.WARNING if Load.SHED_REQUESTS in (now, level) else logging.INFO,
                    "overload level %s (event-loop lag %.0f ms, CPU %.0f%%)",
                    now.name.lower(),
                    self._governor.lag * 1000,
                    self._governor.cpu * 100,
                    extra={"fields": {"event": "overload", "overload_level": now.name.lower()}},
                )
                level = now
