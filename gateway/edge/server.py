"""The worker-facing HTTP server's edges: timeouts, a connection cap, and refusals in the API's shape.

aiohttp's own server answers what it cannot parse (a bad request line, a
duplicate Content-Length, CL with TE, an oversized header...) with a plain
text 400 that quotes the offending bytes, keeps idle connections for an
hour, and has no deadline for a client that sends its headers a byte at a
time. Here, on the worker-facing port only:

- every refusal the HTTP layer makes is the API's JSON error
  (`{"type": "error", "error": {"type", "message"}}`), naming what was wrong
  and echoing no request bytes (they may hold a client token);
- a request's headers must be complete `limits.header_timeout_seconds` after
  its first byte, or the client gets a 408 and the connection closes;
- a keep-alive connection with no request goes after
  `limits.idle_timeout_seconds`;
- beyond `limits.max_client_connections` open connections (or what the file
  descriptor limit allows, if less: half of it, less a reserve, since each
  client connection may need an upstream one), a new one gets a 503
  `overloaded_error` at once and is closed, before the process runs out of
  descriptors (which would take the admin port down too, and make asyncio
  log an error for every refused accept).

Timeouts and the cap are read from the live settings for each new
connection, so a reload applies to connections opened after it. The body
timeout is the request path's (`gateway.edge.proxy`: it reads the body).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo
from aiohttp.web_request import BaseRequest

from gateway.config.settings import Limits
from gateway.errors import error_body
from gateway.observability.logs import QuietLog

__all__ = ["LISTEN_BACKLOG", "GatewayAppRunner", "RefusalObserver", "descriptor_budget", "raise_descriptor_limit"]

log = logging.getLogger("gateway.proxy")


RefusalObserver = Callable[[int], None]
LINGER_SECONDS = 1.0
# Descriptors kept for everything but client connections: the admin port and its
# clients, logs, the upstream pools' spares, the event loop itself.
RESERVED_DESCRIPTORS = 256
# Connections the kernel completes before the gateway accepts them. A fleet restarting at once
# connects faster than a busy replica accepts, and past the backlog the kernel drops the SYN: the
# client sends it again only after 1 s (then 3, 7...), which a beat bounded by its interval may not
# have. aiohttp listens with 128; this is Linux's default cap (net.core.somaxconn), which also caps it.
LISTEN_BACKLOG = 4096


def _raw_response(status: int, reason: str, error_type: str, message: str) -> bytes:
    body = error_body(error_type, message)
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class _Handler(RequestHandler):
    """aiohttp's connection handler, with the gateway's deadlines, cap and refusals."""

    def __init__(self, manager: GatewayServer, *, limits: Limits, **kwargs: Any) -> None:
        # A refused request's unread body is drained (so the client reads the refusal, not
        # a reset) for a moment only: a stalled or huge body does not hold the connection.
        kwargs.setdefault("lingering_time", LINGER_SECONDS)
        super().__init__(manager, keepalive_timeout=limits.idle_timeout_seconds, **kwargs)
        self._gateway = manager
        self._header_timeout = limits.header_timeout_seconds
        self._max_connections = min(limits.max_client_connections, manager.descriptor_budget)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._refusing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._gateway.open_connections() >= self._max_connections:
            # Refused, not served: the 503 goes out at once, whatever the client sends is
            # read and dropped for a moment (closing on unread data would reset the
            # connection, and the client could lose the 503), then it closes.
            self._refusing = True
            self._gateway.refused(503, "too many open connections")
            # uvloop's transports are not asyncio.Transport subclasses, but write and close alike.
            transport = cast(asyncio.WriteTransport, transport)
            transport.write(
                _raw_response(
                    503,
                    "Service Unavailable",
                    "overloaded_error",
                    "the gateway has too many open connections; retry shortly",
                )
            )
            self._loop.call_later(LINGER_SECONDS, transport.close)
            return
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._refusing:
            return
        before = self._request_count
        super().data_received(data)
        if self._request_count > before:
            self._cancel_header_deadline()  # the headers are complete
            self._fail_broken_body()
        elif not self._request_in_progress and not self._messages and self._header_deadline is None:
            # The first bytes of a request whose headers have not all come: they have until the deadline.
            self._header_deadline = self._loop.call_later(self._header_timeout, self._headers_too_slow)

    def _fail_broken_body(self) -> None:
        """A body that breaks part-way (a bad chunk size) fails its request at once, with a 400.

        aiohttp's parser reports bytes it cannot parse as a message of their own, a
        400 to be answered after the request in progress; but the request whose body
        broke would wait for bytes that never come, until the body timeout (408, 30 s
        later). Its body is failed instead, as a malformed one (`proxy._BodyMeter`
        answers 400 and cuts the upstream exchange), that queued 400 is dropped (one
        answer per request), and the connection closes after the answer: the parser
        cannot find the next request's start in a broken stream.
        """
        messages = self._messages
        # Only the body of the request being handled, with nothing queued behind it: closing now would
        # drop a pipelined request waiting its turn (those keep aiohttp's own order: the error after them).
        if len(messages) != 1 or not isinstance(messages[0][0], _ErrInfo) or self._current_request is None:
            return
        body = self._current_request.content
        if body.is_eof():
            return  # the body was whole: the bytes that broke belong to a next request
        self._messages.pop()
        body.set_exception(RequestPayloadError("the request body is malformed"))
        body.feed_eof()  # nothing more will come: no lingering read after the answer
        self.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _process_keepalive(self) -> None:
        if self._header_deadline is not None:
            return  # a request's headers are coming in: their own deadline governs
        super()._process_keepalive()

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self._request_in_progress or self._messages or self.transport is None:
            return
        self._gateway.refused(408, "request headers too slow")
        self.transport.write(
            _raw_response(
                408,
                "Request Timeout",
                "timeout_error",
                f"the request headers did not arrive within {self._header_timeout:g} s",
            )
        )
        self.force_close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's error page, as the API's JSON error and without the request's bytes."""
        if request.writer.output_size > 0:
            raise ConnectionError("the response has started; the connection is cut instead")
        what = type(exc).__name__ if exc is not None else "error"
        self._gateway.refused(status, what)
        if status >= 500:
            log.error("the HTTP layer failed a request (%s)", what)
            body = error_body("api_error", "internal gateway error")
        else:
            error_type = "request_too_large" if status in (413, 431) else "invalid_request_error"
            body = error_body(error_type, f"the request is not valid HTTP/1.1 ({what}); nothing was forwarded")
        response = web.Response(status=status, body=body, content_type="application/json")
        response.force_close()
        return response


