"""Lease-critical capacity benchmark: a normal fleet's whole traffic on one replica, and the leases it holds.

One replica sees what a fleet brings: `--streams` open session event streams
(one per served session), `--pollers` idle workers long-polling an empty
queue by the SDK's rules (`block_ms=999`, then a 1-3 s sleep), and
`--leases` held leases beaten by the SDK's rules (every `ttl/2`, each beat
bounded by the interval, the lease assumed lost after a TTL without a
success). The same workload runs, in one run and one after the other,
against each target:

- `direct`: the simulator itself;
- `gateway`: heartbeat-gateway with its default capacity classes (or
  `--stream-limit N` for a stream class of N, to see what the excess gets);
- `minimal`: `bench/minimal_proxy.py`, one pool of `--minimal-pool`
  connections for everything (the old gateway's 256 by default): the
  starvation the classes prevent;
- `nginx`: nginx in front of the simulator, if installed (streams unbuffered).

Reported per target: leases lost, heartbeat latency p50/p99 (and added over
direct), what the polls and streams got (ok, 503, errors) and how fast a
refusal came, and the proxy's CPU.

    .venv/bin/python bench/capacity_bench.py --streams 1000 --pollers 2000 --leases 200 --duration 40

Results and the commands that produced them: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))
import rig
from heartbeat_bench import cpu_seconds, free_port, wait_for

from gateway import loop as event_loop

ENV_ID = "env_bench00000000000000001"
BETA = "managed-agents-2026-04-01"


@dataclass
class Result:
    target: str
    latencies: list[float] = field(default_factory=list)
    leases: Counter[str] = field(default_factory=Counter)
    polls: Counter[str] = field(default_factory=Counter)
    streams: Counter[str] = field(default_factory=Counter)
    refusal_seconds: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    seconds: float = 0.0

    def percentile(self, values: list[float], q: float) -> float:
        ordered = sorted(values)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3) if ordered else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "leases": dict(self.leases),
            "leases_lost": sum(n for outcome, n in self.leases.items() if outcome != "kept"),
            "heartbeats": len(self.latencies),
            "heartbeat_p50_ms": self.percentile(self.latencies, 0.5),
            "heartbeat_p99_ms": self.percentile(self.latencies, 0.99),
            "polls": dict(self.polls),
            "streams": dict(self.streams),
            "refusal_p99_ms": self.percentile(self.refusal_seconds, 0.99),
            "proxy_cpu_percent": round(100 * self.cpu_s / self.seconds, 1) if self.seconds else 0.0,
        }


async def hold(session: aiohttp.ClientSession, base: str, token: str, work_id: str, until: float, r: Result) -> None:
    """One lease by the SDK's rules (environments-api.md §6.2)."""
    url = f"{base}/v1/environments/{ENV_ID}/work/{work_id}/heartbeat"
    headers = {"Authorization": f"Bearer {token}", "anthropic-beta": BETA}
    last, ttl, interval = "NO_HEARTBEAT", 90.0, 30.0
    # Workers start independently: spread the fleet over one beat interval.
    await asyncio.sleep(random.uniform(0, 5))
    last_success = time.monotonic()
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            async with (
                asyncio.timeout(interval),
                session.post(url, params={"expected_last_heartbeat": last}, headers=headers) as response,
            ):
                body = await response.json(content_type=None)
            if response.status == 412:
                r.leases["lost"] += 1
                return
            if response.status == 200:
                if last != "NO_HEARTBEAT":
                    r.latencies.append(time.monotonic() - started)
                last, last_success, ttl = body["last_heartbeat"], time.monotonic(), body["ttl_seconds"]
                interval = max(1.0, min(ttl / 2, 30.0))
        except (TimeoutError, aiohttp.ClientError):
            pass
        if time.monotonic() - last_success > ttl:
            r.leases["assumed_lost"] += 1
            return
        await asyncio.sleep(max(0.0, min(interval - (time.monotonic() - started), until - time.monotonic())))
    # A claim that never succeeded is no lease held.
    r.leases["kept" if last != "NO_HEARTBEAT" else "never_claimed"] += 1


