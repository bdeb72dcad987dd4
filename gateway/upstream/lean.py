"""A lean HTTP/1.1 client for the calls a fleet makes all the time: heartbeats, polls, acks, stops, retrieves.

aiohttp's `ClientSession` is built for every kind of request: cookies, redirects,
auth, compression, trace hooks, multipart bodies, a timer context per read. Most
of what an exchange costs the gateway was there (`bench/instructions_bench.py`:
docs/benchmarks.md, "The cost of a request"), for calls that all have one shape:
a small request, whole in memory or empty, and a small answer. This client does
that and nothing else, on asyncio's protocols with llhttp (`httptools`, the
parser aiohttp's own C parser wraps) reading the answers:

- one exchange at a time per connection, kept alive between them (closed after
  `IDLE_SECONDS` unused, as aiohttp's `keepalive_timeout`), a few idle ones kept
  per class of capacity;
- requests with no body or one in memory, framed by Content-Length, sent as
  aiohttp sends them (Host first, the given headers in their order, a
  Content-Length where aiohttp adds one), so the upstream cannot tell them apart;
- answers framed by Content-Length, chunked, or by the connection's end,
  streamed to the caller with flow control;
- TLS with the upstream client's own context (rotated in place), and an HTTP
  egress proxy: CONNECT for an https:// upstream, absolute-form for an http:// one;
- the connect timeout, and each exchange's own deadline, body included.

What it is not used for (`HttpUpstream` sends those through aiohttp): bodies
streamed up, HEAD, event streams, and an https:// egress proxy.

It raises `Unreachable` (nothing was sent) and `Broken` (the request may have
reached the upstream); `gateway.upstream.client.translate` makes of them the
`UpstreamError` aiohttp's errors of the same meaning become.
"""

from __future__ import annotations

import asyncio
import contextvars
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast
from urllib.parse import urlsplit

import httptools

from gateway.config.settings import PoolName
from gateway.policy.egress import default_port

__all__ = [
    "IDLE_SECONDS",
    "Broken",
    "BrokenKind",
    "LeanClient",
    "LeanResponse",
    "Origin",
    "Unreachable",
    "UnreachableKind",
]

# How long an unused connection is kept (aiohttp's `keepalive_timeout`).
IDLE_SECONDS = 15.0
# Answer bytes held for a reader that has not read them yet, before the upstream is asked to wait.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
# An answer's head, bounded as aiohttp's client bounds it: a broken or hostile upstream cannot grow it.
MAX_HEADERS = 128
MAX_FIELD_BYTES = 8190
MAX_HEAD_BYTES = MAX_HEADERS * MAX_FIELD_BYTES
# Sent again once after a connection closed under them, as aiohttp does.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Methods aiohttp sends without a Content-Length when there is no body.
_NO_LENGTH_WITHOUT_BODY = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})

UnreachableKind = Literal["connect", "timeout", "certificate", "tls", "proxy", "proxy_refused"]
BrokenKind = Literal["closed", "reset", "cut", "invalid", "timeout"]


class Unreachable(Exception):
    """The request was never sent: no connection, no TLS, or the egress proxy would not carry it."""

    def __init__(self, kind: UnreachableKind, os_error: BaseException | None = None, status: int | None = None):
        super().__init__(kind)
        self.kind = kind
        # Named as aiohttp names them, so one translation reads both: the cause, the proxy's status.
        self.os_error = os_error
        self.certificate_error = os_error if kind == "certificate" else None
        self.status = status


class Broken(Exception):
    """The request was sent (or being sent) when the exchange failed: it may have reached the upstream."""

    def __init__(self, kind: BrokenKind):
        super().__init__(kind)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests go: the upstream's scheme, host and port, the path its base URL adds, and the egress proxy."""

    scheme: str
    host: str
    port: int
    # The base URL's path, put before every target.
    prefix: str
    # `Host:` as aiohttp writes it (the port only when it is not the scheme's).
    host_header: str
    # `host:port`, as a CONNECT names it.
    authority: str
    proxy_host: str | None = None
    proxy_port: int | None = None

    @classmethod
    def of(cls, base_url: str, proxy: str | None) -> Origin:
        parts = urlsplit(base_url)
        host = parts.hostname or ""
        port = parts.port or default_port(parts.scheme)
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if port == default_port(parts.scheme) else f"{shown}:{port}"
        proxy_host = proxy_port = None
        if proxy is not None:
            proxy_parts = urlsplit(proxy)
            proxy_host = proxy_parts.hostname
            proxy_port = proxy_parts.port or default_port(proxy_parts.scheme)
        prefix = parts.path.rstrip("/")
        return cls(parts.scheme, host, port, prefix, host_header, f"{shown}:{port}", proxy_host, proxy_port)

    @property
    def tunnelled(self) -> bool:
        """Through the proxy by CONNECT (an https:// upstream), rather than in absolute form to it."""
        return self.proxy_host is not None and self.scheme == "https"


