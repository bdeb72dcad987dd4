"""Poll admission benchmark: idle workers polling by the SDK's rules, direct and through the gateway.

Three targets at once, each with its own simulator and `--workers` workers:
`direct`, the gateway with poll admission (`--limit` upstream polls per
environment), and the gateway with admission off. Each worker polls as the
SDK poller does (environments-api.md §6.1): `block_ms=999` with its own
`Anthropic-Worker-ID`; after `null` it sleeps 1-3 s (uniform) and polls
again; an item it gets, it acks and force-stops at once, then polls again.
An operator queues one item at a random moment of every `--item-every`
seconds: the pickup latency is from the queueing to the worker holding it.
With `--burst N`, N items are queued at once half-way through: the time
until the last is held is the burst pickup.

Reported per target: worker polls per second, upstream polls per second and
their ratio, polls answered empty at the gateway, items picked up and their
pickup latency (p50 / max), errors, and the gateway's CPU.

    .venv/bin/python bench/poll_bench.py --workers 2000 --duration 60

Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from heartbeat_bench import BETA, ENV_ID, cpu_seconds, free_port, wait_for

from gateway import loop as event_loop


@dataclass
class Target:
    name: str
    limit: str | None  # the gateway's polls.max_upstream_per_environment; None: direct
    sim_port: int = field(default_factory=free_port)
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    polls: int = 0
    empty_here: int = 0
    errors: int = 0
    queued_at: dict[str, float] = field(default_factory=dict)
    received_at: dict[str, float] = field(default_factory=dict)
    burst: list[str] = field(default_factory=list)
    pid: int | None = None

    @property
    def sim_url(self) -> str:
        return f"http://127.0.0.1:{self.sim_port}"

    @property
    def url(self) -> str:
        return self.sim_url if self.limit is None else f"http://127.0.0.1:{self.port}"


async def sdk_poller(session: aiohttp.ClientSession, target: Target, credential: str, n: int, until: float) -> None:
    headers = {"Authorization": f"Bearer {credential}", "anthropic-beta": BETA, "Anthropic-Worker-ID": f"w-{n}"}
    base = f"{target.url}/v1/environments/{ENV_ID}/work"
    await asyncio.sleep(random.uniform(0, 3))
    while time.monotonic() < until:
        try:
            async with session.get(f"{base}/poll", params={"block_ms": "999"}, headers=headers) as r:
                item = await r.json()
                status = r.status
        except (aiohttp.ClientError, TimeoutError):
            target.errors += 1
            await asyncio.sleep(1)
            continue
        target.polls += 1
        if status != 200:
            target.errors += 1
            await asyncio.sleep(1)
            continue
        if item is None:
            await asyncio.sleep(random.uniform(1, 3))
            continue
        target.received_at[item["id"]] = time.monotonic()
        async with session.post(f"{base}/{item['id']}/ack", headers=headers):
            pass
        async with session.post(f"{base}/{item['id']}/stop", json={"force": True}, headers=headers):
            pass


async def operator(session: aiohttp.ClientSession, target: Target, every: float, until: float) -> None:
    """One item at a random moment of each period, after the fleet has settled (the first 5 s)."""
    period = time.monotonic() + 5
    while period + every < until - 2:
        await asyncio.sleep(max(0.0, period + random.uniform(0, every) - time.monotonic()))
        queued = time.monotonic()
        async with session.post(f"{target.sim_url}/_sim/environments/{ENV_ID}/work", json={"count": 1}) as r:
            (work_id,) = (await r.json())["ids"]
        target.queued_at[work_id] = queued
        period += every


async def burst(session: aiohttp.ClientSession, target: Target, count: int, at: float) -> None:
    """`count` items queued at once, half-way through: how fast the fleet picks them all up."""
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    queued = time.monotonic()
    async with session.post(f"{target.sim_url}/_sim/environments/{ENV_ID}/work", json={"count": count}) as r:
        target.burst = (await r.json())["ids"]
    for work_id in target.burst:
        target.queued_at[work_id] = queued


async def sim_polls(session: aiohttp.ClientSession, target: Target) -> int:
    async with session.get(f"{target.sim_url}/_sim/stats") as r:
        stats = await r.json()
    return int(sum(stats["requests"].get("poll", {}).values()))


def config(target: Target) -> str:
    return f"""
