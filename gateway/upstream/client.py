"""The upstream seam: one HTTP exchange with the API, and the one place its errors are translated.

Handlers and the heartbeat path depend on the small `Upstream` protocol;
production uses `HttpUpstream`, long-lived `aiohttp.ClientSession`s, one per
class of capacity (aiohttp's advice: sessions per application, never one per
request).
Every aiohttp and socket error of an exchange, whether it happens while
sending, waiting or streaming the body back, is caught in `translate` and
re-raised as a `gateway.errors.UpstreamError` with its kind and whether the
request may have reached the API. Nothing else in the gateway catches
aiohttp client errors.
"""

from __future__ import annotations

import functools
import logging
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, NoReturn, Protocol

import aiohttp
from yarl import URL

from gateway.certificates import Rotating, RotatingCertificate, RotatingTrust
from gateway.config.settings import PoolName, UpstreamProxy, UpstreamSettings, UpstreamTls
from gateway.errors import UpstreamError, UpstreamErrorKind, UpstreamTimeout, UpstreamUnavailable
from gateway.observability.logs import QuietLog
from gateway.observability.nobody import NOBODY
from gateway.policy.egress import ProxyRoute

from .capacity import Gate
from .lean import Broken, BrokenKind, LeanClient, Origin, Unreachable, UnreachableKind

if TYPE_CHECKING:
    from gateway.observability.tracing import SpanRef

log = logging.getLogger("gateway.upstream")

__all__ = [
    "BufferedResponse",
    "HttpUpstream",
    "Upstream",
    "UpstreamObserver",
    "UpstreamRequest",
    "UpstreamResponse",
    "fetch",
]

# Read size for streaming bodies through; small enough that SSE events are
# not held back, large enough that uploads do not cost a syscall per byte.
CHUNK_SIZE = 64 * 1024


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    method: str
    # Path and query exactly as the client sent them.
    target: str
    headers: tuple[tuple[str, str], ...] = field(repr=False)
    body: bytes | AsyncIterable[bytes] | None = field(default=None, repr=False)
    # This exchange's own deadline, body included; None: the upstream's request timeout.
    timeout: float | None = None
    # The route name it is counted under in metrics.
    route: str = "other"
    # The class of upstream capacity it draws on (`gateway.upstream.capacity`).
    pool: PoolName = PoolName.OTHER
    # How long it may wait for a connection of its class, if less than the class allows.
    max_queue_seconds: float | None = None
    # The span it is sent for, when tracing is on: a worker's request, a flight, or (sent) its own client span.
    trace: SpanRef | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class BufferedResponse:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


class UpstreamResponse(Protocol):
    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str: ...

    @property
    def headers(self) -> tuple[tuple[str, str], ...]: ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; raises `UpstreamError` if the stream breaks."""
        ...


class UpstreamObserver(Protocol):
    """Told about every exchange: for metrics, without this module importing them."""

    def upstream_answered(self, route: str, status: int, seconds: float, exemplar: dict[str, str] | None) -> None:
        """`exemplar`: the exchange's trace, when it was sampled."""

    def upstream_failed(self, route: str, kind: UpstreamErrorKind) -> None: ...


class Upstream(Protocol):
    def exchange(self, request: UpstreamRequest) -> AbstractAsyncContextManager[UpstreamResponse]:
        """Send `request`; the response is open (and its connection held) inside the block.

        Leaving the block before the body is read closes the connection, which
        cancels the exchange on the upstream's side too.
        """
        ...

    async def close(self) -> None: ...


async def fetch(upstream: Upstream, request: UpstreamRequest, *, max_bytes: int) -> BufferedResponse:
    """One exchange with the whole response read into memory (for small JSON answers)."""
    async with upstream.exchange(request) as response:
        body = b""
        async for chunk in response.chunks():
            body += chunk
            if len(body) > max_bytes:
                raise UpstreamUnavailable(
                    f"the upstream response is larger than {max_bytes} bytes",
                    kind="other",
                    may_have_reached_upstream=True,
                )
        return BufferedResponse(response.status, response.reason, response.headers, body)


