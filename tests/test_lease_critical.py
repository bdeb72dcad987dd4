"""Lease-critical traffic never waits behind anything: the failures that cost leases, reproduced, and gone.

Each test runs the same workload through the gateway and directly against a
second simulator in the same run; through the gateway no lease may be lost
that is kept directly, and what the gateway refuses it refuses fast.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.app import Gateway
from gateway.config.load import load_settings
from gateway.simulator import SIMULATOR, AgentScript, Faults

from .served import served_gateway
from .support import ENV_ID, ENV_KEY, ENVIRON, TOKEN, SimFactory, SimHandle
from .workers import hold_lease, python_worker, running, sdk_log, wait_for

SCRIPT = AgentScript(commands=("echo hello",))
MINIMAL = f"""
listen: {{host: 127.0.0.1, port: 0}}
admin: {{host: 127.0.0.1, port: 0}}
upstream:
  base_url: "%(upstream)s"
  pools: {{stream: {{max_connections: 20, max_queued: 5, max_queue_seconds: 0.2}}}}
environments:
  - {{id: {ENV_ID}, name: prod-sandboxes, key_env: TEST_ENV_KEY}}
clients:
  tokens: [{{token_env: TEST_TOKEN, environments: ["*"]}}]
limits: {{shutdown_grace_seconds: 1}}
%(extra)s
"""


@pytest.fixture
async def start_gateway() -> Any:
    started: list[Gateway] = []

    async def start(upstream: str, extra: str = "") -> Gateway:
        gateway = Gateway(load_settings(MINIMAL % {"upstream": upstream, "extra": extra}, ENVIRON))
        await gateway.start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        await gateway.stop()


def held(sim: SimHandle) -> Any:
    """The one item the worker serves, once its lease is held and its event stream open."""
    items = [i for i in sim.sim.plane.items(ENV_ID) if i.state == "active"]
    if not items or not sim.sim.open_streams(items[0].data_id):
        return None
    return items[0]


async def serve_one_session(
    sim: SimHandle, base_url: str, token: str, workdir: Path, load: Any, seconds: float
) -> list[str]:
    """A Python SDK worker holds one session's lease while `load` runs against the same base URL."""
    (work_id,) = sim.sim.enqueue(ENV_ID)
    with sdk_log() as log:
        async with python_worker(base_url, token, ENV_ID, workdir, max_idle=None) as worker, running(worker):
            await wait_for(lambda: held(sim) is not None, 15, "the worker to hold its lease")
            (item,) = [i for i in sim.sim.plane.items(ENV_ID) if i.id == work_id]
            beats_before = item.beats
            await load(item, seconds)
            # Held all along, and still beating.
            assert item.state == "active"
            assert item.beats >= beats_before + 3
            sim.sim.plane.stop(ENV_ID, work_id, sim.sim.now(), force=False)
            await wait_for(lambda: item.force_stops == 1, 10, "the worker to stop its item")
    return log.messages


def no_lease_lost(messages: list[str]) -> bool:
    return not [m for m in messages if "lease lost" in m or "assumed lost" in m]


async def test_open_streams_filling_their_class_cost_no_lease(
    make_simulator: SimFactory, start_gateway: Any, tmp_path: Path
) -> None:
    """Before: 300 open session streams took every pooled connection and every lease behind them was lost."""
    answers: dict[str, list[tuple[int, float]]] = {"gateway": [], "direct": []}

    def flood(base_url: str, token: str, sim: SimHandle, name: str) -> Any:
        async def load(item: Any, seconds: float) -> None:
            sessions = [sim.sim.sessions.create(ENV_ID, sim.sim.now()) for _ in range(60)]
            stop = asyncio.Event()
            async with aiohttp.ClientSession() as http:

                async def stream(session_id: str) -> None:
                    started = time.monotonic()
                    url = f"{base_url}/v1/sessions/{session_id}/events/stream"
                    headers = {"Authorization": f"Bearer {token}", "anthropic-beta": "managed-agents-2026-04-01"}
                    async with http.get(url, headers=headers) as r:
                        answers[name].append((r.status, time.monotonic() - started))
                        if r.status == 200:
                            await stop.wait()

                streams = [asyncio.ensure_future(stream(s.id)) for s in sessions]
                await asyncio.sleep(seconds)
                stop.set()
                await asyncio.gather(*streams)

        return load

    behind = await make_simulator(ttl=2, script=SCRIPT)
    direct = await make_simulator(ttl=2, script=SCRIPT)
    gateway = await start_gateway(behind.url)
    through_log, alone_log = await asyncio.gather(
        serve_one_session(
            behind, gateway.proxy_url, TOKEN, tmp_path / "gw", flood(gateway.proxy_url, TOKEN, behind, "gateway"), 6
        ),
        serve_one_session(
            direct, direct.url, ENV_KEY, tmp_path / "direct", flood(direct.url, ENV_KEY, direct, "direct"), 6
        ),
    )
    assert no_lease_lost(through_log)
    assert no_lease_lost(alone_log)
    assert behind.sim.requests["heartbeat"].get("412", 0) == direct.sim.requests["heartbeat"].get("412", 0) == 0
    # The stream class took its 20 (the worker's own stream is one of them) and refused the excess fast.
    statuses = [status for status, _ in answers["gateway"]]
    assert statuses.count(200) == 19
    assert statuses.count(503) == 41
    assert max(seconds for status, seconds in answers["gateway"] if status == 503) < 1.0
    assert [status for status, _ in answers["direct"]] == [200] * 60


