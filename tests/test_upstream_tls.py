"""HTTPS to the upstream, with certificate authorities made here: trusted, untrusted, the wrong name.

Checks `gateway/upstream/client.py` (its TLS) and `gateway/certificates.py` (trust that rotates).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import trustme

from gateway import certificates
from gateway.config.load import ConfigError, load_settings
from gateway.config.settings import LoggingSettings
from gateway.observability.logs import configure_logging

from .support import (
    ENV_ID,
    ENVIRON,
    GatewayFactory,
    SimFactory,
    SimHandle,
    config_yaml,
    held_item,
    make_settings,
    worker_headers,
)
from .tools import free_port, require, wait_listening, write_pair


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA(organization_name="heartbeat-gateway test CA")


def serving(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    """A server's TLS context, with a certificate from `ca` for `names`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "private-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def warnings() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging(LoggingSettings("info", "json"), [], stream)
    yield stream
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)


async def claim(gateway_url: str, work_id: str = "w") -> tuple[int, dict[str, object]]:
    url = f"{gateway_url}/v1/environments/{ENV_ID}/work/{work_id}/heartbeat"
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, params={"expected_last_heartbeat": "NO_HEARTBEAT"}, headers=worker_headers()) as r,
    ):
        return r.status, await r.json()


async def test_an_upstream_signed_by_a_private_ca_in_ca_files_is_trusted(
    ca: trustme.CA, ca_file: str, make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    sim = await make_simulator(tls=serving(ca, "127.0.0.1"))
    assert sim.url.startswith("https://")
    work_id = held_item(sim)
    gateway = await make_gateway(sim.url, f"upstream: {{base_url: '{sim.url}', tls: {{ca_files: ['{ca_file}']}}}}")
    status, body = await claim(gateway.proxy_url, work_id)
    assert (status, body["lease_extended"]) == (200, True), body


async def test_ca_files_are_added_to_the_trust_store_not_put_in_its_place(
    ca: trustme.CA,
    ca_file: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_simulator: SimFactory,
    make_gateway: GatewayFactory,
) -> None:
    """`SSL_CERT_FILE` replaces the system store; `ca_files` must not: an API the system trusts stays trusted."""
    system_ca = trustme.CA(organization_name="the system's trust store")
    system_file = tmp_path / "system.pem"
    system_ca.cert_pem.write_to_path(str(system_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(system_file))  # the store OpenSSL reads, as a distribution ships it
    for signer in (system_ca, ca):
        sim = await make_simulator(tls=serving(signer, "127.0.0.1"))
        work_id = held_item(sim)
        gateway = await make_gateway(sim.url, f"upstream: {{base_url: '{sim.url}', tls: {{ca_files: ['{ca_file}']}}}}")
        status, body = await claim(gateway.proxy_url, work_id)
        assert status == 200, body


@pytest.mark.parametrize(
    ("names", "trusted", "reason"),
    [
        (("127.0.0.1",), False, "unable to get local issuer certificate"),
        (("api.other.example",), True, "mismatch"),
    ],
    ids=["untrusted-ca", "wrong-name"],
)
async def test_a_certificate_the_gateway_cannot_accept_is_named_to_the_worker_in_metrics_and_in_a_warning(
    ca: trustme.CA,
    ca_file: str,
    make_simulator: SimFactory,
    make_gateway: GatewayFactory,
    warnings: io.StringIO,
    names: tuple[str, ...],
    trusted: bool,
    reason: str,
) -> None:
    """Before: every TLS failure was `502 "cannot connect to the upstream"` and nothing at warning said why."""
    sim = await make_simulator(tls=serving(ca, *names))
    extra = f", tls: {{ca_files: ['{ca_file}']}}" if trusted else ""
    gateway = await make_gateway(sim.url, f"upstream: {{base_url: '{sim.url}'{extra}}}")
    status, body = await claim(gateway.proxy_url)
    error = body["error"]
    assert isinstance(error, dict)
    assert status == 502
    assert "TLS certificate was not accepted" in error["message"]
    assert reason in error["message"]
    assert sim.sim.count("heartbeat") == 0  # never sent
    async with aiohttp.ClientSession() as http, http.get(gateway.admin_url + "/metrics") as r:
        series = 'heartbeat_gateway_upstream_errors_total{kind="tls",route="heartbeat"} '
        (count,) = [float(line[len(series) :]) for line in (await r.text()).splitlines() if line.startswith(series)]
        assert count >= 1  # (each attempt the gateway made within the worker's window)
    lines = [json.loads(line) for line in warnings.getvalue().splitlines()]
    (warning,) = [line for line in lines if line.get("event") == "upstream_unreachable"]
    assert warning["level"] == "warning"
    assert reason in warning["reason"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read"),
        ("not a certificate\n", "holds no PEM certificate"),  # (after the path)
        ("directory", "cannot read"),
        ("nul", "not a usable path"),
    ],
    ids=["missing", "not-pem", "a-directory", "nul-in-path"],
)
def test_a_ca_file_that_cannot_be_used_is_a_config_error(tmp_path: Path, content: str | None, problem: str) -> None:
    path = tmp_path / "ca.pem"
    if content == "directory":
        path.mkdir()
    elif content == "nul":
        path = tmp_path / "ca\\x00.pem"  # YAML's escape: the loaded path holds a NUL
    elif content is not None:
        path.write_text(content)
    config = config_yaml("https://api.example", f'upstream: {{tls: {{ca_files: ["{path}"]}}}}')
    with pytest.raises(ConfigError) as raised:
        load_settings(config, ENVIRON)
    assert str(raised.value).startswith("upstream.tls.ca_files[0]: ")
    assert problem in str(raised.value)


# -- through an egress proxy (a real CONNECT proxy: tinyproxy) ---------------------------------------


async def test_every_upstream_call_goes_through_the_egress_proxy_to_an_https_api(
    ca: trustme.CA,
    ca_file: str,
    make_simulator: SimFactory,
    make_gateway: GatewayFactory,
    tinyproxy: tuple[str, Path],
) -> None:
    """Before: the upstream client ignored proxies; a cluster whose egress is a proxy could not use the gateway."""
    proxy_url, proxy_log = tinyproxy
    sim = await make_simulator(tls=serving(ca, "127.0.0.1"))
    work_id = held_item(sim)
    upstream = f"upstream: {{base_url: '{sim.url}', tls: {{ca_files: ['{ca_file}']}}, proxy: {{url: '{proxy_url}'}}}}"
    gateway = await make_gateway(sim.url, upstream)
    status, body = await claim(gateway.proxy_url, work_id)
    assert status == 200, body
    async with (
        aiohttp.ClientSession(headers=worker_headers()) as http,
        http.get(f"{gateway.proxy_url}/v1/environments/{ENV_ID}/work/poll", params={"block_ms": "100"}) as r,
    ):
        assert r.status == 200, await r.text()
    host_port = sim.url.removeprefix("https://")
    tunnels = [line for line in proxy_log.read_text().splitlines() if "CONNECT" in line and host_port in line]
    assert tunnels, proxy_log.read_text()  # the TLS went through the proxy's tunnel, end to end to the API


async def test_with_the_egress_proxy_down_nothing_goes_direct(
    ca: trustme.CA, ca_file: str, make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    """Never fail open: a proxy that cannot be reached is an error the worker sees, not a direct connection."""
    sim = await make_simulator(tls=serving(ca, "127.0.0.1"))
    dead = f"http://127.0.0.1:{free_port()}"
    upstream = f"upstream: {{base_url: '{sim.url}', tls: {{ca_files: ['{ca_file}']}}, proxy: {{url: '{dead}'}}}}"
    gateway = await make_gateway(sim.url, upstream)
    status, body = await claim(gateway.proxy_url)
    error = body["error"]
    assert isinstance(error, dict)
    assert (status, error["message"]) == (502, "cannot connect to the egress proxy")
    assert sim.sim.count("heartbeat") == 0


# -- a client certificate (mTLS), rotated on disk; a server name other than the URL's host ---------


def requiring_clients(ca: trustme.CA, client_ca: trustme.CA) -> ssl.SSLContext:
    """A server that accepts only clients with a certificate from `client_ca`."""
    context = serving(ca, "127.0.0.1")
    context.verify_mode = ssl.CERT_REQUIRED
    client_ca.configure_trust(context)
    return context


def rotate(mount: Path, new: Path) -> None:
    """As the kubelet rotates a mounted Secret: the `..data` symlink swapped in one rename."""
    (mount / "..data_tmp").symlink_to(new.name)
    (mount / "..data_tmp").rename(mount / "..data")


async def test_a_client_certificate_rotated_on_disk_is_used_for_new_connections_without_a_restart(
    ca: trustme.CA,
    ca_file: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_simulator: SimFactory,
    make_gateway: GatewayFactory,
) -> None:
    """Before: no client certificate at all. Certificates rotate (cert-manager renews them before they
    expire); a gateway that read them once would start failing every call the day the old one expires."""
    monkeypatch.setattr(certificates, "CHECK_SECONDS", 0.1)
    trusted_clients, other = trustme.CA(), trustme.CA()
    sim = await make_simulator(tls=requiring_clients(ca, trusted_clients))
    # A Secret volume: tls.crt -> ..data/tls.crt, ..data -> a dated directory.
    mount = tmp_path / "secret"
    write_pair(other, mount / "2026-12-01")  # a certificate the upstream does not accept
    write_pair(trusted_clients, mount / "2026-12-07")
    (mount / "..data").symlink_to("2026-12-01")
    for name in ("tls.crt", "tls.key"):
        (mount / name).symlink_to(f"..data/{name}")
    tls = (
        f"{{ca_files: ['{ca_file}'], client_cert_file: '{mount / 'tls.crt'}', client_key_file: '{mount / 'tls.key'}'}}"
    )
    gateway = await make_gateway(sim.url, f"upstream: {{base_url: '{sim.url}', tls: {tls}}}")
    status, body = await claim(gateway.proxy_url, held_item(sim))
    assert status == 502, body  # refused by the upstream in the handshake
    rotate(mount, mount / "2026-12-07")
    deadline = time.monotonic() + 5
    while (status := (await claim(gateway.proxy_url, held_item(sim)))[0]) != 200:
        assert time.monotonic() < deadline, f"the rotated certificate was never used: {status}"
        await asyncio.sleep(0.1)


async def test_a_rotation_caught_half_way_keeps_the_loaded_pair(tmp_path: Path, ca: trustme.CA) -> None:
    cert, key = write_pair(ca, tmp_path)
    context = ssl.create_default_context()
    rotating = certificates.RotatingCertificate(context, str(cert), str(key), "test certificate")
    other = trustme.CA().issue_cert("x")
    other.cert_chain_pems[0].write_to_path(str(cert))  # the new certificate, the old key: no pair
    assert rotating.reload_if_changed() is False
    other.private_key_pem.write_to_path(str(key))
    assert rotating.reload_if_changed() is True
    assert rotating.reload_if_changed() is False  # nothing changed since


async def test_a_server_name_other_than_the_urls_host_is_verified_and_sent(
    ca: trustme.CA, ca_file: str, make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    sim = await make_simulator(tls=serving(ca, "api.internal.example"))
    tls = f"{{ca_files: ['{ca_file}'], server_name: api.internal.example}}"
    gateway = await make_gateway(sim.url, f"upstream: {{base_url: '{sim.url}', tls: {tls}}}")
    status, body = await claim(gateway.proxy_url, held_item(sim))
    assert status == 200, body


@pytest.mark.parametrize(
    ("tls", "problem"),
    [
        ("{client_cert_file: CERT}", "upstream.tls: client_cert_file and client_key_file go together"),
        ("{client_cert_file: CERT, client_key_file: OTHER_KEY}", "not a certificate and its key"),
        ("{client_cert_file: MISSING, client_key_file: KEY}", "cannot read the certificate or its key"),
    ],
)
def test_a_client_certificate_that_cannot_be_used_is_a_config_error(tmp_path: Path, tls: str, problem: str) -> None:
    ca = trustme.CA()
    cert, key = write_pair(ca, tmp_path / "one")
    _, other_key = write_pair(ca, tmp_path / "two")
    paths = {"CERT": cert, "OTHER_KEY": other_key, "MISSING": tmp_path / "missing.crt", "KEY": key}
    for name, path in paths.items():
        tls = tls.replace(name, f'"{path}"')
    with pytest.raises(ConfigError) as raised:
        load_settings(config_yaml("https://api.example", f"upstream: {{tls: {tls}}}"), ENVIRON)
    assert problem in str(raised.value)


# -- check-config --connect: the egress checked before a rollout --------------------------------------


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted-ca"])
async def test_check_config_connect_reports_what_the_configured_path_reaches(
    ca: trustme.CA, ca_file: str, tmp_path: Path, make_simulator: SimFactory, trusted: bool
) -> None:
    sim = await make_simulator(tls=serving(ca, "127.0.0.1"))
    tls = f", tls: {{ca_files: ['{ca_file}']}}" if trusted else ""
    config = tmp_path / "gateway.yaml"
    config.write_text(config_yaml(sim.url, f"upstream: {{base_url: '{sim.url}'{tls}}}"))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "check-config", "--connect", str(config),
        env={**os.environ, **ENVIRON}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output = (await asyncio.wait_for(process.communicate(), 30))[0].decode()
    assert f"upstream {sim.url} via direct" in output
    if trusted:
        assert process.returncode == 0, output
        assert "prod-sandboxes: reached, its key accepted" in output
    else:
        assert process.returncode == 1, output
        assert "prod-sandboxes: not reached: the upstream's TLS certificate was not accepted" in output
    assert ENVIRON["TEST_ENV_KEY"] not in output


# -- an https:// egress proxy that asks for credentials (PyPI proxy.py) -----------------------------------


@pytest.fixture
def proxy_py(ca: trustme.CA, tmp_path: Path) -> Iterator[Callable[[bool], str]]:
    """PyPI proxy.py, asking for `gateway:pr0xy-pass` (407 without): spoken to over TLS (its certificate from `ca`),
    or over plain HTTP."""
    binary = require("proxy", "pip install proxy.py (the test extra)")
    processes: list[subprocess.Popen[bytes]] = []

    def start(tls: bool) -> str:
        port = free_port()
        command = [binary, "--hostname", "127.0.0.1", "--port", str(port), "--num-workers", "1",
                   "--num-acceptors", "1", "--basic-auth", "gateway:pr0xy-pass"]  # fmt: skip
        if tls:
            cert, key = write_pair(ca, tmp_path / "proxy", "127.0.0.1")
            command += ["--cert-file", str(cert), "--key-file", str(key)]
        processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_listening(port, processes[-1], "proxy.py")
        return f"{'https' if tls else 'http'}://127.0.0.1:{port}"

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


async def through(
    proxy: str, ca: trustme.CA, ca_file: str, make_simulator: SimFactory, make_gateway: GatewayFactory
) -> tuple[int, dict[str, object], SimHandle]:
    sim = await make_simulator(tls=serving(ca, "127.0.0.1"))
    work_id = held_item(sim)
    gateway = await make_gateway(
        sim.url, f"upstream: {{base_url: '{sim.url}', tls: {{ca_files: ['{ca_file}']}}, proxy: {proxy}}}"
    )
    status, body = await claim(gateway.proxy_url, work_id)
    return status, body, sim


async def test_an_https_proxy_that_asks_for_credentials_carries_every_call(
    ca: trustme.CA,
    ca_file: str,
    make_simulator: SimFactory,
    make_gateway: GatewayFactory,
    monkeypatch: pytest.MonkeyPatch,
    proxy_py: Callable[[bool], str],
) -> None:
    """TLS to the proxy, then TLS through it to the API: aiohttp drops an https:// proxy it reads from the
    environment and goes direct (aio-libs/aiohttp#3075); here it is used, or the request fails."""
    monkeypatch.setitem(ENVIRON, "PROXY_AUTH", "gateway:pr0xy-pass")
    proxy = f"{{url: '{proxy_py(True)}', credentials_env: PROXY_AUTH}}"
    status, body, sim = await through(proxy, ca, ca_file, make_simulator, make_gateway)
    assert status == 200, body
    assert sim.sim.count("heartbeat") == 1


async def test_a_proxy_that_refuses_the_credentials_is_named_and_nothing_goes_direct(
    ca: trustme.CA,
    ca_file: str,
    make_simulator: SimFactory,
    make_gateway: GatewayFactory,
    proxy_py: Callable[[bool], str],
) -> None:
    # (Over plain HTTP: on a 407 from an https:// proxy, aiohttp leaves the TLS shutdown to run out its timeout.)
    status, body, sim = await through(f"{{url: '{proxy_py(False)}'}}", ca, ca_file, make_simulator, make_gateway)
    error = body["error"]
    assert isinstance(error, dict)
    assert status == 502
    assert (
        error["message"]
        == "the egress proxy refused the connection to the upstream (407: its credentials were refused)"
    )
    assert sim.sim.count("heartbeat") == 0


async def test_proxy_credentials_rotated_by_a_reload_are_used_for_the_next_connection(
    ca: trustme.CA,
    ca_file: str,
    tmp_path: Path,
    make_simulator: SimFactory,
    make_gateway: GatewayFactory,
    proxy_py: Callable[[bool], str],
) -> None:
    """The proxy's password rotates in its Secret: a SIGHUP reload takes it (with any key rotated beside it),
    where a restart-only check on the whole upstream section would refuse the reload, keys included."""
    credentials = tmp_path / "proxy-credentials"
    credentials.write_text("gateway:last-months-pass")
    sim = await make_simulator(tls=serving(ca, "127.0.0.1"))
    work_id = held_item(sim)
    upstream = (
        f"upstream: {{base_url: '{sim.url}', tls: {{ca_files: ['{ca_file}']}}, "
        f"proxy: {{url: '{proxy_py(False)}', credentials_file: '{credentials}'}}}}"
    )
    gateway = await make_gateway(sim.url, upstream)
    status, body = await claim(gateway.proxy_url, work_id)
    assert status == 502, body  # the proxy refuses last month's password
    credentials.write_text("gateway:pr0xy-pass")
    assert gateway.reload(make_settings(sim.url, upstream)) == []
    status, body = await claim(gateway.proxy_url, work_id)
    assert status == 200, body
    assert sim.sim.count("heartbeat") == 1
    # Where the credentials come from is still the restart's: another file is refused.
    moved = upstream.replace(str(credentials), str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").write_text("gateway:pr0xy-pass")
    assert gateway.reload(make_settings(sim.url, moved)) == ["upstream: changed; restart the gateway to apply it"]


async def test_an_upstream_ca_rolled_over_on_disk_is_trusted_without_a_restart(
    ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_simulator: SimFactory,
    make_gateway: GatewayFactory,
) -> None:
    """An egress that inspects TLS re-keys its CA, or a private API moves to a new one: the bundle's file gains
    it. A bundle read once would fail every upstream call until the pods restart."""
    monkeypatch.setattr(certificates, "CHECK_SECONDS", 0.1)
    old = trustme.CA()
    bundle = tmp_path / "ca.crt"
    old.cert_pem.write_to_path(str(bundle))
    sim = await make_simulator(tls=serving(ca, "127.0.0.1"))  # already serving from the new CA
    gateway = await make_gateway(sim.url, f"upstream: {{base_url: '{sim.url}', tls: {{ca_files: ['{bundle}']}}}}")
    status, body = await claim(gateway.proxy_url, held_item(sim))
    assert status == 502, body
    bundle.write_bytes(old.cert_pem.bytes() + ca.cert_pem.bytes())
    deadline = time.monotonic() + 5
    while (status := (await claim(gateway.proxy_url, held_item(sim)))[0]) != 200:
        assert time.monotonic() < deadline, f"the new CA was never trusted: {status}"
        await asyncio.sleep(0.1)
