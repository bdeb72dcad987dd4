"""Log output: JSON lines with request fields, and no secret in any line, whatever happens.

Checks `gateway/observability/logs.py`, `gateway/observability/access_log.py`, `gateway/edge/middleware.py`.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import aiohttp
import pytest
from aiohttp import web

from gateway.config.settings import LoggingSettings
from gateway.observability.logs import QuietLog, Scrubber, configure_logging

from .support import ENV_ID, SECRETS, TOKEN, GatewayFactory, Recorder, SimHandle, worker_headers


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging(LoggingSettings("debug", "json"), SECRETS, stream)
    yield stream
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)


def test_scrubber_removes_known_secrets_and_key_shapes() -> None:
    scrub = Scrubber(["abc123secret"])
    assert scrub("token abc123secret and sk-ant-api03-XyZ_9 and Bearer opaque.value") == (
        "token <redacted> and <redacted> and Bearer <redacted>"
    )


@pytest.mark.parametrize(
    "line",
    [
        "parser said: AUTHORIZATION: opaque-value",
        "parser said: Cookie=opaque-value",
        "parser said: x-api-key: opaque-value",
        "upstream said: bEaReR opaque-value",
        # Unicode case folding: the Kelvin sign is a `k` to a case-insensitive match.
        "parser said: x-api-\u212aey: opaque-value",
        "parser said: coo\u212aie: opaque-value",
    ],
)
def test_a_credential_in_any_letter_case_is_scrubbed(line: str) -> None:
    scrubbed = Scrubber([])(line)
    assert "opaque-value" not in scrubbed
    assert scrubbed.endswith("<redacted>")


def test_json_lines_are_stamped_as_datetime_would_stamp_them(captured: io.StringIO) -> None:
    # The time of day is formatted once a second; the milliseconds, rounded as datetime rounds, every line.
    times = (1764670000.0, 1764670000.0009994, 1764670000.9999996, 1764670001.5004999, 1764670001.9995)
    handler = logging.getLogger().handlers[0]
    lines = [
        json.loads(handler.format(logging.makeLogRecord({"name": "gateway.test", "msg": "tick", "created": created})))
        for created in times
    ]
    assert [line["time"] for line in lines] == [
        datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds") for created in times
    ]


def test_even_a_careless_log_call_is_scrubbed(captured: io.StringIO) -> None:
    logging.getLogger("somewhere").error("oops %s", TOKEN)
    try:
        raise ValueError(f"bad header Bearer {SECRETS[0]}")
    except ValueError:
        logging.getLogger("somewhere").exception("failed")
    output = captured.getvalue()
    assert not any(secret in output for secret in SECRETS)
    assert output.count("<redacted>") >= 2


async def test_request_lines_carry_fields_and_no_secret(
    captured: io.StringIO, simulator: SimHandle, make_gateway: GatewayFactory, recorder: tuple[Recorder, str]
) -> None:
    gateway = await make_gateway(simulator.url)
    (work_id,) = simulator.sim.enqueue(ENV_ID)
    rec, broken_url = recorder

    async def crash(request: web.Request) -> web.StreamResponse:
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError

    rec.respond = crash
    broken = await make_gateway(broken_url)
    claim = f"/v1/environments/{ENV_ID}/work/{work_id}/heartbeat?expected_last_heartbeat=NO_HEARTBEAT"
    async with aiohttp.ClientSession() as session:
        for base, method, target, headers in [
            (gateway, "GET", f"/v1/environments/{ENV_ID}/work/poll?block_ms=10", worker_headers()),
            (gateway, "POST", f"/v1/environments/{ENV_ID}/work/{work_id}/ack", worker_headers()),
            (gateway, "POST", claim, worker_headers()),
            (gateway, "POST", claim, worker_headers()),
            (gateway, "GET", "/v1/sessions/s1", {"x-api-key": "sk-ant-api03-unknown-worker-key"}),
            (gateway, "GET", f"/v1/environments/{ENV_ID}/work/poll", {"Authorization": f"Bearer {TOKEN}x"}),
            (broken, "POST", f"/v1/environments/{ENV_ID}/work/w/heartbeat", worker_headers()),
            (broken, "GET", "/v1/sessions/s1", worker_headers()),
        ]:  # fmt: skip
            async with session.request(method, base.proxy_url + target, headers=headers) as r:
                body = await r.read()
                assert not any(secret.encode() in body for secret in SECRETS)
    # Nothing the admin port shows carries a secret either.
    async with aiohttp.ClientSession() as session:
        for path in ("/metrics", "/admin/config", "/admin/leases", "/readyz"):
            async with session.get(gateway.admin_url + path) as r:
                shown = await r.text()
            assert not any(secret in shown for secret in SECRETS), path
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    requests = [line for line in lines if line.get("event") == "request"]
    assert [(r["route"], r["status"]) for r in requests] == [
        ("poll", 200),
        ("ack", 200),
        ("heartbeat", 200),
        ("heartbeat", 412),
        ("sessions", 401),  # a foreign key passes through, and the API refuses it
        ("poll", 401),
        ("heartbeat", 502),
        ("sessions", 502),
    ]
    beat = requests[2]
    assert beat["environment"] == "prod-sandboxes"
    assert beat["work_id"] == work_id
    assert beat["path_template"] == "/v1/environments/{environment_id}/work/{work_id}/heartbeat"
    assert beat["heartbeat_outcome"] == "forwarded"
    assert beat["upstream_status"] == 200
    assert beat["request_id"].startswith("req_sim")
    # The second claim was answered by the gateway itself: no upstream status to report.
    rejected = requests[3]
    assert rejected["heartbeat_outcome"] == "rejected"
    assert "upstream_status" not in rejected
    assert "request_id" not in rejected
    assert requests[6]["error"] == "reset"
    # Lease events get their own lines, with environment and work id.
    (claimed,) = [line for line in lines if line.get("event") == "lease_claimed"]
    assert (claimed["environment"], claimed["work_id"]) == ("prod-sandboxes", work_id)
    text = captured.getvalue()
    assert not any(secret in text for secret in SECRETS)
    assert "sk-ant-api03-unknown-worker-key" not in text


def test_text_lines_quote_values_that_could_pose_as_fields() -> None:
    stream = io.StringIO()
    configure_logging(LoggingSettings("info", "text"), (), stream)
    try:
        logging.getLogger("gateway.access").info(
            "GET", extra={"fields": {"event": "request", "work_id": "w1 status=200\u202e", "route": "work"}}
        )
    finally:
        logging.getLogger().handlers.clear()
    line = stream.getvalue()
    assert 'work_id="w1 status=200\\u202e"' in line
    assert "route=work" in line


async def test_malformed_requests_do_not_put_header_values_in_the_log(
    captured: io.StringIO, simulator: SimHandle, make_gateway: GatewayFactory
) -> None:
    import asyncio

    gateway = await make_gateway(simulator.url)
    host, port = gateway.proxy_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /v1/sessions/s HTTP/1.1\r\nHost: x\r\nx-api-key: PRIVATE_session_token\x01\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert "PRIVATE_session_token" not in captured.getvalue()


def test_running_out_of_descriptors_is_said_once_in_a_while_not_per_accept(captured: io.StringIO) -> None:
    # What asyncio's own loop logs for each failed accept() when descriptors run out.
    for _ in range(500):
        logging.getLogger("asyncio").error(
            "socket.accept() out of system resource", exc_info=OSError(24, "Too many open files")
        )
    lines = captured.getvalue().splitlines()
    assert len(lines) == 1
    assert "out of file descriptors" in json.loads(lines[0])["message"]


def test_a_trace_collector_that_is_down_is_said_once_a_minute_not_per_export(captured: io.StringIO) -> None:
    """OpenTelemetry's exporter warns at every failed export and every span a full queue drops; its
    text may quote the collector's endpoint or key, or a worker's header, and is never written."""
    exporter = logging.getLogger("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    for n in range(200):
        exporter.warning("Transient error %s, retrying", f"http://user:COLLECTOR-SECRET@collector {n}")
        logging.getLogger("opentelemetry.sdk._shared_internal").warning("Queue full, dropping Span.")
        logging.getLogger("opentelemetry.baggage.propagation").warning("Invalid baggage entry: %s", "a=PLANTED")
    exporter.info("Exported %s", "quietly")
    text = captured.getvalue()
    assert "SECRET" not in text
    assert "PLANTED" not in text
    assert [json.loads(line)["message"] for line in text.splitlines()] == [
        "trace export failed, 1 time(s) since the last report",
        "spans dropped: the export queue is full, 1 time(s) since the last report",
        "a trace header could not be read, 1 time(s) since the last report",
    ]


async def test_routine_successes_can_be_sampled_and_errors_are_always_logged(
    captured: io.StringIO, simulator: SimHandle, make_gateway: GatewayFactory
) -> None:
    """`logging.sample_routine: 0`: no line for a successful heartbeat or poll; every error, and every
    other request, still gets one."""
    gateway = await make_gateway(simulator.url, "logging: {sample_routine: 0}")
    (work_id,) = simulator.sim.enqueue(ENV_ID)
    base = f"{gateway.proxy_url}/v1/environments/{ENV_ID}/work"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/poll", headers=worker_headers()) as r:
            assert r.status == 200
        async with session.post(f"{base}/{work_id}/ack", headers=worker_headers()) as r:
            assert r.status == 200
        params = {"expected_last_heartbeat": "NO_HEARTBEAT"}
        async with session.post(f"{base}/{work_id}/heartbeat", params=params, headers=worker_headers()) as r:
            assert r.status == 200
        async with session.post(f"{base}/{work_id}/heartbeat", params=params, headers=worker_headers()) as r:
            assert r.status == 412  # claimed already: an error, always logged
    requests = [json.loads(line) for line in captured.getvalue().splitlines() if '"event": "request"' in line]
    assert [(r["route"], r["status"]) for r in requests] == [("ack", 200), ("heartbeat", 412)]


async def test_a_secret_sent_in_a_path_is_redacted_in_the_request_line(
    captured: io.StringIO, simulator: SimHandle, make_gateway: GatewayFactory
) -> None:
    """Request lines are written straight to the log stream (not through `logging`), scrubbed all the same."""
    gateway = await make_gateway(simulator.url)
    async with aiohttp.ClientSession() as session:
        target = f"{gateway.proxy_url}/v1/environments/{ENV_ID}/work/{TOKEN}/heartbeat"
        async with session.post(target, params={"expected_last_heartbeat": "x"}, headers=worker_headers()) as r:
            await r.read()
    (line,) = [json.loads(line) for line in captured.getvalue().splitlines() if '"event": "request"' in line]
    assert line["work_id"] == "<redacted>"
    assert line["logger"] == "gateway.access"
    assert line["level"] == "info"
    assert TOKEN not in captured.getvalue()


class _BrokenStream(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError("the log's reader is gone")


async def test_a_log_that_cannot_be_written_never_fails_a_request(
    simulator: SimHandle, make_gateway: GatewayFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(LoggingSettings("info", "json"), SECRETS, _BrokenStream())
    try:
        gateway = await make_gateway(simulator.url)
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"{gateway.proxy_url}/v1/environments/{ENV_ID}/work/poll?block_ms=10", headers=worker_headers()
            ) as r,
        ):
            assert r.status == 200
            assert await r.json() is None
    finally:
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.setLevel(logging.WARNING)
    assert "BrokenPipeError" in capsys.readouterr().err  # said where logging says such things


async def test_request_lines_reach_a_handler_put_beside_the_gateways(
    captured: io.StringIO, simulator: SimHandle, make_gateway: GatewayFactory
) -> None:
    """An error tracker or a test's capture added to the root logger still gets every request line."""
    records: list[logging.LogRecord] = []

    class Beside(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logging.getLogger().addHandler(Beside())
    gateway = await make_gateway(simulator.url)
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{gateway.proxy_url}/v1/environments/{ENV_ID}/work/poll?block_ms=10", headers=worker_headers()
        ) as r,
    ):
        assert r.status == 200
    assert [r.name for r in records if r.name == "gateway.access"] == ["gateway.access"]
    (line,) = [json.loads(line) for line in captured.getvalue().splitlines() if '"event": "request"' in line]
    assert line["route"] == "poll"


