"""Every error the upstream seam can raise, at every point a lease can be in: nobody is left waiting.

The lease wedge of issue 19 hid on a path no test took: a `CapacityExceeded`
coming back to a flight whose waiters then had to be answered. This table
drives each fault the seam can produce (every `UpstreamError` subclass,
cancellation, an exception nobody expected, and the API's refusals) through
the driver with the lease in each state it can be in, and holds every case
to what a worker would notice:

- every waiting worker is answered, within a bound, with an answer or an
  API-shaped gateway error (never a `TypeError`, never silence);
- afterwards the lease is idle: no flight out, nothing queued;
- the lease is not wedged: the holder's next beat is answered by the upstream;
- no task ends with an exception nobody retrieved, and the failsafe was
  needed only where the fault is a bug (an unexpected exception).

The upstream here is a small honest lease (it checks `expected_last_heartbeat`
as the API does), so a fault that hands back a 412 or a lost answer behaves
as it would for real.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import pytest

from gateway.config.settings import AbsorbSettings, HeartbeatSettings, LeaseTrackingSettings
from gateway.errors import (
    CapacityExceeded,
    GatewayError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.heartbeat.driver import CoalescingHeartbeats, HeartbeatCall, HeartbeatResult
from gateway.heartbeat.query import HeartbeatQuery
from gateway.heartbeat.wire import NO_HEARTBEAT, LeaseEventKind, LostReason
from gateway.tasks import Tasks
from gateway.upstream.client import UpstreamRequest, UpstreamResponse

# How long any waiter may wait in these cases: far more than a scripted exchange takes.
ANSWER_BOUND = 5.0
KEY_CREDENTIAL = (("x-api-key", "env-key"),)
JUNK_CREDENTIAL = (("authorization", "Bearer junk"),)


@dataclass
class Applied:
    """The beat is applied upstream, then its answer is lost in the way `error` says."""

    error: Exception


Fault = BaseException | tuple[int, dict[str, Any], tuple[tuple[str, str], ...]] | Applied


def _status(status: int, error_type: str) -> tuple[int, dict[str, Any], tuple[tuple[str, str], ...]]:
    body = {"type": "error", "error": {"type": error_type, "message": "scripted"}}
    headers = (("retry-after", "0"),) if status in (429, 503) else ()
    return status, body, headers


FAULTS: dict[str, Callable[[], Fault]] = {
    "connect refused (never sent, retried)": lambda: UpstreamUnavailable(
        "refused", kind="connect", may_have_reached_upstream=False
    ),
    "reset (may have landed)": lambda: UpstreamUnavailable("reset", kind="reset", may_have_reached_upstream=True),
    "other upstream error": lambda: UpstreamUnavailable("odd", kind="other", may_have_reached_upstream=True),
    "upstream timeout": lambda: UpstreamTimeout("slow", kind="timeout", may_have_reached_upstream=True),
    "gateway capacity exceeded": lambda: CapacityExceeded("the lease class is full", retry_after=1),
    "cancelled under the flight": lambda: asyncio.CancelledError(),
    "unexpected exception": lambda: RuntimeError("a bug in a library"),
    "applied, answer reset": lambda: Applied(
        UpstreamUnavailable("reset", kind="reset", may_have_reached_upstream=True)
    ),
    "applied, answer timed out": lambda: Applied(
        UpstreamTimeout("slow", kind="timeout", may_have_reached_upstream=True)
    ),
    "429 retry-after 0": lambda: _status(429, "rate_limit_error"),
    "503 overloaded": lambda: _status(503, "overloaded_error"),
    "500 api error": lambda: _status(500, "api_error"),
    "529 overloaded": lambda: _status(529, "overloaded_error"),
}
# The faults that are a bug somewhere, for which the failsafe is right to step in.
BUGS = {"unexpected exception"}


class HonestLease:
    """An `Upstream` holding one lease per work id, as the API does; faults are armed one exchange at a time."""

    def __init__(self, ttl: int = 30) -> None:
        self.ttl = ttl
        self.current: dict[str, str | None] = {}
        # One per exchange, in order; None: answer honestly.
        self.faults: list[Fault | None] = []
        self.calls = 0
        self.open = asyncio.Event()
        self.open.set()
        self._serial = 0

    @asynccontextmanager
    async def _exchange(self, request: UpstreamRequest) -> AsyncIterator[UpstreamResponse]:
        self.calls += 1
        await self.open.wait()
        fault = self.faults.pop(0) if self.faults else None
        if isinstance(fault, BaseException):
            raise fault
        if isinstance(fault, tuple):
            status, body, headers = fault
            yield _Answer(status, json.dumps(body).encode(), headers)
            return
        status, body = self._beat(request)
        if isinstance(fault, Applied):
            raise fault.error
        yield _Answer(status, json.dumps(body).encode(), ())

    def _beat(self, request: UpstreamRequest) -> tuple[int, dict[str, Any]]:
        path, _, query = request.target.partition("?")
        work_id = path.split("/")[-2]
        expected = parse_qs(query).get("expected_last_heartbeat", [None])[0]
        current = self.current.get(work_id)
        if expected is not None and expected != (current or NO_HEARTBEAT):
            details: dict[str, Any] = {
                "error_code": "heartbeat_precondition_failed",
                "expected_last_heartbeat": expected,
                "current_state": {"state": "active" if current else "queued", "last_heartbeat": current},
            }
            return 412, {"type": "error", "error": {"type": "invalid_request_error", "details": details}}
        self._serial += 1
        self.current[work_id] = f"hb-{self._serial}"
        return 200, {
            "type": "work_heartbeat",
            "last_heartbeat": f"hb-{self._serial}",
            "lease_extended": True,
            "state": "active",
            "ttl_seconds": self.ttl,
        }

    def exchange(self, request: UpstreamRequest) -> AbstractAsyncContextManager[UpstreamResponse]:
        return self._exchange(request)

    async def close(self) -> None:
        pass


class _Answer:
    def __init__(self, status: int, body: bytes, headers: tuple[tuple[str, str], ...]) -> None:
        self.status, self.reason, self.headers, self._body = status, "", headers, body

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self._body


@dataclass
class Observed:
    internal_errors: list[str] = field(default_factory=list)
    events: list[tuple[str, LostReason | None]] = field(default_factory=list)

    def retried(self, route: str) -> None:
        pass

    def lease_event(self, environment_id: str, kind: LeaseEventKind, reason: LostReason | None) -> None:
        self.events.append((kind.value, reason))

    def lease_remaining_at_beat(self, environment_id: str, seconds: float) -> None:
        pass

    def internal_error(self, where: str) -> None:
        self.internal_errors.append(where)


def call(work_id: str, expected: str | None, *, vouched: bool = True) -> HeartbeatCall:
    target = f"/v1/environments/env_1/work/{work_id}/heartbeat"
    if expected is not None:
        target += f"?expected_last_heartbeat={expected}"
    headers = KEY_CREDENTIAL if vouched else JUNK_CREDENTIAL
    request = UpstreamRequest("POST", target, headers)
    return HeartbeatCall("env_1", work_id, HeartbeatQuery(expected, None), request, vouched=vouched)


Answered = HeartbeatResult | GatewayError


@dataclass
class Rig:
    service: CoalescingHeartbeats
    upstream: HonestLease
    observed: Observed
    held: dict[str, str] = field(default_factory=dict)

    def beat(self, work_id: str, expected: str | None, *, vouched: bool = True) -> asyncio.Task[Answered]:
        async def one() -> Answered:
            try:
                result = await self.service.heartbeat(call(work_id, expected, vouched=vouched))
            except GatewayError as error:
                return error
            answer = result.answer.success
            if answer is not None and result.response.status == 200:
                self.held[work_id] = answer.last_heartbeat
            return result

        return asyncio.ensure_future(one())

    async def claim(self, work_id: str) -> None:
        result = await asyncio.wait_for(self.beat(work_id, NO_HEARTBEAT), ANSWER_BOUND)
        assert isinstance(result, HeartbeatResult)
        assert result.response.status == 200

    @classmethod
    def made(cls, settings: HeartbeatSettings | None = None, *, ttl: int = 30, observed: Observed | None = None) -> Rig:
        """A service over an honest lease of `ttl` seconds, its observer, and the retries' jitter fixed."""
        observed = observed or Observed()
        upstream = HonestLease(ttl)
        service = CoalescingHeartbeats(
            upstream, settings or HeartbeatSettings(), observer=observed, rng=random.Random(7)
        )
        return cls(service, upstream, observed)

    async def leave_a_kept_answer(self, work_id: str) -> str:
        """The holder's beat lands upstream after its worker gave up: its answer is kept for the worker's
        retry. Returns the value that worker presented (and will present again)."""
        presented = self.held[work_id]
        self.upstream.open.clear()
        left = self.beat(work_id, presented)
        await asyncio.sleep(0.01)
        left.cancel()
        self.upstream.open.set()
        await self.settle()
        return presented

    async def settle(self) -> None:
        """Let scheduled callbacks and flights run until nothing more is out."""
        for _ in range(200):
            if not len(self.service._flights):
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)


