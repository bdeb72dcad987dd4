"""Coalescing through real sockets: workers → gateway → simulator, and the driver's own rules.

Checks `gateway/heartbeat/driver.py`, `gateway/heartbeat/sending.py`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.app import Gateway
from gateway.config.settings import HeartbeatSettings, LeaseTrackingSettings, PoolName
from gateway.errors import UpstreamUnavailable
from gateway.heartbeat.driver import OUTCOME_HEADER, CoalescingHeartbeats, HeartbeatCall
from gateway.heartbeat.query import HeartbeatQuery
from gateway.heartbeat.wire import LeaseEventKind, LostReason
from gateway.simulator import Faults
from gateway.upstream.client import UpstreamRequest, UpstreamResponse

from .support import ENV_ID, GatewayFactory, Recorder, SimFactory, SimHandle, held_item, worker_headers

Answer = tuple[int, dict[str, Any], str]


async def beat(
    session: aiohttp.ClientSession,
    gateway: Gateway,
    work_id: str,
    expected: str | None,
    *,
    give_up_after: float | None = None,
    ttl: int | None = None,
) -> Answer:
    params = {"expected_last_heartbeat": expected} if expected is not None else {}
    if ttl is not None:
        params["desired_ttl_seconds"] = str(ttl)
    async with session.post(
        f"{gateway.proxy_url}/v1/environments/{ENV_ID}/work/{work_id}/heartbeat",
        params=params,
        headers=worker_headers(),
        timeout=aiohttp.ClientTimeout(total=give_up_after),
    ) as response:
        return response.status, await response.json(), response.headers.get(OUTCOME_HEADER, "")


def upstream_beats(sim: SimHandle) -> int:
    return sim.sim.count("heartbeat")


def item_state(sim: SimHandle, work_id: str) -> Any:
    sim.sim.plane.expire(sim.sim.now())
    (item,) = [i for i in sim.sim.plane.items(ENV_ID) if i.id == work_id]
    return item


SLOW_BEATS = Faults(latency_seconds=0.3, endpoints=("heartbeat",))


async def test_concurrent_unconditional_beats_share_one_upstream_call(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    sim = await make_simulator(ttl=30)
    gateway = await make_gateway(sim.url)
    work_id = held_item(sim)
    async with aiohttp.ClientSession() as session:
        await beat(session, gateway, work_id, "NO_HEARTBEAT")
        sim.sim.faults = SLOW_BEATS
        answers = await asyncio.gather(*(beat(session, gateway, work_id, None) for _ in range(10)))
    assert {status for status, _, _ in answers} == {200}
    assert len({body["last_heartbeat"] for _, body, _ in answers}) == 1
    assert sorted(outcome for _, _, outcome in answers) == ["forwarded"] + ["joined"] * 9
    assert upstream_beats(sim) == 2  # the claim, and one for the ten


async def test_five_concurrent_claims_give_exactly_one_holder(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    sim = await make_simulator(ttl=30, faults=SLOW_BEATS)
    gateway = await make_gateway(sim.url)
    work_id = held_item(sim)
    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(*(beat(session, gateway, work_id, "NO_HEARTBEAT") for _ in range(5)))
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200, 412, 412, 412, 412]
    winner = next(body for status, body, _ in answers if status == 200)
    for status, body, _ in answers:
        if status == 412:
            current = body["error"]["details"]["current_state"]
            assert current["last_heartbeat"] == winner["last_heartbeat"]
            assert current["state"] == "active"
    assert item_state(sim, work_id).last_heartbeat == winner["last_heartbeat"]
    assert upstream_beats(sim) == 1


async def test_a_timed_out_beat_is_handed_to_its_retry_and_only_once(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    sim = await make_simulator(ttl=30)
    gateway = await make_gateway(sim.url)
    work_id = held_item(sim)
    async with aiohttp.ClientSession() as session:
        _, claim, _ = await beat(session, gateway, work_id, "NO_HEARTBEAT")
        # The next beat lands upstream but its answer is slow: the worker gives up first.
        sim.sim.faults = Faults(latency_seconds=0.6, endpoints=("heartbeat",))
        with pytest.raises(TimeoutError):
            await beat(session, gateway, work_id, claim["last_heartbeat"], give_up_after=0.2)
        sim.sim.faults = Faults()
        await asyncio.sleep(0.6)  # the upstream's answer has arrived at the gateway
        applied = item_state(sim, work_id).last_heartbeat
        assert applied != claim["last_heartbeat"]
        # The worker retries with the value it still holds: success, not a spurious 412.
        status, body, outcome = await beat(session, gateway, work_id, claim["last_heartbeat"])
        assert (status, outcome) == (200, "handed_off")
        assert body["last_heartbeat"] == applied
        assert upstream_beats(sim) == 2
        # A second retry with the old value does not win again.
        status, body, outcome = await beat(session, gateway, work_id, claim["last_heartbeat"])
        assert (status, outcome) == (412, "rejected")
        assert body["error"]["details"]["current_state"]["last_heartbeat"] == applied
        # The holder carries on with what it was handed.
        status, _, outcome = await beat(session, gateway, work_id, applied)
        assert (status, outcome) == (200, "forwarded")
    assert upstream_beats(sim) == 3


ABSORB = "heartbeat: {absorb: {enabled: true, max_signal_delay_seconds: 1.0, min_remaining_fraction: 0.5}}"
# Absorbed answers must keep an SDK worker's pace: only leases of more than 90 s can be absorbed.
LONG_TTL = 120


async def test_absorption_cuts_upstream_beats_never_overstates_the_ttl_and_passes_stops(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    sim = await make_simulator(ttl=LONG_TTL)
    gateway = await make_gateway(sim.url, ABSORB)
    work_id = held_item(sim)
    outcomes: list[str] = []
    async with aiohttp.ClientSession() as session:
        _, answer, _ = await beat(session, gateway, work_id, "NO_HEARTBEAT")
        last = answer["last_heartbeat"]
        started = time.monotonic()
        # A holder beating every 0.25 s for 3 s.
        while time.monotonic() - started < 3.0:
            sent = time.time()
            status, answer, outcome = await beat(session, gateway, work_id, last)
            assert status == 200
            truth = item_state(sim, work_id).lease_expires - sent
            assert answer["ttl_seconds"] <= truth, "the gateway promised more lease than the upstream holds"
            outcomes.append(outcome)
            last = answer["last_heartbeat"]
            await asyncio.sleep(0.25)
        upstream = upstream_beats(sim) - 1
        # About one upstream call per max_signal_delay_seconds (3 s / 1 s), the rest absorbed.
        assert 2 <= upstream <= 4, upstream
        assert outcomes.count("absorbed") >= len(outcomes) - 4
        # An operator stops the item directly on the API: the holder hears of it within the delay.
        sim.sim.plane.stop(ENV_ID, work_id, sim.sim.now(), force=False)
        stopped_at = time.monotonic()
        while True:
            status, answer, outcome = await beat(session, gateway, work_id, last)
            if answer["state"] == "stopping":
                break
            last = answer["last_heartbeat"]
            await asyncio.sleep(0.25)
        assert time.monotonic() - stopped_at <= 1.0 + 0.25 + 0.2
        # The holder stops beating: nothing more goes upstream, no timer renews the lease.
        count = upstream_beats(sim)
        await asyncio.sleep(2.5)
    assert upstream_beats(sim) == count


async def test_a_stop_through_the_gateway_ends_absorption_at_once(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    sim = await make_simulator(ttl=LONG_TTL)
    gateway = await make_gateway(sim.url, ABSORB)
    work_id = held_item(sim)
    async with aiohttp.ClientSession() as session:
        _, answer, _ = await beat(session, gateway, work_id, "NO_HEARTBEAT")
        last = answer["last_heartbeat"]
        assert (await beat(session, gateway, work_id, last))[2] == "absorbed"
        async with session.post(
            f"{gateway.proxy_url}/v1/environments/{ENV_ID}/work/{work_id}/stop",
            json={"force": False},
            headers=worker_headers(),
        ) as response:
            assert response.status == 200
        status, answer, outcome = await beat(session, gateway, work_id, last)
    assert (status, outcome, answer["state"]) == (200, "forwarded", "stopping")


@pytest.mark.parametrize(
    ("extra", "client_ttl", "expected_ttl"),
    [
        ("", 20, 20),
        ("heartbeat: {desired_ttl_seconds: 45}", None, 45),
        ("heartbeat: {desired_ttl_seconds: 45}", 20, 20),
        ("heartbeat: {desired_ttl_seconds: 45, override: true}", 20, 45),
    ],
    ids=["client", "global-default", "client-wins", "global-override"],
)
async def test_desired_ttl_defaults_and_overrides(
    make_simulator: SimFactory,
    make_gateway: GatewayFactory,
    extra: str,
    client_ttl: int | None,
    expected_ttl: int,
) -> None:
    sim = await make_simulator(ttl=30)
    gateway = await make_gateway(sim.url, extra)
    work_id = held_item(sim)
    async with aiohttp.ClientSession() as session:
        status, answer, _ = await beat(session, gateway, work_id, "NO_HEARTBEAT", ttl=client_ttl)
    assert (status, answer["ttl_seconds"]) == (200, expected_ttl)


async def test_per_environment_ttl_overrides_the_global_one(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    from .support import ENV_ID as env_id

    sim = await make_simulator(ttl=30)
    gateway = await make_gateway(
        sim.url,
        f"""
