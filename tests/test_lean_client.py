"""The lean upstream client against aiohttp's: the same exchanges, the same bytes upstream, the same answers
and the same errors, faults included.

Checks `gateway/upstream/lean.py`: each case runs once through `HttpUpstream` with `upstream.client: lean`
and once with `aiohttp`, against a scripted upstream that records every byte it is sent, and compares what
the upstream saw and what the caller got (the answer, or the `UpstreamError`'s kind, message and whether it
may have reached the upstream, which the heartbeat path's retry rules read).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from gateway.config.settings import PoolName, UpstreamClient, UpstreamSettings, UpstreamTls
from gateway.errors import UpstreamError
from gateway.policy.egress import ProxyRoute
from gateway.upstream import lean
from gateway.upstream.client import HttpUpstream, UpstreamRequest

CLIENTS: tuple[UpstreamClient, ...] = ("lean", "aiohttp")
HEARTBEAT = "/v1/environments/env_1/work/work_1/heartbeat?expected_last_heartbeat=NO_HEARTBEAT&desired_ttl_seconds=60"
HEADERS = (("Authorization", "Bearer sk-ant-key"), ("anthropic-beta", "managed-agents-2026-04-01"), ("X-Odd", "a;b"))
JSON_200 = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nrequest-id: req_1\r\nContent-Length: 15\r\n\r\n"
    b'{"state":"hi"}\n'
)

# Past aiohttp's bounds on an answer's head (128 headers, 8190 bytes a field), which the lean client keeps.
TOO_MANY_HEADERS = (
    b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"Content-Length: 0\r\n\r\n"
)
HEADER_TOO_LARGE = b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * 9000 + b"\r\nContent-Length: 0\r\n\r\n"

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@dataclass
class Upstream:
    """A scripted upstream: each connection's requests as received (request line, headers, body)."""

    script: Script
    connections: list[list[bytes]] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def stop(self, server: asyncio.Server) -> None:
        """The server and every connection it took closed now, though a script still sleeps (a silent upstream):
        a socket left for the test loop's end would be reported unclosed by a later test."""
        server.close()
        for writer in self.writers:
            writer.close()
        await server.wait_closed()
        await asyncio.sleep(0.01)  # the transports' close takes a turn of the loop

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received: list[bytes] = []
        self.connections.append(received)
        self.writers.append(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lengths = [line.split(b":")[1] for line in head.lower().split(b"\r\n") if b"content-length:" in line]
                length = int(lengths[0]) if lengths else 0
                received.append(head + await reader.readexactly(length))
                await self.script(reader, writer, len(received))
        finally:
            writer.close()


@dataclass
class Outcome:
    status: int | None = None
    reason: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    # The error's class, kind, message and whether it may have reached the upstream.
    error: tuple[str, str, str, bool] | None = None
    # What the upstream received, connection by connection.
    seen: list[list[bytes]] = field(default_factory=list)


async def run(
    client: UpstreamClient,
    script: Script,
    requests: list[UpstreamRequest],
    *,
    tls: tuple[ssl.SSLContext, str] | None = None,
    within: float = 2.0,
    proxy: str | None = None,
) -> list[Outcome]:
    """Each request in turn through one `HttpUpstream`, against a fresh scripted upstream."""
    upstream = Upstream(script)
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0, ssl=tls[0] if tls else None)
    port = server.sockets[0].getsockname()[1]
    scheme = "https" if tls else "http"
    settings = UpstreamSettings(
        base_url=f"{scheme}://localhost:{port}" if tls else f"http://127.0.0.1:{port}",
        connect_timeout_seconds=1.0,
        request_timeout_seconds=within,
        tls=UpstreamTls(ca_files=(tls[1],)) if tls else UpstreamTls(),
        client=client,
    )
    http = HttpUpstream(settings, egress=ProxyRoute(proxy, "the test") if proxy else None)
    outcomes = []
    try:
        for request in requests:
            outcome = Outcome()
            try:
                async with http.exchange(request) as answer:
                    outcome.status, outcome.reason, outcome.headers = answer.status, answer.reason, answer.headers
                    async for chunk in answer.chunks():
                        outcome.body += chunk
            except UpstreamError as error:
                outcome.error = (type(error).__name__, error.kind, error.message, error.may_have_reached_upstream)
            outcomes.append(outcome)
            await asyncio.sleep(0.02)  # the upstream's side of a close is seen before the next request
    finally:
        await http.close()
        await upstream.stop(server)
    for outcome in outcomes:
        outcome.seen = upstream.connections
    return outcomes


