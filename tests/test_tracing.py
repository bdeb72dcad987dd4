"""OpenTelemetry traces, in-process: the spans a worker's requests make, how they join, what they never carry.

Checks `gateway/observability/tracing.py`, `gateway/observability/otel_environment.py`.

A real gateway on loopback sockets in front of the simulator, with the gateway's own
`Tracing` ending its spans into OpenTelemetry's in-memory exporter, so each test reads
exactly what would have been exported. What a real exporter, a receiver in its own
process and the real SDK worker make of it: `tests/test_tracing_end_to_end.py`.
"""

from __future__ import annotations

import asyncio
import builtins
import gc
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id

from gateway.app import Gateway, tracing_problems
from gateway.config.load import load_settings
from gateway.observability.otel_environment import otel_environment_problems
from gateway.observability.tracing import Tracing, TracingUnavailable
from gateway.simulator import Faults

from .raw_http import raw, status_and_json
from .support import (
    ENV_ID,
    ENV_KEY,
    ENVIRON,
    SECRETS,
    TOKEN,
    GatewayFactory,
    SimFactory,
    SimHandle,
    config_yaml,
    held_item,
    make_settings,
    worker_headers,
)

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
WORKER_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{WORKER_SPAN}-01"
HEARTBEAT_TEMPLATE = "/v1/environments/{environment_id}/work/{work_id}/heartbeat"
# Planted where a careless tracer would copy it from: a query string and a header value.
PLANTED_QUERY = "planted-query-secret-6666666666666666"
PLANTED_HEADER = "planted-header-secret-7777777777777777"

Seen = list[tuple[str, list[tuple[str, str]]]]


class Traced:
    """A gateway with tracing on, what it exported, and what its upstream was sent."""

    def __init__(
        self, gateway: Gateway, tracing: Tracing, exporter: InMemorySpanExporter, seen: Seen, sim: SimHandle
    ) -> None:
        self.gateway = gateway
        self.tracing = tracing
        self.exporter = exporter
        self.seen = seen
        self.sim = sim

    def spans(self, kind: SpanKind | None = None, name: str | None = None) -> list[ReadableSpan]:
        return [
            s
            for s in self.exporter.get_finished_spans()
            if (kind is None or s.kind == kind) and (name is None or s.name == name)
        ]

    def upstream_saw(self, path_end: str) -> list[dict[str, str]]:
        """The headers each request to a path ending so was sent with (names in lower case; none twice)."""
        sent = []
        for path, pairs in self.seen:
            if path.endswith(path_end):
                headers = {name.lower(): value for name, value in pairs}
                assert len(headers) == len(pairs), f"a header sent twice: {sorted(n for n, _ in pairs)}"
                sent.append(headers)
        return sent


TracedFactory = Callable[..., Awaitable[Traced]]