# -- the points a lease can be in when the fault strikes ----------------------------------
#
# Each arms the fault for the lease's next upstream exchange (or the one after, for
# "retry") and returns the waiting workers' tasks.

Point = Callable[[Rig, Fault], Awaitable[list[asyncio.Task[Answered]]]]


async def first_flight(rig: Rig, fault: Fault) -> list[asyncio.Task[Answered]]:
    rig.upstream.faults = [fault]
    return [rig.beat("w", NO_HEARTBEAT)]


async def queued_behind_one(rig: Rig, fault: Fault) -> list[asyncio.Task[Answered]]:
    await rig.claim("w")
    rig.upstream.open.clear()
    rig.upstream.faults = [fault]
    first = rig.beat("w", rig.held["w"])
    await asyncio.sleep(0.01)
    # Queued behind the holder's flight: a beat with another value, and the holder's own retry.
    behind = [rig.beat("w", "stale-value"), rig.beat("w", rig.held["w"])]
    await asyncio.sleep(0.01)
    rig.upstream.open.set()
    return [first, *behind]


async def joined(rig: Rig, fault: Fault) -> list[asyncio.Task[Answered]]:
    await rig.claim("w")
    rig.upstream.open.clear()
    rig.upstream.faults = [fault]
    tasks = [rig.beat("w", None) for _ in range(3)]
    await asyncio.sleep(0.01)
    rig.upstream.open.set()
    return tasks