async def differential(script: Script, requests: list[UpstreamRequest], **options: object) -> list[Outcome]:
    """The outcomes, once they are shown to be the same with either client."""
    lean = await run("lean", script, requests, **options)  # type: ignore[arg-type]
    reference = await run("aiohttp", script, requests, **options)  # type: ignore[arg-type]
    assert [_shown(o) for o in lean] == [_shown(o) for o in reference]
    return lean


def _shown(outcome: Outcome) -> object:
    """An outcome as compared: the Host header's port differs from run to run, so it is left out."""
    seen = [[_without_host(request) for request in connection] for connection in outcome.seen]
    return (outcome.status, outcome.reason, outcome.headers, outcome.body, outcome.error, seen)


def _without_host(request: bytes) -> bytes:
    return b"\r\n".join(line for line in request.split(b"\r\n") if not line.lower().startswith(b"host:"))


def heartbeat(body: bytes | None = b"{}") -> UpstreamRequest:
    return UpstreamRequest("POST", HEARTBEAT, HEADERS, body, route="heartbeat", pool=PoolName.LEASE)


def get(target: str = "/v1/environments/env_1/work/work_1") -> UpstreamRequest:
    return UpstreamRequest("GET", target, HEADERS, None, route="work")


def answer(data: bytes) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(data)
        await writer.drain()

    return script


# -- answers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(JSON_200, id="content-length"),
        pytest.param(
            b"HTTP/1.1 412 Precondition Failed\r\nContent-Type: application/json\r\nretry-after: 2\r\n"
            b'Content-Length: 24\r\n\r\n{"type":"error","x":412}',
            id="412",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", id="chunked"
        ),
        pytest.param(b"HTTP/1.1 204 No Content\r\nrequest-id: req_2\r\n\r\n", id="204"),
        pytest.param(b"HTTP/1.1 100 Continue\r\n\r\n" + JSON_200, id="interim-100"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-Latin: caf\xe9\r\nX-Utf8: caf\xc3\xa9\r\nContent-Length: 2\r\n\r\nok",
            id="header-bytes",
        ),
        pytest.param(b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\nContent-Length: 0\r\n\r\n", id="429"),
    ],
)
async def test_answers_and_requests_are_the_same_as_aiohttps(data: bytes) -> None:
    requests = [heartbeat(), heartbeat(None), get(), UpstreamRequest("DELETE", "/v1/x", HEADERS, None)]
    outcomes = await differential(answer(data), requests)
    assert all(o.error is None for o in outcomes)
    # Kept alive: one connection for the lease class's two heartbeats, one for the other class's calls.
    assert sorted(map(len, outcomes[0].seen)) == [2, 2]


async def test_an_answer_framed_by_the_connections_end_is_read_whole_and_the_connection_not_reused() -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + b"x" * 100_000

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(data)
        await writer.drain()
        writer.close()

    outcomes = await differential(script, [get(), get()])
    assert [len(o.body) for o in outcomes] == [100_000, 100_000]
    assert len(outcomes[0].seen) == 2


async def test_a_large_answer_is_streamed_whole() -> None:
    body = bytes(range(256)) * 8192  # 2 MiB: past the flow control's high water, read as the caller reads
    data = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    outcomes = await differential(answer(data), [get(), get()])
    assert [o.body == body for o in outcomes] == [True, True]


# -- faults -----------------------------------------------------------------------------------


async def _close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    writer.close()


async def _reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    writer.transport.abort()


async def _cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b'{"partial":')
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.transport.abort()


async def _cut_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    await asyncio.sleep(1.5)


