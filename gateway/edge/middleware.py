"""The worker-facing app's middlewares; their order is set once, in `gateway.app`.

- `access_log_middleware` (outermost): times the request and logs its `Exchange`.
- `tracing_middleware` (only when `tracing.enabled`): the request's server span, current
  while the request is handled, ended with what its `Exchange` says.
- `error_middleware`: renders `GatewayError`s as the API's JSON error shape;
  anything unexpected becomes a logged 500, never a traceback to the client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.errors import GatewayError, RequestTimedOut, RequestTooLarge, UpstreamError, error_body
from gateway.observability.access_log import EXCHANGE, Exchange, log_exchange

from .proxy import INFLIGHT, PROXY

if TYPE_CHECKING:
    from gateway.observability.tracing import Tracing

__all__ = ["access_log_middleware", "error_middleware", "tracing_middleware"]

log = logging.getLogger("gateway.proxy")

# nginx's status for a client that went away before its response: it never
# reaches a client, it only labels the log line.
CLIENT_CLOSED_REQUEST = 499


@web.middleware
async def access_log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Times every request, then logs it and counts it in the metrics."""
    exchange = Exchange(method=request.method)
    request[EXCHANGE] = exchange
    started = time.monotonic()
    inflight = request.app[INFLIGHT]
    inflight.started()
    try:
        response = await handler(request)
        exchange.status = response.status
        return response
    except asyncio.CancelledError:
        exchange.status = CLIENT_CLOSED_REQUEST
        exchange.error = exchange.error or "client_disconnected"
        raise
    finally:
        inflight.finished()
        seconds = time.monotonic() - started
        exchange.duration_ms = round(seconds * 1000, 3)
        proxy = request.app[PROXY]
        metrics = proxy.metrics
        exemplar = exchange.trace.exemplar if exchange.trace is not None else None
        if exchange.counted_inflight:
            metrics.request_finished(exchange.route, exchange.status or 500, seconds, exemplar)
        else:
            metrics.request_refused(exchange.route, exchange.status or 500, seconds, exemplar)
        log_exchange(exchange, proxy.settings.logging.sample_routine, exemplar)


def tracing_middleware(tracing: Tracing) -> Middleware:
    """Between the access log and the error renderer: it sees the status the worker gets, and the
    access log sees its span (for the exemplar and the line's trace_id)."""

    @web.middleware
    async def traced(request: web.Request, handler: Handler) -> web.StreamResponse:
        exchange = request[EXCHANGE]
        ref = exchange.trace = tracing.start_server(request.method, request.headers)
        status = 500
        try:
            with tracing.current(ref):
                response = await handler(request)
            status = response.status
            return response
        except asyncio.CancelledError:
            status = CLIENT_CLOSED_REQUEST
            raise
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            tracing.finish_server(ref, exchange, status)

    return traced


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        exchange = request.get(EXCHANGE)
        if exchange is not None and isinstance(exc, UpstreamError):
            exchange.error = exc.kind
        return error_response(exc)
    except web.HTTPException:
        raise
    except Exception:
        # The message stays generic: exception text can carry request data.
        log.exception("unexpected error while handling a request")
        return web.Response(
            status=500,
            body=error_body("api_error", "internal gateway error"),
            content_type="application/json",
        )


def error_response(exc: GatewayError) -> web.Response:
    response = web.Response(status=exc.status, body=exc.body(), content_type="application/json")
    if exc.retry_after is not None:
        response.headers["retry-after"] = str(exc.retry_after)
    if isinstance(exc, RequestTooLarge | RequestTimedOut):
        # The rest of the body was never read; the connection cannot be reused.
        response.force_close()
    return response
