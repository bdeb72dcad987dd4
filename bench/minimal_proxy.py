"""A floor for comparison: the least an aiohttp reverse proxy can do for a heartbeat.

No validation, no coalescing, no logging: swap the credential, forward, read,
answer. `heartbeat_bench.py --baseline` runs it in place of the gateway, so
the gateway's own cost can be told apart from aiohttp's. Not for use.

    python bench/minimal_proxy.py serve --config FILE [--pool N]   (the gateway's config format; one pool of N)
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
from collections.abc import AsyncIterator

import aiohttp
import yaml
from aiohttp import web

from gateway import loop as event_loop

SESSION = web.AppKey("session", aiohttp.ClientSession)


def main(config_path: str, pool: int) -> None:
    config = yaml.safe_load(open(config_path))  # noqa: SIM115 - read once at start
    upstream = config["upstream"]["base_url"]
    key = os.environ["BENCH_ENV_KEY"]

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = {"Authorization": f"Bearer {key}", "anthropic-beta": "managed-agents-2026-04-01"}
        async with request.app[SESSION].request(request.method, upstream + request.raw_path, headers=headers) as r:
            if r.content_type != "text/event-stream":
                return web.Response(status=r.status, body=await r.read(), content_type="application/json")
            # Streamed, so a held-open event stream holds its connection as in any proxy.
            response = web.StreamResponse(status=r.status, headers={"Content-Type": r.content_type})
            await response.prepare(request)
            async for chunk in r.content.iter_any():
                await response.write(chunk)
            return response

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def run() -> None:
        app = web.Application()

        async def session(app: web.Application) -> AsyncIterator[None]:
            app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=pool))
            yield
            await app[SESSION].close()

        app.cleanup_ctx.append(session)
        app.router.add_route("*", "/{tail:.*}", handle)
        admin = web.Application()
        admin.router.add_get("/readyz", ready)
        runners = [web.AppRunner(app, access_log=None), web.AppRunner(admin, access_log=None)]
        for runner, port in zip(runners, (config["listen"]["port"], config["admin"]["port"]), strict=True):
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)  # as the gateway does
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        for runner in runners:
            await runner.cleanup()

    event_loop.run(run)


if __name__ == "__main__":
    argv = sys.argv
    main(argv[argv.index("--config") + 1], int(argv[argv.index("--pool") + 1]) if "--pool" in argv else 1024)
