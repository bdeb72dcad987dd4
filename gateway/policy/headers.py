"""Header policy for both directions, as pure functions over (name, value) pairs.

Pairs rather than a dict, because HTTP allows a header to repeat and the
gateway must keep what it does not own exactly as sent.
"""

from __future__ import annotations

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


def _connection_listed(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """Header names a Connection header declares hop-by-hop (RFC 9110 §7.6.1)."""
    names: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            names.update(t.strip().lower() for t in value.split(",") if t.strip())
    return frozenset(names)


def request_headers(
    incoming: Iterable[tuple[str, str]], *, credential: CredentialDecision, settings: HeaderSettings
) -> Headers:
    """The headers to send upstream for a client request."""
    pairs = list(incoming)
    drop = HOP_BY_HOP | _REQUEST_ONLY_HOP | _connection_listed(pairs)
    if isinstance(credential, Inject):
        drop |= _CREDENTIAL_HEADERS
    out: Headers = []
    betas: list[str] = []
    has_version = False
    for name, value in pairs:
        lower = name.lower()
        if lower in drop:
            continue
        if lower == "anthropic-beta":
            betas.append(value)
            continue
        if lower == "anthropic-version":
            has_version = True
        out.append((name, value))
    merged = merge_betas(betas, settings.anthropic_beta)
    if merged:
        out.append(("anthropic-beta", merged))
    if not has_version:
        out.append(("anthropic-version", settings.anthropic_version))
    if isinstance(credential, Inject):
        out.append((credential.header, credential.value))
    return out


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
    drop = HOP_BY_HOP | _connection_listed(pairs)
    return [(name, value) for name, value in pairs if name.lower() not in drop]
