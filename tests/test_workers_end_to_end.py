"""The official SDK workers, through their public entry points, serve whole sessions through the gateway.

Each test runs the real worker (Python `work.worker(...).run()`, TypeScript
`EnvironmentWorker`) through a gateway configured as the README shows (one
environment, one client token, nothing else), and the same workload directly
against a second simulator in the same run: every lease and session figure
must match, and the simulator behind the gateway must see only the
environment key, or the item's own sessions token, never the client token or
the organisation key.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from gateway.app import Gateway
from gateway.config.load import load_settings
from gateway.simulator import AgentScript, Faults, fingerprint

from .support import API_KEY, ENV_ID, ENV_KEY, ENVIRON, OTHER_ENV_ID, TOKEN, SimFactory, SimHandle, worker_headers
from .tools import write_pair
from .workers import (
    NodeWorker,
    Served,
    items_done,
    python_worker,
    require_node,
    run_node_worker,
    run_python_worker,
    running,
    sdk_log,
    wait_for,
)

# Short leases so several beats fit in a test: the SDKs beat every max(1, ttl/2) s.
TTL = 2
ITEMS = 3
# The session idles this long after its turn before the worker lets it go: about three beats.
MAX_IDLE = 2.5
SCRIPT = AgentScript(commands=("echo hello",))

# The README's config: the environment and its key, a client token, nothing else.
MINIMAL = f"""
listen: {{host: 127.0.0.1, port: 0}}
admin: {{host: 127.0.0.1, port: 0}}
upstream: {{base_url: "%(upstream)s"}}
environments:
  - {{id: {ENV_ID}, name: prod-sandboxes, key_env: TEST_ENV_KEY}}
clients:
  tokens: [{{token_env: TEST_TOKEN, environments: ["*"]}}]
limits: {{shutdown_grace_seconds: 1}}
# The README's minimal config, but for shedding: this gateway shares its event loop with the SDK workers and
# both simulators, so a busy machine's lag is theirs, not the gateway's (tests/test_overload.py sheds).
overload: {{enabled: false}}
"""

Started = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start_gateway() -> Any:
    started: list[Gateway] = []

    async def start(upstream: str, config: str = MINIMAL, **env: str) -> Gateway:
        gateway = Gateway(load_settings(config % {"upstream": upstream}, {**ENVIRON, **env}))
        await gateway.start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        await gateway.stop()


async def pair(
    make_simulator: SimFactory, *, ttl: int = TTL, issue_secrets: bool = False
) -> tuple[SimHandle, SimHandle]:
    """Two simulators alike: one behind the gateway, one for the same workers going direct."""
    behind = await make_simulator(ttl=ttl, issue_secrets=issue_secrets, script=SCRIPT)
    direct = await make_simulator(ttl=ttl, issue_secrets=issue_secrets, script=SCRIPT)
    for sim in (behind, direct):
        sim.sim.enqueue(ENV_ID, count=ITEMS)
    return behind, direct


def assert_least_privilege(sim: SimHandle, *, issue_secrets: bool) -> None:
    """Behind the gateway: the environment key where the worker sends it directly, or the item's token."""
    stats = sim.sim.stats_json()
    assert fingerprint(TOKEN) not in stats["credential_fingerprints"]
    assert fingerprint(API_KEY) not in stats["credential_fingerprints"]
    for endpoint, kinds in stats["credentials_by_endpoint"].items():
        expected = {"environment_key"} if endpoint in ("poll", "ack") or not issue_secrets else {"sessions_token"}
        assert set(kinds) == expected, (endpoint, kinds)


def assert_served_whole(served: Served) -> None:
    assert served.items_stopped == ITEMS
    assert served.force_stopped == ITEMS  # each by the worker's own force-stop
    assert served.tool_outputs == (("hello",),) * ITEMS  # the tool ran on the worker, its result came back
    assert served.min_beats >= 3
    assert served.upstream_412s == 0