async def _slow_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    await writer.drain()
    await asyncio.sleep(1.5)


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        (_close, ("UpstreamUnavailable", "reset", "the upstream closed the connection", True)),
        (_cut, ("UpstreamUnavailable", "reset", "the upstream response was cut off", True)),
        (_cut_chunked, ("UpstreamUnavailable", "reset", "the upstream response was cut off", True)),
        (
            answer(b"HTTP/1.1 2x0 OK\r\n\r\n"),
            ("UpstreamUnavailable", "other", "the upstream sent an invalid HTTP response", True),
        ),
        (
            answer(b"NOT HTTP AT ALL\r\n\r\n"),
            ("UpstreamUnavailable", "other", "the upstream sent an invalid HTTP response", True),
        ),
        (
            answer(TOO_MANY_HEADERS),
            ("UpstreamUnavailable", "other", "the upstream sent an invalid HTTP response", True),
        ),
        (
            answer(HEADER_TOO_LARGE),
            ("UpstreamUnavailable", "other", "the upstream sent an invalid HTTP response", True),
        ),
        (_silent, ("UpstreamTimeout", "timeout", "the upstream did not answer in time", True)),
        (_slow_body, ("UpstreamTimeout", "timeout", "the upstream did not answer in time", True)),
    ],
    ids=[
        "closed",
        "cut",
        "cut-chunked",
        "bad-status",
        "not-http",
        "too-many-headers",
        "header-too-large",
        "no-answer",
        "body-too-slow",
    ],
)
async def test_a_fault_after_the_request_went_is_the_same_error_and_may_have_reached(
    script: Script, expected: tuple[str, str, str, bool]
) -> None:
    outcomes = await differential(script, [heartbeat()], within=0.5)
    # The heartbeat path may not send such a request again: it may have been applied.
    assert outcomes[0].error == expected
    assert len(outcomes[0].seen[0]) == 1  # it did reach the upstream, whole


async def test_a_reset_before_the_answer_may_have_reached() -> None:
    """aiohttp and the lean client word a reset apart from a close as the socket tells them; both may have reached."""
    for client in CLIENTS:
        [outcome] = await run(client, _reset, [heartbeat()])
        assert outcome.error is not None
        assert (outcome.error[1], outcome.error[3]) == ("reset", True)


async def test_a_connection_the_upstream_closed_while_idle_is_not_used_again() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(JSON_200.replace(b"\r\n\r\n", b"\r\nKeep-Alive: timeout=0\r\n\r\n", 1))
        await writer.drain()
        writer.close()  # closed after the answer, without saying so in it

    outcomes = await differential(script, [heartbeat(), heartbeat(), get()])
    assert all(o.error is None for o in outcomes)
    assert len(outcomes[0].seen) == 3


async def test_an_upstream_that_refuses_connections_was_never_sent_anything() -> None:
    for client in CLIENTS:
        outcomes = await _refused(client)
        assert outcomes == [("UpstreamUnavailable", "connect", "cannot connect to the upstream", False)]


async def _refused(client: UpstreamClient) -> list[tuple[str, str, str, bool] | None]:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    http = HttpUpstream(UpstreamSettings(base_url=f"http://127.0.0.1:{port}", client=client))
    outcomes: list[tuple[str, str, str, bool] | None] = []
    try:
        async with http.exchange(heartbeat()):
            outcomes.append(None)
    except UpstreamError as error:
        outcomes.append((type(error).__name__, error.kind, error.message, error.may_have_reached_upstream))
    finally:
        await http.close()
    return outcomes


async def _trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    writer.write(JSON_200[:-5])
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.write(JSON_200[-5:])
    await writer.drain()


async def test_leaving_before_the_answer_is_whole_closes_the_connection() -> None:
    """How an HTTP/1.1 client cancels: the next exchange goes on a new connection, for both clients."""
    for client in CLIENTS:
        upstream = Upstream(_trickle)
        server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        http = HttpUpstream(UpstreamSettings(base_url=f"http://127.0.0.1:{port}", client=client))
        try:
            async with http.exchange(get()) as response:
                assert response.status == 200  # and the body is left unread
            async with http.exchange(get()) as response:
                assert b"".join([chunk async for chunk in response.chunks()]).startswith(b'{"state"')
        finally:
            await http.close()
            await upstream.stop(server)
        assert len(upstream.connections) == 2, client


# -- TLS ----------------------------------------------------------------------------------------


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, str]:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return context, str(ca_file)


async def test_over_tls_the_exchanges_are_the_same(tls: tuple[ssl.SSLContext, str]) -> None:
    outcomes = await differential(answer(JSON_200), [heartbeat(), heartbeat(), get()], tls=tls)
    assert [o.status for o in outcomes] == [200, 200, 200]
    assert sorted(map(len, outcomes[0].seen)) == [1, 2]


