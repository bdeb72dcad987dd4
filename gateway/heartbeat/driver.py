"""The heartbeat seam: where `POST .../work/{work_id}/heartbeat` leaves the generic proxy path.

The proxy validates a heartbeat, injects its credential and TTL, and hands a
`HeartbeatCall` to a `HeartbeatService`, which returns one buffered answer per
call (heartbeat answers are small JSON):

- `CoalescingHeartbeats` (the default) drives the sans-IO core (`.core`):
  it owns the futures the waiting handlers await, runs each upstream flight
  as its own task (no waiter's cancellation cancels it; it has its own
  deadline), retries what surely never landed, keeps one timer for the
  core's next `Wakeup`, and feeds every result back.
- `DirectHeartbeats` forwards each call one for one (`heartbeat.coalesce: false`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, get_args

from gateway.config.settings import HeartbeatSettings, PoolName
from gateway.errors import UpstreamError, UpstreamUnavailable
from gateway.observability.nobody import NOBODY
from gateway.policy.routing import without_param
from gateway.tasks import Tasks
from gateway.upstream.client import BufferedResponse, Upstream, UpstreamRequest, fetch

from .actions import (
    Action,
    Deliver,
    DeliverError,
    DeliverLocal,
    Failed,
    FlightResult,
    LeaseEvent,
    Send,
    Wakeup,
)
from .core import Coalescer
from .lease import Beat, LeaseKey
from .query import HeartbeatQuery
from .sending import MAX_HEARTBEAT_RESPONSE_BYTES, FlightSender, Reply
from .table import LeaseView, TableCounts
from .wire import LeaseEventKind, LostReason, Outcome, encode, read_answer, read_body

if TYPE_CHECKING:
    from gateway.observability.tracing import SpanRef, Tracing

__all__ = [
    "FAILSAFE_POINTS",
    "OUTCOME_HEADER",
    "CoalescingHeartbeats",
    "DirectHeartbeats",
    "FailsafePoint",
    "HeartbeatCall",
    "HeartbeatObserver",
    "HeartbeatResult",
    "HeartbeatService",
    "upstream_credential",
]

log = logging.getLogger("gateway.leases")

OUTCOME_HEADER = "heartbeat-gateway-outcome"
# Where the failsafe may have to answer for a failed decision or action (a metric label).
FailsafePoint = Literal["flight", "submit", "completed", "abandoned", "tick", "action"]
FAILSAFE_POINTS: tuple[FailsafePoint, ...] = get_args(FailsafePoint)


@dataclass(frozen=True, slots=True)
class HeartbeatCall:
    environment_id: str
    work_id: str
    query: HeartbeatQuery
    # Ready to send: credential injected, TTL applied.
    request: UpstreamRequest
    # The gateway vouches for the credential (it injected it, or saw it issued for this item).
    vouched: bool = True


@dataclass(frozen=True, slots=True)
class HeartbeatResult(Reply):
    """A reply as a worker gets it: labelled with how it was decided (`outcome`)."""

    outcome: Outcome
    # What the service needs to hear back if the answer could not be written.
    receipt: tuple[int, LeaseKey] | None = field(default=None, compare=False)


class HeartbeatService(Protocol):
    async def heartbeat(self, call: HeartbeatCall) -> HeartbeatResult: ...

    def leases(self) -> list[LeaseView]:
        """The lease table (empty when heartbeats are not coalesced)."""

    def table_counts(self) -> TableCounts:
        """The table's rows by (environment id, state) and shortest active TTLs, at no cost per lease."""

    def configure(self, settings: HeartbeatSettings) -> None:
        """Apply reloaded heartbeat settings to what comes next."""

    def unwritten(self, result: HeartbeatResult) -> None:
        """The worker went away before `result` was written to it."""

    def stop_seen(self, environment_id: str, work_id: str) -> None:
        """A stop for the item is passing through the gateway."""

    def holds(self, environment_id: str, work_id: str, credential: tuple[str, ...]) -> bool:
        """Whether the upstream last accepted `credential` on this lease (it vouches for an ack or stop)."""

    async def close(self) -> None: ...


