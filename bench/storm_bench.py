"""The bad day, side by side with direct: the same SDK-paced fleet against the same simulator, in one run.

Each scenario runs its fleet against each target in turn, each on a fresh
simulator (`simulate-upstream`, the project's faithful control plane) and
fresh gateway processes (`heartbeat-gateway serve`, the README's minimal
config). A gateway replica runs as a pod with `limits.cpu` runs: in a CPU
cgroup with that CFS quota (`--cpu-millicores`; Kubernetes sets the same
quota), pinned to its own core, so "a replica past its capacity" is a fleet
this machine can drive.

The fleet, by the SDK workers' rules (environments-api.md §5, §6), each call
with the SDK client's own retries (2, on errors, 408, 409, 429 and 5xx,
after `retry-after` when given):
- `--pollers` idle workers long-poll (`block_ms=999`, 1-3 s asleep after a
  `null`, backing off after an error); an item a poll finds is acked and
  stopped at once, and its pickup delay (enqueued to found) recorded: one
  item is enqueued every `--enqueue-every` seconds;
- `--holders` workers each hold a lease on an item acked beforehand: a claim
  (`NO_HEARTBEAT`), then a beat every `clamp(ttl/2, 1, 30)` s, each bounded
  by that interval. A lease is lost on a 412, or when a TTL passes without a
  success; a claim fails when it has not succeeded `--claim-patience` s after
  its first try.
Workers start spread over `--spread` seconds.

Scenarios (`--scenario`):
- `startup`: the whole fleet starts within 10 s on one replica at two or more
  times what it can serve;
- `failover`: two replicas, workers split between them; one is SIGKILLed
  half-way (`--stop-signal TERM`: stopped as Kubernetes stops a pod, with a
  drain), and its workers reconnect to the other (as a Service sends new
  connections to the endpoints left);
- `slow-api`: the API's heartbeat latency rises to 3 s for a minute, under
  enough holders to keep a thousand lease calls in flight;
- `faults`: 30% of heartbeats (`--rate-limited`) answered 429 `retry-after: 1`
  all along, and every 15 s a short outage (`--outage`, 1.5 s: every heartbeat
  connection reset), in each heartbeat mode (`gateway`: coalescing, `absorb`,
  `coalesce-false`).

With `--upstream https` the simulator serves TLS with a CA made for the run
(`bench/rig.py`), which the gateway verifies (`upstream.tls.ca_files`) and
direct workers verify too: the API as users reach it, every replica opening
its upstream connections with a handshake.

Targets: `direct`; `gateway` (defaults: shedding on); `gateway-no-shed`
(`overload.enabled: false`, what the overload manager changes); in
`faults`, `absorb` and `coalesce-false` too. Reported per target: leases
lost, claims failed, heartbeat p50/p99 and what the gateway added over
direct (over the whole run, and `settled`: from `--settle` s after the
fleet has started, once shedding has had time to act), poll answers and
pickup delay p50/p99, and for the gateway its CPU, the highest overload
level, requests shed and internal errors.

    .venv/bin/python bench/storm_bench.py --scenario startup --pollers 3000 --holders 300 --cpu-millicores 250
    .venv/bin/python bench/storm_bench.py --scenario slow-api --holders 2500 --pollers 0 --duration 100

Results and the commands that produced them: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))
import rig
from heartbeat_bench import cpu_seconds, wait_for

from gateway import loop as event_loop

ENV_ID = "env_bench00000000000000001"
# The holders' items: a queue of their own, so the idle pollers never take them.
HOLD_ENV_ID = "env_bench00000000000000002"
BETA = "managed-agents-2026-04-01"
CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
PROXY_CORE, LOAD_CORE = 0, 1
SCENARIOS = ("startup", "failover", "slow-api", "faults")


@dataclass
class Tally:
    target: str
    beats: list[float] = field(default_factory=list)
    # The beats once the fleet has started (after --spread) and the gateway has had --settle s to act.
    settled_beats: list[float] = field(default_factory=list)
    settled_from: float = 0.0
    leases: Counter[str] = field(default_factory=Counter)
    claims: Counter[str] = field(default_factory=Counter)
    polls: Counter[str] = field(default_factory=Counter)
    pickups: list[float] = field(default_factory=list)
    enqueued: dict[str, float] = field(default_factory=dict)
    # Items enqueued over every round merged in (a later round's simulator may reuse an earlier one's ids).
    enqueued_count: int = 0
    gateway: dict[str, Any] = field(default_factory=dict)

    def merge(self, other: Tally) -> None:
        """Another round's counts added to this one's (the gateway's figures are the last round's)."""
        self.beats += other.beats
        self.settled_beats += other.settled_beats
        self.pickups += other.pickups
        for mine, theirs in ((self.leases, other.leases), (self.claims, other.claims), (self.polls, other.polls)):
            mine.update(theirs)
        self.enqueued_count += other.enqueued_count
        self.gateway = other.gateway

    def summary(self, direct: Tally | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "target": self.target,
            "leases_lost": sum(n for kind, n in self.leases.items() if kind != "kept"),
            "leases": dict(self.leases),
            "claims_failed": self.claims["failed"],
            "heartbeats": len(self.beats),
            "heartbeat_p50_ms": rig.percentile_ms(self.beats, 0.5),
            "heartbeat_p99_ms": rig.percentile_ms(self.beats, 0.99),
            "settled_p99_ms": rig.percentile_ms(self.settled_beats, 0.99),
            "polls": dict(self.polls),
            "picked_up": f"{len(self.pickups)}/{self.enqueued_count}",
            "pickup_p50_ms": rig.percentile_ms(self.pickups, 0.5),
            "pickup_p99_ms": rig.percentile_ms(self.pickups, 0.99),
            **self.gateway,
        }
        if direct is not None and direct is not self:
            base = direct.summary(None)
            for q in ("p50", "p99"):
                out[f"added_{q}_ms"] = round(out[f"heartbeat_{q}_ms"] - base[f"heartbeat_{q}_ms"], 1)
            out["settled_added_p99_ms"] = round(out["settled_p99_ms"] - base["settled_p99_ms"], 1)
        return out


class Route:
    """Where a worker's requests go: one base URL, or the next replica when its own is gone (a Service)."""

    def __init__(self, bases: list[str], first: int) -> None:
        self.bases, self.index = bases, first % len(bases)

    @property
    def base(self) -> str:
        return self.bases[self.index]

    def lost_connection(self) -> None:
        self.index = (self.index + 1) % len(self.bases)


