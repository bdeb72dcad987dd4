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
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from gateway.config.settings import LiveSettings, PoolName, Settings
from gateway.errors import (
    AuthenticationFailed,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PermissionDenied,
    RequestRefused,
    RequestTimedOut,
    RequestTooLarge,
    UpstreamError,
)
from gateway.heartbeat.driver import HeartbeatCall, HeartbeatService, upstream_credential
from gateway.heartbeat.query import apply_desired_ttl, parse_heartbeat_query
from gateway.heartbeat.wire import Outcome
from gateway.observability.access_log import EXCHANGE, Exchange
from gateway.observability.metrics import GatewayMetrics
from gateway.policy.credential_text import bearer_value
from gateway.policy.credentials import Discover, Inject, RetiredTokens, decide_credential, token_in_forwarded_request
from gateway.policy.headers import request_headers, response_headers
from gateway.policy.links import MAX_LEARNED_BODY_BYTES, Links, decoded, links_in_answer, teaches_links, token_in_answer
from gateway.policy.plan import CurrentPolicy, Policy
from gateway.policy.redaction import Redactor
from gateway.policy.routing import (
    Route,
    RouteName,
    Target,
    classify,
    is_allowed,
    parse_target,
    upstream_pool,
    with_param,
)
from gateway.upstream.client import CHUNK_SIZE, BufferedResponse, Upstream, UpstreamRequest, UpstreamResponse
from gateway.upstream.discovery import SessionDiscovery

from .overload import Governor, PollHold, Shed
from .polls import PollAdmission, block_seconds

__all__ = ["INFLIGHT", "PROXY", "InFlight", "ProxyContext", "handle"]

log = logging.getLogger("gateway.proxy")

# A shed request's retry-after: long enough for the replica to recover, or for the retry to land elsewhere.
# The SDKs' clients honour it (up to 60 s) before each of their two retries, so a shed poll costs a
# worker's poller 10 s or more: what lets a fleet far past a replica's capacity fall away.
SHED_RETRY_AFTER_SECONDS = 5
# A heartbeat's body, if it has one at all (the API reads its parameters from the query).
MAX_HEARTBEAT_BODY_BYTES = 4096
# Stands in for the credential a discovery will choose, while the request is checked.
_CREDENTIAL_REPLACED = Inject("authorization", "")
# What the API uses; TRACE and CONNECT are refused.
FORWARDED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class ProxyContext:
    live: LiveSettings
    # The settings in force, as the request path asks them (`gateway.policy.plan`).
    policy: CurrentPolicy
    upstream: Upstream
    heartbeats: HeartbeatService
    metrics: GatewayMetrics
    # Which environment each session, skill and memory store belongs to, as answers showed.
    links: Links
    discovery: SessionDiscovery
    # Client tokens a reload removed: refused, never passed on.
    retired: RetiredTokens
    polls: PollAdmission
    overload: Governor
    held_polls: PollHold

    @property
    def settings(self) -> Settings:
        """The settings in force now (a reload swaps them between requests)."""
        return self.live.current


PROXY = web.AppKey("proxy", ProxyContext)


class InFlight:
    """Requests being handled on the worker-facing port, so a drain knows when it is done."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def started(self) -> None:
        self.count += 1
        self._idle.clear()

    def finished(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()


INFLIGHT = web.AppKey("inflight", InFlight)


@dataclass(slots=True)
class _Forward:
    """A worker's request once the policy has spoken: what it is, where it goes, with which headers."""

    request: web.Request
    ctx: ProxyContext
    # The settings it was decided under.
    policy: Policy
    route: Route
    target: Target
    headers: tuple[tuple[str, str], ...]
    # The credential is the gateway's own (injected), or one it vouches for on this work item.
    injected: bool
    vouched: bool

    @property
    def pool(self) -> PoolName:
        return upstream_pool(self.route, self.target, vouched=self.vouched)


async def handle(request: web.Request) -> web.StreamResponse:
    """The one worker-facing handler: the policy decides, then the route's own path forwards."""
    ctx = request.app[PROXY]
    decided = await _decide(request, ctx)
    if isinstance(decided, web.StreamResponse):
        return decided
    route = decided.route
    if route.name is RouteName.HEARTBEAT:
        return await _heartbeat(decided)
    if route.name is RouteName.STOP and route.environment_id is not None and route.work_id is not None:
        # Whatever the gateway knew of this lease may be about to change.
        ctx.heartbeats.stop_seen(route.environment_id, route.work_id)
    if route.name is RouteName.POLL and route.environment_id is not None:
        return await _poll(decided, route.environment_id)
    return await _pass_through(decided)