async def test_a_junk_credential_flood_on_a_held_lease_costs_the_holder_nothing(
    make_simulator: SimFactory, start_gateway: Any, tmp_path: Path
) -> None:
    """Before: 60 junk-token beats/s on a held work id queued ahead of the holder's, and it gave the lease up."""
    answers: dict[str, list[tuple[int, float]]] = {"gateway": [], "direct": []}

    def flood(base_url: str, sim: SimHandle, name: str) -> Any:
        async def load(item: Any, seconds: float) -> None:
            async with aiohttp.ClientSession() as http:

                async def junk() -> None:
                    started = time.monotonic()
                    url = f"{base_url}/v1/environments/{ENV_ID}/work/{item.id}/heartbeat"
                    headers = {"Authorization": f"Bearer junk-{secrets.token_hex(8)}"}
                    params = {"expected_last_heartbeat": item.last_heartbeat or "NO_HEARTBEAT"}
                    async with http.post(url, params=params, headers=headers) as r:
                        await r.read()
                        answers[name].append((r.status, time.monotonic() - started))

                tasks = []
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    tasks.append(asyncio.ensure_future(junk()))
                    await asyncio.sleep(1 / 60)
                await asyncio.gather(*tasks)

        return load

    # A 4 s lease (a beat every 2 s) and a 20 ms upstream: the holder had no slack for a queue.
    latency = Faults(latency_seconds=0.02, endpoints=("heartbeat",))
    behind = await make_simulator(ttl=4, script=SCRIPT, faults=latency)
    direct = await make_simulator(ttl=4, script=SCRIPT, faults=latency)
    gateway = await start_gateway(behind.url)
    through_log, alone_log = await asyncio.gather(
        serve_one_session(
            behind, gateway.proxy_url, TOKEN, tmp_path / "gw", flood(gateway.proxy_url, behind, "gateway"), 8
        ),
        serve_one_session(direct, direct.url, ENV_KEY, tmp_path / "direct", flood(direct.url, direct, "direct"), 8),
    )
    assert no_lease_lost(through_log)
    assert no_lease_lost(alone_log)
    # The junk got the API's own 401, or, beyond the side lane's bound, a local 429: fast either way.
    statuses = {status for status, _ in answers["gateway"]}
    assert statuses <= {401, 429}
    assert len(answers["gateway"]) >= 400
    assert max(seconds for _, seconds in answers["gateway"]) < 1.0
    assert {status for status, _ in answers["direct"]} == {401}


