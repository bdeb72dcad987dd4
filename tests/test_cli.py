"""The command line, run as users run it: real processes, real signals, real ports.

Checks `gateway/cli.py`, `gateway/demo/run.py`, `gateway/demo/bad_day.py`, `gateway/demo/worker.py`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web

from gateway.demo.bad_day import PHASES

from .served import Ports, start_serve, wait_ready
from .support import ENV_ID, ENVIRON, SECRETS, TOKEN, Recorder, SimFactory, config_yaml, worker_headers
from .tools import free_port, write_pair

EXAMPLE = Path(__file__).parent.parent / "config" / "gateway.example.yaml"
BIN = Path(sys.executable).parent / "heartbeat-gateway"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_console_script_and_module_are_the_same_program() -> None:
    by_module = run("--version")
    by_script = subprocess.run([str(BIN), "--version"], capture_output=True, text=True, timeout=30, check=False)
    assert by_module.returncode == by_script.returncode == 0
    assert by_module.stdout == by_script.stdout
    assert by_module.stdout.startswith("heartbeat-gateway ")


def test_check_config_accepts_the_example_with_a_one_line_summary() -> None:
    # The README's two exports are all it needs.
    env = {"PROD_ENVIRONMENT_KEY": SECRETS[0], "WORKER_TOKEN": TOKEN}
    result = run("check-config", str(EXAMPLE), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "ok: 1 environment(s), 1 client token(s), upstream https://api.anthropic.com, proxy 0.0.0.0:8080, "
        "admin 0.0.0.0:9090\n"
    )
    assert not any(secret in result.stdout + result.stderr for secret in SECRETS)


def test_check_config_lists_every_problem_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        "environments:\n  - {id: env_1, key: sk-ant-api03-PASTED-BY-MISTAKE}\n"
        "clients: {tokens: [{token_env: WORKER_TOKEN}]}\nlisten: {port: http}\n"
    )
    result = run("check-config", str(config), env={"WORKER_TOKEN": TOKEN})
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "listen.port: must be an integer, not a string",
        "environments[0].key: literal secrets are not allowed in the config; name an environment variable (_env) "
        "or a file (_file)",
        "environments[0]: one of key_env or key_file is required",
    ]
    assert "PASTED-BY-MISTAKE" not in result.stderr
    missing = run("check-config", str(tmp_path / "missing.yaml"))
    assert missing.returncode == 2
    assert "cannot read the config file" in missing.stderr


@pytest.fixture
def config_file(tmp_path: Path) -> tuple[Path, int, int]:
    """A config for a served gateway, with fixed free ports; the upstream is filled in by the test."""
    proxy_port, admin_port = free_port(), free_port()
    return tmp_path / "gateway.yaml", proxy_port, admin_port


def write_config(path: Path, upstream: str, proxy_port: int, admin_port: int, grace: float = 5) -> None:
    text = config_yaml(
        upstream,
        Ports(proxy_port, admin_port).listen_yaml()
        + f"limits: {{shutdown_grace_seconds: {grace}}}\nlogging: {{level: info, format: json}}\n",
    )
    path.write_text(text)


async def test_serve_drains_in_flight_requests_on_sigterm_and_exits_0(
    recorder: tuple[Recorder, str], config_file: tuple[Path, int, int]
) -> None:
    rec, upstream = recorder
    path, proxy_port, admin_port = config_file
    write_config(path, upstream, proxy_port, admin_port)
    upstream_started = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        upstream_started.set()
        await asyncio.sleep(1.5)
        return web.json_response({"finished": True})

    rec.respond = slow
    proc = await start_serve(path)
    try:
        await wait_ready(admin_port, proc)
        async with aiohttp.ClientSession() as session:
            in_flight = asyncio.ensure_future(
                session.get(f"http://127.0.0.1:{proxy_port}/v1/sessions/s1", headers=worker_headers())
            )
            await asyncio.wait_for(upstream_started.wait(), 5)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            # Draining: not ready any more, and no new connections on the worker port.
            async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as r:
                assert r.status == 503
                assert await r.json() == {"status": "draining"}
            with pytest.raises(aiohttp.ClientConnectionError):
                async with aiohttp.ClientSession() as fresh:
                    await fresh.get(f"http://127.0.0.1:{proxy_port}/v1/sessions/s2", headers=worker_headers())
            response = await in_flight
            assert response.status == 200
            assert await response.json() == {"finished": True}
        _stdout, stderr = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    events = [json.loads(line) for line in stderr.decode().splitlines()]
    assert [e.get("event") for e in events if e.get("event") in ("started", "draining", "stopped")] == [
        "started",
        "draining",
        "stopped",
    ]
    request_lines = [e for e in events if e.get("event") == "request"]
    assert request_lines[0]["route"] == "sessions"
    assert request_lines[0]["status"] == 200
    assert not any(secret in stderr.decode() for secret in SECRETS)


async def test_serve_cuts_requests_that_outlive_the_grace_period(
    recorder: tuple[Recorder, str], config_file: tuple[Path, int, int]
) -> None:
    rec, upstream = recorder
    path, proxy_port, admin_port = config_file
    write_config(path, upstream, proxy_port, admin_port, grace=0.5)

    async def endless(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.json_response({})

    rec.respond = endless
    proc = await start_serve(path, stderr=asyncio.subprocess.DEVNULL)
    try:
        await wait_ready(admin_port, proc)
        async with aiohttp.ClientSession() as session:
            in_flight = asyncio.ensure_future(
                session.get(f"http://127.0.0.1:{proxy_port}/v1/sessions/s1", headers=worker_headers())
            )
            await asyncio.sleep(0.3)
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 10)
            elapsed = time.monotonic() - started
            with pytest.raises(aiohttp.ClientError):
                await in_flight
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert elapsed < 3


def test_serve_reports_a_busy_port_and_a_bad_config(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = tmp_path / "gateway.yaml"
        write_config(path, "http://127.0.0.1:9", port, free_port())
        result = run("serve", "--config", str(path), env=ENVIRON)
    assert result.returncode == 1
    assert "cannot start" in result.stderr
    bad = run("serve", "--config", str(path))  # the secrets' variables are not set
    assert bad.returncode == 2
    assert "environment variable TEST_ENV_KEY is not set" in bad.stderr


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_simulate_upstream_serves_the_work_api(scheme: str, tmp_path: Path) -> None:
    """Over HTTPS too, with --tls-cert/--tls-key: the API as users reach it, for benchmarks on that path."""
    port = free_port()
    served: list[str] = []
    client_tls: ssl.SSLContext | bool = True
    if scheme == "https":
        ca = trustme.CA()
        cert, key = write_pair(ca, tmp_path / "sim", "127.0.0.1")
        served = ["--tls-cert", str(cert), "--tls-key", str(key)]
        client_tls = ssl.create_default_context()
        ca.configure_trust(client_tls)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "simulate-upstream", "--port", str(port), "--ttl", "5",
        "--environment", f"{ENV_ID}=SIM_KEY", "--work-items", "2", *served,
        env={**os.environ, "SIM_KEY": "sim-key-123"}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        banner = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        assert f"{scheme}://127.0.0.1:{port}" in banner
        headers = {"Authorization": "Bearer sim-key-123", "anthropic-beta": "managed-agents-2026-04-01"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_tls)) as session:
            for _ in range(50):
                try:
                    async with session.get(
                        f"{scheme}://127.0.0.1:{port}/v1/environments/{ENV_ID}/work/stats", headers=headers
                    ) as r:
                        stats = await r.json()
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
        assert stats["depth"] == 2
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_simulate_upstream_refuses_missing_keys_and_bad_faults() -> None:
    result = run("simulate-upstream", "--environment", "env_x=NOT_SET_ANYWHERE")
    assert result.returncode == 2
    assert "environment variable NOT_SET_ANYWHERE (the key of env_x) is not set" in result.stderr
    result = run("simulate-upstream", "--error-rate", "2", env={"SIM_ENVIRONMENT_KEY": "k"})
    assert result.returncode == 2
    assert "error_rate must be between 0 and 1" in result.stderr
    result = run("simulate-upstream", "--tls-cert", "sim.crt", env={"SIM_ENVIRONMENT_KEY": "k"})
    assert result.returncode == 2
    assert "--tls-cert and --tls-key go together" in result.stderr
    result = run(
        "simulate-upstream", "--tls-cert", "none.crt", "--tls-key", "none.key", env={"SIM_ENVIRONMENT_KEY": "k"}
    )
    assert result.returncode == 2
    assert "simulate-upstream: --tls-cert/--tls-key: [Errno 2] No such file or directory" in result.stderr
    # Each of the other usage errors, printed as it is with exit status 2 (one exception type carries them all).
    sim_key = {"SIM_ENVIRONMENT_KEY": "k"}
    for args, message in (
        (("--environment", "env_x"), "--environment env_x: expected ID=KEY_ENV"),
        (("--ttl", "5", "--min-ttl", "10"), "simulate-upstream: --ttl must lie between --min-ttl and --max-ttl"),
        (("--org-key-env", "NOT_SET_ANYWHERE"), "--org-key-env: environment variable NOT_SET_ANYWHERE is not set"),
    ):
        result = run("simulate-upstream", *args, env=sim_key)
        assert (result.returncode, result.stderr.strip()) == (2, message), args


async def test_demo_runs_prints_progress_and_ends_with_json() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "demo", "--duration", "4", "--workers", "3", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    banner = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
    admin = re.search(r"admin (http://\S+)/readyz", banner)
    assert admin is not None, banner
    # While the demo runs, the admin port answers as in production.
    async with aiohttp.ClientSession() as session, session.get(admin.group(1) + "/readyz") as r:
        assert r.status == 200
    rest, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr.decode()
    lines = rest.decode().splitlines()
    assert len([line for line in lines if line.startswith("[")]) == 4
    assert "summary" in lines
    summary = json.loads(lines[-1])
    for key in ("worker_heartbeats", "upstream_heartbeats", "conflicts", "leases_lost", "work_completed",
                "p50_ms", "p99_ms"):  # fmt: skip
        assert key in summary
    assert summary["worker_heartbeats"] > 0
    assert summary["upstream_heartbeats"] > 0
    assert summary["p50_ms"] <= summary["p99_ms"]


def test_the_bad_day_demo_shows_both_fleets_phase_by_phase_and_what_the_gateway_kept() -> None:
    done = run("demo", "--bad-day", "--workers", "10", "--json")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.strip("- ") for line in lines if line.startswith("-- ")] == [p.name for p in PHASES]
    assert any(" direct: beats" in line for line in lines)
    assert any(line.strip().startswith("gateway: beats") for line in lines)
    summary = json.loads(lines[-1])
    assert [row["phase"] for row in summary["phases"]] == [p.name for p in PHASES]
    direct, gateway = summary["total"]["direct"], summary["total"]["gateway"]
    assert direct["claims"] > 0
    assert gateway["claims"] > 0
    # The same fleet, the same weather: the calm start costs neither fleet a lease.
    assert summary["phases"][0]["direct"]["leases_lost"] == summary["phases"][0]["gateway"]["leases_lost"] == 0
    # While the API rate-limits, the gateway retries inside the workers' window (it costs upstream calls).
    assert gateway["upstream_heartbeats"] > gateway["worker_heartbeats"] - summary["gateway_answers"]["joined"]


async def reload_count(admin_port: int, result: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{admin_port}/metrics") as r:
        text = await r.text()
    match = re.search(rf'heartbeat_gateway_config_reloads_total{{result="{result}"}} (\S+)', text)
    assert match is not None
    return float(match.group(1))


async def wait_reloads(admin_port: int, result: str, count: float) -> None:
    deadline = time.monotonic() + 10
    while await reload_count(admin_port, result) < count:
        assert time.monotonic() < deadline, f"no {result} reload counted"
        await asyncio.sleep(0.1)


async def test_sighup_reloads_keys_and_refuses_bad_or_restart_only_changes(
    recorder: tuple[Recorder, str], config_file: tuple[Path, int, int], tmp_path: Path
) -> None:
    rec, upstream = recorder
    path, proxy_port, admin_port = config_file
    key_file = tmp_path / "env-key"
    key_file.write_text("sk-ant-rotated-key-ONE\n")
    write_config(path, upstream, proxy_port, admin_port)
    original = path.read_text()
    path.write_text(original.replace("key_env: TEST_ENV_KEY", f"key_file: {key_file}"))
    proc = await start_serve(path)
    stats = f"http://127.0.0.1:{proxy_port}/v1/environments/{ENV_ID}/work/stats"
    try:
        await wait_ready(admin_port, proc)
        async with aiohttp.ClientSession() as session:
            async with session.get(stats, headers=worker_headers()) as r:
                assert r.status == 200
            assert header_value(rec, -1, "Authorization") == "Bearer sk-ant-rotated-key-ONE"
            # The mounted secret is rotated; SIGHUP picks it up without a restart.
            key_file.write_text("sk-ant-rotated-key-TWO\n")
            proc.send_signal(signal.SIGHUP)
            await wait_reloads(admin_port, "success", 1)
            async with session.get(stats, headers=worker_headers()) as r:
                assert r.status == 200
            assert header_value(rec, -1, "Authorization") == "Bearer sk-ant-rotated-key-TWO"
            # An invalid config is refused whole; the running one stays.
            path.write_text(path.read_text() + "\nbogus: 1\n")
            proc.send_signal(signal.SIGHUP)
            await wait_reloads(admin_port, "failure", 1)
            # So is a change only a restart can apply.
            path.write_text(path.read_text().replace("\nbogus: 1\n", "").replace(str(proxy_port), str(free_port())))
            proc.send_signal(signal.SIGHUP)
            await wait_reloads(admin_port, "failure", 2)
            async with session.get(stats, headers=worker_headers()) as r:
                assert r.status == 200
            assert header_value(rec, -1, "Authorization") == "Bearer sk-ant-rotated-key-TWO"
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log = stderr.decode()
    assert "bogus: unknown key" in log
    assert "listen: changed; restart the gateway to apply it" in log
    assert "rotated-key" not in log


def header_value(rec: Recorder, index: int, name: str) -> str:
    (value,) = [v for k, v in rec.requests[index].headers if k.lower() == name.lower()]
    return value


async def test_sigterm_mid_flight_exits_within_one_grace_period(make_simulator: SimFactory, tmp_path: Path) -> None:
    """A heartbeat, a long poll and an event stream open when SIGTERM comes: out in one grace, cutting the rest."""
    from gateway.simulator import Faults

    sim = await make_simulator(faults=Faults(latency_seconds=10, endpoints=("heartbeat", "poll")))
    (work_id,) = sim.sim.enqueue(ENV_ID)
    sim.sim.plane.poll(ENV_ID, sim.sim.now(), worker_id="w", reclaim_older_than_ms=None)
    sim.sim.plane.ack(ENV_ID, work_id, sim.sim.now())
    ports, grace = Ports.free(), 2.0
    config = tmp_path / "gateway.yaml"
    config.write_text(config_yaml(sim.url, ports.listen_yaml() + f"limits: {{shutdown_grace_seconds: {grace}}}\n"))
    proc = await start_serve(config, stderr=asyncio.subprocess.DEVNULL)
    try:
        await wait_ready(ports.admin, proc)
        base = f"http://127.0.0.1:{ports.proxy}"
        session_id = sim.sim.sessions.all()[0].id
        async with aiohttp.ClientSession() as http:
            beat = asyncio.ensure_future(
                http.post(
                    f"{base}/v1/environments/{ENV_ID}/work/{work_id}/heartbeat",
                    params={"expected_last_heartbeat": "NO_HEARTBEAT"},
                    headers=worker_headers(),
                )
            )
            poll = asyncio.ensure_future(
                http.get(
                    f"{base}/v1/environments/{ENV_ID}/work/poll", params={"block_ms": "999"}, headers=worker_headers()
                )
            )
            stream = await http.get(f"{base}/v1/sessions/{session_id}/events/stream", headers=worker_headers())
            assert stream.status == 200
            await asyncio.sleep(0.3)  # all three are in flight
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 3 * grace)
            elapsed = time.monotonic() - started
            with pytest.raises(aiohttp.ClientPayloadError):
                await stream.content.read()  # cut, not finished
            stream.close()
            for request in (beat, poll):
                with pytest.raises(aiohttp.ClientError):
                    await request
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert grace - 0.2 < elapsed < grace + 1.0, elapsed