def _proxy_authorization(egress: ProxyRoute, settings: UpstreamProxy) -> dict[str, str] | None:
    """`Proxy-Authorization` for the proxy (in its CONNECT): the configured secret, else its URL's user and password."""
    if egress.proxy is None:
        return None
    if settings.credentials is not None:
        user, _, password = settings.credentials.value.partition(":")
    elif egress.credentials is not None:
        user, password = egress.credentials
    else:
        return None
    return {"Proxy-Authorization": aiohttp.encode_basic_auth(user, password)}


def tls_context(settings: UpstreamTls) -> tuple[ssl.SSLContext, tuple[Rotating, ...]]:
    """Verification always on: the system's trust store (as OpenSSL finds it, `SSL_CERT_FILE` and
    `SSL_CERT_DIR` included) with the configured bundles added to it, never in its place; and the
    client certificate, if any. Both are read again as they rotate."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])  # as aiohttp's own default context: the client speaks nothing else
    rotating: list[Rotating] = []
    for ca_file in settings.ca_files:
        context.load_verify_locations(cafile=ca_file)
    if settings.ca_files:
        rotating.append(RotatingTrust(context, settings.ca_files, "upstream CA bundle"))
    if settings.client_cert_file is not None and settings.client_key_file is not None:
        rotating.append(
            RotatingCertificate(
                context, settings.client_cert_file, settings.client_key_file, "upstream client certificate"
            )
        )
    return context, tuple(rotating)


class HttpUpstream:
    """`Upstream` over pooled aiohttp `ClientSession`s, one per capacity class; create and close it in the loop.

    Each class has its own connector, limited to the class's `max_connections`,
    behind its `capacity.Gate`: no class's connections can be taken by another's
    traffic, and a request waits only in its own class's bounded queue.
    """

    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        observer: UpstreamObserver | None = None,
        gates: Mapping[PoolName, Gate] | None = None,
        egress: ProxyRoute | None = None,
        proxy: Callable[[], UpstreamProxy] | None = None,
    ) -> None:
        self._observer = observer or NOBODY
        # Every class, heartbeats and streams alike, takes the one way out the config chose.
        self.egress = egress or ProxyRoute(None, "no proxy given")
        # The proxy's credentials as the live settings have them: a reload rotates them in place.
        self._proxy_settings = proxy or (lambda: settings.proxy)
        self._proxy_for = settings.proxy
        self._proxy_headers = _proxy_authorization(self.egress, settings.proxy)
        self._base = settings.base_url.rstrip("/")
        self._connect_timeout = settings.connect_timeout_seconds
        # The whole exchange, body streaming included.
        self._request_timeout = settings.request_timeout_seconds
        self._timeout = self._timeout_of(self._request_timeout)
        self.gates = gates or {p: Gate(p, settings.pools.of(p)) for p in PoolName}
        # The TLS files to keep current while the client runs (the app watches them).
        self._tls, self.rotating = tls_context(settings.tls)
        self._server_name = settings.tls.server_name
        self._sessions = {p: self._session(self.gates[p].limit) for p in PoolName}
        # The calls with no body or one in memory go by the lean client (`gateway.upstream.lean`), unless the
        # config says otherwise or the way out is an https:// proxy (TLS inside TLS: aiohttp's alone).
        self._lean: LeanClient | None = None
        if settings.client == "lean" and not (self.egress.address or "").startswith("https://"):
            self._lean = LeanClient(
                Origin.of(self._base, self.egress.address),
                self._tls,
                server_hostname=self._server_name,
                connect_timeout=self._connect_timeout,
                proxy_headers=self._current_proxy_headers,
                # As many kept idle as the class may have open, as aiohttp's connector for it.
                max_idle=lambda pool: self.gates[pool].limit,
            )
        self._egress_failures = QuietLog(
            log, logging.WARNING, "upstream_unreachable", "%d upstream request(s) failed on the way: %s"
        )

    def _session(self, limit: int) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limit, limit_per_host=0, ssl=self._tls),
            timeout=self._timeout,
            # Bytes pass through as the upstream sent them: no decompression,
            # and no headers the client did not send (Accept-Encoding, User-Agent).
            auto_decompress=False,
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            # The environment's proxy settings are read by `egress` (aiohttp's own reading
            # ignores NO_PROXY ranges and drops an https:// proxy to go direct).
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            proxy=self.egress.address,
        )

    def _current_proxy_headers(self) -> dict[str, str] | None:
        proxy = self._proxy_settings()
        if proxy is not self._proxy_for:  # a reload: the credentials may have rotated
            self._proxy_for, self._proxy_headers = proxy, _proxy_authorization(self.egress, proxy)
        return self._proxy_headers

    @functools.lru_cache(maxsize=16)  # noqa: B019 - a handful of values, for the session's lifetime
    def _timeout_of(self, total: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=total, sock_connect=self._connect_timeout)

    @property
    def closed(self) -> bool:
        return all(session.closed for session in self._sessions.values())

    def exchange(self, request: UpstreamRequest) -> _Exchange:
        return _Exchange(self, request)

    async def _open(self, request: UpstreamRequest) -> tuple[_Answer, Callable[[bool], None]]:
        """`request` sent by the client its shape goes by: its answer, and how to end the exchange (given
        whether the block ended without an error). Errors are raised as the `UpstreamError` they mean."""
        failed = functools.partial(self._raise_translated, request.route)
        started = time.monotonic()
        try:
            if self._lean is not None and _lean_shaped(request):
                answer, finish = await self._by_lean(self._lean, request, failed)
            else:
                answer, finish = await self._by_aiohttp(request, failed)
        except Exception as exc:
            failed(exc)
        try:
            trace = request.trace
            exemplar = trace.exemplar if trace is not None else None
            self._observer.upstream_answered(request.route, answer.status, time.monotonic() - started, exemplar)
        except BaseException:
            finish(False)  # the block is never entered: its exit does not end the exchange either
            raise
        return answer, finish

    async def _by_aiohttp(
        self, request: UpstreamRequest, failed: Callable[[Exception], NoReturn]
    ) -> tuple[_Answer, Callable[[bool], None]]:
        response = await self._sessions[request.pool].request(
            request.method,
            URL(self._base + request.target, encoded=True),
            headers=list(request.headers),
            data=request.body,
            allow_redirects=False,
            # The client chose its Content-Length/Transfer-Encoding; keep raw bytes.
            compress=None,
            timeout=self._timeout if request.timeout is None else self._timeout_of(request.timeout),
            server_hostname=self._server_name,
            proxy_headers=self._current_proxy_headers(),
        )

        def finish(clean: bool) -> None:
            if clean and response.content.at_eof():
                response.release()
            else:
                response.close()  # closing the connection is how an HTTP/1.1 client cancels

        answer = _Answer(response.status, response.reason or "", response.raw_headers, response.content.readany, failed)
        return answer, finish

    async def _by_lean(
        self, lean: LeanClient, request: UpstreamRequest, failed: Callable[[Exception], NoReturn]
    ) -> tuple[_Answer, Callable[[bool], None]]:
        body = request.body
        assert body is None or isinstance(body, bytes)  # `_lean_shaped`
        timeout = self._request_timeout if request.timeout is None else request.timeout
        response = await lean.send(request.pool, request.method, request.target, request.headers, body, timeout)
        answer = _Answer(response.status, _text(response.reason), response.headers, response.read, failed)
        # Kept for the next exchange if the whole answer came (read or not, as aiohttp's pool does), else closed.
        return answer, lambda clean: lean.finish(request.pool, response)

    async def close(self) -> None:
        if self._lean is not None:
            self._lean.close()
        for session in self._sessions.values():
            await session.close()

    def _raise_translated(self, route: str, exc: Exception) -> NoReturn:
        """Raised again as the `UpstreamError` it means (and counted); a bug of ours is raised as it is."""
        translated = translate(exc)
        if isinstance(translated, UpstreamError):
            self._observer.upstream_failed(route, translated.kind)
            if translated.kind in ("tls", "proxy"):
                # The egress path is misconfigured (a CA, a hostname, a proxy): every request fails alike.
                self._egress_failures.note(translated.message)
        if translated is exc:
            raise exc
        raise translated from exc


class _Exchange:
    """`async with upstream.exchange(request) as response:` one exchange, its class's slot held throughout.

    The slot is held until the answer is read or abandoned: it is the connection. A class rather than an
    `asynccontextmanager`: it is entered for every upstream exchange, and a generator costs a finaliser
    hook and contextlib's frames each time.
    """

    __slots__ = ("_finish", "_request", "_upstream")

    def __init__(self, upstream: HttpUpstream, request: UpstreamRequest) -> None:
        self._upstream = upstream
        self._request = request
        self._finish: Callable[[bool], None] | None = None

    async def __aenter__(self) -> _Answer:
        upstream, request = self._upstream, self._request
        gate = upstream.gates[request.pool]
        await gate.acquire(request.max_queue_seconds)
        try:
            answer, self._finish = await upstream._open(request)
        except BaseException:
            gate.release()
            raise
        return answer

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        assert self._finish is not None
        try:
            self._finish(kind is None)
        finally:
            self._upstream.gates[self._request.pool].release()


def _lean_shaped(request: UpstreamRequest) -> bool:
    """A call the lean client sends: its body none or in memory; not an event stream, not HEAD."""
    body = request.body
    return (
        (body is None or isinstance(body, bytes)) and request.pool is not PoolName.STREAM and request.method != "HEAD"
    )


class _Answer:
    """An answer, from either client: its status, reason and headers as text, and its body as it arrives."""

    __slots__ = ("_failed", "_read", "headers", "reason", "status")

    def __init__(
        self,
        status: int,
        reason: str,
        raw_headers: Iterable[tuple[bytes, bytes]],
        read: Callable[[], Awaitable[bytes]],
        failed: Callable[[Exception], NoReturn],
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = tuple((_text(name), _text(value)) for name, value in raw_headers)
        self._read = read
        self._failed = failed

    def chunks(self) -> _Chunks:
        return _Chunks(self._read, self._failed)


class _Chunks:
    """The body as it arrives (an iterator class: no async generator and its finaliser hook per answer)."""

    __slots__ = ("_failed", "_read")

    def __init__(self, read: Callable[[], Awaitable[bytes]], failed: Callable[[Exception], NoReturn]) -> None:
        self._read = read
        self._failed = failed

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._read()
        except Exception as exc:
            self._failed(exc)
        if not chunk:
            raise StopAsyncIteration
        return chunk


def _text(raw: bytes) -> str:
    """A header as text: UTF-8 keeps its bytes when re-sent; anything else is read as Latin-1."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _never_sent(kind: UpstreamErrorKind, message: str) -> Callable[[BaseException], UpstreamError]:
    return lambda _: UpstreamUnavailable(message, kind=kind, may_have_reached_upstream=False)


