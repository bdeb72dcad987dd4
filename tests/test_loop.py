"""The event loop the CLI runs on: uvloop when installed, asyncio's own otherwise. Checks `gateway/loop.py`."""

from __future__ import annotations

import asyncio
import importlib.util

from gateway import loop


def test_the_loop_is_uvloop_exactly_when_it_is_installed_and_runs_a_coroutine() -> None:
    installed = importlib.util.find_spec("uvloop") is not None
    assert loop.loop_name() == ("uvloop" if installed else "asyncio")

    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    module = loop.run(which)
    assert module.startswith("uvloop") == installed
