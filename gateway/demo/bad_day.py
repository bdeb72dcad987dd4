"""`heartbeat-gateway demo --bad-day`: the same fleet direct and through the gateway, while the API has a bad day.

Two identical simulators (same seed, same lease TTL, same queue), two fleets
of simulated SDK workers (same seeds): one talks to its simulator directly
with the environment key, the other to the other simulator through the
gateway with a client token. The same weather hits both simulators at the
same moments:

    calm → slow API (heartbeats answered in 1.2 s) → rate-limited (30% of
    heartbeats 429, retry-after 1) → lost answers (10% of heartbeat
    connections reset after the beat took effect) → calm

Each second prints one line per fleet, so a newcomer sees in one screen what
the gateway keeps (leases, beats answered) and what it saves (upstream
calls), phase by phase; the summary compares the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from gateway import loop as event_loop
from gateway.app import Gateway
from gateway.config.load import load_settings
from gateway.config.settings import LoggingSettings
from gateway.demo.run import DEMO_CONFIG, ENVIRONMENT_ID
from gateway.demo.worker import DemoStats, SimulatedWorker, WorkerBehaviour
from gateway.observability.logs import configure_logging
from gateway.simulator import SIMULATOR, Faults, Simulator, SimulatorConfig, TtlPolicy, create_simulator_app

__all__ = ["PHASES", "run_bad_day"]

TTL_SECONDS = 4


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    faults: Faults


# What the API does, in order; the run's length is their sum.
PHASES = (
    Phase("calm", 6, Faults()),
    Phase("slow API", 8, Faults(latency_seconds=1.2, endpoints=("heartbeat",))),
    Phase("rate-limited", 10, Faults(rate_limit_rate=0.3, retry_after_seconds=1, endpoints=("heartbeat",))),
    Phase("lost answers", 8, Faults(reset_rate=0.1, reset_after_apply=True, endpoints=("heartbeat",))),
    Phase("calm", 6, Faults()),
)


@dataclass
class Fleet:
    name: str
    sim: Simulator
    stats: DemoStats

    def line(self, gateway: Gateway | None) -> str:
        s = self.stats
        saved = ""
        if gateway is not None:
            kept = {o.replace("_", " "): _count(gateway, o) for o in ("handed_off", "joined", "absorbed")}
            kept["retried"] = _retries(gateway)
            saved = " | " + ", ".join(f"{o} {n}" for o, n in kept.items())
        return (
            f"{self.name:>8}: beats {s.worker_heartbeats:4d} → {self.sim.count('heartbeat'):4d} upstream, "
            f"failed {s.beat_failures:3d} | leases lost {s.leases_lost:2d} of {s.claims:3d} | "
            f"done {s.work_completed:3d}{saved}"
        )


def _count(gateway: Gateway, outcome: str) -> int:
    samples = next(iter(gateway.metrics.heartbeats.collect())).samples
    return int(sum(s.value for s in samples if s.name.endswith("_total") and s.labels["outcome"] == outcome))


def _retries(gateway: Gateway) -> int:
    samples = next(iter(gateway.metrics.upstream_retries.collect())).samples
    return int(sum(s.value for s in samples if s.name.endswith("_total") and s.labels["route"] == "heartbeat"))


def run_bad_day(*, workers: int, as_json: bool, seed: int | None = None) -> int:
    environment_key = "demo-env-key-" + secrets.token_urlsafe(24)
    token = "demo-worker-token-" + secrets.token_urlsafe(24)
    configure_logging(LoggingSettings("error", "json"), (environment_key, token))
    try:
        summary = event_loop.run(lambda: _run(workers, environment_key, token, seed if seed is not None else 7))
    except KeyboardInterrupt:
        return 130
    _print_summary(summary)
    if as_json:
        print(json.dumps(summary), flush=True)
    return 0


async def _simulator(environment_key: str, seed: int) -> tuple[web.AppRunner, Simulator, str]:
    config = SimulatorConfig({ENVIRONMENT_ID: environment_key}, ttl=TtlPolicy(default_seconds=TTL_SECONDS), seed=seed)
    app = create_simulator_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, app[SIMULATOR], f"http://127.0.0.1:{runner.addresses[0][1]}"


async def _run(workers: int, environment_key: str, token: str, seed: int) -> dict[str, Any]:
    direct_runner, direct_sim, direct_url = await _simulator(environment_key, seed)
    gateway_runner, gateway_sim, gateway_url = await _simulator(environment_key, seed)
    settings = load_settings(
        DEMO_CONFIG % {"upstream": gateway_url, "env": ENVIRONMENT_ID, "admin_port": 0},
        {"DEMO_ENVIRONMENT_KEY": environment_key, "DEMO_WORKER_TOKEN": token},
    )
    gateway = Gateway(settings)
    await gateway.start()
    fleets = (Fleet("direct", direct_sim, DemoStats()), Fleet("gateway", gateway_sim, DemoStats()))
    length = sum(p.seconds for p in PHASES)
    print(
        f"bad-day demo: {workers} SDK-paced workers direct and {workers} through the gateway, lease TTL "
        f"{TTL_SECONDS} s (a beat every 2 s, each bounded by 2 s), {length:g} s: " + " → ".join(p.name for p in PHASES),
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    by_phase: list[dict[str, Any]] = []
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
            asyncio.TaskGroup() as group,
        ):
            targets = ((fleets[0], direct_url, environment_key), (fleets[1], gateway.proxy_url, token))
            tasks = [
                task
                for fleet, base, credential in targets
                for task in _start(group, session, fleet, base, credential, workers, seed)
            ]
            by_phase = await _play(fleets, gateway, stop)
            for task in tasks:
                task.cancel()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        await gateway.stop()
        await direct_runner.cleanup()
        await gateway_runner.cleanup()
    return {
        "workers_per_fleet": workers,
        "ttl_seconds": TTL_SECONDS,
        "phases": by_phase,
        "total": {f.name: _snapshot(f) for f in fleets},
        "gateway_answers": {
            o: _count(gateway, o) for o in ("forwarded", "joined", "handed_off", "absorbed", "rejected")
        },
    }


def _start(
    group: asyncio.TaskGroup,
    session: aiohttp.ClientSession,
    fleet: Fleet,
    base: str,
    credential: str,
    workers: int,
    seed: int,
) -> list[asyncio.Task[None]]:
    """One fleet's workers, and the feeder that queues their work: the same seeds for both fleets."""
    rng = random.Random(seed)
    tasks = []
    for i in range(workers):
        worker = SimulatedWorker(
            session,
            base_url=base,
            environment_id=ENVIRONMENT_ID,
            token=credential,
            worker_id=f"{fleet.name}-worker-{i}",
            stats=fleet.stats,
            behaviour=WorkerBehaviour(work_seconds=(8.0, 16.0)),
            rng=random.Random(rng.random()),
        )
        tasks.append(group.create_task(worker.run(), name=f"{fleet.name}-worker-{i}"))
    tasks.append(group.create_task(_feed(fleet.sim, workers), name=f"{fleet.name}-feeder"))
    return tasks


