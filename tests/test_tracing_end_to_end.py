"""OpenTelemetry end to end: the gateway as users start it, the real Python SDK worker, a receiver of its own.

Checks `gateway/observability/tracing.py` with real parts: the gateway started by its CLI
(`python -m gateway serve`) with `tracing.enabled` and the standard `OTEL_*` variables,
its spans leaving through the OTLP/HTTP exporter to a receiver in a process of its own
(`tests/otlp_receiver.py`), the real SDK worker serving a session through it, the
simulator recording the `traceparent` the API is sent, and a real Prometheus storing the
exemplars the gateway exposes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.simulator import AgentScript

from .otlp_receiver import received
from .served import Served, served_gateway
from .support import ENV_ID, SECRETS, TOKEN, SimFactory, SimHandle, held_item, worker_headers
from .tools import free_port, require
from .workers import items_done, require_node, run_node_worker, run_python_worker

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
WORKER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{WORKER_SPAN}-01"
TRACING = "tracing: {enabled: true}\n"
SERVER, CLIENT = 2, 3  # OTLP's SpanKind numbers


def otel_env(endpoint: str, **more: str) -> dict[str, str]:
    """The standard variables as a Deployment would set them; spans batched every 100 ms."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100", **more}


class Recording:
    """What the simulator is sent: each request's path and `traceparent`, and slow heartbeats when asked."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []
        self.heartbeat_delay = 0.0

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.seen.append((request.path, request.headers.get("traceparent")))
        if self.heartbeat_delay and request.path.endswith("/heartbeat"):
            await asyncio.sleep(self.heartbeat_delay)
        return await handler(request)


async def recorded_simulator(make_simulator: SimFactory, **options: Any) -> tuple[SimHandle, Recording]:
    recording = Recording()
    return await make_simulator(middleware=recording.middleware, **options), recording


def by_id(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["span_id"]: s for s in spans}


def assert_nothing_secret(spans: list[dict[str, Any]], *planted: str) -> None:
    text = json.dumps(spans)
    for secret in (*SECRETS, *planted):
        assert secret not in text


async def test_a_python_workers_session_is_one_trace_from_the_worker_to_the_api(
    make_simulator: SimFactory, otlp_receiver: str, tmp_path: Path
) -> None:
    sim, recording = await recorded_simulator(make_simulator, ttl=2, script=AgentScript(commands=("echo hello",)))
    sim.sim.enqueue(ENV_ID)
    env = otel_env(otlp_receiver, OTEL_RESOURCE_ATTRIBUTES="deployment.environment.name=e2e")
    async with served_gateway(tmp_path, sim.url, TRACING, env) as served:
        await run_python_worker(
            served.proxy_url,
            TOKEN,
            ENV_ID,
            tmp_path / "work",
            until=items_done(sim.sim, ENV_ID, 1),
            within=30,
            max_idle=2.5,
            # The worker's own trace: every request its client makes carries it.
            default_headers={"traceparent": TRACEPARENT},
        )
    # Stopped with SIGTERM: the gateway sent its last spans on the way out.
    spans = await received(otlp_receiver)
    ours = [s for s in spans if s["trace_id"] == TRACE_ID]
    index = by_id(ours)
    servers = [s for s in ours if s["kind"] == SERVER]
    # Every request of the worker's is a server span continuing its trace, as named by the route template.
    assert {s["parent_span_id"] for s in servers} == {WORKER_SPAN}
    routes = {s["attributes"]["heartbeat_gateway.route"] for s in servers}
    assert {"poll", "ack", "heartbeat", "stop", "sessions"} <= routes, routes
    beats = [s for s in servers if s["attributes"]["heartbeat_gateway.route"] == "heartbeat"]
    assert len(beats) >= 3
    for span in beats:
        assert span["name"] == "POST /v1/environments/{environment_id}/work/{work_id}/heartbeat"
        assert span["attributes"]["heartbeat_gateway.environment"] == "prod-sandboxes"
        assert span["attributes"]["http.response.status_code"] == 200
    # Each forwarded beat: server span → its flight → the upstream call.
    flights = [s for s in ours if s["name"] == "heartbeat flight"]
    assert flights
    assert all(index[f["parent_span_id"]]["kind"] == SERVER for f in flights)
    calls = [s for s in ours if s["kind"] == CLIENT and s["attributes"]["heartbeat_gateway.route"] == "heartbeat"]
    assert sorted(c["parent_span_id"] for c in calls) == sorted(f["span_id"] for f in flights)
    assert any(e["name"] == "lease claimed" for f in flights for e in f["events"])
    # The API was sent the gateway's own client span as the parent, in the worker's trace, on every call.
    clients = {s["span_id"] for s in ours if s["kind"] == CLIENT}
    sent = [parent for path, parent in recording.seen if parent is not None]
    assert len(sent) == len(recording.seen), "a request reached the API without the trace"
    assert all(p.split("-")[1] == TRACE_ID and p.split("-")[2] in clients for p in sent)
    resource = beats[0]["resource"]
    assert resource["service.name"] == "heartbeat-gateway"
    assert resource["deployment.environment.name"] == "e2e"
    assert_nothing_secret(spans)


async def test_a_typescript_worker_traced_by_its_application_is_one_trace_through_the_gateway_to_the_api(
    make_simulator: SimFactory, otlp_receiver: str, tmp_path: Path
) -> None:
    """The TypeScript SDK traces its own API calls when its application registers a tracer provider, and
    sends each call span's context: the gateway's spans hang under the worker's, the API's under the gateway's."""
    node = require_node()
    sim, recording = await recorded_simulator(make_simulator, ttl=2, script=AgentScript(commands=("echo hello",)))
    sim.sim.enqueue(ENV_ID)
    async with served_gateway(tmp_path, sim.url, TRACING, otel_env(otlp_receiver)) as served:
        options = {
            "baseURL": served.proxy_url,
            "environmentId": ENV_ID,
            "environmentKey": TOKEN,
            "workdir": str(tmp_path / "work"),
            "maxIdleMs": 2500,
            "otlpEndpoint": otlp_receiver,
        }
        run = await run_node_worker(node, options, until=items_done(sim.sim, ENV_ID, 1), within=30)
    assert run.result["ok"], run.result
    spans = await received(otlp_receiver)
    worker = by_id([s for s in spans if s["resource"]["service.name"] == "sandbox-worker"])
    gateway = [s for s in spans if s["resource"]["service.name"] == "heartbeat-gateway"]
    servers = [s for s in gateway if s["kind"] == SERVER]
    # Each request the worker made is a server span under the SDK's own span for that API call.
    assert {s["attributes"]["heartbeat_gateway.route"] for s in servers} >= {"poll", "ack", "heartbeat", "stop"}
    for span in servers:
        call = worker[span["parent_span_id"]]
        assert call["kind"] == CLIENT
        assert call["trace_id"] == span["trace_id"]
    beats = [s for s in servers if s["attributes"]["heartbeat_gateway.route"] == "heartbeat"]
    assert {worker[b["parent_span_id"]]["name"] for b in beats} == {"anthropic.environments.work.heartbeat"}
    # And in the work item's own trace, beside the tool the worker ran: the heartbeats of its lease.
    (work,) = [w for w in worker.values() if w["name"] == "anthropic.environment.work"]
    assert {b["trace_id"] for b in beats} == {work["trace_id"]}
    # Down to the API: each beat's flight, its upstream call, and the traceparent the API was sent.
    index = by_id(gateway)
    calls = [s for s in gateway if s["kind"] == CLIENT and s["attributes"]["heartbeat_gateway.route"] == "heartbeat"]
    assert calls
    assert all(index[index[c["parent_span_id"]]["parent_span_id"]] in beats for c in calls)
    sent = {parent for path, parent in recording.seen if path.endswith("/heartbeat")}
    assert sent == {f"00-{c['trace_id']}-{c['span_id']}-01" for c in calls}