async def side_lane(rig: Rig, fault: Fault) -> list[asyncio.Task[Answered]]:
    await rig.claim("w")
    rig.upstream.open.clear()
    main = rig.beat("w", rig.held["w"])
    await asyncio.sleep(0.01)
    # A credential nobody vouches for, while the holder's beat is out: its own lane, hit by the fault.
    rig.upstream.faults = [None, fault, fault]  # the holder's beat goes through
    side = [rig.beat("w", rig.held["w"], vouched=False), rig.beat("w", None, vouched=False)]
    await asyncio.sleep(0.01)
    rig.upstream.open.set()
    return [main, *side]


async def on_retry(rig: Rig, fault: Fault) -> list[asyncio.Task[Answered]]:
    await rig.claim("w")
    # The first try surely never left (refused): the retry meets the fault.
    rig.upstream.faults = [UpstreamUnavailable("refused", kind="connect", may_have_reached_upstream=False), fault]
    return [rig.beat("w", rig.held["w"])]


async def after_handoff(rig: Rig, fault: Fault) -> list[asyncio.Task[Answered]]:
    await rig.claim("w")
    claimed = await rig.leave_a_kept_answer("w")
    handed = await asyncio.wait_for(rig.beat("w", claimed), ANSWER_BOUND)
    assert isinstance(handed, HeartbeatResult)
    assert handed.outcome == "handed_off"
    rig.upstream.faults = [fault]
    return [rig.beat("w", rig.held["w"]), rig.beat("w", claimed)]