def _certificate(exc: BaseException) -> UpstreamError:
    # OpenSSL's own words ("Hostname mismatch, certificate is not valid for 'x'", "unable to get local
    # issuer certificate", "certificate has expired"): what an operator needs, and no secret.
    reason = getattr(exc, "certificate_error", None)
    detail = getattr(reason, "verify_message", None) or str(reason or exc)
    return UpstreamUnavailable(
        f"the upstream's TLS certificate was not accepted: {detail}", kind="tls", may_have_reached_upstream=False
    )


def _handshake(exc: BaseException) -> UpstreamError:
    reason = getattr(exc, "os_error", None)
    if isinstance(reason, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError)):
        # A connection closed mid-handshake (a load balancer's reset): weather, not a misconfiguration.
        return UpstreamUnavailable(
            "the upstream closed the connection during the TLS handshake",
            kind="connect",
            may_have_reached_upstream=False,
        )
    detail = getattr(reason, "reason", None) or type(reason or exc).__name__
    return UpstreamUnavailable(
        f"the TLS handshake with the upstream failed: {detail}", kind="tls", may_have_reached_upstream=False
    )


def _proxy_refused(exc: BaseException) -> UpstreamError:
    status = getattr(exc, "status", None)
    detail = " (407: its credentials were refused)" if status == 407 else f" ({status})" if status else ""
    return UpstreamUnavailable(
        f"the egress proxy refused the connection to the upstream{detail}",
        kind="proxy",
        may_have_reached_upstream=False,
    )