@pytest.mark.parametrize("issue_secrets", [False, True], ids=["environment-key", "sessions-token"])
async def test_the_python_worker_serves_sessions_as_it_does_directly(
    make_simulator: SimFactory, start_gateway: Started, tmp_path: Path, issue_secrets: bool
) -> None:
    behind, direct = await pair(make_simulator, issue_secrets=issue_secrets)
    gateway = await start_gateway(behind.url)
    with sdk_log() as log:
        await asyncio.gather(
            run_python_worker(
                gateway.proxy_url,
                TOKEN,
                ENV_ID,
                tmp_path / "gw",
                until=items_done(behind.sim, ENV_ID, ITEMS),
                max_idle=MAX_IDLE,
            ),
            run_python_worker(
                direct.url,
                ENV_KEY,
                ENV_ID,
                tmp_path / "direct",
                until=items_done(direct.sim, ENV_ID, ITEMS),
                max_idle=MAX_IDLE,
            ),
        )
    through, alone = Served.of(behind.sim, ENV_ID), Served.of(direct.sim, ENV_ID)
    assert_served_whole(through)
    assert_served_whole(alone)
    assert through.credential_kinds == alone.credential_kinds
    assert_least_privilege(behind, issue_secrets=issue_secrets)
    assert not [m for m in log.messages if "failed" in m or "lost" in m]


@pytest.mark.parametrize("issue_secrets", [False, True], ids=["environment-key", "sessions-token"])
async def test_the_typescript_worker_serves_sessions_as_it_does_directly(
    make_simulator: SimFactory, start_gateway: Started, tmp_path: Path, issue_secrets: bool
) -> None:
    node = require_node()
    behind, direct = await pair(make_simulator, issue_secrets=issue_secrets)
    gateway = await start_gateway(behind.url)
    options = {"environmentId": ENV_ID, "maxIdleMs": int(MAX_IDLE * 1000)}
    runs = await asyncio.gather(
        run_node_worker(
            node,
            {**options, "baseURL": gateway.proxy_url, "environmentKey": TOKEN, "workdir": str(tmp_path / "gw")},
            until=items_done(behind.sim, ENV_ID, ITEMS),
        ),
        run_node_worker(
            node,
            {**options, "baseURL": direct.url, "environmentKey": ENV_KEY, "workdir": str(tmp_path / "direct")},
            until=items_done(direct.sim, ENV_ID, ITEMS),
        ),
    )
    through, alone = Served.of(behind.sim, ENV_ID), Served.of(direct.sim, ENV_ID)
    assert_served_whole(through)
    assert_served_whole(alone)
    assert_least_privilege(behind, issue_secrets=issue_secrets)
    for run in runs:
        assert run.messages("error") == []
        assert run.messages().count("executing tool") == ITEMS


async def graceful_stop_reaches(sim: SimHandle, environment_id: str) -> float:
    """Stop the first item gracefully once its tool has run; seconds until the worker force-stopped it."""
    await wait_for(lambda: any(s.tool_results for s in sim.sim.sessions.all()), 15, "the tool to run")
    (item,) = [i for i in sim.sim.plane.items(environment_id) if i.state == "active"]
    stopped_at = asyncio.get_running_loop().time()
    sim.sim.plane.stop(environment_id, item.id, sim.sim.now(), force=False)
    await wait_for(lambda: item.state == "stopped", 10, "the worker to stop the item")
    assert item.force_stops == 1
    return asyncio.get_running_loop().time() - stopped_at


async def test_a_graceful_stop_on_the_api_reaches_both_workers_through_the_gateway(
    make_simulator: SimFactory, start_gateway: Started, tmp_path: Path
) -> None:
    python_sim = await make_simulator(ttl=TTL, script=SCRIPT)
    gateway = await start_gateway(python_sim.url)
    python_sim.sim.enqueue(ENV_ID)
    # max_idle off: only the stop ends the session.
    async with python_worker(gateway.proxy_url, TOKEN, ENV_ID, tmp_path, max_idle=None) as worker, running(worker):
        # The SDK beats every ttl/2 s: the stop arrives with the next beat.
        assert await graceful_stop_reaches(python_sim, ENV_ID) <= TTL / 2 + 1

    node = require_node()
    node_sim = await make_simulator(ttl=TTL, script=SCRIPT)
    node_gateway = await start_gateway(node_sim.url)
    node_sim.sim.enqueue(ENV_ID)
    options = {"mode": "run", "environmentId": ENV_ID, "environmentKey": TOKEN, "maxIdleMs": 0}
    node_worker = await NodeWorker.start(node, {**options, "baseURL": node_gateway.proxy_url, "workdir": str(tmp_path)})
    try:
        assert await graceful_stop_reaches(node_sim, ENV_ID) <= TTL / 2 + 1
    finally:
        run = await node_worker.finish()
    assert "heartbeat signals shutdown" in run.messages()