def _admitted(request: web.Request, ctx: ProxyContext, policy: Policy) -> tuple[Target, Route]:
    """The request's target and route, if the gateway forwards it at all; counted from here on."""
    exchange = request[EXCHANGE]
    target = parse_target(request.raw_path)
    if not is_allowed(target, policy.settings.routes.allow_prefixes):
        raise NotFound(f"the gateway does not forward {target.decoded_path}")
    if request.method not in FORWARDED_METHODS:
        # TRACE would echo the injected key back to the client; CONNECT tunnels.
        raise MethodNotAllowed(f"the gateway does not forward {request.method} requests")
    route = classify(request.method, target)
    _describe(exchange, route, policy)
    ctx.metrics.request_started(exchange.route)
    exchange.counted_inflight = True
    return target, route


async def _decide(request: web.Request, ctx: ProxyContext) -> _Forward | web.StreamResponse:
    """Route, allow-list, credential, headers and overload, in that order: a `_Forward`, or the answer."""
    policy = ctx.policy.current
    target, route = _admitted(request, ctx, policy)
    exchange = request[EXCHANGE]
    settings = policy.settings
    incoming = _incoming_headers(request)
    authorization, api_key = _single_header(request, "Authorization"), _single_header(request, "x-api-key")
    retired = functools.partial(_is_retired, ctx.retired, time.monotonic())
    credential = decide_credential(
        policy, route, authorization=authorization, api_key=api_key, links=ctx.links.environments, retired=retired
    )
    limit = settings.limits.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLarge(f"the request body is larger than the gateway's limit of {limit} bytes")
    # Every refusal of the gateway's own comes before a discovery asks the upstream anything.
    replaced = _CREDENTIAL_REPLACED if isinstance(credential, Discover) else credential
    # A heartbeat's body is sent as the bytes read, framed by their length (`_heartbeat`).
    reframed = route.name is RouteName.HEARTBEAT
    headers = tuple(request_headers(incoming, credential=replaced, settings=settings.headers, reframed=reframed))
    if token_in_forwarded_request(headers, target.raw, policy):
        raise AuthenticationFailed(
            "a gateway client token may be sent only as Authorization: Bearer <token> or x-api-key: <token>"
        )
    if ctx.overload.overloaded:
        # Before anything costs more (a discovery, a body read, an upstream call).
        env = route.environment_id
        upstream_polls = ctx.polls.upstream(env) if route.name is RouteName.POLL and env is not None else 0
        shed = ctx.overload.verdict(
            route.name, injected_poll=isinstance(credential, Inject), polls_upstream=upstream_polls
        )
        if shed is not None:
            return await _shed(ctx, exchange, shed, target)
    if isinstance(credential, Discover):
        await ctx.discovery.environment_of(credential.session_id, credential.candidates, settings.headers)
        # Decided again on what the lookup learned, with the settings in force now (a reload may have come).
        policy = ctx.policy.current
        settings = policy.settings
        credential = decide_credential(
            policy, route, authorization=authorization, api_key=api_key, links=ctx.links.environments, retired=retired
        )
        if isinstance(credential, Discover):
            credential = _fallback(credential)
        headers = tuple(request_headers(incoming, credential=credential, settings=settings.headers, reframed=reframed))
    injected = isinstance(credential, Inject)
    if isinstance(credential, Inject):
        ctx.metrics.credential_injected(exchange.route, credential.kind)
    vouched = injected or _vouched_for(ctx, route, headers)
    return _Forward(request, ctx, policy, route, target, headers, injected=injected, vouched=vouched)


async def _poll(forward: _Forward, environment_id: str) -> web.StreamResponse:
    """A long poll, admitted upstream or held here (`gateway.edge.polls`)."""
    request, ctx, target = forward.request, forward.ctx, forward.target
    exchange = request[EXCHANGE]
    exchange.poll = "forwarded"
    block = block_seconds(target.raw_query)
    if block is None or not forward.injected or request.can_read_body:
        # Not one of the fleet's long polls the slots are for: a poll that does not block (or that the
        # API would refuse), one with a credential the gateway did not inject (it must not take the
        # slots honest workers wait for), or one with a body (which could hold a slot while it trickles).
        return await _pass_through(forward)
    waited = await ctx.polls.admit(environment_id, _single_header(request, "Anthropic-Worker-ID"), block)
    if waited is None:
        exchange.poll = "answered_empty"
        return _empty_queue()
    try:
        if waited > 0:
            left_ms = int((block - waited) * 1000)
            if left_ms < 1:
                exchange.poll = "answered_empty"
                return _empty_queue()
            exchange.poll = "held_then_forwarded"
            # Upstream on the worker's behalf, for the block time it has left.
            target = dataclasses.replace(target, raw_query=with_param(target.raw_query, "block_ms", left_ms))
            forward = dataclasses.replace(forward, target=target)
        return await _pass_through(forward)
    finally:
        ctx.polls.release(environment_id)


