"""The gateway's settings as a frozen, typed tree: the one place a setting is declared.

Each field is a config key: its name is the YAML key, its type the YAML
type, its default the default, and its `rule(...)` metadata the range or
format it must have. `gateway.config.load` walks these classes to read and
validate YAML, and to name the allowed keys in its messages; nothing else
lists them. Adding a setting is one field here and one row in the README's
configuration reference (a test checks the row is there).

Built only by `gateway.config.load_settings`; the rest of the gateway reads
these values and never re-checks them. Defaults are named constants with
the reason beside them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Literal

from gateway.policy.redaction import REDACTED, Redactor

__all__ = [
    "FALLBACK_ROUTES",
    "AbsorbSettings",
    "ClientSettings",
    "ClientToken",
    "DefaultCredential",
    "Environment",
    "Format",
    "HeaderSettings",
    "HeartbeatSettings",
    "LeaseTrackingSettings",
    "Limits",
    "ListenAddress",
    "LiveSettings",
    "LoggingSettings",
    "PollSettings",
    "PoolName",
    "PoolSettings",
    "Reader",
    "RouteSettings",
    "Secret",
    "ServerTls",
    "Settings",
    "TracingSettings",
    "TtlOverride",
    "UpstreamPools",
    "UpstreamProxy",
    "UpstreamSettings",
    "UpstreamTls",
    "rule",
]

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_CONNECT_TIMEOUT = 5.0
# A pass-through exchange includes SSE session streams, which stay open for
# minutes; the SDK's own default request timeout is 10 minutes.
DEFAULT_REQUEST_TIMEOUT = 600.0
DEFAULT_ANTHROPIC_VERSION = "2023-06-01"
# The beta every environments/work/sessions call of the SDK worker sends
# (environments-api.md §1); it replaced `environments-2026-03-01`.
DEFAULT_BETAS = ("managed-agents-2026-04-01",)
DEFAULT_ALLOW_PREFIXES = ("/v1/environments/", "/v1/sessions/", "/v1/memory_stores/", "/v1/skills/")
# The API's own request size limit for most endpoints is 32 MB.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
# Above the SDK workers' 30 s beat, so enabling absorption with a long lease (300 s) saves 1 beat in 2.
DEFAULT_MAX_SIGNAL_DELAY = 60.0
# Kubernetes' default terminationGracePeriodSeconds is 30 s; leave room for
# a pre-stop delay and the process exit inside it.
DEFAULT_SHUTDOWN_GRACE = 20.0
DEFAULT_MAX_CLIENT_CONNECTIONS = 10_000

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["json", "text"]
UpstreamClient = Literal["lean", "aiohttp"]


class Format(StrEnum):
    """A named format a string setting must have, checked when the config is read."""

    URL = "url"
    HEADER_TOKEN = "header_token"
    BETA_TOKEN = "beta_token"
    ENVIRONMENT_ID = "environment_id"
    CA_FILE = "ca_file"
    PATH_PREFIX = "path_prefix"


class Reader(StrEnum):
    """A setting that needs more than a field-by-field reading: which of the config reader's own readers reads it."""

    ENVIRONMENTS = "environments"
    FALLBACK_ROUTES = "fallback_routes"
    CLIENT_TOKENS = "client_tokens"
    TOKEN_SCOPE = "token_scope"


@dataclass(frozen=True, slots=True)
class Rule:
    """What a value must be, beyond its type; read by `gateway.config.load`."""

    # Integers: the smallest and largest allowed. Numbers: the largest.
    at_least: int | None = None
    at_most: float | None = None
    # Numbers: whether 0 is allowed (they are never negative).
    zero_ok: bool = False
    # A named format the config reader checks.
    format: Format | None = None
    # A value that needs more than a field-by-field reading.
    reader: Reader | None = None


