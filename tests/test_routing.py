"""Request targets: what the gateway accepts, refuses, and which route it names.

Checks `gateway/policy/routing.py`.
"""

from __future__ import annotations

import pytest

from gateway.config.settings import DEFAULT_ALLOW_PREFIXES
from gateway.errors import InvalidRequest
from gateway.policy.routing import Route, RouteName, classify, is_allowed, parse_target

ENV = "/v1/environments/env_1"


@pytest.mark.parametrize(
    ("method", "target", "route"),
    [
        (
            "POST",
            f"{ENV}/work/w1/heartbeat?expected_last_heartbeat=NO_HEARTBEAT",
            Route(RouteName.HEARTBEAT, "/v1/environments/{environment_id}/work/{work_id}/heartbeat", "env_1", "w1"),
        ),
        (
            "GET",
            f"{ENV}/work/w1/heartbeat",
            Route(RouteName.WORK, "/v1/environments/{environment_id}/work/{work_id}/…", "env_1", "w1"),
        ),
        (
            "GET",
            f"{ENV}/work/poll?block_ms=999",
            Route(RouteName.POLL, "/v1/environments/{environment_id}/work/poll", "env_1"),
        ),
        (
            "POST",
            f"{ENV}/work/w1/ack",
            Route(RouteName.ACK, "/v1/environments/{environment_id}/work/{work_id}/ack", "env_1", "w1"),
        ),
        (
            "POST",
            f"{ENV}/work/w1/stop",
            Route(RouteName.STOP, "/v1/environments/{environment_id}/work/{work_id}/stop", "env_1", "w1"),
        ),
        (
            "GET",
            f"{ENV}/work/w1",
            Route(RouteName.WORK, "/v1/environments/{environment_id}/work/{work_id}", "env_1", "w1"),
        ),
        ("GET", f"{ENV}/work", Route(RouteName.WORK, "/v1/environments/{environment_id}/work", "env_1")),
        ("GET", f"{ENV}/work/stats", Route(RouteName.WORK, "/v1/environments/{environment_id}/work/stats", "env_1")),
        ("GET", ENV, Route(RouteName.ENVIRONMENTS, "/v1/environments/{environment_id}", "env_1")),
        ("POST", f"{ENV}/archive", Route(RouteName.ENVIRONMENTS, "/v1/environments/{environment_id}/…", "env_1")),
        ("GET", "/v1/sessions/s1/events/stream", Route(RouteName.SESSIONS, "/v1/sessions/{id}/…", resource_id="s1")),
        ("GET", "/v1/sessions/s1", Route(RouteName.SESSIONS, "/v1/sessions/{id}", resource_id="s1")),
        (
            "GET",
            "/v1/memory_stores/m1/memories",
            Route(RouteName.MEMORY_STORES, "/v1/memory_stores/{id}/…", resource_id="m1"),
        ),
        ("GET", "/v1/skills/sk1", Route(RouteName.SKILLS, "/v1/skills/{id}", resource_id="sk1")),
        ("GET", "/v1/messages", Route(RouteName.OTHER, "/…")),
        (
            "GET",
            "/v1/environments/env%5F1/work/poll",
            Route(RouteName.POLL, "/v1/environments/{environment_id}/work/poll", "env_1"),
        ),
    ],
)
def test_classify(method: str, target: str, route: Route) -> None:
    assert classify(method, parse_target(target)) == route


@pytest.mark.parametrize(
    "target",
    [
        "/v1/sessions/../environments/env_1/work/poll",
        "/v1/sessions/./s",
        "/v1/sessions/%2e%2E/environments",
        "/v1/sessions/a%2fb",
        "/v1/sessions/a%5Cb",
        "/v1/sessions//s",
        "/v1/sessions/s/",
        "/v1/sessions/%zz",
        "/v1/sessions/s?x=%",
        "/v1/sessions/%ff%fe",
        "/v1/sessions/a%00b",
        "/v1/sessions/a%C2%9Bb",
        "/v1/sessions/a%E2%80%AEb",
        "/v1/sessions/..;x/environments/env_1",
        "/v1/sessions/.%3Bx",
        "/v1/sessions/a b",
        "/v1/sessions/ü",
        "http://evil.example/v1/sessions/s",
        "*",
    ],
)
def test_ambiguous_or_malformed_targets_are_refused(target: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_target(target)


def test_targets_keep_their_raw_form() -> None:
    target = parse_target("/v1/sessions/s%31?b=2&a=1&a=%2F&ids[]=1")
    assert target.raw == "/v1/sessions/s%31?b=2&a=1&a=%2F&ids[]=1"
    assert target.segments == ("v1", "sessions", "s1")
    assert target.with_query("x=1") == "/v1/sessions/s%31?x=1"
    assert parse_target("/v1/sessions/s?").raw == "/v1/sessions/s?"
    assert parse_target("/v1/sessions/s").raw_query is None


@pytest.mark.parametrize(
    ("target", "allowed"),
    [
        ("/v1/environments/env_1/work/poll", True),
        ("/v1/sessions/s", True),
        ("/v1/memory_stores/m", True),
        ("/v1/skills/s", True),
        ("/v1/environments", False),
        ("/v1/sessionsX/s", False),
        ("/v1/messages", False),
        ("/healthz", False),
        ("/", False),
        ("/v1/%73essions/s", True),  # decoded the way the upstream decodes it
    ],
)
def test_allow_prefixes(target: str, allowed: bool) -> None:
    assert is_allowed(parse_target(target), DEFAULT_ALLOW_PREFIXES) is allowed
