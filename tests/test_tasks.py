"""Background tasks held until they end, and none left running at shutdown. Checks `gateway/tasks.py`."""

from __future__ import annotations

import asyncio
import gc

from gateway.tasks import Tasks


async def test_a_spawned_task_runs_to_its_end_even_with_nobody_else_holding_it() -> None:
    """asyncio keeps only weak references: a task nobody holds may be collected mid-flight."""
    tasks = Tasks()
    finished = asyncio.Event()

    async def work() -> None:
        await asyncio.sleep(0.05)
        finished.set()

    tasks.spawn(work(), name="held")
    gc.collect()
    await asyncio.wait_for(finished.wait(), 1)
    await asyncio.sleep(0)
    assert len(tasks) == 0  # forgotten once done: nothing kept per task


async def test_close_cancels_what_is_left_and_waits_for_each_to_end() -> None:
    tasks = Tasks()
    ended: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            ended.append(name)

    async def fails() -> None:
        raise RuntimeError("a task's own failure does not stop the others closing")

    for name in ("a", "b"):
        tasks.spawn(forever(name), name=name)
    tasks.spawn(fails(), name="fails")
    await asyncio.sleep(0.01)
    await asyncio.wait_for(tasks.close(), 1)
    assert sorted(ended) == ["a", "b"]
    assert len(tasks) == 0


async def test_when_done_hears_of_the_end_with_its_result() -> None:
    tasks = Tasks()
    seen: list[int] = []

    async def answer() -> int:
        return 42

    tasks.spawn(answer(), name="answer", when_done=lambda task: seen.append(task.result()))
    await asyncio.sleep(0.01)
    assert seen == [42]
