"""The real `anthropic==2.10.0` SDK worker, through the gateway, against the simulator.

The worker is configured exactly as a deployed one would be: `base_url` is
the gateway and its "environment key" is the gateway client token. The
heartbeat loop and lease types are private SDK names, hence the pinned
version in pyproject.toml.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import anthropic
import pytest
from anthropic.lib._scoped_client import _copy_client_with_bearer_auth
from anthropic.lib.environments._worker import _heartbeat_loop, _Lease, _LeaseEndReason
from anthropic.resources.beta.environments.work import AsyncWork

from gateway.app import Gateway
from gateway.simulator import fingerprint

from .support import ENV_ID, ENV_KEY, TOKEN, GatewayFactory, SimFactory, SimHandle

# Short leases so several beats fit in a test: the SDK beats every max(1, ttl/2) s.
TTL = 2


@pytest.fixture
async def sim(make_simulator: SimFactory) -> SimHandle:
    return await make_simulator(ttl=TTL)


@pytest.fixture
async def gw(sim: SimHandle, make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway(sim.url)


@pytest.fixture
async def client(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[anthropic.AsyncAnthropic]:
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    # The worker knows only the gateway's address and its client token.
    async with anthropic.AsyncAnthropic(base_url=gw.proxy_url, auth_token=TOKEN) as sdk:
        yield sdk


def worker_work(client: anthropic.AsyncAnthropic) -> AsyncWork:
    """The work resource as the SDK worker builds it for heartbeats and force-stops."""
    return _copy_client_with_bearer_auth(client, auth_token=TOKEN, helper="environments-worker").beta.environments.work


async def claim_one(client: anthropic.AsyncAnthropic, sim: SimHandle) -> str:
    """Poll and ack one item with the SDK's own poller, as `EnvironmentWorker.run` does."""
    sim.sim.enqueue(ENV_ID)
    poller = client.beta.environments.work.poller(environment_id=ENV_ID, environment_key=TOKEN, auto_stop=False)
    async with contextlib.aclosing(poller) as items:
        async for item in items:
            return item.id
    raise AssertionError("the poller returned no item")


def assert_only_the_real_key_reached_the_api(sim: SimHandle) -> None:
    stats = sim.sim.stats_json()
    assert set(stats["credentials"]) == {"environment_key"}
    assert fingerprint(ENV_KEY) in stats["credential_fingerprints"]
    assert fingerprint(TOKEN) not in stats["credential_fingerprints"]


async def test_poller_claims_and_acks_through_the_gateway(client: anthropic.AsyncAnthropic, sim: SimHandle) -> None:
    work_id = await claim_one(client, sim)
    (item,) = [i for i in sim.sim.plane.items(ENV_ID) if i.id == work_id]
    assert item.state == "starting"
    requests = sim.sim.stats_json()["requests"]
    assert requests["poll"] == {"200": 1}
    assert requests["ack"] == {"200": 1}
    assert len(sim.sim.worker_ids) == 1  # the SDK's Anthropic-Worker-ID got through
    assert_only_the_real_key_reached_the_api(sim)


async def test_heartbeat_loop_keeps_the_lease_over_several_beats(
    client: anthropic.AsyncAnthropic, sim: SimHandle
) -> None:
    work_id = await claim_one(client, sim)
    lease = _Lease()
    ttls: list[float] = []
    loop = asyncio.ensure_future(
        _heartbeat_loop(
            worker_work(client), work_id=work_id, environment_id=ENV_ID, lease=lease, on_lease_ttl=ttls.append
        )
    )
    # Three TTLs long: without working beats the lease would lapse and re-queue the item.
    await asyncio.sleep(3 * TTL + 0.3)
    assert not lease.ended
    lease.finish(_LeaseEndReason.RUNNER_DONE)
    await asyncio.wait_for(loop, 5)
    assert lease._end_reason is _LeaseEndReason.RUNNER_DONE
    assert lease.kept
    beats = sim.sim.stats_json()["requests"]["heartbeat"]
    assert beats.get("200", 0) >= 5
    assert set(beats) == {"200"}
    assert ttls[-1] == TTL
    (item,) = [i for i in sim.sim.plane.items(ENV_ID) if i.id == work_id]
    assert item.state == "active"
    assert_only_the_real_key_reached_the_api(sim)