async def test_a_coalesced_pair_reaches_the_receiver_linked(
    make_simulator: SimFactory, otlp_receiver: str, tmp_path: Path
) -> None:
    sim, recording = await recorded_simulator(make_simulator, ttl=30)
    work_id = held_item(sim)
    first, second = f"00-{'1' * 32}-{'a' * 16}-01", f"00-{'2' * 32}-{'b' * 16}-01"
    async with served_gateway(tmp_path, sim.url, TRACING, otel_env(otlp_receiver)) as served:
        url = f"{served.proxy_url}/v1/environments/{ENV_ID}/work/{work_id}/heartbeat"
        async with aiohttp.ClientSession() as session:
            claim = {"expected_last_heartbeat": "NO_HEARTBEAT"}
            async with session.post(url, params=claim, headers=worker_headers()) as r:
                assert r.status == 200
            recording.heartbeat_delay = 0.5

            async def unconditional(traceparent: str) -> str:
                async with session.post(url, headers={**worker_headers(), "traceparent": traceparent}) as r:
                    assert r.status == 200
                    return r.headers["heartbeat-gateway-outcome"]

            leader = asyncio.ensure_future(unconditional(first))
            await asyncio.sleep(0.2)
            assert (await unconditional(second), await leader) == ("joined", "forwarded")
    spans = await received(otlp_receiver)
    index = by_id(spans)
    (joiner,) = [s for s in spans if s["trace_id"] == "2" * 32]
    (flight,) = [s for s in spans if s["trace_id"] == "1" * 32 and s["name"] == "heartbeat flight"]
    assert joiner["links"] == [{"trace_id": "1" * 32, "span_id": flight["span_id"]}]
    (call,) = [s for s in spans if s["parent_span_id"] == flight["span_id"]]
    assert call["kind"] == CLIENT
    assert index[flight["parent_span_id"]]["trace_id"] == "1" * 32
    # One upstream heartbeat for the pair, sent in the leader's trace as the gateway's call.
    pair = [parent for path, parent in recording.seen[1:] if path.endswith("/heartbeat")]
    assert pair == [f"00-{'1' * 32}-{call['span_id']}-01"]