async def _shed(ctx: ProxyContext, exchange: Exchange, shed: Shed, target: Target) -> web.Response:
    """The replica is overloaded (`gateway.edge.overload`): a poll finds the queue empty, anything else a 503."""
    ctx.metrics.request_shed(exchange.route, "answered_empty" if shed == "poll" else "refused")
    if shed == "poll":
        exchange.poll = "shed"
        # As an empty queue answers, after a while: a timer, not a connection upstream. Held past its
        # block_ms (half to all of hold_polls_seconds; at once on a drain), an idle worker polls less often.
        await ctx.held_polls.hold(block_seconds(target.raw_query) or 0.0, ctx.settings.overload.hold_polls_seconds)
        return _empty_queue()
    raise Overloaded("the gateway replica is overloaded; retry shortly", retry_after=SHED_RETRY_AFTER_SECONDS)


def _empty_queue() -> web.Response:
    """What the API answers a poll when no work is queued."""
    return web.Response(status=200, body=b"null", content_type="application/json")


def _vouched_for(ctx: ProxyContext, route: Route, headers: tuple[tuple[str, str], ...]) -> bool:
    """A credential passed through is vouched for on a work item if the API issued it for that
    item (seen in a poll's answer), or last accepted it on the item's lease."""
    if route.environment_id is None or route.work_id is None:
        return False
    credential = upstream_credential(headers)
    bearer = next((b for b in map(bearer_value, credential) if b is not None), None)
    return ctx.links.vouches(route.environment_id, route.work_id, bearer) or ctx.heartbeats.holds(
        route.environment_id, route.work_id, credential
    )


def _is_retired(retired: RetiredTokens, now: float, presented: str) -> bool:
    return retired.is_retired(presented, now)


def _fallback(decision: Discover) -> Inject:
    """The API could not tell the session's environment: the configured fallback, or the decision's 403."""
    if isinstance(decision.fallback, PermissionDenied):
        raise decision.fallback
    return decision.fallback


def _describe(exchange: Exchange, route: Route, policy: Policy) -> None:
    exchange.route = route.name.value
    exchange.path_template = route.template
    exchange.work_id = route.work_id
    if route.environment_id is not None:
        served = policy.served(route.environment_id)
        exchange.environment = served.label if served is not None else "other"


def _incoming_headers(request: web.Request) -> list[tuple[str, str]]:
    # RFC 9110 §5.5: field values are ASCII in practice; anything else is
    # refused rather than re-encoded on the way upstream.
    if not "".join(request.headers.values()).isascii():
        raise InvalidRequest("header values must be ASCII")
    return list(request.headers.items())


def _single_header(request: web.Request, name: str) -> str | None:
    values = request.headers.getall(name, [])
    if len(values) > 1:
        raise InvalidRequest(f"the {name} header may be given only once")
    return values[0] if values else None


async def _heartbeat(forward: _Forward) -> web.StreamResponse:
    request, ctx, route, target, headers = forward.request, forward.ctx, forward.route, forward.target, forward.headers
    assert route.environment_id is not None
    assert route.work_id is not None
    query = parse_heartbeat_query(target.raw_query)
    # The API takes a heartbeat's parameters in its query: a body is at most a stray `{}`.
    if request.content_length is not None and request.content_length > MAX_HEARTBEAT_BODY_BYTES:
        raise RequestTooLarge(f"a heartbeat takes no body; at most {MAX_HEARTBEAT_BODY_BYTES} bytes are accepted")
    timeout = forward.policy.settings.limits.body_timeout_seconds
    body = await _read_body(request, MAX_HEARTBEAT_BODY_BYTES, timeout) if request.can_read_body else None
    served = forward.policy.served(route.environment_id)
    assert served is not None  # `decide_credential` refused an environment this gateway does not serve
    raw_query = apply_desired_ttl(target.raw_query, query, served.desired_ttl, override=served.override_ttl)
    exchange = request[EXCHANGE]
    outbound = UpstreamRequest(
        "POST", target.with_query(raw_query), headers, body, route=RouteName.HEARTBEAT.value, trace=exchange.trace
    )
    call = HeartbeatCall(route.environment_id, route.work_id, query, outbound, vouched=forward.vouched)
    try:
        result = await ctx.heartbeats.heartbeat(call)
    except UpstreamError as error:
        if exchange.trace is not None and error.flight is not None:
            exchange.trace.link_to(error.flight)  # the flight that failed it, another worker's or its own
        raise
    exchange.heartbeat_outcome = result.outcome
    if result.outcome in (Outcome.FORWARDED, Outcome.JOINED):
        # Only these answers came from an upstream call made for this request.
        _note_upstream(exchange, result.response.status, result.response.headers)
    ctx.metrics.heartbeat_answered(route.environment_id, result.outcome, result.answer.lost_reason)
    response = _buffered_response(result.response, ctx.live.redactor)
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
    if exchange.trace is not None and result.flight is not None:
        # Coalesced or handed off: the upstream call that answered this beat was made for another (or an
        # earlier) one. After the answer is written: nothing of tracing's stands between a lease and its worker.
        exchange.trace.link_to(result.flight)
    return response


