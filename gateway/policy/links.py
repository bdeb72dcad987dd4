"""What the gateway learns from the API's answers it passes on: whose sessions, and whose tokens.

Which environment a session, skill or memory store belongs to:

A worker calls `/v1/sessions/{id}/...` with the credential it uses for the
work item that names that session; directly, that is the environment key.
Those paths carry no environment id, so the gateway remembers what the
API's own answers said:

- a work item (a poll, an ack or a retrieve on `/v1/environments/{env}/...`)
  names its session (`data.id`) and its `environment_id`;
- a session (`GET /v1/sessions/{id}`) names its `environment_id`, its agent's
  skills and its memory stores.

Only links to served environments are kept, so a foreign credential's
answers cannot fill the table. The table is bounded: least recently used
links go first. A skill can serve several environments' sessions, so a link
holds the few environments seen last.

And which sessions tokens the API issued for which work item: a poll's
answer carries the item's `secret` (base64url JSON with a `sessions_token`),
which the worker then uses on that item's heartbeats and stop. A credential
the gateway saw issued for an item is one it can vouch for there
(`gateway.upstream.capacity`: lease-critical capacity). Only a SHA-256 digest of the
token is kept, bounded like the links. Pure: no I/O.
"""

from __future__ import annotations

import json
import zlib
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field

from .credential_text import b64decode_unpadded, token_digest
from .routing import Route, RouteName

__all__ = [
    "LINKED_ROUTES",
    "Link",
    "Links",
    "TokenIssued",
    "decoded",
    "links_in_answer",
    "teaches_links",
    "token_in_answer",
]

# The collections whose ids are linked to environments.
LINKED_ROUTES = frozenset({RouteName.SESSIONS, RouteName.SKILLS, RouteName.MEMORY_STORES})
# A few hundred bytes per link: 200k links cost well under 100 MB.
DEFAULT_MAX_LINKS = 200_000
# Environments remembered per skill or store.
_ENVIRONMENTS_PER_LINK = 4
# Answers read for links are small JSON; anything bigger is streamed on unread.
MAX_LEARNED_BODY_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Link:
    kind: RouteName
    resource_id: str
    environment_id: str


@dataclass(frozen=True, slots=True)
class TokenIssued:
    environment_id: str
    work_id: str
    # SHA-256 of the sessions token: the token itself is never kept.
    digest: str = field(repr=False)


class Links:
    def __init__(self, max_links: int = DEFAULT_MAX_LINKS) -> None:
        self.max_links = max_links
        self._links: OrderedDict[tuple[RouteName, str], tuple[str, ...]] = OrderedDict()
        self._issued: OrderedDict[tuple[str, str], frozenset[str]] = OrderedDict()

    def learn_token(self, issued: TokenIssued) -> None:
        key = (issued.environment_id, issued.work_id)
        known = self._issued.pop(key, frozenset())
        # A reclaimed item gets a new token per poll; a few are plenty.
        self._issued[key] = frozenset((issued.digest, *list(known)[:3]))
        while len(self._issued) > self.max_links:
            self._issued.popitem(last=False)

    def vouches(self, environment_id: str, work_id: str, bearer: str | None) -> bool:
        """Whether `bearer` is a sessions token the API issued for this work item, as far as seen here."""
        if not bearer:
            return False
        digests = self._issued.get((environment_id, work_id))
        return digests is not None and token_digest(bearer) in digests

    def learn(self, link: Link) -> None:
        key = (link.kind, link.resource_id)
        known = self._links.pop(key, ())
        self._links[key] = (link.environment_id, *(e for e in known if e != link.environment_id))[
            :_ENVIRONMENTS_PER_LINK
        ]
        while len(self._links) > self.max_links:
            self._links.popitem(last=False)

    def environments(self, kind: RouteName, resource_id: str) -> tuple[str, ...]:
        """The environments this resource was seen in, most recent first; a lookup keeps the link fresh."""
        key = (kind, resource_id)
        found = self._links.get(key)
        if found is None:
            return ()
        self._links.move_to_end(key)
        return found

    def __len__(self) -> int:
        return len(self._links)


