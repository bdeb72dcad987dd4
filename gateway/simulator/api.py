"""The /v1 handlers: each parses its request, acts on the pure state and answers, or raises `SimError`.

Auth, the beta check, faults, request ids and statistics happen around them
(`gateway.simulator.middleware`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from aiohttp import web

from .control_plane import SimError, rfc3339
from .middleware import json_response
from .sessions import DEFAULT_EVENTS_LIMIT, MAX_EVENTS_LIMIT, MAX_MEMORIES_LIMIT
from .state import REQUEST_ID, SIMULATOR

__all__ = ["Api"]

# [DOC] poll's block_ms is 1-999; list's limit is 1-1000 (environments-api.md §2.2).
MAX_BLOCK_MS = 999
MAX_LIST_LIMIT = 1000
# A comment line on an idle event stream, so proxies and clients see it is alive.
PING_SECONDS = 15.0


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


async def _json_body(request: web.Request, message: str) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw) if raw.strip() else {}
    except ValueError:
        raise _bad(message) from None


class Api:
    """The handlers of one simulator; `gateway.simulator.app` routes to them."""

    # -- environments and work ------------------------------------------------------------

    async def environment(self, request: web.Request) -> web.StreamResponse:
        sim = request.app[SIMULATOR]
        env_id = request.match_info["env"]
        return json_response(
            request,
            {
                "type": "environment",
                "id": env_id,
                "name": env_id,
                "description": None,
                "config": {"type": "self_hosted"},
                "metadata": {},
                "created_at": rfc3339(sim.started_at),
                "updated_at": rfc3339(sim.started_at),
                "archived_at": None,
            },
        )

    async def poll(self, request: web.Request) -> web.StreamResponse:
        sim = request.app[SIMULATOR]
        env_id = request.match_info["env"]
        block_ms = _int_param(request, "block_ms", 1, MAX_BLOCK_MS)
        reclaim = _int_param(request, "reclaim_older_than_ms", 0)
        worker_id = request.headers.get("Anthropic-Worker-ID")
        if worker_id:
            sim.worker_ids.add(worker_id)
        result = sim.plane.poll(env_id, sim.now(), worker_id=worker_id, reclaim_older_than_ms=reclaim)
        if block_ms:
            deadline = time.monotonic() + block_ms / 1000
            while result is None and (left := deadline - time.monotonic()) > 0:
                # Woken by any change to the queue; now and then regardless, for reclaims that time alone allows.
                await sim.wait_for_change(min(left, 0.25))
                result = sim.plane.poll(env_id, sim.now(), worker_id=worker_id, reclaim_older_than_ms=reclaim)
        # [SDK] an empty queue is 200 with a JSON null (a 204 breaks the Python worker).
        return json_response(request, result)

    async def ack(self, request: web.Request) -> web.StreamResponse:
        sim = request.app[SIMULATOR]
        env_id, work_id = request.match_info["env"], request.match_info["work"]
        return json_response(request, sim.plane.ack(env_id, work_id, sim.now()))

    async def heartbeat(self, request: web.Request) -> web.StreamResponse:
        sim = request.app[SIMULATOR]
        env_id, work_id = request.match_info["env"], request.match_info["work"]
        ttl = _int_param(request, "desired_ttl_seconds", 1)
        expected_values = request.query.getall("expected_last_heartbeat", [])
        if len(expected_values) > 1 or (expected_values and not expected_values[0]):
            raise _bad("expected_last_heartbeat must be given once and not be empty")
        expected = expected_values[0] if expected_values else None
        answer = sim.plane.heartbeat(env_id, work_id, sim.now(), expected=expected, desired_ttl=ttl)
        return json_response(request, answer)

    async def stop(self, request: web.Request) -> web.StreamResponse:
        sim = request.app[SIMULATOR]
        env_id, work_id = request.match_info["env"], request.match_info["work"]
        body = await _json_body(request, 'the body must be {"force": true|false}')
        if not isinstance(body, dict) or not isinstance(body.get("force", False), bool):
            raise _bad('the body must be {"force": true|false}')
        force = bool(body.get("force", False))
        return json_response(request, sim.plane.stop(env_id, work_id, sim.now(), force=force))

    async def update(self, request: web.Request) -> web.StreamResponse:
        sim = request.app[SIMULATOR]
        env_id, work_id = request.match_info["env"], request.match_info["work"]
        message = 'the body must be {"metadata": {"key": "value" or null}}'
        body = await _json_body(request, message)
        metadata = body.get("metadata") if isinstance(body, dict) else None
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in metadata.items()
        ):
            raise _bad(message)
        return json_response(request, sim.plane.update(env_id, work_id, sim.now(), metadata))

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        sim = request.app[SIMULATOR]
        env_id, work_id = request.match_info["env"], request.match_info["work"]
        return json_response(request, sim.plane.retrieve(env_id, work_id, sim.now()))

    async def list(self, request: web.Request) -> web.StreamResponse:
        sim = request.app[SIMULATOR]
        env_id = request.match_info["env"]
        limit = _int_param(request, "limit", 1, MAX_LIST_LIMIT) or 20
        page = request.query.get("page")
        return json_response(request, sim.plane.list_items(env_id, sim.now(), limit=limit, page=page))

    async def stats(self, request: web.Request) -> web.StreamResponse:
        sim = request.app[SIMULATOR]
        return json_response(request, sim.plane.stats(request.match_info["env"], sim.now()))

    async def unknown(self, request: web.Request) -> web.StreamResponse:
        raise SimError(404, "not_found_error", f"{request.method} {request.path} is not part of the simulated API")

    # -- sessions -----------------------------------------------------------------------

    async def session(self, request: web.Request) -> web.StreamResponse:
        sim = request.app[SIMULATOR]
        session = sim.sessions.get(request.match_info["session"])
        return json_response(request, sim.sessions.retrieve(session))

    async def events(self, request: web.Request) -> web.StreamResponse:
        sim = request.app[SIMULATOR]
        session = sim.sessions.get(request.match_info["session"])
        limit = _int_param(request, "limit", 1, MAX_EVENTS_LIMIT) or DEFAULT_EVENTS_LIMIT
        page = request.query.get("page")
        return json_response(request, sim.sessions.list_events(session, limit=limit, page=page))

    async def send_events(self, request: web.Request) -> web.StreamResponse:
        sim = request.app[SIMULATOR]
        session = sim.sessions.get(request.match_info["session"])
        body = await _json_body(request, 'the body must be {"events": [...]}')
        events = body.get("events") if isinstance(body, dict) else None
        answer, appended = sim.sessions.send(session, events, sim.now())
        sim.publish(session.id, appended)
        return json_response(request, answer)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events appended after the stream opened; the history is for `events` to tell."""
        sim = request.app[SIMULATOR]
        session = sim.sessions.get(request.match_info["session"])
        queue = sim.subscribe(session.id)
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "request-id": request[REQUEST_ID]}
        response = web.StreamResponse(headers=headers)
        try:
            await response.prepare(request)
            # Counted as it opens: a stream's answer lasts as long as its session.
            sim.requests["stream"]["200"] += 1
            while session.status != "terminated" or not queue.empty():
                try:
                    async with asyncio.timeout(PING_SECONDS):
                        event = await queue.get()
                except TimeoutError:
                    await response.write(b'event: ping\ndata: {"type": "ping"}\n\n')
                    continue
                # [SDK] both SDKs drop a frame without an `event:` line.
                await response.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
        except ConnectionError:
            pass  # the client went away
        finally:
            sim.unsubscribe(session.id, queue)
        return response

    # -- skills ---------------------------------------------------------------------------

    async def skill_version(self, request: web.Request) -> web.StreamResponse:
        sim = request.app[SIMULATOR]
        version = sim.sessions.skill_version(request.match_info["skill"], request.match_info["version"])
        return json_response(request, version.to_json())

    async def skill_content(self, request: web.Request) -> web.StreamResponse:
        sim = request.app[SIMULATOR]
        version = sim.sessions.skill_version(request.match_info["skill"], request.match_info["version"])
        return web.Response(
            body=version.content, content_type="application/zip", headers={"request-id": request[REQUEST_ID]}
        )

    # -- memory stores ----------------------------------------------------------------------

    async def memories(self, request: web.Request) -> web.StreamResponse:
        sim = request.app[SIMULATOR]
        store = request.match_info["store"]
        memory_id = request.match_info.get("memory")
        sessions, now = sim.sessions, sim.now()
        if memory_id is None and request.method == "GET":
            view = request.query.get("view", "basic")
            if view not in ("basic", "full"):
                raise _bad("view must be basic or full")
            limit = _int_param(request, "limit", 1, MAX_MEMORIES_LIMIT) or 20
            prefix = request.query.get("path_prefix", "")
            page = request.query.get("page")
            listing = sessions.list_memories(store, view=view, limit=limit, page=page, prefix=prefix)
            return json_response(request, listing)
        if memory_id is None and request.method == "POST":
            body = await _json_body(request, "the body must be a JSON object")
            return json_response(request, sessions.create_memory(store, body, now))
        assert memory_id is not None
        if request.method == "GET":
            return json_response(request, sessions.retrieve_memory(store, memory_id))
        if request.method == "POST":
            body = await _json_body(request, "the body must be a JSON object")
            return json_response(request, sessions.update_memory(store, memory_id, body, now))
        expected = request.query.get("expected_content_sha256")
        return json_response(request, sessions.delete_memory(store, memory_id, expected))
