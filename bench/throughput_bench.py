"""Throughput benchmark: what one request costs in each proxy, side by side, in one run, repeated.

The proxy under test runs alone on core 0; the fake API (nginx answering as
the environments API does, `bench/rig.py`) and the load generators on core 1.
Each round runs every target in turn on fresh processes, and the rounds
repeat, so each figure comes with its spread and each ratio is taken within
one round:

- `closed-loop heartbeat`: wrk, `--connections` connections, each POSTing a
  heartbeat for one of 1,000 leases as fast as answers come. Reported:
  requests/s and the proxy's CPU per request (`/proc`, user + system).
- `closed-loop GET`: the same with a work-item retrieve, passed through.
- `500/s heartbeat`: 500 leases, each beaten once a second on its own
  connection on a fixed schedule (open loop); p50/p99 of the round trips,
  and what the proxy added over `direct` in the same round.
- `500/s absorbed`: the same through the gateway with absorption on
  as the README recommends it (`desired_ttl_seconds: 300`,
  `max_signal_delay_seconds: 60`): most beats answered by the gateway itself.

Targets: `direct` (the fake API; latency rows only), `nginx` (1.22,
upstream keepalive), `minimal` (`bench/minimal_proxy.py`, the least an
aiohttp proxy does; `minimal-lean-client` and `minimal-low-level-server`, its
variants), `gateway` (the README's minimal config; `--log-level`) and
`gateway@REV`, the gateway as committed at git revision REV, so a change is
measured beside its parent in the same rounds (`--targets
minimal,gateway@HEAD~1,gateway`).

    .venv/bin/python bench/throughput_bench.py --rounds 3
    .venv/bin/python bench/throughput_bench.py --rounds 3 --upstream http,https   # and over TLS, per round

With `--upstream https` the fake API is served over TLS with a CA made for the
run, every proxy verifies it, and `direct` workers speak TLS to it themselves
(`bench/rig.py`); the proxies still take plain HTTP from the workers.

Results and the commands that produced them: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import rig

from gateway import loop as event_loop

WRK_SCRIPT = """
local n = 0
local headers = {{["Authorization"] = "Bearer {credential}", ["anthropic-beta"] = "{beta}",
                  ["anthropic-version"] = "2023-06-01"}}
request = function()
  n = n + 1
  local path
  if "{kind}" == "heartbeat" then
    path = string.format("/v1/environments/{env}/work/work_bench%016d/heartbeat?beta=true"
      .. "&expected_last_heartbeat=2026-12-02T00:00:00.000000Z", n % 1000)
    return wrk.format("POST", path, headers, "")
  end
  path = string.format("/v1/environments/{env}/work/work_bench%016d?beta=true", n % 1000)
  return wrk.format("GET", path, headers, nil)
