"""The demo run: simulator, gateway and simulated workers on loopback ports, then a summary.

Everything listens on loopback ports. Workers hold only a generated client
token; the gateway holds the generated environment key. A feeder keeps the
queue stocked, an "operator" gracefully stops an item now and then, and a
few workers stall past their lease (as a blocked event loop would), so the
run shows claims, stops, conflicts and lease losses, not only the happy path.
Absorption stays off: with the short leases a demo needs, an absorbed answer
would shorten the workers' beat interval, so the gateway would forward every
beat anyway (README, "Absorption").
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import signal
import sys
import time
from typing import Any

import aiohttp
from aiohttp import web

from gateway import loop as event_loop
from gateway.app import Gateway
from gateway.config.load import load_settings
from gateway.config.settings import LoggingSettings
from gateway.demo.worker import DemoStats, SimulatedWorker, WorkerBehaviour
from gateway.observability.logs import configure_logging
from gateway.simulator import SIMULATOR, Simulator, SimulatorConfig, TtlPolicy, create_simulator_app

__all__ = ["DEMO_CONFIG", "ENVIRONMENT_ID", "run_demo"]

ENVIRONMENT_ID = "env_demo0000000000000001"
# Short leases so a 20 s run shows many beats: workers beat every ttl/2 = 2 s.
DEMO_TTL_SECONDS = 4
STALL_PROBABILITY = 0.1
# Chance per second that the operator gracefully stops one running item.
OPERATOR_STOP_PROBABILITY = 0.15

DEMO_CONFIG = """
listen: {host: 127.0.0.1, port: 0}
admin: {host: 127.0.0.1, port: %(admin_port)d}
upstream: {base_url: "%(upstream)s", request_timeout_seconds: 30}
environments:
  - {id: %(env)s, name: demo-sandboxes, key_env: DEMO_ENVIRONMENT_KEY}
clients:
  tokens: [{token_env: DEMO_WORKER_TOKEN, environments: ["*"]}]