async def _play(fleets: tuple[Fleet, Fleet], gateway: Gateway, stop: asyncio.Event) -> list[dict[str, Any]]:
    """The bad day's phases in turn, a line a second, each phase's figures as it ends."""
    by_phase: list[dict[str, Any]] = []
    started = time.monotonic()
    second = 0
    for phase in PHASES:
        for fleet in fleets:
            fleet.sim.faults = phase.faults
        before = [_snapshot(f) for f in fleets]
        phase_end = started + second + phase.seconds
        print(f"-- {phase.name} --", flush=True)
        while time.monotonic() < phase_end and not stop.is_set():
            second += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, started + second - time.monotonic()))
            print(
                f"[{second:3d}s] "
                + "\n       ".join(f.line(gw) for f, gw in zip(fleets, (None, gateway), strict=True)),
                flush=True,
            )
        by_phase.append(
            {"phase": phase.name, **{f.name: _delta(b, _snapshot(f)) for f, b in zip(fleets, before, strict=True)}}
        )
        if stop.is_set():
            break
    return by_phase


def _snapshot(fleet: Fleet) -> dict[str, int]:
    s = fleet.stats
    return {
        "worker_heartbeats": s.worker_heartbeats,
        "upstream_heartbeats": fleet.sim.count("heartbeat"),
        "failed_beats": s.beat_failures,
        "claims": s.claims,
        "leases_lost": s.leases_lost,
        "work_completed": s.work_completed,
    }


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


async def _feed(sim: Simulator, workers: int) -> None:
    """Keep about one queued item per worker."""
    while True:
        queued = sum(1 for item in sim.plane.items(ENVIRONMENT_ID) if item.state == "queued")
        if queued < workers:
            sim.enqueue(ENVIRONMENT_ID, count=workers - queued)
        await asyncio.sleep(0.5)


def _print_summary(summary: dict[str, Any]) -> None:
    print("\nper phase            direct: lost/claimed, failed beats | gateway: lost/claimed, failed beats")
    for row in summary["phases"]:
        d, g = row["direct"], row["gateway"]
        print(
            f"  {row['phase']:<16}  {d['leases_lost']:3d}/{d['claims']:<3d}  {d['failed_beats']:4d}      "
            f"|          {g['leases_lost']:3d}/{g['claims']:<3d}  {g['failed_beats']:4d}"
        )
    d, g = summary["total"]["direct"], summary["total"]["gateway"]
    print(
        f"\nsummary: leases lost {d['leases_lost']} direct, {g['leases_lost']} through the gateway; "
        f"beats that failed at the worker {d['failed_beats']} vs {g['failed_beats']}; "
        f"upstream heartbeats {d['upstream_heartbeats']} vs {g['upstream_heartbeats']} "
        f"for {d['worker_heartbeats']} vs {g['worker_heartbeats']} worker beats; "
        f"gateway answers {summary['gateway_answers']}"
    )
    sys.stdout.flush()