def _not_connected(error: OSError, kind: UnreachableKind) -> Unreachable:
    """A failed connection or handshake: the certificate refused, the TLS handshake failed, or `kind`'s socket error."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return Unreachable("certificate", error)
    if isinstance(error, ssl.SSLError):
        return Unreachable("tls", error)
    return Unreachable(kind, error)


class _TooLarge(Exception):
    """An answer's head past the bounds; raised in a parser callback, it reaches `_feed` as llhttp's error."""


class _Stray(Exception):
    """Bytes of another answer after this one's end; raised in a parser callback, as `_TooLarge`."""


class _Connection(asyncio.Protocol):
    """One connection and the answer being read on it, fed by llhttp's callbacks."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.gone = False
        # Kept for a next exchange, since when: bytes arriving now belong to no request.
        self.idle = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._begin()

    def _begin(self) -> None:
        self.status = 0
        self._reason = bytearray()
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.complete = False
        self.reusable = False
        self.error: Broken | None = None
        self._framed = False
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._head_bytes = 0

    @property
    def reason(self) -> bytes:
        return bytes(self._reason)

    def next_exchange(self) -> None:
        if self._paused and self.transport is not None:
            # Read again, or the next answer on it would never be (and a close while idle never seen).
            self.transport.resume_reading()
        self._begin()

    def new_parser(self) -> None:
        """A fresh parser: after a proxy's CONNECT answer, the tunnel's own HTTP begins."""
        self._parser = httptools.HttpResponseParser(self)
        self._begin()

    # -- asyncio ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are no subclasses of asyncio's, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.idle:
            # An answer to no request: read as the next request's, it would be a wrong answer. Never used again.
            self.close()
            return
        if not self.head_done:
            # llhttp gathers a header whole before calling back: the head is bounded here, as it arrives.
            allowance = MAX_HEAD_BYTES - self._head_bytes
            if len(data) > allowance:
                if not self._feed(data[:allowance]):
                    self._fail(Broken("invalid"))
                    self.close()
                    return
                data = data[allowance:]
            else:
                self._head_bytes += len(data)
        self._feed(data)

    def _feed(self, data: bytes) -> bool:
        """`data` parsed; whether the answer's head is in."""
        if self.gone or not data:
            return self.head_done
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self.complete:
                # Bytes past the answer (`on_message_begin`): the answer stands, the connection is not used again.
                self.reusable = False
            else:
                self._fail(Broken("invalid"))
            self.close()
        return self.head_done

    def eof_received(self) -> bool:
        return False  # closed: a half-open connection carries no next exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        if self.complete or self.error is not None:
            return
        if self.head_done and not self._framed:
            # An answer framed by the connection's end: this is its end.
            self.complete = True
        elif self.head_done:
            self._fail(Broken("cut"))
        else:
            # As aiohttp tells them apart: closed cleanly, or reset.
            self._fail(Broken("closed" if exc is None else "reset"))
        self._wake()

    # -- llhttp -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            raise _Stray  # a second answer to one request: llhttp stops, `_feed` closes the connection

    def on_status(self, status: bytes) -> None:
        self._reason += status
        if len(self._reason) > MAX_FIELD_BYTES:
            raise _TooLarge  # llhttp stops, and `_feed` calls the answer invalid

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= MAX_HEADERS or len(name) + len(value) > MAX_FIELD_BYTES:
            raise _TooLarge
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self._reason.clear()
            self.headers = []
            return
        self.status = status
        self.head_done = True
        names = {name.lower() for name, _ in self.headers}
        self._framed = b"content-length" in names or b"transfer-encoding" in names or status in (204, 304)
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.head_done:
            return  # the end of an interim answer
        self.complete = True
        self.reusable = self._parser.should_keep_alive()
        self._wake()

    # -- the exchange's side ----------------------------------------------------------

    def _fail(self, error: Broken) -> None:
        if self.error is None and not self.complete:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def timed_out(self) -> None:
        self._fail(Broken("timeout"))
        self.close()

    async def head(self) -> None:
        """Until the answer's status line and headers are in."""
        while not self.head_done and self.error is None:
            await self.wait()
        if self.error is not None:
            raise self.error

    async def read(self) -> bytes:
        """The next part of the body, b"" at its end."""
        while self.error is None and not self._body and not self.complete:
            await self.wait()
        if self.error is not None:
            raise self.error  # as aiohttp's reader: what was buffered is not handed out after a failure
        if not self._body:
            return b""
        chunk = self._body.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered < LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    def close(self) -> None:
        self.gone = True
        if self.transport is not None:
            self.transport.close()


