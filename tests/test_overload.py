"""Overload: the replica sheds what is safe to shed while its event loop runs late, and never a lease call.

Checks `gateway/edge/overload.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.app import Gateway
from gateway.config.settings import OverloadSettings
from gateway.edge.overload import Governor, Load, PollHold, cpu_capacity
from gateway.policy.routing import RouteName

from .support import ENV_ID, GatewayFactory, SimFactory, held_item, make_settings, worker_headers

SETTINGS = OverloadSettings(shed_polls_lag_seconds=0.05, shed_requests_lag_seconds=0.25, recover_seconds=5.0)


def fed(governor: Governor, start: float, seconds: float, lag: float, every: float = 0.05) -> Load:
    """Samples of `lag`, one every `every` s for `seconds` from `start`."""
    level = governor.level
    for n in range(int(seconds / every)):
        level = governor.observe(start + n * every, lag)
    return level


def test_levels_follow_the_median_lag_and_one_pause_is_no_overload() -> None:
    governor = Governor(lambda: SETTINGS)
    assert fed(governor, 0.0, 2.0, 0.002) is Load.CALM
    # One long GC pause among calm samples: the median does not move.
    assert governor.observe(2.0, 0.4) is Load.CALM
    assert fed(governor, 2.05, 1.0, 0.08) is Load.SHED_POLLS
    assert fed(governor, 3.05, 1.0, 0.3) is Load.SHED_REQUESTS
    assert governor.overloaded


def test_the_share_of_polls_shed_rises_fast_while_late_and_falls_slowly_once_calm() -> None:
    """All or nothing, a replica that calmed down forwarded every poll again at once and stalled under
    them: graduated, it settles at the share it can serve."""
    chance = [0.0]
    governor = Governor(lambda: SETTINGS, chance=lambda: chance[0])
    fed(governor, 0.0, 0.2, 0.08)
    assert 0.3 < governor.poll_share < 0.7
    assert governor.level is Load.SHED_POLLS

    def verdict_at(draw: float) -> str | None:
        chance[0] = draw
        return governor.verdict(RouteName.POLL, injected_poll=True, polls_upstream=2)

    assert (verdict_at(0.1), verdict_at(0.9)) == ("poll", None)  # a share of the polls, not all
    fed(governor, 0.2, 0.8, 0.08)
    assert governor.poll_share == 1.0  # within half a second of lateness, every poll
    # Between half the threshold and the threshold: the share holds.
    fed(governor, 1.0, 3.0, 0.03)
    assert governor.poll_share == 1.0
    # Calm: it falls to none over 15 s (several times a shed poll's return), the level with it.
    fed(governor, 4.0, 8.0, 0.001)
    assert 0.3 < governor.poll_share < 0.7
    assert fed(governor, 12.0, 9.0, 0.001) is Load.CALM
    assert governor.poll_share == 0.0


def test_a_level_is_left_one_step_at_a_time_after_a_calm_spell() -> None:
    governor = Governor(lambda: SETTINGS)
    fed(governor, 0.0, 1.0, 0.3)
    assert governor.level is Load.SHED_REQUESTS
    # Below the requests threshold but above half of it: no calm spell starts.
    assert fed(governor, 1.0, 10.0, 0.2) is Load.SHED_REQUESTS
    # Calm (below half the polls threshold): after 5 s, down to polls, all shed; then their share falls
    # to none over 15 s. (The median falls half a second after the lag does: the calm spell starts at 11.5.)
    assert fed(governor, 11.0, 6.0, 0.001) is Load.SHED_POLLS
    assert governor.poll_share > 0.9
    assert fed(governor, 17.0, 14.0, 0.001) is Load.SHED_POLLS
    assert fed(governor, 31.0, 1.0, 0.001) is Load.CALM
    # A relapse while the share falls sends it back up.
    fed(governor, 40.0, 1.0, 0.1)
    fed(governor, 41.0, 4.0, 0.001)
    fed(governor, 45.0, 1.0, 0.1)
    assert governor.poll_share == 1.0
    assert fed(governor, 46.0, 4.0, 0.001) is Load.SHED_POLLS


def test_shedding_polls_that_does_not_help_goes_a_level_up() -> None:
    governor = Governor(lambda: SETTINGS)
    # The first level at once; then the lag wavers about the threshold but never falls to half of it.
    assert fed(governor, 0.0, 3.0, 0.08) is Load.SHED_POLLS
    assert fed(governor, 3.0, 2.0, 0.04) is Load.SHED_POLLS
    assert fed(governor, 5.0, 1.0, 0.08) is Load.SHED_REQUESTS  # 5 s without relief once every poll was shed
    # Relief that lasts (the lag below half the threshold) is what stops an escalation.
    other = Governor(lambda: SETTINGS)
    fed(other, 0.0, 3.0, 0.08)
    fed(other, 3.0, 1.0, 0.01)
    assert fed(other, 4.0, 3.0, 0.08) is Load.SHED_POLLS


def test_disabled_never_sheds() -> None:
    governor = Governor(lambda: OverloadSettings(enabled=False))
    assert fed(governor, 0.0, 2.0, 2.0) is Load.CALM


def test_what_each_level_sheds_and_a_lease_call_never() -> None:
    governor = Governor(lambda: SETTINGS)
    for level in Load:
        governor.level = level
        governor.poll_share = 0.0 if level is Load.CALM else 1.0
        for route in (RouteName.HEARTBEAT, RouteName.ACK, RouteName.STOP):
            # Whatever the credential: a sessions token this replica never saw issued is still a holder's.
            assert governor.verdict(route, injected_poll=False) is None
        poll = governor.verdict(RouteName.POLL, injected_poll=True, polls_upstream=2)
        foreign_poll = governor.verdict(RouteName.POLL, injected_poll=False)
        session = governor.verdict(RouteName.SESSIONS, injected_poll=False)
        junk_beat = governor.verdict(RouteName.HEARTBEAT, injected_poll=False)
        # Two polls per environment stay upstream at every level: work is still picked up.
        assert governor.verdict(RouteName.POLL, injected_poll=True, polls_upstream=1) is None
        expected = {
            Load.CALM: (None, None, None, None),
            Load.SHED_POLLS: ("poll", None, None, None),
            Load.SHED_REQUESTS: ("request", "request", "request", None),
        }[level]
        assert (poll, foreign_poll, session, junk_beat) == expected


@contextlib.asynccontextmanager
async def hogged_loop(seconds_per_turn: float) -> AsyncIterator[None]:
    """The event loop runs late: a callback that holds it `seconds_per_turn` at every turn."""

    async def hog() -> None:
        while True:
            time.sleep(seconds_per_turn)  # noqa: ASYNC251 - the point: the loop is blocked
            await asyncio.sleep(0)

    task = asyncio.ensure_future(hog())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def upstream_polls(http: aiohttp.ClientSession, base: str, count: int) -> AsyncIterator[None]:
    """`count` long polls held open upstream (an empty queue answers them after 999 ms)."""
    polls = [asyncio.ensure_future(http.get(f"{base}/work/poll", params={"block_ms": "999"})) for _ in range(count)]
    await asyncio.sleep(0.3)  # through a late loop, up to the simulator
    try:
        yield
    finally:
        for response in await asyncio.gather(*polls):
            assert (response.status, await response.text()) == (200, "null")
            response.release()


async def wait_level(gateway: Gateway, level: int, within: float) -> None:
    deadline = time.monotonic() + within
    while gateway.metrics.overload._value.get() != level:
        assert time.monotonic() < deadline, f"the overload level never reached {level}"
        await asyncio.sleep(0.05)


async def wait_status(http: aiohttp.ClientSession, admin: str, status: str, within: float) -> None:
    deadline = time.monotonic() + within
    seen = ""
    while time.monotonic() < deadline:
        async with http.get(f"{admin}/readyz") as r:
            seen = (await r.json())["status"]
        if seen == status:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"/readyz stayed {seen!r}, never {status!r}")


async def test_an_overloaded_replica_sheds_polls_then_requests_never_heartbeats_and_recovers(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    sim = await make_simulator(ttl=30)
    config = "overload: {shed_polls_lag_seconds: 0.05, shed_requests_lag_seconds: 0.1, recover_seconds: 0.5}"
    gateway = await make_gateway(sim.url, config)
    work_id = held_item(sim)
    base = f"{gateway.proxy_url}/v1/environments/{ENV_ID}"
    async with aiohttp.ClientSession(headers=worker_headers()) as http:
        async with http.post(
            f"{base}/work/{work_id}/heartbeat", params={"expected_last_heartbeat": "NO_HEARTBEAT"}
        ) as r:
            held = (await r.json())["last_heartbeat"]
        polls_before = sim.sim.count("poll")
        async with hogged_loop(0.15):
            await wait_status(http, gateway.admin_url, "overloaded", within=5)
            assert gateway.metrics.overload._value.get() == 2
            # Two polls stay upstream for pickup; at the deepest level, a third is refused 503 (the SDK backs off).
            async with (
                upstream_polls(http, base, 2),
                http.get(f"{base}/work/poll", params={"block_ms": "999"}) as r,
            ):
                assert (r.status, (await r.json())["error"]["type"]) == (503, "overloaded_error")
            assert sim.sim.count("poll") == polls_before + 2  # (counted as answered)
            # Anything else new: 503 overloaded_error with retry-after, API-shaped.
            async with http.get(f"{gateway.proxy_url}/v1/sessions/sesn_x") as r:
                body = await r.json()
                assert (r.status, body["error"]["type"], r.headers["retry-after"]) == (503, "overloaded_error", "5")
            # The holder's heartbeat is never shed: the API answers it.
            async with http.post(f"{base}/work/{work_id}/heartbeat", params={"expected_last_heartbeat": held}) as r:
                assert r.status == 200
                assert (await r.json())["lease_extended"] is True
        # Calm again: back in rotation after the calm spells, and polls go up again.
        await wait_status(http, gateway.admin_url, "ready", within=5)
        async with http.get(f"{base}/work/poll", params={"block_ms": "10"}) as r:
            assert r.status == 200
        assert sim.sim.count("poll") == polls_before + 3
    shed = {
        (s.labels["route"], s.labels["action"]): s.value
        for s in next(iter(gateway.metrics.shed.collect())).samples
        if s.name.endswith("_total") and s.value
    }
    assert shed == {("poll", "refused"): 1.0, ("sessions", "refused"): 1.0}
    lag = next(iter(gateway.metrics.loop_lag_seconds.collect())).samples
    assert any(s.name.endswith("_count") and s.value > 0 for s in lag)


async def test_at_the_first_level_polls_find_the_queue_empty_after_their_block_time_and_all_else_is_served(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    sim = await make_simulator(ttl=30)
    config = (
        "overload: {shed_polls_lag_seconds: 0.05, shed_requests_lag_seconds: 5, escalate_seconds: 60, "
        "recover_seconds: 0.5, hold_polls_seconds: 1}"
    )
    gateway = await make_gateway(sim.url, config)
    base = f"{gateway.proxy_url}/v1/environments/{ENV_ID}"
    async with aiohttp.ClientSession(headers=worker_headers()) as http:
        async with hogged_loop(0.15):
            await wait_level(gateway, 1, within=5)
            assert gateway.metrics.overload._value.get() == 1
            # At the first level the replica stays in rotation: were all unready, the Service would have none.
            async with http.get(f"{gateway.admin_url}/readyz") as r:
                assert (r.status, (await r.json())["status"]) == (200, "ready")
            async with upstream_polls(http, base, 2):
                # Beyond the two kept upstream for pickup: held (hold_polls_seconds), then answered as an empty queue.
                started = time.monotonic()
                async with http.get(f"{base}/work/poll", params={"block_ms": "300"}) as r:
                    assert (r.status, await r.text()) == (200, "null")
                assert time.monotonic() - started >= 0.5  # half to all of the hold
            assert sim.sim.count("poll") == 2  # the two kept upstream, counted as answered
            # Work queued while the replica sheds is still picked up: the next poll goes up and finds it.
            (work_id,) = sim.sim.enqueue(ENV_ID)
            async with http.get(f"{base}/work/poll", params={"block_ms": "999"}) as r:
                assert (await r.json())["id"] == work_id
            async with http.get(f"{base}/work/{work_id}") as r:
                assert r.status == 200  # everything else is served
        await wait_status(http, gateway.admin_url, "ready", within=5)


async def test_held_polls_are_answered_at_once_when_the_replica_drains(make_simulator: SimFactory) -> None:
    """A shed poll waits up to hold_polls_seconds; a drain does not wait for it (nor cuts it)."""
    sim = await make_simulator(ttl=30)
    config = (
        "overload: {shed_polls_lag_seconds: 0.05, shed_requests_lag_seconds: 5, escalate_seconds: 60, "
        "hold_polls_seconds: 60}\nlimits: {shutdown_grace_seconds: 30}"
    )
    gateway = Gateway(make_settings(sim.url, config))
    await gateway.start()
    base = f"{gateway.proxy_url}/v1/environments/{ENV_ID}"
    stopping: asyncio.Future[None] | None = None
    try:
        async with aiohttp.ClientSession(headers=worker_headers()) as http:
            async with hogged_loop(0.15):
                await wait_level(gateway, 1, within=5)
                async with upstream_polls(http, base, 2):
                    held = asyncio.ensure_future(http.get(f"{base}/work/poll", params={"block_ms": "999"}))
                    await asyncio.sleep(0.3)
            started = time.monotonic()
            stopping = asyncio.ensure_future(gateway.stop())
            response = await asyncio.wait_for(held, 10)
            assert (response.status, await response.text()) == (200, "null")
            response.release()
            await asyncio.wait_for(stopping, 10)
            assert time.monotonic() - started < 5  # not the 60 s hold, nor the 30 s grace
    finally:
        if stopping is None or not stopping.done():
            await gateway.stop()


def test_a_saturated_cpu_sheds_polls_though_the_loop_runs_its_timers_on_time() -> None:
    """Seen at 8,400 workers on a whole core: five seconds at 100% with a median lag of 15 ms, then a 1.1 s stall."""
    governor = Governor(lambda: SETTINGS, cpu_capacity=1.0)
    for n in range(20):  # 1 s at 95% of the core, timers 15 ms late: shedding begins, gently
        governor.observe(n * 0.05, 0.015, cpu_seconds=n * 0.05 * 0.95)
    assert governor.level is Load.SHED_POLLS
    assert 0.0 < governor.poll_share < 0.5
    for n in range(20, 80):  # 3 s more: every poll
        governor.observe(n * 0.05, 0.015, cpu_seconds=n * 0.05 * 0.95)
    assert governor.poll_share == 1.0
    # Within the band below the threshold (75%, less 10 points), the share holds; well below it, it falls.
    cpu = 80 * 0.05 * 0.95
    for n in range(80, 140):
        cpu += 0.05 * 0.7
        governor.observe(n * 0.05, 0.002, cpu_seconds=cpu)
    assert governor.poll_share == 1.0
    for n in range(140, 200):
        cpu += 0.05 * 0.5
        governor.observe(n * 0.05, 0.002, cpu_seconds=cpu)
    assert 0.0 < governor.poll_share < 1.0


def test_under_a_cpu_quota_the_cpu_signal_is_a_share_of_the_quota() -> None:
    governor = Governor(lambda: SETTINGS, cpu_capacity=0.2)  # a pod with limits.cpu: 200m
    for n in range(30):
        governor.observe(n * 0.05, 0.001, cpu_seconds=n * 0.05 * 0.18)
    assert governor.cpu == pytest.approx(0.9)
    assert governor.level is Load.SHED_POLLS


@pytest.mark.parametrize(
    ("membership", "files", "cores"),
    [
        ("0::/kubepods/pod1/c1\n", {"kubepods/pod1/c1/cpu.max": "50000 100000\n"}, 0.5),
        ("0::/\n", {"cpu.max": "max 100000\n"}, 1.0),
        ("0::/\n", {"cpu.max": "400000 100000\n"}, 1.0),  # more than the one core a loop can use
        (
            "4:memory:/x\n1:cpu,cpuacct:/pod/c\n0::/\n",
            {"cpu,cpuacct/pod/c/cpu.cfs_quota_us": "20000\n", "cpu,cpuacct/pod/c/cpu.cfs_period_us": "100000\n"},
            0.2,
        ),
        (
            "1:cpu:/\n",
            {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
            1.0,
        ),
        (  # v1 in a container: the full path named, its own group mounted at the root
            "4:memory:/kubepods/pod1/c1\n2:cpu,cpuacct:/kubepods/pod1/c1\n",
            {"cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
            0.5,
        ),
        ("0::/kubepods/pod1/c1\n", {"cpu.max": "25000 100000\n"}, 0.25),  # v2, the same
        ("", {}, 1.0),
        ("garbage\n0::\n", {}, 1.0),
    ],
    ids=[
        "v2-limited",
        "v2-unlimited",
        "v2-above-a-core",
        "v1-limited",
        "v1-unlimited",
        "v1-container",
        "v2-container",
        "none",
        "malformed",
    ],
)
def test_the_cpu_a_replica_may_use_comes_from_its_cgroup(
    tmp_path: Path, membership: str, files: dict[str, str], cores: float
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "self-cgroup").write_text(membership)
    assert cpu_capacity(str(tmp_path), str(tmp_path / "self-cgroup")) == cores


def test_the_cpu_signal_is_off_at_1_and_a_low_threshold_still_recovers() -> None:
    def run(threshold: float, busy: float) -> Governor:
        governor = Governor(lambda: OverloadSettings(shed_polls_cpu=threshold), cpu_capacity=1.0)
        for n in range(60):  # 3 s busy
            governor.observe(n * 0.05, 0.001, cpu_seconds=n * 0.05 * busy)
        return governor

    assert run(1.0, 1.0).level is Load.CALM  # a replica at its quota is not shed for it when the signal is off
    low = run(0.1, 0.12)
    assert low.level is Load.SHED_POLLS
    levels = [low.observe(n * 0.05, 0.001, cpu_seconds=3 * 0.12) for n in range(60, 60 + 20 * 20)]  # 20 s idle
    assert levels[-1] is Load.CALM


async def test_a_held_poll_is_never_answered_before_its_block_time() -> None:
    """With `hold_polls_seconds: 0` (or a hold shorter than `block_ms`), a shed poll is answered as an empty
    queue answers: after its own block time, never earlier (the jitter spreads only the hold)."""
    hold = PollHold(jitter=lambda: 0.0)  # the shortest share of the hold
    loop = asyncio.get_running_loop()
    started = loop.time()
    await hold.hold(0.3, 0.0)
    assert loop.time() - started >= 0.29
    started = loop.time()
    await hold.hold(0.1, 0.4)  # half of 0.4 s, longer than the block
    assert 0.19 <= loop.time() - started < 0.35
