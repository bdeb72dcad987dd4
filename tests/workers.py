"""The official SDK workers, run through their public entry points, and what the simulator saw of them.

- Python `anthropic==2.10.0`: `client.beta.environments.work.worker(...).run()`
  (or `.handle_item(...)`), in-process, cancelled when the test has seen enough,
  the way a deployment's SIGTERM ends it.
- TypeScript `@anthropic-ai/sdk@1.10.0`: `EnvironmentWorker` from
  `@anthropic-ai/sdk/helpers/beta/environments`, `.run(signal)` or
  `.handleItem()`, in a Node process (`tests/node/worker.mjs`), ended with SIGTERM.

Both know only a base URL and a token given as their environment key: the
gateway's address and client token, or the simulator's and the real key when
the same workload runs direct for comparison.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import pytest
from anthropic.lib.environments import EnvironmentWorker

from gateway.simulator import Simulator

NODE_DIR = Path(__file__).parent / "node"
SDK_LOGGER = "anthropic.lib.environments"


def require_node() -> str:
    """The node binary with the TypeScript SDK installed beside the tests, or skip (fail in CI)."""
    node = shutil.which("node")
    installed = (NODE_DIR / "node_modules" / "@anthropic-ai" / "sdk" / "package.json").exists()
    if node is not None and installed:
        return node
    missing = "node is not installed" if node is None else "the TypeScript SDK is not installed in tests/node"
    message = f"{missing} (make test installs it with npm ci --prefix tests/node)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must have it: .ci/run installs it")
    pytest.skip(f"{message}; with CI=true this is a failure")


async def wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.05)


def items_done(sim: Simulator, environment_id: str, count: int) -> Callable[[], bool]:
    def done() -> bool:
        sim.plane.expire(sim.now())
        return sum(1 for item in sim.plane.items(environment_id) if item.state == "stopped") >= count

    return done


# -- Python -------------------------------------------------------------------------------


class LogRecords(logging.Handler):
    """The SDK worker's own log lines, to see what it concluded (a lost lease, a failed item)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def sdk_log() -> Iterator[LogRecords]:
    records = LogRecords()
    logger = logging.getLogger(SDK_LOGGER)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(records)
    try:
        yield records
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)


@contextlib.asynccontextmanager
async def python_worker(
    base_url: str,
    token: str,
    environment_id: str,
    workdir: Path,
    *,
    default_headers: Mapping[str, str] | None = None,
    **options: Any,
) -> AsyncIterator[EnvironmentWorker]:
    """A worker built the way the README shows; the client holds no key of its own, and is closed after.

    `default_headers`: sent on every request the worker's client makes (a `traceparent`, say)."""
    _make_workdir({"workdir": workdir})
    async with anthropic.AsyncAnthropic(
        base_url=base_url, api_key=None, auth_token=None, default_headers=default_headers
    ) as client:
        options.setdefault("max_idle", 1.0)
        options.setdefault("memory_sync_interval", None)
        yield client.beta.environments.work.worker(
            environment_id=environment_id, environment_key=token, workdir=str(workdir), **options
        )