async def poll(session: aiohttp.ClientSession, base: str, token: str, n: int, until: float, r: Result) -> None:
    """An idle SDK worker: long polls an empty queue, sleeps 1-3 s after each `null`."""
    url = f"{base}/v1/environments/{ENV_ID}/work/poll"
    headers = {"Authorization": f"Bearer {token}", "anthropic-beta": BETA, "Anthropic-Worker-ID": f"bench-{n}"}
    await asyncio.sleep(random.uniform(0, 3))
    backoff = 1.0
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            async with session.get(url, params={"block_ms": "999"}, headers=headers) as response:
                await response.read()
            status = str(response.status)
        except (TimeoutError, aiohttp.ClientError):
            status = "error"
        r.polls[status] += 1
        if status == "200":
            backoff = 1.0
            await asyncio.sleep(random.uniform(1, 3))
            continue
        if status == "503":
            r.refusal_seconds.append(time.monotonic() - started)
        await asyncio.sleep(random.uniform(backoff / 2, backoff))
        backoff = min(backoff * 2, 60.0)


async def stream(session: aiohttp.ClientSession, base: str, token: str, sid: str, until: float, r: Result) -> None:
    """A served session's event stream, held open for the whole run."""
    url = f"{base}/v1/sessions/{sid}/events/stream"
    headers = {"Authorization": f"Bearer {token}", "anthropic-beta": BETA}
    started = time.monotonic()
    try:
        async with session.get(url, headers=headers) as response:
            r.streams[str(response.status)] += 1
            if response.status != 200:
                r.refusal_seconds.append(time.monotonic() - started)
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, until - time.monotonic())):
                    while await response.content.readany():
                        pass
    except (TimeoutError, aiohttp.ClientError):
        r.streams["error"] += 1


async def run_target(name: str, base: str, token: str, sim_url: str, key: str, pid: int | None, args: Any) -> Result:
    result = Result(name)
    headers = {"Authorization": f"Bearer {key}", "anthropic-beta": BETA}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        # Leases held by workers that have polled and acked already; then the queue is empty for the pollers.
        async with session.post(f"{sim_url}/_sim/environments/{ENV_ID}/work", json={"count": args.leases}) as resp:
            work_ids = (await resp.json())["ids"]
        for _ in work_ids:
            async with session.get(f"{sim_url}/v1/environments/{ENV_ID}/work/poll", headers=headers) as resp:
                item = await resp.json()
            async with session.post(f"{sim_url}/v1/environments/{ENV_ID}/work/{item['id']}/ack", headers=headers):
                pass
        session_ids: list[str] = []
        if args.streams:
            sessions_url = f"{sim_url}/_sim/environments/{ENV_ID}/sessions"
            async with session.post(sessions_url, json={"count": args.streams}) as r:
                session_ids = (await r.json())["ids"]
        cpu_before = cpu_seconds(pid) if pid else 0.0
        start = time.monotonic()
        until = start + args.duration
        await asyncio.gather(
            *(stream(session, base, token, sid, until, result) for sid in session_ids),
            *(poll(session, base, token, n, until, result) for n in range(args.pollers)),
            *(hold(session, base, token, w, until, result) for w in work_ids),
        )
        result.seconds = time.monotonic() - start
        result.cpu_s = (cpu_seconds(pid) - cpu_before) if pid else 0.0
    return result


def gateway_config(sim_url: str, port: int, admin_port: int, args: Any) -> str:
    stream = f"pools: {{stream: {{max_connections: {args.stream_limit}}}}}" if args.stream_limit else ""
    return f"""
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin_port}}}
upstream: {{base_url: "{sim_url}", {stream}}}
environments: [{{id: {ENV_ID}, key_env: BENCH_ENV_KEY}}]
clients: {{tokens: [{{token_env: BENCH_TOKEN}}]}}
logging: {{level: warning, format: json}}
"""


NGINX = """
daemon off;
master_process off;
worker_processes 1;
error_log {tmp}/nginx-error.log warn;
pid {tmp}/nginx.pid;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  upstream sim {{ server 127.0.0.1:{sim_port}; keepalive 1024; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://sim;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {key}";
      proxy_set_header anthropic-beta "{beta}";
      proxy_buffering off;
      proxy_read_timeout 600s;
    }}
  }}
}}
"""