@pytest.fixture
async def make_traced(make_simulator: SimFactory, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[TracedFactory]:
    started: list[Gateway] = []

    async def make(
        extra: str = "", *, delay_heartbeats: float = 0.0, sampler: str | None = None, **sim_options: Any
    ) -> Traced:
        """`sampler`: OTEL_TRACES_SAMPLER (parentbased_always_on, the SDK's default, when None)."""
        if sampler is not None:
            monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
        seen: Seen = []

        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            seen.append((request.path, list(request.headers.items())))
            if delay_heartbeats and request.path.endswith("/heartbeat"):
                await asyncio.sleep(delay_heartbeats)
            return await handler(request)

        sim = await make_simulator(middleware=record, **sim_options)
        exporter = InMemorySpanExporter()
        tracing = Tracing.with_processor(SimpleSpanProcessor(exporter), upstream_url=sim.url)
        gateway = Gateway(make_settings(sim.url, "tracing: {enabled: true}\n" + extra), tracing=tracing)
        await gateway.start()
        started.append(gateway)
        return Traced(gateway, tracing, exporter, seen, sim)

    yield make
    for gateway in started:
        await gateway.stop()


async def beat(
    session: aiohttp.ClientSession,
    traced: Traced,
    work_id: str,
    expected: str | None,
    headers: dict[str, str] | None = None,
    **params: str,
) -> tuple[int, dict[str, Any], str]:
    """`expected`: None for an unconditional beat (identical ones share one upstream call)."""
    url = f"{traced.gateway.proxy_url}/v1/environments/{ENV_ID}/work/{work_id}/heartbeat"
    sent = {**worker_headers(), **(headers or {})}
    if expected is not None:
        params["expected_last_heartbeat"] = expected
    async with session.post(url, params=params, headers=sent) as r:
        return r.status, await r.json(), r.headers["heartbeat-gateway-outcome"]


def hex_span(span: ReadableSpan) -> str:
    assert span.context is not None
    return format_span_id(span.context.span_id)


def hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return format_trace_id(span.context.trace_id)


def parent_of(span: ReadableSpan) -> str | None:
    return format_span_id(span.parent.span_id) if span.parent is not None else None


def traceparent_of(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"00-{hex_trace(span)}-{hex_span(span)}-{int(span.context.trace_flags):02x}"


async def test_a_heartbeat_continues_the_workers_trace_down_to_the_upstream_call(make_traced: TracedFactory) -> None:
    traced = await make_traced()
    work_id = held_item(traced.sim)
    async with aiohttp.ClientSession() as session:
        headers = {"traceparent": TRACEPARENT, "tracestate": "vendor=worker-state"}
        status, _, outcome = await beat(session, traced, work_id, "NO_HEARTBEAT", headers)
    assert (status, outcome) == (200, "forwarded")
    (server,) = traced.spans(SpanKind.SERVER)
    (flight,) = traced.spans(name="heartbeat flight")
    (client,) = traced.spans(SpanKind.CLIENT)
    # worker → gateway's server span → the flight → the upstream call, one trace.
    assert {hex_trace(s) for s in (server, flight, client)} == {TRACE_ID}
    assert parent_of(server) == WORKER_SPAN
    assert parent_of(flight) == hex_span(server)
    assert parent_of(client) == hex_span(flight)
    assert server.name == f"POST {HEARTBEAT_TEMPLATE}"
    assert server.attributes is not None
    assert dict(server.attributes) == {
        "http.request.method": "POST",
        "http.route": HEARTBEAT_TEMPLATE,
        "http.response.status_code": 200,
        "heartbeat_gateway.route": "heartbeat",
        "heartbeat_gateway.environment": "prod-sandboxes",
        "heartbeat_gateway.work_id": work_id,
        "heartbeat_gateway.heartbeat.outcome": "forwarded",
    }
    assert client.attributes is not None
    assert client.attributes["http.response.status_code"] == 200
    assert flight.attributes is not None
    assert flight.attributes["heartbeat_gateway.flight.result"] == "succeeded"
    # The claim is told on the flight whose answer made it.
    assert [(e.name, dict(e.attributes or {})) for e in flight.events] == [
        ("lease claimed", {"heartbeat_gateway.environment": "prod-sandboxes", "heartbeat_gateway.work_id": work_id})
    ]
    # The API is sent the gateway's own upstream span as the parent, and the worker's tracestate.
    (sent,) = traced.upstream_saw("/heartbeat")
    assert sent["traceparent"] == traceparent_of(client)
    assert sent["tracestate"] == "vendor=worker-state"


async def test_a_coalesced_pair_has_one_upstream_call_and_the_joiner_links_to_it(make_traced: TracedFactory) -> None:
    traced = await make_traced(delay_heartbeats=0.3)
    work_id = held_item(traced.sim)
    first = f"00-{'1' * 32}-{'a' * 16}-01"
    second = f"00-{'2' * 32}-{'b' * 16}-01"
    async with aiohttp.ClientSession() as session:
        await beat(session, traced, work_id, "NO_HEARTBEAT")
        traced.exporter.clear()
        # Two identical unconditional beats at once: one upstream call answers both.
        leader = asyncio.ensure_future(beat(session, traced, work_id, None, {"traceparent": first}))
        await asyncio.sleep(0.1)
        joined = await beat(session, traced, work_id, None, {"traceparent": second})
        led = await leader
    assert (led[0], led[2], joined[0], joined[2]) == (200, "forwarded", 200, "joined")
    assert len(traced.upstream_saw("/heartbeat")) == 2  # the claim, then one for the pair
    (flight,) = traced.spans(name="heartbeat flight")
    (client,) = traced.spans(SpanKind.CLIENT)
    servers = {hex_trace(s): s for s in traced.spans(SpanKind.SERVER)}
    assert set(servers) == {"1" * 32, "2" * 32}
    # The flight and its upstream call belong to the beat that started them...
    assert hex_trace(flight) == hex_trace(client) == "1" * 32
    assert parent_of(flight) == hex_span(servers["1" * 32])
    assert servers["1" * 32].links == ()
    # ...and the beat that rode along links to them across traces.
    (link,) = servers["2" * 32].links
    linked = (format_trace_id(link.context.trace_id), format_span_id(link.context.span_id))
    assert linked == ("1" * 32, hex_span(flight))
    assert (servers["2" * 32].attributes or {})["heartbeat_gateway.heartbeat.outcome"] == "joined"


async def test_a_retry_handed_the_answer_to_its_timed_out_beat_links_to_the_flight_that_got_it(
    make_traced: TracedFactory,
) -> None:
    traced = await make_traced()
    work_id = held_item(traced.sim)
    gave_up, retry = f"00-{'3' * 32}-{'c' * 16}-01", f"00-{'4' * 32}-{'d' * 16}-01"
    async with aiohttp.ClientSession() as session:
        _, claimed, _ = await beat(session, traced, work_id, "NO_HEARTBEAT")
        traced.exporter.clear()
        traced.sim.sim.faults = Faults(latency_seconds=0.5, endpoints=("heartbeat",))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):  # the worker gives up; its beat lands upstream anyway
                await beat(session, traced, work_id, claimed["last_heartbeat"], {"traceparent": gave_up})
        traced.sim.sim.faults = Faults()
        await asyncio.sleep(0.5)
        status, _, outcome = await beat(session, traced, work_id, claimed["last_heartbeat"], {"traceparent": retry})
    assert (status, outcome) == (200, "handed_off")
    (flight,) = traced.spans(name="heartbeat flight")
    assert hex_trace(flight) == "3" * 32
    (retried,) = [s for s in traced.spans(SpanKind.SERVER) if hex_trace(s) == "4" * 32]
    assert [format_span_id(link.context.span_id) for link in retried.links] == [hex_span(flight)]
    # The beat whose worker left is still a span: status 499, the client gone.
    (left,) = [s for s in traced.spans(SpanKind.SERVER) if hex_trace(s) == "3" * 32]
    assert (left.attributes or {})["http.response.status_code"] == 499


async def test_a_change_of_tracing_needs_a_restart(make_traced: TracedFactory) -> None:
    traced = await make_traced()
    settings = make_settings(traced.sim.url)
    assert traced.gateway.reload(settings) == ["tracing: changed; restart the gateway to apply it"]


async def test_an_absorbed_beat_says_so_and_makes_no_upstream_span(make_traced: TracedFactory) -> None:
    absorb = "heartbeat: {absorb: {enabled: true, max_signal_delay_seconds: 30, min_remaining_fraction: 0.5}}"
    traced = await make_traced(absorb, ttl=120)
    work_id = held_item(traced.sim)
    async with aiohttp.ClientSession() as session:
        _, answer, _ = await beat(session, traced, work_id, "NO_HEARTBEAT")
        traced.exporter.clear()
        status, _, outcome = await beat(session, traced, work_id, answer["last_heartbeat"])
    assert (status, outcome) == (200, "absorbed")
    (server,) = traced.spans()
    assert (server.attributes or {})["heartbeat_gateway.heartbeat.outcome"] == "absorbed"
    assert server.links == ()
    assert traced.upstream_saw("/heartbeat")[1:] == []


async def test_a_poll_held_at_the_gateway_says_so(make_traced: TracedFactory) -> None:
    traced = await make_traced("polls: {max_upstream_per_environment: 1}")
    url = f"{traced.gateway.proxy_url}/v1/environments/{ENV_ID}/work/poll?block_ms=400"

    async def poll(session: aiohttp.ClientSession, worker: str) -> None:
        async with session.get(url, headers={**worker_headers(), "Anthropic-Worker-ID": worker}) as r:
            assert (r.status, await r.text()) == (200, "null")

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(poll(session, f"worker-{n}") for n in range(3)))
    polls = sorted(str((s.attributes or {}).get("heartbeat_gateway.poll")) for s in traced.spans(SpanKind.SERVER))
    # One went upstream; the others waited here for its slot and, none freeing in time, were answered here.
    assert polls == ["answered_empty", "answered_empty", "forwarded"]
    assert len(traced.spans(SpanKind.CLIENT)) == 1


