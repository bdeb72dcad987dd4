"""Cold start: N heartbeats at once through a proxy with no upstream connection yet, over TLS and plain HTTP.

A replica that has just started (a rollout, a lost pod's workers landing on
it) meets its fleet with an empty connection pool: the first burst of beats
makes it open up to one upstream connection per beat, and over TLS each
costs a handshake on the replica's one core (a certificate chain verified,
a key exchange). This measures what that burst costs, side by side:

- each target (`direct`, `nginx`, `minimal`, `gateway`, `gateway@REV`) with
  the fake API over `https` (a private CA, verified by every proxy) and over
  `http`, on fresh processes each time;
- `--leases` workers, each on a connection already open to its endpoint
  (so the workers' own connection set-up is not in the figures: the burst
  is the proxy's upstream cold start, and `direct` is the floor), send
  their first beat at the same instant (`cold`), then once more when all
  are answered (`warm`, the pool now full);
- per burst: p50, p99 and the slowest answer, errors, the proxy's CPU time,
  and the upstream connections open after it (from /proc/net/tcp).

    .venv/bin/python bench/cold_start_bench.py --leases 250,1000 --rounds 3

The proxy runs on core 0, the fake API and this load generator on core 1
(`bench/rig.py`). Results and the commands that produced them:
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import rig

from gateway import loop as event_loop


def upstream_connections(api_port: int) -> int:
    """Established TCP connections to the fake API's port, as the kernel lists them."""
    wanted = f":{api_port:04X}"
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[2].endswith(wanted) and fields[3] == "01":  # remote address, state ESTABLISHED
                count += 1
    return count


async def burst(conns: list[rig.Connection], credential: str, expected: str) -> dict[str, Any]:
    """Every connection's beat sent at once; each answer's time from the moment all were written."""
    latencies: list[float] = []
    errors = 0

    async def beat(n: int, conn: rig.Connection, start: float) -> None:
        nonlocal errors
        try:
            async with asyncio.timeout(30):
                status, _ = await conn.request(rig.heartbeat_request(f"work_cold{n:016d}", expected, credential))
        except (OSError, TimeoutError):
            status = 0
        if status == 200:
            latencies.append(time.monotonic() - start)
        else:
            errors += 1

    start = time.monotonic()
    await asyncio.gather(*(beat(n, conn, start) for n, conn in enumerate(conns)))
    return {
        "p50_ms": rig.percentile_ms(latencies, 0.5),
        "p99_ms": rig.percentile_ms(latencies, 0.99),
        "max_ms": rig.percentile_ms(latencies, 1.0),
        "errors": errors,
    }


async def run_one(target: str, leases: int, kind: str, tmp: Path) -> dict[str, Any]:
    tls = rig.upstream_tls(kind, tmp)
    credentials = rig.Credentials.fresh()
    api_port = rig.free_port()
    api = rig.start_fake_api(tmp, api_port, tls)
    proxy = None
    conns: list[rig.Connection] = []
    try:
        await rig.wait_for_port(api_port)
        extra = f"limits: {{max_client_connections: {leases * 2 + 100}}}"
        proxy, port = await rig.start_target(target, tmp, api_port, credentials, extra, pool=1024, tls=tls)
        credential = credentials.token if rig.is_gateway(target) else credentials.key
        endpoint = rig.Endpoint.of(target, port, tls)
        for _ in range(0, leases, 100):  # opened a hundred at a time, before anything is measured
            conns += await asyncio.gather(*(endpoint.connect() for _ in range(min(100, leases - len(conns)))))
        await asyncio.sleep(1.0)
        row: dict[str, Any] = {"target": target, "upstream": kind, "leases": leases}
        for phase, expected in (("cold", "NO_HEARTBEAT"), ("warm", "2026-12-02T00:00:00.000000Z")):
            cpu_before = proxy.cpu_seconds() if proxy else 0.0
            row[phase] = await burst(conns, credential, expected)
            row[phase]["proxy_cpu_ms"] = round(1000 * (proxy.cpu_seconds() - cpu_before)) if proxy else None
            row[phase]["upstream_connections"] = upstream_connections(api_port) if proxy else None
            await asyncio.sleep(0.5)
    finally:
        for conn in conns:
            conn.close()
        for process in (proxy, api):
            if process is not None:
                process.stop()
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per leases, upstream and target: each figure as `median [min..max]` over the rounds."""
    table: list[dict[str, Any]] = []
    for key in dict.fromkeys((r["leases"], r["upstream"], r["target"]) for r in rows):
        mine = [r for r in rows if (r["leases"], r["upstream"], r["target"]) == key]
        line: dict[str, Any] = {"leases": key[0], "upstream": key[1], "target": key[2]}
        for phase in ("cold", "warm"):
            for figure in ("p50_ms", "p99_ms", "max_ms", "errors", "proxy_cpu_ms", "upstream_connections"):
                values = [r[phase][figure] for r in mine if r[phase][figure] is not None]
                line[f"{phase} {figure}"] = rig.spread(values)
        table.append(line)
    return table


async def main(args: argparse.Namespace) -> dict[str, Any]:
    rig.check_tools("nginx", "taskset")
    rig.pin_this_process_to_load_core()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for leases in (int(n) for n in args.leases.split(",")):
                for kind in args.upstream.split(","):
                    for target in args.targets.split(","):
                        rows.append(await run_one(target, leases, kind, Path(tmp)))
    return {
        "command": " ".join(["bench/cold_start_bench.py", *sys.argv[1:]]),
        "machine": rig.machine(),
        "summary": summarise(rows),
        "rounds": rows,
    }


def print_table(outcome: dict[str, Any]) -> None:
    print(f"\n{outcome['command']}\n{outcome['machine']}\nmedian [min..max] over the rounds")
    for line in outcome["summary"]:
        print(f"\n{line['leases']} leases, fake API over {line['upstream']}, {line['target']}")
        for label, value in line.items():
            if label not in ("leases", "upstream", "target"):
                print(f"  {label:28}{value:>28}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leases", default="250,1000", help="workers beating at once, comma-separated")
    parser.add_argument("--upstream", default="https,http", help="the fake API over https and/or http")
    parser.add_argument("--targets", default=",".join(rig.TARGETS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line too")
    arguments = parser.parse_args()
    result = event_loop.run(lambda: main(arguments))
    print_table(result)
    if arguments.json:
        print(json.dumps(result))
