"""The simulator as an aiohttp app: auth, parameters, long polls, faults and statistics
around the pure `ControlPlane`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .control_plane import ControlPlane, SimError, TtlPolicy, rfc3339
from .faults import Faults, FaultsError

__all__ = ["SIMULATOR", "Simulator", "SimulatorConfig", "create_simulator_app", "fingerprint"]

REQUIRED_BETA = "managed-agents-2026-04-01"
# [DOC] poll's block_ms is 1-999; list's limit is 1-1000 (environments-api.md §2.2).
MAX_BLOCK_MS = 999
MAX_LIST_LIMIT = 1000


def fingerprint(credential: str) -> str:
    """How /_sim/stats names a credential it saw: a short hash, never the value."""
    return hashlib.sha256(credential.encode()).hexdigest()[:16]


@dataclass
class SimulatorConfig:
    # Environment id -> its environment key.
    environments: dict[str, str]
    ttl: TtlPolicy = field(default_factory=TtlPolicy)
    faults: Faults = field(default_factory=Faults)
    # Organisation API keys, accepted as x-api-key on stats and stop (DOC-OPS).
    org_api_keys: tuple[str, ...] = ()
    # Poll answers carry a per-item `secret` with a sessions token, as the real API may.
    issue_secrets: bool = False
    seed: int | None = None
    clock: Callable[[], float] = time.time


class Simulator:
    """The state behind one simulator app."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.plane = ControlPlane(list(config.environments), ttl=config.ttl, issue_secrets=config.issue_secrets)
        self.faults = config.faults
        self.rng = random.Random(config.seed)
        self.requests: dict[str, Counter[str]] = defaultdict(Counter)
        self.credentials: Counter[str] = Counter()
        self.fingerprints: set[str] = set()
        self.faults_injected: Counter[str] = Counter()
        self.worker_ids: set[str] = set()
        self._request_ids = 0
        self.started_at = config.clock()
        self._changed = asyncio.Event()

    def now(self) -> float:
        return self.config.clock()

    def next_request_id(self) -> str:
        self._request_ids += 1
        return f"req_sim{self._request_ids:010d}"

    def notify(self) -> None:
        """Wake long polls: the queue may have changed."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for_change(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._changed.wait()

    def enqueue(self, environment_id: str, *, count: int = 1, data_type: str = "session") -> list[str]:
        ids = [self.plane.enqueue(environment_id, self.now(), data_type=data_type).id for _ in range(count)]
        self.notify()
        return ids

    def stats_json(self) -> dict[str, Any]:
        return {
            "requests": {endpoint: dict(counts) for endpoint, counts in sorted(self.requests.items())},
            "credentials": dict(self.credentials),
            "credential_fingerprints": sorted(self.fingerprints),
            "faults_injected": dict(self.faults_injected),
            "worker_ids": sorted(self.worker_ids),
        }

    def count(self, endpoint: str) -> int:
        return sum(self.requests[endpoint].values())


SIMULATOR = web.AppKey("simulator", Simulator)


def _json(data: Any, status: int = 200, request_id: str | None = None) -> web.Response:
    headers = {"request-id": request_id} if request_id else None
    return web.Response(status=status, text=json.dumps(data), content_type="application/json", headers=headers)


def _bad(message: str) -> SimError:
    return SimError(400, "invalid_request_error", message)


def _int_param(request: web.Request, name: str, low: int, high: int | None = None) -> int | None:
    values = request.query.getall(name, [])
    if not values:
        return None
    if len(values) > 1:
        raise _bad(f"{name} may be given only once")
    text = values[0]
    if not text.isdigit() or int(text) < low or (high is not None and int(text) > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise _bad(f"{name} must be an integer {bound}")
    return int(text)


class _Api:
    """The /v1 handlers; each names its endpoint and hands its operation to `run`."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def authenticate(self, request: web.Request, env_id: str, work_id: str | None, endpoint: str) -> None:
        sim = self.sim
        scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
        api_key = request.headers.get("x-api-key")
        for credential in (bearer if scheme.lower() == "bearer" else "", api_key or ""):
            if credential:
                sim.fingerprints.add(fingerprint(credential))
        key = sim.config.environments.get(env_id)
        if scheme.lower() == "bearer" and key is not None and bearer == key:
            sim.credentials["environment_key"] += 1
            return
        if scheme.lower() == "bearer" and work_id is not None:
            item = sim.plane.item_for_token(bearer)
            if item is not None and item.id == work_id:
                sim.credentials["sessions_token"] += 1
                return
        # DOC-OPS: stats and stop also take the organisation key, which the
        # SDK sends as a Bearer token and other clients as x-api-key.
        org_key = bearer if scheme.lower() == "bearer" else api_key
        if endpoint in ("stats", "stop") and org_key in sim.config.org_api_keys:
            sim.credentials["organization_api_key"] += 1
            return
        sim.credentials["rejected"] += 1
        raise SimError(401, "authentication_error", "invalid credential for this environment")

    async def run(
        self,
        request: web.Request,
        endpoint: str,
        operation: Callable[[float], Any],
        *,
        work_id: str | None = None,
        long_poll_ms: int | None = None,
    ) -> web.StreamResponse:
        sim = self.sim
        request_id = sim.next_request_id()
        env_id = request.match_info["env"]
        faults = sim.faults
        try:
            if env_id not in sim.config.environments:
                raise SimError(404, "not_found_error", f"environment {env_id} not found")
            # Leases lapse before anything else looks at the item.
            sim.plane.expire(sim.now())
            self.authenticate(request, env_id, work_id, endpoint)
            betas = {b.strip() for v in request.headers.getall("anthropic-beta", []) for b in v.split(",")}
            if REQUIRED_BETA not in betas:
                raise _bad(f"this endpoint requires the anthropic-beta header {REQUIRED_BETA}")
            decision = faults.decide(endpoint, sim.rng)
            if decision != "none":
                sim.faults_injected[decision] += 1
            if decision == "reset" and not faults.reset_after_apply:
                return self.reset(request, endpoint)
            if decision == "error":
                raise SimError(500, "api_error", "simulated internal error")
            if decision == "rate_limit":
                raise SimError(429, "rate_limit_error", "simulated rate limit")
            result = operation(sim.now())
            if long_poll_ms:
                deadline = time.monotonic() + long_poll_ms / 1000
                while result is None and (left := deadline - time.monotonic()) > 0:
                    await sim.wait_for_change(min(left, 0.05))
                    result = operation(sim.now())
            if decision == "reset":
                return self.reset(request, endpoint)
            sim.notify()
            status = 200
        except SimError as exc:
            result, status = exc.body(request_id), exc.status
        if faults.latency_seconds and faults.applies_to(endpoint):
            await asyncio.sleep(faults.latency_seconds)
        sim.requests[endpoint][str(status)] += 1
        response = _json(result, status, request_id)
        if status == 429:
            response.headers["retry-after"] = str(faults.retry_after_seconds)
        return response

    def reset(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        self.sim.requests[endpoint]["reset"] += 1
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError  # nothing more is written on an aborted connection

    # -- handlers --------------------------------------------------------------

    async def environment(self, request: web.Request) -> web.StreamResponse:
        env_id = request.match_info["env"]

        def op(now: float) -> dict[str, Any]:
            return {
                "type": "environment",
                "id": env_id,
                "name": env_id,
                "description": None,
                "config": {"type": "self_hosted"},
                "metadata": {},
                "created_at": rfc3339(self.sim.started_at),
                "updated_at": rfc3339(self.sim.started_at),
                "archived_at": None,
            }

        return await self.run(request, "environment", op)

    async def poll(self, request: web.Request) -> web.StreamResponse:
        env_id = request.match_info["env"]
        try:
            block_ms = _int_param(request, "block_ms", 1, MAX_BLOCK_MS)
            reclaim = _int_param(request, "reclaim_older_than_ms", 0)
        except SimError as exc:
            return await self.run(request, "poll", _raise(exc))
        worker_id = request.headers.get("Anthropic-Worker-ID")

        def op(now: float) -> Any:
            # Runs only once the request is authenticated.
            if worker_id:
                self.sim.worker_ids.add(worker_id)
            return self.sim.plane.poll(env_id, now, worker_id=worker_id, reclaim_older_than_ms=reclaim)

        return await self.run(request, "poll", op, long_poll_ms=block_ms)

    async def ack(self, request: web.Request) -> web.StreamResponse:
        env_id, work_id = request.match_info["env"], request.match_info["work"]
        return await self.run(request, "ack", lambda now: self.sim.plane.ack(env_id, work_id, now), work_id=work_id)

    async def heartbeat(self, request: web.Request) -> web.StreamResponse:
        env_id, work_id = request.match_info["env"], request.match_info["work"]
        try:
            ttl = _int_param(request, "desired_ttl_seconds", 1)
            expected_values = request.query.getall("expected_last_heartbeat", [])
            if len(expected_values) > 1 or (expected_values and not expected_values[0]):
                raise _bad("expected_last_heartbeat must be given once and not be empty")
        except SimError as exc:
            return await self.run(request, "heartbeat", _raise(exc), work_id=work_id)
        expected = expected_values[0] if expected_values else None

        def op(now: float) -> dict[str, Any]:
            return self.sim.plane.heartbeat(env_id, work_id, now, expected=expected, desired_ttl=ttl)

        return await self.run(request, "heartbeat", op, work_id=work_id)

    async def stop(self, request: web.Request) -> web.StreamResponse:
        env_id, work_id = request.match_info["env"], request.match_info["work"]
        raw = await request.read()
        try:
            body = json.loads(raw) if raw.strip() else {}
            if not isinstance(body, dict) or not isinstance(body.get("force", False), bool):
                raise ValueError
        except ValueError:
            return await self.run(
                request, "stop", _raise(_bad('the body must be {"force": true|false}')), work_id=work_id
            )
        force = bool(body.get("force", False))
        return await self.run(
            request, "stop", lambda now: self.sim.plane.stop(env_id, work_id, now, force=force), work_id=work_id
        )

    async def update(self, request: web.Request) -> web.StreamResponse:
        env_id, work_id = request.match_info["env"], request.match_info["work"]
        try:
            body = json.loads(await request.read() or b"{}")
            metadata = body.get("metadata") if isinstance(body, dict) else None
            if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in metadata.items()
            ):
                raise ValueError
        except ValueError:
            bad = _bad('the body must be {"metadata": {"key": "value" or null}}')
            return await self.run(request, "update", _raise(bad), work_id=work_id)
        op = lambda now: self.sim.plane.update(env_id, work_id, now, metadata)  # noqa: E731
        return await self.run(request, "update", op, work_id=work_id)

    async def unknown(self, request: web.Request) -> web.StreamResponse:
        request_id = self.sim.next_request_id()
        self.sim.requests["unknown"][str(404)] += 1
        error = SimError(404, "not_found_error", f"{request.method} {request.path} is not part of the simulated API")
        return _json(error.body(request_id), 404, request_id)

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        env_id, work_id = request.match_info["env"], request.match_info["work"]
        op = lambda now: self.sim.plane.retrieve(env_id, work_id, now)  # noqa: E731
        return await self.run(request, "retrieve", op, work_id=work_id)

    async def list(self, request: web.Request) -> web.StreamResponse:
        env_id = request.match_info["env"]
        try:
            limit = _int_param(request, "limit", 1, MAX_LIST_LIMIT) or 20
        except SimError as exc:
            return await self.run(request, "list", _raise(exc))
        page = request.query.get("page")
        return await self.run(
            request, "list", lambda now: self.sim.plane.list_items(env_id, now, limit=limit, page=page)
        )

    async def stats(self, request: web.Request) -> web.StreamResponse:
        env_id = request.match_info["env"]
        return await self.run(request, "stats", lambda now: self.sim.plane.stats(env_id, now))


