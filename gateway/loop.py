"""The event loop the CLI runs on: uvloop when it is installed, asyncio's own otherwise.

uvloop (`pip install 'heartbeat-gateway[speed]'`) cuts the gateway's CPU per
request; behaviour is the same on both loops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TypeVar

__all__ = ["loop_name", "new_event_loop", "run"]

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(main: Callable[[], Coroutine[object, object, T]]) -> T:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main())
