"""Scale benchmark: how many SDK workers one replica holds, side by side with direct, nginx and the minimal proxy.

W workers by the SDK's rules (environments-api.md §6): every worker long
polls its environment (`block_ms=999`, then 1-3 s asleep after each `null`,
backing off after an error), and one in `--busy-every` also holds a lease,
beaten every 5 s (the fake API's TTL is 10 s) on its own connection, each beat
bounded by its interval. For 10,000 workers that is ~3,300 polls/s and ~330
heartbeats/s, the mix the README's sizing figure is about.

Each size runs against each target in turn, each on fresh processes: the
fake API alone (`direct`), then nginx, `bench/minimal_proxy.py` (one
unlimited pool) and heartbeat-gateway (the README's minimal config; poll
admission at its default; `limits.max_client_connections` raised to fit
the workers' connections), and the same gateway logging one routine success
in a hundred (`gateway-sampled`, `logging.sample_routine: 0.01`); and
`gateway@REV`, the gateway as committed at REV, for a change beside its
parent. The proxy is pinned to core 0, the fake API and this load
generator to core 1 (`bench/rig.py`).

Reported per size and target, over the window after the ramp-up: heartbeat
p50/p99 and what the proxy added over direct, errors (any answer but 200,
a reset, a timeout), polls answered, the proxy's CPU (% of one core) and its
peak RSS, and for the gateway the share of polls it answered itself.

    .venv/bin/python bench/scale_bench.py --workers 1000,5000,10000 --duration 40
    .venv/bin/python bench/scale_bench.py --upstream https   # the API over TLS, as in production

Results and the commands that produced them: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import rig

from gateway import loop as event_loop

BEAT_INTERVAL = 5.0  # the fake API's TTL of 10 s, halved, as the SDK workers do


@dataclass
class Tally:
    measuring: bool = False
    beats: list[float] = field(default_factory=list)
    polls: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def count(self, kind: str, status: int | str, seconds: float) -> None:
        if not self.measuring:
            return
        if status != 200:
            self.errors[f"{kind} {status}"] += 1
        elif kind == "poll":
            self.polls += 1
        else:
            self.beats.append(seconds)


async def exchange(
    conn: rig.Connection | None, endpoint: rig.Endpoint, data: bytes, patience: float
) -> tuple[Any, int | str]:
    """One request on the worker's keep-alive connection, opened again after the server closed it."""
    try:
        if conn is None or conn.closed:
            conn = await endpoint.connect()
        async with asyncio.timeout(patience):
            status, _ = await conn.request(data)
        return conn, status
    except TimeoutError:
        status_text = "timeout"
    except OSError as error:
        status_text = type(error).__name__
    if conn is not None:
        conn.close()
    return None, status_text


async def idle_worker(n: int, endpoint: rig.Endpoint, credential: str, until: float, tally: Tally) -> None:
    request = rig.poll_request(f"bench-worker-{n:05d}", credential)
    conn: rig.Connection | None = None
    backoff = 1.0
    await asyncio.sleep(random.uniform(0, 3))
    while time.monotonic() < until:
        started = time.monotonic()
        conn, status = await exchange(conn, endpoint, request, 30.0)
        tally.count("poll", status, time.monotonic() - started)
        if status == 200:
            backoff = 1.0
            await asyncio.sleep(random.uniform(1, 3))
        else:
            await asyncio.sleep(random.uniform(backoff / 2, backoff))
            backoff = min(backoff * 2, 30.0)
    if conn is not None:
        conn.close()


async def busy_worker(n: int, endpoint: rig.Endpoint, credential: str, until: float, tally: Tally) -> None:
    work_id = f"work_bench{n:016d}"
    last = "NO_HEARTBEAT"
    conn: rig.Connection | None = None
    await asyncio.sleep(random.uniform(0, BEAT_INTERVAL))
    while time.monotonic() < until:
        started = time.monotonic()
        beat = rig.heartbeat_request(work_id, last, credential)
        conn, status = await exchange(conn, endpoint, beat, BEAT_INTERVAL)
        if last != "NO_HEARTBEAT" or status != 200:
            tally.count("heartbeat", status, time.monotonic() - started)
        if status == 200:
            last = "2026-12-02T00:00:00.000000Z"  # the fake API's answer, echoed as the SDK does
        await asyncio.sleep(max(0.0, BEAT_INTERVAL - (time.monotonic() - started)))
    if conn is not None:
        conn.close()


