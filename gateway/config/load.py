"""YAML config in, a validated `gateway.config.settings.Settings` out.

`load_settings(text, environ)` collects *every* problem before failing, each
as `key.path: problem`, so one run of `heartbeat-gateway check-config` shows
all that is wrong:

- Unknown keys, wrong types, duplicate keys and out-of-range values are
  errors: a typo must not silently fall back to a default.
- Secrets (environment keys, client tokens, the default API key) come only
  from environment variables (`*_env`) or files (`*_file`) named in the YAML.
  A literal secret in the YAML is an error. Messages name the key, the
  variable or the file, never the value.

The reader walks the settings classes (`gateway.config.settings`): a class is a
mapping whose allowed keys are its fields, a field's type says how to read
it and its `rule(...)` the range or format; only values that need more than
that (the environment list, token scopes, checks across keys) have a reader
method of their own. No key name, default or range is written down here.

Each reader records a problem and returns a placeholder when a value is
bad; `load_settings` raises if any problem was recorded, so placeholders
never escape. Reading secret files goes through the `read_file` argument.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeVar, Union, assert_never, cast, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

import yaml

from gateway.policy.redaction import REDACTED

from .checks import ca_file, check_settings, join_path, os_reason
from .settings import (
    FALLBACK_ROUTES,
    ClientSettings,
    ClientToken,
    DefaultCredential,
    Environment,
    Format,
    HeaderSettings,
    Reader,
    Rule,
    Secret,
    Settings,
)

__all__ = ["ConfigError", "Problem", "load_settings", "load_settings_file"]

_T = TypeVar("_T")
_D = TypeVar("_D")

_ENV_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ENVIRONMENT_ID = re.compile(r"[A-Za-z0-9_-]{1,128}\Z")
# RFC 9110 token: what one comma-separated header list element may hold.
_HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
# Anthropic credentials start like this: such a value is a pasted secret.
_SECRET_PREFIXES = ("sk-ant-",)
_LITERAL_SECRET = "looks like a literal API key; secrets must come from an environment variable or a file"
# Keys people write when they mean to paste a secret inline.
_LITERAL_SECRET_KEYS = frozenset({"key", "token", "api_key", "secret", "value", "password"})
_PLACEHOLDER_SECRET = Secret("", "invalid")
# Secrets travel in headers and must be found verbatim in any output to be
# scrubbed: visible ASCII only, no quotes or backslashes (JSON would escape them).
_SECRET_CHARS = re.compile(r"[!#-\[\]-~]+\Z")
_SECRET_CHARS_RULE = "the secret must be visible ASCII without spaces, quotes or backslashes"


class Problem:
    __slots__ = ("message", "path")

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"

    def __repr__(self) -> str:
        return f"Problem({self.path!r}, {self.message!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Problem) and (self.path, self.message) == (other.path, other.message)

    def __hash__(self) -> int:
        return hash((self.path, self.message))


class ConfigError(Exception):
    """The config is invalid; `problems` lists every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def load_settings_file(path: str | Path, environ: Mapping[str, str]) -> Settings:
    """Read and validate the YAML file at `path`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem(str(path), f"cannot read the config file: {os_reason(exc)}")]) from None
    return load_settings(text, environ)


def load_settings(
    text: str,
    environ: Mapping[str, str],
    *,
    read_file: Callable[[str], str] | None = None,
) -> Settings:
    """Parse and validate a YAML config; raise `ConfigError` listing every problem."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        # Only the parser's description: its snippet of the text could show a secret.
        raise ConfigError([Problem("(yaml)", f"{where}{exc.problem or 'invalid YAML'}")]) from None
    except yaml.YAMLError:
        raise ConfigError([Problem("(yaml)", "invalid YAML")]) from None
    if data is None:
        raise ConfigError([Problem("(root)", "the config is empty")])
    reader = _Reader(environ, read_file or _read_text_file)
    settings = reader.settings(data)
    if reader.problems:
        raise ConfigError(reader.problems)
    return settings


