"""The gateway scraped by a real Prometheus: series values and an alert going to firing.

Runs the simulator and the gateway in-process and Debian's `prometheus`
binary on loopback (scrape and rule evaluation every second, with the shipped
alert rules), drives a rival claim that ends in a 412, and asks Prometheus'
HTTP API what it sees.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.app import Gateway

from .support import ENV_ID, GatewayFactory, SimFactory, SimHandle, worker_headers
from .tools import free_port, require

RULES = Path(__file__).parent.parent / "config" / "prometheus" / "alerts.yaml"


@pytest.fixture
async def prometheus(tmp_path: Path, gateway_for_prometheus: Gateway) -> AsyncIterator[str]:
    binary = require("prometheus", "apt-get install prometheus")
    port = free_port()
    target = gateway_for_prometheus.admin_url.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "heartbeat-gateway", "static_configs": [{"targets": [target]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{port}"
    with (tmp_path / "prometheus.log").open("w") as log:
        proc = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            await until(lambda: api(url, "/api/v1/targets"), _target_up, "the target to be up", 60)
            yield url
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)


def _target_up(data: Any) -> bool:
    targets = data["activeTargets"]
    return bool(targets) and all(t["health"] == "up" for t in targets)


@pytest.fixture
async def simulator_for_prometheus(make_simulator: SimFactory) -> SimHandle:
    return await make_simulator(ttl=30)


@pytest.fixture
async def gateway_for_prometheus(simulator_for_prometheus: SimHandle, make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway(simulator_for_prometheus.url)


async def api(base: str, path: str, **params: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(base + path, params=params) as response:
        body = await response.json()
        assert body["status"] == "success", body
        return body["data"]


async def until(fetch: Any, check: Any, what: str, seconds: float) -> Any:
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        try:
            last = await fetch()
            if check(last):
                return last
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last answer: {last}")


def scalar(result: list[dict[str, Any]]) -> float | None:
    return float(result[0]["value"][1]) if result else None


async def test_prometheus_sees_the_conflict_the_loss_and_fires_the_alert(
    prometheus: str, gateway_for_prometheus: Gateway, simulator_for_prometheus: SimHandle
) -> None:
    gateway, sim = gateway_for_prometheus, simulator_for_prometheus
    (work_id,) = sim.sim.enqueue(ENV_ID)
    now = sim.sim.now()
    sim.sim.plane.poll(ENV_ID, now, worker_id="w", reclaim_older_than_ms=0)
    sim.sim.plane.ack(ENV_ID, work_id, now)
    await asyncio.sleep(2)  # a scrape of the all-zero series first, so increase() sees the step
    claim = f"{gateway.proxy_url}/v1/environments/{ENV_ID}/work/{work_id}/heartbeat"
    params = {"expected_last_heartbeat": "NO_HEARTBEAT"}
    async with aiohttp.ClientSession() as session:
        async with session.post(claim, params=params, headers=worker_headers()) as response:
            assert response.status == 200
        async with session.post(claim, params=params, headers=worker_headers()) as response:
            assert response.status == 412  # a second worker claims the same item

    env = 'environment="prod-sandboxes"'
    conflicts = await until(
        lambda: api(prometheus, "/api/v1/query", query=f"heartbeat_gateway_heartbeat_conflicts_total{{{env}}}"),
        lambda data: scalar(data["result"]) == 1.0,
        "the conflict in Prometheus",
        30,
    )
    assert scalar(conflicts["result"]) == 1.0
    lost = await api(
        prometheus, "/api/v1/query", query=f'heartbeat_gateway_leases_lost_total{{{env},reason="conflict"}}'
    )
    assert scalar(lost["result"]) == 1.0
    outcomes = await api(
        prometheus, "/api/v1/query", query=f"sum by (outcome) (heartbeat_gateway_heartbeats_total{{{env}}})"
    )
    by_outcome = {r["metric"]["outcome"]: float(r["value"][1]) for r in outcomes["result"]}
    assert by_outcome["forwarded"] == 1.0
    assert by_outcome["rejected"] == 1.0
    leases = await api(prometheus, "/api/v1/query", query=f'heartbeat_gateway_leases{{{env},state="active"}}')
    assert scalar(leases["result"]) == 1.0

    alerts = await until(
        lambda: api(prometheus, "/api/v1/alerts"),
        lambda data: any(
            a["labels"]["alertname"] == "HeartbeatGatewayLeasesLost" and a["state"] == "firing" for a in data["alerts"]
        ),
        "HeartbeatGatewayLeasesLost to fire",
        30,
    )
    (alert,) = [a for a in alerts["alerts"] if a["labels"]["alertname"] == "HeartbeatGatewayLeasesLost"]
    assert alert["labels"]["reason"] == "conflict"
    assert alert["labels"]["environment"] == "prod-sandboxes"
    assert alert["annotations"]["runbook_url"].endswith("#heartbeatgatewayleaseslost")
    # Nothing else is wrong: the target is up and no other alert fires.
    firing = {a["labels"]["alertname"] for a in alerts["alerts"] if a["state"] == "firing"}
    assert firing == {"HeartbeatGatewayLeasesLost"}
