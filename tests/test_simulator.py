"""The simulator: its control plane as transcripts with a fake clock, and its HTTP surface.

Checks `gateway/simulator/app.py`, `gateway/simulator/api.py`, `gateway/simulator/auth.py`,
`gateway/simulator/control_plane.py`, `gateway/simulator/faults.py`,
`gateway/simulator/middleware.py`, `gateway/simulator/state.py`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from gateway.simulator import ControlPlane, Faults, FaultsError, SimError, TtlPolicy, fingerprint
from gateway.simulator.control_plane import rfc3339

from .support import API_KEY, BETA, ENV_ID, ENV_KEY, OTHER_ENV_ID, SimFactory, SimHandle

E = "env_1"


def claimed(plane: ControlPlane, now: float = 0.0) -> tuple[str, str]:
    """An item polled, acked and claimed at `now`; returns (work id, last_heartbeat)."""
    item = plane.enqueue(E, now)
    assert plane.poll(E, now, worker_id="w", reclaim_older_than_ms=None) is not None
    plane.ack(E, item.id, now)
    beat = plane.heartbeat(E, item.id, now, expected="NO_HEARTBEAT", desired_ttl=None)
    return item.id, beat["last_heartbeat"]


def precondition(exc: pytest.ExceptionInfo[SimError]) -> dict[str, Any]:
    assert exc.value.status == 412
    body = exc.value.body("req_1")
    assert body["error"]["details"]["error_code"] == "heartbeat_precondition_failed"
    state: dict[str, Any] = body["error"]["details"]["current_state"]
    return state


def test_poll_ack_claim_beat_transcript() -> None:
    plane = ControlPlane([E], ttl=TtlPolicy(default_seconds=30))
    assert plane.poll(E, 0.0, worker_id="w", reclaim_older_than_ms=None) is None
    item = plane.enqueue(E, 1.0)
    polled = plane.poll(E, 1.0, worker_id="w", reclaim_older_than_ms=None)
    assert polled is not None
    assert (polled["id"], polled["state"], polled["secret"]) == (item.id, "queued", None)
    # Polled but not acked: hidden until reclaim_older_than_ms (default 5 s) passes.
    assert plane.poll(E, 5.9, worker_id="w2", reclaim_older_than_ms=None) is None
    assert plane.poll(E, 6.0, worker_id="w2", reclaim_older_than_ms=None) is not None
    assert plane.ack(E, item.id, 6.1)["state"] == "starting"
    first = plane.heartbeat(E, item.id, 6.2, expected="NO_HEARTBEAT", desired_ttl=None)
    assert first == {
        "type": "work_heartbeat",
        "last_heartbeat": rfc3339(6.2),
        "lease_extended": True,
        "state": "active",
        "ttl_seconds": 30,
    }
    second = plane.heartbeat(E, item.id, 6.2, expected=first["last_heartbeat"], desired_ttl=10)
    # Same instant, yet strictly later: timestamps never repeat.
    assert second["last_heartbeat"] > first["last_heartbeat"]
    assert second["ttl_seconds"] == 10


def test_a_second_claim_or_a_stale_echo_gets_412_with_the_current_state() -> None:
    plane = ControlPlane([E])
    work_id, last = claimed(plane)
    with pytest.raises(SimError) as exc:
        plane.heartbeat(E, work_id, 1.0, expected="NO_HEARTBEAT", desired_ttl=None)
    assert precondition(exc) == {
        "state": "active",
        "last_heartbeat": last,
        "lease_updated_at": last,
        "lease_extended": False,
        "ttl_seconds": 60,
    }
    assert exc.value.message == f"Heartbeat precondition failed: expected NO_HEARTBEAT, actual was {last}"
    with pytest.raises(SimError) as exc:
        plane.heartbeat(E, work_id, 1.0, expected="2000-01-01T00:00:00.000000Z", desired_ttl=None)
    assert precondition(exc)["last_heartbeat"] == last


def test_timestamps_strictly_increase_even_on_a_frozen_clock() -> None:
    plane = ControlPlane([E])
    work_id, last = claimed(plane, now=1_764_000_000.123456)
    stamps = [last]
    for _ in range(2000):
        stamps.append(
            plane.heartbeat(E, work_id, 1_764_000_000.123456, expected=stamps[-1], desired_ttl=None)["last_heartbeat"]
        )
    assert all(a < b for a, b in itertools.pairwise(stamps))
    assert len(stamps[-1]) == len("2025-11-24T16:00:00.125456Z")


def test_an_unconditional_beat_extends_without_an_echo() -> None:
    plane = ControlPlane([E])
    work_id, last = claimed(plane)
    beat = plane.heartbeat(E, work_id, 1.0, expected=None, desired_ttl=None)
    assert beat["lease_extended"]
    assert beat["last_heartbeat"] != last


def test_a_lapsed_lease_requeues_the_item_and_the_old_holder_gets_412_queued() -> None:
    plane = ControlPlane([E], ttl=TtlPolicy(default_seconds=10))
    work_id, last = claimed(plane)
    plane.heartbeat(E, work_id, 9.9, expected=last, desired_ttl=None)  # renews until 19.9
    assert plane.stats(E, 19.8)["depth"] == 0
    with pytest.raises(SimError) as exc:
        plane.heartbeat(E, work_id, 20.0, expected=last, desired_ttl=None)
    assert precondition(exc) == {
        "state": "queued",
        "last_heartbeat": None,
        "lease_updated_at": None,
        "lease_extended": False,
        "ttl_seconds": 10,  # the SDK types it int: the default TTL when no lease is held
    }
    # Another worker can claim it now.
    assert plane.poll(E, 20.0, worker_id="w2", reclaim_older_than_ms=None) is not None


def test_an_acked_item_that_is_never_beaten_goes_back_to_the_queue() -> None:
    plane = ControlPlane([E], ttl=TtlPolicy(default_seconds=10))
    item = plane.enqueue(E, 0.0)
    plane.poll(E, 0.0, worker_id="w", reclaim_older_than_ms=None)
    plane.ack(E, item.id, 0.0)
    assert plane.poll(E, 10.0, worker_id="w", reclaim_older_than_ms=None) is not None


def test_graceful_stop_reaches_the_holder_on_its_next_beat_then_force_stop_finishes() -> None:
    plane = ControlPlane([E])
    work_id, last = claimed(plane)
    assert plane.stop(E, work_id, 1.0, force=False)["state"] == "stopping"
    # Not compared while stopping: even a stale echo learns of the stop.
    beat = plane.heartbeat(E, work_id, 2.0, expected="stale", desired_ttl=None)
    assert (beat["state"], beat["lease_extended"]) == ("stopping", True)
    assert plane.stop(E, work_id, 3.0, force=True)["state"] == "stopped"
    beat = plane.heartbeat(E, work_id, 4.0, expected=last, desired_ttl=None)
    assert (beat["state"], beat["lease_extended"], beat["ttl_seconds"]) == ("stopped", False, 0)
    with pytest.raises(SimError) as exc:
        plane.stop(E, work_id, 5.0, force=True)
    assert (exc.value.status, exc.value.error_type) == (409, "conflict_error")


def test_ack_conflicts_and_unknown_items() -> None:
    plane = ControlPlane([E])
    item = plane.enqueue(E, 0.0)
    with pytest.raises(SimError) as exc:
        plane.ack(E, item.id, 0.0)  # never polled
    assert exc.value.status == 409
    with pytest.raises(SimError) as exc:
        plane.heartbeat(E, "work_nope", 0.0, expected=None, desired_ttl=None)
    assert exc.value.status == 404
    with pytest.raises(SimError) as exc:
        plane.poll("env_nope", 0.0, worker_id=None, reclaim_older_than_ms=None)
    assert exc.value.status == 404


def test_ttl_policy_clamps() -> None:
    policy = TtlPolicy(default_seconds=60, min_seconds=10, max_seconds=600)
    assert [policy.effective(v) for v in (None, 1, 30, 10_000)] == [60, 10, 30, 600]


def test_list_pages_and_stats() -> None:
    plane = ControlPlane([E])
    ids = [plane.enqueue(E, float(i)).id for i in range(5)]
    first = plane.list_items(E, 10.0, limit=2, page=None)
    assert [w["id"] for w in first["data"]] == ids[:2]
    second = plane.list_items(E, 10.0, limit=10, page=first["next_page"])
    assert [w["id"] for w in second["data"]] == ids[2:]
    assert second["next_page"] is None
    plane.poll(E, 10.0, worker_id="w1", reclaim_older_than_ms=None)
    assert plane.stats(E, 11.0) == {
        "type": "work_queue_stats",
        "depth": 4,
        "pending": 1,
        "oldest_queued_at": rfc3339(0.0),
        "workers_polling": 1,
    }
    assert plane.stats(E, 41.0)["workers_polling"] == 0


def sessions_token(polled: dict[str, Any]) -> str:
    import base64
    import json

    secret = polled["secret"]
    token: str = json.loads(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4)))["sessions_token"]
    return token


def test_issued_secrets_carry_a_sessions_token_that_stays_tied_to_its_item() -> None:
    plane = ControlPlane([E], issue_secrets=True, ttl=TtlPolicy(default_seconds=10))
    plane.enqueue(E, 0.0)
    first = plane.poll(E, 0.0, worker_id="a", reclaim_older_than_ms=None)
    assert first is not None
    # Reclaimed by another poller: both tokens still name the item.
    second = plane.poll(E, 6.0, worker_id="b", reclaim_older_than_ms=None)
    assert second is not None
    for polled in (first, second):
        item = plane.item_for_token(sessions_token(polled))
        assert item is not None
        assert item.id == first["id"]
    # Even after the lease lapses, a stale holder is still recognised (and then meets the 412).
    plane.ack(E, first["id"], 6.0)
    plane.expire(100.0)
    assert plane.item_for_token(sessions_token(first)) is not None


def test_update_merges_metadata() -> None:
    plane = ControlPlane([E])
    item = plane.enqueue(E, 0.0)
    plane.update(E, item.id, 1.0, {"a": "1", "b": "2"})
    assert plane.update(E, item.id, 2.0, {"a": None, "c": "3"})["metadata"] == {"b": "2", "c": "3"}


def test_faults_are_validated_and_banded() -> None:
    with pytest.raises(FaultsError):
        Faults(error_rate=1.5)
    with pytest.raises(FaultsError):
        Faults(endpoints=("nope",))
    with pytest.raises(FaultsError):
        Faults.from_json({"error_rate": "high"})
    with pytest.raises(FaultsError):
        Faults.from_json({"retry_after_seconds": 1.5})
    faults = Faults.from_json({"reset_rate": 0.25, "error_rate": 0.25, "rate_limit_rate": 0.5, "endpoints": ["poll"]})
    import random

    rng = random.Random(7)
    draws = [faults.decide("poll", rng) for _ in range(4000)]
    assert abs(draws.count("reset") / 4000 - 0.25) < 0.03
    assert abs(draws.count("error") / 4000 - 0.25) < 0.03
    assert draws.count("none") == 0
    assert faults.decide("heartbeat", rng) == "none"


# -- over HTTP ---------------------------------------------------------------

HEADERS = {"Authorization": f"Bearer {ENV_KEY}", "anthropic-beta": BETA}


async def request(
    sim: SimHandle, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, sim.url + path, headers=HEADERS if headers is None else headers, **kwargs) as r,
    ):
        return r.status, await r.json(content_type=None), r.headers


async def test_auth_and_beta_are_enforced(simulator: SimHandle) -> None:
    stats = f"/v1/environments/{ENV_ID}/work/stats"
    assert (await request(simulator, "GET", stats))[0] == 200
    status, body, headers = await request(simulator, "GET", stats, {"anthropic-beta": BETA})
    assert (status, body["error"]["type"]) == (401, "authentication_error")
    assert body["request_id"] == headers["request-id"]
    status, body, _ = await request(simulator, "GET", stats, {"Authorization": f"Bearer {ENV_KEY}"})
    assert (status, body["error"]["type"]) == (400, "invalid_request_error")
    # Another environment's key is not this environment's.
    status, _, _ = await request(simulator, "GET", f"/v1/environments/{OTHER_ENV_ID}/work/stats")
    assert status == 401
    # The organisation key works on stats (DOC-OPS), not on poll.
    org = {"x-api-key": API_KEY, "anthropic-beta": BETA}
    assert (await request(simulator, "GET", stats, org))[0] == 200
    # ... also as a Bearer token, the way the SDK sends an api_key.
    assert (await request(simulator, "GET", stats, {"Authorization": f"Bearer {API_KEY}", "anthropic-beta": BETA}))[
        0
    ] == 200
    assert (await request(simulator, "GET", f"/v1/environments/{ENV_ID}/work/poll", org))[0] == 401
    seen = simulator.sim.stats_json()
    assert seen["credentials"] == {"environment_key": 2, "rejected": 3, "organization_api_key": 2}
    assert fingerprint(ENV_KEY) in seen["credential_fingerprints"]
    assert ENV_KEY not in str(seen)


@pytest.mark.parametrize(
    "query",
    ["block_ms=0", "block_ms=1000", "block_ms=x", "reclaim_older_than_ms=-1", "block_ms=1&block_ms=2"],
)
async def test_bad_poll_parameters_are_400(simulator: SimHandle, query: str) -> None:
    status, body, _ = await request(simulator, "GET", f"/v1/environments/{ENV_ID}/work/poll?{query}")
    assert (status, body["error"]["type"]) == (400, "invalid_request_error")


async def test_long_poll_blocks_then_answers_null(simulator: SimHandle) -> None:
    started = time.monotonic()
    status, body, _ = await request(simulator, "GET", f"/v1/environments/{ENV_ID}/work/poll?block_ms=300")
    assert (status, body) == (200, None)
    assert 0.3 <= time.monotonic() - started < 0.6
    started = time.monotonic()
    status, body, _ = await request(simulator, "GET", f"/v1/environments/{ENV_ID}/work/poll")
    assert (status, body) == (200, None)
    assert time.monotonic() - started < 0.2


async def test_full_lifecycle_over_http(simulator: SimHandle) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(simulator.url + f"/_sim/environments/{ENV_ID}/work", json={"count": 1}) as r:
            (work_id,) = (await r.json())["ids"]
        base = f"/v1/environments/{ENV_ID}/work/{work_id}"
    status, item, _ = await request(
        simulator, "GET", f"/v1/environments/{ENV_ID}/work/poll", {**HEADERS, "Anthropic-Worker-ID": "host-1"}
    )
    assert (status, item["id"]) == (200, work_id)
    assert (await request(simulator, "POST", base + "/ack"))[1]["state"] == "starting"
    status, beat, _ = await request(simulator, "POST", base + "/heartbeat?expected_last_heartbeat=NO_HEARTBEAT")
    assert (status, beat["state"]) == (200, "active")
    status, body, _ = await request(simulator, "POST", base + "/heartbeat?desired_ttl_seconds=0")
    assert status == 400
    status, body, _ = await request(simulator, "POST", base + "/stop", data=b"not json")
    assert status == 400
    status, body, _ = await request(simulator, "POST", base + "/stop", json={"force": True})
    assert (status, body["state"]) == (200, "stopped")
    status, body, _ = await request(simulator, "POST", base + "/stop", json={"force": True})
    assert (status, body["error"]["type"]) == (409, "conflict_error")
    assert (await request(simulator, "GET", base))[1]["state"] == "stopped"
    listing = (await request(simulator, "GET", f"/v1/environments/{ENV_ID}/work?limit=10"))[1]
    assert [w["id"] for w in listing["data"]] == [work_id]
    stats = simulator.sim.stats_json()
    assert stats["requests"]["heartbeat"] == {"200": 1, "400": 1}
    assert stats["requests"]["stop"] == {"400": 1, "200": 1, "409": 1}
    assert stats["worker_ids"] == ["host-1"]


async def test_unknown_api_paths_get_the_error_envelope(simulator: SimHandle) -> None:
    status, body, headers = await request(simulator, "GET", "/v1/messages")
    assert status == 404
    assert body["error"]["type"] == "not_found_error"
    assert body["request_id"] == headers["request-id"]
    status, body, _ = await request(simulator, "DELETE", f"/v1/environments/{ENV_ID}/work/poll")
    assert (status, body["type"]) == (404, "error")


async def test_runtime_faults(simulator: SimHandle) -> None:
    stats_path = f"/v1/environments/{ENV_ID}/work/stats"
    async with aiohttp.ClientSession() as session:
        async with session.post(
            simulator.url + "/_sim/faults", json={"rate_limit_rate": 1.0, "retry_after_seconds": 4}
        ) as r:
            assert r.status == 200
        async with session.post(simulator.url + "/_sim/faults", json={"bogus": 1}) as r:
            assert r.status == 400
    status, body, headers = await request(simulator, "GET", stats_path)
    assert (status, body["error"]["type"], headers["retry-after"]) == (429, "rate_limit_error", "4")
    simulator.sim.faults = Faults(error_rate=1.0)
    assert (await request(simulator, "GET", stats_path))[0] == 500
    simulator.sim.faults = Faults(latency_seconds=0.3)
    started = time.monotonic()
    assert (await request(simulator, "GET", stats_path))[0] == 200
    assert time.monotonic() - started >= 0.3
    simulator.sim.faults = Faults(reset_rate=1.0)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await request(simulator, "GET", stats_path)
    assert simulator.sim.stats_json()["faults_injected"]["reset"] >= 1


async def test_reset_after_apply_loses_the_answer_but_keeps_the_effect(make_simulator: SimFactory) -> None:
    handle = await make_simulator(faults=Faults(reset_rate=1.0, reset_after_apply=True, endpoints=("heartbeat",)))
    (work_id,) = handle.sim.enqueue(ENV_ID)
    await request(handle, "GET", f"/v1/environments/{ENV_ID}/work/poll")
    await request(handle, "POST", f"/v1/environments/{ENV_ID}/work/{work_id}/ack")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await request(
            handle, "POST", f"/v1/environments/{ENV_ID}/work/{work_id}/heartbeat?expected_last_heartbeat=NO_HEARTBEAT"
        )
    (item,) = handle.sim.plane.items(ENV_ID)
    assert item.state == "active"
    assert item.last_heartbeat is not None
    await asyncio.sleep(0)
