"""Config validation: every problem reported with its key path, secrets never echoed.

Checks `gateway/config/load.py`, `gateway/config/settings.py`, `gateway/config/checks.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.load import ConfigError, load_settings, load_settings_file
from gateway.config.settings import DEFAULT_ALLOW_PREFIXES, Secret, Settings

EXAMPLE = Path(__file__).parent.parent / "config" / "gateway.example.yaml"
# The README's two exports, nothing else.
EXAMPLE_ENV = {"PROD_ENVIRONMENT_KEY": "k-prod-secret", "WORKER_TOKEN": "t-secret"}

MINIMAL = """
environments: [{id: env_1, key_env: K}]
clients: {tokens: [{token_env: T}]}
"""


def problems(text: str, environ: dict[str, str] | None = None, **kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(text, environ or {"K": "key", "T": "token"}, **kwargs)  # type: ignore[arg-type]
    return [str(p) for p in caught.value.problems]


def test_the_annotated_example_is_valid_and_matches_the_defaults() -> None:
    settings = load_settings_file(EXAMPLE, EXAMPLE_ENV)
    assert settings.environments[0].id == "env_011CZkZ9X2dpNyB7HsEFoRfW"
    assert settings.environments[0].label == "prod-sandboxes"
    assert settings.environments[0].key.value == "k-prod-secret"
    # The organisation-scoped fallback is off unless configured.
    assert settings.default_credential.api_key is None
    assert settings.clients.tokens[0].environments is None
    assert settings.routes.allow_prefixes == DEFAULT_ALLOW_PREFIXES
    assert settings.headers.anthropic_beta == ("managed-agents-2026-04-01",)
    assert settings.upstream.pools.stream.max_connections == 1536
    assert settings.heartbeat.desired_ttl_seconds is None
    assert settings.limits.max_body_bytes == 32 * 1024 * 1024
    minimal = load_settings(MINIMAL, {"K": "key", "T": "token"})
    # Everything the example spells out is also the default.
    sections = (
        "listen",
        "admin",
        "upstream",
        "headers",
        "default_credential",
        "routes",
        "polls",
        "heartbeat",
        "limits",
    )
    for section in (*sections, "logging"):
        assert getattr(minimal, section) == getattr(settings, section), section
    assert minimal.clients.allow_unauthenticated == settings.clients.allow_unauthenticated
    assert minimal.clients.discover_sessions == settings.clients.discover_sessions


def test_every_problem_is_listed_with_its_key_path() -> None:
    found = problems(
        """
listen: {host: 1, port: yes}
admin: {port: 70000}
upstream: {base_url: "ftp://x", connect_timeout_seconds: 0, retries: 3, pools: {lease: {max_connections: 1.5}, bulk: 1}}
headers: {anthropic_beta: ["a,b"]}
environments:
  - {id: "bad id", key_env: K}
  - {id: env_2}
  - {id: env_3, key_env: MISSING_VAR}