async def after_absorbed(rig: Rig, fault: Fault) -> list[asyncio.Task[Answered]]:
    await rig.claim("w")
    absorbed = await asyncio.wait_for(rig.beat("w", rig.held["w"]), ANSWER_BOUND)
    assert isinstance(absorbed, HeartbeatResult)
    assert absorbed.outcome == "absorbed"
    rig.upstream.faults = [fault]
    # An unconditional beat is never absorbed: it goes up and meets the fault; an echo rides behind.
    return [rig.beat("w", None), rig.beat("w", rig.held["w"])]


async def after_eviction(rig: Rig, fault: Fault) -> list[asyncio.Task[Answered]]:
    await rig.claim("w")
    await rig.claim("other")  # the table holds one lease: "w" is evicted
    assert [row.work_id for row in rig.service.leases()] == ["other"]
    rig.upstream.faults = [fault]
    return [rig.beat("w", rig.held["w"])]


async def during_stop(rig: Rig, fault: Fault) -> list[asyncio.Task[Answered]]:
    await rig.claim("w")
    rig.upstream.open.clear()
    rig.upstream.faults = [fault]
    tasks = [rig.beat("w", rig.held["w"])]
    await asyncio.sleep(0.01)
    rig.service.stop_seen("env_1", "w")
    tasks.append(rig.beat("w", rig.held["w"]))
    rig.upstream.open.set()
    return tasks


POINTS: dict[str, tuple[Point, HeartbeatSettings]] = {
    "first flight": (first_flight, HeartbeatSettings()),
    "queued behind one": (queued_behind_one, HeartbeatSettings()),
    "joined": (joined, HeartbeatSettings()),
    "side lane": (side_lane, HeartbeatSettings()),
    "retry": (on_retry, HeartbeatSettings()),
    "handoff": (after_handoff, HeartbeatSettings()),
    "absorbed": (
        after_absorbed,
        HeartbeatSettings(absorb=AbsorbSettings(enabled=True, max_signal_delay_seconds=60, min_remaining_fraction=0.5)),
    ),
    "evicted": (after_eviction, HeartbeatSettings(leases=LeaseTrackingSettings(max_tracked=1))),
    "stop passing": (during_stop, HeartbeatSettings()),
}


@pytest.mark.parametrize("fault_name", list(FAULTS))
@pytest.mark.parametrize("point_name", list(POINTS))
async def test_every_fault_at_every_point_answers_every_waiter_and_leaves_the_lease_usable(
    point_name: str, fault_name: str
) -> None:
    point, settings = POINTS[point_name]
    ttl = 300 if point_name == "absorbed" else 30
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: unhandled.append(context))
    rig = Rig.made(settings, ttl=ttl)
    service, upstream, observed = rig.service, rig.upstream, rig.observed
    try:
        waiters = await point(rig, FAULTS[fault_name]())
        done, pending = await asyncio.wait(waiters, timeout=ANSWER_BOUND)
        assert not pending, f"{len(pending)} of {len(waiters)} workers never answered"
        for task in done:
            answer = task.result()
            # An answer from the upstream or the gateway's own, API-shaped error: nothing else.
            assert isinstance(answer, HeartbeatResult | GatewayError), repr(answer)
            if isinstance(answer, GatewayError):
                assert json.loads(answer.body())["type"] == "error"
        await rig.settle()
        # Idle: no flight out, nobody waiting, on any lease.
        for row in service.leases():
            assert (row.in_flight, row.waiting) == (False, 0), row
        assert service.core.in_flight(("env_1", "w")) == 0
        # Not wedged: the lease's holder (or a new claimant) is answered by the upstream.
        upstream.faults = []
        expected = upstream.current.get("w") or NO_HEARTBEAT
        after = await asyncio.wait_for(rig.beat("w", expected), ANSWER_BOUND)
        assert isinstance(after, HeartbeatResult), after
        assert after.response.status == 200, after
        await rig.settle()
    finally:
        await service.close()
        gc_unhandled = [c for c in unhandled if "exception" in c]
        loop.set_exception_handler(None)
    assert gc_unhandled == [], gc_unhandled
    if fault_name in BUGS:
        assert observed.internal_errors, "an unexpected exception should be counted"
    else:
        assert observed.internal_errors == [], "the failsafe stepped in for weather, not a bug"


