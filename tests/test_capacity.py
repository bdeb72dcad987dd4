"""Upstream capacity by class: a bounded, timed queue per class, and no class waiting for another's connections.

Checks `gateway/upstream/capacity.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.config.settings import PoolName, PoolSettings
from gateway.errors import CapacityExceeded
from gateway.upstream.capacity import Gate

from .support import ENV_ID, GatewayFactory, Recorder, worker_headers


class Seen:
    def __init__(self) -> None:
        self.refused: list[str] = []
        self.waits: list[float] = []

    def pool_waited(self, pool: PoolName, seconds: float) -> None:
        self.waits.append(seconds)

    def pool_refused(self, pool: PoolName, reason: str) -> None:
        self.refused.append(reason)

    def pool_sized(self, pool: PoolName, limit: int) -> None:
        self.limit = limit


@contextlib.asynccontextmanager
async def slot(gate: Gate, max_wait: float | None = None) -> AsyncIterator[None]:
    """One of the class's connections held for the block, as an upstream exchange holds it."""
    await gate.acquire(max_wait)
    try:
        yield
    finally:
        gate.release()


async def hold(gate: Gate, release: asyncio.Event, order: list[int], n: int) -> None:
    async with slot(gate):
        order.append(n)
        await release.wait()


async def test_a_request_that_cannot_wait_as_long_as_the_class_is_refused_when_its_caller_gives_up() -> None:
    """A heartbeat whose worker aborts it in 0.2 s is not kept queued for the class's 5 s."""
    seen = Seen()
    gate = Gate(PoolName.LEASE, PoolSettings(1, 8, 5.0), observer=seen)
    release = asyncio.Event()
    holder = asyncio.ensure_future(hold(gate, release, [], 0))
    await asyncio.sleep(0.01)
    started = time.monotonic()
    with pytest.raises(CapacityExceeded):
        async with slot(gate, max_wait=0.2):
            pass
    assert 0.15 < time.monotonic() - started < 0.5
    with pytest.raises(CapacityExceeded):  # no time left at all: refused at once
        async with slot(gate, max_wait=0.0):
            pass
    assert seen.refused == ["timeout", "timeout"]
    release.set()
    await holder
    async with slot(gate, max_wait=0.0):  # a free connection needs no wait
        pass


async def test_a_class_sized_by_worker_connections_has_one_for_each() -> None:
    seen = Seen()
    gate = Gate(PoolName.LEASE, PoolSettings(None, 0, 1.0), client_connections=300, observer=seen)
    assert (gate.limit, seen.limit) == (300, 300)
    release = asyncio.Event()
    holders = [asyncio.ensure_future(hold(gate, release, [], n)) for n in range(300)]
    await asyncio.sleep(0.01)
    assert (gate.in_use, gate.queued) == (300, 0)
    with pytest.raises(CapacityExceeded):  # the 301st: no queue configured, refused at once
        async with slot(gate):
            pass
    release.set()
    await asyncio.gather(*holders)


async def test_a_gate_admits_its_limit_queues_in_order_and_refuses_the_rest_at_once() -> None:
    seen = Seen()
    gate = Gate(PoolName.STREAM, PoolSettings(2, 2, 5.0), observer=seen)
    release = asyncio.Event()
    order: list[int] = []
    holders = [asyncio.ensure_future(hold(gate, release, order, n)) for n in range(4)]
    await asyncio.sleep(0.01)
    assert (gate.in_use, gate.queued, order) == (2, 2, [0, 1])
    started = time.monotonic()
    with pytest.raises(CapacityExceeded) as refused:
        async with slot(gate):
            pass
    assert time.monotonic() - started < 0.1  # at once: the queue is full
    assert (refused.value.status, refused.value.error_type, refused.value.retry_after) == (503, "overloaded_error", 2)
    assert not refused.value.may_have_reached_upstream
    assert gate.saturated_for() > 0
    release.set()
    await asyncio.gather(*holders)
    assert order == [0, 1, 2, 3]  # first come, first served
    assert (gate.in_use, gate.queued, gate.saturated_for()) == (0, 0, 0.0)
    assert seen.refused == ["queue_full"]


