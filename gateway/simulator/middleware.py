"""The simulated API's cross-cutting steps, one middleware each, outermost first.

- `envelope`: gives every /v1 request its `request-id`, renders a raised
  `SimError` as the API's error JSON (with `retry-after` on a 429), adds
  the injected latency, counts the answer by endpoint and status, and
  (with `compress`) gzips it for clients that accept it.
- `inject_faults`: a reset before or after the request takes effect, a 500
  or a 429, as `gateway.simulator.faults` decides, whatever the credential.
- `authenticate`: lets lapsed leases go, then checks the credential against
  the route's resource (`gateway.simulator.auth`) and records its kind.
- `require_beta`: the `anthropic-beta` value the route needs.

Handlers only parse, act on the pure state and raise `SimError`; the
simulator-only `/_sim/...` routes have no `Endpoint` and skip all of this.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from .auth import Endpoint, Presented
from .control_plane import SimError
from .state import ENDPOINT, REQUEST_ID, SIMULATOR, fingerprint

__all__ = ["MIDDLEWARES", "json_response"]


def json_response(request: web.Request, data: Any, status: int = 200) -> web.Response:
    """A JSON answer carrying the request's `request-id`."""
    request_id = request.get(REQUEST_ID)
    headers = {"request-id": request_id} if request_id else None
    return web.Response(status=status, text=json.dumps(data), content_type="application/json", headers=headers)


def _endpoint(request: web.Request) -> Endpoint | None:
    return ENDPOINT.get((request.match_info.route.name or "").partition(".")[0])


@web.middleware
async def envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    endpoint = _endpoint(request)
    if endpoint is None:
        return await handler(request)
    sim = request.app[SIMULATOR]
    request[REQUEST_ID] = sim.next_request_id()
    faults = sim.faults
    delay = faults.latency_seconds if faults.applies_to(endpoint.name) else 0.0
    if endpoint.streams and delay:
        await asyncio.sleep(delay)  # a stream's answer starts late; its events are not held back
    try:
        response = await handler(request)
    except SimError as exc:
        response = json_response(request, exc.body(request[REQUEST_ID]), exc.status)
        if exc.status == 429:
            response.headers["retry-after"] = str(faults.retry_after_seconds)
    if delay and not endpoint.streams:
        # After the request took effect: a slow answer to something that landed.
        await asyncio.sleep(delay)
    if not (endpoint.streams and response.prepared):  # an open stream counted itself
        sim.requests[endpoint.name][str(response.status)] += 1
        if sim.config.compress and isinstance(response, web.Response):
            response.enable_compression()  # gzip or deflate, as the client accepts
    return response


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    endpoint = _endpoint(request)
    if endpoint is None:
        return await handler(request)
    sim = request.app[SIMULATOR]
    presented = _presented(request)
    for credential in presented.values():
        sim.fingerprints.add(fingerprint(credential))
    # Leases lapse before anything looks at an item; a re-queued one may be what a long poll waits for.
    if sim.plane.expire(sim.now()):
        sim.notify()
    try:
        kind = sim.authority.check(endpoint, presented, request.match_info)
    except SimError as exc:
        if exc.status in (401, 403):
            sim.credentials["rejected"] += 1
            sim.credentials_by_endpoint[endpoint.name]["rejected"] += 1
        raise
    if kind is not None:
        sim.credentials[kind] += 1
        sim.credentials_by_endpoint[endpoint.name][kind] += 1
    return await handler(request)


def _presented(request: web.Request) -> Presented:
    scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
    return Presented(bearer.strip() if scheme.lower() == "bearer" else None, request.headers.get("x-api-key"))


@web.middleware
async def require_beta(request: web.Request, handler: Handler) -> web.StreamResponse:
    endpoint = _endpoint(request)
    if endpoint is not None and endpoint.beta is not None:
        betas = {b.strip() for v in request.headers.getall("anthropic-beta", []) for b in v.split(",")}
        if endpoint.beta not in betas:
            # ASSUMPTION: the real API's answer to a missing beta is not documented.
            message = f"this endpoint requires the anthropic-beta header {endpoint.beta}"
            raise SimError(400, "invalid_request_error", message)
    return await handler(request)


@web.middleware
async def inject_faults(request: web.Request, handler: Handler) -> web.StreamResponse:
    endpoint = _endpoint(request)
    if endpoint is None or endpoint.resource == "none":
        return await handler(request)
    sim = request.app[SIMULATOR]
    faults = sim.faults
    decision = faults.decide(endpoint.name, sim.rng)
    if decision != "none":
        sim.faults_injected[decision] += 1
    if decision == "reset" and (endpoint.streams or not faults.reset_after_apply):
        _reset(request, endpoint)
    if decision == "error":
        raise SimError(500, "api_error", "simulated internal error")
    if decision == "rate_limit":
        raise SimError(429, "rate_limit_error", "simulated rate limit")
    response = await handler(request)
    if decision == "reset":
        _reset(request, endpoint)
    if endpoint.name == "stop":
        sim.notify()  # a stopped item may leave the queue; nothing else a request does adds to it
    return response


def _reset(request: web.Request, endpoint: Endpoint) -> None:
    request.app[SIMULATOR].requests[endpoint.name]["reset"] += 1
    if request.transport is not None:
        request.transport.abort()
    raise asyncio.CancelledError  # nothing more is written on an aborted connection


# Faults come before auth: an overloaded or broken API fails a request whatever its credential.
MIDDLEWARES = (envelope, inject_faults, authenticate, require_beta)
