"""Lease capacity is never why a lease is lost: the served gateway (its CLI), a slow API, claims at once.

Issue 19's reproduction: with the lease class used up, a heartbeat's flight
failed with the gateway's own `CapacityExceeded`, and the error path wedged
the lease for good (three of four claims never answered, nor their retries).
Now a lease call the gateway cannot take is answered at once, 503
`overloaded_error` with `retry-after`, and its retry goes through; and by
default the lease class has a connection for every worker connection, so a
slow API never queues a lease call at all.
"""

from __future__ import annotations

import asyncio
import resource
import time
from pathlib import Path

import aiohttp

from gateway.edge.server import RESERVED_DESCRIPTORS
from gateway.simulator import Faults, Simulator

from .served import served_gateway
from .support import ENV_ID, SimFactory, worker_headers

SLOW_HEARTBEATS = Faults(latency_seconds=1.5, endpoints=("heartbeat",))


async def claim(http: aiohttp.ClientSession, proxy: str, work_id: str) -> tuple[int, str, str | None, float]:
    """One claim as the SDK sends it (10 s client timeout): status, error type, retry-after, seconds taken."""
    started = time.monotonic()
    async with http.post(
        f"{proxy}/v1/environments/{ENV_ID}/work/{work_id}/heartbeat",
        params={"expected_last_heartbeat": "NO_HEARTBEAT"},
        headers=worker_headers(),
        timeout=aiohttp.ClientTimeout(total=10),
    ) as r:
        body = await r.json()
        kind = body["error"]["type"] if r.status != 200 else ""
        return r.status, kind, r.headers.get("retry-after"), time.monotonic() - started


def ready_items(sim: Simulator, count: int) -> list[str]:
    """Items polled and acked, ready to be claimed."""
    ids = sim.enqueue(ENV_ID, count=count)
    now = sim.now()
    for work_id in ids:
        sim.plane.poll(ENV_ID, now, worker_id="w", reclaim_older_than_ms=0)
        sim.plane.ack(ENV_ID, work_id, now)
    return ids


async def test_a_full_lease_class_answers_at_once_and_never_wedges_a_lease(
    make_simulator: SimFactory, tmp_path: Path
) -> None:
    """The issue's configuration: one lease connection, one queue place, half a second's wait."""
    sim = await make_simulator(ttl=30, faults=SLOW_HEARTBEATS)
    items = ready_items(sim.sim, 4)
    tight = "upstream: {pools: {lease: {max_connections: 1, max_queued: 1, max_queue_seconds: 0.5}}}"
    async with served_gateway(tmp_path, sim.url, _with_upstream(sim.url, tight)) as gateway:
        proxy = gateway.proxy_url
        async with aiohttp.ClientSession() as http:
            answers = await asyncio.gather(*(claim(http, proxy, w) for w in items))
            granted = [w for w, a in zip(items, answers, strict=True) if a[0] == 200]
            refused = [(w, a) for w, a in zip(items, answers, strict=True) if a[0] != 200]
            assert len(granted) == 1
            # Refused at once (the queue full) or when the queue wait ran out: well before the lease's
            # holder answers, never the 10 s client timeout; shaped as the API's own 503.
            for _, (status, kind, retry_after, seconds) in refused:
                assert (status, kind, retry_after) == (503, "overloaded_error", "1")
                assert seconds < 1.2
            # Each refused claim, retried one at a time as its retry-after asks, is answered by the API.
            for work_id, _ in refused:
                status, _, _, seconds = await claim(http, proxy, work_id)
                assert status == 200
                assert seconds < 3


async def test_by_default_a_slow_api_never_queues_a_lease_call(make_simulator: SimFactory, tmp_path: Path) -> None:
    """Forty claims at once against an API taking 1.5 s a beat: each gets its own connection, as going direct."""
    sim = await make_simulator(ttl=30, faults=SLOW_HEARTBEATS)
    items = ready_items(sim.sim, 40)
    async with served_gateway(tmp_path, sim.url) as gateway:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            answers = await asyncio.gather(*(claim(http, gateway.proxy_url, w) for w in items))
            assert [a[0] for a in answers] == [200] * 40
            assert max(a[3] for a in answers) < 3.0  # one slow round trip, not forty queued ones
            async with http.get(f"{gateway.admin_url}/metrics") as r:
                metrics = await r.text()
        # The lease class is sized to the worker connections the replica accepts: 10,000 by default, fewer
        # where the descriptor limit (raised to its hard limit by `serve`) cannot hold two per connection.
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        expected = min(10_000, (hard - RESERVED_DESCRIPTORS) // 2)
        assert f'heartbeat_gateway_upstream_pool_limit{{pool="lease"}} {expected:.1f}' in metrics
        assert 'heartbeat_gateway_upstream_pool_wait_seconds_count{pool="lease"} 0.0' in metrics


def _with_upstream(url: str, extra: str) -> str:
    """`extra` with the upstream's address kept (a section given in `extra` replaces the default's whole)."""
    if not extra.startswith("upstream:"):
        return extra
    return extra.replace("upstream: {", f'upstream: {{base_url: "{url}", ', 1)