def descriptor_budget() -> int:
    """Client connections the process's file descriptor limit allows: each may need an upstream one too."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(16, (soft - RESERVED_DESCRIPTORS) // 2)


def raise_descriptor_limit() -> tuple[int, int]:
    """Lift the soft file descriptor limit to the hard one (as Go's runtime does); returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class GatewayServer(web.Server):
    """aiohttp's server, making the gateway's connection handlers."""

    def __init__(
        self, handler: Any, *, limits: Callable[[], Limits], observer: RefusalObserver | None, **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        self._limits = limits
        self._observer = observer
        # A flood of garbage must not become a flood of log lines.
        self._quiet = QuietLog(
            log,
            logging.INFO,
            "refused_by_http_layer",
            "refused %d request(s) the HTTP layer could not accept; the last: %s",
        )
        self.descriptor_budget = descriptor_budget()

    def __call__(self) -> RequestHandler:
        return _Handler(self, limits=self._limits(), loop=self._loop, **self._kwargs)

    def open_connections(self) -> int:
        # Counted, not listed: aiohttp's `connections` copies every handler, on each new connection.
        return len(self._connections)

    def refused(self, status: int, what: str) -> None:
        self._quiet.note(what)
        if self._observer is not None:
            self._observer(status)


class GatewayAppRunner(web.AppRunner):
    """An `AppRunner` whose server is a `GatewayServer`."""

    def __init__(
        self,
        app: web.Application,
        *,
        limits: Callable[[], Limits],
        observer: RefusalObserver | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._limits = limits
        self._observer = observer

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        return GatewayServer(
            made.request_handler,
            limits=self._limits,
            observer=self._observer,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )
