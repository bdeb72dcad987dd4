"""The worker-facing server's edges (`gateway/edge/server.py`), on real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

from .support import ENV_ID, TOKEN, GatewayFactory, Recorder


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
