"""heartbeat-gateway: a lease-safe reverse proxy for the Anthropic environments API.

Workers point `ANTHROPIC_BASE_URL` at the gateway and hold only a gateway
token; the gateway holds the real environment keys, adds the API's headers,
and forwards the work-item lease protocol without weakening it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("heartbeat-gateway")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