async def run_one(
    name: str, workers: int, args: argparse.Namespace, tmp: Path, tls: rig.UpstreamTls | None
) -> dict[str, Any]:
    # `gateway-sampled`: the gateway logging one routine success in a hundred (`logging.sample_routine`).
    target = "gateway" if name == "gateway-sampled" else name
    credentials = rig.Credentials.fresh()
    api_port = rig.free_port()
    api = rig.start_fake_api(tmp, api_port, tls)
    proxy = None
    try:
        await rig.wait_for_port(api_port)
        # Room for every worker's connections (one for polls, one more for a lease), as a replica sized for them has.
        sample = 0.01 if name == "gateway-sampled" else 1.0
        extra = (
            f"limits: {{max_client_connections: {workers * 2 + 100}}}\n"
            f"logging: {{level: {args.log_level}, sample_routine: {sample}}}\n{args.gateway_extra}"
        )
        proxy, port = await rig.start_target(target, tmp, api_port, credentials, extra, tls=tls)
        endpoint = rig.Endpoint.of(target, port, tls)
        credential = credentials.token if rig.is_gateway(target) else credentials.key
        admin_port = rig.admin_port(tmp, target)
        polls_before = await rig.metric_totals(admin_port, "polls", "outcome") if admin_port else Counter[str]()
        tally = Tally()
        start = time.monotonic()
        until = start + args.ramp + args.duration
        busy = set(range(0, workers, args.busy_every))
        runs = [idle_worker(n, endpoint, credential, until, tally) for n in range(workers)]
        runs += [busy_worker(n, endpoint, credential, until, tally) for n in busy]
        everything = asyncio.gather(*runs)
        await asyncio.sleep(args.ramp)
        tally.measuring = True
        opened_before = rig.Connection.opened
        cpu_before = proxy.cpu_seconds() if proxy else 0.0
        spy = rig.profile(proxy, args.duration, args.profile) if args.profile and target == "gateway" else None
        peak_rss = 0.0
        window_start = time.monotonic()
        while time.monotonic() < until - 0.5:
            await asyncio.sleep(1.0)
            if proxy is not None:
                peak_rss = max(peak_rss, proxy.rss_mib())
        window = time.monotonic() - window_start
        cpu = (proxy.cpu_seconds() - cpu_before) if proxy else 0.0
        tally.measuring = False
        reopened = rig.Connection.opened - opened_before
        if spy is not None:
            spy.wait()
        polls_after = await rig.metric_totals(admin_port, "polls", "outcome") if admin_port else Counter[str]()
        await everything
    finally:
        for process in (proxy, api):
            if process is not None:
                process.stop()
    outcome: dict[str, Any] = {
        "target": name,
        "workers": workers,
        "leases": len(busy),
        "polls_per_s": round(tally.polls / window),
        "heartbeats_per_s": round(len(tally.beats) / window),
        "heartbeat_p50_ms": rig.percentile_ms(tally.beats, 0.5),
        "heartbeat_p99_ms": rig.percentile_ms(tally.beats, 0.99),
        "heartbeat_max_ms": rig.percentile_ms(tally.beats, 1.0),
        "errors": sum(tally.errors.values()),
        "connections_opened_per_s": round(reopened / window, 1),
        "error_kinds": dict(tally.errors.most_common(4)),
        "proxy_cpu_percent": round(100 * cpu / window, 1) if proxy else None,
        "proxy_peak_rss_mib": round(peak_rss, 1) if proxy else None,
    }
    if admin_port:
        polls = polls_after - polls_before
        outcome["gateway_polls"] = dict(polls)
        outcome["answered_locally_share"] = round(
            polls["answered_empty"] / max(1, polls["forwarded"] + polls["answered_empty"]), 3
        )
    return outcome


async def main(args: argparse.Namespace) -> dict[str, Any]:
    rig.check_tools("nginx", "taskset")
    rig.pin_this_process_to_load_core()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tls = rig.upstream_tls(args.upstream, Path(tmp))
        for workers in (int(w) for w in args.workers.split(",")):
            direct: dict[str, Any] | None = None
            for target in args.targets.split(","):
                outcome = await run_one(target, workers, args, Path(tmp), tls)
                if target == "direct":
                    direct = outcome
                elif direct is not None:
                    for q in ("p50", "p99"):
                        added = outcome[f"heartbeat_{q}_ms"] - direct[f"heartbeat_{q}_ms"]
                        outcome[f"added_{q}_ms"] = round(added, 3)
                print(json.dumps(outcome), file=sys.stderr, flush=True)
                results.append(outcome)
    return {
        "command": " ".join(["bench/scale_bench.py", *sys.argv[1:]]),
        "machine": rig.machine() + f"; the fake API over {args.upstream}",
        "results": results,
    }


def print_table(outcome: dict[str, Any]) -> None:
    keys = ("workers", "polls_per_s", "heartbeats_per_s", "heartbeat_p50_ms", "heartbeat_p99_ms", "added_p50_ms",
            "added_p99_ms", "errors", "proxy_cpu_percent", "proxy_peak_rss_mib", "answered_locally_share")  # fmt: skip
    rig.print_results(outcome, keys, label_width=24, column_width=16)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1000,5000,10000", help="fleet sizes, comma-separated")
    parser.add_argument("--busy-every", type=int, default=6, help="one worker in this many also holds a lease")
    parser.add_argument("--duration", type=float, default=30.0, help="the measured window, after the ramp-up")
    parser.add_argument("--ramp", type=float, default=10.0, help="seconds of load before measuring")
    parser.add_argument("--targets", default=",".join((*rig.TARGETS, "gateway-sampled")))
    parser.add_argument("--log-level", default="info", help="the gateway's logging.level (info: as shipped)")
    parser.add_argument("--gateway-extra", default="", help="YAML added to the gateway's config")
    parser.add_argument("--upstream", default="http", help="the fake API over http, or https with a private CA")
    parser.add_argument("--profile", metavar="FILE", help="py-spy the gateway in the window (collapsed stacks)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line too")
    arguments = parser.parse_args()
    result = event_loop.run(lambda: main(arguments))
    print_table(result)
    if arguments.json:
        print(json.dumps(result))