def rule(**constraints: Any) -> Mapping[str, Rule]:
    """Field metadata: `field(default=..., metadata=rule(at_least=1))`."""
    return MappingProxyType({"rule": Rule(**constraints)})


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret value with the place it came from; never shown by repr or str."""

    value: str = field(repr=False)
    source: str

    def __str__(self) -> str:
        return "<redacted>"

    def __repr__(self) -> str:
        return f"Secret(<redacted> from {self.source})"


@dataclass(frozen=True, slots=True)
class ServerTls:
    """TLS on a listening port: a certificate and key (PEM), read again when they rotate on disk, and
    optionally the CA whose client certificates it requires."""

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int = field(metadata=rule(at_least=0, at_most=65535))
    tls: ServerTls = ServerTls()


class PoolName(StrEnum):
    """The classes of upstream capacity (`gateway.upstream.capacity`)."""

    LEASE = "lease"
    POLL = "poll"
    STREAM = "stream"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class PoolSettings:
    # Upstream exchanges of this class at once: each holds one connection. None: one for each
    # worker connection the replica accepts (`limit`), so the class can never run short
    # before the worker-facing port itself is full.
    max_connections: int | None = field(metadata=rule(at_least=1, at_most=100_000))
    # Requests that may wait for one of them, in arrival order; beyond that, 503 at once.
    max_queued: int = field(metadata=rule(at_least=0, at_most=1_000_000))
    # The longest one waits before it gets a 503.
    max_queue_seconds: float

    def limit(self, client_connections: int) -> int:
        """The exchanges allowed at once, for a replica that accepts `client_connections` worker connections.

        A worker connection carries one request at a time, so a class sized to them
        (None) has a connection for every request that can arrive: it grows with
        demand as far as the replica's descriptors go, and no further.
        """
        return client_connections if self.max_connections is None else self.max_connections


@dataclass(frozen=True, slots=True)
class UpstreamPools:
    """Sized for a replica serving 1,000 sessions and 2,000 idle workers (README, "Upstream capacity")."""

    # Heartbeats, acks and stops: one connection for each worker connection, as going direct. A few
    # hundred at once serve 10,000 workers while the API is quick; when it slows to 3 s a beat, ten
    # times that, and a fixed guess would queue beats until their workers gave up (issue 19).
    lease: PoolSettings = PoolSettings(None, 2048, 5.0)
    # A long poll holds its connection up to 999 ms, then the worker sleeps 1-3 s.
    poll: PoolSettings = PoolSettings(2048, 512, 1.0)
    # One event stream per served session, open for as long as the session runs.
    stream: PoolSettings = PoolSettings(1536, 256, 5.0)
    # Session reads, tool results, skills and memory downloads, uploads, everything else.
    other: PoolSettings = PoolSettings(512, 1024, 10.0)

    def of(self, pool: PoolName) -> PoolSettings:
        settings: PoolSettings = getattr(self, pool.value)
        return settings


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """How the upstream's certificate is checked: always verified, against the system's trust store
    (or `SSL_CERT_FILE`/`SSL_CERT_DIR`, as OpenSSL reads them) plus these PEM bundles."""

    ca_files: tuple[str, ...] = field(default=(), metadata=rule(format=Format.CA_FILE))
    # A client certificate (PEM, chain included) and its key, for an upstream or egress that asks for one
    # (mTLS); read again when they change on disk, as a mounted Secret's rotation changes them.
    client_cert_file: str | None = None
    client_key_file: str | None = None
    # The name the upstream's certificate must carry and the TLS SNI sent, when it is not the URL's host
    # (an API reached by address, or through a private endpoint).
    server_name: str | None = None


@dataclass(frozen=True, slots=True)
class UpstreamProxy:
    """An egress proxy on the way to the upstream.

    `gateway.policy.egress` decides which, and refuses what it cannot use.
    """

    # HTTPS_PROXY / HTTP_PROXY / NO_PROXY, as curl, Go and the SDKs read them.
    from_environment: bool = True
    # An http:// or https:// proxy, used whatever the environment says.
    url: str | None = None
    # "user:password" for the proxy (Basic), from credentials_env or credentials_file; never logged.
    credentials: Secret | None = None


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    base_url: str = field(default=DEFAULT_BASE_URL, metadata=rule(format=Format.URL))
    connect_timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT
    request_timeout_seconds: float = DEFAULT_REQUEST_TIMEOUT
    pools: UpstreamPools = UpstreamPools()
    tls: UpstreamTls = UpstreamTls()
    proxy: UpstreamProxy = UpstreamProxy()
    # An http:// base URL off loopback sends the environment keys in clear: refused unless set.
    allow_insecure_http: bool = False
    # Which client sends the calls with no body or a small one (heartbeats, polls, acks, stops, retrieves):
    # `gateway.upstream.lean`, or aiohttp's, which sends everything else either way.
    client: UpstreamClient = "lean"


@dataclass(frozen=True, slots=True)
class HeaderSettings:
    anthropic_version: str = field(default=DEFAULT_ANTHROPIC_VERSION, metadata=rule(format=Format.HEADER_TOKEN))
    # Listed once each, in the order given.
    anthropic_beta: tuple[str, ...] = field(default=DEFAULT_BETAS, metadata=rule(format=Format.BETA_TOKEN))


@dataclass(frozen=True, slots=True)
class TtlOverride:
    """A per-environment `desired_ttl_seconds`; None fields fall back to `heartbeat.*`."""

    desired_ttl_seconds: int | None = field(default=None, metadata=rule(at_least=1))
    override: bool | None = None


@dataclass(frozen=True, slots=True)
class Environment:
    id: str = field(metadata=rule(format=Format.ENVIRONMENT_ID))
    # The label in logs and metrics.
    name: str | None
    key: Secret
    heartbeat: TtlOverride = TtlOverride()

    @property
    def label(self) -> str:
        """How logs and metrics name this environment."""
        return self.name or self.id


# Where `default_credential` may stand in for an environment key.
FALLBACK_ROUTES = ("sessions", "skills", "memory_stores", "other")


@dataclass(frozen=True, slots=True)
class DefaultCredential:
    """An organisation-scoped API key: wider than any environment key, so used only where configured."""

    api_key: Secret | None = None
    # The routes (of FALLBACK_ROUTES) where a client token may go upstream with
    # this key when the gateway cannot tell which environment the request is for.
    use_for: frozenset[str] = field(default=frozenset(), metadata=rule(reader=Reader.FALLBACK_ROUTES))


@dataclass(frozen=True, slots=True)
class ClientToken:
    token: Secret
    # None means every configured environment ("*").
    environments: frozenset[str] | None = field(default=None, metadata=rule(reader=Reader.TOKEN_SCOPE))

    def allows(self, environment_id: str) -> bool:
        return self.environments is None or environment_id in self.environments


@dataclass(frozen=True, slots=True)
class ClientSettings:
    tokens: tuple[ClientToken, ...] = field(default=(), metadata=rule(reader=Reader.CLIENT_TOKENS))
    allow_unauthenticated: bool = False
    # For a token of several environments on a session the gateway has not seen:
    # ask the API (GET /v1/sessions/{id}) with each of the token's environment keys.
    discover_sessions: bool = True


@dataclass(frozen=True, slots=True)
class RouteSettings:
    allow_prefixes: tuple[str, ...] = field(default=DEFAULT_ALLOW_PREFIXES, metadata=rule(format=Format.PATH_PREFIX))


@dataclass(frozen=True, slots=True)
class PollSettings:
    """Poll admission (`gateway.edge.polls`): idle long polls held at the gateway."""

    # Long polls one environment may have upstream at once; beyond, a poll waits here for up to its
    # own block time and, if no slot frees, is answered `null` as the API answers an empty queue.
    # One open poll picks up a new item as fast as a thousand; None: every poll goes upstream.
    max_upstream_per_environment: int | None = field(default=256, metadata=rule(at_least=1))
    # A worker id not seen upstream for this long goes up at once, slot or not, so the API's
    # `workers_polling` (ids seen in the last 30 s) counts every worker. None: off.
    refresh_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class OverloadSettings:
    """Shedding safe work while the replica's event loop runs late (`gateway.edge.overload`)."""

    enabled: bool = True
    # The median event-loop lag over a second past which long polls are answered `null` at the gateway.
    shed_polls_lag_seconds: float = 0.05
    # Or past this share of the CPU the replica may use (a core, or its quota if less): a saturated
    # replica on a whole core runs its timers on time until it stalls.
    shed_polls_cpu: float = field(default=0.75, metadata=rule(at_most=1.0))
    # Past this, every new request but a lease call gets 503 overloaded_error.
    shed_requests_lag_seconds: float = 0.25
    # Shedding polls that has not brought the lag below the polls threshold in this long goes a level up.
    escalate_seconds: float = 5.0
    # A shed poll is held half to all of this long before its `null`: an idle worker waiting costs a
    # timer, where one answered after its block_ms polls again within 1-3 s.
    hold_polls_seconds: float = field(default=15.0, metadata=rule(zero_ok=True))
    # A level is left once the lag has stayed below half its threshold this long.
    recover_seconds: float = field(default=5.0, metadata=rule(zero_ok=True))


