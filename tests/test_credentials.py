"""Which credential goes upstream, and which requests are refused before it.

Checks `gateway/policy/credentials.py`.
"""

from __future__ import annotations

import pytest

from gateway.config.settings import Settings
from gateway.errors import AuthenticationFailed, PermissionDenied
from gateway.policy.credentials import Discover, Inject, PassThrough, decide_credential
from gateway.policy.links import Link, Links
from gateway.policy.plan import Policy
from gateway.policy.routing import RouteName, classify, parse_target

from .support import (
    ALL_ENVIRONMENTS_CLIENTS,
    API_KEY,
    DEFAULT_CREDENTIAL,
    ENV_ID,
    ENV_KEY,
    LIMITED_TOKEN,
    OTHER_ENV_ID,
    OTHER_ENV_KEY,
    TOKEN,
    make_settings,
)


@pytest.fixture
def settings() -> Settings:
    return make_settings("https://upstream.invalid")


def decide(
    settings: Settings,
    path: str,
    authorization: str | None = None,
    api_key: str | None = None,
    links: Links | None = None,
) -> object:
    return decide_credential(
        Policy(settings),
        classify("GET", parse_target(path)),
        authorization=authorization,
        api_key=api_key,
        links=(links or Links()).environments,
    )


ENV_BEARER = Inject("authorization", f"Bearer {ENV_KEY}")
OTHER_BEARER = Inject("authorization", f"Bearer {OTHER_ENV_KEY}")
ORGANISATION = Inject("x-api-key", API_KEY, kind="default_credential")


POLL = f"/v1/environments/{ENV_ID}/work/poll"
OTHER_POLL = f"/v1/environments/{OTHER_ENV_ID}/work/poll"


def test_a_token_becomes_the_environment_key(settings: Settings) -> None:
    assert decide(settings, POLL, authorization=f"Bearer {TOKEN}") == Inject("authorization", f"Bearer {ENV_KEY}")
    assert decide(settings, POLL, api_key=TOKEN) == Inject("authorization", f"Bearer {ENV_KEY}")
    assert decide(settings, POLL, authorization=f"bearer   {TOKEN} ") == Inject("authorization", f"Bearer {ENV_KEY}")
    assert decide(settings, OTHER_POLL, api_key=LIMITED_TOKEN) == Inject("authorization", f"Bearer {OTHER_ENV_KEY}")


@pytest.mark.parametrize(
    "path", ["/v1/sessions/sesn_1", "/v1/sessions/sesn_1/events/stream", "/v1/skills/skill_1/versions/latest"]
)
def test_a_token_of_one_environment_stands_for_its_key_everywhere(settings: Settings, path: str) -> None:
    # Never the organisation's key: the worker would have sent its environment key directly.
    assert decide(settings, path, authorization=f"Bearer {TOKEN}") == ENV_BEARER
    assert decide(settings, path, api_key=LIMITED_TOKEN) == OTHER_BEARER


def test_a_token_of_several_environments_uses_what_the_gateway_learned() -> None:
    settings = make_settings("https://upstream.invalid", clients=ALL_ENVIRONMENTS_CLIENTS)
    links = Links()
    links.learn(Link(RouteName.SESSIONS, "sesn_1", OTHER_ENV_ID))
    links.learn(Link(RouteName.SKILLS, "skill_1", ENV_ID))
    links.learn(Link(RouteName.MEMORY_STORES, "memstore_1", OTHER_ENV_ID))
    auth = f"Bearer {TOKEN}"
    assert decide(settings, "/v1/sessions/sesn_1/events", auth, links=links) == OTHER_BEARER
    assert decide(settings, "/v1/skills/skill_1/versions/v/content", auth, links=links) == ENV_BEARER
    assert decide(settings, "/v1/memory_stores/memstore_1/memories", auth, links=links) == OTHER_BEARER
    # A session is in one environment: a token that may not use it is refused, without naming it.
    links.learn(Link(RouteName.SESSIONS, "sesn_2", ENV_ID))
    with pytest.raises(PermissionDenied, match="session sesn_2 belongs to an environment this client token may not"):
        decide(settings, "/v1/sessions/sesn_2/events", api_key=LIMITED_TOKEN, links=links)
    # A skill is the organisation's: seen elsewhere, it still goes with the token's own environment.
    assert decide(settings, "/v1/skills/skill_1/versions/v", api_key=LIMITED_TOKEN, links=links) == OTHER_BEARER
    # A skill seen in several environments goes with the one the token may use.
    links.learn(Link(RouteName.SKILLS, "skill_1", OTHER_ENV_ID))
    links.learn(Link(RouteName.SKILLS, "skill_1", ENV_ID))
    assert decide(settings, "/v1/skills/skill_1/versions/v", api_key=LIMITED_TOKEN, links=links) == OTHER_BEARER
    assert decide(settings, "/v1/skills/skill_1/versions/v", auth, links=links) == ENV_BEARER


