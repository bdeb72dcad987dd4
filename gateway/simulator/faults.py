"""Fault injection for the simulator, set by flags at start and changed at run time.

Each request to an affected endpoint draws at most one fault, in this order
of precedence: connection reset, 500 error, 429 rate limit. Latency is
added on top. Faults are decided by a seeded RNG so a test can replay them.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

__all__ = ["ENDPOINTS", "FaultDecision", "Faults", "FaultsError"]

# The endpoint names used by faults and by /_sim/stats.
ENDPOINTS = (
    "poll",
    "ack",
    "heartbeat",
    "stop",
    "update",
    "retrieve",
    "list",
    "stats",
    "environment",
    "session",
    "events",
    "stream",
    "send_events",
    "skill_version",
    "skill_content",
    "memories",
)

FaultDecision = Literal["none", "reset", "error", "rate_limit"]


class FaultsError(ValueError):
    """A fault setting is invalid; the message names it."""


@dataclass(frozen=True, slots=True)
class Faults:
    # Seconds added to every affected answer, after the request took effect:
    # a slow answer, the case where a client gives up on a request that landed.
    latency_seconds: float = 0.0
    # Fraction of affected requests answered 500 api_error, not applied.
    error_rate: float = 0.0
    # Fraction answered 429 rate_limit_error with `retry-after`, not applied.
    rate_limit_rate: float = 0.0
    retry_after_seconds: int = 1
    # Fraction whose connection is closed without an answer.
    reset_rate: float = 0.0
    # True: the reset happens after the request took effect (a lost response);
    # False: before (the request never landed).
    reset_after_apply: bool = False
    # Endpoints affected; empty means all.
    endpoints: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("error_rate", "rate_limit_rate", "reset_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise FaultsError(f"{name} must be between 0 and 1, not {value}")
        if self.latency_seconds < 0:
            raise FaultsError("latency_seconds must not be negative")
        if self.retry_after_seconds < 0:
            raise FaultsError("retry_after_seconds must not be negative")
        unknown = [e for e in self.endpoints if e not in ENDPOINTS]
        if unknown:
            raise FaultsError(f"unknown endpoints {', '.join(unknown)}; known: {', '.join(ENDPOINTS)}")

    @classmethod
    def from_json(cls, data: object) -> Faults:
        if not isinstance(data, dict):
            raise FaultsError("the fault settings must be a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = [k for k in data if k not in known]
        if unknown:
            raise FaultsError(f"unknown fault settings {', '.join(map(str, unknown))}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            kwargs[key] = _coerce(key, value, cls.__dataclass_fields__[key].default)
        return cls(**kwargs)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def applies_to(self, endpoint: str) -> bool:
        return not self.endpoints or endpoint in self.endpoints

    def decide(self, endpoint: str, rng: random.Random) -> FaultDecision:
        if not self.applies_to(endpoint):
            return "none"
        # One draw split into bands, so the rates are exact fractions of all requests.
        draw = rng.random()
        if draw < self.reset_rate:
            return "reset"
        draw -= self.reset_rate
        if draw < self.error_rate:
            return "error"
        draw -= self.error_rate
        return "rate_limit" if draw < self.rate_limit_rate else "none"


def _coerce(key: str, value: object, default: object) -> object:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise FaultsError(f"{key} must be true or false")
        return value
    if isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(default, float) and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, tuple) and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise FaultsError(f"{key} has the wrong type")
