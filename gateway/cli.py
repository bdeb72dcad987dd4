"""Command line: `heartbeat-gateway serve | check-config | simulate-upstream | demo`.

Exit codes: 0 success, 1 runtime failure (e.g. a port in use), 2 invalid
configuration or arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.config.load import ConfigError, load_settings_file
from gateway.config.settings import LoggingSettings, Settings
from gateway.edge.server import LISTEN_BACKLOG, descriptor_budget, raise_descriptor_limit
from gateway.observability.logs import configure_logging
from gateway.policy.credentials import environment_key
from gateway.policy.headers import request_headers
from gateway.upstream.client import UpstreamRequest, fetch

from . import __version__
from . import loop as event_loop
from .app import Gateway, egress_route, tracing_problems, upstream_client
from .errors import UpstreamError

if TYPE_CHECKING:
    from .simulator import Faults, SimulatorConfig

__all__ = ["main"]

log = logging.getLogger("gateway")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
# The collector's thresholds while serving (CPython's defaults: 700, 10, 10).
GC_THRESHOLDS = (50_000, 20, 100)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command: str = args.command
    if command == "serve":
        return _serve(args.config)
    if command == "check-config":
        return _check_config(args.path, connect=args.connect)
    if command == "simulate-upstream":
        return _simulate(args)
    if args.bad_day:
        from gateway.demo.bad_day import run_bad_day

        return run_bad_day(workers=args.workers, as_json=args.json)
    from .demo import run_demo

    return run_demo(duration=args.duration, workers=args.workers, as_json=args.json)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heartbeat-gateway",
        description="A lease-safe reverse proxy between Managed Agents workers and the environments API.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy and admin ports until SIGTERM/SIGINT")
    serve.add_argument("--config", required=True, metavar="PATH", help="YAML config file")

    check = sub.add_parser(
        "check-config",
        help="validate a config file; exit 2 listing every problem",
        description="Validate a config file and the secrets it names; exit 0 with a summary, or 2 listing every "
        "problem as key.path: problem. Never prints a secret.",
    )
    check.add_argument("path", metavar="PATH", help="YAML config file")
    check.add_argument(
        "--connect",
        action="store_true",
        help="also make one real request to the upstream, through the configured proxy and TLS, with each "
        "environment's key, and report what answered (exit 1 if the upstream cannot be reached)",
    )

    sim = sub.add_parser(
        "simulate-upstream",
        help="run the environments API simulator",
        description="A stand-in for the environments and sessions API, for trying workers and the gateway offline.",
    )
    sim.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    sim.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    sim.add_argument(
        "--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (PEM, chain included), as the API does"
    )
    sim.add_argument("--tls-key", metavar="FILE", help="the key of --tls-cert (PEM)")
    sim.add_argument(
        "--ttl", type=_positive_int, default=60, help="default lease TTL in seconds (default: %(default)s)"
    )
    sim.add_argument(
        "--min-ttl", type=_positive_int, default=1, help="smallest desired_ttl_seconds honoured (default: %(default)s)"
    )
    sim.add_argument(
        "--max-ttl", type=_positive_int, default=600, help="largest desired_ttl_seconds honoured (default: %(default)s)"
    )
    sim.add_argument(
        "--environment",
        action="append",
        metavar="ID=KEY_ENV",
        help="an environment and the variable holding its key, repeatable (default: env_sim=SIM_ENVIRONMENT_KEY)",
    )
    sim.add_argument(
        "--work-items", type=int, default=0, metavar="N", help="queue N items per environment at start (default: 0)"
    )
    sim.add_argument("--issue-secrets", action="store_true", help="hand out per-item sessions tokens on poll")
    sim.add_argument(
        "--org-key-env",
        metavar="NAME",
        help="a variable holding an organisation API key the simulator accepts (stats, stop, sessions, ...)",
    )
    sim.add_argument(
        "--tool-command",
        action="append",
        metavar="CMD",
        help="a bash command the scripted agent asks each session's worker to run, repeatable (default: echo hello)",
    )
    sim.add_argument("--skill", action="append", metavar="ID", help="give the agent this custom skill; repeatable")
    sim.add_argument("--memory-store", action="store_true", help="attach a memory store to every session")
    sim.add_argument("--terminate-sessions", action="store_true", help="terminate each session once its turn ends")
    sim.add_argument("--latency", type=float, default=0.0, metavar="SECONDS", help="delay every answer (default: 0)")
    sim.add_argument("--error-rate", type=float, default=0.0, metavar="P", help="fraction answered 500 (default: 0)")
    sim.add_argument(
        "--rate-limit-rate", type=float, default=0.0, metavar="P", help="fraction answered 429 (default: 0)"
    )
    sim.add_argument(
        "--retry-after", type=int, default=1, metavar="SECONDS", help="retry-after on 429s (default: %(default)s)"
    )
    sim.add_argument(
        "--reset-rate", type=float, default=0.0, metavar="P", help="fraction whose connection is reset (default: 0)"
    )
    sim.add_argument("--reset-after-apply", action="store_true", help="reset after the request took effect")
    sim.add_argument(
        "--fault-endpoints", default="", metavar="LIST", help="comma-separated endpoints to affect (default: all)"
    )
    sim.add_argument("--seed", type=int, default=None, help="seed for fault decisions (default: random)")

    demo = sub.add_parser("demo", help="run simulator, gateway and simulated SDK workers together")
    demo.add_argument("--duration", type=float, default=20.0, help="seconds to run; 0 runs until Ctrl-C (20)")
    demo.add_argument("--workers", type=_positive_int, default=8, help="simulated workers (8)")
    demo.add_argument("--json", action="store_true", help="end with one JSON summary line")
    demo.add_argument(
        "--bad-day",
        action="store_true",
        help="the same fleet direct and through the gateway while the API slows, rate-limits and drops (38 s)",
    )
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _load(path: str) -> Settings | None:
    try:
        settings = load_settings_file(path, os.environ)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None
    unusable = tracing_problems(settings, os.environ)
    for line in unusable:
        print(line, file=sys.stderr)
    return None if unusable else settings


def _check_config(path: str, *, connect: bool = False) -> int:
    settings = _load(path)
    if settings is None:
        return EXIT_USAGE
    print(settings.summary())
    if connect:
        return event_loop.run(lambda: _probe_upstream(settings))
    return EXIT_OK


async def _probe_upstream(settings: Settings) -> int:
    """One request per environment, the way the gateway will make it: the egress, TLS, and the key."""
    upstream = upstream_client(settings)
    print(f"upstream {settings.upstream.base_url} via {upstream.egress.shown}")
    reached = True
    try:
        for environment in settings.environments:
            headers = request_headers([], credential=environment_key(environment), settings=settings.headers)
            request = UpstreamRequest("GET", f"/v1/environments/{environment.id}", tuple(headers), timeout=30.0)
            try:
                answer = await fetch(upstream, request, max_bytes=1 << 20)
            except UpstreamError as exc:
                print(f"  {environment.label}: not reached: {exc.message}")
                reached = False
                continue
            verdict = "its key accepted" if answer.status == 200 else f"answered {answer.status} {answer.reason}"
            print(f"  {environment.label}: reached, {verdict}")
    finally:
        await upstream.close()
    return EXIT_OK if reached else EXIT_FAILURE


def _scrubbed(settings: Settings) -> tuple[str, ...]:
    """What the log scrubber hides: the config's secrets, and a password the environment's proxy URL
    carries (`HTTPS_PROXY=http://user:pass@host`)."""
    credentials = egress_route(settings).credentials
    egress = () if credentials is None else tuple(c for c in (credentials[1], ":".join(credentials)) if c)
    return (*settings.secret_values(), *egress)


def _serve(path: str) -> int:
    settings = _load(path)
    if settings is None:
        return EXIT_USAGE
    configure_logging(settings.logging, _scrubbed(settings))
    try:
        event_loop.run(lambda: _serve_until_signal(settings, path))
    except OSError as exc:
        log.error("cannot start: %s", exc.strerror or exc)
        return EXIT_FAILURE
    return EXIT_OK


async def _serve_until_signal(settings: Settings, path: str) -> None:
    soft, _ = raise_descriptor_limit()
    gateway = Gateway(settings)
    await gateway.start()
    # Everything built so far lives as long as the process: keep it out of the
    # collector's way, so full collections stay short (they set the tail latency).
    gc.freeze()
    # Far fewer collections: each request allocates much, and with thousands of open
    # connections a collection of the older generations stalls every request behind it
    # (docs/benchmarks.md: heartbeat p99 under a fleet's load fell from 435 to 113 ms).
    gc.set_threshold(*GC_THRESHOLDS)
    log.info(
        "serving: %s",
        settings.summary().removeprefix("ok: "),
        extra={
            "fields": {
                "event": "started",
                "proxy": gateway.proxy_url,
                "admin": gateway.admin_url,
                "event_loop": event_loop.loop_name(),
                "file_descriptors": soft,
                "max_client_connections": min(settings.limits.max_client_connections, descriptor_budget()),
                "upstream_via": egress_route(settings).shown,
                "tracing": settings.tracing.enabled,
            }
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, gateway, path)
    await stop.wait()
    log.info(
        "draining: no new connections; in-flight requests have %.0f s",
        settings.limits.shutdown_grace_seconds,
        extra={"fields": {"event": "draining"}},
    )
    await gateway.stop()
    log.info("stopped", extra={"fields": {"event": "stopped"}})


def _reload(gateway: Gateway, path: str) -> None:
    """SIGHUP: read the config again; apply it if it is valid and needs no restart, else keep the old one."""
    try:
        settings = load_settings_file(path, os.environ)
    except ConfigError as exc:
        gateway.reload_failed()
        for problem in exc.problems:
            log.error("reload refused: %s", problem, extra={"fields": {"event": "reload_failed"}})
        return
    old_secrets = gateway.settings.secret_values()
    refusals = gateway.reload(settings)
    for refusal in refusals:
        log.error("reload refused: %s", refusal, extra={"fields": {"event": "reload_failed"}})
    if not refusals:
        # New secrets must be scrubbed too (and rotated-out ones still are); the level may have changed.
        configure_logging(settings.logging, (*old_secrets, *_scrubbed(settings)))
        summary = settings.summary().removeprefix("ok: ")
        log.info("config reloaded: %s", summary, extra={"fields": {"event": "reloaded"}})


def _simulator_config(args: argparse.Namespace) -> SimulatorConfig:
    from .simulator import AgentScript, SimulatorConfig, TtlPolicy

    if not args.min_ttl <= args.ttl <= args.max_ttl:
        raise _Usage("simulate-upstream: --ttl must lie between --min-ttl and --max-ttl")
    script = AgentScript(
        commands=tuple(args.tool_command) if args.tool_command else AgentScript().commands,
        terminate_after_turn=args.terminate_sessions,
        skills=tuple(args.skill or ()),
        memory_store=args.memory_store,
    )
    return SimulatorConfig(
        environments=_simulator_environments(args.environment or ["env_sim=SIM_ENVIRONMENT_KEY"]),
        ttl=TtlPolicy(args.ttl, args.min_ttl, args.max_ttl),
        faults=_simulator_faults(args),
        org_api_keys=(_secret_from(args.org_key_env, "--org-key-env: environment variable {var} is not set"),)
        if args.org_key_env
        else (),
        issue_secrets=args.issue_secrets,
        script=script,
        seed=args.seed,
    )


def _simulator_environments(specs: list[str]) -> dict[str, str]:
    environments: dict[str, str] = {}
    for spec in specs:
        env_id, sep, var = spec.partition("=")
        if not sep or not env_id or not var:
            raise _Usage(f"--environment {spec}: expected ID=KEY_ENV")
        message = f"--environment {env_id}: environment variable {{var}} (the key of {env_id}) is not set"
        environments[env_id] = _secret_from(var, message)
    return environments


def _secret_from(var: str, missing: str) -> str:
    value = os.environ.get(var, "").strip()
    if not value:
        raise _Usage(missing.format(var=var))
    return value


def _simulator_faults(args: argparse.Namespace) -> Faults:
    from .simulator import Faults, FaultsError

    try:
        return Faults(
            latency_seconds=args.latency,
            error_rate=args.error_rate,
            rate_limit_rate=args.rate_limit_rate,
            retry_after_seconds=args.retry_after,
            reset_rate=args.reset_rate,
            reset_after_apply=args.reset_after_apply,
            endpoints=tuple(e for e in args.fault_endpoints.split(",") if e),
        )
    except FaultsError as exc:
        raise _Usage(f"simulate-upstream: {exc}") from None


def _simulator_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise _Usage("simulate-upstream: --tls-cert and --tls-key go together")
    if args.tls_cert is None:
        return None
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ValueError) as exc:
        raise _Usage(f"simulate-upstream: --tls-cert/--tls-key: {exc}") from None
    return tls


class _Usage(Exception):
    """A command-line mistake: printed as it is, exit status 2."""


def _simulate(args: argparse.Namespace) -> int:
    # Imported here: serving the gateway never loads the simulator.
    from .simulator import SIMULATOR, create_simulator_app

    configure_logging(LoggingSettings("info", "text"), ())
    try:
        config = _simulator_config(args)
        tls = _simulator_tls(args)
    except _Usage as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    environments = config.environments
    app = create_simulator_app(config)
    if args.work_items:
        for env_id in environments:
            app[SIMULATOR].enqueue(env_id, count=args.work_items)
    print(
        f"simulator on {'https' if tls else 'http'}://{args.host}:{args.port} serving {', '.join(environments)}; "
        f"default TTL {args.ttl} s; GET /_sim/stats for counts",
        flush=True,
    )
    try:
        # The real API sits behind load balancers that take a fleet's connections at once: so does
        # the simulator, or a start-up storm sent direct would wait for SYN retries the API never causes.
        web.run_app(
            app,
            host=args.host,
            port=args.port,
            backlog=LISTEN_BACKLOG,
            ssl_context=tls,
            print=None,
            access_log=None,
            loop=event_loop.new_event_loop(),
        )
    except OSError as exc:
        print(f"simulate-upstream: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK
