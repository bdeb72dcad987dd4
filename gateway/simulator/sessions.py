"""The simulated sessions API: sessions with a scripted agent, their events, skills and memory stores.

No I/O here, like `control_plane`: every operation takes `now` and returns
JSON-ready data (plus, for a sent event, the events it caused, which the app
pushes to open streams) or raises `SimError`. Shapes follow the SDK types
(`anthropic==2.10.0`, `@anthropic-ai/sdk@1.10.0`) and what their workers
were seen reading (environments-api.md §10); each behaviour and assumption is
listed in `gateway.simulator`'s docstring.

The agent is a script: the session starts with a user message and the
agent's first `bash` tool use already in the history, idle with
`requires_action` (the state a session is in when its work item is queued).
Each `user.tool_result` for the pending tool use makes the agent ask for
the next command, or, after the last one, answer with a message and end
its turn (`session.status_idle`, `end_turn`). The worker then finishes after
its `max_idle`; with `terminate_after_turn` the session also terminates,
which ends the worker's run at once.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import zipfile
from dataclasses import dataclass, field
from typing import Any

from .control_plane import SimError, page_cursor, page_offset, rfc3339

__all__ = ["AgentScript", "Session", "SessionStore", "SkillVersion"]

MAX_EVENTS_LIMIT = 1000
DEFAULT_EVENTS_LIMIT = 20
MAX_MEMORIES_LIMIT = 100
# ASSUMPTION: the event types a client may send that the simulated agent understands.
_SENDABLE = frozenset({"user.message", "user.tool_result", "user.interrupt"})


@dataclass(frozen=True, slots=True)
class AgentScript:
    # The bash commands the agent asks the worker to run, one tool use each, in order.
    commands: tuple[str, ...] = ("echo hello",)
    # Also emit `session.status_terminated` once the turn ends.
    terminate_after_turn: bool = False
    # Custom skills on the agent (their ids); each has one version with a small zip.
    skills: tuple[str, ...] = ()
    # Attach one memory store to every session (its memories need the sessions token).
    memory_store: bool = False


@dataclass(frozen=True, slots=True)
class SkillVersion:
    id: str
    skill_id: str
    name: str
    created_at: float
    content: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "skill_version",
            "id": self.id,
            "skill_id": self.skill_id,
            "name": self.name,
            "description": f"The simulator's skill {self.name}",
            "created_at": rfc3339(self.created_at),
        }


@dataclass(slots=True)
class Memory:
    id: str
    memory_store_id: str
    path: str
    content: str
    created_at: float
    updated_at: float
    version: int = 1

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content.encode()).hexdigest()

    def to_json(self, *, full: bool) -> dict[str, Any]:
        return {
            "type": "memory",
            "id": self.id,
            "memory_store_id": self.memory_store_id,
            "memory_version_id": f"memver_{self.id.removeprefix('mem_')}_{self.version}",
            "path": self.path,
            "content": self.content if full else None,
            "content_sha256": self.sha256,
            "content_size_bytes": len(self.content.encode()),
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
        }


@dataclass(slots=True)
class Session:
    id: str
    environment_id: str
    created_at: float
    updated_at: float
    status: str = "idle"
    events: list[dict[str, Any]] = field(default_factory=list)
    # The tool use the agent waits for, and how far through the script it is.
    pending_tool_use: str | None = None
    step: int = 0
    # What the worker sent back for each tool use, for tests to read.
    tool_results: list[dict[str, Any]] = field(default_factory=list)
    memory_store_id: str | None = None


class SessionStore:
    def __init__(self, script: AgentScript | None = None) -> None:
        self.script = script or AgentScript()
        self._sessions: dict[str, Session] = {}
        self._session_ids = itertools.count(1)
        self._ids = itertools.count(1)
        self._skills: dict[str, SkillVersion] = {}
        self._memories: dict[str, dict[str, Memory]] = {}

    # -- sessions ---------------------------------------------------------------

    def create(self, environment_id: str, now: float) -> Session:
        n = next(self._session_ids)
        session = Session(f"sesn_sim{n:08d}", environment_id, now, now)
        if self.script.memory_store:
            session.memory_store_id = f"memstore_sim{n:08d}"
            self._memories[session.memory_store_id] = {}
            self._put_memory(session.memory_store_id, "/notes.md", "Remember: the simulator says hello.\n", now)
        for skill_id in self.script.skills:
            self._skill(skill_id, now)
        self._append(session, now, {"type": "user.message", "content": [{"type": "text", "text": "Say hello."}]})
        self._agent_turn(session, now)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise SimError(404, "not_found_error", f"session {session_id} not found")
        return session

    def all(self) -> list[Session]:
        return list(self._sessions.values())

    def find(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def retrieve(self, session: Session) -> dict[str, Any]:
        resources = []
        if session.memory_store_id is not None:
            resources.append(
                {
                    "type": "memory_store",
                    "memory_store_id": session.memory_store_id,
                    "name": "notes",
                    "access": "read_write",
                    "description": None,
                    "instructions": None,
                    # No mount_path: the worker puts the store under its workdir.
                    "mount_path": None,
                }
            )
        return {
            "type": "session",
            "id": session.id,
            "environment_id": session.environment_id,
            "status": session.status,
            "title": "Simulated session",
            "metadata": {},
            "created_at": rfc3339(session.created_at),
            "updated_at": rfc3339(session.updated_at),
            "archived_at": None,
            "agent": {
                "type": "agent",
                "id": "agent_sim00000001",
                "name": "simulated-agent",
                "version": 1,
                "description": None,
                "system": None,
                "model": {"id": "claude-simulated"},
                "mcp_servers": [],
                "skills": [{"type": "custom", "skill_id": s, "version": "latest"} for s in self.script.skills],
                "tools": [{"type": "agent_toolset_20260401"}],
            },
            "resources": resources,
            "vault_ids": [],
            "outcome_evaluations": [],
            "stats": {"active_seconds": 0.0, "duration_seconds": 0.0},
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }

    def list_events(self, session: Session, *, limit: int, page: str | None) -> dict[str, Any]:
        start = page_offset(page)
        chunk = session.events[start : start + limit]
        more = start + limit < len(session.events)
        return {"data": chunk, "next_page": page_cursor(start + limit) if more else None}

    def send(self, session: Session, events: object, now: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """A client sent events; returns the answer and every event appended (for open streams)."""
        if not isinstance(events, list) or not events or not all(isinstance(e, dict) for e in events):
            raise SimError(400, "invalid_request_error", "events must be a non-empty list of event objects")
        if session.status == "terminated":
            raise SimError(400, "invalid_request_error", f"session {session.id} is terminated")
        for event in events:
            if event.get("type") not in _SENDABLE:
                raise SimError(400, "invalid_request_error", f"unsupported event type {event.get('type')!r}")
            if event["type"] == "user.tool_result" and event.get("tool_use_id") != session.pending_tool_use:
                raise SimError(400, "invalid_request_error", "tool_use_id names no tool use waiting for a result")
        first = len(session.events)
        accepted = [self._append(session, now, dict(event)) for event in events]
        for event in accepted:
            if event["type"] == "user.tool_result":
                session.tool_results.append(event)
                session.pending_tool_use = None
                session.step += 1
                self._agent_turn(session, now)
            elif event["type"] == "user.message":
                session.step = 0
                self._agent_turn(session, now)
            elif event["type"] == "user.interrupt":
                session.pending_tool_use = None
                self._end_turn(session, now, "The run was interrupted.")
        return {"data": accepted}, session.events[first:]

    def _agent_turn(self, session: Session, now: float) -> None:
        """The agent's next move: ask for the next command, or answer and end the turn."""
        self._status(session, now, "running")
        commands = self.script.commands
        if session.step < len(commands):
            tool_use = self._append(
                session,
                now,
                {"type": "agent.tool_use", "name": "bash", "input": {"command": commands[session.step]}},
            )
            session.pending_tool_use = tool_use["id"]
            self._status(session, now, "idle", {"type": "requires_action", "event_ids": [tool_use["id"]]})
            return
        outputs = [_text_of(result) for result in session.tool_results[-len(commands) :]] if commands else []
        self._end_turn(session, now, "The commands printed: " + " | ".join(outputs) if outputs else "Hello.")

    def _end_turn(self, session: Session, now: float, message: str) -> None:
        self._append(session, now, {"type": "agent.message", "content": [{"type": "text", "text": message}]})
        self._status(session, now, "idle", {"type": "end_turn"})
        if self.script.terminate_after_turn:
            session.status = "terminated"
            self._append(session, now, {"type": "session.status_terminated"})

    def _status(self, session: Session, now: float, status: str, stop_reason: dict[str, Any] | None = None) -> None:
        session.status = status
        event: dict[str, Any] = {"type": f"session.status_{status}"}
        if stop_reason is not None:
            event["stop_reason"] = stop_reason
        self._append(session, now, event)

    def _append(self, session: Session, now: float, event: dict[str, Any]) -> dict[str, Any]:
        event["id"] = f"sevt_sim{next(self._ids):08d}"
        event["processed_at"] = rfc3339(now)
        session.events.append(event)
        session.updated_at = now
        return event

    # -- skills -------------------------------------------------------------------

    def _skill(self, skill_id: str, now: float) -> SkillVersion:
        version = self._skills.get(skill_id)
        if version is None:
            name = skill_id.removeprefix("skill_").replace("_", "-") or "skill"
            version = SkillVersion(
                f"skillver_sim{next(self._ids):08d}", skill_id, name, now, _skill_archive(name, skill_id)
            )
            self._skills[skill_id] = version
        return version

    def skill_version(self, skill_id: str, version: str) -> SkillVersion:
        found = self._skills.get(skill_id)
        if found is None or version not in ("latest", found.id):
            raise SimError(404, "not_found_error", f"skill {skill_id} has no version {version}")
        return found

    def sessions_using_skill(self, skill_id: str) -> list[Session]:
        if skill_id not in self.script.skills:
            return []
        return list(self._sessions.values())

    # -- memory stores --------------------------------------------------------------

    def session_of_store(self, memory_store_id: str) -> Session | None:
        return next((s for s in self._sessions.values() if s.memory_store_id == memory_store_id), None)

    def list_memories(self, store_id: str, *, view: str, limit: int, page: str | None, prefix: str) -> dict[str, Any]:
        memories = sorted((m for m in self._store(store_id).values() if m.path.startswith(prefix)), key=_by_path)
        start = page_offset(page)
        chunk = memories[start : start + limit]
        more = start + limit < len(memories)
        return {
            "data": [m.to_json(full=view == "full") for m in chunk],
            "next_page": page_cursor(start + limit) if more else None,
        }

    def retrieve_memory(self, store_id: str, memory_id: str) -> dict[str, Any]:
        return self._memory(store_id, memory_id).to_json(full=True)

    def create_memory(self, store_id: str, body: object, now: float) -> dict[str, Any]:
        path, content = _memory_fields(body, require_path=True)
        assert path is not None
        assert content is not None
        if any(m.path == path for m in self._store(store_id).values()):
            raise SimError(409, "conflict_error", f"a memory already exists at {path}")
        return self._put_memory(store_id, path, content, now).to_json(full=True)

    def update_memory(self, store_id: str, memory_id: str, body: object, now: float) -> dict[str, Any]:
        memory = self._memory(store_id, memory_id)
        path, content = _memory_fields(body, require_path=False)
        precondition = body.get("precondition") if isinstance(body, dict) else None
        if isinstance(precondition, dict) and precondition.get("content_sha256") not in (None, memory.sha256):
            raise SimError(409, "conflict_error", "the memory changed since content_sha256 was read")
        memory.path = path or memory.path
        memory.content = memory.content if content is None else content
        memory.updated_at, memory.version = now, memory.version + 1
        return memory.to_json(full=True)

    def delete_memory(self, store_id: str, memory_id: str, expected_sha256: str | None) -> dict[str, Any]:
        memory = self._memory(store_id, memory_id)
        if expected_sha256 is not None and expected_sha256 != memory.sha256:
            raise SimError(409, "conflict_error", "the memory changed since content_sha256 was read")
        del self._store(store_id)[memory_id]
        return {"type": "memory_deleted", "id": memory_id}

    def _store(self, store_id: str) -> dict[str, Memory]:
        store = self._memories.get(store_id)
        if store is None:
            raise SimError(404, "not_found_error", f"memory store {store_id} not found")
        return store

    def _memory(self, store_id: str, memory_id: str) -> Memory:
        memory = self._store(store_id).get(memory_id)
        if memory is None:
            raise SimError(404, "not_found_error", f"memory {memory_id} not found")
        return memory

    def _put_memory(self, store_id: str, path: str, content: str, now: float) -> Memory:
        memory = Memory(f"mem_sim{next(self._ids):08d}", store_id, path, content, now, now)
        self._memories[store_id][memory.id] = memory
        return memory


def _by_path(memory: Memory) -> str:
    return memory.path


def _memory_fields(body: object, *, require_path: bool) -> tuple[str | None, str | None]:
    if not isinstance(body, dict):
        raise SimError(400, "invalid_request_error", "the body must be a JSON object")
    path, content = body.get("path"), body.get("content")
    if (require_path or path is not None) and (not isinstance(path, str) or not path.startswith("/")):
        raise SimError(400, "invalid_request_error", "path must be an absolute path such as /notes.md")
    if (require_path or content is not None) and not isinstance(content, str):
        raise SimError(400, "invalid_request_error", "content must be a string")
    return path, content


def _text_of(tool_result: dict[str, Any]) -> str:
    content = tool_result.get("content")
    if isinstance(content, list):
        return " ".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
    return str(content or "")


def _skill_archive(name: str, skill_id: str) -> bytes:
    """A skill as the API ships it: a zip holding its SKILL.md."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(
            "SKILL.md",
            f"---\nname: {name}\ndescription: A skill served by the simulator ({skill_id}).\n---\n\nSay hello.\n",
        )
    return buffer.getvalue()
