"""Metrics as the contract names them, read from the live /metrics of a running gateway.

Checks `gateway/observability/metrics.py`.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway
from gateway.simulator import Faults

from .support import ENV_ID, GatewayFactory, SimFactory, SimHandle, worker_headers
from .tools import require

CONTRACT = {
    "heartbeat_gateway_requests_total": {"route", "code"},
    "heartbeat_gateway_request_duration_seconds": {"route"},
    "heartbeat_gateway_upstream_requests_total": {"route", "code"},
    "heartbeat_gateway_upstream_request_duration_seconds": {"route"},
    "heartbeat_gateway_upstream_errors_total": {"route", "kind"},
    "heartbeat_gateway_upstream_retries_total": {"route"},
    "heartbeat_gateway_inflight_requests": {"route"},
    "heartbeat_gateway_heartbeats_total": {"environment", "outcome"},
    "heartbeat_gateway_heartbeat_conflicts_total": {"environment"},
    "heartbeat_gateway_leases_lost_total": {"environment", "reason"},
    "heartbeat_gateway_work_stops_total": {"environment", "state"},
    "heartbeat_gateway_leases": {"environment", "state"},
    "heartbeat_gateway_lease_remaining_seconds": {"environment"},
    "heartbeat_gateway_config_reloads_total": {"result"},
    "heartbeat_gateway_build_info": {"version"},
}


async def scrape(gateway: Gateway) -> str:
    async with aiohttp.ClientSession() as session, session.get(gateway.admin_url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return await response.text()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), float("nan"))


async def test_every_contract_metric_is_exported_with_its_labels_and_starts_at_zero(gateway: Gateway) -> None:
    text = await scrape(gateway)
    names: dict[str, set[str]] = {}
    for (name, label_pairs), _ in samples(text).items():
        base = re.sub(r"_(bucket|count|sum|created)$", "", name)
        names.setdefault(base, set()).update(k for k, _ in label_pairs if k != "le")
    for metric, labels in CONTRACT.items():
        assert metric in names, metric
        assert names[metric] == labels, metric
    # Known combinations exist before anything happened.
    assert value(text, "heartbeat_gateway_heartbeats_total", environment="prod-sandboxes", outcome="absorbed") == 0
    assert value(text, "heartbeat_gateway_leases_lost_total", environment="other", reason="expired") == 0
    assert value(text, "heartbeat_gateway_requests_total", route="heartbeat", code="412") == 0
    assert value(text, "heartbeat_gateway_leases", environment="prod-sandboxes", state="active") == 0
    assert value(text, "heartbeat_gateway_build_info", version=__import__("gateway").__version__) == 1
    assert "process_cpu_seconds_total" in text


async def test_labels_are_bounded_never_ids_tokens_or_paths(gateway: Gateway, simulator: SimHandle) -> None:
    async with aiohttp.ClientSession() as session:
        for path in (
            f"/v1/environments/{ENV_ID}/work/work_sneaky_id/heartbeat?expected_last_heartbeat=NO_HEARTBEAT",
            "/v1/sessions/session_secret_id/events",
            "/v1/environments/env_unknown_999/work/poll",
            "/some/scanner/path.php",
        ):
            async with session.post(gateway.proxy_url + path, headers=worker_headers()):
                pass
    text = await scrape(gateway)
    for forbidden in ("work_sneaky_id", "session_secret_id", "env_unknown_999", "scanner", "hgw-token", "sk-ant"):
        assert forbidden not in text
    routes = {dict(labels).get("route") for (_, labels) in samples(text) if dict(labels).get("route")}
    assert routes <= {"heartbeat", "poll", "ack", "stop", "work", "environments", "sessions", "memory_stores",
                      "skills", "other"}  # fmt: skip


async def test_requests_conflicts_losses_and_outcomes_are_counted(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    sim = await make_simulator(ttl=30)
    gateway = await make_gateway(sim.url)
    (work_id,) = sim.sim.enqueue(ENV_ID)
    base = f"{gateway.proxy_url}/v1/environments/{ENV_ID}/work"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/poll", headers=worker_headers()) as r:
            assert r.status == 200
        async with session.post(f"{base}/{work_id}/ack", headers=worker_headers()) as r:
            assert r.status == 200
        claim = f"{base}/{work_id}/heartbeat?expected_last_heartbeat=NO_HEARTBEAT"
        async with session.post(claim, headers=worker_headers()) as r:
            last = (await r.json())["last_heartbeat"]
        async with session.post(claim, headers=worker_headers()) as r:  # a rival claim: a 412
            assert r.status == 412
        async with session.post(f"{base}/{work_id}/heartbeat", params={"expected_last_heartbeat": last},
                                headers=worker_headers()) as r:  # fmt: skip
            assert r.status == 200
        async with session.post(f"{base}/{work_id}/stop", json={"force": False}, headers=worker_headers()) as r:
            assert r.status == 200
        async with session.post(f"{base}/{work_id}/heartbeat", headers=worker_headers()) as r:
            assert (await r.json())["state"] == "stopping"
    text = await scrape(gateway)
    env = "prod-sandboxes"
    assert value(text, "heartbeat_gateway_requests_total", route="poll", code="200") == 1
    assert value(text, "heartbeat_gateway_requests_total", route="heartbeat", code="412") == 1
    assert value(text, "heartbeat_gateway_requests_total", route="heartbeat", code="200") == 3
    assert value(text, "heartbeat_gateway_heartbeats_total", environment=env, outcome="forwarded") == 3
    assert value(text, "heartbeat_gateway_heartbeats_total", environment=env, outcome="rejected") == 1
    assert value(text, "heartbeat_gateway_heartbeat_conflicts_total", environment=env) == 1
    assert value(text, "heartbeat_gateway_leases_lost_total", environment=env, reason="conflict") == 1
    assert value(text, "heartbeat_gateway_work_stops_total", environment=env, state="stopping") == 1
    # The local 412 never went upstream: three heartbeats did.
    assert value(text, "heartbeat_gateway_upstream_requests_total", route="heartbeat", code="200") == 3
    assert value(text, "heartbeat_gateway_upstream_requests_total", route="stop", code="200") == 1
    assert value(text, "heartbeat_gateway_request_duration_seconds_count", route="heartbeat") == 4
    assert value(text, "heartbeat_gateway_lease_remaining_seconds_count", environment=env) >= 1
    assert value(text, "heartbeat_gateway_inflight_requests", route="heartbeat") == 0
    assert value(text, "heartbeat_gateway_leases", environment=env, state="stopping") == 1


async def test_upstream_errors_and_retries_are_counted(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    sim = await make_simulator(
        ttl=30, faults=Faults(rate_limit_rate=1.0, retry_after_seconds=0, endpoints=("heartbeat",))
    )
    gateway = await make_gateway(sim.url)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{gateway.proxy_url}/v1/environments/{ENV_ID}/work/w/heartbeat", headers=worker_headers()
        ) as r:
            assert r.status == 429
        sim.sim.faults = Faults(reset_rate=1.0, endpoints=("stats",))
        async with session.get(
            f"{gateway.proxy_url}/v1/environments/{ENV_ID}/work/stats", headers=worker_headers()
        ) as r:
            assert r.status == 502
    text = await scrape(gateway)
    assert value(text, "heartbeat_gateway_upstream_retries_total", route="heartbeat") == 3
    assert value(text, "heartbeat_gateway_upstream_requests_total", route="heartbeat", code="429") == 4
    assert value(text, "heartbeat_gateway_upstream_errors_total", route="work", kind="reset") == 1


async def test_an_unrenewed_lease_is_counted_as_expired(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    sim = await make_simulator(ttl=1)
    gateway = await make_gateway(sim.url, "heartbeat: {leases: {expiry_grace_seconds: 0.2}}")
    (work_id,) = sim.sim.enqueue(ENV_ID)
    now = sim.sim.now()
    sim.sim.plane.poll(ENV_ID, now, worker_id="w", reclaim_older_than_ms=0)
    sim.sim.plane.ack(ENV_ID, work_id, now)
    async with aiohttp.ClientSession() as session:
        url = f"{gateway.proxy_url}/v1/environments/{ENV_ID}/work/{work_id}/heartbeat"
        async with session.post(url, params={"expected_last_heartbeat": "NO_HEARTBEAT"}, headers=worker_headers()) as r:
            assert r.status == 200
        sent = time.monotonic()
    # The lease may lapse 1 s (TTL) + 0.2 s (grace) after the claim was sent: the core asks to be
    # woken then, so the loss is recorded then, not at some later tick.
    while True:
        text = await scrape(gateway)
        if value(text, "heartbeat_gateway_leases_lost_total", environment="prod-sandboxes", reason="expired"):
            break
        assert time.monotonic() - sent < 1.2 + 0.5, "the expiry was not recorded when the lease lapsed"
        await asyncio.sleep(0.02)
    assert time.monotonic() - sent >= 1.2 - 0.05, "recorded as expired before the lease could have lapsed"
    assert value(text, "heartbeat_gateway_leases_lost_total", environment="prod-sandboxes", reason="expired") == 1
    assert value(text, "heartbeat_gateway_leases", environment="prod-sandboxes", state="expired") == 1


async def test_live_metrics_pass_promtool_check_metrics(gateway: Gateway, simulator: SimHandle) -> None:
    tool = require("promtool", "apt-get install prometheus")
    (work_id,) = simulator.sim.enqueue(ENV_ID)
    async with aiohttp.ClientSession() as session:  # some traffic, so histograms and the lease table have data
        for path in ("/work/poll", f"/work/{work_id}/ack", f"/work/{work_id}/heartbeat"):
            async with session.request(
                "GET" if path.endswith("poll") else "POST",
                f"{gateway.proxy_url}/v1/environments/{ENV_ID}{path}",
                headers=worker_headers(),
            ) as r:
                assert r.status == 200
    text = await scrape(gateway)
    assert "heartbeat_gateway_lease_ttl_seconds" in text
    proc = await asyncio.create_subprocess_exec(
        tool, "check", "metrics", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output, _ = await proc.communicate(text.encode())
    assert proc.returncode == 0, output.decode()