@dataclass(frozen=True, slots=True)
class AbsorbSettings:
    """Answering the holder's beats locally; off by default (it delays stop signals)."""

    enabled: bool = False
    # A stop reaches the holder at most this long after it happened (plus one beat).
    max_signal_delay_seconds: float = DEFAULT_MAX_SIGNAL_DELAY
    # Forward instead once less than this share of the TTL is surely left.
    min_remaining_fraction: float = field(default=0.5, metadata=rule(at_most=1))


@dataclass(frozen=True, slots=True)
class LeaseTrackingSettings:
    max_tracked: int = field(default=100_000, metadata=rule(at_least=1))
    # How long a stopped, lost or expired lease stays visible.
    retention_seconds: float = field(default=300.0, metadata=rule(zero_ok=True))
    # Slack before an unrenewed active lease counts as expired at the edge.
    expiry_grace_seconds: float = field(default=5.0, metadata=rule(zero_ok=True))


@dataclass(frozen=True, slots=True)
class HeartbeatSettings:
    desired_ttl_seconds: int | None = field(default=None, metadata=rule(at_least=1))
    # True: desired_ttl_seconds replaces the client's own value; False: it only fills in.
    override: bool = False
    # False: every heartbeat is forwarded one for one (an escape hatch).
    coalesce: bool = True
    # One upstream heartbeat's own deadline, whoever waits for it. The SDK
    # gives up on a beat after one interval (at most 30 s).
    upstream_timeout_seconds: float = 30.0
    absorb: AbsorbSettings = AbsorbSettings()
    leases: LeaseTrackingSettings = LeaseTrackingSettings()


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = field(default=DEFAULT_MAX_BODY_BYTES, metadata=rule(at_least=1))
    shutdown_grace_seconds: float = field(default=DEFAULT_SHUTDOWN_GRACE, metadata=rule(zero_ok=True))
    # From the first byte of a request to the end of its headers (slow-header clients).
    header_timeout_seconds: float = 10.0
    # A keep-alive connection with no request in progress. The SDKs' HTTP
    # clients let idle connections go after 5 s; nginx keeps them 75 s.
    idle_timeout_seconds: float = 60.0
    # The longest gap between two pieces of a request body (a stalled upload).
    body_timeout_seconds: float = 30.0
    # Open connections on the worker-facing port; beyond it a new one gets a 503 and is closed.
    # Each may need an upstream connection too: keep twice this plus the pools under the fd limit.
    max_client_connections: int = field(default=DEFAULT_MAX_CLIENT_CONNECTIONS, metadata=rule(at_least=1))


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    level: LogLevel = "info"
    format: LogFormat = "json"
    # The share of successful heartbeats and polls with an access-log line (the bulk of a fleet's
    # requests); errors, and every other request, always get one.
    sample_routine: float = field(default=1.0, metadata=rule(zero_ok=True, at_most=1))


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """OpenTelemetry traces (`gateway.observability.tracing`, the `otel` extra). Where spans go, how many
    are sampled and the resource are the standard `OTEL_*` environment variables, read at start."""

    enabled: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    # In the order the config documents them (and problems are listed).
    listen: ListenAddress = ListenAddress("0.0.0.0", 8080)
    admin: ListenAddress = ListenAddress("0.0.0.0", 9090)
    upstream: UpstreamSettings = UpstreamSettings()
    headers: HeaderSettings = HeaderSettings()
    # Required: the only environments served.
    environments: tuple[Environment, ...] = field(metadata=rule(reader=Reader.ENVIRONMENTS))
    default_credential: DefaultCredential = DefaultCredential()
    clients: ClientSettings = ClientSettings()
    routes: RouteSettings = RouteSettings()
    polls: PollSettings = PollSettings()
    overload: OverloadSettings = OverloadSettings()
    heartbeat: HeartbeatSettings = HeartbeatSettings()
    limits: Limits = Limits()
    logging: LoggingSettings = LoggingSettings()
    tracing: TracingSettings = TracingSettings()

    def desired_ttl(self, environment_id: str) -> tuple[int | None, bool]:
        """The TTL to ask for on this environment's heartbeats, and whether it replaces the client's."""
        env = self.environment(environment_id)
        own = env.heartbeat if env is not None else TtlOverride()
        ttl = own.desired_ttl_seconds if own.desired_ttl_seconds is not None else self.heartbeat.desired_ttl_seconds
        override = own.override if own.override is not None else self.heartbeat.override
        return ttl, override

    def environment(self, environment_id: str) -> Environment | None:
        for env in self.environments:
            if env.id == environment_id:
                return env
        return None

    def secret_values(self) -> tuple[str, ...]:
        """Every secret the gateway holds, for scrubbing log output."""
        values = [env.key.value for env in self.environments]
        values += [t.token.value for t in self.clients.tokens]
        if self.default_credential.api_key is not None:
            values.append(self.default_credential.api_key.value)
        if self.upstream.proxy.credentials is not None:
            values += [self.upstream.proxy.credentials.value]
            values += [self.upstream.proxy.credentials.value.partition(":")[2]]
        return tuple(v for v in values if v)

    def redacted(self) -> dict[str, Any]:
        """The effective settings as JSON-ready data, every secret shown as "<redacted>"."""
        result = _redacted(self)
        assert isinstance(result, dict)
        return result

    def summary(self) -> str:
        """One line for `check-config` and the start-up log; no secrets."""
        return (
            f"ok: {len(self.environments)} environment(s), {len(self.clients.tokens)} client token(s), "
            f"upstream {self.upstream.base_url}, proxy {self.listen.host}:{self.listen.port}, "
            f"admin {self.admin.host}:{self.admin.port}"
        )


