"""Which credential goes upstream: an environment's key, the client's own, or (where configured) the organisation's.

Workers present a gateway client token (as `Authorization: Bearer` or
`x-api-key`) where they would present an environment key. The gateway swaps
it for the key the worker would have sent directly, sent the way the SDK
worker sends it (`Authorization: Bearer`, no `x-api-key`: one credential
upstream), and never for anything wider:

- on `/v1/environments/{id}/...`: that environment's key;
- on a session, skill or memory store: the key of the environment it belongs
  to, as the gateway learned from the API's answers (`gateway.policy.links`), or the
  only environment the token may use; for a session of a token with several
  environments, the gateway asks the API which one (`Discover`);
- only where none of that tells, and only on routes the operator listed in
  `default_credential.use_for`, the organisation-scoped `default_credential`;
- otherwise 403, saying what to configure.

Any other credential (a per-item sessions token, a worker's own key) is
passed through untouched. Every refusal here happens before the upstream is
called: the gateway is never an open proxy for the keys it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote

from gateway.config.settings import ClientToken, Environment
from gateway.errors import AuthenticationFailed, PermissionDenied

from .credential_text import b64decode_unpadded, bearer_value, token_digest
from .links import LINKED_ROUTES
from .routing import Route, RouteName

if TYPE_CHECKING:
    from .plan import Policy, Served

__all__ = [
    "CredentialDecision",
    "Discover",
    "Inject",
    "LinkLookup",
    "PassThrough",
    "RetiredTokens",
    "decide_credential",
    "environment_key",
    "token_in_forwarded_request",
]

# What the gateway has learned: the environments a session, skill or store was seen in.
LinkLookup = Callable[[RouteName, str], tuple[str, ...]]

_NOUNS = MappingProxyType(
    {RouteName.SESSIONS: "session", RouteName.SKILLS: "skill", RouteName.MEMORY_STORES: "memory store"}
)


@dataclass(frozen=True, slots=True)
class Inject:
    """Replace the client's credential headers with this one."""

    header: Literal["authorization", "x-api-key"]
    value: str = field(repr=False)
    # Which of the gateway's keys this is, for the metrics: an environment's, or the organisation's.
    kind: Literal["environment_key", "default_credential"] = "environment_key"


@dataclass(frozen=True, slots=True)
class PassThrough:
    """Forward the client's credential headers unchanged."""


@dataclass(frozen=True, slots=True)
class Discover:
    """Ask the API which of `candidates` the session belongs to; without an answer, use `fallback`."""

    session_id: str
    candidates: tuple[Environment, ...]
    fallback: Inject | PermissionDenied


CredentialDecision = Inject | PassThrough | Discover


def environment_key(environment: Environment) -> Inject:
    """An environment's key, as the SDK worker sends it."""
    return Inject("authorization", f"Bearer {environment.key.value}")


class RetiredTokens:
    """Client tokens a reload removed, remembered by SHA-256 digest for a day.

    A worker still holding one is refused with 401, rather than having it
    passed through to the API as if it were the worker's own credential.
    """

    def __init__(self, *, keep_seconds: float = 86_400.0, max_tokens: int = 10_000) -> None:
        self.keep_seconds = keep_seconds
        self.max_tokens = max_tokens
        self._until: dict[str, float] = {}

    def retire(self, tokens: Iterable[str], now: float) -> None:
        for token in tokens:
            self._until[token_digest(token)] = now + self.keep_seconds
        while len(self._until) > self.max_tokens:
            del self._until[min(self._until, key=self._until.__getitem__)]

    def restore(self, tokens: Iterable[str]) -> None:
        """Tokens configured again are tokens again."""
        for token in tokens:
            self._until.pop(token_digest(token), None)

    def is_retired(self, presented: str, now: float) -> bool:
        until = self._until.get(token_digest(presented))
        return until is not None and now < until


def decide_credential(
    policy: Policy,
    route: Route,
    *,
    authorization: str | None,
    api_key: str | None,
    links: LinkLookup = lambda kind, resource_id: (),
    retired: Callable[[str], bool] = lambda token: False,
) -> CredentialDecision:
    # Checked before the credential: whatever the client holds, the
    # gateway serves only the environments it is configured for.
    served = _served_environment(policy, route)
    token = _client_token(policy, authorization, api_key, retired)
    if isinstance(token, PassThrough):
        return token
    if served is not None:
        if token is not None and not token.allows(served.environment.id):
            raise PermissionDenied(f"this client token may not use environment {served.environment.id}")
        return served.key
    return _outside_environments(policy, route, token, links)


def _served_environment(policy: Policy, route: Route) -> Served | None:
    """The environment the path names (None if it names none); refused if this gateway does not serve it."""
    if route.environment_id is None:
        return None
    served = policy.served(route.environment_id)
    if served is None:
        raise PermissionDenied(f"environment {route.environment_id} is not served by this gateway")
    return served


