"""Heartbeat benchmark: W workers beating every w seconds, direct to the simulator and through the gateway.

Runs the simulator and the gateway as their own processes (as deployed) and
the workers in this one, then, in one run and side by side:

- upstream heartbeats per worker heartbeat (the coalescing saving), and
- heartbeat latency p50/p99 calling the simulator directly vs through the
  gateway; the difference is what the gateway adds.

Each worker holds its own lease: it claims with NO_HEARTBEAT, then echoes the
last `last_heartbeat` every `--interval` seconds (open loop: a slow answer
does not delay the next beat's schedule).

    .venv/bin/python bench/heartbeat_bench.py --workers 500 --interval 1 --duration 20
    .venv/bin/python bench/heartbeat_bench.py --workers 100 --interval 0.25 --absorb --signal-delay 2

Results and the commands that produced them: docs/benchmarks.md.
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
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from gateway import loop as event_loop

ENV_ID = "env_bench00000000000000001"
BETA = "managed-agents-2026-04-01"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    beats: int = 0
    errors: int = 0
    upstream_beats: int = 0
    # Counted over the steady middle of the run (no claims, no cut-off last period).
    window_worker_beats: int = 0
    window_upstream_beats: int = 0
    seconds: float = 0.0
    gateway_cpu_s: float = 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")

    def summary(self) -> dict[str, float | int | str]:
        return {
            "phase": self.name,
            "worker_beats": self.beats,
            "worker_beats_per_s": round(self.beats / self.seconds, 1) if self.seconds else 0,
            "upstream_beats": self.upstream_beats,
            "upstream_per_worker_beat": (
                round(self.window_upstream_beats / self.window_worker_beats, 4) if self.window_worker_beats else 0
            ),
            "errors": self.errors,
            "p50_ms": round(self.percentile(0.50), 3),
            "p99_ms": round(self.percentile(0.99), 3),
            "gateway_cpu_us_per_beat": round(self.gateway_cpu_s / self.beats * 1e6, 1) if self.beats else 0,
        }


async def wait_for(url: str, patience: float = 20.0, tls: ssl.SSLContext | bool = True) -> None:
    deadline = time.monotonic() + patience
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as response:
                    if response.status < 500:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


async def prepare_items(session: aiohttp.ClientSession, sim_url: str, count: int, key: str) -> list[str]:
    """Queue `count` items and poll and ack each, directly on the simulator."""
    headers = {"Authorization": f"Bearer {key}", "anthropic-beta": BETA}
    async with session.post(f"{sim_url}/_sim/environments/{ENV_ID}/work", json={"count": count}) as r:
        ids: list[str] = (await r.json())["ids"]
    for _ in ids:
        async with session.get(f"{sim_url}/v1/environments/{ENV_ID}/work/poll", headers=headers) as r:
            item = await r.json()
        async with session.post(f"{sim_url}/v1/environments/{ENV_ID}/work/{item['id']}/ack", headers=headers):
            pass
    return ids


async def sim_heartbeats(session: aiohttp.ClientSession, sim_url: str) -> int:
    async with session.get(f"{sim_url}/_sim/stats") as r:
        stats = await r.json()
    return sum(stats["requests"].get("heartbeat", {}).values())


async def worker(
    session: aiohttp.ClientSession,
    base: str,
    credential: str,
    work_id: str,
    interval: float,
    until: float,
    phase: Phase,
) -> None:
    url = f"{base}/v1/environments/{ENV_ID}/work/{work_id}/heartbeat"
    headers = {"Authorization": f"Bearer {credential}", "anthropic-beta": BETA}
    last = "NO_HEARTBEAT"
    # Spread the fleet over one interval, as independent workers would be.
    next_at = time.monotonic() + random.uniform(0, interval)
    while next_at < until:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        next_at += interval
        started = time.monotonic()
        try:
            async with session.post(url, params={"expected_last_heartbeat": last}, headers=headers) as response:
                body = await response.json()
        except (aiohttp.ClientError, TimeoutError):
            phase.errors += 1
            continue
        elapsed = time.monotonic() - started
        if response.status != 200:
            phase.errors += 1
            continue
        if last != "NO_HEARTBEAT":  # the claim is not a steady-state beat
            phase.latencies.append(elapsed)
            phase.beats += 1
        last = body["last_heartbeat"]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_phase(
    name: str, base: str, credential: str, sim_url: str, sim_key: str, args: argparse.Namespace, gateway_pid: int
) -> Phase:
    phase = Phase(name)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        ids = await prepare_items(session, sim_url, args.workers, sim_key)
        before = await sim_heartbeats(session, sim_url)
        cpu_before = cpu_seconds(gateway_pid)
        start = time.monotonic()
        until = start + args.duration
        edge = min(args.duration / 4, max(args.signal_delay if args.absorb else 0, 2 * args.interval))

        async def steady_window() -> None:
            await asyncio.sleep(edge)
            beats, upstream = phase.beats, await sim_heartbeats(session, sim_url)
            await asyncio.sleep(max(0.0, until - edge - time.monotonic()))
            phase.window_worker_beats = phase.beats - beats
            phase.window_upstream_beats = await sim_heartbeats(session, sim_url) - upstream

        await asyncio.gather(
            steady_window(), *(worker(session, base, credential, i, args.interval, until, phase) for i in ids)
        )
        phase.seconds = time.monotonic() - start
        phase.gateway_cpu_s = cpu_seconds(gateway_pid) - cpu_before
        # Claims went upstream in both phases; count only the steady-state beats.
        phase.upstream_beats = await sim_heartbeats(session, sim_url) - before - len(ids)
    return phase


def gateway_config(sim_url: str, port: int, admin_port: int, args: argparse.Namespace) -> str:
    logging = (
        "{level: warning, format: json}"
        if args.access_log is None
        else f"{{level: info, format: json, sample_routine: {args.access_log}}}"
    )
    absorb = (
        f"absorb: {{enabled: true, max_signal_delay_seconds: {args.signal_delay}, "
        f"min_remaining_fraction: {args.min_remaining_fraction}}}"
        if args.absorb
        else "absorb: {enabled: false}"
    )
    return f"""
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin_port}}}
upstream: {{base_url: "{sim_url}", pools: {{lease: {{max_connections: 1024}}}}}}
environments: [{{id: {ENV_ID}, key_env: BENCH_ENV_KEY}}]
clients: {{tokens: [{{token_env: BENCH_TOKEN}}]}}
heartbeat: {{coalesce: {str(not args.no_coalesce).lower()}, {absorb}}}
logging: {logging}
"""


async def main(args: argparse.Namespace) -> dict[str, object]:
    key = "bench-env-key-" + secrets.token_urlsafe(16)
    token = "bench-token-" + secrets.token_urlsafe(16)
    env = {**os.environ, "BENCH_ENV_KEY": key, "BENCH_TOKEN": token, "SIM_KEY": key}
    sim_port, gw_port, admin_port = free_port(), free_port(), free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    exe = [sys.executable, "-m", "gateway"]
    if args.baseline:
        gateway_exe = [sys.executable, str(Path(__file__).with_name("minimal_proxy.py"))]
    elif args.profile:
        gateway_exe = [sys.executable, "-m", "cProfile", "-o", args.profile, "-m", "gateway"]
    else:
        gateway_exe = exe
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "gateway.yaml"
        config.write_text(gateway_config(sim_url, gw_port, admin_port, args))
        sim = subprocess.Popen(  # noqa: ASYNC220 - started once, before any load
            [*exe, "simulate-upstream", "--port", str(sim_port), "--ttl", str(args.ttl),
             "--environment", f"{ENV_ID}=SIM_KEY"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        gateway = subprocess.Popen(  # noqa: ASYNC220
            [*gateway_exe, "serve", "--config", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await wait_for(f"{sim_url}/_sim/stats")
            await wait_for(f"http://127.0.0.1:{admin_port}/readyz")
            direct = await run_phase("direct", sim_url, key, sim_url, key, args, gateway.pid)
            through = await run_phase("gateway", f"http://127.0.0.1:{gw_port}", token, sim_url, key, args, gateway.pid)
        finally:
            for proc in (gateway, sim):
                proc.send_signal(signal.SIGTERM)
            for proc in (gateway, sim):
                proc.wait(timeout=30)
    result = {
        "command": " ".join(["bench/heartbeat_bench.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{event_loop.loop_name()} event loop",
        "workers": args.workers,
        "interval_s": args.interval,
        "duration_s": args.duration,
        "ttl_s": args.ttl,
        "proxy": "bench/minimal_proxy.py" if args.baseline else "heartbeat-gateway",
        "absorb": args.absorb,
        "signal_delay_s": args.signal_delay if args.absorb else None,
        "direct": direct.summary(),
        "gateway": through.summary(),
        "added_p50_ms": round(through.percentile(0.5) - direct.percentile(0.5), 3),
        "added_p99_ms": round(through.percentile(0.99) - direct.percentile(0.99), 3),
    }
    if args.absorb and args.interval < args.signal_delay:
        result["expected_upstream_per_worker_beat"] = round(args.interval / args.signal_delay, 4)
    return result


def print_table(result: dict[str, object]) -> None:
    direct, gateway = result["direct"], result["gateway"]
    assert isinstance(direct, dict)
    assert isinstance(gateway, dict)
    print(f"\n{result['command']}\n{result['machine']}")
    print(f"{'':28}{'direct':>12}{'gateway':>12}")
    for key in ("worker_beats", "worker_beats_per_s", "upstream_beats", "upstream_per_worker_beat", "errors",
                "p50_ms", "p99_ms", "gateway_cpu_us_per_beat"):  # fmt: skip
        print(f"{key:28}{direct[key]!s:>12}{gateway[key]!s:>12}")
    print(f"{'added p50 / p99 (ms)':28}{result['added_p50_ms']!s:>12}{result['added_p99_ms']!s:>12}")
    if "expected_upstream_per_worker_beat" in result:
        print(f"{'expected upstream/worker':28}{'':>12}{result['expected_upstream_per_worker_beat']!s:>12}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=500)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between one worker's beats")
    parser.add_argument("--duration", type=float, default=20.0)
    # Absorbed answers must keep the SDK workers' pace, which takes leases of more than 90 s.
    parser.add_argument("--ttl", type=int, default=300, help="the simulator's lease TTL")
    parser.add_argument("--absorb", action="store_true")
    parser.add_argument("--signal-delay", type=float, default=5.0)
    parser.add_argument("--min-remaining-fraction", type=float, default=0.5)
    parser.add_argument("--no-coalesce", action="store_true", help="heartbeat.coalesce: false")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line too")
    parser.add_argument("--profile", metavar="FILE", help="run the gateway under cProfile, writing FILE")
    parser.add_argument("--baseline", action="store_true", help="run bench/minimal_proxy.py in place of the gateway")
    parser.add_argument(
        "--access-log",
        type=float,
        metavar="SAMPLE",
        help="log requests (level info) with logging.sample_routine SAMPLE; default: level warning, no access log",
    )
    arguments = parser.parse_args()
    outcome = event_loop.run(lambda: main(arguments))
    print_table(outcome)
    if arguments.json:
        print(json.dumps(outcome))
