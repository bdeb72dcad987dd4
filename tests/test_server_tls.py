"""TLS on the worker-facing port (and the admin port): certificates that rotate, client certificates required.

Checks `gateway/certificates.py`.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiohttp
import pytest
import trustme

from gateway import certificates
from gateway.config.load import ConfigError, load_settings

from .support import ENV_ID, ENVIRON, GatewayFactory, SimFactory, config_yaml, held_item, worker_headers
from .test_upstream_tls import rotate
from .tools import write_pair


def trusting(ca: trustme.CA, client: trustme.LeafCert | None = None) -> ssl.SSLContext:
    """A worker's TLS: trusting the gateway's CA (as `SSL_CERT_FILE` or `NODE_EXTRA_CA_CERTS` make it)."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if client is not None:
        client.configure_cert(context)
    return context


def secret_volume(ca: trustme.CA, mount: Path, *versions: str) -> None:
    """A Secret mounted as a volume: tls.crt -> ..data/tls.crt, ..data -> the first version's directory."""
    for version in versions:
        write_pair(ca, mount / version, "127.0.0.1")
    (mount / "..data").symlink_to(versions[0])
    for name in ("tls.crt", "tls.key"):
        (mount / name).symlink_to(f"..data/{name}")


async def claim(http: aiohttp.ClientSession, gateway_url: str, work_id: str, tls: ssl.SSLContext) -> int:
    url = f"{gateway_url}/v1/environments/{ENV_ID}/work/{work_id}/heartbeat"
    params = {"expected_last_heartbeat": "NO_HEARTBEAT"}
    async with http.post(url, params=params, headers=worker_headers(), ssl=tls) as r:
        return r.status


async def served_certificate(gateway_url: str, tls: ssl.SSLContext) -> bytes:
    host, port = gateway_url.removeprefix("https://").split(":")
    _, writer = await asyncio.open_connection(host, int(port), ssl=tls)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert isinstance(der, bytes)
        return der
    finally:
        writer.close()


async def test_workers_reach_the_gateway_over_tls_and_a_rotated_certificate_drops_no_open_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    """Before: the worker port spoke plain HTTP only, so client tokens crossed the cluster in clear."""
    monkeypatch.setattr(certificates, "CHECK_SECONDS", 0.1)
    ca, mount = trustme.CA(), tmp_path / "secret"
    secret_volume(ca, mount, "v1", "v2")
    sim = await make_simulator()
    tls = f"{{cert_file: '{mount / 'tls.crt'}', key_file: '{mount / 'tls.key'}'}}"
    gateway = await make_gateway(sim.url, f"listen: {{host: 127.0.0.1, port: 0, tls: {tls}}}")
    assert gateway.proxy_url.startswith("https://")
    worker = trusting(ca)
    before = await served_certificate(gateway.proxy_url, worker)
    async with aiohttp.ClientSession() as http:  # one keep-alive connection, open across the rotation
        assert await claim(http, gateway.proxy_url, held_item(sim), worker) == 200
        rotate(mount, mount / "v2")
        deadline = asyncio.get_running_loop().time() + 5
        while await served_certificate(gateway.proxy_url, worker) == before:
            assert asyncio.get_running_loop().time() < deadline, "the rotated certificate was never served"
            await asyncio.sleep(0.1)
        assert await claim(http, gateway.proxy_url, held_item(sim), worker) == 200  # the open connection lives on
    # Plain HTTP on the TLS port is refused, not served.
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            await claim(http, gateway.proxy_url.replace("https://", "http://"), held_item(sim), worker)