class DirectHeartbeats:
    """One upstream heartbeat per worker heartbeat, answered with the upstream's own response."""

    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream

    async def heartbeat(self, call: HeartbeatCall) -> HeartbeatResult:
        pool = PoolName.LEASE if call.vouched else PoolName.OTHER
        request = dataclasses.replace(call.request, pool=pool)
        response = await fetch(self._upstream, request, max_bytes=MAX_HEARTBEAT_RESPONSE_BYTES)
        answer = read_answer(response.status, response.body)
        return HeartbeatResult(_labelled(response, Outcome.FORWARDED), answer, Outcome.FORWARDED)

    def holds(self, environment_id: str, work_id: str, credential: tuple[str, ...]) -> bool:
        return False

    def unwritten(self, result: HeartbeatResult) -> None:
        pass

    def stop_seen(self, environment_id: str, work_id: str) -> None:
        pass

    def leases(self) -> list[LeaseView]:
        return []

    def table_counts(self) -> TableCounts:
        return {}, {}

    def configure(self, settings: HeartbeatSettings) -> None:
        pass

    async def close(self) -> None:
        pass


class HeartbeatObserver(Protocol):
    """Told what the driver decided and saw: for metrics, without this module importing them."""

    def retried(self, route: str) -> None: ...

    def lease_event(self, environment_id: str, kind: LeaseEventKind, reason: LostReason | None) -> None: ...

    def lease_remaining_at_beat(self, environment_id: str, seconds: float) -> None: ...

    def internal_error(self, where: FailsafePoint) -> None:
        """A decision or action failed unexpectedly and the failsafe answered for it (a bug, logged)."""


Core = Coalescer[Reply, UpstreamError]


