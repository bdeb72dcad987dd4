"""A floor for comparison: the least an aiohttp reverse proxy can do for a heartbeat.

No validation, no coalescing, no logging: swap the credential, forward, read,
answer. `heartbeat_bench.py --baseline` runs it in place of the gateway, so
the gateway's own cost can be told apart from aiohttp's. Not for use.

    python bench/minimal_proxy.py serve --config FILE [--pool N] [--variant V]

(the gateway's config format: `upstream.base_url`, and for an https:// one
the CA files in `upstream.tls.ca_files`, added to the system's trust as the
gateway does; one pool of N). Variants, to size the levers
left on the gateway's request path (`throughput_bench.py --targets
minimal,minimal-lean-client,minimal-low-level-server`):

- `aiohttp` (default): aiohttp's application and client, as the gateway uses them;
- `lean-client`: upstream over `bench/rig.py`'s keep-alive HTTP/1.1 client
  on asyncio's protocol layer (Content-Length and chunked answers only, TLS
  through asyncio's; no streaming or error translation: a measurement, not a client);
- `low-level-server`: aiohttp's low-level `web.Server` with one handler,
  without the application, router and middleware chain.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import ssl
import sys
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

from gateway import loop as event_loop

sys.path.insert(0, str(Path(__file__).parent))
import rig


def main(config_path: str, pool: int, variant: str) -> None:
    config = yaml.safe_load(open(config_path))  # noqa: SIM115 - read once at start
    upstream = config["upstream"]["base_url"]
    key = os.environ["BENCH_ENV_KEY"]
    headers = {"Authorization": f"Bearer {key}", "anthropic-beta": "managed-agents-2026-04-01"}
    fixed = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    upstream_port = int(upstream.rsplit(":", 1)[1])
    tls = None
    if upstream.startswith("https://"):
        tls = ssl.create_default_context()
        for ca_file in config["upstream"].get("tls", {}).get("ca_files", []):
            tls.load_verify_locations(cafile=ca_file)
    idle: list[rig.Connection] = []

    async def run() -> None:
        client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=pool, ssl=tls if tls else True))

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            async with client.request(request.method, upstream + request.raw_path, headers=headers) as r:
                if r.content_type != "text/event-stream":
                    return web.Response(status=r.status, body=await r.read(), content_type="application/json")
                # Streamed, so a held-open event stream holds its connection as in any proxy.
                response = web.StreamResponse(status=r.status, headers={"Content-Type": r.content_type})
                await response.prepare(request)
                async for chunk in r.content.iter_any():
                    await response.write(chunk)
                return response

        async def handle_lean(request: web.BaseRequest) -> web.StreamResponse:
            body = await request.read()
            head = f"{request.method} {request.raw_path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{fixed}"
            conn = idle.pop() if idle else await rig.Connection.open(upstream_port, tls)
            status, answer = await conn.request(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            if not conn.closed:
                idle.append(conn)
            return web.Response(status=status, body=answer, content_type="application/json")

        async def ready(request: web.Request) -> web.Response:
            return web.Response(text="ok")

        worker_handler = handle_lean if variant == "lean-client" else handle
        loop = asyncio.get_running_loop()
        admin = web.Application()
        admin.router.add_get("/readyz", ready)
        runners = [web.AppRunner(admin, access_log=None)]
        listener = None
        if variant == "low-level-server":
            listener = await loop.create_server(web.Server(worker_handler), "127.0.0.1", config["listen"]["port"])
        else:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", worker_handler)
            runners.append(web.AppRunner(app, access_log=None))
        ports = [config["admin"]["port"], config["listen"]["port"]]
        for runner, port in zip(runners, ports, strict=False):
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)  # as the gateway does
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        if listener is not None:
            listener.close()
        for runner in runners:
            await runner.cleanup()
        await client.close()

    event_loop.run(run)


if __name__ == "__main__":
    argv = sys.argv
    pool = int(argv[argv.index("--pool") + 1]) if "--pool" in argv else 1024
    main(
        argv[argv.index("--config") + 1], pool, argv[argv.index("--variant") + 1] if "--variant" in argv else "aiohttp"
    )
