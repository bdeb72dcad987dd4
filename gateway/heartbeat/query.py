"""The heartbeat's query string: validated before anything is sent upstream.

`POST /v1/environments/{env}/work/{work}/heartbeat` takes two parameters
(environments-api.md §2.2): `expected_last_heartbeat` (the literal
`NO_HEARTBEAT` to claim, then an exact echo of the last `last_heartbeat`)
and `desired_ttl_seconds` (an integer). Bad values get a 400 from the gateway
without an upstream call. Other parameters (the SDK's `beta=true`) pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

from gateway.errors import InvalidRequest
from gateway.policy.routing import with_param

from .wire import NO_HEARTBEAT

__all__ = ["HeartbeatQuery", "apply_desired_ttl", "parse_heartbeat_query"]

_EXPECTED = "expected_last_heartbeat"
_TTL = "desired_ttl_seconds"
_DIGITS = re.compile(r"[0-9]{1,9}\Z")


@dataclass(frozen=True, slots=True)
class HeartbeatQuery:
    # None: an unconditional beat. NO_HEARTBEAT: a claim. Otherwise the echo.
    expected_last_heartbeat: str | None
    desired_ttl_seconds: int | None


def parse_heartbeat_query(raw_query: str | None) -> HeartbeatQuery:
    try:
        pairs = parse_qsl(raw_query or "", keep_blank_values=True, strict_parsing=False, errors="strict")
    except UnicodeDecodeError:
        raise InvalidRequest("the query string is not UTF-8 after percent-decoding") from None
    expected = _single(pairs, _EXPECTED)
    if expected is not None and not expected.strip():
        raise InvalidRequest(f"{_EXPECTED} must be {NO_HEARTBEAT} or the last heartbeat's last_heartbeat")
    ttl_text = _single(pairs, _TTL)
    ttl = None
    if ttl_text is not None:
        if not _DIGITS.match(ttl_text) or int(ttl_text) == 0:
            raise InvalidRequest(f"{_TTL} must be a positive integer")
        ttl = int(ttl_text)
    return HeartbeatQuery(expected, ttl)


def _single(pairs: list[tuple[str, str]], name: str) -> str | None:
    values = [v for k, v in pairs if k == name]
    if len(values) > 1:
        raise InvalidRequest(f"{name} may be given only once")
    return values[0] if values else None


def apply_desired_ttl(raw_query: str | None, query: HeartbeatQuery, ttl: int | None, *, override: bool) -> str | None:
    """The query with the configured TTL: appended when the client sent none,
    or in place of the client's when `override`; the rest kept byte for byte."""
    if ttl is None or (query.desired_ttl_seconds is not None and not override):
        return raw_query
    return with_param(raw_query, _TTL, ttl)
