"""The heartbeat's wire format: what an answer says, read once, and the gateway's own answers.

Checks `gateway/heartbeat/wire.py`.
"""

from __future__ import annotations

import json

import pytest

from gateway.heartbeat.wire import (
    NO_HEARTBEAT,
    Answer,
    HeartbeatAnswer,
    LostReason,
    encode,
    precondition_failed_body,
    read_answer,
    read_body,
    success_body,
    throttled_body,
)

GRANTED = HeartbeatAnswer("2026-12-01T00:00:01Z", "active", True, 30)


def upstream_412(state: str, last: str = "T9") -> bytes:
    """The API's 412 (environments-api.md §2.2)."""
    current = {"state": state, "last_heartbeat": last, "lease_extended": False, "ttl_seconds": 30}
    error = {"type": "invalid_request_error", "message": "Heartbeat precondition failed", "details": {}}
    error["details"] = {"error_code": "heartbeat_precondition_failed", "current_state": current}
    return json.dumps({"type": "error", "error": error}).encode()


def test_a_granted_lease_is_read_with_every_field_the_decisions_use() -> None:
    body = json.dumps({**success_body(GRANTED, 30), "request_id": "req_1"}).encode()
    answer = read_answer(200, body)
    assert answer == Answer(200, GRANTED)
    assert answer.success is not None
    assert answer.success.holds_lease
    assert answer.lost_reason is None


@pytest.mark.parametrize(
    ("state", "reason"), [("active", LostReason.CONFLICT), ("queued", LostReason.REQUEUED), ("stopped", "conflict")]
)
def test_a_412_says_who_moved_the_lease(state: str, reason: str) -> None:
    answer = read_answer(412, upstream_412(state))
    assert (answer.current_state, answer.current_last_heartbeat) == (state, "T9")
    assert answer.lost_reason == reason


def test_an_active_lease_not_extended_is_lost_and_a_stopping_one_is_not() -> None:
    assert read_answer(200, encode(success_body(HeartbeatAnswer("T", "active", False, 3), 3))).lost_reason == (
        "not_extended"
    )
    stopping = read_answer(200, encode(success_body(HeartbeatAnswer("T", "stopping", False, 3), 3)))
    assert stopping.lost_reason is None
    assert stopping.success is not None
    assert not stopping.success.holds_lease


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"last_heartbeat": 5, "state": "active", "lease_extended": true, "ttl_seconds": 30}',
        b'{"last_heartbeat": "T", "state": "active", "lease_extended": "yes", "ttl_seconds": 30}',
        b'{"last_heartbeat": "T", "state": "active", "lease_extended": true, "ttl_seconds": true}',
        b'{"last_heartbeat": "T", "state": "active", "lease_extended": true, "ttl_seconds": 1.5}',
        # A grant can never carry the claim marker as its value: that would make every claim an echo.
        json.dumps(
            {"last_heartbeat": NO_HEARTBEAT, "state": "active", "lease_extended": True, "ttl_seconds": 30}
        ).encode(),
        b"[" * 100_000,
    ],
)
def test_an_answer_that_cannot_be_read_is_no_signal(body: bytes) -> None:
    answer = read_answer(200, body)
    assert answer == Answer(200)
    assert answer.lost_reason is None


def test_a_412_without_its_details_and_other_statuses_say_nothing_about_the_lease() -> None:
    assert read_answer(412, b'{"type": "error", "error": {"type": "invalid_request_error"}}') == Answer(412)
    assert read_answer(412, b"<html>") == Answer(412)
    # Still a 412: the worker's beat was refused, whatever the body says.
    assert read_answer(412, b"").lost_reason == LostReason.CONFLICT
    assert read_answer(429, upstream_412("active")) == Answer(429)
    assert read_answer(503, b"{}").lost_reason is None


def test_the_gateways_own_answers_read_back_as_what_they_say() -> None:
    """Local answers are read from the body before it is encoded, and say what an upstream one would."""
    local_200 = success_body(GRANTED, 7)
    assert read_body(200, local_200) == read_answer(200, encode(local_200))
    assert read_body(200, local_200).success == HeartbeatAnswer(GRANTED.last_heartbeat, "active", True, 7)
    local_412 = precondition_failed_body("T1", GRANTED)
    assert read_body(412, local_412) == read_answer(412, encode(local_412))
    assert read_body(412, local_412) == Answer(412, None, "active", GRANTED.last_heartbeat)
    # Shaped like the API's own 412, which the SDKs read.
    error = local_412["error"]
    assert error["details"]["error_code"] == "heartbeat_precondition_failed"
    assert error["message"] == f"Heartbeat precondition failed: expected T1, actual was {GRANTED.last_heartbeat}"
    assert read_body(429, throttled_body()) == Answer(429)
    assert throttled_body()["error"]["type"] == "rate_limit_error"
