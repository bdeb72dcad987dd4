"""Tasks the gateway starts outside a request's own await, each owned until it ends.

The event loop keeps only weak references to tasks, so a task nobody holds
can be collected mid-flight, and one nobody awaits hides its exception and
outlives shutdown. Every such task is spawned through a `Tasks`, which holds
it until it is done and cancels and awaits what is left on `close()`; no
other module calls `create_task` (tests/test_architecture.py checks).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["Tasks"]

T = TypeVar("T")


class Tasks:
    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(
        self,
        coroutine: Coroutine[Any, Any, T],
        *,
        name: str,
        when_done: Callable[[asyncio.Task[T]], object] | None = None,
    ) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if when_done is not None:
            task.add_done_callback(when_done)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Cancel every task still running and wait until each has ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
