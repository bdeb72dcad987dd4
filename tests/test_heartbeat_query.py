"""Heartbeat query validation and the default TTL.

Checks `gateway/heartbeat/query.py`.
"""

from __future__ import annotations

import pytest

from gateway.errors import InvalidRequest
from gateway.heartbeat.query import HeartbeatQuery, apply_desired_ttl, parse_heartbeat_query


@pytest.mark.parametrize(
    ("raw", "query"),
    [
        (None, HeartbeatQuery(None, None)),
        ("beta=true", HeartbeatQuery(None, None)),
        ("expected_last_heartbeat=NO_HEARTBEAT", HeartbeatQuery("NO_HEARTBEAT", None)),
        (
            "expected_last_heartbeat=2026-11-29T17%3A20%3A57.123456Z&desired_ttl_seconds=30",
            HeartbeatQuery("2026-11-29T17:20:57.123456Z", 30),
        ),
        ("expected_last_heartbeat=2026-11-29T17:20:57%2B00:00", HeartbeatQuery("2026-11-29T17:20:57+00:00", None)),
        # An empty pair (a client's `&&`) is no error: the API's own parser skips it.
        ("beta=true&&expected_last_heartbeat=NO_HEARTBEAT&", HeartbeatQuery("NO_HEARTBEAT", None)),
    ],
)
def test_valid_queries(raw: str | None, query: HeartbeatQuery) -> None:
    assert parse_heartbeat_query(raw) == query


@pytest.mark.parametrize(
    "raw",
    [
        "desired_ttl_seconds=0",
        "desired_ttl_seconds=-1",
        "desired_ttl_seconds=1.5",
        "desired_ttl_seconds=%2B5",
        "desired_ttl_seconds=",
        "desired_ttl_seconds=9999999999",
        "desired_ttl_seconds=1&desired_ttl_seconds=2",
        "expected_last_heartbeat=",
        "expected_last_heartbeat=%20",
        "expected_last_heartbeat=a&expected_last_heartbeat=a",
        "expected_last_heartbeat=%ff",
    ],
)
def test_invalid_queries(raw: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_heartbeat_query(raw)


def test_a_claim_an_echo_and_an_unconditional_beat_are_read_as_sent() -> None:
    assert parse_heartbeat_query("expected_last_heartbeat=NO_HEARTBEAT").expected_last_heartbeat == "NO_HEARTBEAT"
    assert parse_heartbeat_query("expected_last_heartbeat=x").expected_last_heartbeat == "x"
    assert parse_heartbeat_query("").expected_last_heartbeat is None


def test_default_ttl_is_added_only_when_absent() -> None:
    q = parse_heartbeat_query("beta=true")
    assert apply_desired_ttl("beta=true", q, 45, override=False) == "beta=true&desired_ttl_seconds=45"
    assert apply_desired_ttl(None, parse_heartbeat_query(None), 45, override=False) == "desired_ttl_seconds=45"
    own = parse_heartbeat_query("desired_ttl_seconds=9")
    assert apply_desired_ttl("desired_ttl_seconds=9", own, 45, override=False) == "desired_ttl_seconds=9"
    assert apply_desired_ttl("beta=true", q, None, override=True) == "beta=true"


def test_override_replaces_the_clients_ttl_and_keeps_the_rest() -> None:
    raw = "expected_last_heartbeat=2026-01-01T00%3A00%3A00Z&desired_ttl_seconds=9&beta=true"
    query = parse_heartbeat_query(raw)
    assert apply_desired_ttl(raw, query, 45, override=True) == (
        "expected_last_heartbeat=2026-01-01T00%3A00%3A00Z&beta=true&desired_ttl_seconds=45"
    )
    assert apply_desired_ttl("desired_ttl_seconds=9", parse_heartbeat_query("desired_ttl_seconds=9"), 45,
                             override=True) == "desired_ttl_seconds=45"  # fmt: skip