class LiveSettings:
    """The settings in force, swapped whole by a reload; readers take `current` per request.

    `redactor` knows every secret the gateway held since it started (a rotated-out
    key is still redacted), for what goes back to workers.
    """

    __slots__ = ("_current", "redactor")

    def __init__(self, current: Settings) -> None:
        self.redactor = Redactor(())
        self.current = current

    @property
    def current(self) -> Settings:
        return self._current

    @current.setter
    def current(self, settings: Settings) -> None:
        self._current = settings
        self.redactor = self.redactor.with_(settings.secret_values())


# Sections a running gateway cannot change: its sockets, its upstream client
# pool, its log format, whether heartbeats are coalesced at all, and its tracer.
RESTART_ONLY = ("listen", "admin", "upstream", "heartbeat.coalesce", "logging.format", "tracing")


def restart_needed(old: Settings, new: Settings) -> list[str]:
    """The changed settings that only a restart applies, as `key.path: problem` lines."""
    changed = []
    for path in RESTART_ONLY:
        section, _, key = path.partition(".")
        before, after = _restart_view(getattr(old, section)), _restart_view(getattr(new, section))
        if key:
            before, after = getattr(before, key), getattr(after, key)
        if before != after:
            changed.append(f"{path}: changed; restart the gateway to apply it")
    return changed


def _restart_view(section: object) -> object:
    """A section as a restart sees it. The egress proxy's credentials rotate in place (the client reads
    them for each new proxy connection): where they come from needs a restart, their value does not,
    or one rotated proxy password would refuse every reload after it, key rotations included."""
    if isinstance(section, UpstreamSettings) and section.proxy.credentials is not None:
        source_only = Secret("", section.proxy.credentials.source)
        return replace(section, proxy=replace(section.proxy, credentials=source_only))
    return section


def _redacted(value: object) -> object:
    if isinstance(value, Secret):
        return REDACTED
    if is_dataclass(value) and not isinstance(value, type):
        out: dict[str, object] = {}
        for f in fields(value):
            item = getattr(value, f.name)
            out[f.name] = _redacted(item)
            if isinstance(item, Secret):
                # Where it comes from is no secret, and is what an operator checks.
                out[f"{f.name}_source"] = item.source
        return out
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, tuple | list):
        return [_redacted(v) for v in value]
    return value
