"""The worker-facing handler: every request on the proxy port comes through `handle`.

The request path, in order:
  parse_target → is_allowed → classify → decide_credential [→ SessionDiscovery] → request_headers
  → [heartbeat] parse_heartbeat_query → HeartbeatService → buffered response
  → [anything else] stream the body up, stream the answer back (learning
    session links from work items and sessions on the way).
Every refusal raises a `RequestRefused` before the upstream is called.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web

from .access_log import EXCHANGE, Exchange
from .credentials import Discover, Inject, decide_credential, token_in_forwarded_request
from .discovery import SessionDiscovery
from .errors import (
    AuthenticationFailed,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PermissionDenied,
    RequestRefused,
    RequestTooLarge,
    UpstreamError,
)
from .headers import request_headers, response_headers
from .heartbeat_answer import read_answer
from .heartbeat_query import apply_desired_ttl, parse_heartbeat_query
from .heartbeats import HeartbeatCall, HeartbeatService, upstream_credential
from .links import MAX_LEARNED_BODY_BYTES, Links, decoded, links_in_answer, teaches_links, token_in_answer
from .metrics import GatewayMetrics
from .routing import Route, RouteName, Target, classify, is_allowed, parse_target, upstream_pool
from .settings import LiveSettings, PoolName, Settings
from .upstream import CHUNK_SIZE, BufferedResponse, Upstream, UpstreamRequest, UpstreamResponse

__all__ = ["PROXY", "ProxyContext", "handle"]

log = logging.getLogger("gateway.proxy")

# Stands in for the credential a discovery will choose, while the request is checked.
_CREDENTIAL_REPLACED = Inject("authorization", "")
# What the API uses; TRACE and CONNECT are refused.
FORWARDED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class ProxyContext:
    live: LiveSettings
    upstream: Upstream
    heartbeats: HeartbeatService
    metrics: GatewayMetrics
    # Which environment each session, skill and memory store belongs to, as answers showed.
    links: Links
    discovery: SessionDiscovery

    @property
    def settings(self) -> Settings:
        """The settings in force now (a reload swaps them between requests)."""
        return self.live.current


PROXY = web.AppKey("proxy", ProxyContext)


async def handle(request: web.Request) -> web.StreamResponse:
    ctx = request.app[PROXY]
    settings = ctx.settings
    exchange = request[EXCHANGE]
    target = parse_target(request.raw_path)
    if not is_allowed(target, settings.routes.allow_prefixes):
        raise NotFound(f"the gateway does not forward {target.decoded_path}")
    if request.method not in FORWARDED_METHODS:
        # TRACE would echo the injected key back to the client; CONNECT tunnels.
        raise MethodNotAllowed(f"the gateway does not forward {request.method} requests")
    route = classify(request.method, target)
    _describe(exchange, route, settings)
    ctx.metrics.request_started(exchange.route)
    exchange.counted_inflight = True
    incoming = _incoming_headers(request)
    authorization, api_key = _single_header(request, "Authorization"), _single_header(request, "x-api-key")
    credential = decide_credential(
        settings, route, authorization=authorization, api_key=api_key, links=ctx.links.environments
    )
    limit = settings.limits.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLarge(f"the request body is larger than the gateway's limit of {limit} bytes")
    # Every refusal of the gateway's own comes before a discovery asks the upstream anything.
    replaced = _CREDENTIAL_REPLACED if isinstance(credential, Discover) else credential
    headers = tuple(request_headers(incoming, credential=replaced, settings=settings.headers))
    if token_in_forwarded_request(headers, target.raw, settings.clients.tokens):
        raise AuthenticationFailed(
            "a gateway client token may be sent only as Authorization: Bearer <token> or x-api-key: <token>"
        )
    if isinstance(credential, Discover):
        await ctx.discovery.environment_of(credential.session_id, credential.candidates, settings.headers)
        # Decided again on what the lookup learned, with the settings in force now (a reload may have come).
        settings = ctx.settings
        credential = decide_credential(
            settings, route, authorization=authorization, api_key=api_key, links=ctx.links.environments
        )
        if isinstance(credential, Discover):
            credential = _fallback(credential)
        headers = tuple(request_headers(incoming, credential=credential, settings=settings.headers))
    if isinstance(credential, Inject):
        ctx.metrics.credential_injected(exchange.route, credential.kind)
    vouched = isinstance(credential, Inject) or _vouched_for(ctx, route, headers)
    if route.name is RouteName.HEARTBEAT:
        return await _heartbeat(request, ctx, route, target, headers, vouched=vouched)
    if route.name is RouteName.STOP and route.environment_id is not None and route.work_id is not None:
        # Whatever the gateway knew of this lease may be about to change.
        ctx.heartbeats.stop_seen(route.environment_id, route.work_id)
    pool = upstream_pool(route, target, vouched=vouched)
    return await _pass_through(request, ctx, route, target, headers, pool)


def _vouched_for(ctx: ProxyContext, route: Route, headers: tuple[tuple[str, str], ...]) -> bool:
    """A credential passed through is vouched for on a work item if the API issued it for that
    item (seen in a poll's answer), or last accepted it on the item's lease."""
    if route.environment_id is None or route.work_id is None:
        return False
    credential = upstream_credential(headers)
    bearer = next((v[7:] for v in credential if v[:7].lower() == "bearer "), None)
    return ctx.links.vouches(route.environment_id, route.work_id, bearer) or ctx.heartbeats.holds(
        route.environment_id, route.work_id, credential
    )


def _fallback(decision: Discover) -> Inject:
    """The API could not tell the session's environment: the configured fallback, or the decision's 403."""
    if isinstance(decision.fallback, PermissionDenied):
        raise decision.fallback
    return decision.fallback


def _describe(exchange: Exchange, route: Route, settings: Settings) -> None:
    exchange.route = route.name.value
    exchange.path_template = route.template
    exchange.work_id = route.work_id
    if route.environment_id is not None:
        env = settings.environment(route.environment_id)
        exchange.environment = env.label if env is not None else "other"


def _incoming_headers(request: web.Request) -> list[tuple[str, str]]:
    pairs = list(request.headers.items())
    # RFC 9110 §5.5: field values are ASCII in practice; anything else is
    # refused rather than re-encoded on the way upstream.
    if any(not value.isascii() for _, value in pairs):
        raise InvalidRequest("header values must be ASCII")
    return pairs


def _single_header(request: web.Request, name: str) -> str | None:
    values = request.headers.getall(name, [])
    if len(values) > 1:
        raise InvalidRequest(f"the {name} header may be given only once")
    return values[0] if values else None


async def _heartbeat(
    request: web.Request,
    ctx: ProxyContext,
    route: Route,
    target: Target,
    headers: tuple[tuple[str, str], ...],
    *,
    vouched: bool,
) -> web.StreamResponse:
    assert route.environment_id is not None
    assert route.work_id is not None
    query = parse_heartbeat_query(target.raw_query)
    body = await _read_body(request, ctx.settings.limits.max_body_bytes) if request.can_read_body else None
    # The body is sent as the bytes read; aiohttp frames it with their length.
    headers = tuple((k, v) for k, v in headers if k.lower() != "content-length")
    ttl, override = ctx.settings.desired_ttl(route.environment_id)
    raw_query = apply_desired_ttl(target.raw_query, query, ttl, override=override)
    call = HeartbeatCall(
        environment_id=route.environment_id,
        work_id=route.work_id,
        query=query,
        request=UpstreamRequest("POST", target.with_query(raw_query), headers, body, route=RouteName.HEARTBEAT.value),
        vouched=vouched,
    )
    result = await ctx.heartbeats.heartbeat(call)
    exchange = request[EXCHANGE]
    exchange.heartbeat_outcome = result.outcome
    if result.outcome in ("forwarded", "joined"):
        # Only these answers came from an upstream call made for this request.
        _note_upstream(exchange, result.response.status, result.response.headers)
    answer = read_answer(result.response.status, result.response.body)
    ctx.metrics.heartbeat_answered(route.environment_id, result.outcome, answer.lost_reason)
    response = _buffered_response(result.response)
    # Written here rather than by aiohttp after return, so a worker that is
    # gone by now is noticed: its answer can then go to its retry instead.
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        ctx.heartbeats.unwritten(result)
        exchange.error = "client_disconnected"
    except asyncio.CancelledError:
        ctx.heartbeats.unwritten(result)
        raise
    return response


async def _pass_through(
    request: web.Request,
    ctx: ProxyContext,
    route: Route,
    target: Target,
    headers: tuple[tuple[str, str], ...],
    pool: PoolName,
) -> web.StreamResponse:
    meter = _BodyMeter(ctx.settings.limits.max_body_bytes)
    body = meter.stream(request) if request.can_read_body else None
    exchange = request[EXCHANGE]
    try:
        outbound = UpstreamRequest(request.method, target.raw, headers, body, route=exchange.route, pool=pool)
        async with ctx.upstream.exchange(outbound) as upstream:
            _note_upstream(exchange, upstream.status, upstream.headers)
            chunks = upstream.chunks()
            if upstream.status == 200 and teaches_links(request.method, route):
                encoding = next((v for k, v in upstream.headers if k.lower() == "content-encoding"), None)
                chunks = _learning(chunks, lambda body: _learn(ctx, route, decoded(body, encoding)))
            return await _stream_back(request, upstream, chunks, exchange)
    except UpstreamError:
        if meter.refusal is not None:
            # The upstream saw a cut-off body, which it cannot have applied.
            raise meter.refusal from None
        raise


def _learn(ctx: ProxyContext, route: Route, body: bytes | None) -> None:
    if body is None:
        return
    served = {env.id for env in ctx.settings.environments}
    for link in links_in_answer(route, body, served):
        ctx.links.learn(link)
    issued = token_in_answer(route, body, served)
    if issued is not None:
        ctx.links.learn_token(issued)


async def _learning(chunks: AsyncIterator[bytes], learn: Callable[[bytes], None]) -> AsyncIterator[bytes]:
    """The body as it arrives, except that a small one is held until it is whole and learned from.

    Learned before the worker sees the answer: its next request (a session
    call right after a poll) must find the link already there.
    """
    held: list[bytes] | None = []
    size = 0
    async for chunk in chunks:
        if held is None:
            yield chunk
            continue
        held.append(chunk)
        size += len(chunk)
        if size > MAX_LEARNED_BODY_BYTES:
            # Not a work item or session: pass it on unread.
            for piece in held:
                yield piece
            held = None
    if held is not None:
        learn(b"".join(held))
        for piece in held:
            yield piece


async def _stream_back(
    request: web.Request, upstream: UpstreamResponse, chunks: AsyncIterator[bytes], exchange: Exchange
) -> web.StreamResponse:
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    for name, value in response_headers(upstream.headers):
        response.headers.add(name, value)
    await response.prepare(request)
    try:
        async for chunk in chunks:
            # Each chunk goes out as it arrives: SSE events are not held back.
            await response.write(chunk)
    except UpstreamError as exc:
        # The status line has gone out; the only honest signal left is to cut
        # the connection so the client sees a truncated body, not a clean end.
        exchange.error = f"{exc.kind}_mid_stream"
        log.warning("upstream stream broke after the response started: %s", exc.message)
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response


def _note_upstream(exchange: Exchange, status: int, headers: tuple[tuple[str, str], ...]) -> None:
    exchange.upstream_status = status
    exchange.request_id = next((v for k, v in headers if k.lower() == "request-id"), None)


def _buffered_response(answer: BufferedResponse) -> web.Response:
    response = web.Response(status=answer.status, reason=answer.reason or None, body=answer.body)
    for name, value in response_headers(answer.headers):
        # The body is re-framed here; aiohttp sets Content-Length for it.
        if name.lower() != "content-length":
            response.headers.add(name, value)
    return response


async def _read_body(request: web.Request, limit: int) -> bytes:
    body = bytearray()
    async for chunk in _BodyMeter(limit).stream(request):
        body += chunk
    return bytes(body)


class _BodyMeter:
    """Streams a request body, refusing it once it passes `limit` bytes.

    A chunked upload has no Content-Length to check up front; it is streamed
    and cut off at the limit. aiohttp wraps errors raised from a request body,
    so `refusal` tells the handler afterwards why the upstream call failed.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.refusal: RequestRefused | None = None

    def refuse(self, refusal: RequestRefused) -> RequestRefused:
        self.refusal = refusal
        return refusal

    async def stream(self, request: web.Request) -> AsyncIterator[bytes]:
        total = 0
        while chunk := await request.content.read(CHUNK_SIZE):
            total += len(chunk)
            if total > self.limit:
                raise self.refuse(
                    RequestTooLarge(f"the request body is larger than the gateway's limit of {self.limit} bytes")
                )
            yield chunk
        declared = request.content_length
        if declared is not None and total != declared:
            # Never let the upstream wait for bytes that will not come: it would
            # read the next request on that connection as the rest of this body.
            raise self.refuse(InvalidRequest("the request body does not match its Content-Length"))