clients: {tokens: [{token_env: T, environments: [env_9]}], allow_unauthenticated: "no"}
routes: {allow_prefixes: [v1/sessions]}
heartbeat: {desired_ttl_seconds: -5}
limits: {max_body_bytes: 0, shutdown_grace_seconds: -1}
logging: {level: loud, format: xml}
"""
    )
    assert found == [
        "listen.host: must be a string, not an integer",
        "listen.port: must be an integer, not a boolean",
        "admin.port: must be at most 65535, not 70000",
        "upstream.retries: unknown key; allowed: base_url, connect_timeout_seconds, request_timeout_seconds, pools, "
        "tls, proxy, allow_insecure_http, client",
        "upstream.base_url: must be an http:// or https:// URL with a host",
        "upstream.connect_timeout_seconds: must be greater than 0",
        "upstream.pools.bulk: unknown key; allowed: lease, poll, stream, other",
        "upstream.pools.lease.max_connections: must be an integer, not a number",
        "headers.anthropic_beta[0]: must be a single header token (no commas or spaces)",
        "environments[0].id: must be an environment id such as env_011CZkZ9X2dpNyB7HsEFoRfW",
        "environments[1]: one of key_env or key_file is required",
        "environments[2].key_env: environment variable MISSING_VAR is not set",
        # Within a section, in the order its keys are declared (and listed as allowed).
        "clients.tokens[0].environments[0]: env_9 is not a configured environment",
        "clients.allow_unauthenticated: must be true or false, not a string",
        "routes.allow_prefixes[0]: must start and end with / (e.g. /v1/sessions/)",
        "heartbeat.desired_ttl_seconds: must be at least 1, not -5",
        "limits.max_body_bytes: must be at least 1, not 0",
        "limits.shutdown_grace_seconds: must not be negative",
        "logging.level: must be one of debug, info, warning, error, not 'loud'",
        "logging.format: must be one of json, text, not 'xml'",
    ]


def test_the_single_connection_limit_is_gone_with_a_pointer_to_the_classes() -> None:
    assert problems(MINIMAL + "upstream: {max_connections: 256}") == [
        "upstream.max_connections: replaced by upstream.pools.<lease|poll|stream|other>.max_connections: "
        "each class has its own"
    ]


def test_typos_are_errors_with_a_suggestion() -> None:
    assert problems(MINIMAL + "limts: {}\n") == [
        "limts: unknown key (did you mean 'limits'?); allowed: listen, admin, upstream, headers, environments, "
        "default_credential, clients, routes, polls, overload, heartbeat, limits, logging, tracing"
    ]


def test_duplicate_keys_are_errors() -> None:
    assert problems(MINIMAL + "clients: {tokens: []}\n") == ["(yaml): line 4, column 1: duplicate key 'clients'"]


def test_invalid_yaml_is_reported_without_echoing_the_text() -> None:
    found = problems("environments: [{id: env_1, key_env: sk-ant-oops\n  bad: [")
    assert len(found) == 1
    assert found[0].startswith("(yaml): line ")
    assert "sk-ant" not in found[0]


def test_an_empty_config_is_an_error() -> None:
    assert problems("") == ["(root): the config is empty"]
    assert problems("[1, 2]") == [
        "(root): must be a mapping, not a list",
        "environments: is required: list the environments this gateway serves",
        "clients.tokens: is required: list at least one client token, or set clients.allow_unauthenticated: true",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "environments: [{id: env_1, key: sk-ant-api03-LITERAL}]\nclients: {tokens: [{token_env: T}]}",
            [
                "environments[0].key: literal secrets are not allowed in the config; name an environment "
                "variable (_env) or a file (_file)",
                "environments[0]: one of key_env or key_file is required",
            ],
        ),
        (
            "environments: [{id: env_1, key_env: sk-ant-api03-LITERAL}]\nclients: {tokens: [{token_env: T}]}",
            [
                "environments[0].key_env: looks like a literal API key; secrets must come from an environment "
                "variable or a file"
            ],
        ),
        (
            MINIMAL + "headers: {anthropic_version: sk-ant-api03-LITERAL}",
            [
                "headers.anthropic_version: looks like a literal API key; secrets must come from an environment "
                "variable or a file"
            ],
        ),
        (
            "environments: [{id: env_1, key_env: K}]\nclients: {tokens: [{token: hunter2}]}",
            [
                "clients.tokens[0].token: literal secrets are not allowed in the config; name an environment "
                "variable (_env) or a file (_file)",
                "clients.tokens[0]: one of token_env or token_file is required",
            ],
        ),
    ],
)
def test_literal_secrets_are_refused_without_being_echoed(text: str, expected: list[str]) -> None:
    found = problems(text)
    assert found == expected
    assert not any("LITERAL" in p or "hunter2" in p for p in found)


def test_secret_problems_name_the_variable_or_file_never_the_value(tmp_path: Path) -> None:
    unreadable = tmp_path / "missing-key"
    empty = tmp_path / "empty-key"
    empty.write_text("\n")
    two_lines = tmp_path / "two-lines"
    two_lines.write_text("first-secret-line\nsecond\n")
    found = problems(
        f"""
environments:
  - {{id: env_1, key_file: {unreadable}}}
  - {{id: env_2, key_file: {empty}}}
  - {{id: env_3, key_file: {two_lines}}}
  - {{id: env_4, key_env: EMPTY_VAR, key_file: /x}}
  - {{id: env_5, key_env: EMPTY_VAR}}
  - {{id: env_6, key_env: "not a name"}}