def claimed_by_a_dispatcher(sim: SimHandle) -> tuple[str, Any]:
    """One item polled and acked by a dispatcher (`ant beta:worker poll --on-work`), to hand to two processes."""
    (work_id,) = sim.sim.enqueue(ENV_ID)
    (item,) = sim.sim.plane.items(ENV_ID)
    sim.sim.plane.poll(ENV_ID, sim.sim.now(), worker_id="dispatcher", reclaim_older_than_ms=None)
    sim.sim.plane.ack(ENV_ID, work_id, sim.sim.now())
    return work_id, item


async def test_two_python_workers_racing_for_one_item_leave_one_holder(
    make_simulator: SimFactory, start_gateway: Started, tmp_path: Path
) -> None:
    sim = await make_simulator(ttl=TTL, script=SCRIPT)
    gateway = await start_gateway(sim.url)
    work_id, item = claimed_by_a_dispatcher(sim)
    with sdk_log() as log:
        async with (
            python_worker(gateway.proxy_url, TOKEN, ENV_ID, tmp_path / "a") as first,
            python_worker(gateway.proxy_url, TOKEN, ENV_ID, tmp_path / "b") as second,
        ):
            await asyncio.wait_for(
                asyncio.gather(
                    *(
                        racer.handle_item(work_id=work_id, environment_id=ENV_ID, session_id=item.data_id)
                        for racer in (first, second)
                    )
                ),
                20,
            )
    assert len([m for m in log.messages if m.startswith("lease lost: heartbeat precondition failed")]) == 1
    assert item.state == "stopped"
    assert item.force_stops == 1  # only the holder stopped it; the loser left it alone
    assert sim.sim.requests["heartbeat"]["200"] >= 2
    assert [len(s.tool_results) for s in sim.sim.sessions.all()] == [1]


async def test_two_typescript_workers_racing_for_one_item_leave_one_holder(
    make_simulator: SimFactory, start_gateway: Started, tmp_path: Path
) -> None:
    node = require_node()
    sim = await make_simulator(ttl=TTL, script=SCRIPT)
    gateway = await start_gateway(sim.url)
    work_id, item = claimed_by_a_dispatcher(sim)
    handle = {
        "mode": "handle",
        "baseURL": gateway.proxy_url,
        "environmentId": ENV_ID,
        "environmentKey": TOKEN,
        "maxIdleMs": 1000,
        "item": {"workId": work_id, "environmentId": ENV_ID, "sessionId": item.data_id},
    }
    racers = [await NodeWorker.start(node, {**handle, "workdir": str(tmp_path / str(i))}) for i in range(2)]
    runs = [await racer.finish(stop=False) for racer in racers]
    lost = [run for run in runs if "lease lost: heartbeat precondition failed" in run.messages()]
    assert len(lost) == 1
    assert item.state == "stopped"
    assert item.force_stops == 1


TWO_ENVIRONMENTS = f"""
listen: {{host: 127.0.0.1, port: %(port)d}}
admin: {{host: 127.0.0.1, port: 0}}
upstream: {{base_url: "%(upstream)s"}}
environments:
  - {{id: {OTHER_ENV_ID}, key_env: TEST_OTHER_ENV_KEY}}
  - {{id: {ENV_ID}, name: prod-sandboxes, key_env: TEST_ENV_KEY}}
clients:
  tokens: [{{token_env: TEST_TOKEN, environments: [%(scope)s]}}]
  discover_sessions: %(discover)s
%(fallback)s
limits: {{shutdown_grace_seconds: 0.5}}
"""