async def test_a_worker_port_that_requires_client_certificates_refuses_a_worker_without_one(
    tmp_path: Path, make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    ca, clients = trustme.CA(), trustme.CA()
    secret_volume(ca, tmp_path / "server", "v1")  # a certificate for the address workers use
    cert, key = tmp_path / "server" / "tls.crt", tmp_path / "server" / "tls.key"
    clients_file = tmp_path / "clients.pem"
    clients.cert_pem.write_to_path(str(clients_file))
    sim = await make_simulator()
    tls = f"{{cert_file: '{cert}', key_file: '{key}', client_ca_file: '{clients_file}'}}"
    gateway = await make_gateway(sim.url, f"listen: {{host: 127.0.0.1, port: 0, tls: {tls}}}")
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            await claim(http, gateway.proxy_url, held_item(sim), trusting(ca))
        status = await claim(http, gateway.proxy_url, held_item(sim), trusting(ca, clients.issue_cert("worker-1")))
        assert status == 200


async def test_a_client_ca_rolled_over_in_its_secret_admits_the_new_workers_and_keeps_the_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    """cert-manager rolls the workers' CA: the Secret's ca.crt gains the new CA beside the old. A CA read once
    would refuse every worker with a new certificate until the pods restart, and their leases would lapse."""
    monkeypatch.setattr(certificates, "CHECK_SECONDS", 0.1)
    ca, old_clients, new_clients = trustme.CA(), trustme.CA(), trustme.CA()
    secret_volume(ca, tmp_path / "server", "v1")
    cert, key = tmp_path / "server" / "tls.crt", tmp_path / "server" / "tls.key"
    mount = tmp_path / "clients"
    for version, cas in (("v1", [old_clients]), ("v2", [old_clients, new_clients])):
        (mount / version).mkdir(parents=True)
        (mount / version / "ca.crt").write_bytes(b"".join(c.cert_pem.bytes() for c in cas))
    (mount / "..data").symlink_to("v1")
    (mount / "ca.crt").symlink_to("..data/ca.crt")
    sim = await make_simulator()
    tls = f"{{cert_file: '{cert}', key_file: '{key}', client_ca_file: '{mount / 'ca.crt'}'}}"
    gateway = await make_gateway(sim.url, f"listen: {{host: 127.0.0.1, port: 0, tls: {tls}}}")
    old_worker, new_worker = (trusting(ca, c.issue_cert("worker")) for c in (old_clients, new_clients))
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            await claim(http, gateway.proxy_url, held_item(sim), new_worker)
        rotate(mount, mount / "v2")
        deadline = asyncio.get_running_loop().time() + 5
        while True:
            try:
                assert await claim(http, gateway.proxy_url, held_item(sim), new_worker) == 200
                break
            except aiohttp.ClientError:
                assert asyncio.get_running_loop().time() < deadline, "the new client CA was never trusted"
                await asyncio.sleep(0.1)
        assert await claim(http, gateway.proxy_url, held_item(sim), old_worker) == 200


def test_a_ca_bundle_that_does_not_load_keeps_the_cas_loaded(tmp_path: Path) -> None:
    ca = trustme.CA()
    bundle = tmp_path / "ca.crt"
    ca.cert_pem.write_to_path(str(bundle))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_verify_locations(cafile=str(bundle))
    trust = certificates.RotatingTrust(context, (str(bundle),), "test client CA")
    bundle.write_text("-----BEGIN CERTIFICATE-----\nhalf a rotation")
    assert trust.reload_if_changed() is False
    assert len(context.get_ca_certs()) == 1  # only the CA loaded at start
    trustme.CA().cert_pem.write_to_path(str(bundle))
    assert trust.reload_if_changed() is True
    assert len(context.get_ca_certs()) == 2  # the new CA beside the old: a store only grows
    assert trust.reload_if_changed() is False  # nothing changed since


@pytest.mark.parametrize(
    ("tls", "problem"),
    [
        ("{cert_file: CERT}", "listen.tls: cert_file and key_file go together"),
        ("{client_ca_file: CERT}", "listen.tls.client_ca_file: needs cert_file and key_file"),
        ("{cert_file: CERT, key_file: OTHER_KEY}", "listen.tls.cert_file: not a certificate and its key"),
    ],
)
def test_a_listening_tls_setting_that_cannot_work_is_a_config_error(tmp_path: Path, tls: str, problem: str) -> None:
    ca = trustme.CA()
    cert, _ = write_pair(ca, tmp_path / "one")
    _, other_key = write_pair(ca, tmp_path / "two")
    for name, path in {"CERT": cert, "OTHER_KEY": other_key}.items():
        tls = tls.replace(name, f'"{path}"')
    with pytest.raises(ConfigError) as raised:
        load_settings(config_yaml("https://api.example", f"listen: {{host: 0.0.0.0, port: 8080, tls: {tls}}}"), ENVIRON)
    assert problem in str(raised.value)


def handshake_ok(server: ssl.SSLContext, ca: trustme.CA) -> bool:
    """A TLS handshake in memory against `server`, from a client trusting `ca`."""
    client = ssl.create_default_context()
    ca.configure_trust(client)
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_client = client.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    tls_server = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, side in (("client", tls_client), ("server", tls_server)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError:
                    return False
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return True
    return False


def test_a_swap_that_fails_half_way_keeps_the_port_serving_the_last_good_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenSSL drops the old key as soon as a load starts: a pair that changed between the check and the load
    (a non-atomic writer, two swaps in a row) must not leave the port unable to finish a handshake."""
    ca, mount = trustme.CA(), tmp_path / "secret"
    secret_volume(ca, mount, "v1", "v2")
    _, (rotating,) = certificates.server_context(str(mount / "tls.crt"), str(mount / "tls.key"), None, "test port")
    assert isinstance(rotating, certificates.RotatingCertificate)
    assert handshake_ok(rotating.context, ca)
    real_load = certificates._load
    mismatched = ((mount / "v2" / "tls.crt").read_bytes(), (mount / "v1" / "tls.key").read_bytes())

    def changed_under_the_load(context: ssl.SSLContext, pair: tuple[bytes, bytes]) -> None:
        if context is rotating.context and pair != mismatched and not calls:
            calls.append(pair)
            real_load(context, mismatched)  # what the live context reads is no longer what was checked
        real_load(context, pair)

    calls: list[tuple[bytes, bytes]] = []
    monkeypatch.setattr(certificates, "_load", changed_under_the_load)
    rotate(mount, mount / "v2")
    assert rotating.reload_if_changed() is False
    assert handshake_ok(rotating.context, ca)  # the last good pair, loaded again
