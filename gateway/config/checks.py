"""Checks that need more than one value, once the settings are read. Pure but for reading the files named.

Each takes a `problem(path, message)` to report to: the reader collects
every problem of a config and refuses it with all of them at once.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping

from gateway.heartbeat.worker_model import absorption_blocker
from gateway.policy.egress import EgressError, has_credentials, is_loopback_url, proxy_route

from .settings import ListenAddress, Settings

__all__ = ["ca_file", "check_settings", "join_path", "os_reason"]

Report = Callable[[str, str], None]


def check_settings(settings: Settings, environ: Mapping[str, str], problem: Report) -> None:
    check_ports(settings.listen, settings.admin, problem)
    check_distinct_secrets(settings, problem)
    check_absorption(settings, problem)
    check_overload(settings, problem)
    check_egress(settings, environ, problem)
    check_client_certificate(settings, problem)
    check_server_tls(settings, problem)


def check_ports(listen: ListenAddress, admin: ListenAddress, problem: Report) -> None:
    wildcard = "0.0.0.0" in (listen.host, admin.host) or "::" in (listen.host, admin.host)
    if listen.port and listen.port == admin.port and (listen.host == admin.host or wildcard):
        problem("admin.port", "must differ from listen.port: the admin API must not share the worker port")


def check_absorption(settings: Settings, problem: Report) -> None:
    """Absorption that could never answer an SDK worker's beat is a config error, not a silent no-op.

    Only configured TTLs can be judged: without one, the lease is the API's default (the SDK
    workers send none) and the core's own rule decides beat by beat.
    """
    heartbeat = settings.heartbeat
    absorb = heartbeat.absorb
    if not absorb.enabled:
        return
    # Each environment's lease as configured: its own TTL, else the global one (None: the API's default).
    leases = [
        (f"environments[{i}].heartbeat", env.heartbeat.desired_ttl_seconds)
        if env.heartbeat.desired_ttl_seconds is not None
        else ("heartbeat", heartbeat.desired_ttl_seconds)
        for i, env in enumerate(settings.environments)
    ]
    if any(ttl is None for _, ttl in leases):
        return  # a lease of unknown length: the core judges each beat
    # Absorption is one switch for every environment: a lease too short to absorb is simply forwarded,
    # so the config is refused only when no environment's lease could ever be absorbed.
    blockers = {
        path: absorption_blocker(ttl, absorb.max_signal_delay_seconds, absorb.min_remaining_fraction)
        for path, ttl in leases
        if ttl is not None
    }
    if all(blocker is not None for blocker in blockers.values()):
        for path, blocker in blockers.items():
            assert blocker is not None
            key, why = blocker
            problem(f"{path}.{key}" if key == "desired_ttl_seconds" else f"heartbeat.absorb.{key}", why)


def check_overload(settings: Settings, problem: Report) -> None:
    overload = settings.overload
    if overload.shed_requests_lag_seconds < overload.shed_polls_lag_seconds:
        problem(
            "overload.shed_requests_lag_seconds",
            "must not be below overload.shed_polls_lag_seconds: polls are shed first, then requests",
        )


def check_client_certificate(settings: Settings, problem: Report) -> None:
    tls = settings.upstream.tls
    check_pair(
        "upstream.tls", "client_cert_file", tls.client_cert_file, "client_key_file", tls.client_key_file, problem
    )


def check_server_tls(settings: Settings, problem: Report) -> None:
    for name, address in (("listen", settings.listen), ("admin", settings.admin)):
        tls, path = address.tls, f"{name}.tls"
        check_pair(path, "cert_file", tls.cert_file, "key_file", tls.key_file, problem)
        if tls.client_ca_file is not None:
            if tls.cert_file is None:
                problem(join_path(path, "client_ca_file"), "needs cert_file and key_file: TLS first")
            else:
                ca_file(tls.client_ca_file, join_path(path, "client_ca_file"), problem)


def check_pair(path: str, cert_key: str, cert: str | None, key_key: str, key: str | None, problem: Report) -> None:
    """A certificate and its key: both or neither, and a pair that loads."""
    if (cert is None) != (key is None):
        problem(path, f"{cert_key} and {key_key} go together")
        return
    if cert is None or key is None:
        return
    try:
        ssl.create_default_context().load_cert_chain(cert, key)
    except ssl.SSLError as exc:  # an OSError too: first
        problem(join_path(path, cert_key), f"not a certificate and its key: {exc.reason or exc}")
    except (OSError, ValueError) as exc:
        problem(join_path(path, cert_key), f"cannot read the certificate or its key: {os_reason(exc)}")


def check_egress(settings: Settings, environ: Mapping[str, str], problem: Report) -> None:
    """A proxy the gateway cannot use is refused here, never dropped for a direct connection."""
    upstream = settings.upstream
    if (
        upstream.base_url.startswith("http://")
        and not is_loopback_url(upstream.base_url)
        and not upstream.allow_insecure_http
    ):
        problem(
            "upstream.base_url",
            "http:// sends the environment keys in clear (and past any proxy on the way); use https://, "
            "a loopback address, or set upstream.allow_insecure_http: true",
        )
    proxy = upstream.proxy
    if proxy.url is not None and has_credentials(proxy.url):
        problem(
            "upstream.proxy.url",
            "holds credentials; secrets never go in the config: use credentials_env or credentials_file",
        )
    try:
        proxy_route(settings.upstream.base_url, proxy.url, proxy.from_environment, environ)
    except EgressError as exc:
        problem("upstream.proxy", str(exc))
    except ValueError:
        pass  # the base URL itself: upstream.base_url's own problem says so
    if proxy.credentials is not None and ":" not in proxy.credentials.value:
        problem("upstream.proxy.credentials", "must be user:password")


def check_distinct_secrets(settings: Settings, problem: Report) -> None:
    """A client token equal to a real key would hand that key to every worker."""
    real: dict[str, str] = {}
    for i, env in enumerate(settings.environments):
        real.setdefault(env.key.value, f"environments[{i}]")
    if settings.default_credential.api_key is not None:
        real.setdefault(settings.default_credential.api_key.value, "default_credential")
    for i, token in enumerate(settings.clients.tokens):
        if token.token.value and token.token.value in real:
            problem(f"clients.tokens[{i}]", f"holds the same value as the key of {real[token.token.value]}")


def ca_file(file_path: str, path: str, problem: Report) -> None:
    """A PEM bundle of certificate authorities, as the upstream client will load it."""
    try:
        ssl.create_default_context().load_verify_locations(cafile=file_path)
    except ssl.SSLError:  # an OSError too: first
        problem(path, f"{file_path} holds no PEM certificate")
    except (OSError, ValueError) as exc:
        problem(path, f"cannot read {file_path}: {os_reason(exc)}")


def os_reason(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(exc, ValueError):
        return "not a usable path"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def join_path(path: str, key: str) -> str:
    """A setting's path in messages: `upstream.tls.ca_files`."""
    return f"{path}.{key}" if path else key
