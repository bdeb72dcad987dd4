"""Which environment a session belongs to: learned from answers, discovered when unseen, never guessed.

Checks `gateway/policy/links.py`, `gateway/upstream/discovery.py`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web

from gateway.policy.links import Link, Links, links_in_answer, teaches_links
from gateway.policy.routing import RouteName, classify, parse_target
from gateway.simulator import AgentScript, Faults, fingerprint

from .support import (
    ALL_ENVIRONMENTS_CLIENTS,
    ENV_ID,
    ENV_KEY,
    LIMITED_TOKEN,
    OTHER_ENV_ID,
    OTHER_ENV_KEY,
    TOKEN,
    GatewayFactory,
    Recorder,
    SimFactory,
    header,
    worker_headers,
)

SERVED = {ENV_ID, OTHER_ENV_ID}


def route(method: str, path: str) -> Any:
    return classify(method, parse_target(path))


def work_item(environment_id: str = ENV_ID, session_id: str = "sesn_1", data_type: str = "session") -> bytes:
    data = {"type": data_type, "id": session_id}
    return json.dumps({"type": "work", "id": "work_1", "environment_id": environment_id, "data": data}).encode()


def test_work_items_name_their_session() -> None:
    poll = route("GET", f"/v1/environments/{ENV_ID}/work/poll")
    assert links_in_answer(poll, work_item(), SERVED) == [Link(RouteName.SESSIONS, "sesn_1", ENV_ID)]
    ack = route("POST", f"/v1/environments/{ENV_ID}/work/work_1/ack")
    assert links_in_answer(ack, work_item(), SERVED) == [Link(RouteName.SESSIONS, "sesn_1", ENV_ID)]
    # Nothing from an item that claims another environment than the path's, a healthcheck, or junk.
    assert links_in_answer(poll, work_item(environment_id=OTHER_ENV_ID), SERVED) == []
    assert links_in_answer(poll, work_item(data_type="healthcheck"), SERVED) == []
    for body in (b"null", b"[1]", b"{", b'{"type": "work", "data": "x"}', b"\xff"):
        assert links_in_answer(poll, body, SERVED) == []


def test_a_session_names_its_environment_skills_and_memory_stores() -> None:
    session = {
        "type": "session",
        "id": "sesn_1",
        "environment_id": OTHER_ENV_ID,
        "agent": {"skills": [{"type": "custom", "skill_id": "skill_a"}, {"skill_id": 7}, "junk"]},
        "resources": [
            {"type": "memory_store", "memory_store_id": "memstore_a"},
            {"type": "file", "file_id": "file_a"},
        ],
    }
    retrieve = route("GET", "/v1/sessions/sesn_1")
    assert links_in_answer(retrieve, json.dumps(session).encode(), SERVED) == [
        Link(RouteName.SESSIONS, "sesn_1", OTHER_ENV_ID),
        Link(RouteName.SKILLS, "skill_a", OTHER_ENV_ID),
        Link(RouteName.MEMORY_STORES, "memstore_a", OTHER_ENV_ID),
    ]
    # Another session's answer, or an environment this gateway does not serve, teaches nothing.
    assert links_in_answer(route("GET", "/v1/sessions/sesn_2"), json.dumps(session).encode(), SERVED) == []
    assert links_in_answer(retrieve, json.dumps(session).encode(), {ENV_ID}) == []


def test_only_work_item_and_session_answers_are_read() -> None:
    assert teaches_links("GET", route("GET", f"/v1/environments/{ENV_ID}/work/poll"))
    assert teaches_links("GET", route("GET", f"/v1/environments/{ENV_ID}/work/work_1"))
    assert teaches_links("GET", route("GET", "/v1/sessions/sesn_1"))
    assert not teaches_links("GET", route("GET", "/v1/sessions/sesn_1/events/stream"))
    assert not teaches_links("POST", route("POST", "/v1/sessions/sesn_1"))
    assert not teaches_links("GET", route("GET", f"/v1/environments/{ENV_ID}/work"))
    assert not teaches_links("GET", route("GET", "/v1/skills/skill_1"))


def test_the_table_is_bounded_and_keeps_what_is_used() -> None:
    links = Links(max_links=3)
    for n in range(3):
        links.learn(Link(RouteName.SESSIONS, f"s{n}", ENV_ID))
    assert links.environments(RouteName.SESSIONS, "s0") == (ENV_ID,)  # used: now the freshest
    links.learn(Link(RouteName.SESSIONS, "s3", ENV_ID))
    assert len(links) == 3
    assert links.environments(RouteName.SESSIONS, "s1") == ()  # the least recently used went
    assert links.environments(RouteName.SESSIONS, "s0") == (ENV_ID,)
    # A skill seen in several environments keeps the latest few, newest first.
    for env in ("e1", "e2", "e3", "e4", "e5", "e2"):
        links.learn(Link(RouteName.SKILLS, "k", env))
    assert links.environments(RouteName.SKILLS, "k") == ("e2", "e5", "e4", "e3")


# -- through the gateway ---------------------------------------------------------------


async def get(url: str, headers: dict[str, str]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def test_a_poll_through_the_gateway_teaches_it_the_sessions_environment(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    sim = await make_simulator()
    gateway = await make_gateway(sim.url, clients=ALL_ENVIRONMENTS_CLIENTS)
    sim.sim.enqueue(OTHER_ENV_ID)
    status, item = await get(f"{gateway.proxy_url}/v1/environments/{OTHER_ENV_ID}/work/poll", worker_headers())
    assert status == 200
    session = item["data"]["id"]
    # The token may use both environments; the poll said which one this session is in.
    status, body = await get(f"{gateway.proxy_url}/v1/sessions/{session}", worker_headers())
    assert (status, body["environment_id"]) == (200, OTHER_ENV_ID)
    assert sim.sim.credentials_by_endpoint["session"] == {"environment_key": 1}
    assert sim.sim.count("session") == 1  # no lookup was needed
    # A token that may not use that environment is refused without an upstream call.
    prod_only = await make_gateway(
        sim.url, clients=ALL_ENVIRONMENTS_CLIENTS.replace(f"[{OTHER_ENV_ID}]", f"[{ENV_ID}]")
    )
    sim.sim.enqueue(OTHER_ENV_ID)
    _, polled = await get(f"{prod_only.proxy_url}/v1/environments/{OTHER_ENV_ID}/work/poll", worker_headers())
    events = f"{prod_only.proxy_url}/v1/sessions/{polled['data']['id']}/events"
    status, body = await get(events, {"x-api-key": LIMITED_TOKEN})
    assert status == 403
    assert "belongs to an environment this client token may not use" in body["error"]["message"]
    assert OTHER_ENV_ID not in body["error"]["message"]
    assert sim.sim.count("events") == 0


async def test_an_unseen_session_is_looked_up_with_the_tokens_keys_once_for_all_waiters(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    sim = await make_simulator(script=AgentScript())
    gateway = await make_gateway(sim.url, clients=ALL_ENVIRONMENTS_CLIENTS)
    # Queued and polled elsewhere: this gateway never saw the item.
    sim.sim.enqueue(OTHER_ENV_ID)
    (session,) = sim.sim.sessions.all()
    url = f"{gateway.proxy_url}/v1/sessions/{session.id}/events"
    answers = await asyncio.gather(*(get(url, worker_headers()) for _ in range(10)))
    assert {status for status, _ in answers} == {200}
    # One lookup: the first environment's key is not this session's (404), the second's is.
    assert sim.sim.requests["session"] == {"404": 1, "200": 1}
    assert sim.sim.credentials_by_endpoint["events"] == {"environment_key": 10}
    assert fingerprint(TOKEN) not in sim.sim.stats_json()["credential_fingerprints"]
    metrics = next(iter(gateway.metrics.session_discoveries.collect())).samples
    assert {s.labels["result"]: s.value for s in metrics if s.name.endswith("_total")}["found"] == 1
    # Learned: the next call needs no lookup.
    await get(url, worker_headers())
    assert sim.sim.count("session") == 2


async def test_a_session_no_key_can_read_is_403_and_not_asked_about_again_at_once(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    sim = await make_simulator()
    gateway = await make_gateway(sim.url, clients=ALL_ENVIRONMENTS_CLIENTS)
    url = f"{gateway.proxy_url}/v1/sessions/sesn_unknown/events/stream"
    for _ in range(3):
        status, body = await get(url, worker_headers())
        assert status == 403
        assert "cannot tell which environment session sesn_unknown belongs to" in body["error"]["message"]
    assert sim.sim.requests["session"] == {"404": 2}  # one lookup, one try per environment
    assert sim.sim.count("stream") == 0


async def test_an_upstream_failure_during_the_lookup_is_the_upstreams_error_not_a_403(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    sim = await make_simulator(faults=Faults(reset_rate=1.0, endpoints=("session",)))
    gateway = await make_gateway(sim.url, clients=ALL_ENVIRONMENTS_CLIENTS)
    sim.sim.enqueue(OTHER_ENV_ID)
    (session,) = sim.sim.sessions.all()
    status, body = await get(f"{gateway.proxy_url}/v1/sessions/{session.id}/events", worker_headers())
    assert (status, body["error"]["type"]) == (502, "api_error")
    # Not remembered as unknown: once the upstream is back, the lookup succeeds.
    sim.sim.faults = Faults()
    status, _ = await get(f"{gateway.proxy_url}/v1/sessions/{session.id}/events", worker_headers())
    assert status == 200


async def test_lookups_send_only_the_keys_the_token_may_use(
    recorder: tuple[Recorder, str], make_gateway: GatewayFactory
) -> None:
    rec, url = recorder

    async def not_found(request: web.Request) -> web.StreamResponse:
        return web.json_response({"type": "error", "error": {"type": "not_found_error", "message": "no"}}, status=404)

    rec.respond = not_found
    gateway = await make_gateway(url, clients=ALL_ENVIRONMENTS_CLIENTS)
    await get(f"{gateway.proxy_url}/v1/sessions/sesn_x", {"x-api-key": LIMITED_TOKEN})
    await get(f"{gateway.proxy_url}/v1/sessions/sesn_y", worker_headers())
    sent = [(r.raw_path, header(r.headers, "Authorization")) for r in rec.requests]
    assert sent == [
        ("/v1/sessions/sesn_x", [f"Bearer {OTHER_ENV_KEY}"]),  # one environment: sent as is, no lookup
        ("/v1/sessions/sesn_y", [f"Bearer {ENV_KEY}"]),  # the lookup, with each key in turn
        ("/v1/sessions/sesn_y", [f"Bearer {OTHER_ENV_KEY}"]),
    ]


THIRD_ENV_ID = "env_0000000000000000000Third"
THIRD_ENV_KEY = "sk-ant-envkey-PLANTED-6666666666666666"
# Two tokens of two environments each, overlapping in the first.
OVERLAPPING = f"""
listen: {{host: 127.0.0.1, port: 0}}
admin: {{host: 127.0.0.1, port: 0}}
upstream: {{base_url: "%(upstream)s"}}
environments:
  - {{id: {ENV_ID}, key_env: TEST_ENV_KEY}}
  - {{id: {OTHER_ENV_ID}, key_env: TEST_OTHER_ENV_KEY}}
  - {{id: {THIRD_ENV_ID}, key_env: TEST_THIRD_ENV_KEY}}
