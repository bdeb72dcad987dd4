"""A simulated worker that drives the work API the way the SDK's environment worker does.

Per `anthropic.lib.environments` (environments-api.md §6, §9): poll with
`block_ms=999` and a worker id, sleep 1-3 s on an empty poll, ack at once,
claim with `NO_HEARTBEAT`, then beat every `min(30, ttl/2)` seconds echoing
the last `last_heartbeat`, each beat bounded by the interval. A 412 is a lost
lease (the item is left alone); `stopping`, `stopped` or
`lease_extended: false` ends the item; transient failures for longer than
the TTL mean the lease is assumed lost. Every other exit force-stops the item.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

__all__ = ["DemoStats", "SimulatedWorker", "WorkerBehaviour"]

BETA = "managed-agents-2026-04-01"
POLL_BLOCK_MS = 999
HEARTBEAT_INTERVAL_CAP = 30.0
ASSUMED_TTL = 90.0


@dataclass
class DemoStats:
    worker_heartbeats: int = 0
    conflicts: int = 0
    leases_lost: int = 0
    stops_seen: int = 0
    work_completed: int = 0
    claims: int = 0
    errors: int = 0
    busy: int = 0
    # Beats that got no 200 (an error answer, or none in time): what a worker sees of a bad day.
    beat_failures: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True)
class WorkerBehaviour:
    # How long one item's simulated session runs, in seconds.
    work_seconds: tuple[float, float] = (3.0, 8.0)
    # Chance that a worker stalls (as a blocked event loop would) for longer
    # than the lease TTL partway through an item, and so loses its lease.
    stall_probability: float = 0.0


class SimulatedWorker:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        environment_id: str,
        token: str,
        worker_id: str,
        stats: DemoStats,
        behaviour: WorkerBehaviour,
        rng: random.Random,
    ) -> None:
        self._session = session
        self._env_url = f"{base_url}/v1/environments/{environment_id}"
        self._headers = {"Authorization": f"Bearer {token}", "anthropic-beta": BETA}
        self._worker_id = worker_id
        self._stats = stats
        self._behaviour = behaviour
        self._rng = rng

    async def run(self) -> None:
        while True:
            item = await self._poll()
            if item is None:
                await asyncio.sleep(self._rng.uniform(1.0, 3.0))
                continue
            if await self._post(f"/work/{item['id']}/ack") is None:
                continue
            self._stats.busy += 1
            try:
                await self._serve(item["id"])
            finally:
                self._stats.busy -= 1

    async def _poll(self) -> dict[str, Any] | None:
        url = f"{self._env_url}/work/poll?block_ms={POLL_BLOCK_MS}"
        headers = {**self._headers, "Anthropic-Worker-ID": self._worker_id}
        try:
            async with self._session.get(url, headers=headers) as response:
                if response.status != 200:
                    self._stats.errors += 1
                    await asyncio.sleep(1.0)
                    return None
                item: dict[str, Any] | None = await response.json()
                return item
        except (aiohttp.ClientError, TimeoutError):
            self._stats.errors += 1
            await asyncio.sleep(1.0)
            return None

    async def _post(
        self,
        path: str,
        json: object = None,
        *,
        params: dict[str, str] | None = None,
        seconds: float | None = None,
    ) -> tuple[int, Any] | None:
        try:
            async with self._session.post(
                self._env_url + path,
                headers=self._headers,
                params=params,
                json=json,
                timeout=aiohttp.ClientTimeout(total=seconds),
            ) as response:
                body = await response.json(content_type=None)
                return response.status, body
        except (aiohttp.ClientError, TimeoutError, ValueError):
            self._stats.errors += 1
            return None

    async def _serve(self, work_id: str) -> None:
        lost = False
        try:
            lost = await self._heartbeat_loop(work_id)
        finally:
            if not lost:
                # Shielded, as the SDK does: a shutdown must not skip the stop.
                await asyncio.shield(self._post(f"/work/{work_id}/stop", {"force": True}, seconds=10))

    async def _heartbeat_loop(self, work_id: str) -> bool:
        """Beat until the work is done or the lease ends; True if the lease was lost."""
        behaviour = self._behaviour
        done_at = time.monotonic() + self._rng.uniform(*behaviour.work_seconds)
        stall = self._rng.random() < behaviour.stall_probability
        interval, ttl = HEARTBEAT_INTERVAL_CAP, ASSUMED_TTL
        last, last_success = "NO_HEARTBEAT", time.monotonic()
        while True:
            started = time.monotonic()
            result = await self._post(
                f"/work/{work_id}/heartbeat", params={"expected_last_heartbeat": last}, seconds=interval
            )
            self._stats.worker_heartbeats += 1
            if result is not None:
                self._stats.latencies_ms.append((time.monotonic() - started) * 1000)
            status, body = result if result is not None else (None, {})
            if status != 200:
                self._stats.beat_failures += 1
            if status == 412:
                self._stats.conflicts += 1
                self._stats.leases_lost += 1
                return True
            if status == 200:
                if last == "NO_HEARTBEAT":
                    self._stats.claims += 1
                last, last_success = body["last_heartbeat"], time.monotonic()
                if body["ttl_seconds"] > 0:
                    ttl = float(body["ttl_seconds"])
                    interval = max(1.0, min(ttl / 2, HEARTBEAT_INTERVAL_CAP))
                if body["state"] in ("stopping", "stopped") or not body["lease_extended"]:
                    self._stats.stops_seen += 1
                    return False
            elif time.monotonic() - last_success > ttl:
                self._stats.leases_lost += 1
                return True
            if time.monotonic() >= done_at:
                self._stats.work_completed += 1
                return False
            if stall:
                # Longer than the lease: it lapses, and the next beat meets a 412.
                stall = False
                await asyncio.sleep(ttl + interval)
            else:
                await asyncio.sleep(min(interval, max(0.0, done_at - time.monotonic())))
