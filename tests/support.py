"""Constants and helpers the tests share: planted secrets, configs, stand-in upstreams."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import yaml
from aiohttp import web

from gateway.app import Gateway
from gateway.config.load import load_settings
from gateway.config.settings import Settings
from gateway.simulator import Simulator

# Distinctive values, so a leak scan can search every output for them.
ENV_ID = "env_011CZkZ9X2dpNyB7HsEFoRfW"
OTHER_ENV_ID = "env_0000000000000000000Other"
UNSERVED_ENV_ID = "env_99999999999999NotServed"
ENV_KEY = "sk-ant-envkey-PLANTED-1111111111111111"
OTHER_ENV_KEY = "sk-ant-envkey-PLANTED-2222222222222222"
API_KEY = "sk-ant-api03-PLANTED-3333333333333333"
TOKEN = "hgw-token-PLANTED-4444444444444444"
LIMITED_TOKEN = "hgw-token-PLANTED-5555555555555555"
SECRETS = (ENV_KEY, OTHER_ENV_KEY, API_KEY, TOKEN, LIMITED_TOKEN)
BETA = "managed-agents-2026-04-01"

ENVIRON = {
    "TEST_ENV_KEY": ENV_KEY,
    "TEST_OTHER_ENV_KEY": OTHER_ENV_KEY,
    "TEST_API_KEY": API_KEY,
    "TEST_TOKEN": TOKEN,
    "TEST_LIMITED_TOKEN": LIMITED_TOKEN,
}


# Each token for one environment: what the README recommends, and what lets a
# session path carry that environment's key without the gateway learning anything.
DEFAULT_CLIENTS = f"""clients:
  tokens:
    - {{token_env: TEST_TOKEN, environments: [{ENV_ID}]}}
    - {{token_env: TEST_LIMITED_TOKEN, environments: [{OTHER_ENV_ID}]}}"""
# One token for every environment: session paths then need what the gateway learned, or discovery.
ALL_ENVIRONMENTS_CLIENTS = f"""clients:
  tokens:
    - {{token_env: TEST_TOKEN, environments: ["*"]}}
    - {{token_env: TEST_LIMITED_TOKEN, environments: [{OTHER_ENV_ID}]}}"""


def config_yaml(upstream_url: str, extra: str = "", *, clients: str = DEFAULT_CLIENTS) -> str:
    """A test config; top-level sections in `extra` replace the defaults."""
    base = f"""
listen: {{host: 127.0.0.1, port: 0}}
admin: {{host: 127.0.0.1, port: 0}}
upstream: {{base_url: "{upstream_url}", connect_timeout_seconds: 2, request_timeout_seconds: 5}}
environments:
  - {{id: {ENV_ID}, name: prod-sandboxes, key_env: TEST_ENV_KEY}}
  - {{id: {OTHER_ENV_ID}, key_env: TEST_OTHER_ENV_KEY}}
{clients}
limits: {{shutdown_grace_seconds: 2}}
# Off unless a test turns it on: the in-process gateway shares its event loop with the test, its stand-in
# upstreams and SDK workers, so a busy CI machine's lag is not the gateway's own (tests/test_overload.py).
overload: {{enabled: false}}
"""
    data = yaml.safe_load(base)
    data.update(yaml.safe_load(extra) or {})
    return yaml.safe_dump({k: v for k, v in data.items() if v is not None}, sort_keys=False)


# The organisation-scoped fallback, for tests that configure it.
DEFAULT_CREDENTIAL = (
    "default_credential: {api_key_env: TEST_API_KEY, use_for: [sessions, skills, memory_stores, other]}"
)


def make_settings(upstream_url: str, extra: str = "", *, clients: str = DEFAULT_CLIENTS) -> Settings:
    return load_settings(config_yaml(upstream_url, extra, clients=clients), ENVIRON)


def worker_headers(token: str = TOKEN) -> dict[str, str]:
    """What the SDK worker sends: its key as a Bearer token, and the beta header."""
    return {"Authorization": f"Bearer {token}", "anthropic-beta": BETA}


@dataclass
class SimHandle:
    server: Any
    sim: Simulator

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


SimFactory = Callable[..., Awaitable[SimHandle]]
GatewayFactory = Callable[..., Awaitable[Gateway]]


@dataclass
class Recorded:
    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class Recorder:
    """A stand-in upstream that records what reached it and answers as told."""

    requests: list[Recorded] = field(default_factory=list)
    respond: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None

    async def handler(self, request: web.Request) -> web.StreamResponse:
        if self.respond is not None:
            # The responder reads the body itself when it wants to (streaming tests).
            self.requests.append(Recorded(request.method, request.raw_path, list(request.headers.items()), b""))
            return await self.respond(request)
        body = await request.read()
        self.requests.append(Recorded(request.method, request.raw_path, list(request.headers.items()), body))
        return web.json_response(
            {"ok": True}, headers={"request-id": "req_upstream_1", "retry-after": "7", "x-custom": "kept"}
        )


def held_item(sim: SimHandle) -> str:
    """A work item polled and acked on the simulator, ready for a worker to claim its lease."""
    (work_id,) = sim.sim.enqueue(ENV_ID)
    now = sim.sim.now()
    sim.sim.plane.poll(ENV_ID, now, worker_id="w", reclaim_older_than_ms=0)
    sim.sim.plane.ack(ENV_ID, work_id, now)
    return work_id


def header(pairs: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in pairs if k.lower() == name.lower()]