# The SDKs' base client (environments-api.md §5): 2 retries on a connection error, 408, 409, 429 or 5xx,
# after `retry-after` (0-60 s) when given, else 0.5 s doubling to 8 s with up to 25% jitter off.
SDK_RETRIES = 2
SDK_RETRIED = frozenset({408, 409, 429}) | frozenset(range(500, 600))


async def call(
    session: aiohttp.ClientSession, route: Route, method: str, path: str, headers: dict[str, str], **kw: Any
) -> tuple[int | str, Any]:
    """One SDK call: the request and the client's own retries."""
    for attempt in range(SDK_RETRIES + 1):
        status, body, retry_after = await _once(session, route, method, path, headers, **kw)
        if attempt == SDK_RETRIES or not (status in ("reset", "error") or status in SDK_RETRIED):
            break
        backoff = min(0.5 * 2**attempt, 8.0) * (1 - random.uniform(0, 0.25))
        await asyncio.sleep(retry_after if retry_after is not None and 0 <= retry_after <= 60 else backoff)
    return status, body


async def _once(
    session: aiohttp.ClientSession, route: Route, method: str, path: str, headers: dict[str, str], **kw: Any
) -> tuple[int | str, Any, float | None]:
    try:
        async with session.request(method, route.base + path, headers=headers, **kw) as response:
            body = await response.json(content_type=None) if response.status != 204 else None
            retry_after = response.headers.get("retry-after")
            return response.status, body, float(retry_after) if retry_after and retry_after.isdigit() else None
    except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError):
        route.lost_connection()
        return "reset", None, None
    except (TimeoutError, aiohttp.ClientError, ValueError):
        return "error", None, None


