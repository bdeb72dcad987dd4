"""The admin port's handlers. This app is served only on `admin.port`;
nothing on the worker-facing port routes here.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

__all__ = ["HEALTH", "Health", "create_admin_app"]


@dataclass(slots=True)
class Health:
    """What the probes report; the composition root flips these as the gateway starts and drains."""

    upstream_ready: bool = False
    draining: bool = False

    @property
    def ready(self) -> bool:
        return self.upstream_ready and not self.draining


HEALTH = web.AppKey("health", Health)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    health = request.app[HEALTH]
    if health.ready:
        return web.json_response({"status": "ready"})
    status = "draining" if health.draining else "starting"
    return web.json_response({"status": status}, status=503)


def create_admin_app(health: Health) -> web.Application:
    app = web.Application()
    app[HEALTH] = health
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
