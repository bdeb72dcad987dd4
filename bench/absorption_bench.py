"""Absorption benchmark: workers following the SDK's heartbeat rules, direct and through the gateway.

Four targets run at once, for the same duration, each with its own
simulator (leases of `--ttl` seconds) and its own `--workers` workers:

- `direct`: the workers call the simulator themselves;
- `off`: through heartbeat-gateway, `desired_ttl_seconds: TTL`, absorption off;
- `D=60` and `D=120` (or `--delays`): the same with absorption on and that
  `max_signal_delay_seconds`.

Each worker follows the SDK's rules (environments-api.md §6.2): it claims
with NO_HEARTBEAT at a random moment of the first interval, then beats one
interval after each answer, the interval `clamp(ttl/2, 1, 30)` from the
last answer's `ttl_seconds` (30 s before the first), aborting a beat after
one interval and giving the lease up as lost once nothing succeeded for the
last answer's TTL; a 412 is a lost lease too. Half-way through, an operator
stops `--stop-share` of each target's items on the simulator (the API), not
through the gateway: the time until each holder sees `stopping` is the
signal delay.

Reported per target: upstream heartbeats per worker heartbeat over the steady
window (after every claim), leases lost, stop-signal delay, and latency by
outcome (`absorbed`, `forwarded`) with what it adds to direct.

    .venv/bin/python bench/absorption_bench.py --workers 1000 --duration 300

Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from heartbeat_bench import BETA, ENV_ID, free_port, prepare_items, sim_heartbeats, wait_for

from gateway import loop as event_loop
from gateway.heartbeat.worker_model import worker_interval

OUTCOME_HEADER = "heartbeat-gateway-outcome"
# What the SDK assumes before its first answer (TS and Python).
SDK_FIRST_TTL = 90


@dataclass
class Target:
    name: str
    delay: float | None  # None: direct or absorption off
    through_gateway: bool
    sim_port: int = field(default_factory=free_port)
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    lost: Counter[str] = field(default_factory=Counter)
    failures: int = 0
    worker_beats: int = 0
    window_worker_beats: int = 0
    window_upstream_beats: int = 0
    stop_delays: list[float] = field(default_factory=list)
    stopped_at: dict[str, float] = field(default_factory=dict)

    @property
    def sim_url(self) -> str:
        return f"http://127.0.0.1:{self.sim_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}" if self.through_gateway else self.sim_url

    def percentile(self, outcome: str, q: float) -> float | None:
        ordered = sorted(self.latencies.get(outcome, []))
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3) if ordered else None


async def sdk_worker(
    session: aiohttp.ClientSession, target: Target, credential: str, work_id: str, until: float, steady: list[bool]
) -> None:
    url = f"{target.url}/v1/environments/{ENV_ID}/work/{work_id}/heartbeat"
    headers = {"Authorization": f"Bearer {credential}", "anthropic-beta": BETA}
    interval, ttl, last = worker_interval(None), SDK_FIRST_TTL, "NO_HEARTBEAT"
    await asyncio.sleep(random.uniform(0, interval))
    last_ok = time.monotonic()
    while time.monotonic() < until:
        if time.monotonic() - last_ok > ttl:
            target.lost["assumed_lost"] += 1
            return
        started = time.monotonic()
        try:
            async with asyncio.timeout(interval):
                async with session.post(url, params={"expected_last_heartbeat": last}, headers=headers) as r:
                    body, status, outcome = await r.json(), r.status, r.headers.get(OUTCOME_HEADER, "direct")
        except (aiohttp.ClientError, TimeoutError):
            target.failures += 1
            await asyncio.sleep(interval)
            continue
        now = time.monotonic()
        if last != "NO_HEARTBEAT":
            target.worker_beats += 1
            if steady[0]:
                target.window_worker_beats += 1
        if status == 412:
            target.lost["conflict"] += 1
            return
        if status != 200:
            target.failures += 1
            await asyncio.sleep(interval)
            continue
        if last != "NO_HEARTBEAT":
            target.latencies.setdefault(outcome, []).append(now - started)
        if body["state"] in ("stopping", "stopped"):
            if work_id in target.stopped_at:
                target.stop_delays.append(now - target.stopped_at[work_id])
            else:
                target.lost["stopped_unasked"] += 1
            return
        if not body["lease_extended"]:
            target.lost["not_extended"] += 1
            return
        last, ttl, last_ok = body["last_heartbeat"], body["ttl_seconds"], now
        interval = worker_interval(ttl)
        await asyncio.sleep(interval)


async def operator_stops(
    session: aiohttp.ClientSession, target: Target, key: str, ids: list[str], share: float
) -> None:
    """Graceful stops on the API itself, as an operator's: the gateway does not see them pass."""
    headers = {"Authorization": f"Bearer {key}", "anthropic-beta": BETA}
    for work_id in ids[: int(len(ids) * share)]:
        target.stopped_at[work_id] = time.monotonic()
        async with session.post(
            f"{target.sim_url}/v1/environments/{ENV_ID}/work/{work_id}/stop", json={"force": False}, headers=headers
        ):
            pass