async def test_a_certificate_from_an_unknown_authority_is_the_same_refusal(
    tls: tuple[ssl.SSLContext, str], tmp_path: Path
) -> None:
    stranger = tmp_path / "stranger.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    outcomes = await differential(answer(JSON_200), [heartbeat()], tls=(tls[0], str(stranger)))
    assert outcomes[0].error is not None
    assert outcomes[0].error[1:] == (
        "tls",
        "the upstream's TLS certificate was not accepted: unable to get local issuer certificate",
        False,
    )
    assert outcomes[0].seen == []  # not even a connection: the handshake failed


async def test_bytes_sent_on_an_idle_connection_are_never_taken_for_the_next_answer() -> None:
    """An upstream that answers twice (or a desynchronised one): the extra answer arrives while the connection
    waits unused. The next request must get its own answer, on another connection.

    The one place the lean client is held to more than aiohttp's: aiohttp 3.14's client hands the stray
    answer to the next request on that connection (a heartbeat would be answered another's 409).
    """

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(JSON_200)
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"HTTP/1.1 409 Conflict\r\nContent-Length: 5\r\n\r\nstale")
        await writer.drain()

    outcomes = await run("lean", script, [heartbeat(), heartbeat()])
    assert [(o.status, o.body) for o in outcomes] == [(200, b'{"state":"hi"}\n')] * 2
    assert len(outcomes[0].seen) == 2


async def test_a_connection_left_unused_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lean, "IDLE_SECONDS", 0.2)
    closed = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(JSON_200)
        await writer.drain()
        await reader.read()  # until the client closes it
        closed.set()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    http = HttpUpstream(UpstreamSettings(base_url=f"http://127.0.0.1:{port}", client="lean"))
    try:
        async with http.exchange(get()) as response:
            assert response.status == 200
        await asyncio.wait_for(closed.wait(), 2.0)
    finally:
        await http.close()
        server.close()
        await server.wait_closed()


async def test_a_second_answer_in_the_same_read_is_not_taken_for_part_of_the_first() -> None:
    """The answer and an unasked-for one arrive together: the first stands whole, the connection is dropped."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(JSON_200 + b"HTTP/1.1 409 Conflict\r\nContent-Length: 16\r\n\r\n" + b'{"type":"error"}')
        await writer.drain()

    outcomes = await run("lean", script, [heartbeat(), heartbeat()])
    assert [(o.status, o.body) for o in outcomes] == [(200, b'{"state":"hi"}\n')] * 2
    assert len(outcomes[0].seen) == 2


async def test_a_connection_left_with_its_reading_paused_reads_the_next_answer() -> None:
    """A large answer the caller leaves after one chunk, whole on the wire (so kept), reading paused by flow
    control: the next call on it is answered, not timed out."""
    big = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (400 * 1024) + b"x" * (400 * 1024)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(big if n == 1 else JSON_200)
        await writer.drain()

    for client in CLIENTS:
        upstream = Upstream(script)
        server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        http = HttpUpstream(
            UpstreamSettings(base_url=f"http://127.0.0.1:{port}", client=client, request_timeout_seconds=2)
        )
        try:
            async with http.exchange(get()) as response:
                await asyncio.sleep(0.2)  # the whole answer arrives meanwhile
                async for _ in response.chunks():
                    break
            async with http.exchange(get()) as response:
                assert (response.status, b"".join([c async for c in response.chunks()])) == (200, b'{"state":"hi"}\n')
        finally:
            await http.close()
            await upstream.stop(server)


async def test_an_endless_header_is_refused_as_it_arrives() -> None:
    """llhttp gathers a header whole before it calls back: the head is bounded as its bytes come."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nX-Huge: ")
        for _ in range(48):
            writer.write(b"v" * (512 * 1024))
            await writer.drain()

    [outcome] = await run("lean", script, [heartbeat()])
    assert outcome.error == ("UpstreamUnavailable", "other", "the upstream sent an invalid HTTP response", True)


async def _closes_the_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    if n == 2:
        writer.transport.abort()
        return
    writer.write(JSON_200)
    await writer.drain()