# -- the failsafe: a decision or action that fails (a bug) never strands a worker ---------------


def _broken_once(original: Callable[..., Any]) -> Callable[..., Any]:
    calls = [0]

    def broken(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("a bug in the core")
        return original(*args, **kwargs)

    return broken


class _SpawnFailsOnce:
    """The driver's task owner, whose next spawn fails (as when the loop refuses a task)."""

    def __init__(self, tasks: Tasks) -> None:
        self._tasks = tasks
        self.spawn = _broken_once(tasks.spawn)

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        await self._tasks.close()


@pytest.mark.parametrize("seam", ["submit", "completed", "spawn"])
async def test_a_failing_decision_answers_the_lease_with_a_502_and_the_lease_starts_afresh(seam: str) -> None:
    rig = Rig.made()
    service, upstream, observed = rig.service, rig.upstream, rig.observed
    try:
        await rig.claim("w")
        upstream.open.clear()
        first = rig.beat("w", rig.held["w"])
        await asyncio.sleep(0.01)
        behind = rig.beat("w", "another-value")
        await asyncio.sleep(0.01)
        if seam == "submit":
            service.core.submit = _broken_once(service.core.submit)  # type: ignore[method-assign]
            broken = [rig.beat("w", rig.held["w"])]
        elif seam == "completed":
            service.core.completed = _broken_once(service.core.completed)  # type: ignore[method-assign]
            broken = [first, behind]
        else:
            service._flights = _SpawnFailsOnce(service._flights)  # type: ignore[assignment]
            broken = [behind]  # its flight is the next one spawned
        upstream.open.set()
        _done, pending = await asyncio.wait([first, behind, *broken], timeout=ANSWER_BOUND)
        assert not pending
        failed = [t.result() for t in broken]
        assert all(isinstance(r, UpstreamUnavailable) and r.status == 502 for r in failed), failed
        # Whether the beat may have reached the API: a beat the core never took in, or whose flight never
        # started, surely did not; a flight whose end could not be decided may have been applied.
        reached = [r.may_have_reached_upstream for r in failed if isinstance(r, UpstreamUnavailable)]
        assert reached == [seam == "completed"] * len(failed)
        if seam != "completed":
            # The holder's beat was out when the failsafe ran: it is answered by its flight, not failed (the
            # beat is applied upstream, and a worker told 502 would retry with a value the API moved past).
            holder = first.result()
            assert isinstance(holder, HeartbeatResult)
            assert (holder.response.status, holder.outcome) == (200, "forwarded")
        await rig.settle()
        # The lease is usable at once: the next beat goes up and is answered by the upstream.
        after = await asyncio.wait_for(rig.beat("w", upstream.current["w"]), ANSWER_BOUND)
        assert isinstance(after, HeartbeatResult)
        assert (after.response.status, after.outcome) == (200, "forwarded")
    finally:
        await service.close()
    assert observed.internal_errors == ["action" if seam == "spawn" else seam]


# -- what may be merged, and what a long-running service keeps --------------------------------------


def _call_as(work_id: str, credential: str, ttl: int | None = None) -> HeartbeatCall:
    target = f"/v1/environments/env_1/work/{work_id}/heartbeat"
    if ttl is not None:
        target += f"?desired_ttl_seconds={ttl}"
    request = UpstreamRequest("POST", target, (("x-api-key", credential),))
    return HeartbeatCall("env_1", work_id, HeartbeatQuery(None, ttl), request)


@pytest.mark.parametrize(
    ("second", "calls"),
    [
        (_call_as("w", "key-a"), 1),  # the same credential and TTL: one flight for both
        (_call_as("w", "key-b"), 2),  # another credential: never merged
        (_call_as("w", "key-a", ttl=300), 2),  # another TTL asked for: never merged
    ],
    ids=["same", "other-credential", "other-ttl"],
)
async def test_unconditional_beats_merge_only_with_the_same_credential_and_ttl(
    second: HeartbeatCall, calls: int
) -> None:
    upstream = HonestLease()
    service = CoalescingHeartbeats(upstream, HeartbeatSettings())
    try:
        upstream.open.clear()
        beats = [asyncio.ensure_future(service.heartbeat(c)) for c in (_call_as("w", "key-a"), second)]
        await asyncio.sleep(0.01)
        upstream.open.set()
        answers = await asyncio.wait_for(asyncio.gather(*beats), ANSWER_BOUND)
    finally:
        await service.close()
    assert [a.response.status for a in answers] == [200, 200]
    assert upstream.calls == calls


async def test_a_long_running_service_answers_every_beat_and_keeps_nothing_per_beat() -> None:
    upstream = HonestLease()
    service = CoalescingHeartbeats(upstream, HeartbeatSettings())
    try:
        last = NO_HEARTBEAT
        for _ in range(300):
            result = await asyncio.wait_for(service.heartbeat(call("w", last)), ANSWER_BOUND)
            assert result.answer.success is not None
            last = result.answer.success.last_heartbeat
        assert (len(service._futures), len(service._calls)) == (0, 0)
    finally:
        await service.close()
    assert upstream.calls == 300


async def test_closing_the_service_answers_every_waiting_worker() -> None:
    upstream = HonestLease()
    service = CoalescingHeartbeats(upstream, HeartbeatSettings())
    upstream.open.clear()
    waiting = [asyncio.ensure_future(service.heartbeat(call("w", NO_HEARTBEAT))) for _ in range(2)]
    await asyncio.sleep(0.01)
    await asyncio.wait_for(service.close(), ANSWER_BOUND)
    answers = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), ANSWER_BOUND)
    # The flight is cancelled at shutdown; its worker and the one queued behind it are told so, API-shaped.
    assert all(isinstance(a, UpstreamUnavailable) and a.status == 502 for a in answers), answers