async def test_a_waiter_gets_a_503_after_its_queue_time() -> None:
    seen = Seen()
    gate = Gate(PoolName.POLL, PoolSettings(1, 10, 0.2), observer=seen)
    release = asyncio.Event()
    holder = asyncio.ensure_future(hold(gate, release, [], 0))
    await asyncio.sleep(0.01)
    started = time.monotonic()
    with pytest.raises(CapacityExceeded, match=r"no connection came free in 0\.2 s"):
        async with slot(gate):
            pass
    assert 0.2 <= time.monotonic() - started < 0.4
    assert gate.queued == 0
    release.set()
    await holder
    assert seen.refused == ["timeout"]
    assert gate.in_use == 0


async def test_a_waiter_that_leaves_takes_no_slot_and_loses_none() -> None:
    gate = Gate(PoolName.OTHER, PoolSettings(1, 10, 5.0))
    release = asyncio.Event()
    holder = asyncio.ensure_future(hold(gate, release, [], 0))
    await asyncio.sleep(0.01)
    leaving = asyncio.ensure_future(hold(gate, asyncio.Event(), [], 1))
    staying_order: list[int] = []
    staying = asyncio.ensure_future(hold(gate, asyncio.Event(), staying_order, 2))
    await asyncio.sleep(0.01)
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    assert gate.queued == 1
    release.set()
    await holder
    await asyncio.sleep(0.01)
    assert staying_order == [2]  # the slot went past the one that left
    assert gate.in_use == 1
    staying.cancel()
    await asyncio.gather(staying, return_exceptions=True)
    assert (gate.in_use, gate.queued) == (0, 0)


async def test_a_slot_handed_over_as_its_waiter_leaves_is_passed_on() -> None:
    gate = Gate(PoolName.OTHER, PoolSettings(1, 10, 5.0))
    release = asyncio.Event()
    holder = asyncio.ensure_future(hold(gate, release, [], 0))
    await asyncio.sleep(0.01)
    racing = asyncio.ensure_future(hold(gate, asyncio.Event(), [], 1))
    later_order: list[int] = []
    later = asyncio.ensure_future(hold(gate, asyncio.Event(), later_order, 2))
    await asyncio.sleep(0.01)
    release.set()
    await asyncio.sleep(0)  # the holder releases: the slot is handed to `racing`...
    racing.cancel()  # ...which leaves before it resumes
    await asyncio.gather(holder, racing, return_exceptions=True)
    await asyncio.sleep(0.01)
    assert later_order == [2]
    later.cancel()
    await asyncio.gather(later, return_exceptions=True)
    assert (gate.in_use, gate.queued) == (0, 0)


# -- through the gateway -------------------------------------------------------------

SMALL_POOLS = """upstream:
  connect_timeout_seconds: 2
  request_timeout_seconds: 30
  pools:
    stream: {max_connections: 3, max_queued: 1, max_queue_seconds: 0.3}
    lease: {max_connections: 4, max_queued: 8, max_queue_seconds: 5}
"""


