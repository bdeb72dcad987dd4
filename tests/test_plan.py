"""The settings as the request path asks them, worked out once per generation.

Checks `gateway/policy/plan.py`.
"""

from __future__ import annotations

from gateway.config.settings import LiveSettings
from gateway.policy.credentials import Inject
from gateway.policy.plan import CurrentPolicy, Policy

from .support import ENV_ID, ENV_KEY, LIMITED_TOKEN, OTHER_ENV_ID, OTHER_ENV_KEY, TOKEN, make_settings

UPSTREAM = "https://upstream.invalid"


def test_each_served_environment_has_its_label_key_and_ttl() -> None:
    settings = make_settings(
        UPSTREAM,
        f"""
heartbeat: {{desired_ttl_seconds: 60}}
environments:
  - id: {ENV_ID}
    name: prod-sandboxes
    key_env: TEST_ENV_KEY
    heartbeat: {{desired_ttl_seconds: 90, override: true}}
  - {{id: {OTHER_ENV_ID}, key_env: TEST_OTHER_ENV_KEY}}
""",
    )
    policy = Policy(settings)
    prod, other = policy.served(ENV_ID), policy.served(OTHER_ENV_ID)
    assert prod is not None
    assert other is not None
    assert (prod.label, prod.key, prod.desired_ttl, prod.override_ttl) == (
        "prod-sandboxes",
        Inject("authorization", f"Bearer {ENV_KEY}"),
        90,
        True,
    )
    # As `Settings.desired_ttl` says for it: the global TTL, the worker's own kept.
    assert (other.label, other.key.value, (other.desired_ttl, other.override_ttl)) == (
        OTHER_ENV_ID,
        f"Bearer {OTHER_ENV_KEY}",
        settings.desired_ttl(OTHER_ENV_ID),
    )
    assert policy.served("env_unknown") is None
    assert policy.environment("env_unknown") is None
    assert policy.served_ids == {ENV_ID, OTHER_ENV_ID}


def test_a_credential_is_matched_to_its_token_and_its_scope() -> None:
    policy = Policy(make_settings(UPSTREAM))
    token = policy.client_token(["not-a-token", TOKEN])
    assert token is not None
    assert token.token.value == TOKEN
    # The first presented credential that is a token wins.
    limited = policy.client_token([LIMITED_TOKEN, TOKEN])
    assert limited is not None
    assert limited.token.value == LIMITED_TOKEN
    assert policy.client_token(["", TOKEN + "x", TOKEN[:-1]]) is None
    assert [e.id for e in policy.scope(token)] == [ENV_ID]
    assert [e.id for e in policy.scope(limited)] == [OTHER_ENV_ID]
    assert [e.id for e in policy.scope(None)] == [ENV_ID, OTHER_ENV_ID]


def test_a_token_is_found_anywhere_in_a_text() -> None:
    policy = Policy(make_settings(UPSTREAM))
    assert policy.any_token_in(f"x-trace: a{LIMITED_TOKEN}b")
    assert not policy.any_token_in(f"Bearer {ENV_KEY}\n/v1/environments/{ENV_ID}")


def test_a_reload_is_asked_of_the_new_settings_and_only_then_worked_out_again() -> None:
    live = LiveSettings(make_settings(UPSTREAM))
    current = CurrentPolicy(live)
    first = current.current
    assert current.current is first  # the same generation: nothing worked out again
    live.current = make_settings(
        UPSTREAM,
        f"environments: [{{id: {ENV_ID}, name: renamed, key_env: TEST_OTHER_ENV_KEY}}]",
        clients=f"clients: {{tokens: [{{token_env: TEST_TOKEN, environments: [{ENV_ID}]}}]}}",
    )
    reloaded = current.current
    assert reloaded is not first
    assert reloaded.settings is live.current
    served = reloaded.served(ENV_ID)
    assert served is not None
    assert (served.label, served.key.value) == ("renamed", f"Bearer {OTHER_ENV_KEY}")
    assert reloaded.served(OTHER_ENV_ID) is None