def _raise(exc: SimError) -> Callable[[float], Any]:
    def op(now: float) -> Any:
        raise exc

    return op


async def _sim_stats(request: web.Request) -> web.Response:
    return _json(request.app[SIMULATOR].stats_json())


async def _get_faults(request: web.Request) -> web.Response:
    return _json(request.app[SIMULATOR].faults.to_json())


async def _set_faults(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    try:
        sim.faults = Faults.from_json(await request.json())
    except (FaultsError, ValueError) as exc:
        return _json({"error": str(exc)}, 400)
    return _json(sim.faults.to_json())


async def _enqueue(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    env_id = request.match_info["env"]
    if env_id not in sim.config.environments:
        return _json({"error": f"unknown environment {env_id}"}, 404)
    raw = await request.read()
    try:
        body = json.loads(raw) if raw.strip() else {}
        count = body.get("count", 1) if isinstance(body, dict) else None
        data_type = body.get("data_type", "session") if isinstance(body, dict) else None
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 10_000:
            raise ValueError("count must be an integer from 1 to 10000")
        if data_type not in ("session", "healthcheck"):
            raise ValueError("data_type must be session or healthcheck")
    except ValueError as exc:
        return _json({"error": str(exc)}, 400)
    return _json({"ids": sim.enqueue(env_id, count=count, data_type=data_type)}, 201)


async def _items(request: web.Request) -> web.Response:
    """Every item with its lease, for tests and operators; no credentials."""
    sim = request.app[SIMULATOR]
    env_id = request.match_info["env"]
    if env_id not in sim.config.environments:
        return _json({"error": f"unknown environment {env_id}"}, 404)
    sim.plane.expire(sim.now())
    items = []
    for item in sim.plane.items(env_id):
        entry = sim.plane.work_json(item)
        entry["last_heartbeat"] = item.last_heartbeat
        entry["ttl_seconds"] = item.ttl_seconds
        items.append(entry)
    return _json({"data": items})


def create_simulator_app(config: SimulatorConfig) -> web.Application:
    app = web.Application()
    sim = Simulator(config)
    app[SIMULATOR] = sim
    api = _Api(sim)
    env = "/v1/environments/{env}"
    work = env + "/work/{work}"
    app.router.add_get(env, api.environment)
    # Fixed paths first: aiohttp matches routes in the order they were added.
    app.router.add_get(env + "/work/poll", api.poll)
    app.router.add_get(env + "/work/stats", api.stats)
    app.router.add_get(env + "/work", api.list)
    app.router.add_get(work, api.retrieve)
    app.router.add_post(work + "/ack", api.ack)
    app.router.add_post(work + "/heartbeat", api.heartbeat)
    app.router.add_post(work + "/stop", api.stop)
    app.router.add_post(work, api.update)
    app.router.add_get("/_sim/stats", _sim_stats)
    app.router.add_get("/_sim/faults", _get_faults)
    app.router.add_post("/_sim/faults", _set_faults)
    app.router.add_post("/_sim/environments/{env}/work", _enqueue)
    app.router.add_get("/_sim/environments/{env}/work", _items)
    # Last: anything else under /v1 gets the API's error envelope, not aiohttp's text.
    app.router.add_route("*", "/v1/{tail:.*}", api.unknown)
    return app
