"""The observer nobody listens to: the default where no metrics are wired (tests, benchmarks, the demo).

The I/O modules report what they see through small observer protocols of
their own (`CapacityObserver`, `UpstreamObserver`, `HeartbeatObserver`, ...),
so none imports `prometheus_client`; the composition root (`gateway.app`)
wires the metrics to every one of them. Left unwired, each gets `NOBODY`,
which takes every call and does nothing: one null object, not one per
protocol.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NOBODY"]


def _ignore(*args: object, **kwargs: object) -> None:
    return None


class _Nobody:
    def __getattr__(self, name: str) -> Any:
        return _ignore

    def __repr__(self) -> str:
        return "NOBODY"


# Any: it stands in for every observer protocol. The protocols stay checked where they are used.
NOBODY: Any = _Nobody()
