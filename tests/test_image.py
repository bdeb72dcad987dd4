"""The container image, built by `make image` and run the way the Helm chart runs it.

Read-only root filesystem, uid 10001, every capability dropped, no privilege
escalation, the config and the secrets mounted read-only, a writable /tmp only:
the chart's `securityContext` and volumes. Through it, the official Python SDK
worker's public entry point serves whole sessions against an HTTPS API signed by
a private CA, reached only through a real CONNECT proxy named by `HTTPS_PROXY`
(the chart's `extraEnv`), its OpenTelemetry spans reach a collector (the chart's
`tracing.*`), and the container stops cleanly on SIGTERM.

Needs docker or podman able to run containers (`.ci/run` installs podman and
runc); the first build also makes a Debian base with debootstrap when no
registry is reachable (about a minute).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
import trustme

from gateway.simulator import AgentScript

from .otlp_receiver import received
from .support import ENV_ID, ENV_KEY, TOKEN, SimFactory
from .test_workers_end_to_end import ITEMS, MAX_IDLE, TTL, assert_least_privilege, assert_served_whole
from .tools import free_port, write_pair
from .workers import Served, items_done, run_python_worker

ROOT = Path(__file__).parent.parent
IMAGE = "heartbeat-gateway:test"  # its own tag: a test leaves the image `make image` built alone
SCRIPT = AgentScript(commands=("echo hello",))


def container_engine() -> str:
    """docker or podman, whichever can run containers here; skip without one (fail in CI)."""
    for name in ("docker", "podman"):
        path = shutil.which(name)
        if path is not None and subprocess.run([path, "info"], capture_output=True).returncode == 0:
            return path
    message = "neither docker nor podman can run containers here (apt-get install podman runc)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must have it: .ci/run installs it")
    pytest.skip(f"{message}; with CI=true this is a failure")


@pytest.fixture(scope="module")
def image() -> tuple[str, int]:
    """`make image`'s script, as a user runs it (under its own tag): the engine and the image's size in bytes."""
    engine = container_engine()
    build = subprocess.run(
        [str(ROOT / "scripts" / "build-image")],
        env={**os.environ, "ENGINE": os.path.basename(engine), "IMAGE": IMAGE, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    size = subprocess.run(
        [engine, "image", "inspect", "--format", "{{.Size}}", IMAGE], capture_output=True, text=True, check=True
    )
    return engine, int(size.stdout.strip())


def outward_address() -> str:
    """This machine's address off loopback: the egress proxy is skipped for loopback hosts, as in Go and curl."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))  # a route lookup only: UDP sends nothing on connect
        except OSError:
            pytest.skip("this machine has no address off loopback to put the API on")
        address: str = probe.getsockname()[0]
        return address


def readable(*paths: Path) -> None:
    """As a Secret volume's files are: readable by the container's uid (pytest's tmp dirs are 0700)."""
    for path in paths:
        path.chmod(0o755 if path.is_dir() else 0o644)


