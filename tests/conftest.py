"""Shared fixtures: real sockets on loopback for the simulator, stand-in upstreams and the gateway."""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from gateway.app import Gateway
from gateway.simulator import SIMULATOR, SimulatorConfig, TtlPolicy, create_simulator_app

from .support import (
    API_KEY,
    DEFAULT_CLIENTS,
    ENV_ID,
    ENV_KEY,
    OTHER_ENV_ID,
    OTHER_ENV_KEY,
    GatewayFactory,
    Recorder,
    SimFactory,
    SimHandle,
    make_settings,
)
from .tools import free_port, require, wait_listening


@pytest.fixture
def make_simulator(aiohttp_server: AiohttpServer) -> SimFactory:
    async def make(
        ttl: int = 60,
        environments: dict[str, str] | None = None,
        seed: int = 1,
        middleware: Any = None,
        tls: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
        **kwargs: Any,
    ) -> SimHandle:
        config = SimulatorConfig(
            environments or {ENV_ID: ENV_KEY, OTHER_ENV_ID: OTHER_ENV_KEY},
            ttl=TtlPolicy(default_seconds=ttl),
            org_api_keys=(API_KEY,),
            seed=seed,
            **kwargs,
        )
        app = create_simulator_app(config)
        if middleware is not None:
            app.middlewares.insert(0, middleware)  # a test's own fault, ahead of everything
        server = await aiohttp_server(app, host=host, ssl=tls)  # with `tls`, an HTTPS upstream
        return SimHandle(server, app[SIMULATOR])

    return make


@pytest.fixture
def otlp_receiver() -> Iterator[str]:
    """An OTLP/HTTP trace receiver in its own process (`tests/otlp_receiver.py`): its URL."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("otlp_receiver.py")), "--port", str(port)])
    try:
        wait_listening(port, process, "the OTLP receiver")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
async def simulator(make_simulator: SimFactory) -> SimHandle:
    return await make_simulator()


@pytest.fixture
async def make_gateway() -> AsyncIterator[GatewayFactory]:
    started: list[Gateway] = []

    async def make(upstream_url: str, extra: str = "", *, clients: str = DEFAULT_CLIENTS) -> Gateway:
        gateway = Gateway(make_settings(upstream_url, extra, clients=clients))
        await gateway.start()
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        await gateway.stop()


@pytest.fixture
async def gateway(simulator: SimHandle, make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway(simulator.url)


@pytest.fixture
async def recorder(aiohttp_server: AiohttpServer) -> tuple[Recorder, str]:
    rec = Recorder()
    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/{tail:.*}", rec.handler)
    # The recorder sees bodies exactly as the gateway sent them.
    server = await aiohttp_server(app, auto_decompress=False)
    return rec, str(server.make_url("")).rstrip("/")


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests talk to loopback only; a developer's proxy settings must not interfere.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say loudly which tests did not run for want of a tool, and how to get it."""
    missing: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "with CI=true this is a failure" in reason:
            missing[reason.removeprefix("Skipped: ").split(";")[0]] += 1
    if not missing:
        return
    terminalreporter.section("tests skipped: tools missing", sep="!", yellow=True, bold=True)
    for reason, count in missing.most_common():
        terminalreporter.write_line(f"{count:4d} skipped: {reason}")
    terminalreporter.write_line(
        "Run .ci/run as root (what CI runs), or: make tools (helm), apt-get install prometheus (promtool, "
        "prometheus), Node.js 20 with npm (the TypeScript SDK worker). With CI=true, a missing tool fails."
    )


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A CONNECT proxy on loopback, logging each tunnel it opens; its URL and its log."""
    binary = require("tinyproxy", "apt-get install tinyproxy")
    port = free_port()
    log = tmp_path / "tinyproxy.log"
    conf = tmp_path / "tinyproxy.conf"
    # No ConnectPort lines: any port may be tunnelled (the packaged config allows 443 and 563 only).
    conf.write_text(
        f"Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\nTimeout 30\nMaxClients 50\n"
        f'LogFile "{log}"\nLogLevel Connect\nPidFile "{tmp_path / "tinyproxy.pid"}"\n'
    )
    # As root it would switch to its packaged user, which cannot write the test's log: run as ourselves.
    process = subprocess.Popen([binary, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, process, f"tinyproxy ({log.read_text() if log.exists() else 'no log'})")
        yield f"http://127.0.0.1:{port}", log
    finally:
        process.terminate()
        process.wait(timeout=10)