async def test_graceful_stop_on_the_api_ends_the_loop_as_heartbeat_stop(
    client: anthropic.AsyncAnthropic, sim: SimHandle
) -> None:
    work_id = await claim_one(client, sim)
    lease = _Lease()
    loop = asyncio.ensure_future(
        _heartbeat_loop(worker_work(client), work_id=work_id, environment_id=ENV_ID, lease=lease)
    )
    await asyncio.sleep(0.3)  # the claim has landed
    sim.sim.plane.stop(ENV_ID, work_id, sim.sim.now(), force=False)
    await asyncio.wait_for(loop, TTL + 2)
    assert lease._end_reason is _LeaseEndReason.HEARTBEAT_STOP
    # The SDK then force-stops the item on its way out; through the gateway too.
    await worker_work(client).stop(work_id, environment_id=ENV_ID, force=True)
    (item,) = [i for i in sim.sim.plane.items(ENV_ID) if i.id == work_id]
    assert item.state == "stopped"


async def test_two_sdk_loops_racing_for_one_item_leave_one_holder(
    client: anthropic.AsyncAnthropic, sim: SimHandle
) -> None:
    work_id = await claim_one(client, sim)
    leases = [_Lease(), _Lease()]
    loops = [
        asyncio.ensure_future(_heartbeat_loop(worker_work(client), work_id=work_id, environment_id=ENV_ID, lease=lease))
        for lease in leases
    ]
    await asyncio.sleep(2 * TTL)
    ended = [lease for lease in leases if lease.ended]
    holders = [lease for lease in leases if not lease.ended]
    assert len(ended) == 1
    assert len(holders) == 1
    assert ended[0]._end_reason is _LeaseEndReason.LEASE_LOST
    # The loser's 412 came from the upstream or, when the gateway already knew the
    # lease was held, from the gateway itself; never a second success.
    beats = sim.sim.stats_json()["requests"]["heartbeat"]
    assert beats.get("412", 0) <= 1
    holders[0].finish(_LeaseEndReason.RUNNER_DONE)
    await asyncio.wait_for(asyncio.gather(*loops), 5)
    (item,) = [i for i in sim.sim.plane.items(ENV_ID) if i.id == work_id]
    assert item.state == "active"
    assert_only_the_real_key_reached_the_api(sim)


async def test_sdk_loop_with_absorption_keeps_its_lease_and_ends_on_a_graceful_stop(
    make_simulator: SimFactory, make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    ttl = 4  # the SDK beats every 2 s; a 3 s signal delay lets the gateway answer every other beat
    sim = await make_simulator(ttl=ttl)
    gateway = await make_gateway(
        sim.url, "heartbeat: {absorb: {enabled: true, max_signal_delay_seconds: 3, min_remaining_fraction: 0.3}}"
    )
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    async with anthropic.AsyncAnthropic(base_url=gateway.proxy_url, auth_token=TOKEN) as client:
        work_id = await claim_one(client, sim)
        lease = _Lease()
        ttls: list[float] = []
        work = worker_work(client)
        loop = asyncio.ensure_future(
            _heartbeat_loop(work, work_id=work_id, environment_id=ENV_ID, lease=lease, on_lease_ttl=ttls.append)
        )
        await asyncio.sleep(2 * ttl + 0.5)
        assert not lease.ended
        # The gateway answered some beats itself, each with no more time than was left.
        assert min(ttls) < ttl
        beats_upstream = sim.sim.count("heartbeat")
        stopped_at = asyncio.get_running_loop().time()
        sim.sim.plane.stop(ENV_ID, work_id, sim.sim.now(), force=False)
        await asyncio.wait_for(loop, 3 + ttl)
        assert lease._end_reason is _LeaseEndReason.HEARTBEAT_STOP
        # Within the signal delay plus one beat interval.
        assert asyncio.get_running_loop().time() - stopped_at <= 3 + 2 + 0.5
    (item,) = [i for i in sim.sim.plane.items(ENV_ID) if i.id == work_id]
    assert item.state == "stopping"
    assert beats_upstream < len(ttls) + 1  # fewer upstream beats than SDK beats
    assert_only_the_real_key_reached_the_api(sim)
