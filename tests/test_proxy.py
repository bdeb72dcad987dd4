"""The proxy path against real sockets: forwarding fidelity, credentials, refusals, streaming, limits.

Checks `gateway/edge/proxy.py`, `gateway/errors.py`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.app import Gateway

from .raw_http import FAST, raw, status_and_json
from .support import (
    ALL_ENVIRONMENTS_CLIENTS,
    API_KEY,
    BETA,
    DEFAULT_CREDENTIAL,
    ENV_ID,
    ENV_KEY,
    LIMITED_TOKEN,
    OTHER_ENV_ID,
    OTHER_ENV_KEY,
    TOKEN,
    UNSERVED_ENV_ID,
    GatewayFactory,
    Recorder,
    header,
    make_settings,
    worker_headers,
)


async def send(
    gateway: Gateway, method: str, target: str, headers: dict[str, str] | None = None, data: bytes | None = None
) -> tuple[int, CIMultiDict[str], bytes]:
    """A raw-target request, so the path and query reach the gateway exactly as written."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            URL(gateway.proxy_url + target, encoded=True),
            headers=headers,
            data=data,
            skip_auto_headers=["Content-Type"],
        ) as response,
    ):
        return response.status, CIMultiDict(response.headers), await response.read()


@pytest.fixture
async def via_recorder(recorder: tuple[Recorder, str], make_gateway: GatewayFactory) -> tuple[Recorder, Gateway]:
    rec, url = recorder
    return rec, await make_gateway(url)


async def test_path_and_query_are_forwarded_byte_for_byte(via_recorder: tuple[Recorder, Gateway]) -> None:
    rec, gateway = via_recorder
    target = f"/v1/environments/{ENV_ID}/work?limit=5&page=a%2Fb%3D%3D&tag=x&tag=y&beta=true&empty="
    status, _, _ = await send(gateway, "GET", target, worker_headers())
    assert status == 200
    assert rec.requests[0].raw_path == target
    assert rec.requests[0].method == "GET"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE"])
async def test_any_method_is_forwarded_with_its_body(via_recorder: tuple[Recorder, Gateway], method: str) -> None:
    rec, gateway = via_recorder
    body = b'{"metadata": {"k": "v"}}' if method not in ("GET", "DELETE") else None
    status, _, _ = await send(gateway, method, "/v1/sessions/session_1/events", {"x-api-key": TOKEN}, body)
    assert status == 200
    assert rec.requests[0].method == method
    assert rec.requests[0].body == (body or b"")


async def test_environment_paths_carry_the_environment_key_as_bearer_only(
    via_recorder: tuple[Recorder, Gateway],
) -> None:
    rec, gateway = via_recorder
    # The client presents its token both ways; upstream must see one credential, the real key.
    await send(gateway, "GET", f"/v1/environments/{ENV_ID}/work/stats", {**worker_headers(), "x-api-key": TOKEN})
    await send(gateway, "GET", f"/v1/environments/{OTHER_ENV_ID}/work/stats", {"x-api-key": LIMITED_TOKEN})
    first, second = rec.requests
    assert header(first.headers, "Authorization") == [f"Bearer {ENV_KEY}"]
    assert header(first.headers, "x-api-key") == []
    assert header(second.headers, "Authorization") == [f"Bearer {OTHER_ENV_KEY}"]


async def test_session_paths_carry_the_key_of_the_tokens_one_environment(
    via_recorder: tuple[Recorder, Gateway],
) -> None:
    rec, gateway = via_recorder
    await send(gateway, "GET", "/v1/sessions/session_1/events", worker_headers())
    await send(gateway, "GET", "/v1/skills/skill_1/versions/latest", {"x-api-key": LIMITED_TOKEN})
    assert header(rec.requests[0].headers, "Authorization") == [f"Bearer {ENV_KEY}"]
    assert header(rec.requests[0].headers, "x-api-key") == []
    assert header(rec.requests[1].headers, "Authorization") == [f"Bearer {OTHER_ENV_KEY}"]


async def test_foreign_credentials_pass_through_untouched(via_recorder: tuple[Recorder, Gateway]) -> None:
    rec, gateway = via_recorder
    sessions_token = "sk-ant-req-per-item-token"
    await send(gateway, "POST", f"/v1/environments/{ENV_ID}/work/work_1/stop", worker_headers(sessions_token))
    await send(gateway, "GET", "/v1/memory_stores/ms_1", {"x-api-key": "sk-ant-api03-workers-own-key"})
    assert header(rec.requests[0].headers, "Authorization") == [f"Bearer {sessions_token}"]
    assert header(rec.requests[1].headers, "x-api-key") == ["sk-ant-api03-workers-own-key"]