clients: {{tokens: [{{token_env: T}}]}}
""",
        {"T": "token", "EMPTY_VAR": "   "},
    )
    assert found == [
        f"environments[0].key_file: cannot read {unreadable}: No such file or directory",
        f"environments[1].key_file: {empty} is empty",
        f"environments[2].key_file: {two_lines} must hold only the secret, on one line",
        "environments[3]: set only one of key_env and key_file",
        "environments[4].key_env: environment variable EMPTY_VAR is empty",
        "environments[5].key_env: must be an environment variable name (letters, digits and _)",
    ]
    assert not any("first-secret-line" in p for p in found)


def test_secrets_load_from_files_with_the_trailing_newline_stripped(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-ant-from-a-file\n")
    settings = load_settings(
        f"environments: [{{id: env_1, key_file: {key_file}}}]\nclients: {{tokens: [{{token_env: T}}]}}", {"T": "t"}
    )
    assert settings.environments[0].key.value == "sk-ant-from-a-file"
    assert "sk-ant" not in repr(settings)
    assert "sk-ant" not in str(settings.environments[0].key)


def test_secrets_must_be_plain_visible_ascii(tmp_path: Path) -> None:
    quoted = tmp_path / "quoted"
    quoted.write_text('abc"def')
    found = problems(
        f"environments: [{{id: env_1, key_env: K}}, {{id: env_2, key_file: {quoted}}}]\n"
        "clients: {tokens: [{token_env: T}]}",
        {"K": "caf\u00e9-key", "T": "back\\slash"},
    )
    rule = "the secret must be visible ASCII without spaces, quotes or backslashes"
    assert found == [
        f"environments[0].key_env: environment variable K: {rule}",
        f"environments[1].key_file: {quoted}: {rule}",
        f"clients.tokens[0].token_env: environment variable T: {rule}",
    ]


def test_tokens_must_be_distinct_from_each_other_and_from_real_keys() -> None:
    found = problems(
        """
environments: [{id: env_1, key_env: K}]
default_credential: {api_key_env: A, use_for: [sessions]}
clients: {tokens: [{token_env: T}, {token_env: T2}, {token_env: K}, {token_env: A}]}
""",
        {"K": "key", "A": "api", "T": "same", "T2": "same"},
    )
    assert found == [
        "clients.tokens[1]: holds the same token as clients.tokens[0]",
        "clients.tokens[2]: holds the same value as the key of environments[0]",
        "clients.tokens[3]: holds the same value as the key of default_credential",
    ]


def test_the_organisation_key_is_used_only_where_listed() -> None:
    environ = {"K": "key", "T": "token", "A": "api"}
    assert problems(MINIMAL + "default_credential: {api_key_env: A}", environ) == [
        "default_credential.use_for: is required with a key: list where the gateway may send this "
        "organisation-scoped key when it cannot tell a request's environment (sessions, skills, memory_stores, other)"
    ]
    assert problems(MINIMAL + "default_credential: {use_for: [sessions]}", environ) == [
        "default_credential: use_for needs api_key_env or api_key_file"
    ]
    assert problems(MINIMAL + "default_credential: {api_key_env: A, use_for: [sessions, files]}", environ) == [
        "default_credential.use_for[1]: must be one of sessions, skills, memory_stores, other, not 'files'"
    ]
    settings = load_settings(MINIMAL + "default_credential: {api_key_env: A, use_for: [skills, other]}", environ)
    assert settings.default_credential.use_for == frozenset({"skills", "other"})
    assert problems(MINIMAL.replace("{token_env: T}]", "{token_env: T}], discover_sessions: 1"), environ) == [
        "clients.discover_sessions: must be true or false, not an integer"
    ]


def test_the_edges_limits_are_checked() -> None:
    assert problems(
        MINIMAL + "limits: {header_timeout_seconds: 0, idle_timeout_seconds: -1, body_timeout_seconds: x, "
        "max_client_connections: 0}"
    ) == [
        "limits.header_timeout_seconds: must be greater than 0",
        "limits.idle_timeout_seconds: must be greater than 0",
        "limits.body_timeout_seconds: must be a number, not a string",
        "limits.max_client_connections: must be at least 1, not 0",
    ]


def test_the_admin_port_cannot_be_the_worker_port() -> None:
    assert problems(MINIMAL + "listen: {port: 8080}\nadmin: {port: 8080}") == [
        "admin.port: must differ from listen.port: the admin API must not share the worker port"
    ]


def test_token_scopes_and_environment_ids() -> None:
    settings = load_settings(
        """