async def test_lease_events_are_told_on_the_flight_or_timer_that_learned_them(make_traced: TracedFactory) -> None:
    traced = await make_traced("heartbeat: {leases: {expiry_grace_seconds: 0.2}}", ttl=1)
    stopped_id, expiring_id = held_item(traced.sim), held_item(traced.sim)
    async with aiohttp.ClientSession() as session:
        _, claimed, _ = await beat(session, traced, stopped_id, "NO_HEARTBEAT")
        await beat(session, traced, expiring_id, "NO_HEARTBEAT")
        stop = f"{traced.gateway.proxy_url}/v1/environments/{ENV_ID}/work/{stopped_id}/stop"
        async with session.post(stop, headers=worker_headers(), json={}) as r:
            assert r.status == 200
        await beat(session, traced, stopped_id, claimed["last_heartbeat"])
    deadline = time.monotonic() + 3
    while not traced.spans(name="lease expired"):
        assert time.monotonic() < deadline, "the expiry was never told"
        await asyncio.sleep(0.05)
    told = [(e.name, (e.attributes or {}).get("heartbeat_gateway.work_id")) for e in _events(traced)]
    # Each on the flight whose answer showed it: the claims, then the stop the holder's next beat learned of.
    assert told[:3] == [("lease claimed", stopped_id), ("lease claimed", expiring_id), ("lease stopping", stopped_id)]
    # A lapse no request saw is a span of its own, at the table's timer, in no worker's trace.
    (expired,) = traced.spans(name="lease expired")
    assert expired.parent is None
    assert [(e.name, (e.attributes or {}).get("heartbeat_gateway.work_id")) for e in expired.events] == [
        ("lease expired", expiring_id)
    ]


def _events(traced: Traced) -> list[Any]:
    return [e for s in traced.spans(name="heartbeat flight") for e in s.events]


async def test_a_lost_lease_is_told_with_its_reason(make_traced: TracedFactory) -> None:
    traced = await make_traced()
    work_id = held_item(traced.sim)
    async with aiohttp.ClientSession() as session:
        _, claimed, _ = await beat(session, traced, work_id, "NO_HEARTBEAT")
        # A rival moves the lease on at the API itself.
        sim = traced.sim.sim
        sim.plane.heartbeat(ENV_ID, work_id, sim.now(), expected=claimed["last_heartbeat"], desired_ttl=None)
        status, _, outcome = await beat(session, traced, work_id, claimed["last_heartbeat"])
    assert (status, outcome) == (412, "forwarded")
    lost = [e for e in _events(traced) if e.name == "lease lost"]
    assert [(e.attributes or {}).get("heartbeat_gateway.lease.reason") for e in lost] == ["conflict"]
    rejected = traced.spans(name="heartbeat flight")[-1]
    assert (rejected.attributes or {})["heartbeat_gateway.flight.result"] == "rejected"