def _connect_timed_out(_: BaseException) -> UpstreamError:
    return UpstreamTimeout(
        "timed out connecting to the upstream (or in its TLS handshake)",
        kind="timeout",
        may_have_reached_upstream=False,
    )


def _sent(
    error: type[UpstreamError], message: str, kind: UpstreamErrorKind
) -> Callable[[BaseException], UpstreamError]:
    """A failure once the request was sent, or being sent: it may have reached the upstream."""
    return lambda _: error(message, kind=kind, may_have_reached_upstream=True)


# The failures before anything was sent, by the lean client's kind (`Unreachable`); aiohttp's connector errors
# of the same cause mean the same (`_MEANINGS`).
_NEVER_SENT: Mapping[UnreachableKind, Callable[[BaseException], UpstreamError]] = MappingProxyType(
    {
        "timeout": _connect_timed_out,
        "certificate": _certificate,
        "tls": _handshake,
        "proxy": _never_sent("proxy", "cannot connect to the egress proxy"),
        "proxy_refused": _proxy_refused,
        "connect": _never_sent("connect", "cannot connect to the upstream"),
    }
)
# The failures after the request went, by the lean client's kind (`Broken`); aiohttp's of the same meaning too.
_SENT: Mapping[BrokenKind, Callable[[BaseException], UpstreamError]] = MappingProxyType(
    {
        "timeout": _sent(UpstreamTimeout, "the upstream did not answer in time", "timeout"),
        "closed": _sent(UpstreamUnavailable, "the upstream closed the connection", "reset"),
        "reset": _sent(UpstreamUnavailable, "the connection to the upstream was reset", "reset"),
        "cut": _sent(UpstreamUnavailable, "the upstream response was cut off", "reset"),
        "invalid": _sent(UpstreamUnavailable, "the upstream sent an invalid HTTP response", "other"),
    }
)


