"""Which credential goes upstream: the gateway's key, or the client's own.

Workers present a gateway client token (as `Authorization: Bearer` or
`x-api-key`) where they would present an environment key. The gateway swaps
it for the real key of the path's environment, sent the way the SDK worker
sends it (`Authorization: Bearer`, no `x-api-key`: one credential upstream),
or for `default_credential` on allowed paths outside an environment. Any
other credential (a per-item sessions token, a worker's own key) is passed
through untouched. Every refusal here happens before the upstream is called:
the gateway is never an open proxy for the organisation's keys.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote

from .errors import AuthenticationFailed, PermissionDenied
from .routing import Route
from .settings import ClientToken, Settings

__all__ = ["CredentialDecision", "Inject", "PassThrough", "decide_credential", "token_in_forwarded_request"]


@dataclass(frozen=True, slots=True)
class Inject:
    """Replace the client's credential headers with this one."""

    header: Literal["authorization", "x-api-key"]
    value: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class PassThrough:
    """Forward the client's credential headers unchanged."""


CredentialDecision = Inject | PassThrough


def decide_credential(
    settings: Settings, route: Route, *, authorization: str | None, api_key: str | None
) -> CredentialDecision:
    environment = None
    if route.environment_id is not None:
        environment = settings.environment(route.environment_id)
        if environment is None:
            # Checked before the credential: whatever the client holds, the
            # gateway serves only the environments it is configured for.
            raise PermissionDenied(f"environment {route.environment_id} is not served by this gateway")

    bearer = _bearer(authorization)
    presented = [c for c in (bearer, api_key) if c]
    # Another scheme (Basic, ...) is a credential too, just never a gateway token.
    foreign_scheme = bool(authorization and authorization.strip()) and bearer is None
    if not presented and not foreign_scheme:
        if not settings.clients.allow_unauthenticated:
            raise AuthenticationFailed(
                "missing credential: present a gateway client token as Authorization: Bearer or x-api-key"
            )
        token: ClientToken | None = None
    else:
        token = _match(settings.clients.tokens, presented)
        if token is None:
            return PassThrough()

    if environment is not None:
        if token is not None and not token.allows(environment.id):
            raise PermissionDenied(f"this client token may not use environment {environment.id}")
        return Inject("authorization", f"Bearer {environment.key.value}")
    default = settings.default_credential.api_key
    if default is None:
        raise PermissionDenied("the gateway holds no credential for this path; configure default_credential")
    return Inject("x-api-key", default.value)


def _bearer(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    parts = authorization.split(None, 1)
    if not parts or parts[0].lower() != "bearer":
        return None
    return parts[1].strip() if len(parts) == 2 else ""


def token_in_forwarded_request(
    headers: Iterable[tuple[str, str]], raw_target: str, tokens: tuple[ClientToken, ...]
) -> bool:
    """Whether a client token would still reach the upstream (a malformed credential
    header, a cookie, the query string). Such a request is refused: the token is
    the gateway's secret, never the API's."""
    haystacks = [value for _, value in headers]
    haystacks += [raw_target, unquote(raw_target)]
    return any(t.token.value in h for t in tokens for h in haystacks)


def _match(tokens: tuple[ClientToken, ...], presented: list[str]) -> ClientToken | None:
    """The configured token among the presented credentials, compared in constant time."""
    found = None
    for candidate in presented:
        encoded = candidate.encode()
        for token in tokens:
            if hmac.compare_digest(encoded, token.token.value.encode()) and found is None:
                found = token
    return found
