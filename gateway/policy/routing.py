"""Request targets: strict parsing, the allow-list, and which route a request is.

The gateway forwards the path and query exactly as received, so what it
checks here must be what the upstream will see. Anything two HTTP servers
could read differently is refused with 400 instead of guessed at: dot
segments, encoded slashes, empty segments, malformed percent-encoding,
non-UTF-8 paths, and segments whose meaning would change if decoded a second
time or normalised (NFKC). Otherwise `/v1/sessions/..%2F..%2Fenvironments/...` could
pass the allow-list as a sessions path and reach the upstream as another
environment's with the wrong key.

Route names are a fixed set (they label metrics later); templates name the
shape of the path for logs without carrying ids.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from urllib.parse import unquote_plus, unquote_to_bytes

from gateway.config.settings import PoolName
from gateway.errors import InvalidRequest

__all__ = [
    "Route",
    "RouteName",
    "Target",
    "classify",
    "is_allowed",
    "parse_target",
    "upstream_pool",
    "with_param",
    "without_param",
]

_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# RFC 3986 characters allowed raw in a path (unreserved, sub-delims, ':', '@', '/', '%').
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*\Z")
# Queries are looser in practice (`ids[]=1` is common); any visible ASCII but '#'.
_QUERY_CHARS = re.compile(r"[!-\"$-~]*\Z")


class RouteName(StrEnum):
    HEARTBEAT = "heartbeat"
    POLL = "poll"
    ACK = "ack"
    STOP = "stop"
    WORK = "work"
    ENVIRONMENTS = "environments"
    SESSIONS = "sessions"
    MEMORY_STORES = "memory_stores"
    SKILLS = "skills"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Target:
    """A request target as received: raw path and query, plus the decoded segments."""

    raw_path: str
    raw_query: str | None
    segments: tuple[str, ...]

    @property
    def decoded_path(self) -> str:
        return "/" + "/".join(self.segments)

    def with_query(self, raw_query: str | None) -> str:
        return self.raw_path if raw_query is None else f"{self.raw_path}?{raw_query}"

    @property
    def raw(self) -> str:
        return self.with_query(self.raw_query)


@dataclass(frozen=True, slots=True)
class Route:
    name: RouteName
    # The path's shape for logs, e.g. /v1/environments/{environment_id}/work/{work_id}/heartbeat.
    template: str
    environment_id: str | None = None
    work_id: str | None = None
    # On /v1/sessions/{id}…, /v1/skills/{id}… and /v1/memory_stores/{id}…: that id.
    resource_id: str | None = None

    @property
    def is_resource_itself(self) -> bool:
        """`/v1/{collection}/{id}` exactly (a session retrieve, say), not a path below it."""
        return self.resource_id is not None and not self.template.endswith("/…")


def parse_target(raw: str) -> Target:
    """Split and check an origin-form request target; raise `InvalidRequest` if malformed."""
    if not raw.startswith("/"):
        raise InvalidRequest("the request target must be a path starting with /")
    raw_path, sep, raw_query = raw.partition("?")
    if not raw.isascii() or not _PATH_CHARS.match(raw_path) or not _QUERY_CHARS.match(raw_query):
        raise InvalidRequest("the request target contains characters that must be percent-encoded")
    if _BAD_PERCENT.search(raw):
        raise InvalidRequest("malformed percent-encoding in the request target")
    segments = tuple(_decode_segment(s) for s in raw_path[1:].split("/")) if raw_path != "/" else ()
    return Target(raw_path, raw_query if sep else None, segments)


def _decode_segment(segment: str) -> str:
    if not segment:
        raise InvalidRequest("malformed path: empty path segment")
    if "%" not in segment:
        # Nothing encoded: `_PATH_CHARS` has let through only printable ASCII other than `\`,
        # which decodes to itself, is no control character and which NFKC leaves alone.
        if segment.split(";", 1)[0] in (".", ".."):
            raise InvalidRequest("malformed path: dot segments are not allowed")
        return segment
    try:
        decoded = unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("malformed path: not UTF-8 after percent-decoding") from None
    # `..;x` is `..` to servers that strip matrix parameters (Tomcat and kin).
    if decoded.split(";", 1)[0] in (".", ".."):
        raise InvalidRequest("malformed path: dot segments are not allowed")
    if "/" in decoded or "\\" in decoded:
        raise InvalidRequest("malformed path: encoded slashes are not allowed")
    if not decoded.isprintable():
        # Control, format (bidi) and separator characters have no place in an id.
        raise InvalidRequest("malformed path: control characters are not allowed")
    if "%" in decoded:
        # `%252e%252e` is `%2e%2e` here and `..` to a server that decodes twice.
        raise InvalidRequest("malformed path: double percent-encoding is not allowed")
    if unicodedata.normalize("NFKC", decoded) != decoded:
        # U+2024 ONE DOT LEADER is `.` to a server that normalises; so are many others.
        raise InvalidRequest("malformed path: characters that Unicode normalisation changes are not allowed")
    return decoded


def is_allowed(target: Target, prefixes: tuple[str, ...]) -> bool:
    """Whether the decoded path falls under one of the configured prefixes."""
    path = target.decoded_path
    return any(path.startswith(p) for p in prefixes)


_ENV = "/v1/environments/{environment_id}"
_WORK = _ENV + "/work/{work_id}"
_WORK_ACTIONS = MappingProxyType({"heartbeat": RouteName.HEARTBEAT, "ack": RouteName.ACK, "stop": RouteName.STOP})
_COLLECTIONS = MappingProxyType(
    {"sessions": RouteName.SESSIONS, "memory_stores": RouteName.MEMORY_STORES, "skills": RouteName.SKILLS}
)


def classify(method: str, target: Target) -> Route:
    """Name the route of an (allowed) request and pull out its environment and work ids."""
    s = target.segments
    if len(s) >= 3 and s[:2] == ("v1", "environments"):
        return _classify_environment(method, s[2], s[3:])
    if len(s) >= 2 and s[0] == "v1" and s[1] in _COLLECTIONS:
        rest = "/{id}/…" if len(s) > 3 else "/{id}" if len(s) == 3 else ""
        return Route(_COLLECTIONS[s[1]], f"/v1/{s[1]}{rest}", resource_id=s[2] if len(s) >= 3 else None)
    return Route(RouteName.OTHER, "/…")


def _classify_environment(method: str, env_id: str, rest: tuple[str, ...]) -> Route:
    if not rest:
        return Route(RouteName.ENVIRONMENTS, _ENV, env_id)
    if rest[0] != "work":
        return Route(RouteName.ENVIRONMENTS, _ENV + "/…", env_id)
    if rest == ("work", "poll"):
        return Route(RouteName.POLL, _ENV + "/work/poll", env_id)
    if len(rest) == 1 or rest == ("work", "stats"):
        return Route(RouteName.WORK, _ENV + "/" + "/".join(rest), env_id)
    work_id = rest[1]
    if len(rest) == 2:
        return Route(RouteName.WORK, _WORK, env_id, work_id)
    action = _WORK_ACTIONS.get(rest[2]) if len(rest) == 3 else None
    # Only a POST is a heartbeat; any other method on that path is passed
    # through for the upstream to refuse.
    if action is None or (action is RouteName.HEARTBEAT and method != "POST"):
        return Route(RouteName.WORK, _WORK + "/…", env_id, work_id)
    return Route(action, f"{_WORK}/{rest[2]}", env_id, work_id)


_LEASE_CRITICAL = frozenset({RouteName.HEARTBEAT, RouteName.ACK, RouteName.STOP})


def upstream_pool(route: Route, target: Target, *, vouched: bool) -> PoolName:
    """The class of upstream capacity a request draws on (`gateway.upstream.capacity`).

    Lease-critical calls get their own only with a credential the gateway
    vouches for: a junk Bearer on a heartbeat path takes no lease capacity.
    """
    if route.name in _LEASE_CRITICAL:
        return PoolName.LEASE if vouched else PoolName.OTHER
    if route.name is RouteName.POLL:
        return PoolName.POLL
    if route.name is RouteName.SESSIONS and target.segments[-2:] == ("events", "stream"):
        return PoolName.STREAM
    return PoolName.OTHER


def without_param(raw_query: str | None, name: str) -> str:
    """`raw_query` minus every `name=...` pair, the other pairs untouched."""
    pairs = (raw_query or "").split("&")
    return "&".join(p for p in pairs if p and unquote_plus(p.partition("=")[0]) != name)


def with_param(raw_query: str | None, name: str, value: object) -> str:
    """`raw_query` with `name=value` last, in place of any `name` pairs; without one, kept byte for byte."""
    present = any(unquote_plus(p.partition("=")[0]) == name for p in (raw_query or "").split("&") if p)
    rest = without_param(raw_query, name) if present else raw_query
    return f"{rest}&{name}={value}" if rest else f"{name}={value}"