class LeanResponse:
    """An answer being read; `LeanClient.finish` ends its exchange."""

    __slots__ = ("_connection", "_timer", "headers", "reason", "status")

    def __init__(self, connection: _Connection, timer: asyncio.TimerHandle) -> None:
        self._connection = connection
        self._timer = timer
        self.status = connection.status
        self.reason = connection.reason
        self.headers = connection.headers

    async def read(self) -> bytes:
        return await self._connection.read()


class LeanClient:
    """Keep-alive connections to one origin, a few idle ones kept per class of capacity; see the module's doc."""

    def __init__(
        self,
        origin: Origin,
        tls: ssl.SSLContext | None,
        *,
        server_hostname: str | None,
        connect_timeout: float,
        proxy_headers: Callable[[], dict[str, str] | None],
        max_idle: Callable[[PoolName], int] = lambda pool: 64,
    ) -> None:
        self.origin = origin
        self._tls = tls if origin.scheme == "https" else None
        self._server_hostname = server_hostname or origin.host
        self._connect_timeout = connect_timeout
        self._proxy_headers = proxy_headers
        self._max_idle = max_idle
        self._idle: dict[PoolName, deque[_Connection]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    async def send(
        self,
        pool: PoolName,
        method: str,
        target: str,
        headers: tuple[tuple[str, str], ...],
        body: bytes | None,
        within: float,
    ) -> LeanResponse:
        """Send a request on an idle connection of `pool`'s, or a new one; the answer once its head is in.

        `within`: seconds the whole exchange may take, from now until `finish`, the answer's body included.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        request = self._request(method, target, headers, body)
        # As aiohttp (RFC 9112 §9.3.1): an idempotent request whose connection closed before any answer is sent
        # once more. Never a POST: a heartbeat that may have landed is the heartbeat path's to decide about.
        again = method in _IDEMPOTENT
        while True:
            connection = self._idle_connection(pool)
            if connection is None:
                connection = await self._connect(loop, deadline)
            # In a context of its own: a cancelled timer stays in asyncio's heap until its time, and would keep
            # the request's context (its trace span, say) alive that long.
            timer = loop.call_at(deadline, connection.timed_out, context=contextvars.Context())
            try:
                assert connection.transport is not None
                connection.transport.write(request)
                await connection.head()
            except BaseException as error:
                timer.cancel()
                connection.close()
                if again and isinstance(error, Broken) and error.kind in ("closed", "reset"):
                    again = False
                    continue
                raise
            return LeanResponse(connection, timer)

    def finish(self, pool: PoolName, response: LeanResponse) -> None:
        """The exchange is over: its connection kept for the next if the whole answer came, else closed (how an
        HTTP/1.1 client cancels). As aiohttp, whose connection goes back to its pool when the answer's end
        arrives, whether or not the caller read it."""
        response._timer.cancel()
        connection = response._connection
        # `reusable`: the answer's end came, keep-alive, and nothing stray after it.
        if connection.reusable and not connection.gone and not self._closed:
            idle = self._idle.setdefault(pool, deque())
            if len(idle) < self._max_idle(pool):
                connection.next_exchange()
                connection.idle = True
                connection.idle_since = time.monotonic()
                idle.append(connection)
                if self._sweep is None:
                    self._sweep = asyncio.get_running_loop().call_later(
                        IDLE_SECONDS, self._close_stale, context=contextvars.Context()
                    )
                return
        connection.close()

    def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
        for idle in self._idle.values():
            while idle:
                idle.pop().close()

    def _close_stale(self) -> None:
        """Connections unused for `IDLE_SECONDS` are closed (the oldest are at the left), checked as often."""
        self._sweep = None
        now = time.monotonic()
        for idle in self._idle.values():
            while idle and now - idle[0].idle_since >= IDLE_SECONDS:
                idle.popleft().close()
        if any(self._idle.values()) and not self._closed:
            self._sweep = asyncio.get_running_loop().call_later(
                IDLE_SECONDS, self._close_stale, context=contextvars.Context()
            )

    # -- connections ------------------------------------------------------------------

    def _idle_connection(self, pool: PoolName) -> _Connection | None:
        idle = self._idle.get(pool)
        now = time.monotonic()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to have been closed
            transport = connection.transport
            fresh = now - connection.idle_since < IDLE_SECONDS
            # A connection lost or closed while idle has its transport closing (and is `gone`).
            if fresh and transport is not None and not transport.is_closing():
                connection.idle = False
                return connection
            connection.close()
        return None

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        origin = self.origin
        patience = min(self._connect_timeout, max(0.0, deadline - loop.time()))
        connection: _Connection | None = None
        try:
            async with asyncio.timeout(patience):
                if origin.proxy_host is None:
                    connection = await self._open(loop, origin.host, origin.port, self._tls, "connect")
                else:
                    assert origin.proxy_port is not None
                    connection = await self._open(loop, origin.proxy_host, origin.proxy_port, None, "proxy")
                    if origin.tunnelled:
                        await self._tunnel(loop, connection)
        except BaseException as error:
            if connection is not None:
                connection.close()
            if isinstance(error, TimeoutError):
                raise Unreachable("timeout") from None
            raise
        return connection

    async def _open(
        self, loop: asyncio.AbstractEventLoop, host: str, port: int, tls: ssl.SSLContext | None, kind: UnreachableKind
    ) -> _Connection:
        try:
            _, connection = await loop.create_connection(
                lambda: _Connection(loop), host, port, ssl=tls, server_hostname=self._server_hostname if tls else None
            )
        except OSError as error:
            raise _not_connected(error, kind) from error
        return connection

    async def _tunnel(self, loop: asyncio.AbstractEventLoop, connection: _Connection) -> None:
        """CONNECT through the egress proxy, then TLS with the upstream inside the tunnel."""
        authority = self.origin.authority
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        lines += [f"{name}: {value}" for name, value in (self._proxy_headers() or {}).items()]
        assert connection.transport is not None
        connection.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        try:
            await connection.head()
        except Broken as error:
            raise Unreachable("proxy", error) from None
        if connection.status != 200:
            raise Unreachable("proxy_refused", status=connection.status)
        connection.new_parser()
        assert self._tls is not None  # a tunnel is for an https:// upstream
        try:
            transport = await loop.start_tls(
                connection.transport, connection, self._tls, server_hostname=self._server_hostname
            )
        except OSError as error:
            raise _not_connected(error, "connect") from error
        connection.transport = cast(asyncio.Transport, transport)

    # -- the request ------------------------------------------------------------------

    def _request(self, method: str, target: str, headers: tuple[tuple[str, str], ...], body: bytes | None) -> bytes:
        origin = self.origin
        path = origin.prefix + target
        if origin.proxy_host is not None and not origin.tunnelled:
            path = f"{origin.scheme}://{origin.host_header}{path}"  # absolute form, to an HTTP proxy
        lines = [f"{method} {path} HTTP/1.1", f"Host: {origin.host_header}"]
        lines += [f"{name}: {value}" for name, value in headers]
        if any("\r" in line or "\n" in line for line in lines):
            # aiohttp refuses these too: a line break in a header would be a request of its own upstream.
            raise ValueError("a line break in the request line or a header")
        has_length = any(name.lower() == "content-length" for name, _ in headers)
        if not has_length:
            if body is not None:
                lines.append(f"Content-Length: {len(body)}")
            elif method not in _NO_LENGTH_WITHOUT_BODY:
                lines.append("Content-Length: 0")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
        return head + body if body else head