def _read_text_file(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {_shown(key)!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Values:
    """Reads one YAML value as a type or a named format, recording what is wrong with it."""

    def __init__(self, environ: Mapping[str, str], read_file: Callable[[str], str]) -> None:
        self.environ = environ
        self.read_file = read_file
        self.problems: list[Problem] = []
        # Read before the client tokens that may name them.
        self.known_environments: set[str] = set()

    def problem(self, path: str, message: str) -> None:
        path = path or "(root)"
        if Problem(path, message) not in self.problems:
            self.problems.append(Problem(path, message))

    # -- structure ----------------------------------------------------------

    def mapping(self, value: object, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        """The keys of `value` that are allowed; every other key is a problem."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(path, f"must be a mapping, not {_type_name(value)}")
            return {}
        for key in value:
            if not isinstance(key, str):
                self.problem(path, f"keys must be strings, not {_type_name(key)}")
            elif key not in allowed:
                self.problem(join_path(path, str(_shown(key))), _unknown_key_message(key, allowed))
        return {k: v for k, v in value.items() if k in allowed}

    def items(self, value: object, path: str) -> list[tuple[str, object]]:
        """A list's elements with their paths; anything else is a problem."""
        if not isinstance(value, list):
            self.problem(path, f"must be a list, not {_type_name(value)}")
            return []
        return [(f"{path}[{i}]", item) for i, item in enumerate(value)]

    # -- scalars ------------------------------------------------------------

    def string(self, value: object, path: str, default: str = "") -> str:
        if not isinstance(value, str):
            self.problem(path, "is required" if value is None else f"must be a string, not {_type_name(value)}")
        elif not value.strip():
            self.problem(path, "must not be empty")
        elif value.startswith(_SECRET_PREFIXES):
            self.problem(path, _LITERAL_SECRET)
        else:
            return value
        return default

    def strings(self, value: object, path: str, default: tuple[str, ...]) -> tuple[str, ...]:
        if value is None:
            return default
        return tuple(self.string(item, item_path) for item_path, item in self.items(value, path))

    def integer(self, value: object, path: str, minimum: int, maximum: int | None = None) -> int:
        # bool is an int subclass in Python; `port: yes` must not pass as 1.
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(path, f"must be an integer, not {_type_name(value)}")
        elif value < minimum:
            self.problem(path, f"must be at least {minimum}, not {value}")
        elif maximum is not None and value > maximum:
            self.problem(path, f"must be at most {maximum}, not {value}")
        else:
            return value
        return minimum

    def number(self, value: object, path: str, *, allow_zero: bool, maximum: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(path, f"must be a number, not {_type_name(value)}")
        elif value != value or abs(value) == float("inf"):
            self.problem(path, "must be a finite number")
        elif value < 0 or (value == 0 and not allow_zero):
            self.problem(path, "must not be negative" if allow_zero else "must be greater than 0")
        elif maximum is not None and value > maximum:
            self.problem(path, f"must be at most {maximum:g}, not {value:g}")
        else:
            return float(value)
        return 1.0

    def boolean(self, value: object, path: str) -> bool:
        if not isinstance(value, bool):
            self.problem(path, f"must be true or false, not {_type_name(value)}")
            return False
        return value

    def choice(self, value: object, path: str, choices: tuple[_T, ...]) -> _T:
        for choice in choices:
            if value == choice:
                return choice
        self.problem(path, f"must be one of {', '.join(map(str, choices))}, not {_shown(value)!r}")
        return choices[0]

    # -- secrets ------------------------------------------------------------

    def secret(self, m: dict[str, Any], path: str, env_key: str, file_key: str, *, required: bool) -> Secret | None:
        given = [k for k in (env_key, file_key) if m.get(k) is not None]
        if len(given) == 2:
            self.problem(path, f"set only one of {env_key} and {file_key}")
        elif given == [env_key]:
            return self.secret_from_env(m[env_key], join_path(path, env_key))
        elif given == [file_key]:
            return self.secret_from_file(m[file_key], join_path(path, file_key))
        elif required:
            self.problem(path, f"one of {env_key} or {file_key} is required")
        return _PLACEHOLDER_SECRET if required else None

    def secret_from_env(self, value: object, path: str) -> Secret:
        name = self.string(value, path)
        if not name:
            return _PLACEHOLDER_SECRET
        if not _ENV_VAR_NAME.match(name):
            self.problem(path, "must be an environment variable name (letters, digits and _)")
        elif name not in self.environ:
            self.problem(path, f"environment variable {name} is not set")
        elif not self.environ[name].strip():
            self.problem(path, f"environment variable {name} is empty")
        elif not _SECRET_CHARS.match(self.environ[name].strip()):
            self.problem(path, f"environment variable {name}: {_SECRET_CHARS_RULE}")
        else:
            return Secret(self.environ[name].strip(), f"env:{name}")
        return _PLACEHOLDER_SECRET

    def secret_from_file(self, value: object, path: str) -> Secret:
        file_path = self.string(value, path)
        if not file_path:
            return _PLACEHOLDER_SECRET
        try:
            # Mounted Kubernetes secrets and `echo > file` often end in a newline.
            secret = self.read_file(file_path).strip()
        except (OSError, ValueError) as exc:  # ValueError: not UTF-8, or a NUL in the path
            self.problem(path, f"cannot read {file_path}: {os_reason(exc)}")
            return _PLACEHOLDER_SECRET
        if not secret:
            self.problem(path, f"{file_path} is empty")
        elif any(c.isspace() for c in secret):
            self.problem(path, f"{file_path} must hold only the secret, on one line")
        elif not _SECRET_CHARS.match(secret):
            self.problem(path, f"{file_path}: {_SECRET_CHARS_RULE}")
        else:
            return Secret(secret, f"file:{file_path}")
        return _PLACEHOLDER_SECRET

    # -- named formats --------------------------------------------------------

    def formatted(self, value: str, path: str, format: Format | None) -> str:
        """`value` checked against a named format (a bad value has been reported already when empty)."""
        if not value or format is None:
            return value
        match format:
            case Format.URL:
                return self.base_url(value, path)
            case Format.HEADER_TOKEN:
                self.expect(_HEADER_TOKEN.match(value), path, "must be a single header token")
            case Format.BETA_TOKEN:
                self.expect(_HEADER_TOKEN.match(value), path, "must be a single header token (no commas or spaces)")
            case Format.ENVIRONMENT_ID:
                message = "must be an environment id such as env_011CZkZ9X2dpNyB7HsEFoRfW"
                self.expect(_ENVIRONMENT_ID.match(value), path, message)
            case Format.CA_FILE:
                ca_file(value, path, self.problem)
            case Format.PATH_PREFIX:
                self.path_prefix(value, path)
            case _:
                assert_never(format)
        return value

    def expect(self, ok: object, path: str, message: str) -> None:
        if not ok:
            self.problem(path, message)

    def path_prefix(self, value: str, path: str) -> None:
        if not value.startswith("/") or not value.endswith("/"):
            self.problem(path, "must start and end with / (e.g. /v1/sessions/)")
        elif "%" in value or "//" in value or "/../" in value or "/./" in value:
            self.problem(path, "must be a plain path without %, // or dot segments")

    def base_url(self, url: str, path: str) -> str:
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
            port_ok = True
        except ValueError:
            port_ok = False
        if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
            self.problem(path, "must be an http:// or https:// URL with a host")
        elif parts.username or parts.password:
            self.problem(path, "must not carry credentials; they would leak into logs")
        elif parts.query or parts.fragment:
            self.problem(path, "must not have a query string or fragment")
        return url.rstrip("/")


class _Reader(_Values):
    """Walks the parsed YAML along the settings classes, building typed settings."""

    # -- sections, walked from the settings classes ---------------------------

    def settings(self, data: object) -> Settings:
        # Unknown top-level keys first, then a pasted key anywhere, then each section in order.
        self.mapping(data, "", _keys(Settings))
        self.scan_for_literal_secrets(data, "")
        settings = self.section(data, "", Settings, None)
        check_settings(settings, self.environ, self.problem)
        return settings

    def section(self, value: object, path: str, cls: type[_D], default: _D | None) -> _D:
        """One settings class read from a mapping: its fields are the allowed keys, in order."""
        keys = _keys(cls)
        retired = {k: v for k, v in _RETIRED.items() if k.rpartition(".")[0] == path}
        if isinstance(value, dict) and retired:
            for key, message in retired.items():
                if key.rpartition(".")[2] in value:
                    self.problem(key, message)
            value = {k: v for k, v in value.items() if join_path(path, k) not in retired}
        m = self.mapping(value, path, keys)
        hints = _hints(cast(type, cls))
        values: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            fallback = getattr(default, f.name) if default is not None else f.default
            values[f.name] = self.field(m, join_path(path, f.name), f.name, hints[f.name], _rule(f), fallback)
        return self.after(cls(**values), path, m)

    def field(self, m: dict[str, Any], path: str, name: str, hint: Any, rule: Rule, default: Any) -> Any:
        """One field's value; `default` is `dataclasses.MISSING` for a field that must be given."""
        if rule.reader is not None:
            return self.special(rule.reader, m.get(name, _MISSING), path, default)
        optional, hint = _unwrap_optional(hint)
        if hint is Secret:
            parent, _, _ = path.rpartition(".")
            required = not optional
            return self.secret(m, parent, f"{name}_env", f"{name}_file", required=required)
        raw = m.get(name, _MISSING)
        given = default is not dataclasses.MISSING
        if isinstance(hint, type) and is_dataclass(hint):
            return self.section(None if raw is _MISSING else raw, path, hint, default if given else None)
        if raw is _MISSING and given:
            return default
        if raw in (None, _MISSING) and optional:
            return None  # null where null is allowed means none, whatever the default
        if raw in (None, _MISSING) and get_origin(hint) is tuple:
            return default if given else None
        # A required key that is absent reads as null: "is required", "must be ..., not null".
        return self.scalar(None if raw is _MISSING else raw, path, hint, rule)

    def scalar(self, raw: object, path: str, hint: Any, rule: Rule) -> Any:
        if hint is bool:
            return self.boolean(raw, path)
        if hint is int:
            assert rule.at_least is not None, f"{path}: an integer setting needs rule(at_least=...)"
            return self.integer(raw, path, rule.at_least, None if rule.at_most is None else int(rule.at_most))
        if hint is float:
            return self.number(raw, path, allow_zero=rule.zero_ok, maximum=rule.at_most)
        if hint is str:
            return self.formatted(self.string(raw, path), path, rule.format)
        if get_origin(hint) is Literal:
            return self.choice(raw, path, get_args(hint))
        if get_origin(hint) is tuple and get_args(hint) == (str, ...):
            return tuple(
                self.formatted(self.string(item, item_path), item_path, rule.format)
                for item_path, item in self.items(raw, path)
            )
        raise TypeError(f"{path}: no reader for settings of type {hint!r}")  # a settings class bug, not a config one

    # -- settings with readers of their own ------------------------------------

    def special(self, reader: Reader, raw: object, path: str, default: Any) -> Any:
        """A setting read by a reader of its own (`Rule.reader`): every `Reader` has its method here."""
        match reader:
            case Reader.ENVIRONMENTS:
                return self.environments(raw, path, default)
            case Reader.FALLBACK_ROUTES:
                return self.fallback_routes(raw, path, default)
            case Reader.CLIENT_TOKENS:
                return self.client_tokens(raw, path, default)
            case Reader.TOKEN_SCOPE:
                return self.token_scope(raw, path, default)
            case _:
                assert_never(reader)

    def after(self, section: _D, path: str, given: dict[str, Any]) -> _D:
        """Checks across a section's fields, once they are read; `given` is what the YAML had."""
        if isinstance(section, HeaderSettings):
            return cast(_D, dataclasses.replace(section, anthropic_beta=tuple(dict.fromkeys(section.anthropic_beta))))
        if isinstance(section, DefaultCredential):
            if section.api_key is not None and not given.get("use_for"):
                self.problem(
                    join_path(path, "use_for"),
                    "is required with a key: list where the gateway may send this organisation-scoped key when it "
                    f"cannot tell a request's environment ({', '.join(FALLBACK_ROUTES)})",
                )
            elif section.api_key is None and given.get("use_for"):
                self.problem(path, "use_for needs api_key_env or api_key_file")
        if isinstance(section, ClientSettings) and not section.tokens and not section.allow_unauthenticated:
            self.problem(
                join_path(path, "tokens"),
                "is required: list at least one client token, or set clients.allow_unauthenticated: true",
            )
        return section

    def listing(self, raw: object, path: str) -> list[tuple[str, object]]:
        return [] if raw is _MISSING or raw is None else self.items(raw, path)

    def environments(self, raw: object, path: str, default: object) -> tuple[Environment, ...]:
        if raw is _MISSING or raw is None:
            self.problem(path, "is required: list the environments this gateway serves")
            return ()
        result: list[Environment] = []
        for item_path, item in self.items(raw, path):
            env = self.section(item, item_path, Environment, None)
            if env.id and any(e.id == env.id for e in result):
                self.problem(join_path(item_path, "id"), f"duplicate environment id {env.id}")
            if env.name and any(e.name == env.name for e in result):
                self.problem(join_path(item_path, "name"), f"duplicate environment name {env.name}")
            result.append(env)
        if isinstance(raw, list) and not raw:
            self.problem(path, "must list at least one environment")
        self.known_environments = {e.id for e in result}
        return tuple(result)

    def fallback_routes(self, raw: object, path: str, default: frozenset[str]) -> frozenset[str]:
        use_for: list[str] = []
        for item_path, item in self.listing(raw, path):
            route = self.choice(item, item_path, FALLBACK_ROUTES)
            if item == route and route not in use_for:
                use_for.append(route)
        return frozenset(use_for)

    def client_tokens(self, raw: object, path: str, default: tuple[ClientToken, ...]) -> tuple[ClientToken, ...]:
        tokens: list[ClientToken] = []
        for item_path, item in self.listing(raw, path):
            token = self.section(item, item_path, ClientToken, None)
            for j, earlier in enumerate(tokens):
                if token.token.value and earlier.token.value == token.token.value:
                    self.problem(item_path, f"holds the same token as {path}[{j}]")
            tokens.append(token)
        return tuple(tokens)

    def token_scope(self, raw: object, path: str, default: frozenset[str] | None) -> frozenset[str] | None:
        envs = self.strings(None if raw is _MISSING else raw, path, ("*",))
        if not envs:
            self.problem(path, 'must not be empty; use ["*"] for every environment')
        if "*" in envs:
            if len(envs) > 1:
                self.problem(path, '"*" already means every environment; list nothing else')
            return None
        for i, env_id in enumerate(envs):
            if env_id and env_id not in self.known_environments:
                self.problem(f"{path}[{i}]", f"{env_id} is not a configured environment")
        return frozenset(envs)

    def scan_for_literal_secrets(self, node: object, path: str) -> None:
        """Catch a pasted key anywhere, even under a key that is rejected anyway."""
        if isinstance(node, dict):
            for k, v in node.items():
                # `key: ...` and friends are reported as literal secrets by `mapping`.
                if k not in _LITERAL_SECRET_KEYS:
                    self.scan_for_literal_secrets(v, join_path(path, str(k)))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                self.scan_for_literal_secrets(v, f"{path}[{i}]")
        elif isinstance(node, str) and node.startswith(_SECRET_PREFIXES):
            self.problem(path, _LITERAL_SECRET)


# Keys that once existed, with where their setting went: a clear pointer beats "unknown key".
_RETIRED = MappingProxyType(
    {
        "upstream.max_connections": (
            "replaced by upstream.pools.<lease|poll|stream|other>.max_connections: each class has its own"
        ),
    }
)


class _Missing:
    """A key absent from the YAML (unlike one given as null)."""


_MISSING = _Missing()


def _keys(cls: type) -> tuple[str, ...]:
    """The YAML keys of a settings class: its fields, a secret as `<name>_env` and `<name>_file`."""
    hints = _hints(cls)
    keys: list[str] = []
    for f in fields(cls):
        if _unwrap_optional(hints[f.name])[1] is Secret:
            keys += [f"{f.name}_env", f"{f.name}_file"]
        else:
            keys.append(f.name)
    return tuple(keys)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _rule(f: dataclasses.Field[Any]) -> Rule:
    found = f.metadata.get("rule")
    return found if isinstance(found, Rule) else _NO_RULE


_NO_RULE = Rule()


def _unwrap_optional(hint: Any) -> tuple[bool, Any]:
    """(whether None is allowed, the type without None)."""
    if get_origin(hint) in (Union, types.UnionType):
        rest = [a for a in get_args(hint) if a is not type(None)]
        if len(rest) == 1 and len(get_args(hint)) == 2:
            return True, rest[0]
    return False, hint


def _unknown_key_message(key: str, allowed: tuple[str, ...]) -> str:
    if key in _LITERAL_SECRET_KEYS:
        return "literal secrets are not allowed in the config; name an environment variable (_env) or a file (_file)"
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key{hint}; allowed: {', '.join(allowed)}"


# Something a config message would otherwise quote that may be a pasted secret.
_SECRET_SHAPE = re.compile(r"[A-Za-z0-9_\-+/=.]{24,}\Z")


def _shown(value: object) -> object:
    """`value` as a message may quote it: a secret-shaped key or value becomes <redacted>.

    A key is echoed in `key.path: unknown key`; an operator who pasted a key
    where a key name goes must not find it printed in CI logs.
    """
    if not isinstance(value, str):
        return value
    if value.startswith(_SECRET_PREFIXES) or (
        _SECRET_SHAPE.match(value) and any(c.isdigit() for c in value) and any(c.isalpha() for c in value)
    ):
        return REDACTED
    return value


def _type_name(value: object) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)