def _client_token(
    policy: Policy, authorization: str | None, api_key: str | None, retired: Callable[[str], bool]
) -> ClientToken | PassThrough | None:
    """The gateway client token presented; None where none is needed; PassThrough for any other credential."""
    bearer = bearer_value(authorization)
    presented = [c for c in (bearer, api_key) if c]
    # Another scheme (Basic, ...) is a credential too, just never a gateway token.
    foreign_scheme = bool(authorization and authorization.strip()) and bearer is None
    if not presented and not foreign_scheme:
        if not policy.settings.clients.allow_unauthenticated:
            raise AuthenticationFailed(
                "missing credential: present a gateway client token as Authorization: Bearer or x-api-key"
            )
        return None
    token = policy.client_token(presented)
    if token is not None:
        return token
    basic = _basic_credentials(authorization or "").split(":", 1)
    if any(retired(value) for value in (*presented, *basic) if value):
        raise AuthenticationFailed("this client token is no longer accepted by the gateway")
    return PassThrough()


def _outside_environments(
    policy: Policy, route: Route, token: ClientToken | None, links: LinkLookup
) -> CredentialDecision:
    """A client token on a path that names no environment (sessions, skills, memory stores, other)."""
    settings = policy.settings
    scope = policy.scope(token)
    resource_id = route.resource_id if route.name in LINKED_ROUTES else None
    linked = _linked_environment(policy, route, resource_id, scope, links) if resource_id is not None else None
    if linked is not None:
        return _key_of(policy, linked)
    if len(scope) == 1:
        # The token can only ever stand for this environment's key.
        return _key_of(policy, scope[0])
    fallback = _fallback(policy, route, scope)
    if route.name is RouteName.SESSIONS and resource_id is not None and scope and settings.clients.discover_sessions:
        return Discover(resource_id, scope, fallback)
    if isinstance(fallback, PermissionDenied):
        raise fallback
    return fallback


def _key_of(policy: Policy, environment: Environment) -> Inject:
    served = policy.served(environment.id)
    assert served is not None  # a token's scope and the links are read through the policy: served ones only
    return served.key


def _linked_environment(
    policy: Policy, route: Route, resource_id: str, scope: tuple[Environment, ...], links: LinkLookup
) -> Environment | None:
    """The environment the API's answers tied the resource to, if the token may use it."""
    seen_in = [e for e in map(policy.environment, links(route.name, resource_id)) if e is not None]
    allowed = [e for e in seen_in if e in scope]
    if allowed:
        return allowed[0]
    if seen_in and route.name is RouteName.SESSIONS:
        # A session is in exactly one environment. Skills and memory stores are the
        # organisation's and may serve several, so for them the rules below still apply.
        raise PermissionDenied(f"session {resource_id} belongs to an environment this client token may not use")
    return None


def _fallback(policy: Policy, route: Route, scope: tuple[Environment, ...]) -> Inject | PermissionDenied:
    default = policy.settings.default_credential
    if default.api_key is not None and route.name.value in _fallback_names(default.use_for):
        return Inject("x-api-key", default.api_key.value, kind="default_credential")
    what = f"{_NOUNS[route.name]} {route.resource_id}" if route.name in _NOUNS and route.resource_id else "this path"
    if not scope:
        return PermissionDenied("this client token may use no environment this gateway serves")
    return PermissionDenied(
        f"the gateway cannot tell which environment {what} belongs to: this client token may use "
        f"{len(scope)} environments. Give the worker a token for its one environment, or list "
        f"{_fallback_route(route)} in default_credential.use_for to send the organisation-scoped key instead"
    )


def _fallback_route(route: Route) -> str:
    return route.name.value if route.name in LINKED_ROUTES else "other"


def _fallback_names(use_for: frozenset[str]) -> frozenset[str]:
    """Route names `use_for` covers: "other" stands for every route outside the linked ones."""
    if "other" not in use_for:
        return use_for
    return use_for | {name.value for name in RouteName if name not in LINKED_ROUTES}


def token_in_forwarded_request(headers: Iterable[tuple[str, str]], raw_target: str, policy: Policy) -> bool:
    """Whether a client token would still reach the upstream (a malformed credential
    header, a cookie, the query string). Such a request is refused: the token is
    the gateway's secret, never the API's."""
    haystacks = [value for _, value in headers]
    haystacks.append(raw_target)
    if "%" in raw_target:
        haystacks.append(unquote(raw_target))
    # A token wrapped in another scheme (Basic base64(user:token)) is still the token.
    haystacks += [_basic_credentials(value) for name, value in headers if name.lower() == "authorization"]
    # One search per token: no token holds a line break (`gateway.config`), so none can span two haystacks.
    return policy.any_token_in("\n".join(haystacks))


def _basic_credentials(authorization: str) -> str:
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return ""
    try:
        return b64decode_unpadded(encoded.strip()).decode("utf-8", "replace")
    except ValueError:
        return ""