limits: {shutdown_grace_seconds: 2}
logging: {level: warning, format: json}
# The demo's gateway shares one event loop with the simulator(s) and every simulated worker: their lag
# is not the gateway's, so shedding (which would hold the gateway fleet's polls) stays off here.
overload: {enabled: false}
"""


def run_demo(*, duration: float, workers: int, as_json: bool, admin_port: int = 0, seed: int | None = None) -> int:
    environment_key = "demo-env-key-" + secrets.token_urlsafe(24)
    token = "demo-worker-token-" + secrets.token_urlsafe(24)
    configure_logging(LoggingSettings("warning", "json"), (environment_key, token))
    try:
        summary = event_loop.run(
            lambda: _run(duration, workers, environment_key, token, admin_port=admin_port, rng=random.Random(seed))
        )
    except KeyboardInterrupt:
        return 130
    _print_summary(summary, workers)
    if as_json:
        print(json.dumps(summary), flush=True)
    return 0


async def _run(
    duration: float, workers: int, environment_key: str, token: str, *, admin_port: int, rng: random.Random
) -> dict[str, Any]:
    sim_app = create_simulator_app(
        SimulatorConfig({ENVIRONMENT_ID: environment_key}, ttl=TtlPolicy(default_seconds=DEMO_TTL_SECONDS))
    )
    sim_runner = web.AppRunner(sim_app, access_log=None)
    await sim_runner.setup()
    await web.TCPSite(sim_runner, "127.0.0.1", 0).start()
    sim = sim_app[SIMULATOR]
    upstream = f"http://127.0.0.1:{sim_runner.addresses[0][1]}"
    settings = load_settings(
        DEMO_CONFIG % {"upstream": upstream, "env": ENVIRONMENT_ID, "admin_port": admin_port},
        {"DEMO_ENVIRONMENT_KEY": environment_key, "DEMO_WORKER_TOKEN": token},
    )
    gateway = Gateway(settings)
    await gateway.start()
    print(
        f"demo: simulator {upstream} (lease TTL {DEMO_TTL_SECONDS} s), gateway {gateway.proxy_url}, "
        f"admin {gateway.admin_url}/readyz; {workers} workers, "
        + (f"{duration:g} s" if duration > 0 else "until Ctrl-C"),
        flush=True,
    )
    stats = DemoStats()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            behaviour = WorkerBehaviour(stall_probability=STALL_PROBABILITY)
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(
                        SimulatedWorker(
                            session,
                            base_url=gateway.proxy_url,
                            environment_id=ENVIRONMENT_ID,
                            token=token,
                            worker_id=f"demo-worker-{i}",
                            stats=stats,
                            behaviour=behaviour,
                            rng=random.Random(rng.random()),
                        ).run(),
                        name=f"demo-worker-{i}",
                    )
                    for i in range(workers)
                ]
                tasks.append(group.create_task(_feed(sim, workers, rng, stats), name="demo-feeder"))
                await _report(stats, sim, started, duration, stop)
                for task in tasks:
                    task.cancel()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        await gateway.stop()
        await sim_runner.cleanup()
    return _summary(stats, sim, time.monotonic() - started, workers)


async def _feed(sim: Simulator, workers: int, rng: random.Random, stats: DemoStats) -> None:
    """Keep about one queued item per worker; now and then, stop a running item as an operator would."""
    while True:
        queued = sum(1 for item in sim.plane.items(ENVIRONMENT_ID) if item.state == "queued")
        if queued < workers:
            sim.enqueue(ENVIRONMENT_ID, count=workers - queued)
        if rng.random() < OPERATOR_STOP_PROBABILITY / 2:
            active = [i for i in sim.plane.items(ENVIRONMENT_ID) if i.state == "active"]
            if active:
                sim.plane.stop(ENVIRONMENT_ID, rng.choice(active).id, sim.now(), force=False)
        await asyncio.sleep(0.5)


async def _report(stats: DemoStats, sim: Simulator, started: float, duration: float, stop: asyncio.Event) -> None:
    tick = 1
    while duration <= 0 or tick <= duration:
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, started + tick - time.monotonic()))
            return
        except TimeoutError:
            pass
        print(_progress_line(stats, sim, tick), flush=True)
        tick += 1


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _progress_line(stats: DemoStats, sim: Simulator, second: int) -> str:
    return (
        f"[{second:4d}s] heartbeats {stats.worker_heartbeats:5d} worker → {sim.count('heartbeat'):5d} upstream | "
        f"412s {stats.conflicts:3d} | leases lost {stats.leases_lost:3d} | stops {stats.stops_seen:3d} | "
        f"done {stats.work_completed:4d} | busy {stats.busy:3d} | "
        f"p50 {_ms(stats.percentile(0.5))} p99 {_ms(stats.percentile(0.99))}"
    )


def _summary(stats: DemoStats, sim: Simulator, elapsed: float, workers: int) -> dict[str, Any]:
    p50, p99 = stats.percentile(0.5), stats.percentile(0.99)
    return {
        "duration_s": round(elapsed, 1),
        "workers": workers,
        "worker_heartbeats": stats.worker_heartbeats,
        "upstream_heartbeats": sim.count("heartbeat"),
        "claims": stats.claims,
        "conflicts": stats.conflicts,
        "leases_lost": stats.leases_lost,
        "stops_seen": stats.stops_seen,
        "work_completed": stats.work_completed,
        "worker_errors": stats.errors,
        "p50_ms": None if p50 is None else round(p50, 2),
        "p99_ms": None if p99 is None else round(p99, 2),
    }


def _print_summary(summary: dict[str, Any], workers: int) -> None:
    rows = [
        ("run time", f"{summary['duration_s']} s with {workers} workers"),
        ("worker heartbeats", summary["worker_heartbeats"]),
        ("upstream heartbeats", summary["upstream_heartbeats"]),
        ("leases claimed", summary["claims"]),
        ("412 conflicts", summary["conflicts"]),
        ("leases lost", summary["leases_lost"]),
        ("stops seen in beats", summary["stops_seen"]),
        ("work completed", summary["work_completed"]),
        ("worker errors", summary["worker_errors"]),
        ("heartbeat p50", _ms(summary["p50_ms"])),
        ("heartbeat p99", _ms(summary["p99_ms"])),
    ]
    width = max(len(name) for name, _ in rows)
    print("\nsummary", file=sys.stdout)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    sys.stdout.flush()