heartbeat: {{desired_ttl_seconds: 45}}
environments:
  - {{id: {env_id}, key_env: TEST_ENV_KEY, heartbeat: {{desired_ttl_seconds: 12, override: true}}}}
""",
        clients='clients: {tokens: [{token_env: TEST_TOKEN, environments: ["*"]}]}',
    )
    work_id = held_item(sim)
    async with aiohttp.ClientSession() as session:
        status, answer, _ = await beat(session, gateway, work_id, "NO_HEARTBEAT", ttl=20)
    assert (status, answer["ttl_seconds"]) == (200, 12)


async def test_rate_limited_beats_are_retried_only_within_the_lease(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    sim = await make_simulator(
        ttl=30, faults=Faults(rate_limit_rate=1.0, retry_after_seconds=0, endpoints=("heartbeat",))
    )
    gateway = await make_gateway(sim.url)
    work_id = held_item(sim)
    async with aiohttp.ClientSession() as session:
        status, body, _ = await beat(session, gateway, work_id, "NO_HEARTBEAT")
        assert (status, body["error"]["type"]) == (429, "rate_limit_error")
        assert upstream_beats(sim) == 4  # the first try and three retries
        # A retry-after longer than any lease the gateway can vouch for is passed on at once.
        sim.sim.faults = Faults(rate_limit_rate=1.0, retry_after_seconds=60, endpoints=("heartbeat",))
        status, _, _ = await beat(session, gateway, work_id, "NO_HEARTBEAT")
        assert status == 429
        assert upstream_beats(sim) == 5


@pytest.mark.parametrize(("retry_after", "tries"), [("0", 4), ("-1", 1), ("soon", 1)])
async def test_an_overloaded_upstream_is_retried_only_on_a_retry_after_it_can_read(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory, retry_after: str, tries: int
) -> None:
    """A 503 with a usable `retry-after` did not apply and is tried again within the lease; a negative or
    unreadable one says nothing, and the worker gets the API's answer at once."""
    rec, url = recorder

    async def overloaded(request: web.Request) -> web.StreamResponse:
        body = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
        return web.json_response(body, status=503, headers={"retry-after": retry_after})

    rec.respond = overloaded
    gateway = await make_gateway(url)
    async with aiohttp.ClientSession() as session:
        status, body, _ = await beat(session, gateway, "work_1", "NO_HEARTBEAT")
    assert (status, body["error"]["type"]) == (503, "overloaded_error")
    assert len([r for r in rec.requests if r.raw_path.split("?")[0].endswith("/heartbeat")]) == tries