async def _pass_through(forward: _Forward) -> web.StreamResponse:
    request, ctx, route, target = forward.request, forward.ctx, forward.route, forward.target
    limits = forward.policy.settings.limits
    meter = _BodyMeter(limits.max_body_bytes, limits.body_timeout_seconds)
    body = meter.stream(request) if request.can_read_body else None
    exchange = request[EXCHANGE]
    try:
        outbound = UpstreamRequest(
            request.method,
            target.raw,
            forward.headers,
            body,
            route=exchange.route,
            pool=forward.pool,
            trace=exchange.trace,
        )
        async with ctx.upstream.exchange(outbound) as upstream:
            _note_upstream(exchange, upstream.status, upstream.headers)
            chunks = upstream.chunks()
            encoding = next((v for k, v in upstream.headers if k.lower() == "content-encoding"), None)
            if upstream.status >= 400:
                return await _error_back(request, ctx, upstream, chunks, encoding, exchange)
            learn = None
            if upstream.status == 200 and teaches_links(request.method, route):
                served = forward.policy.served_ids
                learn = functools.partial(_learn, ctx, route, served, encoding)
            return await _stream_back(request, ctx, upstream, chunks, exchange, learn)
    except UpstreamError:
        if meter.refusal is not None:
            # The upstream saw a cut-off body, which it cannot have applied.
            raise meter.refusal from None
        raise


def _learn(ctx: ProxyContext, route: Route, served: frozenset[str], encoding: str | None, answer: bytes) -> None:
    """What a work item's or session's answer teaches (`gateway.policy.links`), learned before the
    worker sees it: its next request (a session call right after a poll) must find the link there."""
    body = decoded(answer, encoding)
    if body is None:
        return
    for link in links_in_answer(route, body, served):
        ctx.links.learn(link)
    issued = token_in_answer(route, body, served)
    if issued is not None:
        ctx.links.learn_token(issued)


async def _learning(chunks: AsyncIterator[bytes], learn: Callable[[bytes], None]) -> AsyncIterator[bytes]:
    """A streamed body as it arrives, except that a small one is held until it is whole and learned from."""
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


async def _error_back(
    request: web.Request,
    ctx: ProxyContext,
    upstream: UpstreamResponse,
    chunks: AsyncIterator[bytes],
    encoding: str | None,
    exchange: Exchange,
) -> web.StreamResponse:
    """An upstream error answer, read whole (it is small) and cleared of any secret it echoes."""
    held: list[bytes] = []
    size = 0
    async for chunk in chunks:
        held.append(chunk)
        size += len(chunk)
        if size > MAX_LEARNED_BODY_BYTES:
            # Not an error answer worth reading: passed on as it is.
            return await _stream_back(request, ctx, upstream, _chained(held, chunks), exchange)
    body = b"".join(held)
    plain = decoded(body, encoding)
    redactor = ctx.live.redactor
    drop = {"content-length", "transfer-encoding"} | ({"content-encoding"} if plain is not None else set())
    response = web.Response(
        status=upstream.status, reason=upstream.reason or None, body=redactor.body(plain if plain is not None else body)
    )
    for name, value in redactor.headers(response_headers(upstream.headers)):
        if name.lower() not in drop:
            response.headers.add(name, value)
    return response