async def test_a_collector_that_hangs_never_slows_a_beat_nor_holds_a_drain_past_its_bound(
    make_simulator: SimFactory, tmp_path: Path
) -> None:
    sim, _ = await recorded_simulator(make_simulator, ttl=30)
    work_id = held_item(sim)
    with _black_hole() as endpoint:
        served_ctx = served_gateway(tmp_path, sim.url, TRACING, otel_env(endpoint, OTEL_BSP_MAX_EXPORT_BATCH_SIZE="8"))
        async with served_ctx as served:
            slowest = await _beats(served, work_id, 200)
            stopping = time.monotonic()
            served.process.terminate()
            await asyncio.wait_for(served.process.wait(), 30)
            drained = time.monotonic() - stopping
    # The exporter's thread waits on the hung collector; the event loop answers beats as ever.
    assert slowest < 0.25, slowest
    # The grace period (2 s, nothing in flight: at once) and the exporter's bound (5 s), with slack.
    assert drained < 5 + 2, drained


async def _beats(served: Served, work_id: str, count: int) -> float:
    url = f"{served.proxy_url}/v1/environments/{ENV_ID}/work/{work_id}/heartbeat"
    slowest = 0.0
    last = "NO_HEARTBEAT"
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            started = time.monotonic()
            async with session.post(url, params={"expected_last_heartbeat": last}, headers=worker_headers()) as r:
                assert r.status == 200
                last = (await r.json())["last_heartbeat"]
            slowest = max(slowest, time.monotonic() - started)
    return slowest


@contextlib.contextmanager
def _black_hole() -> Iterator[str]:
    """A collector that takes connections and never answers (the kernel completes the handshakes)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


# -- exemplars, stored by a real Prometheus ----------------------------------------------------


@pytest.fixture
async def prometheus_for(tmp_path: Path) -> AsyncIterator[Any]:
    """Starts Prometheus with exemplar storage, scraping the admin port given, every second."""
    binary = require("prometheus", "apt-get install prometheus")
    procs: list[asyncio.subprocess.Process] = []

    async def start(admin_url: str) -> str:
        port = free_port()
        config = {
            "global": {"scrape_interval": "1s"},
            "scrape_configs": [
                {"job_name": "heartbeat-gateway", "static_configs": [{"targets": [admin_url.removeprefix("http://")]}]}
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        with (tmp_path / "prometheus.log").open("w") as log:
            procs.append(
                await asyncio.create_subprocess_exec(
                    binary,
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    # Exemplars are stored only with this (and scraped in the OpenMetrics format it then asks for).
                    "--enable-feature=exemplar-storage",
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            )
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)


async def test_prometheus_stores_the_trace_of_a_slow_beat_as_an_exemplar(
    make_simulator: SimFactory, otlp_receiver: str, prometheus_for: Any, tmp_path: Path
) -> None:
    sim, recording = await recorded_simulator(make_simulator, ttl=30)
    work_id = held_item(sim)
    async with served_gateway(tmp_path, sim.url, TRACING, otel_env(otlp_receiver)) as served:
        prometheus = await prometheus_for(served.admin_url)
        url = f"{served.proxy_url}/v1/environments/{ENV_ID}/work/{work_id}/heartbeat"
        recording.heartbeat_delay = 0.3  # a slow beat: the bucket a dashboard would click on
        async with aiohttp.ClientSession() as session:
            params = {"expected_last_heartbeat": "NO_HEARTBEAT"}
            async with session.post(url, params=params, headers={**worker_headers(), "traceparent": TRACEPARENT}) as r:
                assert r.status == 200
            query = 'heartbeat_gateway_request_duration_seconds_bucket{route="heartbeat"}'
            deadline = time.monotonic() + 60
            while True:
                start = str(time.time() - 300)
                params = {"query": query, "start": start, "end": str(time.time() + 60)}
                async with session.get(f"{prometheus}/api/v1/query_exemplars", params=params) as r:
                    body = await r.json()
                assert body["status"] == "success", body
                stored = [e for series in body["data"] for e in series["exemplars"]]
                if stored:
                    break
                assert time.monotonic() < deadline, "Prometheus never stored an exemplar"
                await asyncio.sleep(0.5)
    (exemplar,) = stored
    assert exemplar["labels"]["trace_id"] == TRACE_ID
    assert float(exemplar["value"]) >= 0.3
    # The span it names is the beat's own, as the receiver has it.
    spans = by_id(await received(otlp_receiver))
    assert spans[exemplar["labels"]["span_id"]]["attributes"]["heartbeat_gateway.route"] == "heartbeat"
