"""The gateway against deliberately broken upstreams, and the one place their errors are translated.

Checks `gateway/upstream/client.py`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from gateway.config.settings import UpstreamClient, UpstreamSettings
from gateway.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gateway.upstream.client import HttpUpstream, UpstreamRequest, fetch, translate
from gateway.upstream.lean import Unreachable

from .support import ENV_ID, GatewayFactory, Recorder, worker_headers
from .tools import free_port

HEARTBEAT = f"/v1/environments/{ENV_ID}/work/work_1/heartbeat?expected_last_heartbeat=NO_HEARTBEAT"
POLL = f"/v1/environments/{ENV_ID}/work/poll?block_ms=999"
FAST_TIMEOUTS = (
    "upstream: {base_url: '%s', connect_timeout_seconds: 1, request_timeout_seconds: 0.5}\n"
    "heartbeat: {upstream_timeout_seconds: 0.5}"
)

RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[RawHandler], Awaitable[str]]]:
    """A TCP server that answers with whatever bytes a test scripts."""
    servers: list[asyncio.Server] = []

    async def start(handler: RawHandler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def call(gateway_url: str, method: str, target: str) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, gateway_url + target, headers=worker_headers()) as response,
    ):
        return response.status, json.loads(await response.read())


@pytest.mark.parametrize(("method", "target"), [("POST", HEARTBEAT), ("GET", POLL)])
async def test_unreachable_upstream_is_a_502(make_gateway: GatewayFactory, method: str, target: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    gateway = await make_gateway(url, FAST_TIMEOUTS % url)
    status, body = await call(gateway.proxy_url, method, target)
    assert status == 502
    assert body == {"type": "error", "error": {"type": "api_error", "message": "cannot connect to the upstream"}}


@pytest.mark.parametrize(("method", "target"), [("POST", HEARTBEAT), ("GET", POLL)])
async def test_slow_upstream_is_a_504(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory, method: str, target: str
) -> None:
    rec, url = recorder

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3)
        return web.json_response({})

    rec.respond = slow
    gateway = await make_gateway(url, FAST_TIMEOUTS % url)
    status, body = await call(gateway.proxy_url, method, target)
    assert status == 504
    assert body["error"] == {"type": "timeout_error", "message": "the upstream did not answer in time"}


@pytest.mark.parametrize(
    ("script", "message"),
    [
        (b"", "the upstream closed the connection"),
        (b"this is not HTTP at all\r\n\r\n", "the upstream sent an invalid HTTP response"),
        (b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"type":', "the upstream response was cut off"),
    ],
    ids=["reset", "garbage", "truncated"],
)
async def test_broken_upstream_answers_are_502s_for_heartbeats(
    raw_upstream: Callable[[RawHandler], Awaitable[str]], make_gateway: GatewayFactory, script: bytes, message: str
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(script)
        await writer.drain()
        writer.close()

    url = await raw_upstream(handler)
    gateway = await make_gateway(url, FAST_TIMEOUTS % url)
    status, body = await call(gateway.proxy_url, "POST", HEARTBEAT)
    assert status == 502
    assert body["error"] == {"type": "api_error", "message": message}


async def test_a_stream_cut_by_the_upstream_is_cut_for_the_client(
    raw_upstream: Callable[[RawHandler], Awaitable[str]], make_gateway: GatewayFactory
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"e\r\ndata: first\n\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()

    url = await raw_upstream(handler)
    gateway = await make_gateway(url, FAST_TIMEOUTS % url)
    async with aiohttp.ClientSession() as session:
        response = await session.get(gateway.proxy_url + "/v1/sessions/s/events/stream", headers=worker_headers())
        assert response.status == 200
        assert await response.content.readline() == b"data: first\n"
        # No clean end: the client learns the stream broke instead of seeing a complete body.
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
        response.close()


async def test_upstream_errors_pass_through_unchanged(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    rec, url = recorder
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}, "request_id": "req_9"}

    async def overloaded(request: web.Request) -> web.StreamResponse:
        return web.json_response(error, status=529, headers={"retry-after": "3", "x-should-retry": "true"})

    rec.respond = overloaded
    gateway = await make_gateway(url)
    for method, target in (("POST", HEARTBEAT), ("GET", POLL)):
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, gateway.proxy_url + target, headers=worker_headers()) as response,
        ):
            assert response.status == 529
            assert await response.json() == error
            assert response.headers["retry-after"] == "3"
            assert response.headers["x-should-retry"] == "true"


async def test_oversized_heartbeat_answer_is_refused(recorder: tuple[Recorder, str]) -> None:
    rec, url = recorder

    async def huge(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"x" * 2_000_000)

    rec.respond = huge
    upstream = HttpUpstream(UpstreamSettings(base_url=url))
    try:
        with pytest.raises(UpstreamUnavailable, match="larger than"):
            await fetch(upstream, UpstreamRequest("POST", "/x", ()), max_bytes=1_000_000)
    finally:
        await upstream.close()


@pytest.mark.parametrize(
    ("raised", "expected", "kind", "may_have_reached"),
    [
        (aiohttp.ConnectionTimeoutError(), UpstreamTimeout, "timeout", False),
        (aiohttp.ClientConnectorError(None, OSError(111, "refused")), UpstreamUnavailable, "connect", False),  # type: ignore[arg-type]
        (aiohttp.ClientConnectorSSLError(None, ssl.SSLEOFError()), UpstreamUnavailable, "connect", False),
        (aiohttp.ClientConnectorSSLError(None, ssl.SSLError(1, "wrong version")), UpstreamUnavailable, "tls", False),
        (aiohttp.ClientProxyConnectionError(None, OSError(111, "refused")), UpstreamUnavailable, "proxy", False),  # type: ignore[arg-type]
        (aiohttp.ClientHttpProxyError(None, (), status=407), UpstreamUnavailable, "proxy", False),  # type: ignore[arg-type]
        (aiohttp.SocketTimeoutError(), UpstreamTimeout, "timeout", True),
        (TimeoutError(), UpstreamTimeout, "timeout", True),
        (aiohttp.ServerDisconnectedError(), UpstreamUnavailable, "reset", True),
        (aiohttp.ClientPayloadError("cut"), UpstreamUnavailable, "reset", True),
        (ConnectionResetError(), UpstreamUnavailable, "reset", True),
        (aiohttp.ClientOSError(104, "reset"), UpstreamUnavailable, "reset", True),
        (aiohttp.ClientError(), UpstreamUnavailable, "other", True),
    ],
)
def test_client_errors_are_translated_most_specific_first(
    raised: Exception, expected: type[UpstreamError], kind: str, may_have_reached: bool
) -> None:
    translated = translate(raised)
    assert type(translated) is expected
    assert isinstance(translated, UpstreamError)
    assert translated.kind == kind
    assert translated.may_have_reached_upstream is may_have_reached


def test_an_error_that_is_no_upstream_error_is_not_dressed_up_as_one() -> None:
    bug = KeyError("a bug of ours")
    assert translate(bug) is bug


@pytest.mark.parametrize("client", ["lean", "aiohttp"])
async def test_a_translated_error_keeps_the_client_error_as_its_cause(client: UpstreamClient) -> None:
    """The upstream refuses connections: the gateway raises `UpstreamUnavailable`, caused by the client's error
    (and that by the socket's)."""
    upstream = HttpUpstream(UpstreamSettings(base_url=f"http://127.0.0.1:{_closed_port()}", client=client))
    try:
        with pytest.raises(UpstreamUnavailable) as caught:
            await fetch(upstream, UpstreamRequest("GET", "/x", ()), max_bytes=100)
        assert caught.value.kind == "connect"
        assert not caught.value.may_have_reached_upstream
        cause = caught.value.__cause__
        assert isinstance(cause, Unreachable if client == "lean" else aiohttp.ClientConnectorError)
        assert isinstance(cause.os_error, ConnectionRefusedError)
    finally:
        await upstream.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_small_answer_cut_by_the_upstream_is_cut_for_the_client(
    raw_upstream: Callable[[RawHandler], Awaitable[str]], make_gateway: GatewayFactory
) -> None:
    """The API answered 200 (and may have acted) but the body broke off: the worker sees a broken
    200, never a clean answer and never a gateway error that would invite a blind retry."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"type":')
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()

    url = await raw_upstream(handler)
    gateway = await make_gateway(url, FAST_TIMEOUTS % url)
    async with aiohttp.ClientSession() as session:
        ack = f"/v1/environments/{ENV_ID}/work/work_1/ack"
        response = await session.post(gateway.proxy_url + ack, headers=worker_headers())
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
        response.close()
        async with session.get(gateway.admin_url + "/metrics") as scraped:
            metrics = await scraped.text()
    # Counted once, as the reset it was.
    assert 'heartbeat_gateway_upstream_errors_total{kind="reset",route="ack"} 1.0' in metrics