# -- the driver's own decisions on a fault: each pinned by what the worker gets ----------------------


def _refusal(status: int, *headers: tuple[str, str]) -> Fault:
    body = {"type": "error", "error": {"type": "api_error", "message": "scripted"}}
    return status, body, headers


@pytest.mark.parametrize(
    ("status", "kept"),
    [(500, False), (502, False), (504, False), (503, True), (529, True), (400, True), (429, True)],
)
async def test_a_kept_answer_survives_a_refusal_but_not_a_server_error_that_may_have_applied(
    status: int, kept: bool
) -> None:
    """A worker's beat landed but the worker had gone: its answer waits for the worker's retry.

    If another beat on the lease then meets a server error, that beat may have been applied
    (the lease moved on), so handing the kept answer over could hand out a stale value: the
    retry goes to the API instead. A refusal (4xx, 503, 529) applied nothing: the answer is
    still the lease's latest, and the retry gets it at once.
    """
    rig = Rig.made()
    service, upstream = rig.service, rig.upstream
    try:
        await rig.claim("w")
        claimed = await rig.leave_a_kept_answer("w")
        upstream.faults = [_refusal(status)]  # no retry-after: passed on, never retried
        other = await asyncio.wait_for(rig.beat("w", None), ANSWER_BOUND)
        assert isinstance(other, HeartbeatResult)
        assert other.response.status == status
        retry = await asyncio.wait_for(rig.beat("w", claimed), ANSWER_BOUND)
        assert isinstance(retry, HeartbeatResult)
        if kept:
            assert (retry.outcome, retry.response.status) == ("handed_off", 200)
        else:
            # Forwarded: the API answers for itself (here the lease did move on, so a 412).
            assert (retry.outcome, retry.response.status) == ("forwarded", 412)
    finally:
        await service.close()