async def test_open_streams_fill_only_their_own_class(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    rec, url = recorder
    streams_open = asyncio.Event()

    async def respond(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/events/stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await streams_open.wait()
            return response
        answer = {"type": "work_heartbeat", "last_heartbeat": "T1", "lease_extended": True, "state": "active"}
        return web.json_response({**answer, "ttl_seconds": 9})

    rec.respond = respond
    gateway = await make_gateway(url, SMALL_POOLS.replace("upstream:", f'upstream:\n  base_url: "{url}"'))
    async with aiohttp.ClientSession() as http:

        async def stream(n: int) -> tuple[int, str | None, str | None]:
            target = f"{gateway.proxy_url}/v1/sessions/sesn_{n}/events/stream"
            async with http.get(target, headers=worker_headers()) as r:
                if r.status == 200:
                    await streams_open.wait()
                    return 200, None, None
                return r.status, r.headers.get("retry-after"), (await r.json())["error"]["type"]

        async def beat(n: int) -> int:
            target = f"{gateway.proxy_url}/v1/environments/{ENV_ID}/work/w{n}/heartbeat"
            async with http.post(
                target, params={"expected_last_heartbeat": "NO_HEARTBEAT"}, headers=worker_headers()
            ) as r:
                return r.status

        streams = [asyncio.ensure_future(stream(n)) for n in range(6)]
        await asyncio.sleep(0.1)
        # Every stream connection is taken and its queue is full: heartbeats do not care.
        started = time.monotonic()
        assert await asyncio.gather(*(beat(n) for n in range(8))) == [200] * 8
        assert time.monotonic() - started < 1.0
        # The excess streams were answered fast: two at once, one after its queue time.
        done, _ = await asyncio.wait(streams, timeout=1.0)
        assert sorted(t.result() for t in done) == [(503, "1", "overloaded_error")] * 3
        streams_open.set()
        assert [status for status, _, _ in await asyncio.gather(*streams)].count(200) == 3
    refusals = {
        s.labels["reason"]: s.value
        for s in next(iter(gateway.metrics.pool_refusals.collect())).samples
        if s.labels.get("pool") == "stream" and s.name.endswith("_total")
    }
    assert refusals == {"queue_full": 2.0, "timeout": 1.0}


async def test_readiness_reports_a_saturated_lease_class(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    rec, url = recorder
    release = asyncio.Event()

    async def slow_beat(request: web.Request) -> web.StreamResponse:
        await release.wait()
        answer = {"type": "work_heartbeat", "last_heartbeat": "T1", "lease_extended": True, "state": "active"}
        return web.json_response({**answer, "ttl_seconds": 60})

    rec.respond = slow_beat
    config = f'upstream: {{base_url: "{url}", pools: {{lease: {{max_connections: 1, max_queued: 4}}}}}}'
    gateway = await make_gateway(url, config)
    async with aiohttp.ClientSession() as http:

        async def ready() -> tuple[int, str]:
            async with http.get(f"{gateway.admin_url}/readyz") as r:
                return r.status, (await r.json())["status"]

        async def beat(n: int) -> int:
            target = f"{gateway.proxy_url}/v1/environments/{ENV_ID}/work/w{n}/heartbeat"
            async with http.post(
                target, params={"expected_last_heartbeat": "NO_HEARTBEAT"}, headers=worker_headers()
            ) as r:
                return r.status

        assert await ready() == (200, "ready")
        beats = [asyncio.ensure_future(beat(n)) for n in range(2)]  # one holds the connection, one waits
        await asyncio.sleep(0.5)
        assert await ready() == (200, "ready")  # a moment's wait is no saturation
        await asyncio.sleep(0.8)
        assert await ready() == (503, "saturated")
        release.set()
        assert await asyncio.gather(*beats) == [200, 200]
        assert await ready() == (200, "ready")


async def test_a_lease_call_waits_for_a_connection_no_longer_than_its_worker_waits(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    """A class an operator sized at one connection, queueing up to 30 s: a beat whose worker's interval
    is 1 s (its last answer gave it a 2 s lease) is refused within that second, not after 30."""
    rec, url = recorder
    release = asyncio.Event()

    async def respond(request: web.Request) -> web.StreamResponse:
        if "/work/slow/" in request.path:
            await release.wait()  # another lease's beat holds the one connection
        answer = {"type": "work_heartbeat", "last_heartbeat": "T1", "lease_extended": True, "state": "active"}
        return web.json_response({**answer, "ttl_seconds": 2})

    rec.respond = respond
    pools = "pools: {lease: {max_connections: 1, max_queued: 8, max_queue_seconds: 30}}"
    gateway = await make_gateway(url, f'upstream: {{base_url: "{url}", {pools}}}')
    async with aiohttp.ClientSession() as http:

        async def beat(work_id: str, expected: str) -> tuple[int, str | None, float]:
            started = time.monotonic()
            target = f"{gateway.proxy_url}/v1/environments/{ENV_ID}/work/{work_id}/heartbeat"
            async with http.post(target, params={"expected_last_heartbeat": expected}, headers=worker_headers()) as r:
                await r.read()
                return r.status, r.headers.get("retry-after"), time.monotonic() - started

        assert (await beat("fast", "NO_HEARTBEAT"))[0] == 200  # the worker now beats every second
        holder = asyncio.ensure_future(beat("slow", "NO_HEARTBEAT"))
        await asyncio.sleep(0.1)
        status, retry_after, seconds = await beat("fast", "T1")
        assert (status, retry_after) == (503, "2")  # the class's retry-after: its queue wait, at most 2 s
        assert seconds < 1.5
        release.set()
        assert (await holder)[0] == 200


def _sessions_held_until(release: asyncio.Event) -> Any:
    """An upstream whose session calls (pass-through, the `other` class) wait for `release`; heartbeats
    and stops are answered at once."""

    async def respond(request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/v1/sessions/"):
            await release.wait()
            return web.json_response({"id": "sesn_1"})
        if request.path.endswith("/stop"):
            return web.json_response({"type": "work_stop"})
        answer = {"type": "work_heartbeat", "last_heartbeat": "T1", "lease_extended": True, "state": "active"}
        return web.json_response({**answer, "ttl_seconds": 30})

    return respond


def _one_other_connection(url: str, extra: str = "") -> str:
    """The `other` class one connection wide, with no queue: one held pass-through call fills it."""
    pools = "{other: {max_connections: 1, max_queued: 0, max_queue_seconds: 0.1}}"
    return f'upstream: {{base_url: "{url}", pools: {pools}}}\n{extra}\n'


async def test_with_coalescing_off_a_vouched_heartbeat_still_draws_on_the_lease_class(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    """`heartbeat.coalesce: false` sends each beat on its own, but a vouched beat never in the `other`
    class: a flood of pass-through calls that fills it must not cost a held lease its beat."""
    rec, url = recorder
    release = asyncio.Event()
    rec.respond = _sessions_held_until(release)
    gateway = await make_gateway(url, _one_other_connection(url, "heartbeat: {coalesce: false}"))
    async with aiohttp.ClientSession() as http:
        held = asyncio.ensure_future(http.get(f"{gateway.proxy_url}/v1/sessions/sesn_1", headers=worker_headers()))
        await asyncio.sleep(0.2)
        async with http.get(f"{gateway.proxy_url}/v1/sessions/sesn_2", headers=worker_headers()) as r:
            assert r.status == 503  # the `other` class is full
        target = f"{gateway.proxy_url}/v1/environments/{ENV_ID}/work/w1/heartbeat"
        params = {"expected_last_heartbeat": "NO_HEARTBEAT"}
        async with http.post(target, params=params, headers=worker_headers()) as r:
            assert r.status == 200
        # A credential the gateway does not vouch for (passed through as presented) never takes a
        # lease's capacity: its beat waits in `other` with everything else, and finds it full.
        async with http.post(target, params=params, headers={"x-api-key": "not-a-gateway-token"}) as r:
            assert r.status == 503
        release.set()
        (await held).release()


async def test_the_credential_the_api_accepted_on_a_lease_keeps_lease_capacity_for_its_stop(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    """A holder the gateway cannot vouch for by its own token (a sessions token issued before a restart,
    passed through as presented): once the API accepted its beat on the lease, the gateway vouches for it
    there, and its stop is lease-critical, while the same credential elsewhere, and any other, is not."""
    rec, url = recorder
    release = asyncio.Event()
    rec.respond = _sessions_held_until(release)
    gateway = await make_gateway(url, _one_other_connection(url))
    holder = {"x-api-key": "sessions-token-issued-before-a-restart"}
    work = f"{gateway.proxy_url}/v1/environments/{ENV_ID}/work"
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{work}/w1/heartbeat", params={"expected_last_heartbeat": "NO_HEARTBEAT"}, headers=holder
        ) as r:
            assert r.status == 200  # the API accepted it: the lease's holder
        held = asyncio.ensure_future(http.get(f"{gateway.proxy_url}/v1/sessions/sesn_1", headers=worker_headers()))
        await asyncio.sleep(0.2)  # the `other` class is full now
        async with http.post(f"{work}/w1/stop", headers=holder) as r:
            assert r.status == 200  # lease-critical: it does not wait behind the pass-through call
        for headers, item in ((holder, "w2"), ({"x-api-key": "another-credential"}, "w1")):
            async with http.post(f"{work}/{item}/stop", headers=headers) as r:
                assert r.status == 503  # vouched for nowhere else, and for no one else
        release.set()
        (await held).release()