async def hold(session: aiohttp.ClientSession, route: Route, token: str, n: int, t: Tally, args: Any) -> None:
    """A worker that takes one item and holds its lease by the SDK's rules: poll, ack, claim, then a beat every
    clamp(ttl/2, 1, 30) s, each bounded by that interval. Its items are queued in an environment of their own."""
    headers = {"Authorization": f"Bearer {token}", "anthropic-beta": BETA, "Anthropic-Worker-ID": f"holder-{n}"}
    await asyncio.sleep(random.uniform(0, args.spread))
    work = f"/v1/environments/{HOLD_ENV_ID}/work"
    item: Any = None
    while item is None and time.monotonic() < args.until:
        status, item = await _bounded(30.0, call(session, route, "GET", f"{work}/poll", headers,
                                                 params={"block_ms": "999"}))  # fmt: skip
        if status != 200 or not isinstance(item, dict):
            item = None
            await asyncio.sleep(random.uniform(1, 3))
    if item is None:
        t.claims["never_polled"] += 1
        return
    status, _ = await call(session, route, "POST", f"{work}/{item['id']}/ack", headers)
    if status != 200:
        t.claims["ack_failed"] += 1
        return
    path = f"{work}/{item['id']}/heartbeat"
    last, ttl, interval = "NO_HEARTBEAT", float(args.ttl), 30.0
    first_try = last_success = time.monotonic()
    until = args.until
    while time.monotonic() < until:
        started = time.monotonic()
        bound = interval  # the SDK bounds every beat, the claim too (30 s before a TTL is known)
        status, body = await _bounded(bound, call(session, route, "POST", path, headers,
                                                  params={"expected_last_heartbeat": last}))  # fmt: skip
        if status == 412:
            t.leases["lost_412" if last != "NO_HEARTBEAT" else "claim_412"] += 1
            return
        if status == 200 and isinstance(body, dict):
            if last != "NO_HEARTBEAT":
                t.beats.append(time.monotonic() - started)
                if started >= t.settled_from:
                    t.settled_beats.append(time.monotonic() - started)
            last, last_success, ttl = body["last_heartbeat"], time.monotonic(), float(body["ttl_seconds"])
            interval = max(1.0, min(ttl / 2, 30.0))
        elif last == "NO_HEARTBEAT":
            if time.monotonic() - first_try > args.claim_patience:
                t.claims["failed"] += 1
                return
            await asyncio.sleep(random.uniform(0.5, 1.5))  # the SDK's retry of a failed request
            continue
        elif time.monotonic() - last_success > ttl:
            t.leases["lost_ttl"] += 1
            return
        await asyncio.sleep(max(0.0, min(interval - (time.monotonic() - started), until - time.monotonic())))
    t.leases["kept" if last != "NO_HEARTBEAT" else "never_claimed"] += 1


async def _bounded(seconds: float, request: Awaitable[tuple[int | str, Any]]) -> tuple[int | str, Any]:
    try:
        async with asyncio.timeout(seconds):
            return await request
    except TimeoutError:
        return "timeout", None


async def poll(session: aiohttp.ClientSession, route: Route, token: str, n: int, t: Tally, args: Any) -> None:
    """An idle SDK worker: long polls, sleeps 1-3 s after each `null`, acks and stops what it finds."""
    headers = {"Authorization": f"Bearer {token}", "anthropic-beta": BETA, "Anthropic-Worker-ID": f"storm-{n}"}
    work = f"/v1/environments/{ENV_ID}/work"
    await asyncio.sleep(random.uniform(0, args.spread))
    backoff = 1.0
    while time.monotonic() < args.until:
        status, item = await _bounded(30.0, call(session, route, "GET", f"{work}/poll", headers,
                                                 params={"block_ms": "999"}))  # fmt: skip
        t.polls[str(status)] += 1
        if status == 200 and isinstance(item, dict):
            enqueued = t.enqueued.get(item["id"])
            if enqueued is not None:
                t.pickups.append(time.monotonic() - enqueued)
            await call(session, route, "POST", f"{work}/{item['id']}/ack", headers)
            await call(session, route, "POST", f"{work}/{item['id']}/stop", headers)
            continue
        if status == 200:
            backoff = 1.0
            await asyncio.sleep(random.uniform(1, 3))
        else:
            await asyncio.sleep(random.uniform(backoff / 2, backoff))
            backoff = min(backoff * 2, 30.0)


# -- processes ------------------------------------------------------------------------------------