@pytest.mark.parametrize(("retry_after", "retried"), [(1.0, True), (1.6, False)])
async def test_a_rate_limited_beat_is_retried_only_if_the_answer_can_still_reach_its_worker(
    retry_after: float, retried: bool
) -> None:
    """With a 4 s lease the SDK worker gives a beat 2 s. A retry after 1 s comes back in time; one
    after 1.6 s (plus a round trip and the safety margin) would answer nobody, so the 429 is passed
    on at once and the worker's own retry decides, as it would going direct. The lease itself has
    time left for either: only the worker's window tells them apart."""
    rig = Rig.made(ttl=4)
    service, upstream = rig.service, rig.upstream
    try:
        await rig.claim("w")
        calls = upstream.calls
        upstream.faults = [_refusal(429, ("retry-after", str(retry_after)))]
        started = asyncio.get_running_loop().time()
        answer = await asyncio.wait_for(rig.beat("w", rig.held["w"]), ANSWER_BOUND)
        waited = asyncio.get_running_loop().time() - started
    finally:
        await service.close()
    assert isinstance(answer, HeartbeatResult)
    if retried:
        assert (answer.response.status, upstream.calls - calls) == (200, 2)
        assert waited >= retry_after
    else:
        assert (answer.response.status, upstream.calls - calls) == (429, 1)
        assert waited < 0.5


class _ExpiryClock(Observed):
    """Notes when the first expiry is reported."""

    def __init__(self) -> None:
        super().__init__()
        self.expired = asyncio.Event()
        self.expired_at = 0.0

    def lease_event(self, environment_id: str, kind: LeaseEventKind, reason: LostReason | None) -> None:
        super().lease_event(environment_id, kind, reason)
        if kind is LeaseEventKind.EXPIRED and not self.expired.is_set():
            self.expired_at = asyncio.get_running_loop().time()
            self.expired.set()


async def test_a_lease_nobody_renews_is_reported_expired_on_time() -> None:
    """The driver's one timer wakes the core when a lease may lapse: an expiry is reported when it is
    due, including one the core asks for less than a second ahead (a lease renewed in between)."""
    observed = _ExpiryClock()
    settings = HeartbeatSettings(leases=LeaseTrackingSettings(expiry_grace_seconds=0.0))
    rig = Rig.made(settings, ttl=1, observed=observed)
    service = rig.service
    try:
        await rig.claim("w")
        await asyncio.sleep(0.5)
        # Renewed half-way: the check due at 1 s finds it renewed and asks again for 0.5 s later.
        renewed_at = asyncio.get_running_loop().time()
        await asyncio.wait_for(rig.beat("w", rig.held["w"]), ANSWER_BOUND)
        await asyncio.wait_for(observed.expired.wait(), ANSWER_BOUND)
    finally:
        await service.close()
    # Due 1 s after the renewal was sent; reported then, not a timer period later.
    assert 0.9 <= observed.expired_at - renewed_at < 1.3, observed.expired_at - renewed_at


@pytest.mark.parametrize("news", ["requeued", "conflict", "confirms a kept answer"])
async def test_the_api_s_412_tells_the_gateway_what_became_of_the_lease(news: str) -> None:
    """A 412 carries the lease's current state: the gateway records the loss by its reason, shows the
    state the API reported, and keeps an answer the 412 shows is still current."""
    rig = Rig.made()
    service, upstream, observed = rig.service, rig.upstream, rig.observed
    try:
        await rig.claim("w")
        claimed = rig.held["w"]
        if news == "confirms a kept answer":
            await rig.leave_a_kept_answer("w")
            # A stale value meets the API's 412, which names the kept answer's value as current.
            stale = await asyncio.wait_for(rig.beat("w", "stale-value"), ANSWER_BOUND)
            assert isinstance(stale, HeartbeatResult)
            assert (stale.outcome, stale.response.status) == ("forwarded", 412)
            retry = await asyncio.wait_for(rig.beat("w", claimed), ANSWER_BOUND)
            assert isinstance(retry, HeartbeatResult)
            assert (retry.outcome, retry.response.status) == ("handed_off", 200)
            assert [kind for kind, _ in observed.events] == ["claimed"]
            return
        # The lease changed upstream without this gateway: requeued, or renewed by another replica.
        upstream.current["w"] = None if news == "requeued" else "hb-elsewhere"
        first = await asyncio.wait_for(rig.beat("w", claimed), ANSWER_BOUND)
        assert isinstance(first, HeartbeatResult)
        assert (first.outcome, first.response.status) == ("forwarded", 412)
        assert observed.events[-1] == ("lost", news)
        # The admin view shows the state the API reported.
        (row,) = service.leases()
        assert row.state == ("queued" if news == "requeued" else "active")
    finally:
        await service.close()