async def test_an_idempotent_call_whose_kept_connection_closed_is_sent_again_a_heartbeat_never() -> None:
    """As aiohttp: a GET on a connection the upstream closed without answering goes once more, on a new one.
    A POST (a heartbeat) may have been applied: its error goes to the heartbeat path, which decides."""
    gets = await differential(_closes_the_second, [get(), get()])
    assert [o.status for o in gets] == [200, 200]
    beats = await differential(_closes_the_second, [heartbeat(), heartbeat()])
    assert beats[0].status == 200
    assert beats[1].error is not None
    assert (beats[1].error[1], beats[1].error[3]) == ("reset", True)


async def test_through_an_egress_proxys_tunnel_the_exchanges_are_the_same(
    tls: tuple[ssl.SSLContext, str], tinyproxy: tuple[str, Path]
) -> None:
    proxy_url, proxy_log = tinyproxy
    outcomes = await differential(answer(JSON_200), [heartbeat(), heartbeat(), get()], tls=tls, proxy=proxy_url)
    assert [o.status for o in outcomes] == [200, 200, 200]
    assert sorted(map(len, outcomes[0].seen)) == [1, 2]  # a tunnel per class, kept alive
    assert proxy_log.read_text().count("CONNECT") >= 4  # two tunnels for each client


async def test_through_an_egress_proxy_to_an_http_upstream_the_exchanges_are_the_same(
    tinyproxy: tuple[str, Path],
) -> None:
    """Absolute form, to the proxy (an http:// upstream off loopback needs `allow_insecure_http`)."""
    proxy_url, _ = tinyproxy
    outcomes = await differential(answer(JSON_200), [heartbeat(), get()], proxy=proxy_url)
    assert [o.status for o in outcomes] == [200, 200]


async def test_a_tls_handshake_that_never_ends_is_a_connect_timeout_that_sent_nothing() -> None:
    """The upstream takes the TCP connection but never answers the TLS hello: nothing was sent, so the
    heartbeat path may send the beat again."""
    accepted: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = UpstreamSettings(
        base_url=f"https://127.0.0.1:{port}", connect_timeout_seconds=0.3, request_timeout_seconds=5, client="lean"
    )
    http = HttpUpstream(settings)
    try:
        with pytest.raises(UpstreamError) as caught:
            async with http.exchange(heartbeat()):
                pass
    finally:
        await http.close()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
    error = caught.value
    assert (error.kind, error.message, error.may_have_reached_upstream) == (
        "timeout",
        "timed out connecting to the upstream (or in its TLS handshake)",
        False,
    )


async def test_the_deadline_closes_the_connection_even_while_the_answer_waits_unread() -> None:
    """How an HTTP/1.1 client cancels: at the exchange's deadline the upstream sees the connection close, though
    the caller still holds the answer (a worker slow to take it)."""
    closed = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()
        await reader.read()
        closed.set()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    http = HttpUpstream(UpstreamSettings(base_url=f"http://127.0.0.1:{port}", request_timeout_seconds=0.3))
    try:
        async with http.exchange(get()) as response:
            assert response.status == 200
            # The answer left unread past the deadline: closed meanwhile, not when the caller leaves.
            await asyncio.wait_for(closed.wait(), 3.0)
    finally:
        await http.close()
        server.close()
        await server.wait_closed()


async def test_an_upstream_that_speaks_no_tls_is_the_same_handshake_failure_that_sent_nothing() -> None:
    """An https:// base URL answered in plain HTTP: OpenSSL's reason is named, nothing was sent."""

    async def http_to_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the TLS hello's first byte, answered as a plain HTTP server would
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    errors = []
    for client in CLIENTS:
        server = await asyncio.start_server(http_to_tls, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        http = HttpUpstream(UpstreamSettings(base_url=f"https://127.0.0.1:{port}", client=client))
        try:
            with pytest.raises(UpstreamError) as caught:
                async with http.exchange(heartbeat()):
                    pass
        finally:
            await http.close()
            server.close()
            await server.wait_closed()
        error = caught.value
        errors.append((error.kind, error.message, error.may_have_reached_upstream))
    assert errors[0] == errors[1]
    assert errors[0][0] == "tls"
    assert errors[0][1].startswith("the TLS handshake with the upstream failed: ")
    assert errors[0][2] is False