def teaches_links(method: str, route: Route) -> bool:
    """Whether this request's answer names links: work items and sessions."""
    if route.name in (RouteName.POLL, RouteName.ACK):
        return True
    if route.name is RouteName.WORK:
        return method == "GET" and route.work_id is not None and not route.template.endswith("/…")
    return route.name is RouteName.SESSIONS and method == "GET" and route.is_resource_itself


def links_in_answer(route: Route, body: bytes, served: Collection[str]) -> list[Link]:
    """The links a 200 answer to `route` states, for served environments only."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return []
    if not isinstance(data, dict):
        return []
    if route.name is RouteName.SESSIONS:
        return _session_links(data, route.resource_id, served)
    return _work_links(data, route.environment_id, served)


def _work_links(item: dict[str, object], environment_id: str | None, served: Collection[str]) -> list[Link]:
    data = item.get("data")
    if item.get("type") != "work" or not isinstance(data, dict) or data.get("type") != "session":
        return []
    session_id, env = data.get("id"), item.get("environment_id")
    # The item must come from the environment whose path (and key) asked for it.
    if not isinstance(session_id, str) or not isinstance(env, str) or env != environment_id or env not in served:
        return []
    return [Link(RouteName.SESSIONS, session_id, env)]


def _session_links(session: dict[str, object], session_id: str | None, served: Collection[str]) -> list[Link]:
    env = session.get("environment_id")
    if session.get("type") != "session" or session.get("id") != session_id or not isinstance(env, str):
        return []
    if env not in served or session_id is None:
        return []
    agent = session.get("agent")
    skills = [
        Link(RouteName.SKILLS, skill_id, env)
        for skill in _dicts(agent.get("skills") if isinstance(agent, dict) else None)
        if isinstance(skill_id := skill.get("skill_id"), str)
    ]
    stores = [
        Link(RouteName.MEMORY_STORES, store_id, env)
        for resource in _dicts(session.get("resources"))
        if resource.get("type") == "memory_store" and isinstance(store_id := resource.get("memory_store_id"), str)
    ]
    return [Link(RouteName.SESSIONS, session_id, env), *skills, *stores]


def _dicts(value: object) -> list[dict[str, object]]:
    """The objects of a JSON array (anything else in it, or anything but an array, is nothing)."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def decoded(body: bytes, content_encoding: str | None) -> bytes | None:
    """The answer's JSON as sent, or decompressed (a copy: the worker gets the bytes unchanged).

    gzip and deflate only, and never more than `MAX_LEARNED_BODY_BYTES` out;
    None for anything else (the answer then teaches nothing).
    """
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        return None
    # gzip, or zlib-wrapped deflate; raw deflate as some servers send it.
    for wbits in (16 + zlib.MAX_WBITS,) if "gzip" in encoding else (zlib.MAX_WBITS, -zlib.MAX_WBITS):
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, MAX_LEARNED_BODY_BYTES)
        except zlib.error:
            continue
        # Not whole (cut, or larger than what is worth reading): nothing to learn.
        return out if inflater.eof and not inflater.unconsumed_tail else None
    return None


def token_in_answer(route: Route, body: bytes, served: Collection[str]) -> TokenIssued | None:
    """The sessions token a poll's answer issues for its item, if any (only its digest is kept)."""
    environment_id = route.environment_id
    if route.name is not RouteName.POLL or environment_id is None or environment_id not in served:
        return None
    try:
        item = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(item, dict) or item.get("environment_id") != environment_id:
        return None
    work_id, secret = item.get("id"), item.get("secret")
    if not isinstance(work_id, str) or not isinstance(secret, str) or not secret:
        return None
    try:
        payload = json.loads(b64decode_unpadded(secret, urlsafe=True))
    except (ValueError, RecursionError):
        return None
    token = payload.get("sessions_token") if isinstance(payload, dict) else None
    if not isinstance(token, str) or not token:
        return None
    return TokenIssued(environment_id, work_id, token_digest(token))
