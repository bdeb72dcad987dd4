"""Poll admission: idle long polls held at the gateway, first come first served, never an item for nobody.

Checks `gateway/edge/polls.py`.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from typing import Any

import aiohttp

from gateway.config.settings import PollSettings
from gateway.edge.polls import PollAdmission, block_seconds
from gateway.policy.routing import with_param

from .support import ENV_ID, GatewayFactory, SimFactory, worker_headers


def admission(limit: int | None = 1, refresh: float | None = None) -> PollAdmission:
    settings = PollSettings(max_upstream_per_environment=limit, refresh_seconds=refresh)
    return PollAdmission(lambda: settings)


def test_the_block_time_is_read_as_the_api_reads_it() -> None:
    assert block_seconds("block_ms=999") == 0.999
    assert block_seconds("beta=true&block_ms=250") == 0.25
    # Not a long poll the API would accept as one: sent on as it came, never held.
    for query in (None, "block_ms=x", "block_ms=0", "block_ms=5000", "block_ms=1&block_ms=2"):
        assert block_seconds(query) is None
    assert with_param("beta=true&block_ms=999", "block_ms", 420) == "beta=true&block_ms=420"
    assert with_param(None, "block_ms", 7) == "block_ms=7"


async def test_beyond_the_limit_a_poll_waits_its_block_time_then_is_answered_empty() -> None:
    polls = admission(limit=1)
    assert await polls.admit(ENV_ID, "a", 0.999) == 0.0
    started = time.monotonic()
    assert await polls.admit(ENV_ID, "b", 0.2) is None
    assert 0.19 <= time.monotonic() - started < 0.4
    assert await polls.admit("env_other", "c", 0.2) == 0.0  # another environment has its own slots
    assert polls.held(ENV_ID) == 0


async def test_a_freed_slot_goes_to_the_longest_waiting_worker_still_there() -> None:
    polls = admission(limit=1)
    await polls.admit(ENV_ID, "a", 0.999)
    first = asyncio.ensure_future(polls.admit(ENV_ID, "b", 0.999))
    leaving = asyncio.ensure_future(polls.admit(ENV_ID, "c", 0.999))
    last = asyncio.ensure_future(polls.admit(ENV_ID, "d", 0.999))
    await asyncio.sleep(0.05)
    assert polls.held(ENV_ID) == 3
    leaving.cancel()  # a worker that leaves while held never goes upstream
    await asyncio.sleep(0)
    polls.release(ENV_ID)
    waited = await first
    assert waited is not None
    assert 0.04 < waited < 0.5
    assert not last.done()
    polls.release(ENV_ID)
    assert await last is not None
    polls.release(ENV_ID)
    assert polls.held(ENV_ID) == 0
    assert await polls.admit(ENV_ID, "e", 0.0) == 0.0  # every slot came back


async def test_a_slot_handed_to_a_worker_as_it_leaves_passes_on() -> None:
    polls = admission(limit=1)
    await polls.admit(ENV_ID, "a", 0.999)
    leaving = asyncio.ensure_future(polls.admit(ENV_ID, "b", 0.999))
    staying = asyncio.ensure_future(polls.admit(ENV_ID, "c", 0.999))
    await asyncio.sleep(0.01)
    polls.release(ENV_ID)  # the slot goes to b...
    leaving.cancel()  # ...which leaves before it could use it
    assert await staying is not None  # so c gets it
    assert leaving.cancelled()


async def test_with_refresh_every_worker_reaches_the_upstream_once_per_window() -> None:
    now = [0.0]
    settings = PollSettings(max_upstream_per_environment=1, refresh_seconds=30)
    polls = PollAdmission(lambda: settings, clock=lambda: now[0])
    assert await polls.admit(ENV_ID, "a", 0.999) == 0.0
    # The slot is taken, but b was never seen upstream: it goes up at once, so the API counts it.
    assert await polls.admit(ENV_ID, "b", 0.999) == 0.0
    now[0] = 10.0
    assert await polls.admit(ENV_ID, "b", 0.01) is None  # seen 10 s ago: waits like anyone
    now[0] = 31.0
    assert await polls.admit(ENV_ID, "b", 0.01) == 0.0


def poll_url(gateway: Any, block_ms: int = 999) -> str:
    return f"{gateway.proxy_url}/v1/environments/{ENV_ID}/work/poll?block_ms={block_ms}"


async def test_idle_polls_are_held_at_the_gateway_and_answered_empty_as_the_api_would(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    sim = await make_simulator()
    gateway = await make_gateway(sim.url, "polls: {max_upstream_per_environment: 2}")

    async def poll(session: aiohttp.ClientSession, n: int) -> tuple[int, str, float]:
        started = time.monotonic()
        headers = {**worker_headers(), "Anthropic-Worker-ID": f"worker-{n}"}
        async with session.get(poll_url(gateway), headers=headers) as r:
            return r.status, await r.text(), time.monotonic() - started

    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(*(poll(session, n) for n in range(20)))
    assert {(status, body) for status, body, _ in answers} == {(200, "null")}
    # Each within its own block time (999 ms), plus a little.
    assert max(seconds for _, _, seconds in answers) < 1.3
    # Two went upstream; the rest were answered here (a slot freed at 999 ms leaves no block time).
    assert sim.sim.count("poll") <= 4
    samples = {
        s.labels["outcome"]: s.value
        for s in next(iter(gateway.metrics.polls.collect())).samples
        if s.name.endswith("_total") and s.labels["environment"] == "prod-sandboxes"
    }
    assert samples["forwarded"] == sim.sim.count("poll")
    assert samples["held"] == 18
    assert samples["answered_empty"] == 20 - sim.sim.count("poll")


async def test_an_item_queued_while_polls_are_held_is_picked_up_at_once(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    sim = await make_simulator()
    gateway = await make_gateway(sim.url, "polls: {max_upstream_per_environment: 1}")
    picked: list[tuple[float, Any]] = []

    async def poll(session: aiohttp.ClientSession, worker: str) -> None:
        headers = {**worker_headers(), "Anthropic-Worker-ID": worker}
        async with session.get(poll_url(gateway), headers=headers) as r:
            body = await r.json()
            if body is not None:
                picked.append((time.monotonic(), worker))

    async with aiohttp.ClientSession() as session:
        first = asyncio.ensure_future(poll(session, "first"))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(poll(session, "second"))  # held: the only slot is taken
        await asyncio.sleep(0.2)
        queued = time.monotonic()
        sim.sim.enqueue(ENV_ID)
        await first
        # The slot passes to the held worker: it goes upstream as itself, for what is left of its block.
        started_second = time.monotonic()
        sim.sim.enqueue(ENV_ID)
        await second
    assert [worker for _, worker in picked] == ["first", "second"]
    assert picked[0][0] - queued < 0.2  # pickup while polls are held is as fast as one open poll
    assert picked[1][0] - started_second < 0.2
    assert sim.sim.stats_json()["worker_ids"] == ["first", "second"]


async def test_a_freed_slot_skips_a_held_poll_with_too_little_block_time_left() -> None:
    """A poll with under half a second left would be a short upstream call for little: it is answered
    empty when its time is up, and the slot goes to the next in line."""
    now = [0.0]
    settings = PollSettings(max_upstream_per_environment=1)
    polls = PollAdmission(lambda: settings, clock=lambda: now[0])
    await polls.admit(ENV_ID, "a", 0.999)
    short = asyncio.ensure_future(polls.admit(ENV_ID, "b", 0.6))
    long = asyncio.ensure_future(polls.admit(ENV_ID, "c", 0.999))
    await asyncio.sleep(0.01)
    now[0] = 0.2  # b has 0.4 s left, c 0.799
    polls.release(ENV_ID)
    assert await long is not None
    assert await short is None


async def test_a_raised_limit_serves_those_already_waiting_before_a_newcomer() -> None:
    current = [PollSettings(max_upstream_per_environment=1)]
    polls = PollAdmission(lambda: current[0])
    await polls.admit(ENV_ID, "a", 0.999)
    waiting = asyncio.ensure_future(polls.admit(ENV_ID, "b", 0.999))
    await asyncio.sleep(0.01)
    current[0] = PollSettings(max_upstream_per_environment=2)  # a reload
    newcomer = asyncio.ensure_future(polls.admit(ENV_ID, "c", 0.3))
    assert await waiting is not None  # the freed slot went to b, who was first
    assert await newcomer is None


async def test_slots_beyond_the_limit_are_given_back_not_passed_on() -> None:
    """A refresh (or a reload that lowered the limit) put more polls upstream than allowed: as they
    come back the count falls to the limit, and only then do slots pass to those waiting."""
    now = [0.0]
    settings = PollSettings(max_upstream_per_environment=1, refresh_seconds=30)
    polls = PollAdmission(lambda: settings, clock=lambda: now[0])
    for worker in ("a", "b", "c"):
        assert await polls.admit(ENV_ID, worker, 0.999) == 0.0  # each new worker id goes up once
    waiting = asyncio.ensure_future(polls.admit(ENV_ID, "a", 0.999))  # seen: waits
    await asyncio.sleep(0.01)
    polls.release(ENV_ID)
    polls.release(ENV_ID)
    assert not waiting.done()  # two of three slots given back, not passed on
    polls.release(ENV_ID)
    assert await waiting is not None  # the last one, within the limit, passes on


async def test_worker_ids_cost_the_same_small_memory_whatever_their_length() -> None:
    """A client choosing 8 KB worker ids must not make the gateway keep 8 KB per id: ids are remembered by a
    digest, so 200 of them keep well under what their text alone would take (1.6 MB)."""
    settings = PollSettings(max_upstream_per_environment=1, refresh_seconds=30)
    polls = PollAdmission(lambda: settings)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for n in range(200):
            await polls.admit(ENV_ID, f"{n}-" + "x" * 8000, 0.001)
            polls.release(ENV_ID)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    kept = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert kept < 100_000, kept


async def test_polls_the_slots_are_not_for_go_straight_upstream(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    """A credential the gateway did not inject (here the environment key itself, passed through) or a poll
    that does not block never waits for a slot: junk credentials cannot take honest workers' slots."""
    from .support import ENV_KEY

    sim = await make_simulator()
    gateway = await make_gateway(sim.url, "polls: {max_upstream_per_environment: 1}")
    async with aiohttp.ClientSession() as session:
        holder = asyncio.ensure_future(session.get(poll_url(gateway), headers=worker_headers()))
        await asyncio.sleep(0.1)  # the only slot is taken
        started = time.monotonic()
        own_key = {"Authorization": f"Bearer {ENV_KEY}", "anthropic-beta": "managed-agents-2026-04-01"}
        async with session.get(poll_url(gateway, 300), headers=own_key) as r:
            assert (r.status, await r.json()) == (200, None)
        assert 0.25 < time.monotonic() - started < 0.6  # blocked upstream for its own 300 ms, not held
        async with session.get(
            f"{gateway.proxy_url}/v1/environments/{ENV_ID}/work/poll", headers=worker_headers()
        ) as r:
            assert (r.status, await r.json()) == (200, None)  # no block_ms: straight up, at once
        (await holder).close()
    assert sim.sim.count("poll") == 3