@contextlib.asynccontextmanager
async def running(worker: EnvironmentWorker) -> AsyncIterator[asyncio.Future[None]]:
    """`worker.run()` in the background, cancelled on the way out as SIGTERM would."""
    task = asyncio.ensure_future(worker.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def run_python_worker(
    base_url: str,
    token: str,
    environment_id: str,
    workdir: Path,
    *,
    until: Callable[[], bool],
    within: float = 30.0,
    **options: Any,
) -> None:
    """`worker.run()` until `until()` holds; raises what the worker raised."""
    async with python_worker(base_url, token, environment_id, workdir, **options) as worker, running(worker) as task:
        await wait_for(lambda: until() or task.done(), within, "the Python worker")
        if task.done():
            task.result()
            raise AssertionError("the worker's run() returned on its own")


# -- TypeScript ---------------------------------------------------------------------------


@dataclass
class NodeRun:
    result: dict[str, Any]
    logs: list[dict[str, Any]]

    def messages(self, level: str | None = None) -> list[str]:
        return [line["message"] for line in self.logs if level is None or line["level"] == level]


class NodeWorker:
    """`tests/node/worker.mjs` in its own process: the TypeScript SDK's public worker."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, node: str, options: dict[str, Any]) -> NodeWorker:
        _make_workdir(options)
        process = await asyncio.create_subprocess_exec(
            node,
            str(NODE_DIR / "worker.mjs"),
            json.dumps(options),
            cwd=NODE_DIR,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")},
        )
        return cls(process)

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    async def finish(self, *, stop: bool = True, within: float = 20.0) -> NodeRun:
        if stop and self.running:
            self.process.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(self.process.communicate(), within)
        logs = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
        lines = out.decode().strip().splitlines()
        if not lines:
            raise AssertionError(f"the Node worker printed no result; stderr: {err.decode()[-2000:]}")
        return NodeRun(json.loads(lines[-1]), logs)


def _make_workdir(options: dict[str, Any]) -> None:
    if "workdir" in options:
        Path(options["workdir"]).mkdir(parents=True, exist_ok=True)


async def run_node_worker(
    node: str, options: dict[str, Any], *, until: Callable[[], bool], within: float = 30.0
) -> NodeRun:
    worker = await NodeWorker.start(node, {"mode": "run", **options})
    try:
        await wait_for(lambda: until() or not worker.running, within, "the TypeScript worker")
    finally:
        run = await worker.finish()
    assert run.result.get("ok"), run.result
    return run


# -- what the simulator saw -----------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """One run's lease and session figures, comparable between the gateway and direct."""

    items_stopped: int
    force_stopped: int
    tool_outputs: tuple[tuple[str, ...], ...]
    min_beats: int
    upstream_412s: int
    credential_kinds: frozenset[str]

    @classmethod
    def of(cls, sim: Simulator, environment_id: str) -> Served:
        sim.plane.expire(sim.now())
        items = sim.plane.items(environment_id)
        sessions = [sim.sessions.get(item.data_id) for item in items]
        outputs = tuple(
            tuple(" ".join(b.get("text", "") for b in r["content"]) for r in s.tool_results) for s in sessions
        )
        kinds = {kind for counts in sim.credentials_by_endpoint.values() for kind in counts}
        return cls(
            items_stopped=sum(1 for i in items if i.state == "stopped"),
            force_stopped=sum(1 for i in items if i.force_stops),
            tool_outputs=outputs,
            min_beats=min((i.beats for i in items), default=0),
            upstream_412s=sim.requests["heartbeat"]["412"],
            credential_kinds=frozenset(kinds),
        )


# -- a worker by the SDKs' rules, at any cadence ---------------------------------------------


async def hold_lease(
    http: aiohttp.ClientSession,
    base_url: str,
    token: str,
    environment_id: str,
    work_id: str,
    *,
    interval_fraction: float = 0.5,
    seconds: float,
) -> str:
    """Claim and beat one lease by the SDK workers' rules, but every `interval_fraction` of the TTL.

    Each beat is bounded by the interval, and inside it the SDK's own client
    retries a 429 twice, honouring `retry-after`; a 412 is a lost lease, and so
    is a TTL without a success. Returns "kept", "lost" (412) or "assumed_lost".
    """
    url = f"{base_url}/v1/environments/{environment_id}/work/{work_id}/heartbeat"
    headers = {"Authorization": f"Bearer {token}", "anthropic-beta": "managed-agents-2026-04-01"}
    last, ttl, interval = "NO_HEARTBEAT", 90.0, 30.0
    started = last_success = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            async with asyncio.timeout(interval):
                for attempt in range(3):
                    async with http.post(url, params={"expected_last_heartbeat": last}, headers=headers) as r:
                        body = await r.json(content_type=None)
                        if r.status == 429 and attempt < 2:
                            await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                            continue
                        break
            if r.status == 412:
                return "lost"
            if r.status == 200:
                last, last_success = body["last_heartbeat"], time.monotonic()
                ttl = body["ttl_seconds"]
                interval = max(1.0, min(ttl * interval_fraction, 30.0))
        except (TimeoutError, aiohttp.ClientError):
            pass
        if time.monotonic() - last_success > ttl:
            return "assumed_lost"
        await asyncio.sleep(max(0.0, min(interval, seconds - (time.monotonic() - started))))
    return "kept"