ORGANISATION_FALLBACK = "default_credential: {api_key_env: TEST_API_KEY, use_for: [sessions]}"


@pytest.mark.parametrize(
    ("scope", "discover", "fallback", "session_credential"),
    [
        (ENV_ID, "true", "", "environment_key"),
        ('"*"', "true", "", "environment_key"),
        ('"*"', "false", ORGANISATION_FALLBACK, "organization_api_key"),
    ],
    ids=["token-of-one-environment", "token-of-two-discovered", "token-of-two-organisation-fallback"],
)
async def test_a_gateway_restart_mid_session_keeps_the_session_and_the_lease(
    make_simulator: SimFactory,
    tmp_path: Path,
    unused_tcp_port: int,
    scope: str,
    discover: str,
    fallback: str,
    session_credential: str,
) -> None:
    """A new gateway knows nothing of the session the worker is in: the key must still be the right one."""
    # A longer lease: the worker goes on beating through the restart, as it would through a rolling update.
    sim = await make_simulator(ttl=10, script=SCRIPT)
    sim.sim.enqueue(ENV_ID)
    values = {"port": unused_tcp_port, "upstream": sim.url, "scope": scope, "discover": discover, "fallback": fallback}
    settings = load_settings(TWO_ENVIRONMENTS % values, ENVIRON)
    first = Gateway(settings)
    await first.start()
    second = Gateway(settings)
    try:
        async with python_worker(first.proxy_url, TOKEN, ENV_ID, tmp_path, max_idle=6.0) as worker, running(worker):
            await wait_for(lambda: any(s.tool_results for s in sim.sim.sessions.all()), 15, "the tool to run")
            before = dict(sim.sim.credentials_by_endpoint["stream"])
            await first.stop()  # cuts the worker's event stream
            await second.start()  # same port: the worker reconnects to a gateway that never saw its poll
            await wait_for(items_done(sim.sim, ENV_ID, 1), 20, "the item to finish")
    finally:
        await second.stop()
    (item,) = sim.sim.plane.items(ENV_ID)
    assert item.force_stops == 1  # finished by its worker, not lost
    assert sim.sim.requests["heartbeat"].get("412", 0) == 0
    reopened = sim.sim.credentials_by_endpoint["stream"] - Counter(before)
    assert set(reopened) == {session_credential}
    stats = sim.sim.stats_json()
    assert fingerprint(TOKEN) not in stats["credential_fingerprints"]
    if session_credential != "organization_api_key":
        assert fingerprint(API_KEY) not in stats["credential_fingerprints"]


async def side_by_side(
    stack: contextlib.AsyncExitStack, gateway: Gateway, direct: SimHandle, tmp_path: Path, *, workers_each: int
) -> None:
    """Python SDK workers running until the stack closes: `workers_each` through the gateway with the client
    token, as many directly with the environment key; sessions are held (no idle limit)."""
    for n, (url, key) in enumerate(((gateway.proxy_url, TOKEN), (direct.url, ENV_KEY)) * workers_each):
        worker = await stack.enter_async_context(python_worker(url, key, ENV_ID, tmp_path / str(n), max_idle=None))
        await stack.enter_async_context(running(worker))


def claimed(sim: SimHandle, count: int) -> Callable[[], bool]:
    return lambda: sum(i.beats > 0 for i in sim.sim.plane.items(ENV_ID)) == count


def force_stopped(item: Any) -> Callable[[], bool]:
    return lambda: bool(item.force_stops == 1)


