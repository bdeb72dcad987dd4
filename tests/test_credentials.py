"""Which credential goes upstream, and which requests are refused before it."""

from __future__ import annotations

import pytest

from gateway.credentials import Inject, PassThrough, decide_credential
from gateway.errors import AuthenticationFailed, PermissionDenied
from gateway.routing import classify, parse_target
from gateway.settings import Settings

from .support import API_KEY, ENV_ID, ENV_KEY, LIMITED_TOKEN, OTHER_ENV_ID, OTHER_ENV_KEY, TOKEN, make_settings


@pytest.fixture
def settings() -> Settings:
    return make_settings("http://upstream.invalid")


def decide(settings: Settings, path: str, authorization: str | None = None, api_key: str | None = None) -> object:
    return decide_credential(
        settings, classify("GET", parse_target(path)), authorization=authorization, api_key=api_key
    )


POLL = f"/v1/environments/{ENV_ID}/work/poll"
OTHER_POLL = f"/v1/environments/{OTHER_ENV_ID}/work/poll"


def test_a_token_becomes_the_environment_key(settings: Settings) -> None:
    assert decide(settings, POLL, authorization=f"Bearer {TOKEN}") == Inject("authorization", f"Bearer {ENV_KEY}")
    assert decide(settings, POLL, api_key=TOKEN) == Inject("authorization", f"Bearer {ENV_KEY}")
    assert decide(settings, POLL, authorization=f"bearer   {TOKEN} ") == Inject("authorization", f"Bearer {ENV_KEY}")
    assert decide(settings, OTHER_POLL, api_key=LIMITED_TOKEN) == Inject("authorization", f"Bearer {OTHER_ENV_KEY}")


def test_a_token_becomes_the_default_credential_elsewhere(settings: Settings) -> None:
    assert decide(settings, "/v1/sessions/s", authorization=f"Bearer {TOKEN}") == Inject("x-api-key", API_KEY)


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
