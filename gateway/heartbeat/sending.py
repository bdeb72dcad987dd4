"""One flight's upstream heartbeat: sent, and sent again only when it surely never landed, in time for its workers.

The driver starts a flight for each `Send` the core decides; this is what the
flight does upstream. A heartbeat that may have landed is never re-sent (a
second try with the same `expected_last_heartbeat` would earn a spurious
412); one that surely did not, or one refused with a `retry-after`, is tried
again only while a worker still waits for it and only if its answer can come
back before that worker gives up (`retry.retry_delay`). The answer is read
once, here, and classified for the core.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from gateway.config.settings import PoolName
from gateway.errors import CapacityExceeded, UpstreamError, UpstreamUnavailable
from gateway.upstream.client import BufferedResponse, Upstream, UpstreamRequest, fetch

from .actions import Failed, FlightResult, Rejected, Succeeded, Unsuccessful
from .core import Coalescer
from .lease import LeaseKey
from .retry import retry_delay
from .wire import Answer, read_answer

if TYPE_CHECKING:
    from gateway.observability.tracing import FlightLink

__all__ = ["MAX_HEARTBEAT_RESPONSE_BYTES", "FlightSender", "Reply", "classify"]

# A heartbeat answer is a few hundred bytes; anything near this is not one.
MAX_HEARTBEAT_RESPONSE_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Reply:
    """An upstream answer and what it says about the lease (`wire.Answer`), read once when it arrives: the
    core's response type, and what the driver hands the proxy (`driver.HeartbeatResult`, with its outcome)."""

    response: BufferedResponse
    answer: Answer
    # The flight, when tracing is on: every worker this answer reaches links to it.
    flight: FlightLink | None = field(default=None, compare=False, kw_only=True)


class RetryObserver(Protocol):
    def retried(self, route: str) -> None: ...


class FlightSender:
    """Sends a flight's heartbeat upstream, asking the core whether anyone still waits and until when."""

    def __init__(
        self,
        upstream: Upstream,
        core: Coalescer[Reply, UpstreamError],
        *,
        observer: RetryObserver,
        clock: Callable[[], float],
        rng: random.Random,
        timeout: float,
    ) -> None:
        self._upstream = upstream
        self.core = core
        self._observer = observer
        self._clock = clock
        self._rng = rng
        # The upstream heartbeat timeout (`heartbeat.upstream_timeout_seconds`; a reload changes it).
        self.timeout = timeout

    async def send(
        self, key: LeaseKey, flight: int, request: UpstreamRequest, pool: PoolName
    ) -> FlightResult[Reply, UpstreamError]:
        if not self.core.flight_wanted(key, flight):
            # The worker left before the task started: never send what nobody waits for.
            gone = UpstreamUnavailable("the worker went away", kind="other", may_have_reached_upstream=False)
            return Failed(gone, may_have_applied=False)
        attempt = 0
        while True:
            outcome, wait_hint, retryable = await self._attempt(self._within_window(request, pool, key, flight))
            if not retryable:
                return outcome
            now = self._clock()
            time_left = self.core.lease_time_left(key, now)
            deadline = self.core.retry_deadline(key, flight)
            delay = retry_delay(
                attempt,
                retry_after=wait_hint,
                time_left=time_left,
                draw=self._rng.random(),
                window_left=None if deadline is None else deadline - now,
            )
            if delay is None:
                return outcome
            attempt += 1
            await asyncio.sleep(delay)
            self._observer.retried("heartbeat")
            if not self.core.flight_wanted(key, flight):
                return outcome  # nobody waits any more: a retry now would renew what no one asked for

    def _within_window(self, request: UpstreamRequest, pool: PoolName, key: LeaseKey, flight: int) -> UpstreamRequest:
        """The request as sent on the lease's lane, waiting for a connection no longer than its answer
        can still reach its workers.

        The SDK workers abort a beat after one interval: a beat that waited in the
        lease class's queue past that, less a round trip, would be answered to nobody
        (and might renew a lease no worker knows it holds). It gets a 503 while they wait.
        """
        deadline = self.core.retry_deadline(key, flight)
        patience = None if deadline is None else max(0.0, deadline - self._clock() - self.core.round_trip())
        return dataclasses.replace(request, pool=pool, timeout=self.timeout, max_queue_seconds=patience)

    async def _attempt(self, request: UpstreamRequest) -> tuple[FlightResult[Reply, UpstreamError], float | None, bool]:
        """One try: the outcome, a retry-after hint, and whether a retry is allowed at all."""
        flight = request.trace.link if request.trace is not None else None
        try:
            response = await fetch(self._upstream, request, max_bytes=MAX_HEARTBEAT_RESPONSE_BYTES)
        except UpstreamError as error:
            # The workers it fails link to the flight, as they would to its answer.
            error.flight = flight
            if isinstance(error, CapacityExceeded):
                # The gateway's own capacity: handed back at once, so the worker's own retry decides.
                return Failed(error, may_have_applied=False), None, False
            # Only a request that never left may be sent again: the first one may have been applied.
            failed = Failed(error, may_have_applied=error.may_have_reached_upstream)
            return failed, None, not error.may_have_reached_upstream
        outcome = classify(Reply(response, read_answer(response.status, response.body), flight=flight))
        retry_after = _retry_after(response) if response.status in (429, 503) else None
        return outcome, retry_after, retry_after is not None


def classify(reply: Reply) -> FlightResult[Reply, UpstreamError]:
    answer = reply.answer
    if answer.status == 412:
        return Rejected(reply, answer.current_state, answer.current_last_heartbeat)
    if answer.success is not None:
        return Succeeded(answer.success, reply)
    # A server error may follow a write that landed; refusals (4xx, 503, 529) did not apply.
    return Unsuccessful(reply, may_have_applied=answer.status >= 500 and answer.status not in (503, 529))


def _retry_after(response: BufferedResponse) -> float | None:
    for name, value in response.headers:
        if name.lower() == "retry-after":
            try:
                seconds = float(value)
            except ValueError:
                return None  # an HTTP date: not worth the clock comparison for a heartbeat
            return seconds if seconds >= 0 else None
    return None
