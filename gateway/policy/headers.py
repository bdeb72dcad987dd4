"""Header policy for both directions, as pure functions over (name, value) pairs.

Pairs rather than a dict, because HTTP allows a header to repeat and the
gateway must keep what it does not own exactly as sent.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from gateway.config.settings import HeaderSettings

from .credentials import CredentialDecision, Inject

__all__ = ["HOP_BY_HOP", "merge_betas", "request_headers", "response_headers"]

Headers = list[tuple[str, str]]

# RFC 9110 §7.6.1 connection-specific fields, plus the non-standard
# Proxy-Connection that some clients still send.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Not forwarded upstream: Host is set for the upstream by the client library,
# and the gateway answered any Expect: 100-continue itself.
_REQUEST_ONLY_HOP = frozenset({"host", "expect"})
_CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key"})


_REQUEST_DROP = HOP_BY_HOP | _REQUEST_ONLY_HOP
_REQUEST_DROP_INJECTED = _REQUEST_DROP | _CREDENTIAL_HEADERS


def _connection_listed(names: Iterable[str], headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """Header names a Connection header declares hop-by-hop (RFC 9110 §7.6.1); `names`: the headers' lowered."""
    listed: set[str] = set()
    for lower, (_, value) in zip(names, headers, strict=True):
        if lower == "connection":
            listed.update(t.strip().lower() for t in value.split(",") if t.strip())
    return frozenset(listed)


def request_headers(
    incoming: Iterable[tuple[str, str]],
    *,
    credential: CredentialDecision,
    settings: HeaderSettings,
    reframed: bool = False,
) -> Headers:
    """The headers to send upstream for a client request.

    `reframed`: the gateway sends the body as the bytes it read, framed by their length, so the
    client's Content-Length is not passed on.
    """
    pairs = list(incoming)
    names = [name.lower() for name, _ in pairs]
    drop = _REQUEST_DROP_INJECTED if isinstance(credential, Inject) else _REQUEST_DROP
    if "connection" in names:
        drop = drop | _connection_listed(names, pairs)
    if reframed:
        drop = drop | {"content-length"}
    out: Headers = []
    betas: list[str] = []
    has_version = False
    for lower, pair in zip(names, pairs, strict=True):
        if lower in drop:
            continue
        if lower == "anthropic-beta":
            betas.append(pair[1])
            continue
        if lower == "anthropic-version":
            has_version = True
        out.append(pair)
    merged = _merged_betas(tuple(betas), settings.anthropic_beta)
    if merged:
        out.append(("anthropic-beta", merged))
    if not has_version:
        out.append(("anthropic-version", settings.anthropic_version))
    if isinstance(credential, Inject):
        out.append((credential.header, credential.value))
    return out


# A fleet sends the same few beta headers on every request: merged once each (bounded: the values are the client's).
@functools.lru_cache(maxsize=256)
def _merged_betas(client_values: tuple[str, ...], configured: tuple[str, ...]) -> str:
    return merge_betas(client_values, configured)


def merge_betas(client_values: Iterable[str], configured: Iterable[str]) -> str:
    """The client's betas in their order, then the configured ones it lacks; no duplicates."""
    seen: dict[str, None] = {}
    for value in client_values:
        for beta in value.split(","):
            if beta.strip():
                seen.setdefault(beta.strip(), None)
    for beta in configured:
        seen.setdefault(beta, None)
    return ",".join(seen)


def response_headers(upstream: Iterable[tuple[str, str]]) -> Headers:
    """The upstream's response headers minus hop-by-hop ones; request-id, retry-after and rate-limit headers stay."""
    pairs = list(upstream)
    names = [name.lower() for name, _ in pairs]
    drop = HOP_BY_HOP | _connection_listed(names, pairs) if "connection" in names else HOP_BY_HOP
    return [pair for lower, pair in zip(names, pairs, strict=True) if lower not in drop]