async def _chained(head: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in head:
        yield chunk
    async for chunk in rest:
        yield chunk


async def _stream_back(
    request: web.Request,
    ctx: ProxyContext,
    upstream: UpstreamResponse,
    chunks: AsyncIterator[bytes],
    exchange: Exchange,
    learn: Callable[[bytes], None] | None = None,
) -> web.StreamResponse:
    """The answer to the worker: read whole when small (and learned from, with `learn`), else streamed."""
    headers = ctx.live.redactor.headers(response_headers(upstream.headers))
    read: list[bytes] = []
    if _small_and_framed(request, headers):
        # A poll's or a retrieve's answer: read whole, written once, framed by its length.
        try:
            async for chunk in chunks:
                read.append(chunk)
        except UpstreamError as exc:
            # Cut off: the worker must see it cut off too (the API answered and may have acted).
            response = await _started(request, upstream, headers)
            await response.write(b"".join(read))
            return _cut(request, exchange, exc, response)
        body = b"".join(read)
        if learn is not None:
            learn(body)
        whole = web.Response(status=upstream.status, reason=upstream.reason or None)
        for name, value in headers:
            if name.lower() != "content-length":
                whole.headers.add(name, value)
        whole.body = body
        return whole
    if learn is not None:
        chunks = _learning(chunks, learn)
    response = await _started(request, upstream, headers)
    try:
        async for chunk in chunks:
            # Each chunk goes out as it arrives: SSE events are not held back.
            await response.write(chunk)
    except UpstreamError as exc:
        return _cut(request, exchange, exc, response)
    await response.write_eof()
    return response


async def _started(
    request: web.Request, upstream: UpstreamResponse, headers: list[tuple[str, str]]
) -> web.StreamResponse:
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    for name, value in headers:
        response.headers.add(name, value)
    await response.prepare(request)
    return response


def _cut(
    request: web.Request, exchange: Exchange, exc: UpstreamError, response: web.StreamResponse
) -> web.StreamResponse:
    """The status line has gone out; the only honest signal left is to cut the connection,
    so the client sees a truncated body, not a clean end."""
    exchange.error = f"{exc.kind}_mid_stream"
    log.warning("upstream stream broke after the response started: %s", exc.message)
    if request.transport is not None:
        request.transport.close()
    return response


def _small_and_framed(request: web.Request, headers: list[tuple[str, str]]) -> bool:
    """An answer with a small Content-Length that is no event stream: nothing is gained by streaming it."""
    if request.method == "HEAD":
        return False  # its Content-Length describes a body that is not sent
    length = next((v for k, v in headers if k.lower() == "content-length"), None)
    kind = next((v for k, v in headers if k.lower() == "content-type"), "")
    return length is not None and length.isdigit() and int(length) <= CHUNK_SIZE and "event-stream" not in kind.lower()


def _note_upstream(exchange: Exchange, status: int, headers: tuple[tuple[str, str], ...]) -> None:
    exchange.upstream_status = status
    exchange.request_id = next((v for k, v in headers if k.lower() == "request-id"), None)


def _buffered_response(answer: BufferedResponse, redactor: Redactor) -> web.Response:
    response = web.Response(status=answer.status, reason=answer.reason or None, body=redactor.body(answer.body))
    for name, value in redactor.headers(response_headers(answer.headers)):
        # The body is re-framed here; aiohttp sets Content-Length for it.
        if name.lower() != "content-length":
            response.headers.add(name, value)
    return response


async def _read_body(request: web.Request, limit: int, stall_seconds: float) -> bytes:
    body = bytearray()
    async for chunk in _BodyMeter(limit, stall_seconds).stream(request):
        body += chunk
    return bytes(body)


class _BodyMeter:
    """Streams a request body, refusing it once it passes `limit` bytes, stalls or breaks.

    A chunked upload has no Content-Length to check up front; it is streamed
    and cut off at the limit. A body with no new bytes for `timeout` seconds
    is refused with 408, and one the HTTP parser finds malformed or cut off
    with 400, so the upstream exchange it feeds ends at once. aiohttp wraps
    errors raised from a request body, so `refusal` tells the handler
    afterwards why the upstream call failed. (The one place the server
    side's body errors, aiohttp's `RequestPayloadError`, are translated.)
    """

    def __init__(self, limit: int, timeout: float) -> None:
        self.limit = limit
        self.timeout = timeout
        self.refusal: RequestRefused | None = None

    def refuse(self, refusal: RequestRefused) -> RequestRefused:
        self.refusal = refusal
        return refusal

    async def _next(self, request: web.Request) -> bytes:
        try:
            async with asyncio.timeout(self.timeout):
                return await request.content.read(CHUNK_SIZE)
        except TimeoutError:
            raise self.refuse(RequestTimedOut(f"no part of the request body arrived for {self.timeout:g} s")) from None
        except RequestPayloadError:
            raise self.refuse(InvalidRequest("the request body is malformed or was cut off")) from None

    async def stream(self, request: web.Request) -> AsyncIterator[bytes]:
        total = 0
        while chunk := await self._next(request):
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
