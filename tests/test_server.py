"""The worker-facing server's edges (`gateway/edge/server.py`), on real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
from pathlib import Path

import aiohttp
import pytest

from .raw_http import FAST, raw, status_and_json
from .served import Ports, start_serve, wait_ready
from .support import ENV_ID, TOKEN, GatewayFactory, Recorder, config_yaml


async def test_a_fleet_connecting_while_the_replica_is_busy_waits_for_it_not_for_a_syn_retry(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    """A fleet restarting at once connects faster than a busy replica accepts. Connections
    beyond the listen backlog have their SYN dropped by the kernel, and the client sends it
    again only a second later (then 3 s, 7 s...): a heartbeat bounded by its interval can
    lose its lease to a queue the gateway never saw. The backlog holds such a storm."""
    _rec, url = recorder
    gateway = await make_gateway(url)
    host, port = gateway.proxy_url.removeprefix("http://").split(":")
    address = (host, int(port))
    loop = asyncio.get_running_loop()
    beat = (
        f"POST /v1/environments/{ENV_ID}/work/w/heartbeat?expected_last_heartbeat=NO_HEARTBEAT HTTP/1.1\r\n"
        f"Host: x\r\nx-api-key: {TOKEN}\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    sockets = _connect_while_busy(address, 300)
    freed = loop.time()

    async def answered(s: socket.socket) -> float:
        connected = asyncio.Event()
        loop.add_writer(s, connected.set)  # writable: the handshake is done
        try:
            await connected.wait()
        finally:
            loop.remove_writer(s)
        await loop.sock_sendall(s, beat)
        head = await loop.sock_recv(s, 4096)
        assert head.startswith(b"HTTP/1.1 "), head
        return loop.time() - freed

    try:
        waited = await asyncio.wait_for(asyncio.gather(*(answered(s) for s in sockets)), 10)
    finally:
        for s in sockets:
            with contextlib.suppress(OSError):
                s.close()
    # A dropped SYN is sent again after 1 s; served from the backlog, each is answered well before.
    assert max(waited) < 0.5, sorted(waited)[-5:]


def _connect_while_busy(address: tuple[str, int], count: int) -> list[socket.socket]:
    """`count` connections (more than twice the backlog aiohttp listens with by default) opened while
    the replica's loop is busy (called from it, this blocks it): only the kernel answers them."""
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(address)
        sockets.append(s)
    time.sleep(0.1)  # the handshakes happen (or not) meanwhile
    return sockets


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