def test_a_field_never_replaces_the_lines_own_level(captured: io.StringIO) -> None:
    """A consumer that keeps `level: warning` lines must see every warning, whatever its fields are called."""
    logging.getLogger("gateway.overload").warning(
        "overload level shed_polls", extra={"fields": {"event": "overload", "level": "shed_polls", "lag_ms": 51}}
    )
    (line,) = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert (line["level"], line["logger"], line["event"], line["lag_ms"]) == (
        "warning",
        "gateway.overload",
        "overload",
        51,
    )


def test_a_flood_is_one_line_per_period_with_how_often_it_happened(captured: io.StringIO) -> None:
    """Refused connections, failed accepts: a line each would drown the log (and cost the loop)."""
    quiet = QuietLog(logging.getLogger("gateway.proxy"), logging.WARNING, "refused", "refused %d time(s): %s", 0.2)
    for n in range(500):
        quiet.note(f"reason {n}")
    time.sleep(0.25)
    quiet.note("the last")
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert [(line["count"], line["reason"]) for line in lines] == [(1, "reason 0"), (500, "the last")]
    # asyncio's own flood of failed accepts, filtered the same way.
    asyncio_log = logging.getLogger("asyncio")
    for _ in range(300):
        asyncio_log.error("socket.accept() out of system resource\nsocket: %s", "fd")
    accept_lines = [json.loads(line) for line in captured.getvalue().splitlines()][2:]
    assert [line["message"] for line in accept_lines] == ["accept() failed 1 time(s): out of file descriptors"]