class CoalescingHeartbeats:
    def __init__(
        self,
        upstream: Upstream,
        settings: HeartbeatSettings,
        *,
        label: Callable[[str], str] = str,
        observer: HeartbeatObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._observer = observer or NOBODY
        self._tracing = tracing
        self._label = label
        self._clock = clock
        self.core: Core = Coalescer()
        self._sender = FlightSender(
            upstream,
            self.core,
            observer=self._observer,
            clock=clock,
            rng=rng or random.Random(),
            timeout=settings.upstream_timeout_seconds,
        )
        self.configure(settings)
        self._calls: dict[int, HeartbeatCall] = {}
        self._futures: dict[int, asyncio.Future[HeartbeatResult]] = {}
        self._waiters = iter(range(1, 2**63))
        self._flights = Tasks()
        # The one timer for the core's earliest Wakeup, and when it is due.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    # -- the service -------------------------------------------------------------------

    async def heartbeat(self, call: HeartbeatCall) -> HeartbeatResult:
        waiter = next(self._waiters)
        future: asyncio.Future[HeartbeatResult] = asyncio.get_running_loop().create_future()
        self._futures[waiter] = future
        self._calls[waiter] = call
        key = (call.environment_id, call.work_id)
        beat = Beat(waiter, key, call.query.expected_last_heartbeat, _identity(call.request), call.vouched)
        now = self._clock()
        left = self.core.lease_time_left(key, now)
        if left is not None:
            self._observer.lease_remaining_at_beat(call.environment_id, left)
        try:
            self._decide(key, "submit", lambda: self.core.submit(beat, now))
            if not future.done() and not self.core.is_waiting(waiter):
                # The failsafe ran before the core took the beat in: nobody else will answer it.
                self._fail(waiter, may_have_reached_upstream=False)
            return await future
        except asyncio.CancelledError:
            # The worker went away. Its flight (if any) goes on without it.
            if future.done() and not future.cancelled() and future.exception() is None:
                self.unwritten(future.result())
            else:
                self._decide(key, "abandoned", lambda: self.core.abandoned(waiter, self._clock()))
            raise
        finally:
            self._futures.pop(waiter, None)
            self._calls.pop(waiter, None)

    def unwritten(self, result: HeartbeatResult) -> None:
        if result.receipt is not None and result.outcome in (Outcome.FORWARDED, Outcome.HANDED_OFF):
            waiter, key = result.receipt
            self.core.unwritten(waiter, key, self._clock())

    def stop_seen(self, environment_id: str, work_id: str) -> None:
        self.core.stop_seen((environment_id, work_id), self._clock())

    def holds(self, environment_id: str, work_id: str, credential: tuple[str, ...]) -> bool:
        """Whether `credential` is the one the upstream last accepted on this lease."""
        holder = self.core.holder((environment_id, work_id))
        return isinstance(holder, Identity) and holder.credential == credential

    def configure(self, settings: HeartbeatSettings) -> None:
        self._sender.timeout = settings.upstream_timeout_seconds
        self.core.absorb = settings.absorb
        self.core.table.tracking = settings.leases

    def leases(self) -> list[LeaseView]:
        return list(self.core.leases(self._clock()))

    def table_counts(self) -> TableCounts:
        return self.core.table_counts()

    def wake(self) -> None:
        """The core's wakeup time came: let it see the time (and carry out what it decides)."""
        self._timer = self._timer_at = None
        self._decide(None, "tick", lambda: self.core.tick(self._clock()))

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None
        await self._flights.close()
        for future in self._futures.values():
            if not future.done():
                future.set_exception(
                    UpstreamUnavailable("the gateway is shutting down", kind="other", may_have_reached_upstream=True)
                )

    # -- carrying out decisions ------------------------------------------------------
    #
    # Every decision goes through `_decide`, every action through `_carry_out`. Neither
    # lets an exception escape: a lease whose flight nobody will finish waits forever
    # (a worker's beats unanswered until the process restarts), which is worse than any
    # error. So a failing decision resets its lease and answers its waiters with a 502
    # (`_failsafe`), and a failing action is made good on its own, the rest still
    # carried out. Both are logged and counted (`heartbeat_gateway_internal_errors_total`).

    def _decide(
        self,
        key: LeaseKey | None,
        where: FailsafePoint,
        decide: Callable[[], list[Action[Reply, UpstreamError]]],
        *,
        finished: int | None = None,
    ) -> None:
        """`finished`: the flight whose end is being reported (over, whatever the core made of it)."""
        actions: list[Action[Reply, UpstreamError]] = []
        try:
            actions = decide()
        except Exception:
            self._failsafe(key, where, finished)
        # Carried out even when empty: it re-arms the timer a failed tick would have left unset.
        self._carry_out(actions)

    def _carry_out(self, actions: list[Action[Reply, UpstreamError]]) -> None:
        try:
            for action in actions:
                try:
                    self._carry_out_one(action)
                except Exception:
                    self._action_failed(action)
        finally:
            # Should a Wakeup have been skipped, the lease table's upkeep must not stop for good.
            if self._timer is None and (due := self.core.next_deadline()) is not None:
                self._wake_at(due)

    def _carry_out_one(self, action: Action[Reply, UpstreamError]) -> None:
        if isinstance(action, Send):
            call = self._calls[action.waiter]
            # The main lane draws on lease-critical capacity; a side lane (a credential
            # nobody vouches for) on the general class, so it never takes a lease's connection.
            pool = PoolName.LEASE if action.main else PoolName.OTHER
            request = call.request
            flight: Coroutine[Any, Any, object]
            if self._tracing is None:
                flight = self._flight(action.key, action.flight, request, pool)
            else:
                # The flight's span: a child of the beat it sends, linked from the beats it answers.
                environment_id, work_id = action.key
                ref = self._tracing.start_flight(request.trace, self._label(environment_id), work_id)
                request = dataclasses.replace(request, trace=ref)
                flight = self._traced_flight(self._tracing, ref, action.key, action.flight, request, pool)
            try:
                self._flights.spawn(flight, name=f"heartbeat-flight-{action.flight}")
            except BaseException:
                flight.close()  # never started: nothing to warn about, and `_action_failed` ends it
                raise
        elif isinstance(action, Deliver):
            self._resolve(action.waiter, action.response, action.outcome)
        elif isinstance(action, DeliverLocal):
            self._resolve(action.waiter, _local_reply(action), action.outcome)
        elif isinstance(action, DeliverError):
            future = self._futures.get(action.waiter)
            if future is not None and not future.done():
                future.set_exception(action.error.copy())
        elif isinstance(action, LeaseEvent):
            self._log_event(action)
        elif isinstance(action, Wakeup):
            self._wake_at(action.at)

    def _action_failed(self, action: Action[Reply, UpstreamError]) -> None:
        """One action could not be carried out: make good what it owed, so nobody waits on it."""
        log.exception("a heartbeat action failed: %s", type(action).__name__)
        self._observer.internal_error("action")
        if isinstance(action, Send):
            # The flight never started: it ends now, as a request that surely never left.
            never_sent: Failed[UpstreamError] = Failed(
                self._failure(may_have_reached_upstream=False), may_have_applied=False
            )
            now = self._clock()
            self._decide(
                action.key,
                "completed",
                lambda: self.core.completed(action.key, action.flight, never_sent, now),
                finished=action.flight,
            )
        elif isinstance(action, Deliver | DeliverLocal | DeliverError):
            call = self._calls.get(action.waiter)
            if call is not None and isinstance(action, Deliver | DeliverLocal):
                # The core counts the answer delivered: as for an answer the worker never read, it is
                # kept for the worker's retry, which would otherwise meet a 412 on a lease just renewed.
                with contextlib.suppress(Exception):
                    self.core.unwritten(action.waiter, (call.environment_id, call.work_id), self._clock())
            self._fail(action.waiter, may_have_reached_upstream=True)

    def _failsafe(self, key: LeaseKey | None, where: FailsafePoint, finished: int | None = None) -> None:
        """The core failed to decide: answer everyone waiting on the lease but a live flight's riders."""
        log.exception("heartbeat %s failed unexpectedly; the lease starts afresh", where)
        self._observer.internal_error(where)
        if key is None:
            return
        try:
            waiters = self.core.reset(key, finished)
        except Exception:
            log.exception("the heartbeat failsafe could not reset the lease")
            waiters = []
        for waiter in waiters:
            self._fail(waiter, may_have_reached_upstream=True)

    def _fail(self, waiter: int, *, may_have_reached_upstream: bool) -> None:
        future = self._futures.get(waiter)
        if future is not None and not future.done():
            future.set_exception(self._failure(may_have_reached_upstream=may_have_reached_upstream))

    @staticmethod
    def _failure(*, may_have_reached_upstream: bool) -> UpstreamUnavailable:
        return UpstreamUnavailable(
            "the gateway could not complete the heartbeat",
            kind="other",
            may_have_reached_upstream=may_have_reached_upstream,
        )

    def _wake_at(self, at: float) -> None:
        """One timer, moved earlier when the core asks for an earlier wakeup."""
        if self._timer_at is not None and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        # Traced, in a context of its own: what the table's upkeep decides belongs to no worker's request.
        context = contextvars.Context() if self._tracing is not None else None
        self._timer = asyncio.get_running_loop().call_later(max(0.0, at - self._clock()), self.wake, context=context)

    def _resolve(self, waiter: int, reply: Reply, outcome: Outcome) -> None:
        future = self._futures.get(waiter)
        call = self._calls.get(waiter)
        if future is None or future.done() or call is None:
            return
        key = (call.environment_id, call.work_id)
        labelled = _labelled(reply.response, outcome)
        future.set_result(HeartbeatResult(labelled, reply.answer, outcome, (waiter, key), flight=reply.flight))

    async def _traced_flight(
        self, tracing: Tracing, ref: SpanRef, key: LeaseKey, flight: int, request: UpstreamRequest, pool: PoolName
    ) -> None:
        """`_flight` with its span current while it flies: the lease events its end decides are told on it."""
        result = "cancelled"
        with tracing.current(ref):
            try:
                result = type(await self._flight(key, flight, request, pool)).__name__.lower()
            finally:
                tracing.finish_flight(ref, result)

    async def _flight(
        self, key: LeaseKey, flight: int, request: UpstreamRequest, pool: PoolName
    ) -> FlightResult[Reply, UpstreamError]:
        """One upstream heartbeat, retried only when it surely never landed; never cancelled by a waiter.

        However it ends (an answer, an error, an exception nobody expected, the task
        cancelled at shutdown or by a library), the core hears that the flight is over:
        otherwise the lease's beats would queue behind it forever.
        """
        outcome: FlightResult[Reply, UpstreamError]
        try:
            outcome = await self._sender.send(key, flight, request, pool)
        except Exception:
            log.exception("heartbeat flight failed unexpectedly")
            self._observer.internal_error("flight")
            outcome = Failed(self._failure(may_have_reached_upstream=True))
        except BaseException:  # cancelled: at shutdown, or by a library under the flight
            outcome = Failed(
                UpstreamUnavailable("the heartbeat was cancelled", kind="other", may_have_reached_upstream=True)
            )
            raise
        finally:
            now = self._clock()
            self._decide(key, "completed", lambda: self.core.completed(key, flight, outcome, now), finished=flight)
        return outcome

    def _log_event(self, event: LeaseEvent) -> None:
        environment_id, work_id = event.key
        self._observer.lease_event(environment_id, event.kind, event.reason)
        fields = {
            "event": f"lease_{event.kind.value}",
            "environment": self._label(environment_id),
            "work_id": work_id,
        }
        if event.reason:
            fields["reason"] = event.reason.value
        # An eviction is routine upkeep of a full table (counted in a metric), not news about a lease.
        level = logging.DEBUG if event.kind is LeaseEventKind.EVICTED else logging.INFO
        log.log(level, "lease %s", event.kind.value, extra={"fields": fields})
        if self._tracing is not None and event.kind is not LeaseEventKind.EVICTED:  # another lease's upkeep
            reason = event.reason.value if event.reason else None
            self._tracing.lease_event(event.kind.value, reason, self._label(environment_id), work_id)


def _labelled(response: BufferedResponse, outcome: Outcome) -> BufferedResponse:
    """The answer as the worker gets it: with how it was decided."""
    headers = (*response.headers, (OUTCOME_HEADER, outcome.value))
    return BufferedResponse(response.status, response.reason, headers, response.body)


def upstream_credential(headers: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    """The credential the upstream will see, as header values."""
    return tuple(v for k, v in headers if k.lower() in ("authorization", "x-api-key"))


class Identity(NamedTuple):
    """What the upstream would see of a beat but its `expected_last_heartbeat`: beats merge, are handed an
    answer or absorbed only between equal identities. A tuple: compared and hashed on every beat, in C."""

    credential: tuple[str, ...]
    # The query's other parameters, sorted (desired_ttl_seconds, ...).
    params: tuple[str, ...]


def _identity(request: UpstreamRequest) -> Identity:
    _, _, query = request.target.partition("?")
    params = sorted(without_param(query, "expected_last_heartbeat").split("&"))
    return Identity(upstream_credential(request.headers), tuple(params))


_LOCAL_REASONS = MappingProxyType({200: "OK", 412: "Precondition Failed", 429: "Too Many Requests"})


def _local_reply(action: DeliverLocal[Reply]) -> Reply:
    """The gateway's own answer, encoded once; what it says is read from the body before encoding."""
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
    if action.status == 429:
        headers += (("retry-after", "1"),)
    response = BufferedResponse(action.status, _LOCAL_REASONS[action.status], headers, encode(action.body))
    # A handed-off answer came from a flight: the worker's trace links to it.
    flight = action.kept.flight if action.kept is not None else None
    return Reply(response, read_body(action.status, action.body), flight=flight)