async def test_the_image_run_as_the_chart_runs_it_serves_sessions_through_an_egress_proxy_to_https(
    image: tuple[str, int],
    make_simulator: SimFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tinyproxy: tuple[str, Path],
    otlp_receiver: str,
) -> None:
    engine, size = image
    proxy_url, proxy_log = tinyproxy
    address = outward_address()

    ca = trustme.CA(organization_name="the cluster's CA")
    api_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(address).configure_cert(api_tls)
    sim = await make_simulator(ttl=TTL, script=SCRIPT, tls=api_tls, host=address)
    sim.sim.enqueue(ENV_ID, count=ITEMS)

    # The chart's volumes: the ConfigMap, the Secret's files and the TLS Secret, each its own read-only mount.
    config_dir, secrets_dir, tls_dir = tmp_path / "config", tmp_path / "secrets", tmp_path / "tls"
    for directory in (config_dir, secrets_dir, tls_dir, config_dir / "secrets", config_dir / "tls"):
        directory.mkdir()  # the last two: mount points inside the read-only config mount
    ca.cert_pem.write_to_path(str(secrets_dir / "api-ca.pem"))
    write_pair(ca, tls_dir, "127.0.0.1")
    (secrets_dir / "TEST_TOKEN").write_text(TOKEN)
    port, admin_port = free_port(), free_port()
    (config_dir / "config.yaml").write_text(
        f"""
listen:
  host: 127.0.0.1
  port: {port}
  tls: {{cert_file: /etc/heartbeat-gateway/tls/tls.crt, key_file: /etc/heartbeat-gateway/tls/tls.key}}
admin: {{host: 127.0.0.1, port: {admin_port}}}
upstream:
  base_url: {sim.url}
  tls: {{ca_files: [/etc/heartbeat-gateway/secrets/api-ca.pem]}}
environments:
  - {{id: {ENV_ID}, name: prod-sandboxes, key_env: TEST_ENV_KEY}}
clients:
  tokens: [{{token_file: /etc/heartbeat-gateway/secrets/TEST_TOKEN, environments: ["*"]}}]
logging: {{format: json}}
tracing: {{enabled: true}}
"""
    )
    readable(
        tmp_path, secrets_dir, tls_dir, *config_dir.iterdir(), config_dir, *secrets_dir.iterdir(), *tls_dir.iterdir()
    )

    name = f"hbg-test-{uuid.uuid4().hex[:8]}"
    run = [
        engine,
        "run",
        "--rm",
        "--name",
        name,
        "--network",
        "host",
        # The chart's securityContext and pod securityContext.
        "--read-only",
        "--user",
        "10001:10001",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        # The chart's emptyDir at /tmp.
        "--tmpfs",
        "/tmp",
        "--volume",
        f"{config_dir}:/etc/heartbeat-gateway:ro",
        "--volume",
        f"{secrets_dir}:/etc/heartbeat-gateway/secrets:ro",
        "--volume",
        f"{tls_dir}:/etc/heartbeat-gateway/tls:ro",
        # The Secret's keys as environment variables (envFrom), and the egress proxy (extraEnv).
        "--env",
        "TEST_ENV_KEY",
        "--env",
        f"HTTPS_PROXY={proxy_url}",
        # The chart's tracing values: the image has the otel extra, and its spans reach the collector.
        "--env",
        f"OTEL_EXPORTER_OTLP_ENDPOINT={otlp_receiver}",
        "--env",
        "OTEL_TRACES_SAMPLER=parentbased_traceidratio",
        "--env",
        "OTEL_TRACES_SAMPLER_ARG=1",
        # A rootful engine in a sandbox cannot raise limits to its defaults: these are what a pod gets at least.
        "--ulimit",
        "nofile=4096:4096",
        "--ulimit",
        "nproc=1000:1000",
    ]
    if engine.endswith("podman"):
        run.append("--http-proxy=false")  # podman would copy this test's own proxy variables in
    log = tmp_path / "container.log"
    started = time.monotonic()
    with log.open("wb") as out:
        container = await asyncio.create_subprocess_exec(
            *run, IMAGE, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "TEST_ENV_KEY": ENV_KEY}
        )
    try:
        ready = await wait_ready(f"http://127.0.0.1:{admin_port}/readyz", container, log)
        time_to_ready = ready - started
        print(f"\nimage {IMAGE}: {size / 1e6:.0f} MB; run to ready in {time_to_ready:.2f} s")

        # What the chart asked for is what the process got.
        _, status = await engine_run(engine, "exec", name, "cat", "/proc/1/status")
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        assert fields["Uid"].split()[:2] == ["10001", "10001"], status
        assert int(fields["CapEff"], 16) == 0
        assert int(fields["CapBnd"], 16) == 0
        assert fields["NoNewPrivs"].strip() == "1"
        # Even root (without capabilities, it still owns /) cannot write there: the root filesystem is read-only.
        written, why = await engine_run(engine, "exec", "--user", "0", name, "touch", "/written")
        assert written != 0
        assert "Read-only file system" in why

        ca_file = tmp_path / "gateway-ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # how the Python SDK trusts the gateway
        await run_python_worker(
            f"https://127.0.0.1:{port}",
            TOKEN,
            ENV_ID,
            tmp_path / "w",
            until=items_done(sim.sim, ENV_ID, ITEMS),
            max_idle=MAX_IDLE,
            within=60.0,
        )
        assert_served_whole(Served.of(sim.sim, ENV_ID))
        assert_least_privilege(sim, issue_secrets=False)
        # Only through the proxy: every tunnel it opened went to the API, and there was one.
        host_port = sim.url.removeprefix("https://")
        tunnels = [line.split("): ", 1)[1] for line in proxy_log.read_text().splitlines() if ": CONNECT " in line]
        assert tunnels
        assert all(line == f"CONNECT {host_port} HTTP/1.1" for line in tunnels), tunnels

        # SIGTERM, as the kubelet stops a pod: drained and gone with status 0 well inside the grace period.
        stopping = time.monotonic()
        await engine_run(engine, "stop", "--time", "30", name)
        status_code = await asyncio.wait_for(container.wait(), 30)
        assert status_code == 0, tail(log)
        assert time.monotonic() - stopping < 25
    finally:
        if container.returncode is None:
            await engine_run(engine, "rm", "--force", name)
            await asyncio.wait_for(container.wait(), 30)
    # Traced as it served: each heartbeat a server span, its flight and the upstream call, sent on the way out.
    spans = await received(otlp_receiver)
    beats = [s for s in spans if s["attributes"].get("heartbeat_gateway.route") == "heartbeat"]
    assert {s["kind"] for s in beats} == {2, 3}  # server and client
    assert any(s["name"] == "heartbeat flight" for s in spans)
    assert {s["resource"]["service.name"] for s in spans} == {"heartbeat-gateway"}
    assert ENV_KEY not in json.dumps(spans)
    assert TOKEN not in json.dumps(spans)
    output = tail(log, None)
    assert TOKEN not in output
    assert ENV_KEY not in output
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert lines, output
    assert not [line for line in lines if line["level"] == "error"], tail(log)


async def engine_run(engine: str, *args: str) -> tuple[int, str]:
    """One engine command (exec, stop, rm): its status and what it printed."""
    process = await asyncio.create_subprocess_exec(engine, *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await process.communicate()
    return await process.wait(), out.decode(errors="replace")


def tail(log: Path, chars: int | None = 4000) -> str:
    text = log.read_text(errors="replace")
    return text if chars is None else text[-chars:]


async def wait_ready(url: str, container: asyncio.subprocess.Process, log: Path, patience: float = 60.0) -> float:
    """The moment the admin port's /readyz first answers 200, failing with the container's log if it exits."""
    deadline = time.monotonic() + patience
    async with aiohttp.ClientSession() as session:
        while True:
            if container.returncode is not None:
                raise AssertionError(f"the container exited with {container.returncode}:\n{tail(log)}")
            with_status = 0
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as response:
                    with_status = response.status
            except (aiohttp.ClientError, TimeoutError):
                pass
            if with_status == 200:
                return time.monotonic()
            if time.monotonic() > deadline:
                raise AssertionError(f"not ready after {patience} s:\n{tail(log)}")
            await asyncio.sleep(0.05)
