"""Who may call what: the simulated API's credential rules, as a pure function of its state.

Every /v1 route names the resource it acts on (`Endpoint.resource`); the
credential presented is matched against the keys and tokens the simulator
knows and then against that resource:

- environment and work paths: the path's environment key (as Bearer), or on
  a work item's paths the sessions token minted for that item; the
  organisation key only where `Endpoint.org_key` says so (stats, stop).
- sessions: the session's environment key, the sessions token of the item
  serving it, or the organisation key (the sessions API is the organisation's
  own API). A valid credential that may not see the session gets 404.
- skills: a key or token whose sessions use the skill, or the organisation key.
- memory stores: the sessions token of the item whose session has the store
  attached, or the organisation key; an environment key is refused with 403
  (the SDKs' comment: the memory endpoints reject it).

Anything else is 401.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from .control_plane import ControlPlane, SimError, WorkItem
from .sessions import SessionStore

__all__ = ["Authority", "CredentialKind", "Endpoint", "Presented", "Resource"]

CredentialKind = Literal["environment_key", "sessions_token", "organization_api_key"]
Resource = Literal["environment", "work", "session", "skill", "memory_store", "none"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One /v1 route: its name (in stats and fault settings) and the rules around it."""

    name: str
    resource: Resource
    # The anthropic-beta value the route requires, if any.
    beta: str | None = None
    # Whether the organisation API key is accepted (DOC-OPS: stats and stop).
    org_key: bool = False
    # A held-open answer (SSE): latency is added before it starts, and a reset comes before it.
    streams: bool = False


@dataclass(frozen=True, slots=True)
class Presented:
    """The credentials a request carries."""

    bearer: str | None
    api_key: str | None

    def values(self) -> tuple[str, ...]:
        return tuple(v for v in (self.bearer, self.api_key) if v)


@dataclass(frozen=True, slots=True)
class _Known:
    kind: CredentialKind
    environment_id: str | None = None
    item: WorkItem | None = None


class Authority:
    def __init__(
        self,
        environments: Mapping[str, str],
        org_api_keys: tuple[str, ...],
        plane: ControlPlane,
        sessions: SessionStore,
    ) -> None:
        self._environments = environments
        self._org_api_keys = org_api_keys
        self._plane = plane
        self._sessions = sessions

    def check(self, endpoint: Endpoint, presented: Presented, params: Mapping[str, str]) -> CredentialKind | None:
        """The kind of credential that authorised the request (None: no auth needed); raises `SimError`."""
        resource = endpoint.resource
        if resource == "none":
            return None
        if resource in ("environment", "work"):
            return self._environment(endpoint, presented, params)
        known = self._known(presented)
        if known is None:
            raise _unauthenticated()
        if resource == "session":
            return self._session(known, params["session"])
        if resource == "skill":
            return self._skill(known, params["skill"])
        return self._memory_store(known, params["store"])

    def _environment(self, endpoint: Endpoint, presented: Presented, params: Mapping[str, str]) -> CredentialKind:
        env_id = params["env"]
        key = self._environments.get(env_id)
        if key is None:
            # ASSUMPTION: an unknown environment is a 404, checked before auth.
            raise SimError(404, "not_found_error", f"environment {env_id} not found")
        bearer = presented.bearer
        if bearer and _same(bearer, key):
            return "environment_key"
        if bearer and endpoint.resource == "work":
            item = self._plane.item_for_token(bearer)
            if item is not None and item.id == params["work"]:
                return "sessions_token"
        if endpoint.org_key and self._is_org_key(presented):
            return "organization_api_key"
        raise _unauthenticated()

    def _session(self, known: _Known, session_id: str) -> CredentialKind:
        session = self._sessions.find(session_id)
        visible = session is not None and (
            known.kind == "organization_api_key"
            or known.environment_id == session.environment_id
            or (known.item is not None and known.item.data_id == session.id)
        )
        if not visible:
            raise SimError(404, "not_found_error", f"session {session_id} not found")
        return known.kind

    def _skill(self, known: _Known, skill_id: str) -> CredentialKind:
        users = self._sessions.sessions_using_skill(skill_id)
        visible = known.kind == "organization_api_key" or any(
            known.environment_id == s.environment_id or (known.item is not None and known.item.data_id == s.id)
            for s in users
        )
        if not visible:
            raise SimError(404, "not_found_error", f"skill {skill_id} not found")
        return known.kind

    def _memory_store(self, known: _Known, store_id: str) -> CredentialKind:
        if known.kind == "environment_key":
            # [SDK] "memory endpoints accept the per-item sessions_token but reject the environment key".
            raise SimError(403, "permission_error", "memory stores do not accept an environment key")
        session = self._sessions.session_of_store(store_id)
        visible = session is not None and (
            known.kind == "organization_api_key" or (known.item is not None and known.item.data_id == session.id)
        )
        if not visible:
            raise SimError(404, "not_found_error", f"memory store {store_id} not found")
        return known.kind

    def _known(self, presented: Presented) -> _Known | None:
        bearer = presented.bearer
        if bearer:
            for env_id, key in self._environments.items():
                if _same(bearer, key):
                    return _Known("environment_key", environment_id=env_id)
            item = self._plane.item_for_token(bearer)
            if item is not None:
                return _Known("sessions_token", item=item)
        if self._is_org_key(presented):
            return _Known("organization_api_key")
        return None

    def _is_org_key(self, presented: Presented) -> bool:
        # The SDK sends an api_key as a Bearer token, other clients as x-api-key.
        return any(_same(v, k) for v in presented.values() for k in self._org_api_keys)


def _same(presented: str, known: str) -> bool:
    return hmac.compare_digest(presented.encode(), known.encode())


def _unauthenticated() -> SimError:
    return SimError(401, "authentication_error", "invalid credential for this environment")