def test_an_unseen_session_of_a_token_of_several_environments_is_discovered() -> None:
    settings = make_settings("https://upstream.invalid", clients=ALL_ENVIRONMENTS_CLIENTS)
    decision = decide(settings, "/v1/sessions/sesn_9/events/stream", f"Bearer {TOKEN}")
    assert isinstance(decision, Discover)
    assert decision.session_id == "sesn_9"
    assert [e.id for e in decision.candidates] == [ENV_ID, OTHER_ENV_ID]
    assert isinstance(decision.fallback, PermissionDenied)
    assert "default_credential.use_for" in decision.fallback.message
    # Without discovery, or for a skill it cannot discover: 403 saying what to configure.
    no_discovery = make_settings(
        "https://upstream.invalid",
        clients=ALL_ENVIRONMENTS_CLIENTS.replace("clients:", "clients:\n  discover_sessions: false"),
    )
    with pytest.raises(PermissionDenied, match="Give the worker a token for its one environment"):
        decide(no_discovery, "/v1/sessions/sesn_9", f"Bearer {TOKEN}")
    with pytest.raises(PermissionDenied, match=r"list skills in default_credential\.use_for"):
        decide(settings, "/v1/skills/skill_9/versions/latest", f"Bearer {TOKEN}")


def test_the_organisation_key_only_where_configured_and_nothing_else_tells() -> None:
    settings = make_settings(
        "https://upstream.invalid",
        DEFAULT_CREDENTIAL.replace("sessions, skills, memory_stores, other", "skills, other"),
        clients=ALL_ENVIRONMENTS_CLIENTS,
    )
    auth = f"Bearer {TOKEN}"
    assert decide(settings, "/v1/skills/skill_9/versions/latest", auth) == ORGANISATION
    assert decide(settings, "/v1/files/file_1", auth) == ORGANISATION  # an operator-allowed prefix: "other"
    with pytest.raises(PermissionDenied):
        decide(settings, "/v1/memory_stores/memstore_9/memories", auth)
    # A session is still discovered first; the organisation key is only its fallback where listed.
    discover = decide(settings, "/v1/sessions/sesn_9", auth)
    assert isinstance(discover, Discover)
    assert isinstance(discover.fallback, PermissionDenied)
    everywhere = make_settings("https://upstream.invalid", DEFAULT_CREDENTIAL, clients=ALL_ENVIRONMENTS_CLIENTS)
    discover = decide(everywhere, "/v1/sessions/sesn_9", auth)
    assert isinstance(discover, Discover)
    assert discover.fallback == ORGANISATION
    # What the gateway learned, or a token of one environment, always comes first.
    links = Links()
    links.learn(Link(RouteName.SKILLS, "skill_1", ENV_ID))
    assert decide(everywhere, "/v1/skills/skill_1/versions/latest", auth, links=links) == ENV_BEARER
    assert decide(everywhere, "/v1/skills/skill_9/versions/latest", api_key=LIMITED_TOKEN) == OTHER_BEARER


def test_a_token_is_limited_to_its_environments(settings: Settings) -> None:
    with pytest.raises(PermissionDenied, match=f"may not use environment {ENV_ID}"):
        decide(settings, POLL, authorization=f"Bearer {LIMITED_TOKEN}")


def test_unserved_environments_are_refused_whatever_the_credential(settings: Settings) -> None:
    for auth in (f"Bearer {TOKEN}", "Bearer sk-ant-someone-elses", None):
        with pytest.raises(PermissionDenied, match="is not served by this gateway"):
            decide(settings, "/v1/environments/env_unknown/work/poll", authorization=auth)


def test_no_credential_is_a_401(settings: Settings) -> None:
    with pytest.raises(AuthenticationFailed):
        decide(settings, POLL)
    with pytest.raises(AuthenticationFailed):
        decide(settings, POLL, authorization="Bearer ")


def test_other_credentials_pass_through(settings: Settings) -> None:
    assert decide(settings, POLL, authorization="Bearer sk-ant-req-sessions-token") == PassThrough()
    assert decide(settings, "/v1/sessions/s", api_key="sk-ant-api03-workers-own") == PassThrough()
    assert decide(settings, POLL, authorization="Basic dXNlcjpwdw==") == PassThrough()
    # A near miss of a token is not the token.
    assert decide(settings, POLL, authorization=f"Bearer {TOKEN}x") == PassThrough()


def test_injected_values_do_not_show_in_repr() -> None:
    assert ENV_KEY not in repr(Inject("authorization", f"Bearer {ENV_KEY}"))