listen: {{host: 127.0.0.1, port: {target.port}}}
admin: {{host: 127.0.0.1, port: {target.admin_port}}}
upstream: {{base_url: "{target.sim_url}"}}
environments: [{{id: {ENV_ID}, key_env: BENCH_ENV_KEY}}]
clients: {{tokens: [{{token_env: BENCH_TOKEN}}]}}
polls: {{max_upstream_per_environment: {target.limit}}}
logging: {{level: warning, format: json}}
"""


async def run(target: Target, key: str, token: str, args: argparse.Namespace) -> dict[str, object]:
    credential = key if target.limit is None else token
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.monotonic()
        until = start + args.duration
        before = await sim_polls(session, target)
        cpu = cpu_seconds(target.pid) if target.pid else 0.0
        tasks = [burst(session, target, args.burst, start + args.duration / 2)] if args.burst else []
        await asyncio.gather(
            *tasks,
            operator(session, target, args.item_every, until),
            *(sdk_poller(session, target, credential, n, until) for n in range(args.workers)),
        )
        seconds = time.monotonic() - start
        upstream = await sim_polls(session, target) - before
    burst_ids = set(target.burst)
    pickups = sorted(
        target.received_at[i] - q for i, q in target.queued_at.items() if i in target.received_at and i not in burst_ids
    )
    burst_times = [target.received_at[i] - target.queued_at[i] for i in target.burst if i in target.received_at]
    return {
        "target": target.name,
        "worker_polls_per_s": round(target.polls / seconds, 1),
        "upstream_polls_per_s": round(upstream / seconds, 1),
        "upstream_per_worker_poll": round(upstream / target.polls, 4) if target.polls else None,
        "items_picked": f"{len(pickups)}/{len(target.queued_at) - len(burst_ids)}",
        "burst_picked": f"{len(burst_times)}/{len(burst_ids)}",
        "burst_all_picked_s": round(max(burst_times), 2) if burst_times else None,
        "pickup_p50_max_ms": (
            round(pickups[len(pickups) // 2] * 1000, 1) if pickups else None,
            round(pickups[-1] * 1000, 1) if pickups else None,
        ),
        "errors": target.errors,
        "gateway_cpu_share": round((cpu_seconds(target.pid) - cpu) / seconds, 3) if target.pid else None,
    }


async def main(args: argparse.Namespace) -> list[dict[str, object]]:
    key, token = "bench-env-key-" + secrets.token_urlsafe(16), "bench-token-" + secrets.token_urlsafe(16)
    env = {**os.environ, "BENCH_ENV_KEY": key, "BENCH_TOKEN": token, "SIM_KEY": key}
    targets = [Target("direct", None), Target(f"admission {args.limit}", str(args.limit)), Target("off", "null")]
    exe = [sys.executable, "-m", "gateway"]
    procs: list[subprocess.Popen[bytes]] = []
    quiet = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for t in targets:
                sim = [*exe, "simulate-upstream", "--port", str(t.sim_port), "--environment", f"{ENV_ID}=SIM_KEY"]
                procs.append(subprocess.Popen(sim, **quiet))  # type: ignore[call-overload]  # noqa: ASYNC220
                if t.limit is not None:
                    path = Path(tmp) / f"{t.port}.yaml"
                    path.write_text(config(t))
                    gateway = subprocess.Popen([*exe, "serve", "--config", str(path)], **quiet)  # type: ignore[call-overload]  # noqa: ASYNC220
                    procs.append(gateway)
                    t.pid = gateway.pid
            for t in targets:
                await wait_for(f"{t.sim_url}/_sim/stats")
                if t.limit is not None:
                    await wait_for(f"http://127.0.0.1:{t.admin_port}/readyz")
            return await asyncio.gather(*(run(t, key, token, args) for t in targets))
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(timeout=30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2000, help="workers per target")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--limit", type=int, default=256, help="polls.max_upstream_per_environment")
    parser.add_argument("--item-every", type=float, default=2.0, help="one item queued per this many seconds")
    parser.add_argument("--burst", type=int, default=0, help="items queued at once half-way through")
    arguments = parser.parse_args()
    for row in event_loop.run(lambda: main(arguments)):
        print(json.dumps(row))