async def main(args: Any) -> dict[str, Any]:
    key = "bench-env-key-" + secrets.token_urlsafe(16)
    token = "bench-token-" + secrets.token_urlsafe(16)
    env = {**os.environ, "BENCH_ENV_KEY": key, "BENCH_TOKEN": token, "SIM_KEY": key}
    exe = [sys.executable, "-m", "gateway"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets.split(","):
            if target == "nginx" and shutil.which("nginx") is None:
                print("nginx is not installed: skipped", file=sys.stderr)
                continue
            # A fresh simulator per target: the same empty queue, the same sessions.
            sim_port, port, admin_port = free_port(), free_port(), free_port()
            sim_url = f"http://127.0.0.1:{sim_port}"
            sim = subprocess.Popen(  # noqa: ASYNC220 - started once per target, before any load
                [*exe, "simulate-upstream", "--port", str(sim_port), "--ttl", str(args.ttl),
                 "--environment", f"{ENV_ID}=SIM_KEY"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            proxy = None
            try:
                await wait_for(f"{sim_url}/_sim/stats")
                base, credential = sim_url, key
                if target in ("gateway", "minimal"):
                    config = Path(tmp) / f"{target}.yaml"
                    config.write_text(gateway_config(sim_url, port, admin_port, args))
                    if target == "gateway":
                        command = [*exe, "serve", "--config", str(config)]
                    else:
                        minimal = str(Path(__file__).with_name("minimal_proxy.py"))
                        command = [sys.executable, minimal, "--pool", str(args.minimal_pool), "--config", str(config)]
                    proxy = subprocess.Popen(  # noqa: ASYNC220
                        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                    )
                    await wait_for(f"http://127.0.0.1:{admin_port}/readyz")
                    base, credential = f"http://127.0.0.1:{port}", token
                elif target == "nginx":
                    conf = Path(tmp) / "nginx.conf"
                    conf.write_text(NGINX.format(tmp=tmp, sim_port=sim_port, port=port, key=key, beta=BETA))
                    proxy = subprocess.Popen(  # noqa: ASYNC220
                        ["nginx", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                    )
                    await wait_for(f"http://127.0.0.1:{port}/_sim/stats")
                    base, credential = f"http://127.0.0.1:{port}", "unused"
                pid = proxy.pid if proxy is not None else None
                results.append(await run_target(target, base, credential, sim_url, key, pid, args))
                print(json.dumps(results[-1].summary()), file=sys.stderr, flush=True)
            finally:
                for proc in (proxy, sim):
                    if proc is not None:
                        proc.send_signal(signal.SIGTERM if proc is not proxy or target != "nginx" else signal.SIGQUIT)
                for proc in (proxy, sim):
                    if proc is not None:
                        proc.wait(timeout=60)
    direct = next((r for r in results if r.target == "direct"), None)
    summaries = []
    for r in results:
        summary = r.summary()
        if direct is not None and r is not direct:
            summary["added_p50_ms"] = round(summary["heartbeat_p50_ms"] - direct.summary()["heartbeat_p50_ms"], 3)
            summary["added_p99_ms"] = round(summary["heartbeat_p99_ms"] - direct.summary()["heartbeat_p99_ms"], 3)
        summaries.append(summary)
    return {
        "command": " ".join(["bench/capacity_bench.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{event_loop.loop_name()} event loop",
        "streams": args.streams,
        "pollers": args.pollers,
        "leases": args.leases,
        "ttl_s": args.ttl,
        "duration_s": args.duration,
        "results": summaries,
    }


def print_table(outcome: dict[str, Any]) -> None:
    keys = ("leases_lost", "heartbeats", "heartbeat_p50_ms", "heartbeat_p99_ms", "added_p50_ms", "added_p99_ms",
            "polls", "streams", "refusal_p99_ms", "proxy_cpu_percent")  # fmt: skip
    rig.print_results(outcome, keys, label_width=20, column_width=26)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--pollers", type=int, default=2000)
    parser.add_argument("--leases", type=int, default=200)
    parser.add_argument("--ttl", type=int, default=10, help="the simulator's lease TTL (the SDK beats every ttl/2)")
    parser.add_argument("--duration", type=float, default=40.0)
    parser.add_argument("--targets", default="direct,gateway,minimal,nginx")
    parser.add_argument("--stream-limit", type=int, default=0, help="the gateway's stream class size (0: default)")
    parser.add_argument("--minimal-pool", type=int, default=256, help="the minimal proxy's one pool")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line too")
    arguments = parser.parse_args()
    result = event_loop.run(lambda: main(arguments))
    print_table(result)
    if arguments.json:
        print(json.dumps(result))