end
"""


async def closed_loop(
    kind: str, port: int, credential: str, proxy: rig.Process, args: Any, tmp: Path, *, profile: bool = False
) -> dict[str, Any]:
    script = tmp / f"{kind}.lua"
    script.write_text(WRK_SCRIPT.format(credential=credential, beta=rig.BETA, env=rig.ENV_ID, kind=kind))
    command = ["taskset", "-c", str(rig.LOAD_CORE), "wrk", "-t1", f"-c{args.connections}",
               f"-d{args.seconds}s", "-s", str(script), f"http://127.0.0.1:{port}/"]  # fmt: skip
    # A short warm-up first: the first requests open connections and fill caches.
    warm = [*command[:6], "-d2s", *command[7:]]
    await asyncio.to_thread(subprocess.run, warm, capture_output=True, check=True)
    cpu_before = proxy.cpu_seconds()
    spy = rig.profile(proxy, args.seconds, f"{args.profile}.{kind}") if profile else None
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, check=True)
    cpu = proxy.cpu_seconds() - cpu_before
    if spy is not None:
        spy.wait()
    requests = int(re.search(r"(\d+) requests in", done.stdout).group(1))  # type: ignore[union-attr]
    failures = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
    errors = re.search(r"Socket errors: (.*)", done.stdout)
    return {
        "requests_per_s": round(requests / args.seconds),
        "cpu_us_per_request": round(1e6 * cpu / max(1, requests), 1),
        "non_2xx": int(failures.group(1)) if failures else 0,
        "socket_errors": errors.group(1) if errors else "",
    }


async def open_loop(endpoint: rig.Endpoint, credential: str, args: Any) -> dict[str, Any]:
    """500 leases, one beat a second each, on a fixed schedule: latency at a rate well below saturation."""
    leases, interval = args.leases, 1.0
    latencies: list[float] = []
    errors = 0
    start = time.monotonic() + 1.0
    measure_from = start + args.ramp
    until = measure_from + args.seconds

    async def lease(n: int) -> None:
        nonlocal errors
        conn = await endpoint.connect()
        last = "NO_HEARTBEAT"
        due = start + interval * n / leases
        while due < until:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            sent = time.monotonic()
            status, body = await conn.request(rig.heartbeat_request(f"work_steady{n:015d}", last, credential))
            if sent >= measure_from:
                if status == 200:
                    latencies.append(time.monotonic() - sent)
                else:
                    errors += 1
            if status == 200:
                last = json.loads(body)["last_heartbeat"]
            due += interval
        conn.close()

    await asyncio.gather(*(lease(n) for n in range(leases)))
    return {
        "beats_per_s": round(len(latencies) / args.seconds),
        "p50_ms": rig.percentile_ms(latencies, 0.5),
        "p99_ms": rig.percentile_ms(latencies, 0.99),
        "errors": errors,
    }


async def one_round(n: int, args: Any, tmp: Path, tls: rig.UpstreamTls | None, label: str) -> list[dict[str, Any]]:
    """Every target once, the fake API over one scheme; `label` names the scheme when a run compares two."""
    rows: list[dict[str, Any]] = []
    modes = [(t, "forwarded") for t in args.targets.split(",")]
    modes += [(t, "absorbed") for t in args.targets.split(",") if rig.is_gateway(t)]
    for target, mode in modes:
        credentials = rig.Credentials.fresh()
        api_port = rig.free_port()
        api = rig.start_fake_api(tmp, api_port, tls)
        proxy = None
        try:
            await rig.wait_for_port(api_port)
            extra = f"logging: {{level: {args.log_level}}}"
            if mode == "absorbed":
                # The README's recommended absorbing setting: a 300 s lease, stops within 60 s.
                extra += (
                    "\nheartbeat: {desired_ttl_seconds: 300, absorb: {enabled: true, max_signal_delay_seconds: 60}}"
                )
            proxy, port = await rig.start_target(target, tmp, api_port, credentials, extra, pool=args.pool, tls=tls)
            credential = credentials.token if rig.is_gateway(target) else credentials.key
            name = target if mode == "forwarded" else f"{target} absorbed"
            row: dict[str, Any] = {"round": n, "target": f"{name}{label}"}
            if proxy is not None and mode == "forwarded":
                profile = bool(args.profile) and target == "gateway" and n == 1
                row["heartbeat"] = await closed_loop("heartbeat", port, credential, proxy, args, tmp, profile=profile)
                row["get"] = await closed_loop("get", port, credential, proxy, args, tmp, profile=profile)
            before = (
                await rig.metric_totals(rig.admin_port(tmp, target), "heartbeats", "outcome")
                if rig.is_gateway(target)
                else None
            )
            row["open_loop"] = await open_loop(rig.Endpoint.of(target, port, tls), credential, args)
            if before is not None:
                after = await rig.metric_totals(rig.admin_port(tmp, target), "heartbeats", "outcome")
                row["gateway_heartbeats"] = dict(after - before)
        finally:
            for process in (proxy, api):
                if process is not None:
                    process.stop()
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    direct = next((r for r in rows if r["target"] == f"direct{label}"), None)
    for row in rows:
        if direct is not None and row is not direct:
            for q in ("p50", "p99"):
                row["open_loop"][f"added_{q}_ms"] = round(
                    row["open_loop"][f"{q}_ms"] - direct["open_loop"][f"{q}_ms"], 3
                )
    minimal = next((r for r in rows if r["target"] == f"minimal{label}"), None)
    for row in rows:
        if minimal is not None and "heartbeat" in row:
            row["heartbeat"]["cpu_vs_minimal"] = round(
                row["heartbeat"]["cpu_us_per_request"] / minimal["heartbeat"]["cpu_us_per_request"], 2
            )
            row["get"]["rate_vs_minimal"] = round(row["get"]["requests_per_s"] / minimal["get"]["requests_per_s"], 2)
    return rows


def tls_cost(rows: list[dict[str, Any]]) -> None:
    """For each target over https, its CPU per request against the same target over http in the same round."""
    by_target = {r["target"]: r for r in rows}
    for row in rows:
        plain = by_target.get(row["target"].replace(" over https", " over http"))
        if row["target"].endswith(" over https") and plain is not None and "heartbeat" in row:
            for part in ("heartbeat", "get"):
                row[part]["cpu_vs_http"] = round(row[part]["cpu_us_per_request"] / plain[part]["cpu_us_per_request"], 2)


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Per target, each figure as `median [min..max]` over the rounds."""
    figures = {
        "heartbeat req/s": ("heartbeat", "requests_per_s"),
        "heartbeat CPU µs/req": ("heartbeat", "cpu_us_per_request"),
        "heartbeat CPU vs minimal": ("heartbeat", "cpu_vs_minimal"),
        "heartbeat not 2xx": ("heartbeat", "non_2xx"),
        "heartbeat CPU vs http": ("heartbeat", "cpu_vs_http"),
        "GET req/s": ("get", "requests_per_s"),
        "GET req/s vs minimal": ("get", "rate_vs_minimal"),
        "GET not 2xx": ("get", "non_2xx"),
        "GET CPU vs http": ("get", "cpu_vs_http"),
        "500/s p50 ms": ("open_loop", "p50_ms"),
        "500/s p99 ms": ("open_loop", "p99_ms"),
        "500/s added p50 ms": ("open_loop", "added_p50_ms"),
        "500/s added p99 ms": ("open_loop", "added_p99_ms"),
        "500/s errors": ("open_loop", "errors"),
    }
    table: dict[str, dict[str, str]] = {}
    for target in dict.fromkeys(r["target"] for r in rows):
        mine = [r for r in rows if r["target"] == target]
        table[target] = {
            label: rig.spread([r[part][key] for r in mine if key in r.get(part, {})])
            for label, (part, key) in figures.items()
        }
    return table