@pytest.mark.parametrize(
    ("target", "headers", "status", "error_type"),
    [
        (f"/v1/environments/{ENV_ID}/work/poll", {}, 401, "authentication_error"),
        (f"/v1/environments/{ENV_ID}/work/poll", {"Authorization": f"Bearer {LIMITED_TOKEN}"}, 403, "permission_error"),
        (f"/v1/environments/{UNSERVED_ENV_ID}/work/poll", worker_headers(), 403, "permission_error"),
        (f"/v1/environments/{UNSERVED_ENV_ID}/work/poll", worker_headers("someone-elses-key"), 403, "permission_error"),
        ("/v1/messages", worker_headers(), 404, "not_found_error"),
        ("/healthz", {}, 404, "not_found_error"),
        ("/readyz", {}, 404, "not_found_error"),
        ("/metrics", {}, 404, "not_found_error"),
        ("/admin/config", worker_headers(), 404, "not_found_error"),
        ("/v1/environments", worker_headers(), 404, "not_found_error"),
        ("/v1/sessions/../environments/x/work/poll", worker_headers(), 400, "invalid_request_error"),
        ("/v1/sessions/%2e%2e/environments/x", worker_headers(), 400, "invalid_request_error"),
        ("/v1/sessions/a%2Fb", worker_headers(), 400, "invalid_request_error"),
        ("/v1/sessions/a%zz", worker_headers(), 400, "invalid_request_error"),
        ("/v1/sessions//events", worker_headers(), 400, "invalid_request_error"),
        (f"/v1/environments/{ENV_ID}/work/w/heartbeat?desired_ttl_seconds=0", worker_headers(), 400, None),
        (f"/v1/environments/{ENV_ID}/work/w/heartbeat?desired_ttl_seconds=abc", worker_headers(), 400, None),
        (f"/v1/environments/{ENV_ID}/work/w/heartbeat?expected_last_heartbeat=", worker_headers(), 400, None),
        (
            f"/v1/environments/{ENV_ID}/work/w/heartbeat?expected_last_heartbeat=a&expected_last_heartbeat=b",
            worker_headers(),
            400,
            None,
        ),
    ],
)
async def test_refusals_never_reach_the_upstream(
    via_recorder: tuple[Recorder, Gateway],
    target: str,
    headers: dict[str, str],
    status: int,
    error_type: str | None,
) -> None:
    rec, gateway = via_recorder
    method = "POST" if "heartbeat" in target else "GET"
    got, response_headers, body = await send(gateway, method, target, headers)
    assert got == status
    assert response_headers["Content-Type"].startswith("application/json")
    error = json.loads(body)
    assert error["type"] == "error"
    assert error["error"]["type"] == (error_type or "invalid_request_error")
    assert rec.requests == []


