"""Which way the gateway reaches the upstream: straight, or through an egress proxy (pure: no I/O).

As curl, Go's net/http and the SDKs do, the standard variables are honoured
unless `upstream.proxy.from_environment` is off: `HTTPS_PROXY` for an
`https://` upstream, `HTTP_PROXY` for an `http://` one (upper case first,
then lower, as Go reads them), and `NO_PROXY`, whose entries may be `*`, a
host (matching it and its subdomains), a `.suffix` (subdomains only), an IP
address or a CIDR range (`10.0.0.0/8`), each optionally with a `:port`.
Loopback hosts are never proxied (as Go). `upstream.proxy.url` names one
explicitly and wins over the environment.

Never fail open: a proxy the gateway cannot use (a `socks5://` one, a URL it
cannot parse) is an error here, so the config is refused, where aiohttp
would drop it with a warning and connect straight to the upstream
(aio-libs/aiohttp#3075), sending keys past a proxy that was meant to see
every connection.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

__all__ = ["EgressError", "ProxyRoute", "default_port", "has_credentials", "is_loopback_url", "proxy_route"]

PROXY_SCHEMES = ("http", "https")


class EgressError(ValueError):
    """A proxy setting that cannot be honoured; the message names where it came from."""


@dataclass(frozen=True, slots=True)
class ProxyRoute:
    """The proxy to go through (None: straight to the upstream), and why, for the start-up line."""

    proxy: str | None
    source: str

    @property
    def credentials(self) -> tuple[str, str] | None:
        """The user and password the proxy URL carries, if any (as `HTTPS_PROXY=http://u:p@host` often does)."""
        if self.proxy is None:
            return None
        parts = urlsplit(self.proxy)
        if parts.username is None:
            return None
        # Percent-encoded in the URL, as curl reads them (`p%40ss` is `p@ss`).
        return unquote(parts.username), unquote(parts.password or "")

    @property
    def address(self) -> str | None:
        """The proxy without its credentials: what is connected to, and what may be logged."""
        if self.proxy is None:
            return None
        parts = urlsplit(self.proxy)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"

    @property
    def shown(self) -> str:
        """For logs: never the proxy's credentials."""
        if self.proxy is None:
            return f"direct ({self.source})"
        return f"{self.address} (from {self.source})"


def proxy_route(upstream: str, explicit: str | None, from_environment: bool, environ: Mapping[str, str]) -> ProxyRoute:
    """The way to `upstream`: the explicit proxy, else the environment's unless it is off or `NO_PROXY` matches."""
    target = urlsplit(upstream)
    if explicit:
        return ProxyRoute(_proxy_url(explicit, "upstream.proxy.url"), "upstream.proxy.url")
    if not from_environment:
        return ProxyRoute(None, "upstream.proxy.from_environment is off")
    names = ("HTTPS_PROXY", "https_proxy") if target.scheme == "https" else ("HTTP_PROXY", "http_proxy")
    found = next(((name, environ[name]) for name in names if environ.get(name)), None)
    if found is None:
        return ProxyRoute(None, f"no {names[0]}")
    name, value = found
    proxy = _proxy_url(value, name)  # checked even when NO_PROXY excludes the host: a bad one is a mistake
    no_proxy_name, no_proxy = next(
        ((n, environ[n]) for n in ("NO_PROXY", "no_proxy") if environ.get(n)), ("NO_PROXY", "")
    )
    host, port = target.hostname or "", _port(target)
    if _is_loopback(host):
        return ProxyRoute(None, f"{host} is a loopback host")
    matched = _no_proxy_match(no_proxy, host, port)
    if matched is not None:
        return ProxyRoute(None, f"{no_proxy_name} entry {matched!r}")
    return ProxyRoute(proxy, name)


def _proxy_url(value: str, where: str) -> str:
    text = value.strip()
    if "://" not in text:
        text = "http://" + text  # as Go and curl read "proxy:3128"
    try:
        url = urlsplit(text)
        _port(url)
    except ValueError:
        raise EgressError(f"{where}: not a URL") from None
    if url.scheme not in PROXY_SCHEMES:
        raise EgressError(
            f"{where}: {url.scheme}:// proxies are not supported (http:// or https:// only); "
            "the gateway will not connect around it"
        )
    if not url.hostname:
        raise EgressError(f"{where}: the proxy URL has no host")
    if url.path not in ("", "/") or url.query or url.fragment:
        raise EgressError(f"{where}: a proxy URL is a scheme, host and port only")
    return f"{url.scheme}://{url.netloc}"


def default_port(scheme: str) -> int:
    """The port an http(s) URL without one means."""
    return 443 if scheme == "https" else 80


def _port(url: SplitResult) -> int:
    """The URL's port, or its scheme's (ValueError for one out of range)."""
    return url.port or default_port(url.scheme)


def _is_loopback(host: str) -> bool:
    # `localhost` itself only, as Go: `api.localhost` may go through a cluster's DNS search path to any pod.
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _no_proxy_match(no_proxy: str, host: str, port: int | None) -> str | None:
    """The `NO_PROXY` entry that sends `host:port` straight to the upstream, if any."""
    host = host.lower().rstrip(".")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return raw.strip()
        entry_host, entry_port = _split_port(entry)
        if entry_port is not None and entry_port != port:
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry_host, strict=False):
                    return raw.strip()
            except ValueError:
                pass
            continue
        if entry_host.startswith("*."):
            entry_host = entry_host[1:]
        if entry_host.startswith("."):
            if host.endswith(entry_host):
                return raw.strip()
        elif host == entry_host or host.endswith("." + entry_host):
            return raw.strip()
    return None


def _split_port(entry: str) -> tuple[str, int | None]:
    """`host:port`, `[v6]:port`, or a bare host, address or CIDR range (an IPv6 one holds colons of its own)."""
    if entry.startswith("["):
        inside, _, rest = entry[1:].partition("]")
        return inside, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        if port.isdigit():
            return host, int(port)
    return entry, None


def has_credentials(proxy_url: str) -> bool:
    """Whether a proxy URL, read as the gateway reads it (a missing scheme is http://), carries a user."""
    try:
        return urlsplit(_proxy_url(proxy_url, "")).username is not None
    except EgressError:
        return "@" in proxy_url  # unusable anyway (reported as such); say so if it looks like credentials


def is_loopback_url(url: str) -> bool:
    return _is_loopback((urlsplit(url).hostname or "").lower())