async def test_junk_beats_on_other_work_ids_never_evict_real_leases(
    make_simulator: SimFactory, start_gateway: Any
) -> None:
    """Before: 50k junk-token beats created 50,001 rows and evicted 50 of 50 real active leases."""
    sim = await make_simulator(ttl=60)
    gateway = await start_gateway(sim.url, "heartbeat: {leases: {max_tracked: 50}}")
    work_ids = sim.sim.enqueue(ENV_ID, count=50)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as http:
        for work_id in work_ids:
            sim.sim.plane.poll(ENV_ID, sim.sim.now(), worker_id="w", reclaim_older_than_ms=None)
            sim.sim.plane.ack(ENV_ID, work_id, sim.sim.now())
            url = f"{gateway.proxy_url}/v1/environments/{ENV_ID}/work/{work_id}/heartbeat"
            async with http.post(url, params={"expected_last_heartbeat": "NO_HEARTBEAT"}, headers=auth) as r:
                assert r.status == 200

        async def junk(n: int) -> int:
            url = f"{gateway.proxy_url}/v1/environments/{ENV_ID}/work/work_junk{n}/heartbeat"
            headers = {"Authorization": f"Bearer junk-{n}"}
            async with http.post(url, params={"expected_last_heartbeat": "NO_HEARTBEAT"}, headers=headers) as r:
                return r.status

        for batch in range(10):
            assert set(await asyncio.gather(*(junk(batch * 200 + n) for n in range(200)))) <= {401, 404}
        async with http.get(f"{gateway.admin_url}/admin/leases?limit=1000") as r:
            table = await r.json()
    assert sorted(row["work_id"] for row in table["data"]) == sorted(work_ids)
    assert {row["state"] for row in table["data"]} == {"active"}


def storm(share: float) -> Any:
    """429s with `retry-after: 1` on that share of heartbeat attempts, drawn per (item, beat, attempt),
    so the same workload meets the same storm through the gateway and directly."""
    attempts: dict[tuple[str, int], int] = {}

    @web.middleware
    async def rate_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.endswith("/heartbeat"):
            return await handler(request)
        work_id = request.match_info.get("work", request.path.split("/")[-2])
        item = next((i for i in request.app[SIMULATOR].plane.items(ENV_ID) if i.id == work_id), None)
        beat = (work_id, item.beats if item is not None else 0)
        attempt = attempts.get(beat, 0)
        attempts[beat] = attempt + 1
        draw = int.from_bytes(hashlib.sha256(repr((*beat, attempt)).encode()).digest()[:4], "big") / 2**32
        if draw < share:
            error = {"type": "error", "error": {"type": "rate_limit_error", "message": "simulated storm"}}
            return web.json_response(error, status=429, headers={"retry-after": "1"})
        return await handler(request)

    return rate_limit


async def test_under_a_429_storm_no_worker_loses_more_leases_than_directly(
    make_simulator: SimFactory, tmp_path: Path
) -> None:
    """Before: under 30% 429s the gateway held beats through its own retry sleeps, past the workers' window:
    workers beating every ttl/4 lost 22-25 leases of 48 through it, 5 directly."""
    behind = await make_simulator(ttl=4, middleware=storm(0.3))
    direct = await make_simulator(ttl=4, middleware=storm(0.3))
    workers = 24
    # The gateway in its own process, as deployed: its loop is not the one the fleets and simulators share.
    async with served_gateway(tmp_path, behind.url) as gateway, aiohttp.ClientSession() as http:

        async def fleet(sim: SimHandle, base_url: str, token: str) -> list[str]:
            work_ids = sim.sim.enqueue(ENV_ID, count=workers)
            for work_id in work_ids:
                sim.sim.plane.poll(ENV_ID, sim.sim.now(), worker_id="w", reclaim_older_than_ms=None)
                sim.sim.plane.ack(ENV_ID, work_id, sim.sim.now())
            beats = (hold_lease(http, base_url, token, ENV_ID, w, interval_fraction=0.25, seconds=12) for w in work_ids)
            return list(await asyncio.gather(*beats))

        through, alone = await asyncio.gather(
            fleet(behind, gateway.proxy_url, TOKEN), fleet(direct, direct.url, ENV_KEY)
        )
    lost = {"gateway": sum(o != "kept" for o in through), "direct": sum(o != "kept" for o in alone)}
    print("leases lost under the storm:", lost)
    # The same storm, beat for beat, until a race: the gateway retries a 429 after its `retry-after` (inside
    # the 2 s an SDK worker gives a beat on a 4 s lease), and these workers give up after 1 s. When the retry
    # leaves before the worker's disconnect is seen, it uses up a draw, and from then on the two fleets meet
    # different draws. One lease of slack for that, and only one: 11 and 11 in nearly every run, 12 and 11
    # in one of about ten. The failure this guards against lost 22-25 where direct lost 5.
    assert lost["gateway"] <= lost["direct"] + 1, lost
    assert [o for o in through if o == "lost"] == []  # never a 412: nothing was renewed behind a worker's back