async def test_a_beat_that_may_have_landed_is_never_resent(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    sim = await make_simulator(ttl=30, faults=Faults(reset_rate=1.0, endpoints=("heartbeat",)))
    gateway = await make_gateway(sim.url)
    work_id = held_item(sim)
    async with aiohttp.ClientSession() as session:
        status, body, _ = await beat(session, gateway, work_id, "NO_HEARTBEAT")
    assert (status, body["error"]["type"]) == (502, "api_error")
    assert sim.sim.stats_json()["requests"]["heartbeat"] == {"reset": 1}


# -- the driver with a function-backed upstream -----------------------------------------------


class ScriptedUpstream:
    """An `Upstream` whose answers a test scripts, one per call."""

    def __init__(self, *script: Exception | tuple[int, dict[str, Any]]) -> None:
        self.script = list(script)
        self.calls = 0

    @asynccontextmanager
    async def _exchange(self, request: UpstreamRequest) -> AsyncIterator[UpstreamResponse]:
        self.calls += 1
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        status, body = step
        yield _Answer(status, json.dumps(body).encode())

    def exchange(self, request: UpstreamRequest) -> AbstractAsyncContextManager[UpstreamResponse]:
        return self._exchange(request)

    async def close(self) -> None:
        pass


class _Answer:
    def __init__(self, status: int, body: bytes) -> None:
        self.status, self.reason, self.headers, self._body = status, "", (), body

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self._body


def call(expected: str | None = "NO_HEARTBEAT") -> HeartbeatCall:
    return HeartbeatCall(ENV_ID, "work_1", HeartbeatQuery(expected, None), UpstreamRequest("POST", "/hb", ()))


OK = (200, {"type": "work_heartbeat", "last_heartbeat": "T1", "lease_extended": True, "state": "active",
            "ttl_seconds": 30})  # fmt: skip


async def test_a_connection_that_never_opened_is_retried() -> None:
    never_sent = UpstreamUnavailable("refused", kind="connect", may_have_reached_upstream=False)
    upstream = ScriptedUpstream(never_sent, never_sent, OK)
    service = CoalescingHeartbeats(upstream, HeartbeatSettings())
    try:
        result = await service.heartbeat(call())
    finally:
        await service.close()
    assert (result.response.status, upstream.calls) == (200, 3)


async def test_a_reset_after_sending_is_not_retried() -> None:
    maybe_sent = UpstreamUnavailable("reset", kind="reset", may_have_reached_upstream=True)
    upstream = ScriptedUpstream(maybe_sent, OK)
    service = CoalescingHeartbeats(upstream, HeartbeatSettings())
    try:
        with pytest.raises(UpstreamUnavailable):
            await service.heartbeat(call())
    finally:
        await service.close()
    assert upstream.calls == 1


async def test_a_waiter_leaving_does_not_cancel_the_shared_call() -> None:
    gate = asyncio.Event()

    class Slow(ScriptedUpstream):
        @asynccontextmanager
        async def _exchange(self, request: UpstreamRequest) -> AsyncIterator[UpstreamResponse]:
            await gate.wait()
            async with super()._exchange(request) as response:
                yield response

    upstream = Slow(OK)
    service = CoalescingHeartbeats(upstream, HeartbeatSettings())
    try:
        first = asyncio.ensure_future(service.heartbeat(call(None)))
        second = asyncio.ensure_future(service.heartbeat(call(None)))
        await asyncio.sleep(0.05)
        first.cancel()  # the first worker (the flight's owner) goes away
        gate.set()
        result = await second
    finally:
        await service.close()
    assert (result.response.status, result.outcome, upstream.calls) == (200, "joined", 1)


async def test_an_unexpected_failure_in_a_flight_does_not_hang_the_lease() -> None:
    # A 200 whose body makes the JSON parser recurse too deep, then a normal answer.
    class Nasty(ScriptedUpstream):
        @asynccontextmanager
        async def _exchange(self, request: UpstreamRequest) -> AsyncIterator[UpstreamResponse]:
            self.calls += 1
            if self.calls == 1:
                yield _Answer(200, b"[" * 100_000)
            else:
                yield _Answer(*_encoded(OK))

    upstream = Nasty()
    service = CoalescingHeartbeats(upstream, HeartbeatSettings())
    try:
        first = await asyncio.wait_for(service.heartbeat(call(None)), 5)
        second = await asyncio.wait_for(service.heartbeat(call(None)), 5)
    finally:
        await service.close()
    assert first.response.status == 200  # passed on as the upstream sent it
    assert (second.response.status, upstream.calls) == (200, 2)


def _encoded(step: tuple[int, dict[str, Any]]) -> tuple[int, bytes]:
    return step[0], json.dumps(step[1]).encode()


async def test_a_worker_that_leaves_before_its_flight_starts_sends_nothing() -> None:
    from gateway.heartbeat.actions import Send
    from gateway.heartbeat.lease import Beat

    upstream = ScriptedUpstream(OK)
    service = CoalescingHeartbeats(upstream, HeartbeatSettings())
    key = (ENV_ID, "work_1")
    # The decision to send is taken; the worker leaves before the flight task gets to run.
    (send,) = [a for a in service.core.submit(Beat(1, key, "NO_HEARTBEAT", ("id",)), 0.0) if isinstance(a, Send)]
    service.core.abandoned(1, 0.0)
    await service._flight(key, send.flight, call().request, PoolName.LEASE)
    await service.close()
    assert upstream.calls == 0
    assert service.core.in_flight(key) == 0


async def test_coalesce_false_forwards_every_beat_one_for_one_and_keeps_no_lease_table(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    """The escape hatch: the gateway adds credentials and metrics, and decides nothing about leases."""
    sim = await make_simulator(ttl=30)
    gateway = await make_gateway(sim.url, "heartbeat: {coalesce: false, absorb: {enabled: true}}")
    work_id = held_item(sim)
    async with aiohttp.ClientSession() as session:
        status, answer, outcome = await beat(session, gateway, work_id, "NO_HEARTBEAT")
        assert (status, outcome) == (200, "forwarded")
        last = answer["last_heartbeat"]
        # Identical unconditional beats at once: each its own upstream call, none joined.
        sim.sim.faults = SLOW_BEATS
        before = upstream_beats(sim)
        answers = await asyncio.gather(*(beat(session, gateway, work_id, None) for _ in range(5)))
        assert [(s, o) for s, _, o in answers] == [(200, "forwarded")] * 5
        assert upstream_beats(sim) - before == 5
        sim.sim.faults = Faults()
        last = answers[-1][1]["last_heartbeat"]
        # The holder's echo, with absorption configured: still forwarded (nothing is answered here).
        before = upstream_beats(sim)
        status, answer, outcome = await beat(session, gateway, work_id, last)
        assert (status, outcome, upstream_beats(sim) - before) == (200, "forwarded", 1)
        # A stale value: the upstream's own 412, not one made up here.
        status, answer, outcome = await beat(session, gateway, work_id, "stale-value")
        assert (status, outcome) == (412, "forwarded")
        assert answer["error"]["details"]["error_code"] == "heartbeat_precondition_failed"
        assert upstream_beats(sim) - before == 2
        async with session.get(gateway.admin_url + "/admin/leases") as r:
            assert ((await r.json())["total"], (await r.json())["data"]) == (0, [])
    # The 412 still counts as a conflict: the metrics read the answer, whoever decided it.
    conflicts = next(iter(gateway.metrics.conflicts.collect())).samples
    assert sum(s.value for s in conflicts if s.name.endswith("_total")) == 1
    # Every beat is counted as forwarded: a dashboard shows the mode's one-for-one at a glance.
    answered = next(iter(gateway.metrics.heartbeats.collect())).samples
    by_outcome = {s.labels["outcome"]: s.value for s in answered if s.name.endswith("_total") and s.value}
    assert by_outcome == {"forwarded": 8}


class _Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []

    def retried(self, route: str) -> None:
        pass

    def lease_event(self, environment_id: str, kind: LeaseEventKind, reason: LostReason | None) -> None:
        self.seen.append((kind.value, reason))

    def lease_remaining_at_beat(self, environment_id: str, seconds: float) -> None:
        pass

    def internal_error(self, where: str) -> None:
        raise AssertionError(f"the failsafe stepped in at {where}")


async def test_the_driver_wakes_when_the_core_asks_and_keeps_no_ticker() -> None:
    """With an injected clock: an unrenewed lease is recorded as expired at its end, by the core's Wakeup."""
    now = [1000.0]
    events = _Events()
    settings = HeartbeatSettings(leases=LeaseTrackingSettings(expiry_grace_seconds=5.0))
    service = CoalescingHeartbeats(ScriptedUpstream(OK), settings, observer=events, clock=lambda: now[0])
    try:
        result = await service.heartbeat(call())
        assert (result.response.status, result.answer.lost_reason) == (200, None)
        assert events.seen == [("claimed", None)]
        # Nothing runs in the background but the flight tasks (finished) and one timer.
        assert [t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
        # The clock jumps to just before the lease's end (sent at 1000, TTL 30 s, grace 5 s): a wake-up
        # that comes early finds nothing to do and asks again.
        now[0] = 1034.9
        service.wake()
        assert events.seen == [("claimed", None)]
        now[0] = 1035.0
        service.wake()
        assert events.seen == [("claimed", None), ("expired", None)]
        (row,) = service.leases()
        assert row.state == "expired"
    finally:
        await service.close()


async def test_leases_stopped_through_the_gateway_are_never_counted_as_expired_or_lost(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    sim = await make_simulator(ttl=1)
    gateway = await make_gateway(sim.url, "heartbeat: {leases: {expiry_grace_seconds: 0.2}}")
    work_ids = sim.sim.enqueue(ENV_ID, count=40)
    async with aiohttp.ClientSession() as http:

        async def churn(work_id: str, force: bool) -> None:
            sim.sim.plane.poll(ENV_ID, sim.sim.now(), worker_id="w", reclaim_older_than_ms=None)
            sim.sim.plane.ack(ENV_ID, work_id, sim.sim.now())
            base = f"{gateway.proxy_url}/v1/environments/{ENV_ID}/work/{work_id}"
            last = "NO_HEARTBEAT"
            for _ in range(4):  # the claim and three beats
                async with http.post(
                    f"{base}/heartbeat", params={"expected_last_heartbeat": last}, headers=worker_headers()
                ) as r:
                    assert r.status == 200
                    last = (await r.json())["last_heartbeat"]
            async with http.post(f"{base}/stop", json={"force": force}, headers=worker_headers()) as r:
                assert r.status == 200

        for n, work_id in enumerate(work_ids):
            await churn(work_id, force=n % 2 == 0)  # force stops, and graceful ones the holder never finishes
        await asyncio.sleep(1.5)  # every TTL (1 s) and grace (0.2 s) past: the core woke for each check
    metrics = next(iter(gateway.metrics.leases_lost.collect())).samples
    lost = {s.labels["reason"]: s.value for s in metrics if s.name.endswith("_total") and s.value}
    assert lost == {}


async def test_a_heartbeat_waits_upstream_no_longer_than_the_heartbeat_timeout(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    """`heartbeat.upstream_timeout_seconds` bounds a beat's upstream call on its own, however long other calls
    may take (`upstream.request_timeout_seconds`): a stalled API costs the worker the timeout, not its own."""
    sim = await make_simulator(ttl=30)
    upstream = f'upstream: {{base_url: "{sim.url}", request_timeout_seconds: 10}}'
    extra = f"{upstream}\nheartbeat: {{upstream_timeout_seconds: 0.3}}"
    gateway = await make_gateway(sim.url, extra)
    work_id = held_item(sim)
    async with aiohttp.ClientSession() as session:
        sim.sim.faults = Faults(latency_seconds=3, endpoints=("heartbeat",))
        started = time.monotonic()
        status, body, _ = await beat(session, gateway, work_id, "NO_HEARTBEAT", give_up_after=5)
        waited = time.monotonic() - started
    assert (status, body["error"]["type"]) == (504, "timeout_error"), body
    assert waited < 1.5, waited
