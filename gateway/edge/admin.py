"""The admin port's handlers. This app is served only on `admin.port`;
nothing on the worker-facing port routes here (its allow-list does not
include these paths, and it is another app on another socket).

- `GET /healthz`: the process is alive.
- `GET /readyz`: config loaded and the upstream client ready; 503 while starting, draining,
  while lease-critical upstream capacity has had requests waiting for a second or more, or while
  the replica's event loop runs so late that it refuses requests (`gateway.edge.overload`'s second level).
- `GET /metrics`: Prometheus exposition of this gateway's own registry.
- `GET /admin/leases`: the lease table, filtered by `environment` and `state`, paginated.
- `GET /admin/config`: the effective config, every secret shown as "<redacted>".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from gateway.config.settings import LiveSettings
from gateway.errors import error_body
from gateway.heartbeat.table import LeaseView
from gateway.observability.metrics import GatewayMetrics

__all__ = ["HEALTH", "Health", "create_admin_app"]

DEFAULT_PAGE = 100
MAX_PAGE = 1000


# Lease-critical capacity with requests waiting this long, without a break, takes the
# replica out of rotation: new workers go to replicas that can still serve leases.
SATURATED_AFTER_SECONDS = 1.0


@dataclass(slots=True)
class Health:
    """What the probes report; the composition root flips these as the gateway starts and drains."""

    upstream_ready: bool = False
    draining: bool = False
    # Seconds the lease-critical class has had requests waiting for a connection.
    lease_capacity_waiting: Callable[[], float] = lambda: 0.0
    # The event loop runs late and the replica refuses requests (`gateway.edge.overload`'s second level).
    overloaded: Callable[[], bool] = lambda: False

    @property
    def saturated(self) -> bool:
        return self.lease_capacity_waiting() >= SATURATED_AFTER_SECONDS

    @property
    def ready(self) -> bool:
        return self.upstream_ready and not self.draining and not self.saturated and not self.overloaded()

    @property
    def status(self) -> str:
        if self.draining:
            return "draining"
        if not self.upstream_ready:
            return "starting"
        if self.saturated:
            return "saturated"
        return "overloaded" if self.overloaded() else "ready"


@dataclass(frozen=True, slots=True)
class AdminContext:
    health: Health
    live: LiveSettings
    metrics: GatewayMetrics
    leases: Callable[[], list[LeaseView]]


HEALTH = web.AppKey("health", Health)
ADMIN = web.AppKey("admin", AdminContext)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    health = request.app[HEALTH]
    return web.json_response({"status": health.status}, status=200 if health.ready else 503)


def _bad(message: str) -> web.Response:
    return web.Response(status=400, body=error_body("invalid_request_error", message), content_type="application/json")


async def leases(request: web.Request) -> web.Response:
    ctx = request.app[ADMIN]
    query = request.query
    environment, state = query.get("environment"), query.get("state")
    try:
        limit = int(query.get("limit", DEFAULT_PAGE))
        offset = int(query.get("cursor", "0"))
    except ValueError:
        return _bad("limit and cursor must be integers")
    if not 1 <= limit <= MAX_PAGE or offset < 0:
        return _bad(f"limit must be 1 to {MAX_PAGE} and cursor at least 0")
    rows = []
    for lease in ctx.leases():
        label = ctx.metrics.environment(lease.environment_id)
        if environment is not None and environment not in (label, lease.environment_id):
            continue
        if state is not None and lease.state != state:
            continue
        row = asdict(lease)
        row["environment"] = label
        if row["seconds_left"] is not None:
            row["seconds_left"] = round(row["seconds_left"], 3)
        rows.append(row)
    rows.sort(key=lambda row: (row["environment_id"], row["work_id"]))
    page = rows[offset : offset + limit]
    more = offset + limit < len(rows)
    return web.json_response({"data": page, "total": len(rows), "next_cursor": str(offset + limit) if more else None})


async def config(request: web.Request) -> web.Response:
    return web.json_response(request.app[ADMIN].live.current.redacted())


def create_admin_app(
    health: Health,
    *,
    live: LiveSettings,
    metrics: GatewayMetrics,
    leases_source: Callable[[], list[LeaseView]],
) -> web.Application:
    app = web.Application()
    app[HEALTH] = health
    app[ADMIN] = AdminContext(health, live, metrics, leases_source)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", make_aiohttp_handler(metrics.registry))
    app.router.add_get("/admin/leases", leases)
    app.router.add_get("/admin/config", config)
    return app
