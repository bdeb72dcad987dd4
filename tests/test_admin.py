"""The admin port: probes, the lease table, the effective config, and nothing of it on the worker port.

Checks `gateway/edge/admin.py`, `gateway/app.py`.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from gateway.app import Gateway

from .support import (
    ALL_ENVIRONMENTS_CLIENTS,
    DEFAULT_CREDENTIAL,
    ENV_ID,
    OTHER_ENV_ID,
    SECRETS,
    GatewayFactory,
    SimFactory,
    SimHandle,
    worker_headers,
)


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json()


async def claim_items(gateway: Gateway, sim: Any, env_id: str, count: int) -> list[str]:
    ids = sim.sim.enqueue(env_id, count=count)
    now = sim.sim.now()
    async with aiohttp.ClientSession() as session:
        for work_id in ids:
            sim.sim.plane.expire(now)
            item = next(i for i in sim.sim.plane.items(env_id) if i.id == work_id)
            item.polled_at = now
            sim.sim.plane.ack(env_id, work_id, now)
            url = f"{gateway.proxy_url}/v1/environments/{env_id}/work/{work_id}/heartbeat"
            headers = worker_headers()
            async with session.post(url, params={"expected_last_heartbeat": "NO_HEARTBEAT"}, headers=headers) as r:
                assert r.status == 200
    return list(ids)


async def test_the_lease_table_filters_and_pages(make_simulator: SimFactory, make_gateway: GatewayFactory) -> None:
    sim = await make_simulator(ttl=30)
    gateway = await make_gateway(sim.url, clients=ALL_ENVIRONMENTS_CLIENTS)
    prod = await claim_items(gateway, sim, ENV_ID, 3)
    other = await claim_items(gateway, sim, OTHER_ENV_ID, 2)
    status, body = await get(gateway.admin_url + "/admin/leases")
    assert status == 200
    assert body["total"] == 5
    assert body["next_cursor"] is None
    row = next(r for r in body["data"] if r["work_id"] == prod[0])
    assert row["environment"] == "prod-sandboxes"
    assert row["environment_id"] == ENV_ID
    assert row["state"] == "active"
    assert row["ttl_seconds"] == 30
    assert 28 < row["seconds_left"] <= 30
    assert row["last_outcome"] == "forwarded"
    assert row["last_heartbeat"].endswith("Z")
    # By label or id, and by state.
    status, body = await get(gateway.admin_url + "/admin/leases?environment=prod-sandboxes")
    assert sorted(r["work_id"] for r in body["data"]) == sorted(prod)
    status, body = await get(gateway.admin_url + f"/admin/leases?environment={OTHER_ENV_ID}&state=active")
    assert sorted(r["work_id"] for r in body["data"]) == sorted(other)
    status, body = await get(gateway.admin_url + "/admin/leases?state=stopped")
    assert body["data"] == []
    # Pages of two.
    seen: list[str] = []
    cursor: str | None = "0"
    while cursor is not None:
        status, body = await get(gateway.admin_url + f"/admin/leases?limit=2&cursor={cursor}")
        assert len(body["data"]) <= 2
        seen += [r["work_id"] for r in body["data"]]
        cursor = body["next_cursor"]
    assert sorted(seen) == sorted(prod + other)


@pytest.mark.parametrize("query", ["limit=0", "limit=5000", "limit=x", "cursor=-1", "cursor=abc"])
async def test_bad_lease_queries_are_400(gateway: Gateway, query: str) -> None:
    status, body = await get(gateway.admin_url + "/admin/leases?" + query)
    assert (status, body["error"]["type"]) == (400, "invalid_request_error")


async def test_the_effective_config_shows_no_secret(simulator: SimHandle, make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(simulator.url, DEFAULT_CREDENTIAL)
    async with aiohttp.ClientSession() as session, session.get(gateway.admin_url + "/admin/config") as response:
        text = await response.text()
    assert response.status == 200
    assert not any(secret in text for secret in SECRETS)
    config = json.loads(text)
    env = config["environments"][0]
    assert env == {
        "id": ENV_ID,
        "name": "prod-sandboxes",
        "key": "<redacted>",
        "key_source": "env:TEST_ENV_KEY",
        "heartbeat": {"desired_ttl_seconds": None, "override": None},
    }
    assert config["default_credential"]["api_key"] == "<redacted>"
    assert config["default_credential"]["use_for"] == ["memory_stores", "other", "sessions", "skills"]
    assert [t["token"] for t in config["clients"]["tokens"]] == ["<redacted>", "<redacted>"]
    assert config["clients"]["tokens"][1]["environments"] == [OTHER_ENV_ID]
    assert config["heartbeat"]["absorb"]["enabled"] is False
    assert config["routes"]["allow_prefixes"][0] == "/v1/environments/"


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/admin/leases", "/admin/config"])
async def test_admin_paths_are_served_on_the_admin_port_only(gateway: Gateway, path: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.proxy_url + path, headers=worker_headers()) as r:
            assert r.status == 404
            assert (await r.json())["error"]["type"] == "not_found_error"
        async with session.get(gateway.admin_url + path) as r:
            assert r.status == 200