async def test_absorption_on_a_short_lease_with_a_slow_upstream_costs_no_lease(
    make_simulator: SimFactory, start_gateway: Started, tmp_path: Path
) -> None:
    """The measured failure: 6 s leases, heartbeats answered in 1.1 s, `min_remaining_fraction: 0.25` (and the
    default 5 s signal delay).

    Absorbed answers used to promise the few whole seconds left, which set the
    SDK's interval and per-beat timeout to ~1 s: both workers gave up leases
    they held. Now an answer that would shorten their pace is never given.
    """
    slow = Faults(latency_seconds=1.1, endpoints=("heartbeat",))
    behind = await make_simulator(ttl=6, script=SCRIPT, faults=slow)
    direct = await make_simulator(ttl=6, script=SCRIPT, faults=slow)
    for sim in (behind, direct):
        sim.sim.enqueue(ENV_ID, count=2)
    absorbing = MINIMAL + "heartbeat: {absorb: {enabled: true, min_remaining_fraction: 0.25}}\n"
    gateway = await start_gateway(behind.url, absorbing)
    with sdk_log() as log:
        async with contextlib.AsyncExitStack() as stack:
            await side_by_side(stack, gateway, direct, tmp_path, workers_each=2)
            for sim in (behind, direct):
                await wait_for(claimed(sim, 2), 20, "both items to be claimed")
            await asyncio.sleep(14)  # about four beats each at the SDK's 3 s interval
            for sim in (behind, direct):
                sim.sim.plane.expire(sim.sim.now())
                assert [i.state for i in sim.sim.plane.items(ENV_ID)] == ["active", "active"]
                assert sim.sim.requests["heartbeat"].get("412", 0) == 0
    assert not [m for m in log.messages if "lost" in m], log.messages
    # No beat was answered locally: every answer the workers paced themselves by came from the API.
    answered = next(iter(gateway.metrics.heartbeats.collect())).samples
    assert sum(s.value for s in answered if s.labels.get("outcome") == "absorbed" and s.name.endswith("_total")) == 0


async def test_the_recommended_absorption_setting_saves_half_the_beats_and_stops_still_arrive(
    make_simulator: SimFactory, start_gateway: Started, tmp_path: Path
) -> None:
    """300 s leases (`desired_ttl_seconds`) and a 60 s signal delay, three Python SDK workers beating every
    30 s, side by side with the same workers going direct to an API whose leases are 300 s too.

    Item A is stopped on the API right after its claim: the holder hears of it within the signal delay.
    Item B is stopped through the gateway: absorption ends for it at once, so its holder hears of it at its
    next beat, as it would directly. Item C runs on: of its two beats after the claim, one is absorbed.
    """
    behind = await make_simulator(ttl=30, script=SCRIPT)  # the API's own default: the gateway asks for 300
    direct = await make_simulator(ttl=300, script=SCRIPT)
    for sim in (behind, direct):
        sim.sim.enqueue(ENV_ID, count=3)
    recommended = (
        MINIMAL + "heartbeat: {desired_ttl_seconds: 300, absorb: {enabled: true, max_signal_delay_seconds: 60}}\n"
    )
    gateway = await start_gateway(behind.url, recommended)
    loop = asyncio.get_running_loop()

    def absorbed() -> float:
        answered = next(iter(gateway.metrics.heartbeats.collect())).samples
        return sum(s.value for s in answered if s.labels.get("outcome") == "absorbed" and s.name.endswith("_total"))

    with sdk_log() as log:
        async with contextlib.AsyncExitStack() as stack, aiohttp.ClientSession() as http:
            await side_by_side(stack, gateway, direct, tmp_path, workers_each=3)
            for sim in (behind, direct):
                await wait_for(claimed(sim, 3), 20, "all three items to be claimed")
            assert [i.ttl_seconds for i in behind.sim.plane.items(ENV_ID)] == [300] * 3
            stopped: dict[tuple[int, str], float] = {}
            for sim, base, key in ((behind, gateway.proxy_url, TOKEN), (direct, direct.url, ENV_KEY)):
                a, b, _ = sim.sim.plane.items(ENV_ID)
                sim.sim.plane.stop(ENV_ID, a.id, sim.sim.now(), force=False)  # on the API
                stopped[(id(sim), "a")] = loop.time()
                async with http.post(
                    f"{base}/v1/environments/{ENV_ID}/work/{b.id}/stop",
                    json={"force": False},
                    headers=worker_headers(key),
                ) as r:
                    assert r.status == 200
                stopped[(id(sim), "b")] = loop.time()

            async def heard(sim: SimHandle, which: str, index: int) -> float:
                """Seconds from the stop until the holder ended the item (its own force-stop)."""
                await wait_for(force_stopped(sim.sim.plane.items(ENV_ID)[index]), 60 + 5, f"{which}'s holder")
                return loop.time() - stopped[(id(sim), which)]

            delays = await asyncio.gather(
                *(heard(sim, w, i) for sim in (behind, direct) for w, i in (("a", 0), ("b", 1)))
            )
            through_a, through_b, direct_a, direct_b = delays
            # Stopped through the gateway: heard at the next beat (one 30 s interval), as directly.
            assert through_b <= 30 + 3
            assert direct_b <= 30 + 3
            # Stopped on the API: directly at the next beat; through the gateway within the signal delay.
            assert direct_a <= 30 + 3
            assert 30 < through_a <= 60 + 3
            # C's second beat after its claim (60 s on) goes upstream.
            await wait_for(lambda: behind.sim.count("heartbeat") >= 3 + 3, 10, "the beats due at 60 s")
            for sim in (behind, direct):
                assert sim.sim.plane.items(ENV_ID)[2].state == "active"
    # C: two beats after its claim, one absorbed (1 in 2 saved); A: its beat at 30 s absorbed too.
    # Upstream after the claims: B's at 30 s, A's and C's at 60 s. Directly every beat goes upstream.
    assert absorbed() == 2
    assert behind.sim.count("heartbeat") - 3 == 3
    for sim in (behind, direct):
        assert sim.sim.requests["heartbeat"].get("412", 0) == 0
    assert not [m for m in log.messages if "lost" in m], log.messages


