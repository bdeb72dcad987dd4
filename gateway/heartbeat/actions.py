"""What the coalescer is told about a flight, and what it asks the driver to do. Pure: no I/O.

The core's whole interface with the world: results in (`Succeeded`,
`Rejected`, `Unsuccessful`, `Failed`), actions out (`Send`, `Deliver`,
`DeliverLocal`, `DeliverError`, `LeaseEvent`, `Wakeup`). `R` and `E` are the
driver's own response and error types: the core passes them through unread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .lease import LeaseKey
from .wire import HeartbeatAnswer, LeaseEventKind, LostReason, Outcome

__all__ = [
    "Action",
    "Deliver",
    "DeliverError",
    "DeliverLocal",
    "Failed",
    "FlightResult",
    "LeaseEvent",
    "Rejected",
    "Send",
    "Succeeded",
    "Unsuccessful",
    "Wakeup",
]

R = TypeVar("R")  # the driver's upstream response
E = TypeVar("E")  # the driver's upstream error


# -- what the driver reports back about a flight ------------------------------


@dataclass(frozen=True, slots=True)
class Succeeded(Generic[R]):
    answer: HeartbeatAnswer
    response: R


@dataclass(frozen=True, slots=True)
class Rejected(Generic[R]):
    """A 412, with the lease state its body reports (None when it has none)."""

    response: R
    current_state: str | None
    current_last_heartbeat: str | None


@dataclass(frozen=True, slots=True)
class Unsuccessful(Generic[R]):
    """Any other upstream answer: passed on as it is."""

    response: R
    # A 5xx may come from a server that applied the beat before failing; a
    # 4xx (or a 429/503 asking to retry) means it was refused.
    may_have_applied: bool = False


@dataclass(frozen=True, slots=True)
class Failed(Generic[E]):
    """No answer (connection, timeout): the error is passed on."""

    error: E
    # False only when the request surely never reached the upstream.
    may_have_applied: bool = True


FlightResult = Succeeded[R] | Rejected[R] | Unsuccessful[R] | Failed[E]


# -- actions for the driver -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Start flight `flight` for `key` by sending the request of `waiter`."""

    flight: int
    key: LeaseKey
    waiter: int
    # The main lane (lease-critical capacity), or a side lane (a credential nobody vouches for).
    main: bool = True


@dataclass(frozen=True, slots=True)
class Deliver(Generic[R]):
    waiter: int
    outcome: Outcome
    response: R


@dataclass(frozen=True, slots=True)
class DeliverError(Generic[E]):
    waiter: int
    error: E


@dataclass(frozen=True, slots=True)
class DeliverLocal(Generic[R]):
    """An answer built here: a 200 (absorbed, handed off), a 412 (rejected) or a 429 (throttled)."""

    waiter: int
    outcome: Outcome
    status: int
    body: dict[str, Any]
    # Handed off: the upstream response it was built from (the answer to the worker's own earlier beat).
    kept: R | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class LeaseEvent:
    key: LeaseKey
    kind: LeaseEventKind
    # For LOST: not_extended, requeued or conflict.
    reason: LostReason | None = None


@dataclass(frozen=True, slots=True)
class Wakeup:
    """Call `tick` at `at` (or later): a lease may lapse or be due to leave the table then.

    Emitted whenever the core's next deadline moves earlier than the last one
    it asked for; a driver keeps one timer, moved to the earliest `at`.
    """

    at: float


Action = Send | Deliver[R] | DeliverError[E] | DeliverLocal[R] | LeaseEvent | Wakeup
