"""When the gateway may send a heartbeat again, as a pure function.

Only requests that surely never reached the API (the connection could not be
opened) and answers that refused with a `retry-after` (429, 503) are retried;
a heartbeat that may have landed is never re-sent, because a second try
with the same `expected_last_heartbeat` would then earn a spurious 412.

A retry also has to come back while the workers waiting for it still wait:
the SDK workers abort a beat after one interval. A retry that cannot make it
is not tried; the worker gets the 429 at once, and its own next beat (or the
SDK's own retry) goes as soon as it would have gone directly.
"""

from __future__ import annotations

__all__ = ["MAX_RETRIES", "retry_delay"]

MAX_RETRIES = 3
# Full-jitter exponential backoff (as Envoy's router): base doubling to a cap.
BACKOFF_BASE = 0.1
BACKOFF_CAP = 2.0
# With no lease known (a claim), retries stay within this many seconds.
UNKNOWN_LEASE_BUDGET = 5.0
# A retry must land this long before the lease surely lapses.
SAFETY_MARGIN = 0.5


def retry_delay(
    attempt: int,
    *,
    retry_after: float | None,
    time_left: float | None,
    draw: float,
    window_left: float | None = None,
) -> float | None:
    """Seconds to wait before retry number `attempt + 1`, or None to give up.

    `time_left` is the lease time surely left (None: not known), `window_left`
    how long the waiting workers still wait for this beat (None: no bound
    known). `draw` is a uniform random number in [0, 1): the jitter, passed in
    so the decision is reproducible.
    """
    if attempt >= MAX_RETRIES:
        return None
    backoff = draw * min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)
    # A server's retry-after is honoured, with a little jitter on top so a fleet does not retry in step.
    delay = retry_after + backoff / 2 if retry_after is not None else backoff
    budget = UNKNOWN_LEASE_BUDGET if time_left is None else time_left - SAFETY_MARGIN
    if window_left is not None:
        budget = min(budget, window_left - SAFETY_MARGIN)
    return delay if delay < budget else None