class Limited:
    """A process in a CPU cgroup with a CFS quota, as a pod with `limits.cpu` (cgroup v1 here)."""

    def __init__(self, command: list[str], env: dict[str, str], millicores: int, name: str) -> None:
        self.process = subprocess.Popen(
            ["taskset", "-c", str(PROXY_CORE), *command], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.group: Path | None = None
        if millicores and (CGROUP_CPU / "cpu.cfs_quota_us").exists():
            self.group = CGROUP_CPU / f"hgw-storm-{os.getpid()}-{name}"
            with contextlib.suppress(FileExistsError):
                self.group.mkdir()
            (self.group / "cpu.cfs_period_us").write_text("100000")
            (self.group / "cpu.cfs_quota_us").write_text(str(millicores * 100))
            (self.group / "cgroup.procs").write_text(str(self.process.pid))
        elif millicores:
            print("no cgroup v1 cpu controller: the replica runs on a whole core", file=sys.stderr)

    def cpu(self) -> float:
        with contextlib.suppress(OSError):
            return cpu_seconds(self.process.pid)
        return 0.0

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=30)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.group is not None:
            with contextlib.suppress(OSError):
                self.group.rmdir()


# The simulator's TLS, as every client of it here trusts it (`--upstream https`); True: no TLS of its own.
SIM_TLS: ssl.SSLContext | bool = True


def sim_client() -> aiohttp.ClientSession:
    """A session to the simulator's own endpoints (faults, queued work), over its TLS if it has it."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=SIM_TLS))


def gateway_yaml(
    sim_url: str, port: int, admin_port: int, target: str, args: Any, tls: rig.UpstreamTls | None = None
) -> str:
    extra = {
        "gateway-no-shed": "overload: {enabled: false}",
        "coalesce-false": "heartbeat: {coalesce: false}",
        "absorb": "heartbeat: {absorb: {enabled: true}}",
    }.get(target, "")
    return f"""
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin_port}}}
upstream: {{{tls.gateway_upstream(sim_url) if tls else f"base_url: '{sim_url}'"}}}
environments: [{{id: {ENV_ID}, key_env: BENCH_ENV_KEY}}, {{id: {HOLD_ENV_ID}, key_env: BENCH_ENV_KEY}}]
clients: {{tokens: [{{token_env: BENCH_TOKEN}}]}}
limits: {{max_client_connections: 20000}}
logging: {{level: warning, format: json}}
{extra}
"""


async def metric(admin: str, name: str) -> dict[str, float]:
    """Samples of one metric family from a gateway's /metrics, by their label text."""
    found: dict[str, float] = {}
    with contextlib.suppress(aiohttp.ClientError, OSError):
        async with aiohttp.ClientSession() as http, http.get(f"{admin}/metrics") as r:
            for line in (await r.text()).splitlines():
                if line.startswith(name) and not line.startswith("#"):
                    key, _, value = line.rpartition(" ")
                    found[key[len(name) :]] = float(value)
    return found


# -- scenarios: what happens to the API or the replicas during a run ---------------------------------


async def set_faults(sim_url: str, **faults: Any) -> None:
    async with sim_client() as http, http.post(f"{sim_url}/_sim/faults", json=faults) as r:
        assert r.status == 200, await r.text()


async def weather(scenario: str, sim_url: str, replicas: list[Limited], args: Any) -> None:
    start = time.monotonic()
    if scenario == "failover" and len(replicas) == 2:
        await asyncio.sleep(args.duration / 2)
        # SIGKILL: a lost node, no drain; SIGTERM: a rollout, eviction or scale-in, which drains.
        replicas[0].stop(signal.Signals[f"SIG{args.stop_signal}"])
    elif scenario == "slow-api":
        await asyncio.sleep(args.spread + 10)
        await set_faults(sim_url, latency_seconds=3.0, endpoints=["heartbeat"])
        await asyncio.sleep(60)
        await set_faults(sim_url)
    elif scenario == "faults":
        limited = {"rate_limit_rate": args.rate_limited, "retry_after_seconds": 1, "endpoints": ["heartbeat"]}
        await set_faults(sim_url, **limited)
        while args.outage and time.monotonic() - start < args.duration - 15:
            await asyncio.sleep(13.5)
            await set_faults(sim_url, reset_rate=1.0, endpoints=["heartbeat"])
            await asyncio.sleep(args.outage)
            await set_faults(sim_url, **limited)