async def test_no_span_carries_a_secret_a_query_string_or_a_header_value(make_traced: TracedFactory) -> None:
    traced = await make_traced()
    work_id = held_item(traced.sim)
    planted = {"x-planted": PLANTED_HEADER, "traceparent": TRACEPARENT}
    async with aiohttp.ClientSession() as session:
        await beat(session, traced, work_id, "NO_HEARTBEAT", planted, note=PLANTED_QUERY)
        for path in (f"/v1/environments/{ENV_ID}/work/{work_id}", f"/v1/sessions/sesn_x?q={PLANTED_QUERY}"):
            async with session.get(traced.gateway.proxy_url + path, headers={**worker_headers(), **planted}) as r:
                await r.read()
        # A request refused for its credential still has its span; so does one with a junk key.
        async with session.get(
            f"{traced.gateway.proxy_url}/v1/environments/{ENV_ID}/work",
            headers={"x-api-key": "sk-ant-junk-PLANTED-8888", **planted},
        ) as r:
            assert r.status == 401
    spans = traced.spans()
    assert len(spans) >= 8
    text = "\n".join(_everything_recorded(s) for s in spans)
    for secret in (*SECRETS, PLANTED_QUERY, PLANTED_HEADER, "sk-ant-junk-PLANTED-8888", "Bearer"):
        assert secret not in text
    assert "?" not in text, "a query string was recorded"


def _everything_recorded(span: ReadableSpan) -> str:
    parts: list[object] = [span.name, dict(span.attributes or {}), dict(span.resource.attributes)]
    parts += [(e.name, dict(e.attributes or {})) for e in span.events]
    parts += [dict(link.attributes or {}) for link in span.links]
    return repr(parts)


async def test_a_malformed_or_unsampled_traceparent_costs_the_request_nothing(make_traced: TracedFactory) -> None:
    traced = await make_traced()
    work_id = held_item(traced.sim)
    unsampled = f"00-{TRACE_ID}-{WORKER_SPAN}-00"
    async with aiohttp.ClientSession() as session:
        status, answer, _ = await beat(session, traced, work_id, "NO_HEARTBEAT", {"traceparent": "00-junk-junk-01"})
        assert status == 200
        status, _, _ = await beat(session, traced, work_id, answer["last_heartbeat"], {"traceparent": unsampled})
        assert status == 200
    # The junk one starts a trace of its own, whole; the unsampled one is not recorded, as its worker asked.
    (server,) = traced.spans(SpanKind.SERVER)
    assert server.parent is None
    assert hex_trace(server) != TRACE_ID
    assert len(traced.spans()) == 3  # its server span, flight and upstream call
    assert {hex_trace(s) for s in traced.spans()} == {hex_trace(server)}
    first, second = traced.upstream_saw("/heartbeat")
    (client,) = traced.spans(SpanKind.CLIENT)
    assert first["traceparent"] == traceparent_of(client)
    assert re.fullmatch(rf"00-{TRACE_ID}-[0-9a-f]{{16}}-00", second["traceparent"]), "the unsampled trace is lost"


async def test_a_sampler_that_overrides_the_workers_choice_still_traces_its_unsampled_requests_whole(
    make_traced: TracedFactory,
) -> None:
    """Under a parent-based sampler nothing under an unsampled request is made at all; under one that
    decides alone, every span of such a request is kept, flight and upstream call included."""
    traced = await make_traced(sampler="always_on")
    work_id = held_item(traced.sim)
    async with aiohttp.ClientSession() as session:
        unsampled = {"traceparent": f"00-{TRACE_ID}-{WORKER_SPAN}-00"}
        status, _, _ = await beat(session, traced, work_id, "NO_HEARTBEAT", unsampled)
    assert status == 200
    (server,) = traced.spans(SpanKind.SERVER)
    (flight,) = traced.spans(name="heartbeat flight")
    (client,) = traced.spans(SpanKind.CLIENT)
    assert (parent_of(flight), parent_of(client)) == (hex_span(server), hex_span(flight))
    (sent,) = traced.upstream_saw("/heartbeat")
    assert sent["traceparent"] == traceparent_of(client)


async def test_the_latency_histograms_carry_the_trace_as_an_exemplar(make_traced: TracedFactory) -> None:
    traced = await make_traced()
    work_id = held_item(traced.sim)
    async with aiohttp.ClientSession() as session:
        await beat(session, traced, work_id, "NO_HEARTBEAT", {"traceparent": TRACEPARENT})
        openmetrics = "application/openmetrics-text; version=1.0.0"
        async with session.get(f"{traced.gateway.admin_url}/metrics", headers={"Accept": openmetrics}) as r:
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
            exposition = await r.text()
        async with session.get(f"{traced.gateway.admin_url}/metrics") as r:
            classic = await r.text()
    (server,) = traced.spans(SpanKind.SERVER)
    (client,) = traced.spans(SpanKind.CLIENT)
    request_lines = _exemplar_lines(exposition, "heartbeat_gateway_request_duration_seconds_bucket", "heartbeat")
    upstream_lines = _exemplar_lines(
        exposition, "heartbeat_gateway_upstream_request_duration_seconds_bucket", "heartbeat"
    )
    assert f'# {{span_id="{hex_span(server)}",trace_id="{TRACE_ID}"}}' in "".join(request_lines)
    assert f'# {{span_id="{hex_span(client)}",trace_id="{TRACE_ID}"}}' in "".join(upstream_lines)
    assert "trace_id" not in classic  # the classic text format has no exemplars


