"""The SDK workers' heartbeat rules, as the core and the config assume them.

All three SDK workers (environments-api.md §6.2) pace themselves by the last
answer's `ttl_seconds`, whoever produced it: the next beat comes one
interval later, `clamp(ttl/2, 1 s, 30 s)`, that beat is aborted after one
interval, and the lease is assumed lost once no beat has succeeded for the
answer's `ttl_seconds`. An absorbed answer promises only the whole seconds
surely left, so it can shorten all three. `keeps_pace` is the rule that
lets absorption happen only where it does not:

- the promised TTL gives an interval (and per-beat timeout) no shorter than
  the upstream's own TTL would, and
- after that interval enough lease is left for the next beat, forwarded,
  to come back: `promised - interval >= margin`, the margin being what the
  gateway measured of upstream heartbeat latency, with room to spare.

With the SDK's 30 s cap this needs a lease of more than 90 s (after one
interval, at least 60 s must be left to promise): absorption pays off only
with a long upstream TTL (`heartbeat.desired_ttl_seconds`), where it saves
all beats but one per `max_signal_delay_seconds`.

Pure: no I/O.
"""

from __future__ import annotations

import math

__all__ = [
    "SDK_MAX_INTERVAL",
    "SDK_MIN_INTERVAL",
    "absorption_blocker",
    "keeps_pace",
    "worker_interval",
]

# The SDK workers' beat interval: clamp(ttl/2, 1, 30) s, 30 s before any answer.
SDK_MAX_INTERVAL = 30.0
SDK_MIN_INTERVAL = 1.0
# The least margin the next forwarded beat gets, whatever the measured latency.
MIN_MARGIN_SECONDS = 1.0


def worker_interval(ttl_seconds: int | None) -> float:
    """How long an SDK worker waits between beats, and lets one beat run: clamp(ttl/2, 1, 30) s."""
    if not ttl_seconds or ttl_seconds <= 0:
        return SDK_MAX_INTERVAL
    return max(SDK_MIN_INTERVAL, min(ttl_seconds / 2, SDK_MAX_INTERVAL))


def keeps_pace(upstream_ttl: int, promised_ttl: int, margin: float) -> bool:
    """Whether a worker answered `promised_ttl` instead of the upstream's `upstream_ttl` is no worse off."""
    interval = worker_interval(promised_ttl)
    return interval >= worker_interval(upstream_ttl) and promised_ttl - interval >= max(margin, MIN_MARGIN_SECONDS)


def absorption_blocker(
    ttl_seconds: int, max_signal_delay: float, min_remaining_fraction: float
) -> tuple[str, str] | None:
    """Why absorption could never answer an SDK worker's beat on leases of `ttl_seconds`, or None if it can.

    As (the setting to change, why). The earliest beat it could answer is the
    first after a forwarded one, one interval later; the answer would promise
    what is left of the lease then.
    """
    interval = worker_interval(ttl_seconds)
    # Whole seconds left at the first beat after a forwarded one (which comes a little after one interval).
    promised = math.ceil(ttl_seconds - interval) - 1
    if not keeps_pace(ttl_seconds, promised, MIN_MARGIN_SECONDS):
        return "desired_ttl_seconds", (
            f"{ttl_seconds} s is too short a lease to absorb: after one {interval:g} s beat interval only "
            f"{max(promised, 0)} s are left to promise, which would shorten the workers' interval and per-beat "
            f"timeout below what a forwarded answer gives them; use at least {3 * int(SDK_MAX_INTERVAL) + 1} "
            "(300 is recommended)"
        )
    if max_signal_delay <= interval + MIN_MARGIN_SECONDS:
        return "max_signal_delay_seconds", (
            f"must be more than {interval + MIN_MARGIN_SECONDS:g} s at a {ttl_seconds} s lease: the first beat "
            f"after a forwarded one comes one {interval:g} s interval and a round trip later, so none could "
            "ever be answered locally"
        )
    if promised < min_remaining_fraction * ttl_seconds:
        return "min_remaining_fraction", (
            f"must be at most {promised / ttl_seconds:.2f} at a {ttl_seconds} s lease: one beat interval after a "
            f"forwarded beat only {promised} s are left, so no beat could ever be answered locally"
        )
    return None