async def test_unauthenticated_requests_get_the_key_only_when_allowed(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    rec, url = recorder
    open_gateway = await make_gateway(url, DEFAULT_CREDENTIAL, clients="clients: {allow_unauthenticated: true}")
    status, _, _ = await send(open_gateway, "GET", f"/v1/environments/{ENV_ID}/work/stats")
    assert status == 200
    assert header(rec.requests[-1].headers, "Authorization") == [f"Bearer {ENV_KEY}"]
    # Two environments: the skill's is unknown, so only the configured fallback tells.
    status, _, _ = await send(open_gateway, "GET", "/v1/skills/skill_1")
    assert status == 200
    assert header(rec.requests[-1].headers, "x-api-key") == [API_KEY]


async def test_no_default_credential_means_no_upstream_call(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    rec, url = recorder
    gateway = await make_gateway(url, clients=ALL_ENVIRONMENTS_CLIENTS)
    status, _, body = await send(gateway, "GET", "/v1/skills/skill_1", worker_headers())
    assert status == 403
    message = json.loads(body)["error"]["message"]
    assert "cannot tell which environment skill skill_1 belongs to" in message
    assert "default_credential.use_for" in message
    assert rec.requests == []


async def test_headers_hop_by_hop_dropped_betas_merged_version_defaulted(
    via_recorder: tuple[Recorder, Gateway],
) -> None:
    rec, gateway = via_recorder
    status, response_headers, _ = await send(
        gateway,
        "GET",
        f"/v1/environments/{ENV_ID}/work/stats",
        {
            **worker_headers(),
            "anthropic-beta": "files-api-2025-04-14, managed-agents-2026-04-01",
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "drop me",
            "Proxy-Authorization": "Basic abc",
            "TE": "trailers",
            "x-stainless-helper": "environments-worker",
        },
    )
    assert status == 200
    sent = rec.requests[0].headers
    assert header(sent, "anthropic-beta") == ["files-api-2025-04-14,managed-agents-2026-04-01"]
    assert header(sent, "anthropic-version") == ["2023-06-01"]
    assert header(sent, "X-Secret-Hop") == []
    assert header(sent, "Proxy-Authorization") == []
    assert header(sent, "TE") == []
    assert header(sent, "x-stainless-helper") == ["environments-worker"]
    assert header(sent, "Host") == [rec_host(sent)]
    # Response headers the SDK reads come back.
    assert response_headers["request-id"] == "req_upstream_1"
    assert response_headers["retry-after"] == "7"
    assert response_headers["x-custom"] == "kept"


def rec_host(sent: list[tuple[str, str]]) -> str:
    (host,) = header(sent, "Host")
    assert host.startswith("127.0.0.1:")
    return host


async def test_client_version_header_is_kept(via_recorder: tuple[Recorder, Gateway]) -> None:
    rec, gateway = via_recorder
    await send(gateway, "GET", "/v1/skills/s", {**worker_headers(), "anthropic-version": "2099-01-01"})
    assert header(rec.requests[0].headers, "anthropic-version") == ["2099-01-01"]
    assert header(rec.requests[0].headers, "anthropic-beta") == [BETA]


async def test_heartbeat_gets_the_configured_ttl_only_when_it_has_none(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    rec, url = recorder
    gateway = await make_gateway(url, "heartbeat: {desired_ttl_seconds: 45}")
    base = f"/v1/environments/{ENV_ID}/work/work_1/heartbeat"
    await send(gateway, "POST", base + "?expected_last_heartbeat=NO_HEARTBEAT&beta=true", worker_headers())
    await send(gateway, "POST", base + "?desired_ttl_seconds=90", worker_headers())
    await send(gateway, "POST", base, worker_headers())
    assert [r.raw_path for r in rec.requests] == [
        base + "?expected_last_heartbeat=NO_HEARTBEAT&beta=true&desired_ttl_seconds=45",
        base + "?desired_ttl_seconds=90",
        base + "?desired_ttl_seconds=45",
    ]


async def test_oversized_body_is_refused_without_reading_it_or_calling_upstream(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    rec, url = recorder
    gateway = await make_gateway(url, "limits: {max_body_bytes: 1024, shutdown_grace_seconds: 1}")
    host, port = gateway.proxy_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    # Announce 1 GiB and send only the head: the answer must come without the body.
    writer.write(
        (
            f"POST /v1/sessions/s/events HTTP/1.1\r\nHost: x\r\nx-api-key: {TOKEN}\r\n"
            "Content-Length: 1073741824\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    started = time.monotonic()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    elapsed = time.monotonic() - started
    writer.close()
    assert head.startswith(b"HTTP/1.1 413")
    assert b"Connection: close" in head
    assert json.loads(body)["error"]["type"] == "request_too_large"
    assert elapsed < 1
    assert rec.requests == []


async def test_chunked_upload_over_the_limit_is_cut_off(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    rec, url = recorder
    received = []

    async def slurp(request: web.Request) -> web.StreamResponse:
        try:
            received.append(len(await request.read()))
        except Exception:
            received.append(-1)
        return web.json_response({})

    rec.respond = slurp
    gateway = await make_gateway(url, "limits: {max_body_bytes: 100000, shutdown_grace_seconds: 1}")

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 50_000

    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.proxy_url + "/v1/sessions/s/events", data=chunks(), headers={"x-api-key": TOKEN}) as r,
    ):
        assert r.status == 413
        assert (await r.json())["error"]["type"] == "request_too_large"
    # Whatever reached the upstream was an incomplete body, never a complete oversized one.
    assert all(n <= 100_000 for n in received)


async def test_large_upload_is_streamed_not_buffered(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    rec, url = recorder
    first_bytes_at: list[float] = []
    total = 0

    async def stream_in(request: web.Request) -> web.StreamResponse:
        nonlocal total
        async for chunk in request.content.iter_any():
            if not first_bytes_at:
                first_bytes_at.append(time.monotonic())
            total += len(chunk)
        return web.json_response({"received": total})

    rec.respond = stream_in
    gateway = await make_gateway(url)
    finished_sending: list[float] = []

    async def slow_body() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"y" * 256 * 1024
            await asyncio.sleep(0.05)
        finished_sending.append(time.monotonic())

    async with (
        aiohttp.ClientSession() as session,
        session.put(gateway.proxy_url + "/v1/skills/s/files", data=slow_body(), headers={"x-api-key": TOKEN}) as r,
    ):
        assert (await r.json())["received"] == 20 * 256 * 1024
    # The upstream saw data long before the client finished: nothing waited for the whole body.
    assert first_bytes_at[0] < finished_sending[0] - 0.5


async def test_sse_events_reach_the_worker_one_by_one(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    rec, url = recorder

    async def sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "request-id": "req_sse"})
        await response.prepare(request)
        for i in range(4):
            await response.write(f'event: message\ndata: {{"n": {i}}}\n\n'.encode())
            await asyncio.sleep(0.25)
        await response.write_eof()
        return response

    rec.respond = sse
    gateway = await make_gateway(url)
    arrivals: list[tuple[float, bytes]] = []
    started = time.monotonic()
    async with (
        aiohttp.ClientSession() as session,
        session.get(gateway.proxy_url + "/v1/sessions/session_1/events/stream", headers=worker_headers()) as r,
    ):
        assert r.headers["Content-Type"] == "text/event-stream"
        async for line in r.content:
            if line.startswith(b"data:"):
                arrivals.append((time.monotonic() - started, line))
    assert [line for _, line in arrivals] == [f'data: {{"n": {i}}}\n'.encode() for i in range(4)]
    # Each event arrived about when it was sent, not all at the end.
    assert arrivals[0][0] < 0.2
    assert arrivals[3][0] - arrivals[0][0] > 0.6


async def test_long_poll_is_not_delayed(simulator, gateway: Gateway) -> None:  # type: ignore[no-untyped-def]
    target = f"/v1/environments/{ENV_ID}/work/poll?block_ms=999"
    started = time.monotonic()
    task = asyncio.ensure_future(send(gateway, "GET", target, worker_headers()))
    await asyncio.sleep(0.2)
    simulator.sim.enqueue(ENV_ID)
    status, _, body = await task
    elapsed = time.monotonic() - started
    assert status == 200
    assert json.loads(body)["state"] == "queued"
    # The item appeared at 0.2 s; the answer came then, not at the end of the 999 ms block.
    assert elapsed < 0.6
    status, _, body = await send(gateway, "GET", target, worker_headers())
    assert (status, body) == (200, b"null")


async def test_client_disconnect_mid_stream_cancels_the_upstream_request(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    rec, url = recorder
    upstream_done = asyncio.Event()
    upstream_outcome: list[str] = []

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i in range(1000):
                await response.write(f"data: {i}\n\n".encode())
                await asyncio.sleep(0.05)
            upstream_outcome.append("finished")
        except (ConnectionResetError, asyncio.CancelledError):
            upstream_outcome.append("cancelled")
            raise
        finally:
            upstream_done.set()
        return response

    rec.respond = endless
    gateway = await make_gateway(url)
    async with aiohttp.ClientSession() as session:
        response = await session.get(gateway.proxy_url + "/v1/sessions/s/events/stream", headers=worker_headers())
        await response.content.readline()
        response.close()  # the worker goes away mid-stream
    await asyncio.wait_for(upstream_done.wait(), 5)
    assert upstream_outcome == ["cancelled"]


async def test_client_disconnect_before_the_answer_cancels_the_upstream_request(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    rec, url = recorder
    upstream_cancelled = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            upstream_cancelled.set()
            raise
        return web.json_response({})

    rec.respond = slow
    gateway = await make_gateway(url)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TimeoutError):
            async with session.get(
                gateway.proxy_url + "/v1/sessions/s", headers=worker_headers(), timeout=aiohttp.ClientTimeout(0.3)
            ):
                pass
    await asyncio.wait_for(upstream_cancelled.wait(), 5)


async def test_malformed_http_does_not_crash_the_gateway(gateway: Gateway) -> None:
    host, port = gateway.proxy_url.removeprefix("http://").split(":")
    for garbage in (
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"GET /v1/sessions/\xff\xfe HTTP/1.1\r\n\r\n",
        b"GET http://evil.example/v1/sessions/x HTTP/1.1\r\nHost: evil\r\n\r\n",
        b"POST /v1/sessions/x HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(garbage)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(4096), 5)
        writer.close()
        assert answer[:10] in (b"HTTP/1.1 4", b"HTTP/1.0 4") or answer == b"", answer
    # Still serving.
    status, _, _ = await send(gateway, "GET", f"/v1/environments/{ENV_ID}/work/stats", worker_headers())
    assert status == 200


async def test_client_disconnect_mid_upload_aborts_the_upstream_request(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    rec, url = recorder
    outcome: list[str] = []
    done = asyncio.Event()

    async def read_all(request: web.Request) -> web.StreamResponse:
        try:
            await request.read()
            outcome.append("complete")
        except (aiohttp.ClientError, ConnectionError, asyncio.CancelledError):
            outcome.append("aborted")
            raise
        finally:
            done.set()
        return web.json_response({})

    rec.respond = read_all
    gateway = await make_gateway(url)
    host, port = gateway.proxy_url.removeprefix("http://").split(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"PUT /v1/skills/s/files HTTP/1.1\r\nHost: x\r\nx-api-key: {TOKEN}\r\nContent-Length: 1000000\r\n\r\n".encode()
        + b"z" * 100_000
    )
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.transport.abort()  # the worker dies mid-upload
    await asyncio.wait_for(done.wait(), 5)
    # The upstream never saw a complete request it could apply.
    assert outcome == ["aborted"]
    # And the gateway is fine.
    assert (await send(gateway, "GET", "/v1/skills/s", worker_headers()))[0] == 200


async def test_repeated_credential_headers_are_refused(via_recorder: tuple[Recorder, Gateway]) -> None:
    rec, gateway = via_recorder
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            gateway.proxy_url + f"/v1/environments/{ENV_ID}/work/stats",
            headers=[("Authorization", f"Bearer {TOKEN}"), ("Authorization", "Bearer sk-ant-other")],
        ) as response,
    ):
        assert response.status == 400
        assert (await response.json())["error"]["type"] == "invalid_request_error"
    assert rec.requests == []


async def test_compressed_bodies_pass_through_as_received(via_recorder: tuple[Recorder, Gateway]) -> None:
    """Decompressing would forward fewer bytes than Content-Length announces, and the
    upstream would read the next pooled request (with another key) as the rest."""
    rec, gateway = via_recorder
    import gzip

    body = gzip.compress(b'{"type": "user.tool_result"}')
    headers = {**worker_headers(), "Content-Encoding": "gzip"}
    assert (await send(gateway, "POST", "/v1/sessions/s1/events", headers, body))[0] == 200
    heartbeat = f"/v1/environments/{ENV_ID}/work/w1/heartbeat?expected_last_heartbeat=NO_HEARTBEAT"
    assert (await send(gateway, "POST", heartbeat, headers, body))[0] == 200
    for recorded in rec.requests:
        assert recorded.body == body
        assert header(recorded.headers, "Content-Encoding") == ["gzip"]
        assert header(recorded.headers, "Content-Length") == [str(len(body))]


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {TOKEN},"},
        {"Authorization": f"Bearer {TOKEN}, Bearer other"},
        {"x-api-key": f"{TOKEN} x"},
        {**worker_headers(), "Cookie": f"session={TOKEN}"},
        {**worker_headers(), "x_api_key": TOKEN},
    ],
    ids=["trailing-comma", "two-bearers", "api-key-suffix", "cookie", "underscore-header"],
)
async def test_a_token_in_any_other_form_is_refused_not_forwarded(
    via_recorder: tuple[Recorder, Gateway], headers: dict[str, str]
) -> None:
    rec, gateway = via_recorder
    status, _, body = await send(gateway, "GET", "/v1/sessions/s1", headers)
    assert status == 401
    assert json.loads(body)["error"]["type"] == "authentication_error"
    assert rec.requests == []


async def test_a_token_in_the_query_is_refused(via_recorder: tuple[Recorder, Gateway]) -> None:
    rec, gateway = via_recorder
    status, _, _ = await send(gateway, "GET", f"/v1/sessions/s1?key={TOKEN[:3]}%2D{TOKEN[4:]}", worker_headers())
    assert status == 401
    assert rec.requests == []


async def test_a_tab_separated_bearer_is_still_the_token(via_recorder: tuple[Recorder, Gateway]) -> None:
    rec, gateway = via_recorder
    status, _, _ = await send(gateway, "GET", "/v1/sessions/s1", {"Authorization": f"Bearer\t{TOKEN}"})
    assert status == 200
    assert header(rec.requests[0].headers, "Authorization") == [f"Bearer {ENV_KEY}"]


@pytest.mark.parametrize("method", ["TRACE", "CONNECT", "PROPFIND"])
async def test_unusual_methods_are_refused(via_recorder: tuple[Recorder, Gateway], method: str) -> None:
    rec, gateway = via_recorder
    host, port = gateway.proxy_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"{method} /v1/sessions/s1 HTTP/1.1\r\nHost: x\r\nx-api-key: {TOKEN}\r\n\r\n".encode())
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status_line.split()[1] in (b"405", b"400", b"404")
    assert rec.requests == []


async def test_non_ascii_header_values_are_refused(via_recorder: tuple[Recorder, Gateway]) -> None:
    rec, gateway = via_recorder
    host, port = gateway.proxy_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET /v1/sessions/s1 HTTP/1.1\r\nHost: x\r\nx-api-key: {TOKEN}\r\nX-Note: caf".encode() + b"\xc3\xa9\r\n\r\n"
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status_line.split()[1] == b"400"
    assert rec.requests == []


async def test_a_stalled_body_gets_a_408_and_the_upstream_exchange_ends(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    rec, url = recorder
    upstream_done = asyncio.Event()

    async def reads_the_body(request: web.Request) -> web.StreamResponse:
        try:
            await request.read()
        finally:
            upstream_done.set()  # however it ended: cut off, or cancelled as the connection closed
        return web.json_response({})

    rec.respond = reads_the_body
    gateway = await make_gateway(url, FAST)
    head = f"POST /v1/sessions/s/events HTTP/1.1\r\nHost: x\r\nx-api-key: {TOKEN}\r\nContent-Length: 100\r\n\r\n"
    received, seconds = await raw(gateway, head.encode() + b'{"events": [')
    status, body = status_and_json(received)
    assert (status, body["error"]["type"]) == (408, "timeout_error")
    assert seconds < 1.5
    await asyncio.wait_for(upstream_done.wait(), 2)  # the upstream saw its request end, cut off


@pytest.mark.parametrize("path", ["/v1/sessions/s/events", f"/v1/environments/{ENV_ID}/work/w/heartbeat"])
async def test_a_chunked_body_that_breaks_gets_a_fast_400(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory, path: str
) -> None:
    _rec, url = recorder
    gateway = await make_gateway(url, FAST)
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nx-api-key: {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n"
    received, seconds = await raw(gateway, head.encode() + b"2\r\n{}\r\nzz\r\nnot a chunk\r\n")
    status, body = status_and_json(received)
    assert (status, body["error"]["type"]) == (400, "invalid_request_error")
    assert seconds < 1.0


@pytest.mark.parametrize("path", ["/v1/sessions/s/events", f"/v1/environments/{ENV_ID}/work/w/heartbeat"])
async def test_a_chunk_that_breaks_after_the_body_started_gets_400_at_once_not_the_body_timeout(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory, path: str
) -> None:
    """The first chunk is read (the request is under way), then a bad chunk size: 400 at once, the connection
    closed, and the upstream never sees a request it could apply (the body timeout stays at its 30 s)."""
    rec, url = recorder
    gateway = await make_gateway(url)
    host, port = gateway.proxy_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nx-api-key: {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n"
    writer.write(head.encode() + b"1\r\n{\r\n")
    await writer.drain()
    await asyncio.sleep(0.3)  # the handler is reading the body
    started = time.monotonic()
    writer.write(b"zz\r\n}\r\n0\r\n\r\n")
    await writer.drain()
    received = await asyncio.wait_for(reader.read(), 5)  # until the gateway closes the connection
    writer.close()
    assert time.monotonic() - started < 1.0
    status, body = status_and_json(received)
    assert (status, body["error"]["type"]) == (400, "invalid_request_error")
    assert received.count(b"HTTP/1.1") == 1  # one answer for the one request
    assert [r for r in rec.requests if r.body] == []  # nothing whole reached the upstream


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_heartbeat_with_a_body_over_4_kib_is_413_without_buffering(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory, chunked: bool
) -> None:
    rec, url = recorder
    gateway = await make_gateway(url)
    path = f"/v1/environments/{ENV_ID}/work/w/heartbeat?expected_last_heartbeat=NO_HEARTBEAT"
    if chunked:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nx-api-key: {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n"
        data = head.encode() + b"1388\r\n" + b"x" * 5000 + b"\r\n"
    else:
        # Declared, not sent: the answer must not wait for it.
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nx-api-key: {TOKEN}\r\nContent-Length: 33000000\r\n\r\n"
        data = head.encode()
    received, seconds = await raw(gateway, data)
    status, body = status_and_json(received)
    assert (status, body["error"]["type"]) == (413, "request_too_large")
    assert seconds < 1.0
    assert rec.requests == []


@pytest.mark.parametrize(
    "target",
    [
        f"/v1/environments/{ENV_ID}/%252e%252e/env_other/work/poll",
        "/v1/sessions/%252e%252e/%252e%252e/environments/env_other/work/poll",
        "/v1/sessions/s%2525/events",
        "/v1/sessions/%E2%80%A4%E2%80%A4/events",  # U+2024 ONE DOT LEADER: `.` under NFKC
        "/v1/sessions/%EF%BC%8E%EF%BC%8E/events",  # U+FF0E FULLWIDTH FULL STOP
        "/v1/sessions/sesn_%EF%AC%81/events",  # U+FB01, the `fi` ligature
    ],
)
async def test_paths_that_a_second_decoding_or_normalisation_would_change_are_refused(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory, target: str
) -> None:
    rec, url = recorder
    gateway = await make_gateway(url)
    received, _ = await raw(gateway, f"GET {target} HTTP/1.1\r\nHost: x\r\nx-api-key: {TOKEN}\r\n\r\n".encode())
    status, body = status_and_json(received)
    assert (status, body["error"]["type"]) == (400, "invalid_request_error")
    assert rec.requests == []


async def test_a_token_wrapped_in_basic_auth_is_refused_not_passed_on(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    rec, url = recorder
    gateway = await make_gateway(url)
    for basic in (f"user:{TOKEN}", f"{TOKEN}:", f"{TOKEN}:x"):
        auth = "Basic " + base64.b64encode(basic.encode()).decode()
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{gateway.proxy_url}/v1/sessions/s", headers={"Authorization": auth}) as r,
        ):
            assert r.status == 401
    assert rec.requests == []


async def test_a_token_removed_by_a_reload_is_refused_not_forwarded(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    rec, url = recorder
    gateway = await make_gateway(url)
    headers = worker_headers()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway.proxy_url}/v1/sessions/s", headers=headers) as r:
            assert r.status == 200
        rotated = "clients: {tokens: [{token_env: TEST_LIMITED_TOKEN}]}"
        assert gateway.reload(make_settings(url, clients=rotated)) == []
        async with http.get(f"{gateway.proxy_url}/v1/sessions/s", headers=headers) as r:
            assert r.status == 401
            assert (await r.json())["error"]["message"] == "this client token is no longer accepted by the gateway"
    assert len(rec.requests) == 1  # the second never left
    assert not any(TOKEN in value for request in rec.requests for _, value in request.headers)


async def test_keys_echoed_by_the_upstream_never_reach_the_worker(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    rec, url = recorder

    async def echoes(request: web.Request) -> web.StreamResponse:
        echoed = request.headers.get("Authorization", "")
        status = 200 if request.path.endswith("/heartbeat") else 401
        body = {"type": "error", "error": {"type": "authentication_error", "message": f"bad credential {echoed}"}}
        return web.json_response(body, status=status, headers={"x-echo": echoed})

    rec.respond = echoes
    gateway = await make_gateway(url)
    async with aiohttp.ClientSession() as http:
        for path in ("/v1/sessions/s", f"/v1/environments/{ENV_ID}/work/w/heartbeat"):
            method = "POST" if "heartbeat" in path else "GET"
            async with http.request(method, gateway.proxy_url + path, headers=worker_headers()) as r:
                text = await r.text()
                assert ENV_KEY not in text
                assert ENV_KEY not in r.headers.get("x-echo", "")
                assert "<redacted>" in text
                assert r.headers["x-echo"] == "Bearer <redacted>"
