"""The edges, hardened: deadlines, body limits, paths, parser refusals, secrets in every direction, drain time."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.app import Gateway
from gateway.config.load import ConfigError, load_settings

from .served import Ports, start_serve, wait_ready
from .support import (
    ENV_ID,
    ENV_KEY,
    TOKEN,
    GatewayFactory,
    Recorder,
    SimFactory,
    config_yaml,
    make_settings,
    worker_headers,
)

FAST = (
    "limits: {header_timeout_seconds: 0.5, idle_timeout_seconds: 0.5, body_timeout_seconds: 0.5, "
    "shutdown_grace_seconds: 1}"
)


async def raw(gateway: Gateway, data: bytes, *, read_for: float = 3.0) -> tuple[bytes, float]:
    """Send bytes as they are on one connection; the response (or all until the connection closes) and when
    it was complete."""
    host, port = gateway.proxy_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.monotonic()
    writer.write(data)
    await writer.drain()
    received = b""
    try:
        async with asyncio.timeout(read_for):
            while not _complete(received) and (chunk := await reader.read(65536)):
                received += chunk
    except TimeoutError:
        pass
    finally:
        writer.close()
    return received, time.monotonic() - started


def _complete(received: bytes) -> bool:
    head, sep, body = received.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def status_and_json(received: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = received.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


# -- deadlines and the connection cap ----------------------------------------------------------


async def test_slow_headers_get_a_408_and_the_connection_closes(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    rec, url = recorder
    gateway = await make_gateway(url, FAST)
    received, seconds = await raw(gateway, f"GET /v1/sessions/s HTTP/1.1\r\nHost: x\r\nx-api-key: {TOKEN}\r\n".encode())
    status, body = status_and_json(received)
    assert (status, body["error"]["type"]) == (408, "timeout_error")
    assert 0.4 < seconds < 1.5  # the connection closed after the header deadline
    assert TOKEN.encode() not in received
    assert rec.requests == []


async def test_an_idle_keep_alive_connection_is_closed(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    _, url = recorder
    gateway = await make_gateway(url, FAST)
    host, port = gateway.proxy_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET /v1/sessions/s HTTP/1.1\r\nHost: x\r\nx-api-key: {TOKEN}\r\n\r\n".encode())
    started = time.monotonic()
    received = b""
    async with asyncio.timeout(5):
        while chunk := await reader.read(65536):
            received += chunk
    writer.close()
    assert received.startswith(b"HTTP/1.1 200")
    assert 0.4 < time.monotonic() - started < 1.5  # closed once idle, not after an hour


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


async def test_beyond_the_connection_cap_a_new_connection_gets_503_and_the_admin_port_still_answers(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    _rec, url = recorder
    gateway = await make_gateway(url, "limits: {max_client_connections: 5}")
    host, port = gateway.proxy_url.removeprefix("http://").split(":")
    held = [await asyncio.open_connection(host, int(port)) for _ in range(5)]
    try:
        await asyncio.sleep(0.1)
        received, seconds = await raw(gateway, b"GET /v1/sessions/s HTTP/1.1\r\nHost: x\r\n\r\n")
        status, body = status_and_json(received)
        assert (status, body["error"]["type"]) == (503, "overloaded_error")
        assert seconds < 0.5
        async with aiohttp.ClientSession() as http, http.get(gateway.admin_url + "/healthz") as r:
            assert r.status == 200
    finally:
        for _, writer in held:
            writer.close()
    await asyncio.sleep(0.1)
    received, _ = await raw(gateway, f"GET /v1/sessions/s HTTP/1.1\r\nHost: x\r\nx-api-key: {TOKEN}\r\n\r\n".encode())
    assert received.startswith(b"HTTP/1.1 200")


# -- bodies ----------------------------------------------------------------------------------


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


# -- paths -------------------------------------------------------------------------------------


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


# -- the HTTP layer's own refusals --------------------------------------------------------------

HOST = "Host: x\r\n"
MALFORMED = {
    "content-length-and-transfer-encoding": f"POST /v1/sessions/s HTTP/1.1\r\n{HOST}Content-Length: 3\r\n"
    f"Transfer-Encoding: chunked\r\nx-api-key: {TOKEN}\r\n\r\n0\r\n\r\n",
    "two-content-lengths": f"POST /v1/sessions/s HTTP/1.1\r\n{HOST}Content-Length: 1\r\nContent-Length: 2\r\n"
    f"x-api-key: {TOKEN}\r\n\r\nab",
    "obs-fold": f"GET /v1/sessions/s HTTP/1.1\r\n{HOST}x-api-key: {TOKEN}\r\nX-Folded: a\r\n b\r\n\r\n",
    "nul-in-a-header": f"GET /v1/sessions/s HTTP/1.1\r\n{HOST}X-Bad: a\x00{TOKEN}\r\n\r\n",
    "header-line-too-long": f"GET /v1/sessions/s HTTP/1.1\r\n{HOST}X-Long: {TOKEN}{'a' * 20000}\r\n\r\n",
    "bad-request-line": f"GET /v1/sessions/{TOKEN} HTTP/9.9 extra\r\n{HOST}\r\n",
    "bad-method": f"G@T /v1/sessions/s HTTP/1.1\r\n{HOST}x-api-key: {TOKEN}\r\n\r\n",
    "space-before-colon": f"GET /v1/sessions/s HTTP/1.1\r\n{HOST}x-api-key : {TOKEN}\r\n\r\n",
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_the_http_layer_refuses_in_the_apis_shape_and_echoes_nothing(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory, case: str
) -> None:
    rec, url = recorder
    gateway = await make_gateway(url)
    received, _ = await raw(gateway, MALFORMED[case].encode())
    status, body = status_and_json(received)
    assert 400 <= status < 500
    assert body["type"] == "error"
    assert body["error"]["type"] in ("invalid_request_error", "request_too_large")
    assert TOKEN.encode() not in received
    assert b"Content-Type: application/json" in received
    assert rec.requests == []


# -- secrets -------------------------------------------------------------------------------------


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


def test_config_errors_redact_secret_shaped_keys_and_values() -> None:
    pasted = "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUv0123456789"
    texts = [
        f"environments: [{{id: env_1, key_env: K, {pasted}: 1}}]\nclients: {{tokens: [{{token_env: T}}]}}",
        f"environments: [{{id: env_1, key_env: K}}]\nclients: {{tokens: [{{token_env: T}}]}}\n"
        f"logging: {{level: {pasted}}}",
        "environments: [{id: env_1, key_env: K}]\nclients: {tokens: [{token_env: T}]}\n"
        "upstream: {a1B2c3D4e5F6g7H8i9J0k1L2m3N4: 1}",
    ]
    for text in texts:
        with pytest.raises(ConfigError) as caught:
            load_settings(text, {"K": "k", "T": "t"})
        message = str(caught.value)
        assert pasted not in message
        assert "a1B2c3D4e5F6g7H8i9J0k1L2m3N4" not in message
        assert "<redacted>" in message


# -- stopped leases are not lost ------------------------------------------------------------------


async def test_leases_stopped_through_the_gateway_are_never_counted_as_expired_or_lost(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    sim = await make_simulator(ttl=1)
    gateway = await make_gateway(sim.url, "heartbeat: {leases: {expiry_grace_seconds: 0.2}}")
    work_ids = sim.sim.enqueue(ENV_ID, count=40)
    async with aiohttp.ClientSession() as http:

        async def churn(work_id: str, force: bool) -> None:
            sim.sim.plane.poll(ENV_ID, sim.sim.now(), worker_id="w", reclaim_older_than_ms=None)
            sim.sim.plane.ack(ENV_ID, work_id, sim.sim.now())
            base = f"{gateway.proxy_url}/v1/environments/{ENV_ID}/work/{work_id}"
            last = "NO_HEARTBEAT"
            for _ in range(4):  # the claim and three beats
                async with http.post(
                    f"{base}/heartbeat", params={"expected_last_heartbeat": last}, headers=worker_headers()
                ) as r:
                    assert r.status == 200
                    last = (await r.json())["last_heartbeat"]
            async with http.post(f"{base}/stop", json={"force": force}, headers=worker_headers()) as r:
                assert r.status == 200

        for n, work_id in enumerate(work_ids):
            await churn(work_id, force=n % 2 == 0)  # force stops, and graceful ones the holder never finishes
        await asyncio.sleep(1.5)  # every TTL (1 s) and grace (0.2 s) past: the core woke for each check
    metrics = next(iter(gateway.metrics.leases_lost.collect())).samples
    lost = {s.labels["reason"]: s.value for s in metrics if s.name.endswith("_total") and s.value}
    assert lost == {}


# -- drain ------------------------------------------------------------------------------------------


async def test_sigterm_mid_flight_exits_within_one_grace_period(make_simulator: SimFactory, tmp_path: Path) -> None:
    """A heartbeat, a long poll and an event stream open when SIGTERM comes: out in one grace, cutting the rest."""
    from gateway.simulator import Faults

    sim = await make_simulator(faults=Faults(latency_seconds=10, endpoints=("heartbeat", "poll")))
    (work_id,) = sim.sim.enqueue(ENV_ID)
    sim.sim.plane.poll(ENV_ID, sim.sim.now(), worker_id="w", reclaim_older_than_ms=None)
    sim.sim.plane.ack(ENV_ID, work_id, sim.sim.now())
    ports, grace = Ports.free(), 2.0
    config = tmp_path / "gateway.yaml"
    config.write_text(config_yaml(sim.url, ports.listen_yaml() + f"limits: {{shutdown_grace_seconds: {grace}}}\n"))
    proc = await start_serve(config, stderr=asyncio.subprocess.DEVNULL)
    try:
        await wait_ready(ports.admin, proc)
        base = f"http://127.0.0.1:{ports.proxy}"
        session_id = sim.sim.sessions.all()[0].id
        async with aiohttp.ClientSession() as http:
            beat = asyncio.ensure_future(
                http.post(
                    f"{base}/v1/environments/{ENV_ID}/work/{work_id}/heartbeat",
                    params={"expected_last_heartbeat": "NO_HEARTBEAT"},
                    headers=worker_headers(),
                )
            )
            poll = asyncio.ensure_future(
                http.get(
                    f"{base}/v1/environments/{ENV_ID}/work/poll", params={"block_ms": "999"}, headers=worker_headers()
                )
            )
            stream = await http.get(f"{base}/v1/sessions/{session_id}/events/stream", headers=worker_headers())
            assert stream.status == 200
            await asyncio.sleep(0.3)  # all three are in flight
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 3 * grace)
            elapsed = time.monotonic() - started
            with pytest.raises(aiohttp.ClientPayloadError):
                await stream.content.read()  # cut, not finished
            stream.close()
            for request in (beat, poll):
                with pytest.raises(aiohttp.ClientError):
                    await request
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert grace - 0.2 < elapsed < grace + 1.0, elapsed


async def test_under_a_low_descriptor_limit_the_cap_follows_it_and_health_stays_up(
    recorder: tuple[Recorder, str], tmp_path: Path
) -> None:
    """Before: with descriptors used up, new workers and /healthz failed, and asyncio logged an error per accept."""
    import resource

    _, url = recorder
    ports = Ports.free()
    proxy_port, admin_port = ports.proxy, ports.admin
    config = tmp_path / "gateway.yaml"
    config.write_text(config_yaml(url, ports.listen_yaml()))

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (320, 320))  # room for (320 - 256) // 2 = 32 clients

    proc = await start_serve(config, preexec_fn=low_limit)
    held = []
    try:
        await wait_ready(admin_port, proc)
        for _ in range(60):
            held.append(await asyncio.open_connection("127.0.0.1", proxy_port))
        await asyncio.sleep(0.2)
        answers = []
        for reader, writer in held[32:]:
            writer.write(b"GET /v1/sessions/s HTTP/1.1\r\nHost: x\r\n\r\n")
            answers.append(await asyncio.wait_for(reader.read(200), 2))
        assert all(a.startswith(b"HTTP/1.1 503") for a in answers), answers[:3]
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{admin_port}/healthz") as r:
            assert r.status == 200
    finally:
        for _, writer in held:
            writer.close()
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
    lines = stderr.decode().splitlines()
    started = next(json.loads(line) for line in lines if '"event": "started"' in line)
    assert (started["file_descriptors"], started["max_client_connections"]) == (320, 32)
    assert len(lines) < 20  # one summary line for the refusals, not one per connection


def test_the_redactor_replaces_every_secret_whole_in_text_bytes_and_headers() -> None:
    from gateway.policy.redaction import Redactor

    redactor = Redactor(["sk-short", "sk-short-and-longer", ""])
    # The longer secret that contains the shorter one goes whole, not as "<redacted>-and-longer".
    assert redactor.text("a sk-short-and-longer b sk-short") == "a <redacted> b <redacted>"
    assert redactor.body(b'{"echo": "Bearer sk-short-and-longer"}') == b'{"echo": "Bearer <redacted>"}'
    assert redactor.headers([("x-echo", "sk-short"), ("x-other", "fine")]) == [
        ("x-echo", "<redacted>"),
        ("x-other", "fine"),
    ]
    # A reload adds the new secrets and keeps the old ones.
    rotated = redactor.with_(["sk-new"])
    assert rotated.text("sk-new sk-short") == "<redacted> <redacted>"
    assert redactor.text("sk-new") == "sk-new"