async def enqueue_items(sim_url: str, t: Tally, args: Any) -> None:
    """One item every --enqueue-every seconds, for the pollers to find: the pickup delay."""
    if not args.pollers:
        return
    async with sim_client() as http:
        await asyncio.sleep(args.spread)
        while time.monotonic() < args.until - 5:
            async with http.post(f"{sim_url}/_sim/environments/{ENV_ID}/work", json={"count": 1}) as r:
                (work_id,) = (await r.json())["ids"]
            t.enqueued[work_id] = time.monotonic()
            t.enqueued_count += 1
            await asyncio.sleep(args.enqueue_every)


async def run_target(target: str, scenario: str, tmp: Path, args: Any, tls: rig.UpstreamTls | None) -> Tally:
    key = "bench-env-key-" + secrets.token_urlsafe(16)
    token = "bench-token-" + secrets.token_urlsafe(16)
    env = {**os.environ, "BENCH_ENV_KEY": key, "BENCH_TOKEN": token, "SIM_KEY": key}
    exe = [sys.executable, "-m", "gateway"]
    sim_port = rig.free_port()
    sim_url = f"{'https' if tls else 'http'}://127.0.0.1:{sim_port}"
    served = ["--tls-cert", str(tls.cert_file), "--tls-key", str(tls.key_file)] if tls else []
    sim = subprocess.Popen(  # noqa: ASYNC220 - started once per target, before any load
        ["taskset", "-c", str(LOAD_CORE), *exe, "simulate-upstream", "--port", str(sim_port), "--ttl", str(args.ttl),
         "--environment", f"{ENV_ID}=SIM_KEY", "--environment", f"{HOLD_ENV_ID}=SIM_KEY", "--seed", str(args.seed),
         *served],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    replicas: list[Limited] = []
    admins: list[str] = []
    t = Tally(target)
    try:
        await wait_for(f"{sim_url}/_sim/stats", tls=SIM_TLS)
        bases, credential = [sim_url], key
        if target != "direct":
            bases = []
            for n in range(2 if scenario == "failover" else 1):
                port, admin_port = rig.free_port(), rig.free_port()
                config = tmp / f"{target}-{n}.yaml"
                config.write_text(gateway_yaml(sim_url, port, admin_port, target, args, tls))
                command = [*exe, "serve", "--config", str(config)]
                replicas.append(Limited(command, env, args.cpu_millicores, f"{target}-{n}"))
                admins.append(f"http://127.0.0.1:{admin_port}")
                await wait_for(f"{admins[-1]}/readyz")
                bases.append(f"http://127.0.0.1:{port}")
            credential = token
        await _play(t, bases, credential, key, sim_url, scenario, replicas, admins, args)
    finally:
        for replica in replicas:
            replica.stop()
        sim.send_signal(signal.SIGTERM)
        sim.wait(timeout=60)
    return t


async def _play(
    t: Tally,
    bases: list[str],
    credential: str,
    key: str,
    sim_url: str,
    scenario: str,
    replicas: list[Limited],
    admins: list[str],
    args: Any,
) -> None:
    connector = aiohttp.TCPConnector(limit=0, force_close=False, ssl=SIM_TLS)
    async with aiohttp.ClientSession(connector=connector) as session:
        # One item per holder, queued in the holders' own environment.
        left = args.holders
        while left:
            count = min(left, 10_000)
            async with session.post(f"{sim_url}/_sim/environments/{HOLD_ENV_ID}/work", json={"count": count}) as r:
                assert r.status == 201, await r.text()
            left -= count
        cpu_before = [r.cpu() for r in replicas]
        started = time.monotonic()
        args.until = started + args.duration
        t.settled_from = started + args.spread + args.settle
        levels: list[float] = []

        async def watch() -> None:
            while time.monotonic() < args.until:
                for admin in admins:
                    levels.extend((await metric(admin, "heartbeat_gateway_overload_level")).values())
                await asyncio.sleep(1.0)

        fleet: list[Awaitable[None]] = [
            hold(session, Route(bases, n), credential, n, t, args) for n in range(args.holders)
        ]
        fleet += [poll(session, Route(bases, n), credential, n, t, args) for n in range(args.pollers)]
        await asyncio.gather(
            *fleet, weather(scenario, sim_url, replicas, args), enqueue_items(sim_url, t, args), watch()
        )
        seconds = time.monotonic() - started
        if replicas:
            shed: Counter[str] = Counter()
            internal = 0.0
            for admin in admins:
                for labels, value in (await metric(admin, "heartbeat_gateway_requests_shed_total")).items():
                    shed[labels.split('action="')[1].split('"')[0]] += int(value)
                internal += sum((await metric(admin, "heartbeat_gateway_internal_errors_total")).values())
            cpu = sum(r.cpu() for r in replicas) - sum(cpu_before)
            t.gateway = {
                "gateway_cpu_percent": round(100 * cpu / seconds, 1),
                "cpu_limit_percent": args.cpu_millicores / 10 if args.cpu_millicores else None,
                "max_overload_level": max(levels, default=0),
                "shed": dict(shed),
                "internal_errors": internal,
            }


async def main(args: Any) -> dict[str, Any]:
    os.sched_setaffinity(0, {LOAD_CORE})
    results: list[dict[str, Any]] = []
    targets = args.targets or ("direct,gateway,absorb,coalesce-false" if args.scenario == "faults"
                               else "direct,gateway,gateway-no-shed")  # fmt: skip
    first_seed = args.seed
    global SIM_TLS
    with tempfile.TemporaryDirectory() as tmp:
        tls = rig.upstream_tls(args.upstream, Path(tmp))
        SIM_TLS = tls.client_context() if tls else True
        tallies: dict[str, Tally] = {}
        lost_by_round: dict[str, list[int]] = {}
        for round_ in range(args.rounds):
            # Each round one weather for every target: the simulator's and the fleet's random choices alike.
            args.seed = first_seed + round_
            for target in targets.split(","):
                random.seed(args.seed)
                tally = await run_target(target, args.scenario, Path(tmp), args, tls)
                lost_by_round.setdefault(target, []).append(tally.summary(None)["leases_lost"])
                print(json.dumps(tally.summary(None)), file=sys.stderr, flush=True)
                if target in tallies:
                    tallies[target].merge(tally)
                else:
                    tallies[target] = tally
        direct = tallies.get("direct")
        for target, tally in tallies.items():
            results.append({**tally.summary(direct), "leases_lost_by_round": lost_by_round[target]})
    return {
        "command": " ".join(["bench/storm_bench.py", *sys.argv[1:]]),
        "machine": rig.machine(
            f"replicas on core {PROXY_CORE}, fleet and simulator on {LOAD_CORE}; the simulator over {args.upstream}"
        ),
        "scenario": args.scenario,
        "results": results,
    }


def print_table(outcome: dict[str, Any]) -> None:
    keys = ("leases_lost", "leases_lost_by_round", "claims_failed", "heartbeats", "heartbeat_p50_ms",
            "heartbeat_p99_ms", "added_p50_ms",
            "added_p99_ms", "settled_p99_ms", "settled_added_p99_ms", "polls", "picked_up", "pickup_p50_ms",
            "pickup_p99_ms", "gateway_cpu_percent", "max_overload_level", "shed", "internal_errors")  # fmt: skip
    rig.print_results(outcome, keys, label_width=20, column_width=30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=SCENARIOS, required=True)
    parser.add_argument("--pollers", type=int, default=2000)
    parser.add_argument("--holders", type=int, default=300)
    parser.add_argument("--ttl", type=int, default=10, help="the simulator's lease TTL (the SDK beats every ttl/2)")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--spread", type=float, default=10.0, help="workers start within this many seconds")
    parser.add_argument("--settle", type=float, default=5.0, help="after the spread: beats counted as settled")
    parser.add_argument("--claim-patience", type=float, default=30.0, help="a claim not granted by then has failed")
    parser.add_argument("--outage", type=float, default=1.5, help="faults: seconds of each heartbeat outage (0: none)")
    parser.add_argument("--rate-limited", type=float, default=0.3, help="faults: the share of heartbeats answered 429")
    parser.add_argument("--stop-signal", choices=("KILL", "TERM"), default="KILL", help="failover: how a replica goes")
    parser.add_argument("--enqueue-every", type=float, default=1.0)
    parser.add_argument("--cpu-millicores", type=int, default=0, help="each replica's CPU limit (0: a whole core)")
    parser.add_argument("--targets", default="", help="comma-separated; default by scenario")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--upstream", default="http", help="the simulator over http, or https with a private CA")
    parser.add_argument("--rounds", type=int, default=1, help="each target this many times, seeds seed.. seed+N-1")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line too")
    arguments = parser.parse_args()
    result = event_loop.run(lambda: main(arguments))
    print_table(result)
    if arguments.json:
        print(json.dumps(result))