def _exemplar_lines(exposition: str, name: str, route: str) -> list[str]:
    return [
        line
        for line in exposition.splitlines()
        if line.startswith(name) and f'route="{route}"' in line and " # " in line
    ]


async def test_the_access_line_names_the_trace(make_traced: TracedFactory, caplog: pytest.LogCaptureFixture) -> None:
    traced = await make_traced()
    work_id = held_item(traced.sim)
    caplog.set_level("INFO", logger="gateway.access")
    async with aiohttp.ClientSession() as session:
        await beat(session, traced, work_id, "NO_HEARTBEAT", {"traceparent": TRACEPARENT})
    (record,) = [r for r in caplog.records if r.name == "gateway.access"]
    assert record.__dict__["fields"]["trace_id"] == TRACE_ID


async def test_with_tracing_off_the_workers_context_passes_as_it_came(
    make_gateway: GatewayFactory, make_simulator: SimFactory
) -> None:
    seen: Seen = []

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.append((request.path, list(request.headers.items())))
        return await handler(request)

    sim = await make_simulator(middleware=record)
    gateway = await make_gateway(sim.url)
    work_id = held_item(sim)
    async with aiohttp.ClientSession() as session:
        url = f"{gateway.proxy_url}/v1/environments/{ENV_ID}/work/{work_id}/heartbeat"
        headers = {**worker_headers(), "traceparent": TRACEPARENT, "tracestate": "vendor=worker-state"}
        async with session.post(url, params={"expected_last_heartbeat": "NO_HEARTBEAT"}, headers=headers) as r:
            assert r.status == 200
    ((_, sent),) = [(p, h) for p, h in seen if p.endswith("/heartbeat")]
    assert [(k, v) for k, v in sent if k.lower() in ("traceparent", "tracestate")] == [
        ("traceparent", TRACEPARENT),
        ("tracestate", "vendor=worker-state"),
    ]


