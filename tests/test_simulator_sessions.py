"""The simulator's sessions: the scripted agent as transcripts, and its HTTP surface with the API's credential rules.

Checks `gateway/simulator/sessions.py`.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import aiohttp
import pytest

from gateway.simulator import AgentScript, Faults, SessionStore, SimError

from .support import API_KEY, BETA, ENV_ID, ENV_KEY, OTHER_ENV_KEY, SimFactory, SimHandle

E = "env_1"
MEMORY_BETA = "agent-memory-2026-07-22"


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def test_a_session_starts_waiting_for_its_first_tool_use() -> None:
    store = SessionStore(AgentScript(commands=("echo hello", "date")))
    session = store.create(E, 1.0)
    assert session.status == "idle"
    assert types(session.events) == [
        "user.message",
        "session.status_running",
        "agent.tool_use",
        "session.status_idle",
    ]
    tool_use, idle = session.events[2], session.events[3]
    assert (tool_use["name"], tool_use["input"]) == ("bash", {"command": "echo hello"})
    assert idle["stop_reason"] == {"type": "requires_action", "event_ids": [tool_use["id"]]}
    assert all(e["id"].startswith("sevt_") and e["processed_at"] for e in session.events)
    retrieved = store.retrieve(session)
    assert (retrieved["type"], retrieved["environment_id"], retrieved["status"]) == ("session", E, "idle")
    assert retrieved["agent"]["skills"] == []
    assert retrieved["resources"] == []


def test_each_tool_result_moves_the_script_on_until_the_turn_ends() -> None:
    store = SessionStore(AgentScript(commands=("echo hello", "date")))
    session = store.create(E, 0.0)
    first = session.pending_tool_use
    result = {"type": "user.tool_result", "tool_use_id": first, "content": [{"type": "text", "text": "hello"}]}
    answer, appended = store.send(session, [result], 1.0)
    assert types(answer["data"]) == ["user.tool_result"]
    assert types(appended) == ["user.tool_result", "session.status_running", "agent.tool_use", "session.status_idle"]
    assert appended[2]["input"] == {"command": "date"}
    second = session.pending_tool_use
    assert second not in (None, first)
    result2 = {"type": "user.tool_result", "tool_use_id": second, "content": [{"type": "text", "text": "Tue"}]}
    _, appended = store.send(session, [result2], 2.0)
    assert types(appended) == ["user.tool_result", "session.status_running", "agent.message", "session.status_idle"]
    assert appended[-1]["stop_reason"] == {"type": "end_turn"}
    assert appended[2]["content"][0]["text"] == "The commands printed: hello | Tue"
    assert session.status == "idle"
    assert [r["tool_use_id"] for r in session.tool_results] == [first, second]
    # A result for nothing pending is refused and changes nothing.
    with pytest.raises(SimError) as exc:
        store.send(session, [result], 3.0)
    assert exc.value.status == 400
    assert len(session.tool_results) == 2


def test_terminate_after_turn_ends_the_session() -> None:
    store = SessionStore(AgentScript(terminate_after_turn=True))
    session = store.create(E, 0.0)
    result: dict[str, Any] = {"type": "user.tool_result", "tool_use_id": session.pending_tool_use, "content": []}
    _, appended = store.send(session, [result], 1.0)
    assert types(appended)[-1] == "session.status_terminated"
    assert session.status == "terminated"
    with pytest.raises(SimError):
        store.send(session, [{"type": "user.message", "content": []}], 2.0)


@pytest.mark.parametrize(
    "events", [None, [], ["x"], [{"type": "agent.message"}], [{"type": "user.tool_result", "tool_use_id": "nope"}]]
)
def test_bad_events_are_400(events: object) -> None:
    store = SessionStore()
    session = store.create(E, 0.0)
    with pytest.raises(SimError) as exc:
        store.send(session, events, 1.0)
    assert (exc.value.status, exc.value.error_type) == (400, "invalid_request_error")
    assert len(session.events) == 4


def test_history_pages() -> None:
    store = SessionStore(AgentScript(commands=("a", "b", "c")))
    session = store.create(E, 0.0)
    for _ in range(3):
        tool_use = session.pending_tool_use
        store.send(session, [{"type": "user.tool_result", "tool_use_id": tool_use, "content": []}], 1.0)
    everything = store.list_events(session, limit=1000, page=None)
    assert everything["next_page"] is None
    pages, page = [], None
    while True:
        listing = store.list_events(session, limit=5, page=page)
        pages += listing["data"]
        if not (page := listing["next_page"]):
            break
    assert pages == everything["data"]
    with pytest.raises(SimError):
        store.list_events(session, limit=5, page="garbage!")


def test_memory_store_crud_with_preconditions() -> None:
    store = SessionStore(AgentScript(memory_store=True))
    session = store.create(E, 0.0)
    assert session.memory_store_id is not None
    sid = session.memory_store_id
    (notes,) = store.list_memories(sid, view="basic", limit=20, page=None, prefix="")["data"]
    assert (notes["path"], notes["content"]) == ("/notes.md", None)
    full = store.retrieve_memory(sid, notes["id"])
    assert full["content"].startswith("Remember")
    created = store.create_memory(sid, {"path": "/todo.md", "content": "x"}, 1.0)
    with pytest.raises(SimError) as exc:
        store.create_memory(sid, {"path": "/todo.md", "content": "y"}, 1.0)
    assert exc.value.status == 409
    with pytest.raises(SimError) as exc:
        store.update_memory(sid, created["id"], {"content": "z", "precondition": {"content_sha256": "0" * 64}}, 2.0)
    assert exc.value.status == 409
    updated = store.update_memory(
        sid, created["id"], {"content": "z", "precondition": {"content_sha256": created["content_sha256"]}}, 2.0
    )
    assert updated["content"] == "z"
    assert updated["memory_version_id"] != created["memory_version_id"]
    with pytest.raises(SimError):
        store.delete_memory(sid, created["id"], "0" * 64)
    store.delete_memory(sid, created["id"], updated["content_sha256"])
    assert [m["path"] for m in store.list_memories(sid, view="full", limit=20, page=None, prefix="")["data"]] == [
        "/notes.md"
    ]


# -- over HTTP ---------------------------------------------------------------


def bearer(credential: str, beta: str | None = BETA) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {credential}"}
    if beta:
        headers["anthropic-beta"] = beta
    return headers


async def call(sim: SimHandle, method: str, path: str, headers: dict[str, str], body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.request(method, sim.url + path, headers=headers, json=body) as r:
        return r.status, await r.json(content_type=None)


def sessions_token(polled: dict[str, Any]) -> str:
    secret = polled["secret"]
    token: str = json.loads(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4)))["sessions_token"]
    return token


async def poll(sim: SimHandle) -> dict[str, Any]:
    status, item = await call(sim, "GET", f"/v1/environments/{ENV_ID}/work/poll", bearer(ENV_KEY))
    assert status == 200
    assert item is not None
    return item  # type: ignore[no-any-return]


async def test_credentials_on_session_skill_and_memory_paths(make_simulator: SimFactory) -> None:
    sim = await make_simulator(issue_secrets=True, script=AgentScript(skills=("skill_hi",), memory_store=True))
    sim.sim.enqueue(ENV_ID, count=2)
    item, other_item = await poll(sim), await poll(sim)
    session_id = item["data"]["id"]
    token, other_token = sessions_token(item), sessions_token(other_item)
    session_path = f"/v1/sessions/{session_id}"
    expectations = [
        (bearer(ENV_KEY), 200),
        (bearer(token), 200),
        (bearer(API_KEY), 200),
        ({"x-api-key": API_KEY, "anthropic-beta": BETA}, 200),
        (bearer(OTHER_ENV_KEY), 404),  # a real key, of an environment that cannot see this session
        (bearer(other_token), 404),  # another item's token
        (bearer("sk-ant-junk"), 401),
        ({"anthropic-beta": BETA}, 401),
        (bearer(ENV_KEY, beta=None), 400),
    ]
    for headers, status in expectations:
        assert (await call(sim, "GET", session_path, headers))[0] == status, headers
    assert (await call(sim, "GET", "/v1/sessions/sesn_nope", bearer(ENV_KEY)))[0] == 404
    _, session = await call(sim, "GET", session_path, bearer(ENV_KEY))
    assert session["agent"]["skills"] == [{"type": "custom", "skill_id": "skill_hi", "version": "latest"}]
    # Skills: no beta needed; the session's environment key or token; content is a zip.
    _, version = await call(sim, "GET", "/v1/skills/skill_hi/versions/latest", bearer(ENV_KEY, beta=None))
    assert version["type"] == "skill_version"
    async with (
        aiohttp.ClientSession() as http,
        http.get(sim.url + f"/v1/skills/skill_hi/versions/{version['id']}/content", headers=bearer(token, None)) as r,
    ):
        assert r.status == 200
        assert (await r.read()).startswith(b"PK")
    assert (await call(sim, "GET", "/v1/skills/skill_hi/versions/latest", bearer(OTHER_ENV_KEY)))[0] == 404
    # Memory stores: the sessions token only (or the organisation key); the environment key is refused.
    (store,) = [r for r in session["resources"] if r["type"] == "memory_store"]
    memories = f"/v1/memory_stores/{store['memory_store_id']}/memories"
    assert (await call(sim, "GET", memories, bearer(token, MEMORY_BETA)))[0] == 200
    status, error = await call(sim, "GET", memories, bearer(ENV_KEY, MEMORY_BETA))
    assert (status, error["error"]["type"]) == (403, "permission_error")
    assert (await call(sim, "GET", memories, bearer(other_token, MEMORY_BETA)))[0] == 404
    assert (await call(sim, "GET", memories, bearer(token, BETA)))[0] == 400
    stats = sim.sim.stats_json()
    assert stats["credentials_by_endpoint"]["memories"] == {"sessions_token": 2, "rejected": 1}
    assert stats["credentials_by_endpoint"]["session"]["organization_api_key"] == 2


async def read_frames(response: aiohttp.ClientResponse, count: int) -> list[tuple[str, dict[str, Any]]]:
    frames: list[tuple[str, dict[str, Any]]] = []
    buffer = b""
    while len(frames) < count:
        buffer += await response.content.readany()
        while b"\n\n" in buffer:
            raw, buffer = buffer.split(b"\n\n", 1)
            lines = dict(line.split(": ", 1) for line in raw.decode().splitlines())
            frames.append((lines["event"], json.loads(lines["data"])))
    return frames


async def test_the_stream_carries_new_events_as_named_frames(make_simulator: SimFactory) -> None:
    sim = await make_simulator(script=AgentScript(terminate_after_turn=True))
    sim.sim.enqueue(ENV_ID)
    session_id = (await poll(sim))["data"]["id"]
    base = f"/v1/sessions/{session_id}"
    async with (
        aiohttp.ClientSession() as http,
        http.get(sim.url + base + "/events/stream", headers=bearer(ENV_KEY)) as stream,
    ):
        assert stream.status == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        assert stream.headers["request-id"].startswith("req_")
        _, history = await call(sim, "GET", base + "/events?limit=1000", bearer(ENV_KEY))
        (tool_use,) = [e for e in history["data"] if e["type"] == "agent.tool_use"]
        result = {"type": "user.tool_result", "tool_use_id": tool_use["id"], "is_error": False, "content": []}
        status, answer = await call(sim, "POST", base + "/events", bearer(ENV_KEY), {"events": [result]})
        assert status == 200
        assert types(answer["data"]) == ["user.tool_result"]
        frames = await asyncio.wait_for(read_frames(stream, 5), 5)
        assert [name for name, _ in frames] == [data["type"] for _, data in frames]
        assert [name for name, _ in frames][-2:] == ["session.status_idle", "session.status_terminated"]
        # Terminated: the stream ends.
        assert await asyncio.wait_for(stream.content.read(), 5) == b""
    assert sim.sim.stats_json()["requests"]["stream"] == {"200": 1}


async def test_faults_apply_to_session_endpoints(make_simulator: SimFactory) -> None:
    sim = await make_simulator(faults=Faults(error_rate=1.0, endpoints=("session",)))
    sim.sim.enqueue(ENV_ID)
    session_id = (await poll(sim))["data"]["id"]
    status, body = await call(sim, "GET", f"/v1/sessions/{session_id}", bearer(ENV_KEY))
    assert (status, body["error"]["type"]) == (500, "api_error")
    assert (await call(sim, "GET", f"/v1/sessions/{session_id}/events", bearer(ENV_KEY)))[0] == 200
