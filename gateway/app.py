"""The composition root: the one place the gateway's parts are built and wired.

`Gateway` owns two aiohttp apps on two ports, the worker-facing proxy and
the admin API, their runners, and the objects they share: the settings, the
metrics registry, and (once the event loop runs) the upstream client and the
heartbeat service. Tests and the demo build it with their own upstream;
`serve` builds it from the config alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.config.settings import LiveSettings, PoolName, Settings, restart_needed
from gateway.edge.admin import Health, create_admin_app
from gateway.edge.middleware import access_log_middleware, error_middleware, tracing_middleware
from gateway.edge.overload import Governor, LagProbe, PollHold, cpu_capacity
from gateway.edge.polls import PollAdmission
from gateway.edge.proxy import INFLIGHT, PROXY, InFlight, ProxyContext, handle
from gateway.edge.server import LISTEN_BACKLOG, GatewayAppRunner, descriptor_budget
from gateway.heartbeat.driver import CoalescingHeartbeats, DirectHeartbeats, HeartbeatService
from gateway.heartbeat.table import LeaseView, TableCounts
from gateway.observability.metrics import GatewayMetrics
from gateway.observability.otel_environment import otel_environment_problems
from gateway.policy.credentials import RetiredTokens
from gateway.policy.egress import ProxyRoute, proxy_route
from gateway.policy.links import Links
from gateway.policy.plan import CurrentPolicy
from gateway.upstream.capacity import Gate
from gateway.upstream.client import HttpUpstream, Upstream
from gateway.upstream.discovery import SessionDiscovery

from .certificates import server_context
from .tasks import Tasks

if TYPE_CHECKING:
    # Only imported when tracing is on (`tracing_from_environment`): off, OpenTelemetry is never loaded.
    from gateway.observability.tracing import Tracing

__all__ = ["HELD_POLLS", "Gateway", "create_proxy_app", "tracing_from_environment", "tracing_problems"]

HELD_POLLS = web.AppKey("held_polls", PollHold)

# What is still running when the grace period ends is cut within this.
CUT_SECONDS = 0.1


@dataclass(slots=True)
class _Running:
    """What exists only while the proxy app runs, for the admin app to read."""

    heartbeats: HeartbeatService | None = None

    def leases(self) -> list[LeaseView]:
        return self.heartbeats.leases() if self.heartbeats is not None else []

    def table_counts(self) -> TableCounts:
        return self.heartbeats.table_counts() if self.heartbeats is not None else ({}, {})


def create_proxy_app(
    settings: Settings | LiveSettings,
    *,
    health: Health | None = None,
    metrics: GatewayMetrics | None = None,
    upstream: Upstream | None = None,
    heartbeats: HeartbeatService | None = None,
    running: _Running | None = None,
    retired: RetiredTokens | None = None,
    tracing: Tracing | None = None,
) -> web.Application:
    """The worker-facing app. Without `upstream`, one `HttpUpstream` is opened for the app's lifetime.

    With `tracing`, every request is a server span and every upstream exchange a client span; the app
    closes it (the last spans sent) when it stops.
    """
    live = settings if isinstance(settings, LiveSettings) else LiveSettings(settings)
    settings = live.current
    health = health or Health()
    metrics = metrics or GatewayMetrics(settings)
    running = running or _Running()
    retired = retired or RetiredTokens()
    # Middleware order: the access log wraps the error renderer, so it logs the status the client got;
    # the span, when tracing, sits between them (it sees that status; the access log sees the span).
    middlewares: list[Middleware] = [access_log_middleware, error_middleware]
    if tracing is not None:
        middlewares.insert(1, tracing_middleware(tracing))
        tracing.redactor = lambda: live.redactor  # every secret held since start, rotated-out ones too
    app = web.Application(middlewares=middlewares)
    app[INFLIGHT] = InFlight()

    background = Tasks()
    # Shed polls held for their null: a drain answers them at once (`Gateway.stop`).
    held_polls = app[HELD_POLLS] = PollHold()

    async def upstream_lifecycle(app: web.Application) -> AsyncIterator[None]:
        # A class sized by the worker connections gets one for each the replica can accept.
        clients = min(settings.limits.max_client_connections, descriptor_budget())
        pools = settings.upstream.pools
        gates = {p: Gate(p, pools.of(p), client_connections=clients, observer=metrics) for p in PoolName}
        metrics.track_pools(lambda: {p: (gate.in_use, gate.queued) for p, gate in gates.items()})
        up = upstream or HttpUpstream(
            settings.upstream,
            observer=metrics,
            gates=gates,
            egress=egress_route(settings),
            proxy=lambda: live.current.upstream.proxy,
        )
        health.lease_capacity_waiting = gates[PoolName.LEASE].saturated_for
        traced = up if tracing is None else tracing.traced(up)
        for rotating in up.rotating if isinstance(up, HttpUpstream) else ():
            background.spawn(rotating.watch(), name="upstream-tls-files")
        governor = Governor(lambda: live.current.overload, cpu_capacity=cpu_capacity())
        health.overloaded = lambda: governor.refusing
        background.spawn(LagProbe(governor, metrics).run(), name="overload-lag-probe")
        service = heartbeats or _heartbeat_service(settings, traced, metrics, tracing)
        links = Links()
        discovery = SessionDiscovery(traced, links, observer=metrics)
        polls = PollAdmission(lambda: live.current.polls, observer=metrics)
        app[PROXY] = ProxyContext(
            live, CurrentPolicy(live), traced, service, metrics, links, discovery, retired, polls, governor, held_polls
        )
        running.heartbeats = service
        health.upstream_ready = True
        try:
            yield
        finally:
            health.upstream_ready = False
            health.overloaded = lambda: False
            await background.close()
            running.heartbeats = None
            await discovery.close()
            await service.close()
            if upstream is None:
                await up.close()
            if tracing is not None:
                await tracing.close()

    app.cleanup_ctx.append(upstream_lifecycle)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def _heartbeat_service(
    settings: Settings, upstream: Upstream, metrics: GatewayMetrics, tracing: Tracing | None
) -> HeartbeatService:
    if not settings.heartbeat.coalesce:
        return DirectHeartbeats(upstream)
    return CoalescingHeartbeats(
        upstream, settings.heartbeat, label=metrics.environment, observer=metrics, tracing=tracing
    )


def tracing_problems(settings: Settings, environ: Mapping[str, str]) -> list[str]:
    """Why tracing cannot start as configured (checked with the config, before anything listens)."""
    if not settings.tracing.enabled:
        return []
    problems = [f"tracing.enabled: {problem}" for problem in otel_environment_problems(environ)]
    if problems:
        return problems  # OpenTelemetry's import reads some of them, and raises on what it cannot use
    try:
        import gateway.observability.tracing  # noqa: F401
    except ImportError:
        return ["tracing.enabled: true needs OpenTelemetry: pip install 'heartbeat-gateway[otel]'"]
    except Exception as error:  # its text may quote a variable's value: only its kind is shown
        return [f"tracing.enabled: OpenTelemetry cannot start with these OTEL_* variables ({type(error).__name__})"]
    return []


def tracing_from_environment(settings: Settings) -> Tracing | None:
    """The tracer `tracing.enabled` asks for, exporting as the `OTEL_*` variables say; None when off."""
    if not settings.tracing.enabled:
        return None
    from gateway.observability.tracing import Tracing

    return Tracing.from_environment(settings.upstream.base_url)


class Gateway:
    """Both ports of a running gateway: start, then `stop` drains and closes them."""

    def __init__(self, settings: Settings, *, upstream: Upstream | None = None, tracing: Tracing | None = None) -> None:
        """`tracing`: a tracer of the caller's; by default the one the config and `OTEL_*` variables ask for."""
        self._live = LiveSettings(settings)
        self.health = Health()
        self.metrics = GatewayMetrics(settings)
        running = self._running = _Running()
        self.metrics.track_leases(running.table_counts)
        self._retired = RetiredTokens()
        proxy_app = create_proxy_app(
            self._live,
            health=self.health,
            metrics=self.metrics,
            upstream=upstream,
            running=running,
            retired=self._retired,
            tracing=tracing or tracing_from_environment(settings),
        )
        self._inflight = proxy_app[INFLIGHT]
        self._held_polls = proxy_app[HELD_POLLS]
        self._proxy = GatewayAppRunner(
            proxy_app,
            limits=lambda: self._live.current.limits,
            observer=lambda status: self.metrics.request_refused("other", status, 0.0),
            # A client that disconnects cancels its handler, which closes the
            # upstream connection: abandoned streams and polls end upstream too.
            handler_cancellation=True,
            # Bodies pass through as received. Decompressing them would forward
            # fewer bytes than the client's Content-Length announces, and the
            # upstream would read the next pooled request as the rest of this body.
            auto_decompress=False,
            # `stop` waits out the grace period itself; whatever is left then is cut at once.
            shutdown_timeout=CUT_SECONDS,
            access_log=None,
        )
        admin = create_admin_app(self.health, live=self._live, metrics=self.metrics, leases_source=running.leases)
        self._admin = web.AppRunner(admin, access_log=None, shutdown_timeout=1.0)
        self._certificates = {
            name: server_context(tls.cert_file, tls.key_file, tls.client_ca_file, f"{name} port")
            for name, tls in (("worker", settings.listen.tls), ("admin", settings.admin.tls))
            if tls.cert_file is not None and tls.key_file is not None
        }
        self._watchers = Tasks()

    @property
    def settings(self) -> Settings:
        return self._live.current

    def reload(self, settings: Settings) -> list[str]:
        """Apply new settings to the requests that come next; returns why not, if it cannot.

        Keys, tokens, environments, routes, headers, limits and heartbeat
        policy change in place; sockets, the upstream client and the log
        format need a restart, so a reload that changes them is refused whole.
        """
        problems = restart_needed(self._live.current, settings)
        if problems:
            self.metrics.config_reloads.labels("failure").inc()
            return problems
        kept = {t.token.value for t in settings.clients.tokens}
        removed = {t.token.value for t in self._live.current.clients.tokens} - kept
        self._retired.retire(removed, time.monotonic())
        self._retired.restore(kept)
        self._live.current = settings
        self.metrics.set_environments(settings)
        if self._running.heartbeats is not None:
            self._running.heartbeats.configure(settings.heartbeat)
        self.metrics.config_reloads.labels("success").inc()
        return []

    def reload_failed(self) -> None:
        """A reload was refused before it reached `reload` (the config did not validate)."""
        self.metrics.config_reloads.labels("failure").inc()

    async def start(self) -> None:
        await self._proxy.setup()
        await self._admin.setup()
        listen, admin = self.settings.listen, self.settings.admin
        worker_tls, admin_tls = (self._certificates.get(n, (None, ()))[0] for n in ("worker", "admin"))
        await web.TCPSite(self._proxy, listen.host, listen.port, backlog=LISTEN_BACKLOG, ssl_context=worker_tls).start()
        await web.TCPSite(self._admin, admin.host, admin.port, ssl_context=admin_tls).start()
        for name, (_, rotating) in self._certificates.items():
            for files in rotating:
                self._watchers.spawn(files.watch(), name=f"{name}-tls-files")

    @property
    def proxy_url(self) -> str:
        return _url(self._proxy, "worker" in self._certificates)

    @property
    def admin_url(self) -> str:
        return _url(self._admin, "admin" in self._certificates)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, then cut the rest.

        One grace period in all (aiohttp's own shutdown would wait it out twice:
        once for handlers, and again after cancelling them).
        """
        self.health.draining = True
        self._held_polls.drain()
        grace = self.settings.limits.shutdown_grace_seconds
        for site in list(self._proxy.sites):
            await site.stop()
        if self._proxy.server is not None:
            # Idle keep-alive connections close now; busy ones after their current request.
            self._proxy.server.pre_shutdown()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._inflight.idle()
        await self._proxy.cleanup()
        await self._admin.cleanup()
        await self._watchers.close()


def upstream_client(settings: Settings) -> HttpUpstream:
    """The upstream client as serving builds it (egress, TLS), without capacity classes (`check-config --connect`)."""
    return HttpUpstream(settings.upstream, egress=egress_route(settings))


def egress_route(settings: Settings) -> ProxyRoute:
    """The way to the upstream this process takes (the config check refused any it could not)."""
    proxy = settings.upstream.proxy
    return proxy_route(settings.upstream.base_url, proxy.url, proxy.from_environment, os.environ)


def _url(runner: web.AppRunner, tls: bool) -> str:
    host, port = runner.addresses[0][:2]
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