async def main(args: Any) -> dict[str, Any]:
    rig.check_tools("nginx", "taskset", "wrk")
    rig.pin_this_process_to_load_core()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        # Each round every scheme in turn: what TLS costs, side by side in one run.
        kinds = args.upstream.split(",")
        schemes = {kind: rig.upstream_tls(kind, Path(tmp)) for kind in kinds}
        for n in range(1, args.rounds + 1):
            this_round: list[dict[str, Any]] = []
            for kind, tls in schemes.items():
                this_round += await one_round(n, args, Path(tmp), tls, f" over {kind}" if len(kinds) > 1 else "")
            tls_cost(this_round)
            rows += this_round
    return {
        "command": " ".join(["bench/throughput_bench.py", *sys.argv[1:]]),
        "machine": rig.machine() + f"; the fake API over {args.upstream}",
        "summary": summarise(rows),
        "rounds": rows,
    }


def print_table(outcome: dict[str, Any]) -> None:
    print(f"\n{outcome['command']}\n{outcome['machine']}\nmedian [min..max] over the rounds")
    summary = outcome["summary"]
    targets = list(summary)
    print(f"{'':26}" + "".join(f"{t:>24}" for t in targets))
    for label in next(iter(summary.values())):
        print(f"{label:26}" + "".join(f"{summary[t][label]:>24}" for t in targets))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10, help="each measured phase")
    parser.add_argument("--ramp", type=float, default=3.0, help="open-loop seconds before measuring")
    parser.add_argument("--connections", type=int, default=32, help="wrk's connections")
    parser.add_argument("--leases", type=int, default=500, help="open-loop leases, one beat a second each")
    parser.add_argument("--targets", default=",".join(rig.TARGETS))
    parser.add_argument("--pool", type=int, default=1024, help="the minimal proxy's one pool")
    parser.add_argument("--log-level", default="info", help="the gateway's logging.level (info: as shipped)")
    parser.add_argument(
        "--upstream", default="http", help="the fake API over http, https (a private CA), or both: http,https"
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line too")
    parser.add_argument(
        "--profile", metavar="FILE", help="py-spy the gateway in round 1's closed loops (FILE.heartbeat, FILE.get)"
    )
    arguments = parser.parse_args()
    result = event_loop.run(lambda: main(arguments))
    print_table(result)
    if arguments.json:
        print(json.dumps(result))
