"""YAML config in, a validated `gateway.settings.Settings` out.

`load_settings(text, environ)` collects *every* problem before failing, each
as `key.path: problem`, so one run of `heartbeat-gateway check-config` shows
all that is wrong:

- Unknown keys, wrong types, duplicate keys and out-of-range values are
  errors: a typo must not silently fall back to a default.
- Secrets (environment keys, client tokens, the default API key) come only
  from environment variables (`*_env`) or files (`*_file`) named in the YAML.
  A literal secret in the YAML is an error. Messages name the key, the
  variable or the file, never the value.

Each reader below records a problem and returns a placeholder when a value
is bad; `load_settings` raises if any problem was recorded, so placeholders
never escape. Reading secret files goes through the `read_file` argument.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from .redaction import REDACTED
from .settings import (
    DEFAULT_ALLOW_PREFIXES,
    DEFAULT_BETAS,
    FALLBACK_ROUTES,
    LOG_FORMATS,
    LOG_LEVELS,
    AbsorbSettings,
    ClientSettings,
    ClientToken,
    DefaultCredential,
    Environment,
    HeaderSettings,
    HeartbeatSettings,
    LeaseTrackingSettings,
    Limits,
    ListenAddress,
    LoggingSettings,
    PoolName,
    PoolSettings,
    RouteSettings,
    Secret,
    Settings,
    TtlOverride,
    UpstreamPools,
    UpstreamSettings,
)

__all__ = ["ConfigError", "Problem", "load_settings", "load_settings_file"]

_T = TypeVar("_T")

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

_ROOT_KEYS = (
    "listen",
    "admin",
    "upstream",
    "headers",
    "environments",
    "default_credential",
    "clients",
    "routes",
    "heartbeat",
    "limits",
    "logging",
)


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
        raise ConfigError([Problem(str(path), f"cannot read the config file: {_os_reason(exc)}")]) from None
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


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


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


class _Reader:
    """Walks the parsed YAML, recording problems and building typed values."""

    def __init__(self, environ: Mapping[str, str], read_file: Callable[[str], str]) -> None:
        self.environ = environ
        self.read_file = read_file
        self.problems: list[Problem] = []

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
                self.problem(_join(path, str(_shown(key))), _unknown_key_message(key, allowed))
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

    def number(self, value: object, path: str, *, allow_zero: bool) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(path, f"must be a number, not {_type_name(value)}")
        elif value != value or abs(value) == float("inf"):
            self.problem(path, "must be a finite number")
        elif value < 0 or (value == 0 and not allow_zero):
            self.problem(path, "must not be negative" if allow_zero else "must be greater than 0")
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
            return self.secret_from_env(m[env_key], _join(path, env_key))
        elif given == [file_key]:
            return self.secret_from_file(m[file_key], _join(path, file_key))
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
        except (OSError, UnicodeDecodeError) as exc:
            self.problem(path, f"cannot read {file_path}: {_os_reason(exc)}")
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

    # -- sections -----------------------------------------------------------

    def settings(self, data: object) -> Settings:
        root = self.mapping(data, "", _ROOT_KEYS)
        self.scan_for_literal_secrets(data, "")
        # Sections are read in the order the config documents them, so
        # problems are listed in that order too.
        listen = self.listen_address(root.get("listen"), "listen", ListenAddress("0.0.0.0", 8080))
        admin = self.listen_address(root.get("admin"), "admin", ListenAddress("0.0.0.0", 9090))
        upstream = self.upstream(root.get("upstream"))
        headers = self.headers(root.get("headers"))
        environments = self.environments(root.get("environments"))
        settings = Settings(
            listen=listen,
            admin=admin,
            upstream=upstream,
            headers=headers,
            environments=environments,
            default_credential=self.default_credential(root.get("default_credential")),
            clients=self.clients(root.get("clients"), {e.id for e in environments}),
            routes=self.routes(root.get("routes")),
            heartbeat=self.heartbeat(root.get("heartbeat")),
            limits=self.limits(root.get("limits")),
            logging=self.logging(root.get("logging")),
        )
        self.check_ports(settings.listen, settings.admin)
        self.check_distinct_secrets(settings)
        return settings

    def scan_for_literal_secrets(self, node: object, path: str) -> None:
        """Catch a pasted key anywhere, even under a key that is rejected anyway."""
        if isinstance(node, dict):
            for k, v in node.items():
                # `key: ...` and friends are reported as literal secrets by `mapping`.
                if k not in _LITERAL_SECRET_KEYS:
                    self.scan_for_literal_secrets(v, _join(path, str(k)))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                self.scan_for_literal_secrets(v, f"{path}[{i}]")
        elif isinstance(node, str) and node.startswith(_SECRET_PREFIXES):
            self.problem(path, _LITERAL_SECRET)

    def listen_address(self, value: object, path: str, default: ListenAddress) -> ListenAddress:
        m = self.mapping(value, path, ("host", "port"))
        return ListenAddress(
            host=self.string(m.get("host", default.host), _join(path, "host")),
            port=self.integer(m.get("port", default.port), _join(path, "port"), 0, 65535),
        )

    def check_ports(self, listen: ListenAddress, admin: ListenAddress) -> None:
        wildcard = "0.0.0.0" in (listen.host, admin.host) or "::" in (listen.host, admin.host)
        if listen.port and listen.port == admin.port and (listen.host == admin.host or wildcard):
            self.problem("admin.port", "must differ from listen.port: the admin API must not share the worker port")

    def upstream(self, value: object) -> UpstreamSettings:
        d = UpstreamSettings()
        if isinstance(value, dict) and "max_connections" in value:
            self.problem(
                "upstream.max_connections",
                "replaced by upstream.pools.<lease|poll|stream|other>.max_connections: each class has its own",
            )
            value = {k: v for k, v in value.items() if k != "max_connections"}
        m = self.mapping(
            value,
            "upstream",
            ("base_url", "connect_timeout_seconds", "request_timeout_seconds", "pools"),
        )
        return UpstreamSettings(
            base_url=self.base_url(m.get("base_url", d.base_url), "upstream.base_url"),
            connect_timeout_seconds=self.number(
                m.get("connect_timeout_seconds", d.connect_timeout_seconds),
                "upstream.connect_timeout_seconds",
                allow_zero=False,
            ),
            request_timeout_seconds=self.number(
                m.get("request_timeout_seconds", d.request_timeout_seconds),
                "upstream.request_timeout_seconds",
                allow_zero=False,
            ),
            pools=self.pools(m.get("pools"), d.pools),
        )

    def pools(self, value: object, default: UpstreamPools) -> UpstreamPools:
        path = "upstream.pools"
        m = self.mapping(value, path, tuple(p.value for p in PoolName))
        return UpstreamPools(
            **{p.value: self.pool(m.get(p.value), _join(path, p.value), default.of(p)) for p in PoolName}
        )

    def pool(self, value: object, path: str, default: PoolSettings) -> PoolSettings:
        m = self.mapping(value, path, ("max_connections", "max_queued", "max_queue_seconds"))
        return PoolSettings(
            max_connections=self.integer(
                m.get("max_connections", default.max_connections), _join(path, "max_connections"), 1, 100_000
            ),
            max_queued=self.integer(m.get("max_queued", default.max_queued), _join(path, "max_queued"), 0, 1_000_000),
            max_queue_seconds=self.number(
                m.get("max_queue_seconds", default.max_queue_seconds),
                _join(path, "max_queue_seconds"),
                allow_zero=False,
            ),
        )

    def base_url(self, value: object, path: str) -> str:
        url = self.string(value, path)
        if not url:
            return url
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

    def headers(self, value: object) -> HeaderSettings:
        d = HeaderSettings()
        m = self.mapping(value, "headers", ("anthropic_version", "anthropic_beta"))
        version = self.string(m.get("anthropic_version", d.anthropic_version), "headers.anthropic_version")
        if version and not _HEADER_TOKEN.match(version):
            self.problem("headers.anthropic_version", "must be a single header token")
        betas = self.strings(m.get("anthropic_beta"), "headers.anthropic_beta", DEFAULT_BETAS)
        for i, beta in enumerate(betas):
            if beta and not _HEADER_TOKEN.match(beta):
                self.problem(f"headers.anthropic_beta[{i}]", "must be a single header token (no commas or spaces)")
        return HeaderSettings(version, tuple(dict.fromkeys(betas)))

    def environments(self, value: object) -> tuple[Environment, ...]:
        if value is None:
            self.problem("environments", "is required: list the environments this gateway serves")
            return ()
        result: list[Environment] = []
        for path, item in self.items(value, "environments"):
            env = self.environment(item, path)
            if env.id and any(e.id == env.id for e in result):
                self.problem(_join(path, "id"), f"duplicate environment id {env.id}")
            if env.name and any(e.name == env.name for e in result):
                self.problem(_join(path, "name"), f"duplicate environment name {env.name}")
            result.append(env)
        if isinstance(value, list) and not value:
            self.problem("environments", "must list at least one environment")
        return tuple(result)

    def environment(self, item: object, path: str) -> Environment:
        m = self.mapping(item, path, ("id", "name", "key_env", "key_file", "heartbeat"))
        env_id = self.string(m.get("id"), _join(path, "id"))
        if env_id and not _ENVIRONMENT_ID.match(env_id):
            self.problem(_join(path, "id"), "must be an environment id such as env_011CZkZ9X2dpNyB7HsEFoRfW")
        name = None if m.get("name") is None else self.string(m["name"], _join(path, "name"))
        key = self.secret(m, path, "key_env", "key_file", required=True) or _PLACEHOLDER_SECRET
        hb_path = _join(path, "heartbeat")
        hb = self.mapping(m.get("heartbeat"), hb_path, ("desired_ttl_seconds", "override"))
        ttl = hb.get("desired_ttl_seconds")
        override = hb.get("override")
        return Environment(
            env_id,
            name,
            key,
            TtlOverride(
                None if ttl is None else self.integer(ttl, _join(hb_path, "desired_ttl_seconds"), 1),
                None if override is None else self.boolean(override, _join(hb_path, "override")),
            ),
        )

    def default_credential(self, value: object) -> DefaultCredential:
        path = "default_credential"
        m = self.mapping(value, path, ("api_key_env", "api_key_file", "use_for"))
        key = self.secret(m, path, "api_key_env", "api_key_file", required=False)
        use_for: list[str] = []
        for item_path, item in self.items(m.get("use_for") or [], _join(path, "use_for")):
            route = self.choice(item, item_path, FALLBACK_ROUTES)
            if item == route and route not in use_for:
                use_for.append(route)
        if key is not None and not m.get("use_for"):
            self.problem(
                _join(path, "use_for"),
                "is required with a key: list where the gateway may send this organisation-scoped key when it "
                f"cannot tell a request's environment ({', '.join(FALLBACK_ROUTES)})",
            )
        elif key is None and m.get("use_for"):
            self.problem(path, "use_for needs api_key_env or api_key_file")
        return DefaultCredential(key, frozenset(use_for))

    def clients(self, value: object, known: set[str]) -> ClientSettings:
        m = self.mapping(value, "clients", ("tokens", "allow_unauthenticated", "discover_sessions"))
        allow = self.boolean(m.get("allow_unauthenticated", False), "clients.allow_unauthenticated")
        discover = self.boolean(m.get("discover_sessions", True), "clients.discover_sessions")
        tokens: list[ClientToken] = []
        for path, item in self.items(m.get("tokens") or [], "clients.tokens"):
            token = self.client_token(item, path, known)
            for j, earlier in enumerate(tokens):
                if token.token.value and earlier.token.value == token.token.value:
                    self.problem(path, f"holds the same token as clients.tokens[{j}]")
            tokens.append(token)
        if not tokens and not allow:
            self.problem(
                "clients.tokens",
                "is required: list at least one client token, or set clients.allow_unauthenticated: true",
            )
        return ClientSettings(tuple(tokens), allow, discover)

    def client_token(self, item: object, path: str, known: set[str]) -> ClientToken:
        m = self.mapping(item, path, ("token_env", "token_file", "environments"))
        token = self.secret(m, path, "token_env", "token_file", required=True) or _PLACEHOLDER_SECRET
        envs_path = _join(path, "environments")
        envs = self.strings(m.get("environments"), envs_path, ("*",))
        if not envs:
            self.problem(envs_path, 'must not be empty; use ["*"] for every environment')
        if "*" in envs:
            if len(envs) > 1:
                self.problem(envs_path, '"*" already means every environment; list nothing else')
            return ClientToken(token, None)
        for i, env_id in enumerate(envs):
            if env_id and env_id not in known:
                self.problem(f"{envs_path}[{i}]", f"{env_id} is not a configured environment")
        return ClientToken(token, frozenset(envs))

    def check_distinct_secrets(self, settings: Settings) -> None:
        """A client token equal to a real key would hand that key to every worker."""
        real: dict[str, str] = {}
        for i, env in enumerate(settings.environments):
            real.setdefault(env.key.value, f"environments[{i}]")
        if settings.default_credential.api_key is not None:
            real.setdefault(settings.default_credential.api_key.value, "default_credential")
        for i, token in enumerate(settings.clients.tokens):
            if token.token.value and token.token.value in real:
                self.problem(f"clients.tokens[{i}]", f"holds the same value as the key of {real[token.token.value]}")

    def routes(self, value: object) -> RouteSettings:
        m = self.mapping(value, "routes", ("allow_prefixes",))
        prefixes = self.strings(m.get("allow_prefixes"), "routes.allow_prefixes", DEFAULT_ALLOW_PREFIXES)
        for i, prefix in enumerate(prefixes):
            path = f"routes.allow_prefixes[{i}]"
            if not prefix:
                continue
            if not prefix.startswith("/") or not prefix.endswith("/"):
                self.problem(path, "must start and end with / (e.g. /v1/sessions/)")
            elif "%" in prefix or "//" in prefix or "/../" in prefix or "/./" in prefix:
                self.problem(path, "must be a plain path without %, // or dot segments")
        return RouteSettings(prefixes)

    def heartbeat(self, value: object) -> HeartbeatSettings:
        d = HeartbeatSettings()
        m = self.mapping(
            value,
            "heartbeat",
            ("desired_ttl_seconds", "override", "coalesce", "upstream_timeout_seconds", "absorb", "leases"),
        )
        ttl = m.get("desired_ttl_seconds")
        return HeartbeatSettings(
            desired_ttl_seconds=None if ttl is None else self.integer(ttl, "heartbeat.desired_ttl_seconds", 1),
            override=self.boolean(m.get("override", d.override), "heartbeat.override"),
            coalesce=self.boolean(m.get("coalesce", d.coalesce), "heartbeat.coalesce"),
            upstream_timeout_seconds=self.number(
                m.get("upstream_timeout_seconds", d.upstream_timeout_seconds),
                "heartbeat.upstream_timeout_seconds",
                allow_zero=False,
            ),
            absorb=self.absorb(m.get("absorb")),
            leases=self.lease_tracking(m.get("leases")),
        )

    def absorb(self, value: object) -> AbsorbSettings:
        d = AbsorbSettings()
        path = "heartbeat.absorb"
        m = self.mapping(value, path, ("enabled", "max_signal_delay_seconds", "min_remaining_fraction"))
        fraction = self.number(
            m.get("min_remaining_fraction", d.min_remaining_fraction),
            _join(path, "min_remaining_fraction"),
            allow_zero=False,
        )
        if fraction > 1:
            self.problem(_join(path, "min_remaining_fraction"), f"must be at most 1, not {fraction:g}")
        return AbsorbSettings(
            enabled=self.boolean(m.get("enabled", d.enabled), _join(path, "enabled")),
            max_signal_delay_seconds=self.number(
                m.get("max_signal_delay_seconds", d.max_signal_delay_seconds),
                _join(path, "max_signal_delay_seconds"),
                allow_zero=False,
            ),
            min_remaining_fraction=fraction,
        )

    def lease_tracking(self, value: object) -> LeaseTrackingSettings:
        d = LeaseTrackingSettings()
        path = "heartbeat.leases"
        m = self.mapping(value, path, ("max_tracked", "retention_seconds", "expiry_grace_seconds"))
        return LeaseTrackingSettings(
            max_tracked=self.integer(m.get("max_tracked", d.max_tracked), _join(path, "max_tracked"), 1),
            retention_seconds=self.number(
                m.get("retention_seconds", d.retention_seconds), _join(path, "retention_seconds"), allow_zero=True
            ),
            expiry_grace_seconds=self.number(
                m.get("expiry_grace_seconds", d.expiry_grace_seconds),
                _join(path, "expiry_grace_seconds"),
                allow_zero=True,
            ),
        )

    def limits(self, value: object) -> Limits:
        d = Limits()
        timeouts = ("header_timeout_seconds", "idle_timeout_seconds", "body_timeout_seconds")
        keys = ("max_body_bytes", "shutdown_grace_seconds", *timeouts, "max_client_connections")
        m = self.mapping(value, "limits", keys)
        seconds = {key: self.number(m.get(key, getattr(d, key)), f"limits.{key}", allow_zero=False) for key in timeouts}
        return Limits(
            max_body_bytes=self.integer(m.get("max_body_bytes", d.max_body_bytes), "limits.max_body_bytes", 1),
            shutdown_grace_seconds=self.number(
                m.get("shutdown_grace_seconds", d.shutdown_grace_seconds),
                "limits.shutdown_grace_seconds",
                allow_zero=True,
            ),
            max_client_connections=self.integer(
                m.get("max_client_connections", d.max_client_connections), "limits.max_client_connections", 1
            ),
            **seconds,
        )

    def logging(self, value: object) -> LoggingSettings:
        m = self.mapping(value, "logging", ("level", "format"))
        return LoggingSettings(
            level=self.choice(m.get("level", "info"), "logging.level", LOG_LEVELS),
            format=self.choice(m.get("format", "json"), "logging.format", LOG_FORMATS),
        )


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


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


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
