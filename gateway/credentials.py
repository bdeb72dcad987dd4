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
from dataclasses import dataclass, field
from typing import Literal

from .errors import AuthenticationFailed, PermissionDenied
from .routing import Route
from .settings import ClientToken, Settings

__all__ = ["CredentialDecision", "Inject", "PassThrough", "decide_credential"]


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
    scheme, _, value = authorization.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def _match(tokens: tuple[ClientToken, ...], presented: list[str]) -> ClientToken | None:
    """The configured token among the presented credentials, compared in constant time."""
    found = None
    for candidate in presented:
        encoded = candidate.encode()
        for token in tokens:
            if hmac.compare_digest(encoded, token.token.value.encode()) and found is None:
                found = token
    return found