def test_serving_with_tracing_off_never_loads_opentelemetry() -> None:
    """Off costs nothing: not one OpenTelemetry module is imported by the gateway as it serves."""
    code = (
        "import sys, asyncio\n"
        "from gateway.app import Gateway\n"
        "from gateway.config.load import load_settings\n"
        f"settings = load_settings({config_yaml('http://127.0.0.1:9')!r}, {ENVIRON!r})\n"
        "async def main():\n"
        "    gateway = Gateway(settings)\n"
        "    await gateway.start()\n"
        "    await gateway.stop()\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_tracing_config_that_cannot_work_is_refused_with_the_config() -> None:
    settings = load_settings(config_yaml("http://127.0.0.1:9", "tracing: {enabled: true}"), ENVIRON)
    assert tracing_problems(settings, {}) == []
    assert tracing_problems(settings, {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == [
        "tracing.enabled: OTEL_EXPORTER_OTLP_PROTOCOL='grpc': only 'http/protobuf' is supported"
    ]
    assert otel_environment_problems({"OTEL_TRACES_EXPORTER": "zipkin"}) == [
        "OTEL_TRACES_EXPORTER='zipkin': only 'otlp' (OTLP over HTTP) or 'none'"
    ]
    off = load_settings(config_yaml("http://127.0.0.1:9"), ENVIRON)
    assert tracing_problems(off, {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == []


def test_without_the_extra_installed_tracing_is_a_clear_config_error(tmp_path: Any) -> None:
    """`check-config` says what to install, as a config problem (exit 2), rather than a traceback at start."""
    config = tmp_path / "gateway.yaml"
    config.write_text(config_yaml("http://127.0.0.1:9", "tracing: {enabled: true}"))
    # OpenTelemetry made unimportable, as on an install without the extra.
    code = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None\n"
        "from gateway.cli import main\n"
        f"raise SystemExit(main(['check-config', {str(config)!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **ENVIRON})
    assert result.returncode == 2
    assert result.stderr.strip() == ("tracing.enabled: true needs OpenTelemetry: pip install 'heartbeat-gateway[otel]'")


# -- what the adversarial review found: errors, secrets and memory on the paths tests sample least ------------


async def test_a_token_put_in_the_path_is_never_a_span_attribute(
    make_traced: TracedFactory, caplog: pytest.LogCaptureFixture
) -> None:
    traced = await make_traced()
    caplog.set_level("DEBUG")
    async with aiohttp.ClientSession() as session:
        for work_id in (TOKEN, ENV_KEY, "sk-ant-api03-UNKNOWN-PLANTED-9999"):
            url = f"{traced.gateway.proxy_url}/v1/environments/{ENV_ID}/work/{work_id}/heartbeat"
            async with session.post(url, headers=worker_headers()) as r:
                assert r.status in (401, 404)
    recorded = [(s.attributes or {}).get("heartbeat_gateway.work_id") for s in traced.spans(SpanKind.SERVER)]
    assert recorded == ["<redacted>", "<redacted>", "<redacted>"]
    logged = (r.getMessage() for r in caplog.records if r.name.startswith("gateway"))  # not the simulator's own
    text = "\n".join([*map(_everything_recorded, traced.spans()), *logged])
    for secret in (TOKEN, ENV_KEY, "UNKNOWN-PLANTED"):
        assert secret not in text


async def test_a_header_opentelemetry_cannot_read_is_refused_as_without_tracing(
    make_traced: TracedFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Baggage that is not UTF-8 makes OpenTelemetry's propagator raise: the request gets the 400 it gets
    with tracing off, not a 500, and the gateway says once that tracing failed."""
    traced = await make_traced()
    work_id = held_item(traced.sim)
    target = f"/v1/environments/{ENV_ID}/work/{work_id}/heartbeat?expected_last_heartbeat=NO_HEARTBEAT"
    request = (
        f"POST {target} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 0\r\n"
    ).encode() + b"baggage: a=\xff\r\nConnection: close\r\n\r\n"
    with caplog.at_level("WARNING", logger="gateway.tracing"):
        received, _ = await raw(traced.gateway, request)
    status, body = status_and_json(received)
    assert (status, body["error"]["type"]) == (400, "invalid_request_error")
    (said,) = [r for r in caplog.records if r.name == "gateway.tracing"]
    assert said.getMessage() == "tracing failed 1 time(s), untraced; latest: server span: UnicodeEncodeError"


@pytest.mark.parametrize("traceparent", [None, "00-junk-junk-01", f"00-{'0' * 32}-{WORKER_SPAN}-01"])
async def test_a_tracestate_without_its_traceparent_never_goes_upstream(
    make_traced: TracedFactory, traceparent: str | None
) -> None:
    """A `tracestate` belongs to its `traceparent`: with none valid, the API is sent the gateway's new trace alone."""
    traced = await make_traced()
    work_id = held_item(traced.sim)
    headers = {"tracestate": "vendor=orphan"} | ({"traceparent": traceparent} if traceparent else {})
    async with aiohttp.ClientSession() as session:
        await beat(session, traced, work_id, "NO_HEARTBEAT", headers)
    (sent,) = traced.upstream_saw("/heartbeat")
    (client,) = traced.spans(SpanKind.CLIENT)
    assert sent["traceparent"] == traceparent_of(client)
    assert "tracestate" not in sent


async def test_workers_failed_by_one_flight_link_to_it_and_it_says_it_failed(make_traced: TracedFactory) -> None:
    traced = await make_traced("heartbeat: {upstream_timeout_seconds: 0.3}")
    work_id = held_item(traced.sim)
    first, second = f"00-{'1' * 32}-{'a' * 16}-01", f"00-{'2' * 32}-{'b' * 16}-01"
    async with aiohttp.ClientSession() as session:
        await beat(session, traced, work_id, "NO_HEARTBEAT")
        traced.exporter.clear()
        traced.sim.sim.faults = Faults(latency_seconds=1.0, endpoints=("heartbeat",))
        url = f"{traced.gateway.proxy_url}/v1/environments/{ENV_ID}/work/{work_id}/heartbeat"

        async def unconditional(traceparent: str) -> int:
            async with session.post(url, headers={**worker_headers(), "traceparent": traceparent}) as r:
                return r.status

        leader = asyncio.ensure_future(unconditional(first))
        await asyncio.sleep(0.1)
        assert (await unconditional(second), await leader) == (504, 504)
    (flight,) = traced.spans(name="heartbeat flight")
    assert (flight.attributes or {})["heartbeat_gateway.flight.result"] == "failed"
    assert flight.status.status_code is StatusCode.ERROR
    (call,) = traced.spans(SpanKind.CLIENT)
    assert ((call.attributes or {})["error.type"], call.status.status_code) == ("timeout", StatusCode.ERROR)
    servers = {hex_trace(s): s for s in traced.spans(SpanKind.SERVER)}
    assert servers["1" * 32].links == ()
    assert [format_span_id(link.context.span_id) for link in servers["2" * 32].links] == [hex_span(flight)]
    for server in servers.values():
        assert ((server.attributes or {})["error.type"], server.status.status_code) == ("timeout", StatusCode.ERROR)


async def test_a_beat_queued_behind_another_flies_under_its_own_request(make_traced: TracedFactory) -> None:
    """Its flight is started when the one before it ends, from that flight's task: its parent is still the
    beat whose request it sends."""
    traced = await make_traced(delay_heartbeats=0.3)
    work_id = held_item(traced.sim)
    first, second = f"00-{'1' * 32}-{'a' * 16}-01", f"00-{'2' * 32}-{'b' * 16}-01"
    async with aiohttp.ClientSession() as session:
        _, claimed, _ = await beat(session, traced, work_id, "NO_HEARTBEAT")
        traced.exporter.clear()
        leader = asyncio.ensure_future(
            beat(session, traced, work_id, claimed["last_heartbeat"], {"traceparent": first})
        )
        await asyncio.sleep(0.1)
        queued = await beat(session, traced, work_id, None, {"traceparent": second})
        await leader
    assert queued[2] == "forwarded"
    servers = {hex_trace(s): s for s in traced.spans(SpanKind.SERVER)}
    flights = {hex_trace(f): f for f in traced.spans(name="heartbeat flight")}
    assert set(flights) == {"1" * 32, "2" * 32}
    for trace_id, flight in flights.items():
        assert parent_of(flight) == hex_span(servers[trace_id])


async def test_an_unsampled_request_leaves_no_exemplar_and_no_trace_id_to_follow(
    make_traced: TracedFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither would lead anywhere: its spans were never exported."""
    traced = await make_traced()
    work_id = held_item(traced.sim)
    caplog.set_level("INFO", logger="gateway.access")
    async with aiohttp.ClientSession() as session:
        await beat(session, traced, work_id, "NO_HEARTBEAT", {"traceparent": f"00-{TRACE_ID}-{WORKER_SPAN}-00"})
        openmetrics = {"Accept": "application/openmetrics-text; version=1.0.0"}
        async with session.get(f"{traced.gateway.admin_url}/metrics", headers=openmetrics) as r:
            exposition = await r.text()
    assert traced.spans() == []
    (record,) = [r for r in caplog.records if r.name == "gateway.access"]
    assert "trace_id" not in record.__dict__["fields"]
    assert "trace_id=" not in exposition


async def test_a_poll_that_waited_for_a_slot_and_one_shed_say_so(make_traced: TracedFactory) -> None:
    traced = await make_traced("polls: {max_upstream_per_environment: 1}")
    base = f"{traced.gateway.proxy_url}/v1/environments/{ENV_ID}/work/poll"

    async def poll(session: aiohttp.ClientSession, worker: str, block_ms: int) -> None:
        headers = {**worker_headers(), "Anthropic-Worker-ID": worker}
        async with session.get(f"{base}?block_ms={block_ms}", headers=headers) as r:
            assert (r.status, await r.text()) == (200, "null")

    async with aiohttp.ClientSession() as session:
        # The first holds the one slot for 200 ms; the second waits for it, then goes up with the time it has left.
        first = asyncio.ensure_future(poll(session, "worker-1", 200))
        await asyncio.sleep(0.05)
        await poll(session, "worker-2", 900)
        await first
    polls = sorted(str((s.attributes or {}).get("heartbeat_gateway.poll")) for s in traced.spans(SpanKind.SERVER))
    assert polls == ["forwarded", "held_then_forwarded"]


async def test_the_lease_table_keeps_no_span_alive(make_traced: TracedFactory) -> None:
    """The kept answers of 50 leases carry their flights' ids, not the spans: exported, they are let go."""
    traced = await make_traced()
    work_ids = [held_item(traced.sim) for _ in range(50)]
    async with aiohttp.ClientSession() as session:
        for work_id in work_ids:
            await beat(session, traced, work_id, "NO_HEARTBEAT", {"traceparent": TRACEPARENT})
    assert len(traced.spans(name="heartbeat flight")) == 50
    traced.exporter.clear()
    gc.collect()
    # A few live on, for a while: the contexts a pooled connection's timers were scheduled in (one per
    # connection, at most); the table holds none of its 50 leases' (two each, 7 KB a lease, before).
    assert len([o for o in gc.get_objects() if isinstance(o, SdkSpan)]) <= 6


def test_otel_variables_tracing_cannot_honour_are_config_problems_that_show_no_secret() -> None:
    problems = otel_environment_problems(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "htp://user:ENDPOINT-SECRET@collector:4318",
            "OTEL_EXPORTER_OTLP_HEADERS": "x-honeycomb-team: HEADER-SECRET",
            "OTEL_PROPAGATORS": "tracecontext,b3,TraceContext",
            "OTEL_TRACES_SAMPLER": " traceidratio",
            "OTEL_BSP_MAX_QUEUE_SIZE": "100",
            "OTEL_BSP_SCHEDULE_DELAY": "\u00b2",
        }
    )
    assert problems == [
        "OTEL_EXPORTER_OTLP_ENDPOINT: not an http:// or https:// URL (not shown: it may hold a credential)",
        "OTEL_EXPORTER_OTLP_HEADERS: not name=value pairs separated by commas (not shown: it may hold a key)",
        "OTEL_PROPAGATORS: 'b3', 'TraceContext' not available (tracecontext, baggage or none, in lower case)",
        "OTEL_TRACES_SAMPLER=' traceidratio': one of always_off, always_on, parentbased_always_off, "
        "parentbased_always_on, parentbased_traceidratio, traceidratio",
        "OTEL_BSP_SCHEDULE_DELAY='\u00b2': a positive whole number",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE (512) is larger than OTEL_BSP_MAX_QUEUE_SIZE (100)",
    ]
    assert "SECRET" not in "\n".join(problems)
    fine = {
        # The traces-specific setting wins over the general one; an empty variable is unset.
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://collector.example:4318/v1/traces",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-honeycomb-team=abc%20def,other=1",
        "OTEL_TRACES_SAMPLER": "ParentBased_TraceIdRatio",
        "OTEL_TRACES_SAMPLER_ARG": "",
        "OTEL_PROPAGATORS": " tracecontext , baggage ",
        "OTEL_BSP_MAX_QUEUE_SIZE": "",
    }
    assert otel_environment_problems(fine) == []
    assert otel_environment_problems({"OTEL_TRACES_EXPORTER": "none"}) == []


async def test_a_flight_span_that_cannot_start_costs_the_beat_nothing(
    make_traced: TracedFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenTelemetry failing inside the lease path (a sampler plug-in, a bug): the beat is answered as
    ever, its own span is whole, and its upstream call still hangs under it."""
    traced = await make_traced()
    work_id = held_item(traced.sim)
    tracer = traced.tracing._tracer
    real = tracer.start_span

    def failing(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "heartbeat flight":
            raise RuntimeError("a sampler plug-in failed")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(tracer, "start_span", failing)
    async with aiohttp.ClientSession() as session:
        status, _, outcome = await beat(session, traced, work_id, "NO_HEARTBEAT", {"traceparent": TRACEPARENT})
    assert (status, outcome) == (200, "forwarded")
    (server,) = traced.spans(SpanKind.SERVER)
    assert (server.attributes or {})["heartbeat_gateway.heartbeat.outcome"] == "forwarded"
    assert "heartbeat_gateway.flight.result" not in (server.attributes or {})
    (client,) = traced.spans(SpanKind.CLIENT)
    assert parent_of(client) == hex_span(server)


async def test_a_sampled_beat_riding_an_unsampled_flight_links_to_nothing(make_traced: TracedFactory) -> None:
    """That flight was never exported: a link to it would lead nowhere."""
    traced = await make_traced(delay_heartbeats=0.3)
    work_id = held_item(traced.sim)
    async with aiohttp.ClientSession() as session:
        await beat(session, traced, work_id, "NO_HEARTBEAT")
        traced.exporter.clear()
        unsampled, sampled = f"00-{'1' * 32}-{'a' * 16}-00", f"00-{'2' * 32}-{'b' * 16}-01"
        leader = asyncio.ensure_future(beat(session, traced, work_id, None, {"traceparent": unsampled}))
        await asyncio.sleep(0.1)
        joined = await beat(session, traced, work_id, None, {"traceparent": sampled})
        await leader
    assert joined[2] == "joined"
    (rider,) = traced.spans()
    assert rider.links == ()


async def test_opentelemetry_failing_at_every_span_and_header_leaves_every_answer_as_without_tracing(
    make_traced: TracedFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No span starts and no context can be written: beats, retrieves and the lease are served as ever,
    untraced, and the failures are said in the throttled line."""
    traced = await make_traced()
    work_id = held_item(traced.sim)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("OpenTelemetry is broken")

    monkeypatch.setattr(traced.tracing._tracer, "start_span", broken)
    monkeypatch.setattr(traced.tracing._propagator, "inject", broken)
    caplog.set_level("WARNING", logger="gateway.tracing")
    async with aiohttp.ClientSession() as session:
        status, claimed, outcome = await beat(session, traced, work_id, "NO_HEARTBEAT", {"traceparent": TRACEPARENT})
        assert (status, outcome) == (200, "forwarded")
        status, _, outcome = await beat(session, traced, work_id, claimed["last_heartbeat"])
        assert (status, outcome) == (200, "forwarded")
        url = f"{traced.gateway.proxy_url}/v1/environments/{ENV_ID}/work/{work_id}"
        async with session.get(url, headers=worker_headers()) as r:
            assert r.status == 200
    assert traced.spans() == []
    # What went upstream: the requests as tracing off sends them, the worker's context as it came.
    first, second = traced.upstream_saw("/heartbeat")
    assert first["traceparent"] == TRACEPARENT
    assert "traceparent" not in second
    assert [r.getMessage() for r in caplog.records if r.name == "gateway.tracing"] == [
        "tracing failed 1 time(s), untraced; latest: server span: RuntimeError"
    ]


def test_a_gateway_built_without_the_cli_refuses_otel_variables_it_cannot_honour(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-key: PLANTED-COLLECTOR-KEY")
    settings = load_settings(config_yaml("http://127.0.0.1:9", "tracing: {enabled: true}"), ENVIRON)
    with pytest.raises(TracingUnavailable) as refused:
        Gateway(settings)
    assert str(refused.value) == (
        "OTEL_EXPORTER_OTLP_HEADERS: not name=value pairs separated by commas (not shown: it may hold a key)"
    )


def test_opentelemetry_that_cannot_load_is_a_config_problem_naming_only_its_kind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its import raises on some variables (a propagator entry point that fails, say): the config is refused
    with the error's kind, never its text, which may quote a variable's value."""
    real_import = builtins.__import__

    def failing(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "gateway.observability.tracing":
            raise ValueError("OTEL_SOMETHING=PLANTED-VALUE")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing)
    settings = load_settings(config_yaml("http://127.0.0.1:9", "tracing: {enabled: true}"), ENVIRON)
    assert tracing_problems(settings, {}) == [
        "tracing.enabled: OpenTelemetry cannot start with these OTEL_* variables (ValueError)"
    ]