environments: [{id: env_1, key_env: K}, {id: env_2, key_env: K2}]
clients:
  tokens:
    - {token_env: T, environments: [env_2]}
    - {token_env: T2}
""",
        {"K": "k1", "K2": "k2", "T": "t1", "T2": "t2"},
    )
    limited, everything = settings.clients.tokens
    assert limited.allows("env_2")
    assert not limited.allows("env_1")
    assert everything.allows("env_1")
    assert problems(
        "environments: [{id: env_1, key_env: K}, {id: env_1, key_env: K}]\n"
        'clients: {tokens: [{token_env: T, environments: ["*", env_1]}, {token_env: T2, environments: []}]}',
        {"K": "k", "T": "t", "T2": "t2"},
    ) == [
        "environments[1].id: duplicate environment id env_1",
        'clients.tokens[0].environments: "*" already means every environment; list nothing else',
        'clients.tokens[1].environments: must not be empty; use ["*"] for every environment',
    ]


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://user:pw@api.example", "must not carry credentials; they would leak into logs"),
        ("https://api.example/?x=1", "must not have a query string or fragment"),
        ("https://api.example:99999", "must be an http:// or https:// URL with a host"),
        ("api.example", "must be an http:// or https:// URL with a host"),
    ],
)
def test_base_url_rules(url: str, problem: str) -> None:
    assert problems(MINIMAL + f'upstream: {{base_url: "{url}"}}') == [f"upstream.base_url: {problem}"]


def test_unauthenticated_mode_needs_no_tokens() -> None:
    settings: Settings = load_settings(
        "environments: [{id: env_1, key_env: K}]\nclients: {allow_unauthenticated: true}", {"K": "k"}
    )
    assert settings.clients.tokens == ()
    assert settings.clients.allow_unauthenticated


def test_an_unreadable_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings_file(tmp_path / "nope.yaml", {})
    assert str(caught.value) == f"{tmp_path / 'nope.yaml'}: cannot read the config file: No such file or directory"


def setting_paths(cls: type, prefix: str = "") -> list[str]:
    """Every config key the settings classes declare, as README paths (`environments[].id`)."""
    from dataclasses import fields, is_dataclass
    from typing import get_args, get_type_hints

    paths = []
    hints = get_type_hints(cls)
    for f in fields(cls):
        path = f"{prefix}{f.name}"
        hint = hints[f.name]
        items = [a for a in get_args(hint) if isinstance(a, type) and is_dataclass(a)]
        if isinstance(hint, type) and is_dataclass(hint) and hint is not Secret:
            paths += setting_paths(hint, f"{path}.")
        elif len(items) == 1 and items[0] is not Secret:  # a list of sections: tuple[Environment, ...]
            paths += setting_paths(items[0], f"{path}[].")
        else:
            paths.append(path)
    return paths


def test_every_setting_has_a_row_in_the_readme_reference() -> None:
    """Adding a setting is one field in settings.py and one README row: this finds a missing row."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    missing = []
    for path in setting_paths(Settings):
        parent, _, leaf = path.rpartition(".")
        # A row names the key itself, or its section with the key (`listen.host`, `listen.port`; `.override`).
        named = any(f"`{path}" in row or (parent and f"`{parent}" in row and leaf in row) for row in rows)
        if not named:
            missing.append(path)
    assert missing == []
    assert len(setting_paths(Settings)) > 40


