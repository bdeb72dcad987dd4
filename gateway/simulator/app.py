"""The simulator as an aiohttp app: the routes, the middlewares around them, and the `/_sim` controls.

The state lives in `gateway.simulator.state`, the /v1 handlers in
`gateway.simulator.api`, the steps around them in
`gateway.simulator.middleware`.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .api import Api
from .faults import Faults, FaultsError
from .middleware import MIDDLEWARES
from .sessions import Session
from .state import ENDPOINT, SIMULATOR, Simulator, SimulatorConfig, fingerprint

__all__ = ["SIMULATOR", "Simulator", "SimulatorConfig", "create_simulator_app", "fingerprint"]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data), content_type="application/json")


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
        entry["heartbeats"] = item.beats
        entry["force_stops"] = item.force_stops
        items.append(entry)
    return _json({"data": items})


async def _create_sessions(request: web.Request) -> web.Response:
    """Sessions whose work items were served elsewhere (for streams and benchmarks): `{"count": n}`."""
    sim = request.app[SIMULATOR]
    env_id = request.match_info["env"]
    if env_id not in sim.config.environments:
        return _json({"error": f"unknown environment {env_id}"}, 404)
    try:
        body = json.loads(await request.read() or b"{}")
        count = body.get("count", 1) if isinstance(body, dict) else None
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 100_000:
            raise ValueError("count must be an integer from 1 to 100000")
    except ValueError as exc:
        return _json({"error": str(exc)}, 400)
    ids = [sim.sessions.create(env_id, sim.now()).id for _ in range(count)]
    return _json({"ids": ids}, 201)


async def _sessions(request: web.Request) -> web.Response:
    """Every session with its status and the tool results its worker sent back; no credentials."""
    sim = request.app[SIMULATOR]
    return _json({"data": [_session_summary(sim, s) for s in sim.sessions.all()]})


def _session_summary(sim: Simulator, session: Session) -> dict[str, Any]:
    return {
        "id": session.id,
        "environment_id": session.environment_id,
        "status": session.status,
        "events": len(session.events),
        "open_streams": sim.open_streams(session.id),
        "tool_results": [
            {"tool_use_id": r.get("tool_use_id"), "is_error": r.get("is_error"), "content": r.get("content")}
            for r in session.tool_results
        ],
    }


def create_simulator_app(config: SimulatorConfig) -> web.Application:
    app = web.Application(middlewares=MIDDLEWARES)
    app[SIMULATOR] = Simulator(config)
    api = Api()
    env = "/v1/environments/{env}"
    work = env + "/work/{work}"
    session = "/v1/sessions/{session}"
    skill = "/v1/skills/{skill}/versions/{version}"
    store = "/v1/memory_stores/{store}/memories"
    # (method, path, handler, name): the name picks the route's `Endpoint` (the part before a dot).
    # Fixed paths first: aiohttp matches routes in the order they were added.
    routes = (
        ("GET", env, api.environment, "environment"),
        ("GET", env + "/work/poll", api.poll, "poll"),
        ("GET", env + "/work/stats", api.stats, "stats"),
        ("GET", env + "/work", api.list, "list"),
        ("GET", work, api.retrieve, "retrieve"),
        ("POST", work + "/ack", api.ack, "ack"),
        ("POST", work + "/heartbeat", api.heartbeat, "heartbeat"),
        ("POST", work + "/stop", api.stop, "stop"),
        ("POST", work, api.update, "update"),
        ("GET", session, api.session, "session"),
        ("GET", session + "/events/stream", api.stream, "stream"),
        ("GET", session + "/events", api.events, "events"),
        ("POST", session + "/events", api.send_events, "send_events"),
        ("GET", skill, api.skill_version, "skill_version"),
        ("GET", skill + "/content", api.skill_content, "skill_content"),
        ("GET", store, api.memories, "memories.list"),
        ("POST", store, api.memories, "memories.create"),
        ("GET", store + "/{memory}", api.memories, "memories.retrieve"),
        ("POST", store + "/{memory}", api.memories, "memories.update"),
        ("DELETE", store + "/{memory}", api.memories, "memories.delete"),
    )
    for method, path, handler, name in routes:
        assert name.partition(".")[0] in ENDPOINT, name
        app.router.add_route(method, path, handler, name=name)
    app.router.add_get("/_sim/stats", _sim_stats)
    app.router.add_get("/_sim/faults", _get_faults)
    app.router.add_post("/_sim/faults", _set_faults)
    app.router.add_post("/_sim/environments/{env}/work", _enqueue)
    app.router.add_get("/_sim/environments/{env}/work", _items)
    app.router.add_get("/_sim/sessions", _sessions)
    app.router.add_post("/_sim/environments/{env}/sessions", _create_sessions)
    # Last: anything else under /v1 gets the API's error envelope, not aiohttp's text.
    app.router.add_route("*", "/v1/{tail:.*}", api.unknown, name="unknown")
    return app
