"""The gateway as users run it: `python -m gateway serve` in its own process, with its own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from .support import ENVIRON, config_yaml
from .tools import free_port


@dataclass(frozen=True)
class Ports:
    proxy: int
    admin: int

    @classmethod
    def free(cls) -> Ports:
        proxy = free_port()
        while (admin := free_port()) == proxy:
            pass
        return cls(proxy, admin)

    def listen_yaml(self) -> str:
        """The config's `listen` and `admin` sections on these loopback ports."""
        return f"listen: {{host: 127.0.0.1, port: {self.proxy}}}\nadmin: {{host: 127.0.0.1, port: {self.admin}}}\n"


async def start_serve(
    path: Path,
    stderr: int = asyncio.subprocess.PIPE,
    preexec_fn: Callable[[], None] | None = None,
    env: Mapping[str, str] | None = None,
) -> asyncio.subprocess.Process:
    """`python -m gateway serve` with the test secrets (and `env`) in its environment."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(path),
        env={**os.environ, **ENVIRON, **(env or {})}, stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
        preexec_fn=preexec_fn,
    )  # fmt: skip


async def wait_ready(admin_port: int, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert proc.returncode is None, "the gateway exited during start-up"
            try:
                async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("the gateway never became ready")


@dataclass(frozen=True)
class Served:
    process: asyncio.subprocess.Process
    proxy_url: str
    admin_url: str


@contextlib.asynccontextmanager
async def served_gateway(
    directory: Path, upstream: str, extra: str = "", env: Mapping[str, str] | None = None
) -> AsyncIterator[Served]:
    """A gateway serving `upstream` from its own process, stopped with SIGTERM (as Kubernetes stops a pod)."""
    ports = Ports.free()
    path = directory / "gateway.yaml"
    path.write_text(config_yaml(upstream, ports.listen_yaml() + extra))
    # Its log goes to a file (a pipe nobody reads would fill and stall it), shown if it fails to start.
    log = directory / "gateway.log"
    with log.open("wb") as sink:
        proc = await start_serve(path, stderr=sink.fileno(), env=env)
    try:
        try:
            await wait_ready(ports.admin, proc)
        except AssertionError as error:
            raise AssertionError(f"{error}; its log ends:\n{log.read_text()[-2000:]}") from None
        yield Served(proc, f"http://127.0.0.1:{ports.proxy}", f"http://127.0.0.1:{ports.admin}")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
