"""A faithful stand-in for the Anthropic environments work API, for tests, the demo and offline trials.

Run it with `heartbeat-gateway simulate-upstream`, or start
`create_simulator_app(SimulatorConfig(...))` in-process. Sources are the
sections of `environments-api.md` (the project's reference notes): [DOC]
documented, [SDK] seen in the SDKs' code or test fixtures, [ASSUMPTION] not
known, chosen here and named as such.

Requests and auth
- Every `/v1/...` answer carries a `request-id` header; errors are
  `{"type": "error", "error": {"type", "message"[, "details"]}, "request_id"}` [DOC §5].
  Paths the simulator does not implement get a 404 `not_found_error` in that envelope.
- Credentials (`gateway.simulator.auth`), always sent by the SDK workers as
  `Authorization: Bearer` [SDK §1, §10]:
  - environment and work paths: the path's environment key. With `issue_secrets`,
    each poll that hands an item out mints a per-item sessions token, carried in the
    item's `secret` (base64url JSON `{"sessions_token": ...}`), accepted on that item's
    paths [SDK §1, TS and PY alike]. ASSUMPTION: every token minted for an item stays
    valid for it, so a stale or reclaimed holder meets the lease protocol's 412 rather
    than an auth error. An organisation API key (as Bearer, the way the SDK sends
    `api_key`, or as `x-api-key`) is accepted on `stats` and `stop` [DOC-OPS §1];
    ASSUMPTION: on no other work endpoint. ASSUMPTION: an unknown environment is a
    404, checked before auth.
  - sessions: the session's environment key or the sessions token of an item serving
    the session [SDK: the workers call them with the item's credential], or the
    organisation key [ASSUMPTION: the sessions API is the organisation's own API, so
    its key works there]. ASSUMPTION: a valid credential that may not see the session
    (another environment's key, another item's token) gets 404, as for an unknown
    session.
  - skills: a key or token whose sessions use the skill, or the organisation key
    [ASSUMPTION: the reference only says the workers download skills with the item's
    credential; skills are the organisation's, so any of its sessions' credentials may].
  - memory stores: the sessions token of an item whose session has the store
    attached, or the organisation key; an environment key gets 403 permission_error
    [SDK: the memory endpoints reject the environment key; the status is an ASSUMPTION].
  - anything else: 401 authentication_error. `/_sim/stats` counts credentials by kind
    and by endpoint (`credentials_by_endpoint`).
- Faults (`gateway.simulator.faults`) are drawn before auth: a broken or overloaded API
  fails a request whatever its credential.
- `compress` (off by default) gzips JSON answers for clients that accept it
  [ASSUMPTION: whether the real API compresses is not in the reference].
- `anthropic-beta` must include `managed-agents-2026-04-01` on environment, work and
  session endpoints and `agent-memory-2026-07-22` on memory-store endpoints (what the
  SDKs send), else 400; skills endpoints need none (the SDKs send none)
  [ASSUMPTION: the real API's answer to a missing beta is not documented].
- Repeated parameters, non-integer numbers and an empty `expected_last_heartbeat` are
  400 invalid_request_error [ASSUMPTION].

Endpoints [DOC/SDK §2.2]
- `GET .../work/poll`: `block_ms` 1-999 holds an empty poll open (without it,
  no wait); `reclaim_older_than_ms` (default 5000, 0 allowed) lets a polled but
  un-acked item be polled again; the answer is the item, or JSON `null` with 200 when
  there is none [SDK+INF §2.2]. `Anthropic-Worker-ID` is recorded and counted in
  `workers_polling` (30 s window) [DOC §3]. Items are handed out oldest first
  [ASSUMPTION].
- `POST .../work/{id}/ack`: queued and polled → `starting` [DOC §4]. Acking an item
  that was not polled or is past queued: 409 conflict_error [ASSUMPTION]. An acked
  item that is never heartbeated is re-queued after the default TTL [ASSUMPTION].
- `POST .../work/{id}/heartbeat`:
  - `expected_last_heartbeat=NO_HEARTBEAT` claims an item nobody holds [DOC §4];
    an exact echo of the last `last_heartbeat` renews [DOC §4]. ASSUMPTION (from the
    3P clone §7 only): without the parameter the beat is unconditional.
  - Mismatch, or a beat on a queued item: 412 with
    `error.details.current_state = {state, last_heartbeat, lease_updated_at,
    lease_extended: false, ttl_seconds}`, `error_code: heartbeat_precondition_failed`
    [SDK §5, the TS worker test fixture]. `ttl_seconds` is the lease's TTL, or the
    default TTL when no lease is held (the SDK types it as an integer) [ASSUMPTION].
  - Success: `{type: work_heartbeat, last_heartbeat, lease_extended: true, state: active,
    ttl_seconds}` [SDK §3]. ASSUMPTION (INF and the 3P clone, §4): the first success
    moves `starting` to `active`. `last_heartbeat` is an RFC 3339 UTC timestamp with
    microseconds, strictly increasing across the simulator (counted in integer
    microseconds) [SDK §3 "timestamp of the actual heartbeat from DB"; ASSUMPTION on the
    precision].
  - `desired_ttl_seconds` is a positive integer (else 400) clamped to
    [min_ttl, max_ttl]; without it the default TTL applies [ASSUMPTION: real default and
    range unknown §8; defaults 60 s and 1-600 s here].
  - On a `stopping` or `stopped` item the value is not compared [SDK, the heartbeat
    method's doc string]: `stopping` answers 200 `state: stopping` and keeps extending
    the lease so the holder can wind down [ASSUMPTION §8]; `stopped` answers
    `lease_extended: false, ttl_seconds: 0` and the last `last_heartbeat` (empty if
    there never was one) [ASSUMPTION].
  - A lease with no successful beat for its TTL lapses silently [SDK §4]: the item is
    re-queued with `last_heartbeat` null and its claim timestamps cleared, so the old
    holder's next beat gets a 412 whose state is `queued` [SDK §4]. A `stopping` item
    whose lease lapses becomes `stopped` [ASSUMPTION].
- `POST .../work/{id}/stop` with `{"force": bool}` (an empty body is `{}`): graceful →
  `stopping` (the holder learns it on its next beat), force → `stopped` [DOC-OPS §4];
  409 conflict_error when already stopped [SDK §2.2]. A graceful stop of a queued or
  stopping item finishes it [ASSUMPTION, as the 3P clone §7]. Answers 200 with the item,
  as the docs show [DOC §2.2; the GO SDK's comment says 204, so clients must accept both].
- `POST .../work/{id}` `{"metadata": {k: string|null}}`: merge, null deletes [DOC §2.2].
- `GET .../work/{id}` (retrieve, `secret` null), `GET .../work` (list: `limit` 1-1000,
  default 20, opaque `page` cursor, `{data, next_page}`), `GET .../work/stats`
  (`{type: work_queue_stats, depth, pending, oldest_queued_at, workers_polling}`;
  ASSUMPTION: `pending` counts every queued item polled and not acked, `depth` the
  rest), `GET /v1/environments/{id}` [DOC §2.1-2.2, §3].

Sessions [SDK §10; shapes from the SDK types `BetaManagedAgentsSession`, the session events]
- Every queued session item comes with a session (`sesn_sim...`) in its environment,
  run by a scripted agent (`gateway.simulator.sessions.AgentScript`). The history
  starts with `user.message`, `session.status_running`, the agent's first
  `agent.tool_use` (`bash`, `echo hello` by default) and `session.status_idle` with
  `stop_reason: requires_action` [INF: the state a session is in when its work item
  is queued]. Each `user.tool_result` for the pending tool use makes the agent ask for
  the next command or, after the last, answer with `agent.message` and end its turn
  (`session.status_idle`, `end_turn`); the SDK workers then finish after `max_idle`
  [SDK]. `terminate_after_turn` adds `session.status_terminated`, which ends the
  worker's run at once [SDK]. A `user.message` starts the script again; a
  `user.interrupt` ends the turn; other event types are 400 [ASSUMPTION].
- `GET /v1/sessions/{id}`: status, the agent (`agent_toolset_20260401`, the script's
  custom skills, none by default) and resources (one `memory_store` when the script
  attaches one, without a `mount_path`).
- `GET /v1/sessions/{id}/events`: the history oldest first, `limit` 1-1000 (default
  20), opaque `page` cursor, `{data, next_page}` [SDK].
- `GET /v1/sessions/{id}/events/stream`: `text/event-stream` of the events appended
  after it opened, each frame with an `event:` line (the SDKs drop frames without
  one) and its JSON as `data:`; `event: ping` every 15 s; it ends after
  `session.status_terminated` [SDK]. Workers reconnect and re-read the history.
- `POST /v1/sessions/{id}/events` `{"events": [...]}`: `{"data": [accepted events]}`;
  a `user.tool_result` must name the pending tool use, else 400 [ASSUMPTION].
- `GET /v1/skills/{id}/versions/{version|latest}` (`skill_version`) and
  `.../versions/{id}/content` (a zip with the skill's `SKILL.md`) [SDK].
- `/v1/memory_stores/{id}/memories[/{memory_id}]`: list (`view` basic|full,
  `limit`, `page`, `path_prefix`), retrieve, create (`path`, `content`; 409 if the
  path exists), update (`content_sha256` precondition, 409 on mismatch), delete
  (`expected_content_sha256`); the store starts with `/notes.md` [SDK types; the 409s
  are ASSUMPTIONS].

Simulator-only endpoints (no auth; never under /v1)
- `POST /_sim/environments/{env}/work` `{"count": n, "data_type": "session"|"healthcheck"}`:
  queue work items (the real API creates them when sessions start).
- `GET /_sim/environments/{env}/work`: every item with its lease.
- `GET /_sim/stats`: requests by endpoint and status (a reset counts as `reset`; an
  event stream counts as it opens), credentials by kind and by endpoint, SHA-256
  fingerprints of every credential presented (never the value), injected faults,
  worker ids.
- `GET /_sim/sessions`: every session with its status, open streams and the tool
  results its worker sent back.
- `POST /_sim/environments/{env}/sessions` `{"count": n}`: sessions without a queued
  item (as if served elsewhere), for streams in benchmarks.
- `GET|POST /_sim/faults`: read or replace the fault settings (`gateway.simulator.faults`);
  they apply to every /v1 endpoint by the names `/_sim/stats` uses (`poll`, `heartbeat`,
  `session`, `stream`, `send_events`, `memories`, ...).
"""

from .app import SIMULATOR, Simulator, SimulatorConfig, create_simulator_app, fingerprint
from .control_plane import ControlPlane, SimError, TtlPolicy
from .faults import Faults, FaultsError
from .sessions import AgentScript, SessionStore

__all__ = [
    "SIMULATOR",
    "AgentScript",
    "ControlPlane",
    "Faults",
    "FaultsError",
    "SessionStore",
    "SimError",
    "Simulator",
    "SimulatorConfig",
    "TtlPolicy",
    "create_simulator_app",
    "fingerprint",
]
