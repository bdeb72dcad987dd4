"""The settings as the request path asks them: worked out once per settings generation, not per request.

Every request asks the same questions of the same settings: which environment an
id names, under which label it is counted, which key stands for it, which TTL
its heartbeats ask for, which client token a credential is and which
environments that token may use. The answers depend on the settings alone, so
a `Policy` works them out once, when a generation of settings comes into force
(at start, and on the first request after each reload), and the request path
looks them up. Per request only what truly varies is done: the target parsed,
the worker's headers read, the credential matched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gateway.config.settings import ClientToken, Environment, LiveSettings, Settings

from .credential_text import token_digest
from .credentials import Inject, environment_key

__all__ = ["CurrentPolicy", "Policy", "Served"]


@dataclass(frozen=True, slots=True)
class Served:
    """A configured environment, with what the request path needs of it."""

    environment: Environment
    # Its label in logs and metrics.
    label: str
    # Its key, as the SDK worker sends it.
    key: Inject
    # The TTL its heartbeats ask for, and whether it replaces the worker's own.
    desired_ttl: int | None
    override_ttl: bool


class Policy:
    """One generation of settings, with the answers the request path needs worked out."""

    __slots__ = ("_scopes", "_served", "_tokens", "served_ids", "settings", "token_values")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._served: dict[str, Served] = {}
        for env in settings.environments:
            ttl, override = settings.desired_ttl(env.id)
            self._served.setdefault(env.id, Served(env, env.label, environment_key(env), ttl, override))
        self.served_ids = frozenset(self._served)
        # By digest: a credential is matched by hashing what was presented and looking the digest up, so
        # how long a comparison takes says nothing about a configured token (as comparing in constant time).
        self._tokens: dict[str, ClientToken] = {}
        for token in settings.clients.tokens:
            self._tokens.setdefault(token_digest(token.token.value), token)
        # The environments each token may use, in the configured order (None: no token, every one).
        self._scopes: dict[ClientToken | None, tuple[Environment, ...]] = {
            token: tuple(e for e in settings.environments if token is None or token.allows(e.id))
            for token in (None, *settings.clients.tokens)
        }
        self.token_values = tuple(dict.fromkeys(t.token.value for t in settings.clients.tokens))

    def served(self, environment_id: str) -> Served | None:
        return self._served.get(environment_id)

    def environment(self, environment_id: str) -> Environment | None:
        served = self._served.get(environment_id)
        return served.environment if served is not None else None

    def client_token(self, presented: Iterable[str]) -> ClientToken | None:
        """The configured token among the presented credentials (the first presented that is one)."""
        for candidate in presented:
            token = self._tokens.get(token_digest(candidate))
            if token is not None:
                return token
        return None

    def scope(self, token: ClientToken | None) -> tuple[Environment, ...]:
        """The environments `token` may use (every configured one without a token)."""
        return self._scopes[token]

    def any_token_in(self, text: str) -> bool:
        """Whether a client token appears anywhere in `text`."""
        return any(token in text for token in self.token_values)


class CurrentPolicy:
    """The `Policy` of the settings in force: built again the first time it is asked for after a reload."""

    __slots__ = ("_live", "_policy")

    def __init__(self, live: LiveSettings) -> None:
        self._live = live
        self._policy = Policy(live.current)

    @property
    def current(self) -> Policy:
        settings = self._live.current
        if self._policy.settings is not settings:
            self._policy = Policy(settings)
        return self._policy