def _unreachable(exc: BaseException) -> UpstreamError:
    assert isinstance(exc, Unreachable)
    return _NEVER_SENT[exc.kind](exc)


def _broken(exc: BaseException) -> UpstreamError:
    assert isinstance(exc, Broken)
    return _SENT[exc.kind](exc)


# What each aiohttp, lean client or socket error of an exchange means, most specific first.
_MEANINGS: tuple[
    tuple[type[BaseException] | tuple[type[BaseException], ...], Callable[[BaseException], UpstreamError]], ...
] = (
    (Unreachable, _unreachable),
    (Broken, _broken),
    (aiohttp.ConnectionTimeoutError, _NEVER_SENT["timeout"]),
    (aiohttp.ClientConnectorCertificateError, _NEVER_SENT["certificate"]),
    (aiohttp.ClientConnectorSSLError, _NEVER_SENT["tls"]),
    (aiohttp.ClientProxyConnectionError, _NEVER_SENT["proxy"]),
    (aiohttp.ClientHttpProxyError, _NEVER_SENT["proxy_refused"]),
    (aiohttp.ClientConnectorError, _NEVER_SENT["connect"]),
    ((TimeoutError, aiohttp.ServerTimeoutError), _SENT["timeout"]),
    (aiohttp.ServerDisconnectedError, _SENT["closed"]),
    (aiohttp.ClientPayloadError, _SENT["cut"]),
    (aiohttp.ClientResponseError, _SENT["invalid"]),
    ((aiohttp.ClientOSError, ConnectionError), _SENT["reset"]),
    (aiohttp.ClientError, _sent(UpstreamUnavailable, "the upstream exchange failed", "other")),
)


def translate(exc: Exception) -> Exception:
    """The `UpstreamError` an exception of an exchange means; anything that is no upstream error as it is."""
    if isinstance(exc, UpstreamError):
        return exc
    for kinds, meaning in _MEANINGS:
        if isinstance(exc, kinds):
            return meaning(exc)
    return exc