# -- the production path: HTTPS to the gateway, and from it through an egress proxy to an HTTPS API ------


@pytest.mark.parametrize("language", ["python", "typescript"])
async def test_the_workers_serve_sessions_over_https_to_the_gateway_and_through_an_egress_proxy(
    make_simulator: SimFactory,
    start_gateway: Started,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    language: str,
    tinyproxy: tuple[str, Path],
) -> None:
    """What users run: the worker trusts the gateway's CA the way its SDK reads one (`SSL_CERT_FILE` for
    Python's httpx, `NODE_EXTRA_CA_CERTS` for Node), and the gateway reaches an API with a private CA
    only through the cluster's CONNECT proxy."""
    proxy_url, proxy_log = tinyproxy
    ca = trustme.CA(organization_name="the cluster's CA")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    api_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(api_tls)
    sim = await make_simulator(ttl=TTL, script=SCRIPT, tls=api_tls)
    sim.sim.enqueue(ENV_ID, count=ITEMS)
    cert, key = write_pair(ca, tmp_path / "tls", "127.0.0.1")
    config = MINIMAL.replace(
        "listen: {host: 127.0.0.1, port: 0}",
        f"listen: {{host: 127.0.0.1, port: 0, tls: {{cert_file: '{cert}', key_file: '{key}'}}}}",
    ).replace(
        'upstream: {base_url: "%(upstream)s"}',
        f"upstream: {{base_url: '%(upstream)s', tls: {{ca_files: ['{ca_file}']}}, proxy: {{url: '{proxy_url}'}}}}",
    )
    gateway = await start_gateway(sim.url, config)
    assert gateway.proxy_url.startswith("https://")
    if language == "python":
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
        await run_python_worker(
            gateway.proxy_url,
            TOKEN,
            ENV_ID,
            tmp_path / "w",
            until=items_done(sim.sim, ENV_ID, ITEMS),
            max_idle=MAX_IDLE,
        )
    else:
        monkeypatch.setenv("NODE_EXTRA_CA_CERTS", str(ca_file))
        options = {"environmentId": ENV_ID, "maxIdleMs": int(MAX_IDLE * 1000), "baseURL": gateway.proxy_url}
        run = await run_node_worker(
            require_node(),
            {**options, "environmentKey": TOKEN, "workdir": str(tmp_path / "w")},
            until=items_done(sim.sim, ENV_ID, ITEMS),
        )
        assert run.messages("error") == []
    assert_served_whole(Served.of(sim.sim, ENV_ID))
    host_port = sim.url.removeprefix("https://")
    assert [line for line in proxy_log.read_text().splitlines() if "CONNECT" in line and host_port in line]
