"""The heartbeat seam: where `POST .../work/{work_id}/heartbeat` leaves the generic proxy path.

The proxy validates a heartbeat, injects its credential and headers, and
hands a `HeartbeatCall` to a `HeartbeatService`. The service decides how the
upstream is asked and returns one buffered answer per call (heartbeat
answers are small JSON). `DirectHeartbeats` forwards each call one for one;
lease-safe coalescing plugs in here as another `HeartbeatService` without
touching the proxy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from .heartbeat_query import HeartbeatQuery
from .upstream import BufferedResponse, Upstream, UpstreamRequest, fetch

__all__ = ["MAX_HEARTBEAT_RESPONSE_BYTES", "DirectHeartbeats", "HeartbeatCall", "HeartbeatResult", "HeartbeatService"]

# A heartbeat answer is a few hundred bytes; anything near this is not one.
MAX_HEARTBEAT_RESPONSE_BYTES = 1024 * 1024

HeartbeatOutcome = Literal["forwarded", "joined", "handed_off", "absorbed", "rejected"]


@dataclass(frozen=True, slots=True)
class HeartbeatCall:
    environment_id: str
    work_id: str
    query: HeartbeatQuery
    # Ready to send: credential injected, default TTL applied.
    request: UpstreamRequest


@dataclass(frozen=True, slots=True)
class HeartbeatResult:
    response: BufferedResponse
    outcome: HeartbeatOutcome


class HeartbeatService(Protocol):
    async def heartbeat(self, call: HeartbeatCall) -> HeartbeatResult: ...


class DirectHeartbeats:
    """One upstream heartbeat per worker heartbeat, answered with the upstream's own response."""

    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream

    async def heartbeat(self, call: HeartbeatCall) -> HeartbeatResult:
        response = await fetch(self._upstream, call.request, max_bytes=MAX_HEARTBEAT_RESPONSE_BYTES)
        return HeartbeatResult(response, "forwarded")