clients:
  tokens:
    - {{token_env: TEST_TOKEN, environments: [{ENV_ID}, {OTHER_ENV_ID}]}}
    - {{token_env: TEST_LIMITED_TOKEN, environments: [{ENV_ID}, {THIRD_ENV_ID}]}}
%(extra)s
"""


async def overlapping(make_simulator: SimFactory, extra: str = "", **sim: Any) -> tuple[Any, Any]:
    from gateway.app import Gateway
    from gateway.config.load import load_settings

    from .support import ENVIRON

    handle = await make_simulator(
        environments={ENV_ID: ENV_KEY, OTHER_ENV_ID: OTHER_ENV_KEY, THIRD_ENV_ID: THIRD_ENV_KEY}, **sim
    )
    settings = load_settings(
        OVERLAPPING % {"upstream": handle.url, "extra": extra}, {**ENVIRON, "TEST_THIRD_ENV_KEY": THIRD_ENV_KEY}
    )
    gateway = Gateway(settings)
    await gateway.start()
    return handle, gateway


async def test_one_tokens_failed_lookup_does_not_answer_for_another_tokens_keys(make_simulator: SimFactory) -> None:
    fallback = "default_credential: {api_key_env: TEST_API_KEY, use_for: [sessions]}"
    sim, gateway = await overlapping(make_simulator, fallback)
    try:
        sim.sim.enqueue(THIRD_ENV_ID)
        (session,) = sim.sim.sessions.all()
        url = f"{gateway.proxy_url}/v1/sessions/{session.id}/events"
        # TOKEN's environments cannot read it: its organisation fallback applies (it is configured)...
        assert (await get(url, worker_headers()))[0] == 200
        assert sim.sim.credentials_by_endpoint["events"] == {"organization_api_key": 1}
        # ...but LIMITED_TOKEN's other environment can: its own key, never the organisation's.
        assert (await get(url, {"x-api-key": LIMITED_TOKEN}))[0] == 200
        assert sim.sim.credentials_by_endpoint["events"] == {"organization_api_key": 1, "environment_key": 1}
        # Two misses for TOKEN's keys; the first environment's not tried again for LIMITED_TOKEN.
        assert sim.sim.requests["session"] == {"404": 2, "200": 1}
    finally:
        await gateway.stop()


async def test_a_lookup_running_for_other_keys_is_not_joined(make_simulator: SimFactory) -> None:
    sim, gateway = await overlapping(make_simulator)
    try:
        sim.sim.enqueue(THIRD_ENV_ID)
        (session,) = sim.sim.sessions.all()
        sim.sim.faults = Faults(latency_seconds=0.3, endpoints=("session",))
        url = f"{gateway.proxy_url}/v1/sessions/{session.id}/events"
        first = asyncio.ensure_future(get(url, worker_headers()))
        await asyncio.sleep(0.1)
        second = await get(url, {"x-api-key": LIMITED_TOKEN})
        assert (await first)[0] == 403  # neither of its environments has the session
        assert second[0] == 200
    finally:
        await gateway.stop()


async def test_a_rate_limit_or_error_during_a_lookup_is_retryable_and_not_remembered(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    for fault in (Faults(rate_limit_rate=1.0, endpoints=("session",)), Faults(error_rate=1.0, endpoints=("session",))):
        sim = await make_simulator()
        gateway = await make_gateway(sim.url, clients=ALL_ENVIRONMENTS_CLIENTS)
        sim.sim.enqueue(OTHER_ENV_ID)
        (session,) = sim.sim.sessions.all()
        sim.sim.faults = fault
        url = f"{gateway.proxy_url}/v1/sessions/{session.id}/events"
        status, body = await get(url, worker_headers())
        # Not a 403 the SDK would give up on: a 5xx it retries, as it would retry the API's own answer.
        assert (status, body["error"]["type"]) == (502, "api_error")
        sim.sim.faults = Faults()
        assert (await get(url, worker_headers()))[0] == 200


async def test_the_gateways_own_refusals_come_before_any_lookup(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    sim = await make_simulator()
    gateway = await make_gateway(sim.url, clients=ALL_ENVIRONMENTS_CLIENTS)
    sim.sim.enqueue(OTHER_ENV_ID)
    (session,) = sim.sim.sessions.all()
    url = f"{gateway.proxy_url}/v1/sessions/{session.id}/events"
    status, _ = await get(url, {**worker_headers(), "Cookie": f"t={TOKEN}"})
    assert status == 401
    async with aiohttp.ClientSession() as http:
        headers = {**worker_headers(), "Content-Length": str(10**12)}
        async with http.post(url, headers=headers, data=b"") as response:
            assert response.status == 413
    assert sim.sim.count("session") == 0


async def test_compressed_answers_are_learned_from_and_reach_the_worker_unchanged(
    make_simulator: SimFactory, make_gateway: GatewayFactory
) -> None:
    sim = await make_simulator(compress=True)
    gateway = await make_gateway(
        sim.url, clients=ALL_ENVIRONMENTS_CLIENTS.replace("clients:", "clients:\n  discover_sessions: false")
    )
    sim.sim.enqueue(OTHER_ENV_ID)
    async with (
        aiohttp.ClientSession(auto_decompress=False) as http,
        http.get(
            f"{gateway.proxy_url}/v1/environments/{OTHER_ENV_ID}/work/poll",
            headers={**worker_headers(), "Accept-Encoding": "gzip"},
        ) as response,
    ):
        assert response.headers["Content-Encoding"] == "gzip"
        import gzip

        item = json.loads(gzip.decompress(await response.read()))
    # Discovery is off: only what the gateway learned from the gzipped poll can tell.
    status, _ = await get(f"{gateway.proxy_url}/v1/sessions/{item['data']['id']}", worker_headers())
    assert status == 200
    assert sim.sim.credentials_by_endpoint["session"] == {"environment_key": 1}