async def run_target(
    target: Target, ids: list[str], key: str, token: str, args: argparse.Namespace, start: float
) -> None:
    until = start + args.duration
    credential = token if target.through_gateway else key
    connector = aiohttp.TCPConnector(limit=0)
    steady = [False]
    async with aiohttp.ClientSession(connector=connector) as session:

        async def window() -> None:
            # Every claim is in by one interval (plus latency); count to the end from then.
            await asyncio.sleep(max(0.0, start + 35 - time.monotonic()))
            steady[0] = True
            before = await sim_heartbeats(session, target.sim_url)
            await asyncio.sleep(max(0.0, until - time.monotonic()))
            steady[0] = False
            target.window_upstream_beats = await sim_heartbeats(session, target.sim_url) - before

        async def stops() -> None:
            await asyncio.sleep(max(0.0, start + args.duration / 2 - time.monotonic()))
            await operator_stops(session, target, key, ids, args.stop_share)

        await asyncio.gather(
            window(), stops(), *(sdk_worker(session, target, credential, i, until, steady) for i in ids)
        )


def gateway_config(target: Target, args: argparse.Namespace) -> str:
    absorb = (
        f"{{enabled: true, max_signal_delay_seconds: {target.delay}}}"
        if target.delay is not None
        else "{enabled: false}"
    )
    return f"""
listen: {{host: 127.0.0.1, port: {target.port}}}
admin: {{host: 127.0.0.1, port: {target.admin_port}}}
upstream: {{base_url: "{target.sim_url}"}}
environments: [{{id: {ENV_ID}, key_env: BENCH_ENV_KEY}}]
clients: {{tokens: [{{token_env: BENCH_TOKEN}}]}}
heartbeat: {{desired_ttl_seconds: {args.ttl}, absorb: {absorb}}}
logging: {{level: warning, format: json}}
"""


async def main(args: argparse.Namespace) -> dict[str, object]:
    key = "bench-env-key-" + secrets.token_urlsafe(16)
    token = "bench-token-" + secrets.token_urlsafe(16)
    env = {**os.environ, "BENCH_ENV_KEY": key, "BENCH_TOKEN": token, "SIM_KEY": key}
    targets = [Target("direct", None, False), Target("off", None, True)]
    targets += [Target(f"D={d:g}", d, True) for d in args.delays]
    exe = [sys.executable, "-m", "gateway"]
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for target in targets:
                procs.append(
                    subprocess.Popen(  # noqa: ASYNC220 - started once, before any load
                        [
                            *exe,
                            "simulate-upstream",
                            "--port",
                            str(target.sim_port),
                            "--ttl",
                            str(args.ttl),
                            "--environment",
                            f"{ENV_ID}=SIM_KEY",
                        ],
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
                if target.through_gateway:
                    config = Path(tmp) / f"{target.port}.yaml"
                    config.write_text(gateway_config(target, args))
                    procs.append(
                        subprocess.Popen(  # noqa: ASYNC220
                            [*exe, "serve", "--config", str(config)],
                            env=env,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        )
                    )
            for target in targets:
                await wait_for(f"{target.sim_url}/_sim/stats")
                if target.through_gateway:
                    await wait_for(f"http://127.0.0.1:{target.admin_port}/readyz")
            async with aiohttp.ClientSession() as session:
                prepared = [await prepare_items(session, t.sim_url, args.workers, key) for t in targets]
            start = time.monotonic()
            await asyncio.gather(
                *(run_target(t, ids, key, token, args, start) for t, ids in zip(targets, prepared, strict=True))
            )
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(timeout=30)
    direct = targets[0]
    rows = []
    for t in targets:
        forwarded = "direct" if t is direct else "forwarded"
        row: dict[str, object] = {
            "target": t.name,
            "worker_beats": t.worker_beats,
            "upstream_per_worker_beat": round(t.window_upstream_beats / t.window_worker_beats, 4)
            if t.window_worker_beats
            else None,
            "leases_lost": dict(t.lost),
            "failed_beats": t.failures,
            "stop_delay_max_s": round(max(t.stop_delays), 2) if t.stop_delays else None,
            "stops_seen": f"{len(t.stop_delays)}/{len(t.stopped_at)}",
            "forwarded_p50_p99_ms": (t.percentile(forwarded, 0.5), t.percentile(forwarded, 0.99)),
            "absorbed_p50_p99_ms": (t.percentile("absorbed", 0.5), t.percentile("absorbed", 0.99)),
        }
        direct_p99 = direct.percentile("direct", 0.99)
        if t is not direct and direct_p99 is not None:
            for outcome in ("forwarded", "absorbed"):
                p99 = t.percentile(outcome, 0.99)
                row[f"{outcome}_added_p99_ms"] = round(p99 - direct_p99, 3) if p99 is not None else None
        rows.append(row)
    return {
        "command": " ".join(["bench/absorption_bench.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{event_loop.loop_name()} event loop",
        "workers_per_target": args.workers,
        "ttl_s": args.ttl,
        "duration_s": args.duration,
        "targets": rows,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1000, help="workers per target")
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--ttl", type=int, default=300, help="the lease TTL (desired_ttl_seconds; the simulator's)")
    parser.add_argument("--delays", type=float, nargs="+", default=[60.0, 120.0], help="max_signal_delay_seconds")
    parser.add_argument("--stop-share", type=float, default=0.05, help="share of items an operator stops")
    arguments = parser.parse_args()
    result = event_loop.run(lambda: main(arguments))
    rows = result["targets"]
    assert isinstance(rows, list)
    for row in rows:
        print(json.dumps(row))
    print(json.dumps(result))
