"""Bytes on a socket to the gateway, as a broken or hostile client sends them, and what comes back."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from gateway.app import Gateway

# Short deadlines, so a test of a deadline takes a second, not a minute.
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