def test_absorption_that_could_never_answer_an_sdk_workers_beat_is_refused_with_why() -> None:
    absorbing = MINIMAL + "heartbeat: {desired_ttl_seconds: %s, absorb: {enabled: true, %s}}\n"
    assert problems(absorbing % (60, "max_signal_delay_seconds: 60")) == [
        "heartbeat.desired_ttl_seconds: 60 s is too short a lease to absorb: after one 30 s beat interval only "
        "29 s are left to promise, which would shorten the workers' interval and per-beat timeout below what a "
        "forwarded answer gives them; use at least 91 (300 is recommended)"
    ]
    assert problems(absorbing % (300, "max_signal_delay_seconds: 30.5")) == [
        "heartbeat.absorb.max_signal_delay_seconds: must be more than 31 s at a 300 s lease: the first beat after "
        "a forwarded one comes one 30 s interval and a round trip later, so none could ever be answered locally"
    ]
    assert problems(absorbing % (300, "max_signal_delay_seconds: 60, min_remaining_fraction: 0.95")) == [
        "heartbeat.absorb.min_remaining_fraction: must be at most 0.90 at a 300 s lease: one beat interval after a "
        "forwarded beat only 269 s are left, so no beat could ever be answered locally"
    ]
    # Per environment too, at the key that sets the short lease, when no environment could absorb.
    per_environment = """
environments: [{id: env_1, key_env: K, heartbeat: {desired_ttl_seconds: 20}}, {id: env_2, key_env: K2%s}]
clients: {tokens: [{token_env: T}]}
heartbeat: {desired_ttl_seconds: 60, absorb: {enabled: true, max_signal_delay_seconds: 60}}
"""
    environ = {"K": "key", "K2": "key2", "T": "token"}
    found = problems(per_environment % "", environ)
    assert [p.split(":")[0] for p in found] == [
        "environments[0].heartbeat.desired_ttl_seconds",
        "heartbeat.desired_ttl_seconds",
    ]
    assert found[0].startswith("environments[0].heartbeat.desired_ttl_seconds: 20 s is too short a lease to absorb")
    # One environment with a long lease: absorption is useful there; the short ones are simply forwarded.
    load_settings(per_environment % ", heartbeat: {desired_ttl_seconds: 300}", environ)
    # An environment whose lease is the API's own (unknown here): judged beat by beat, not refused.
    load_settings((per_environment % "").replace("desired_ttl_seconds: 60, ", ""), environ)
    # The recommended settings pass; so does absorption with the API's own (unknown) TTL, judged beat by beat.
    for ok in (
        "desired_ttl_seconds: 300, absorb: {enabled: true, max_signal_delay_seconds: 60}",
        "absorb: {enabled: true}",
    ):
        load_settings(MINIMAL + f"heartbeat: {{{ok}}}\n", {"K": "key", "T": "token"})


def test_null_means_none_where_none_is_allowed_and_a_missing_key_means_the_default() -> None:
    environ = {"K": "key", "T": "token"}
    assert load_settings(MINIMAL, environ).polls.max_upstream_per_environment == 256
    off = load_settings(MINIMAL + "polls: {max_upstream_per_environment: null}", environ)
    assert off.polls.max_upstream_per_environment is None
    assert problems(MINIMAL + "polls: {max_upstream_per_environment: 0, refresh_seconds: -1}") == [
        "polls.max_upstream_per_environment: must be at least 1, not 0",
        "polls.refresh_seconds: must be greater than 0",
    ]


def test_config_errors_redact_secret_shaped_keys_and_values() -> None:
    pasted = "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUv0123456789"
    texts = [
        f"environments: [{{id: env_1, key_env: K, {pasted}: 1}}]\nclients: {{tokens: [{{token_env: T}}]}}",
        f"environments: [{{id: env_1, key_env: K}}]\nclients: {{tokens: [{{token_env: T}}]}}\n"
        f"logging: {{level: {pasted}}}",
        "environments: [{id: env_1, key_env: K}]\nclients: {tokens: [{token_env: T}]}\n"
        "upstream: {a1B2c3D4e5F6g7H8i9J0k1L2m3N4: 1}",
    ]
    for text in texts:
        with pytest.raises(ConfigError) as caught:
            load_settings(text, {"K": "k", "T": "t"})
        message = str(caught.value)
        assert pasted not in message
        assert "a1B2c3D4e5F6g7H8i9J0k1L2m3N4" not in message
        assert "<redacted>" in message
