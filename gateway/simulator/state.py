"""The state behind one simulator app: config, the pure stores, statistics, and the routes' rules."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from aiohttp import web

from .auth import Authority, Endpoint
from .control_plane import ControlPlane, TtlPolicy
from .faults import Faults
from .sessions import AgentScript, SessionStore

__all__ = ["ENDPOINT", "REQUEST_ID", "SIMULATOR", "Simulator", "SimulatorConfig", "fingerprint"]

MANAGED_AGENTS_BETA = "managed-agents-2026-04-01"
# [SDK] what the workers send on memory-store calls (and only there).
MEMORY_BETA = "agent-memory-2026-07-22"


def _endpoints(*endpoints: Endpoint) -> MappingProxyType[str, Endpoint]:
    return MappingProxyType({e.name: e for e in endpoints})


# Every /v1 route, by the name it is registered under (and counted and faulted as).
ENDPOINT = _endpoints(
    Endpoint("environment", "environment", MANAGED_AGENTS_BETA),
    Endpoint("poll", "environment", MANAGED_AGENTS_BETA),
    Endpoint("stats", "environment", MANAGED_AGENTS_BETA, org_key=True),
    Endpoint("list", "environment", MANAGED_AGENTS_BETA),
    Endpoint("retrieve", "work", MANAGED_AGENTS_BETA),
    Endpoint("ack", "work", MANAGED_AGENTS_BETA),
    Endpoint("heartbeat", "work", MANAGED_AGENTS_BETA),
    Endpoint("stop", "work", MANAGED_AGENTS_BETA, org_key=True),
    Endpoint("update", "work", MANAGED_AGENTS_BETA),
    Endpoint("session", "session", MANAGED_AGENTS_BETA),
    Endpoint("events", "session", MANAGED_AGENTS_BETA),
    Endpoint("stream", "session", MANAGED_AGENTS_BETA, streams=True),
    Endpoint("send_events", "session", MANAGED_AGENTS_BETA),
    # [SDK] skills calls carry no anthropic-beta.
    Endpoint("skill_version", "skill"),
    Endpoint("skill_content", "skill"),
    Endpoint("memories", "memory_store", MEMORY_BETA),
    Endpoint("unknown", "none"),
)


def fingerprint(credential: str) -> str:
    """How /_sim/stats names a credential it saw: a short hash, never the value."""
    return hashlib.sha256(credential.encode()).hexdigest()[:16]


@dataclass
class SimulatorConfig:
    # Environment id -> its environment key.
    environments: dict[str, str]
    ttl: TtlPolicy = field(default_factory=TtlPolicy)
    faults: Faults = field(default_factory=Faults)
    # Organisation API keys: accepted on stats, stop, sessions, skills and memory stores.
    org_api_keys: tuple[str, ...] = ()
    # Poll answers carry a per-item `secret` with a sessions token, as the real API may.
    issue_secrets: bool = False
    # What the agent of every session does.
    script: AgentScript = field(default_factory=AgentScript)
    # gzip JSON answers for clients that accept it (ASSUMPTION: whether the real API does is not known).
    compress: bool = False
    seed: int | None = None
    clock: Callable[[], float] = time.time


class Simulator:
    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.plane = ControlPlane(list(config.environments), ttl=config.ttl, issue_secrets=config.issue_secrets)
        self.sessions = SessionStore(config.script)
        self.authority = Authority(config.environments, config.org_api_keys, self.plane, self.sessions)
        self.faults = config.faults
        self.rng = random.Random(config.seed)
        self.requests: dict[str, Counter[str]] = defaultdict(Counter)
        self.credentials: Counter[str] = Counter()
        self.credentials_by_endpoint: dict[str, Counter[str]] = defaultdict(Counter)
        self.fingerprints: set[str] = set()
        self.faults_injected: Counter[str] = Counter()
        self.worker_ids: set[str] = set()
        self._request_ids = 0
        self.started_at = config.clock()
        self._changed = asyncio.Event()
        # Open event streams, per session.
        self._streams: dict[str, set[asyncio.Queue[dict[str, Any]]]] = defaultdict(set)

    def now(self) -> float:
        return self.config.clock()

    def next_request_id(self) -> str:
        self._request_ids += 1
        return f"req_sim{self._request_ids:010d}"

    def notify(self) -> None:
        """Wake long polls: the queue may have changed."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for_change(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._changed.wait()

    def enqueue(self, environment_id: str, *, count: int = 1, data_type: str = "session") -> list[str]:
        """Queue work items; each session item gets its session, as when the real API starts one."""
        ids = []
        for _ in range(count):
            now = self.now()
            data_id = self.sessions.create(environment_id, now).id if data_type == "session" else None
            ids.append(self.plane.enqueue(environment_id, now, data_type=data_type, data_id=data_id).id)
        self.notify()
        return ids

    # -- event streams -----------------------------------------------------------------

    def subscribe(self, session_id: str) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._streams[session_id].add(queue)
        return queue

    def unsubscribe(self, session_id: str, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._streams[session_id].discard(queue)
        if not self._streams[session_id]:
            del self._streams[session_id]

    def publish(self, session_id: str, events: list[dict[str, Any]]) -> None:
        for queue in self._streams.get(session_id, ()):
            for event in events:
                queue.put_nowait(event)

    def open_streams(self, session_id: str) -> int:
        return len(self._streams.get(session_id, ()))

    # -- statistics --------------------------------------------------------------------

    def stats_json(self) -> dict[str, Any]:
        return {
            "requests": {endpoint: dict(counts) for endpoint, counts in sorted(self.requests.items())},
            "credentials": dict(self.credentials),
            "credentials_by_endpoint": {e: dict(c) for e, c in sorted(self.credentials_by_endpoint.items())},
            "credential_fingerprints": sorted(self.fingerprints),
            "faults_injected": dict(self.faults_injected),
            "worker_ids": sorted(self.worker_ids),
        }

    def count(self, endpoint: str) -> int:
        return sum(self.requests[endpoint].values())


SIMULATOR = web.AppKey("simulator", Simulator)
REQUEST_ID = web.RequestKey("request_id", str)
