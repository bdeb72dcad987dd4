"""The coalescing core as transcripts: a fake clock, requests in, actions out.

Each test reads like the contract point it checks ("claim at t=0, beat at
t=0.1, upstream answers at t=0.3, expect ...").

Checks `gateway/heartbeat/core.py`, `gateway/heartbeat/lease.py`, `gateway/heartbeat/table.py`,
`gateway/heartbeat/verdicts.py`, `gateway/heartbeat/local.py`, `gateway/heartbeat/actions.py`,
`gateway/heartbeat/retry.py`.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest

from gateway.config.settings import AbsorbSettings, LeaseTrackingSettings
from gateway.heartbeat.actions import (
    Action,
    Deliver,
    DeliverError,
    DeliverLocal,
    Failed,
    LeaseEvent,
    Rejected,
    Send,
    Succeeded,
    Unsuccessful,
    Wakeup,
)
from gateway.heartbeat.core import Coalescer
from gateway.heartbeat.lease import Beat
from gateway.heartbeat.retry import MAX_RETRIES, retry_delay
from gateway.heartbeat.wire import HeartbeatAnswer, LeaseEventKind
from gateway.heartbeat.worker_model import keeps_pace, worker_interval

KEY = ("env_1", "work_1")
ME = "identity-shared-token"
OTHER = "identity-sessions-token"

Core = Coalescer[str, str]


def core(**absorb: Any) -> Core:
    return Coalescer(absorb=AbsorbSettings(**absorb) if absorb else None)


def beat(waiter: int, expected: str | None, identity: str = ME, key: tuple[str, str] = KEY) -> Beat:
    return Beat(waiter, key, expected, identity)


def ok(last: str, ttl: int = 10, state: str = "active", extended: bool = True) -> Succeeded[str]:
    return Succeeded(HeartbeatAnswer(last, state, extended, ttl), f"200 {last}")


def sends(actions: list[Action[str, str]]) -> list[Send]:
    return [a for a in actions if isinstance(a, Send)]


def replies(actions: list[Action[str, str]]) -> list[tuple[int, str, object]]:
    """(waiter, outcome, what it got) for every answer in `actions`."""
    out: list[tuple[int, str, object]] = []
    for a in actions:
        if isinstance(a, Deliver):
            out.append((a.waiter, a.outcome, a.response))
        elif isinstance(a, DeliverLocal):
            out.append((a.waiter, a.outcome, a.status))
        elif isinstance(a, DeliverError):
            out.append((a.waiter, "error", a.error))
    return out


def events(actions: list[Action[str, str]]) -> list[tuple[str, str | None]]:
    return [(a.kind, a.reason) for a in actions if isinstance(a, LeaseEvent)]


def claimed(c: Core, t: float = 0.0, last: str = "T1", ttl: int = 10) -> None:
    """Worker 1 claims at `t` and gets `last`."""
    (send,) = sends(c.submit(beat(1, "NO_HEARTBEAT"), t))
    c.completed(KEY, send.flight, ok(last, ttl), t + 0.01)


# -- 1. one flight per lease, arrival order ---------------------------------------


def test_one_flight_per_lease_and_arrival_order() -> None:
    c = core()
    # t=0 beat with T0 goes upstream; t=0.1 and t=0.2 arrive while it flies.
    first = sends(c.submit(beat(1, "T0"), 0.0))
    assert len(first) == 1
    assert c.submit(beat(2, "T0"), 0.1) == []
    assert c.submit(beat(3, None), 0.2) == []
    assert c.in_flight(KEY) == 1
    # t=0.3 the upstream answers T1: waiter 1 gets it; waiter 2, whose T0 is now
    # superseded, gets a 412 from known state; waiter 3 goes up next, in order.
    actions = c.completed(KEY, first[0].flight, ok("T1"), 0.3)
    assert replies(actions) == [(1, "forwarded", "200 T1"), (2, "rejected", 412)]
    assert [s.waiter for s in sends(actions)] == [3]
    assert c.in_flight(KEY) == 1
    # Other leases are independent.
    assert len(sends(c.submit(beat(4, None, key=("env_1", "work_2")), 0.3))) == 1


# -- 2. one holder ---------------------------------------------------------------------


def test_concurrent_claims_are_never_merged_one_wins() -> None:
    c = core()
    (send,) = sends(c.submit(beat(1, "NO_HEARTBEAT"), 0.0))
    for waiter in range(2, 6):
        assert c.submit(beat(waiter, "NO_HEARTBEAT"), 0.01) == []
    actions = c.completed(KEY, send.flight, ok("T1"), 0.2)
    assert replies(actions) == [(1, "forwarded", "200 T1")] + [(w, "rejected", 412) for w in range(2, 6)]
    assert sends(actions) == []
    assert events(actions) == [("claimed", None)]
    # The local 412 has the upstream's shape, current_state included.
    body = next(a.body for a in actions if isinstance(a, DeliverLocal))
    assert body["error"]["details"]["current_state"] == {
        "state": "active",
        "last_heartbeat": "T1",
        "lease_updated_at": "T1",
        "lease_extended": False,
        "ttl_seconds": 10,
    }
    assert body["error"]["details"]["error_code"] == "heartbeat_precondition_failed"


def test_a_claim_after_the_lease_may_have_lapsed_goes_upstream() -> None:
    c = core()
    claimed(c, t=0.0, ttl=10)
    # Surely held until 0 + 10: at t=10 the lease may have lapsed and been re-queued.
    assert len(sends(c.submit(beat(2, "NO_HEARTBEAT"), 10.0))) == 1


def test_conditional_requests_never_join_an_unconditional_flight() -> None:
    c = core()
    (send,) = sends(c.submit(beat(1, None), 0.0))
    assert c.submit(beat(2, "NO_HEARTBEAT"), 0.1) == []
    actions = c.completed(KEY, send.flight, ok("T1"), 0.2)
    assert replies(actions) == [(1, "forwarded", "200 T1"), (2, "rejected", 412)]


# -- 3. undelivered-outcome handoff -------------------------------------------------------


def test_a_lost_answer_goes_to_the_retry_once() -> None:
    c = core()
    claimed(c, t=0.0, last="T1")
    # t=1 the holder beats with T1; the upstream is slow; the worker gives up at t=2.
    (send,) = sends(c.submit(beat(2, "T1"), 1.0))
    assert c.abandoned(2, 2.0) == []
    # t=2.5 the answer arrives: applied upstream, nobody to deliver to.
    assert replies(c.completed(KEY, send.flight, ok("T2"), 2.5)) == []
    # t=3 the worker retries with the same T1: it gets T2, without an upstream call.
    actions = c.submit(beat(3, "T1"), 3.0)
    assert replies(actions) == [(3, "handed_off", 200)]
    assert sends(actions) == []
    # It carries the lease as it is now: sent at t=1 with 10 s, so 8 whole seconds left.
    (handed,) = [a for a in actions if isinstance(a, DeliverLocal)]
    assert handed.body == {
        "type": "work_heartbeat",
        "last_heartbeat": "T2",
        "lease_extended": True,
        "state": "active",
        "ttl_seconds": 8,
    }
    # A second retry with T1 does not win again.
    assert replies(c.submit(beat(4, "T1"), 3.1)) == [(4, "rejected", 412)]
    # The holder carries on with T2.
    assert len(sends(c.submit(beat(5, "T2"), 4.0))) == 1


def test_a_lost_claim_goes_to_the_retry() -> None:
    c = core()
    (send,) = sends(c.submit(beat(1, "NO_HEARTBEAT"), 0.0))
    c.abandoned(1, 0.5)
    c.completed(KEY, send.flight, ok("T1"), 0.6)
    assert replies(c.submit(beat(2, "NO_HEARTBEAT"), 0.7)) == [(2, "handed_off", 200)]


def test_no_handoff_once_the_lease_may_have_lapsed_or_to_another_identity() -> None:
    c = core()
    claimed(c, last="T1", ttl=10)
    (send,) = sends(c.submit(beat(2, "T1"), 1.0))
    c.abandoned(2, 1.5)
    c.completed(KEY, send.flight, ok("T2", ttl=10), 1.6)
    # Another credential presenting T1 is not the worker that lost the answer.
    (other,) = sends(c.submit(beat(3, "T1", identity=OTHER), 2.0))
    assert other.waiter == 3  # the upstream decides, not the kept answer
    c.completed(KEY, other.flight, Rejected("412", "active", "T2"), 2.1)
    # With less than a second surely left (sent at 1.0 with 10 s), it would lapse
    # before the worker could beat again: the request goes upstream instead.
    late = c.submit(beat(4, "T1"), 10.1)
    assert [s.waiter for s in sends(late)] == [4]


def test_an_answer_that_could_not_be_written_is_kept_for_the_retry() -> None:
    c = core()
    claimed(c, last="T1")
    (send,) = sends(c.submit(beat(2, "T1"), 1.0))
    assert replies(c.completed(KEY, send.flight, ok("T2"), 1.1)) == [(2, "forwarded", "200 T2")]
    c.unwritten(2, KEY, 1.2)  # the driver could not write it: the worker was gone
    assert replies(c.submit(beat(3, "T1"), 1.3)) == [(3, "handed_off", 200)]


def test_a_412_that_confirms_the_kept_answer_keeps_it() -> None:
    c = core()
    claimed(c, last="T1")
    (send,) = sends(c.submit(beat(2, "T1"), 1.0))
    c.abandoned(2, 1.1)
    c.completed(KEY, send.flight, ok("T2"), 1.2)
    # A beat from elsewhere with an unknown value goes up and gets a 412 showing T2 is current.
    (rival,) = sends(c.submit(beat(3, "T9"), 1.3))
    c.completed(KEY, rival.flight, Rejected("412", "active", "T2"), 1.4)
    assert replies(c.submit(beat(4, "T1"), 1.5)) == [(4, "handed_off", 200)]


# -- 4. joins ---------------------------------------------------------------------------------


def test_unconditional_beats_join_the_flight_and_share_its_result() -> None:
    c = core()
    (send,) = sends(c.submit(beat(1, None), 0.0))
    assert c.submit(beat(2, None), 0.1) == []
    assert c.submit(beat(3, None), 0.2) == []
    assert c.submit(beat(4, None, identity=OTHER), 0.2) == []  # another credential waits its turn
    actions = c.completed(KEY, send.flight, ok("T1"), 0.3)
    assert replies(actions) == [(1, "forwarded", "200 T1"), (2, "joined", "200 T1"), (3, "joined", "200 T1")]
    assert [s.waiter for s in sends(actions)] == [4]


def test_a_joiner_that_leaves_is_not_answered_and_errors_reach_every_waiter() -> None:
    c = core()
    (send,) = sends(c.submit(beat(1, None), 0.0))
    c.submit(beat(2, None), 0.1)
    c.submit(beat(3, None), 0.1)
    c.abandoned(2, 0.2)
    actions = c.completed(KEY, send.flight, Failed("reset"), 0.3)
    assert replies(actions) == [(1, "error", "reset"), (3, "error", "reset")]


# -- 5. absorption --------------------------------------------------------------------------------


def test_absorption_answers_the_holder_locally_within_the_signal_delay() -> None:
    c = core(enabled=True, max_signal_delay_seconds=2.0, min_remaining_fraction=0.5)
    claimed(c, t=0.0, last="T1", ttl=300)
    actions = c.submit(beat(2, "T1"), 0.25)
    assert sends(actions) == []
    (local,) = [a for a in actions if isinstance(a, DeliverLocal)]
    assert (local.outcome, local.status) == ("absorbed", 200)
    # Sent at t=0 with a 300 s TTL: 299.75 s surely left, reported as 299 whole seconds.
    assert local.body == {
        "type": "work_heartbeat",
        "last_heartbeat": "T1",
        "lease_extended": True,
        "state": "active",
        "ttl_seconds": 299,
    }
    # At t=2 the last upstream success is as old as the allowed signal delay: forwarded.
    assert len(sends(c.submit(beat(3, "T1"), 2.0))) == 1


def test_absorption_forwards_when_too_little_of_the_lease_is_left() -> None:
    c = core(enabled=True, max_signal_delay_seconds=400.0, min_remaining_fraction=0.5)
    claimed(c, t=0.0, last="T1", ttl=300)
    assert replies(c.submit(beat(2, "T1"), 149.9))[0][1] == "absorbed"
    assert len(sends(c.submit(beat(3, "T1"), 150.1))) == 1  # 149.9 s left < half of 300


def test_absorption_never_shortens_an_sdk_workers_pace() -> None:
    """An absorbed answer sets the worker's next interval and per-beat timeout (clamp(ttl/2, 1, 30)):
    it is given only where that is no shorter than the upstream's own answer would set."""
    # A 10 s lease: the upstream's answer gives a 5 s interval; 9 s left would give 4.5 s. Forwarded.
    short = core(enabled=True, max_signal_delay_seconds=5.0, min_remaining_fraction=0.1)
    claimed(short, ttl=10)
    assert len(sends(short.submit(beat(2, "T1"), 0.5))) == 1
    # A 100 s lease: 30 s either way while at least 60 s are left to promise, then forwarded.
    long = core(enabled=True, max_signal_delay_seconds=100.0, min_remaining_fraction=0.1)
    claimed(long, ttl=100)
    assert replies(long.submit(beat(2, "T1"), 39.0)) == [(2, "absorbed", 200)]
    assert len(sends(long.submit(beat(3, "T1"), 40.5))) == 1  # 59 s left would mean a 29.5 s interval


def test_a_slow_upstream_widens_the_margin_absorption_leaves() -> None:
    """After the worker's next interval, an absorbed lease must leave twice the recent upstream latency."""
    fast = core(enabled=True, max_signal_delay_seconds=300.0, min_remaining_fraction=0.1)
    claimed(fast, ttl=300)  # answered in 10 ms
    assert replies(fast.submit(beat(2, "T1"), 151.0)) == [(2, "absorbed", 200)]
    slow = core(enabled=True, max_signal_delay_seconds=300.0, min_remaining_fraction=0.1)
    (send,) = sends(slow.submit(beat(1, "NO_HEARTBEAT"), 0.0))
    slow.completed(KEY, send.flight, ok("T1", ttl=300), 60.0)  # answered in 60 s: the margin is 120 s
    # 170 s left at 130: 140 s after the worker's next 30 s interval, more than 120. Absorbed.
    assert replies(slow.submit(beat(2, "T1"), 130.0)) == [(2, "absorbed", 200)]
    # 149 s left at 151: 119 s after the interval, less than 120. Forwarded.
    assert len(sends(slow.submit(beat(3, "T1"), 151.0))) == 1


def test_absorption_needs_the_current_value_and_the_same_identity() -> None:
    c = core(enabled=True, max_signal_delay_seconds=5.0)
    claimed(c, last="T1")
    assert len(sends(c.submit(beat(2, "T1", identity=OTHER), 0.1))) == 1
    off = core()
    claimed(off, last="T1")
    assert len(sends(off.submit(beat(2, "T1"), 0.1))) == 1  # off by default


def test_a_stopping_answer_is_never_absorbed() -> None:
    c = core(enabled=True, max_signal_delay_seconds=0.5)
    claimed(c, last="T1")
    (send,) = sends(c.submit(beat(2, "T1"), 1.0))
    actions = c.completed(KEY, send.flight, ok("T2", state="stopping"), 1.1)
    assert events(actions) == [("stopping", None)]
    # Every beat after a stopping answer goes upstream.
    assert len(sends(c.submit(beat(3, "T2"), 1.2))) == 1


def test_a_stop_passing_through_drops_what_was_known() -> None:
    c = core(enabled=True, max_signal_delay_seconds=5.0)
    claimed(c, last="T1")
    c.stop_seen(KEY, 0.5)
    assert len(sends(c.submit(beat(2, "T1"), 0.6))) == 1


# -- 6. no unasked renewals ------------------------------------------------------------------


def test_nobody_waiting_means_nothing_is_sent() -> None:
    c = core()
    claimed(c, last="T1")
    (send,) = sends(c.submit(beat(2, "T1"), 1.0))
    c.submit(beat(3, None), 1.1)
    c.abandoned(3, 1.2)  # left while queued: its request is never sent
    c.abandoned(2, 1.3)
    assert not c.flight_wanted(KEY, send.flight)  # no retry either
    assert sends(c.completed(KEY, send.flight, ok("T2"), 1.4)) == []
    # Time passing never sends anything.
    for t in range(2, 400):
        assert sends(c.tick(float(t))) == []


# -- 7. what reaches the worker unchanged, and what drops known state ---------------------------


def test_412s_and_refused_renewals_pass_unchanged_and_drop_state() -> None:
    c = core(enabled=True, max_signal_delay_seconds=0.5)
    claimed(c, last="T1")
    (send,) = sends(c.submit(beat(2, "T1"), 1.0))
    actions = c.completed(KEY, send.flight, ok("T2", extended=False), 1.1)
    assert replies(actions) == [(2, "forwarded", "200 T2")]
    assert events(actions) == [("lost", "not_extended")]
    assert len(sends(c.submit(beat(3, "T2"), 1.2))) == 1  # not absorbed: state dropped

    c = core(enabled=True, max_signal_delay_seconds=0.5)
    claimed(c, last="T1")
    (send,) = sends(c.submit(beat(2, "T1"), 1.0))
    actions = c.completed(KEY, send.flight, Rejected("412 body", "queued", None), 1.1)
    assert replies(actions) == [(2, "forwarded", "412 body")]
    assert events(actions) == [("lost", "requeued")]


def test_upstream_errors_drop_known_state() -> None:
    for outcome in (Unsuccessful("500 body"), Failed("timeout")):
        c = core(enabled=True, max_signal_delay_seconds=5.0)
        claimed(c, last="T1")
        (send,) = sends(c.submit(beat(2, None), 1.0))
        c.completed(KEY, send.flight, outcome, 1.1)
        assert len(sends(c.submit(beat(3, "T1"), 1.2))) == 1


# -- 8. retries ---------------------------------------------------------------------------------


def test_retry_delays() -> None:
    # Exponential, full jitter.
    assert retry_delay(0, retry_after=None, time_left=None, draw=1.0) == 0.1
    assert retry_delay(2, retry_after=None, time_left=None, draw=0.5) == 0.2
    # A server's retry-after is honoured, only while the lease surely has time left.
    assert retry_delay(0, retry_after=1.0, time_left=5.0, draw=0.0) == 1.0
    assert retry_delay(0, retry_after=5.0, time_left=5.0, draw=0.0) is None
    assert retry_delay(0, retry_after=30.0, time_left=None, draw=0.0) is None
    assert retry_delay(MAX_RETRIES, retry_after=None, time_left=100.0, draw=0.5) is None


# -- lease table ------------------------------------------------------------------------------


def test_a_lease_nobody_renews_is_recorded_as_expired_then_forgotten() -> None:
    c: Core = Coalescer(
        tracking=LeaseTrackingSettings(max_tracked=10, retention_seconds=60.0, expiry_grace_seconds=5.0)
    )
    claimed(c, t=0.0, ttl=10)
    # Not lapsed yet: nothing happens, and the core asks again for the time it will have.
    assert c.tick(14.9) == [Wakeup(15.0)]
    assert events(c.tick(15.0)) == [("expired", None)]
    (view,) = list(c.leases(15.0))
    assert (view.state, view.seconds_left) == ("expired", None)
    c.tick(74.9)
    assert len(c) == 1
    c.tick(75.0)
    assert len(c) == 0


def test_a_renewed_lease_does_not_expire() -> None:
    c: Core = Coalescer(tracking=LeaseTrackingSettings(expiry_grace_seconds=1.0))
    claimed(c, t=0.0, last="T1", ttl=10)
    (send,) = sends(c.submit(beat(2, "T1"), 8.0))
    c.completed(KEY, send.flight, ok("T2", ttl=10), 8.1)
    # Renewed: no event, and the next check moves to the new lease's end (sent 8 + 10 + grace 1).
    assert c.tick(12.0) == [Wakeup(19.0)]
    (view,) = list(c.leases(12.0))
    assert view.state == "active"
    assert view.seconds_left == 6.0  # sent at 8 with 10 s
    assert view.last_heartbeat == "T2"


def test_the_table_is_bounded_and_evictions_are_counted() -> None:
    c: Core = Coalescer(tracking=LeaseTrackingSettings(max_tracked=100))
    evicted = []
    for i in range(250):
        key = ("env_1", f"work_{i}")
        (send,) = sends(c.submit(beat(i, None, key=key), float(i)))
        actions = c.completed(key, send.flight, ok(f"T{i}"), float(i))
        evicted += [a.key for a in actions if isinstance(a, LeaseEvent) and a.kind is LeaseEventKind.EVICTED]
    assert len(c) <= 100
    # Each eviction is an event naming the lease, so the driver counts and logs it as it happens.
    assert len(evicted) >= 150
    assert len(set(evicted)) == len(evicted)
    assert {v.work_id for v in c.leases(250.0)}.isdisjoint(work for _, work in evicted)


def test_a_credential_that_never_succeeded_gets_no_local_answer() -> None:
    c = core(enabled=True, max_signal_delay_seconds=5.0)
    claimed(c, last="T1")
    # Same lease, another credential (perhaps one the upstream will refuse): upstream decides.
    assert len(sends(c.submit(beat(2, "NO_HEARTBEAT", identity=OTHER), 0.1))) == 1


@pytest.mark.parametrize("may_have_applied", [True, False])
def test_a_kept_answer_survives_only_errors_that_surely_did_not_apply(may_have_applied: bool) -> None:
    c = core()
    claimed(c, last="T1")
    (send,) = sends(c.submit(beat(2, "T1"), 1.0))
    c.abandoned(2, 1.1)
    c.completed(KEY, send.flight, ok("T2"), 1.2)
    # An unconditional beat fails: if it may have reached the upstream, the lease may be at T3 now.
    (send,) = sends(c.submit(beat(3, None), 1.3))
    c.completed(KEY, send.flight, Failed("lost", may_have_applied=may_have_applied), 1.4)
    retry = c.submit(beat(4, "T1"), 1.5)
    if may_have_applied:
        assert [s.waiter for s in sends(retry)] == [4]
    else:
        assert replies(retry) == [(4, "handed_off", 200)]


def test_an_answer_to_a_beat_in_flight_during_a_stop_is_not_kept() -> None:
    c = core(enabled=True, max_signal_delay_seconds=5.0)
    claimed(c, last="T1")
    (send,) = sends(c.submit(beat(2, None), 1.0))
    c.stop_seen(KEY, 1.1)  # the stop passes through while the beat is out
    c.completed(KEY, send.flight, ok("T2"), 1.2)
    assert len(sends(c.submit(beat(3, "T2"), 1.3))) == 1  # not absorbed


def test_a_busy_lease_keeps_one_pending_check() -> None:
    c: Core = Coalescer(tracking=LeaseTrackingSettings(retention_seconds=1.0, expiry_grace_seconds=1.0))
    claimed(c, t=0.0, last="T0", ttl=2)
    last = "T0"
    for i in range(1, 3000):
        t = float(i)
        (send,) = sends(c.submit(beat(i + 10, last), t))
        c.tick(t + 0.5)
        last = f"T{i}"
        c.completed(KEY, send.flight, ok(last, ttl=2), t + 0.6)
    assert c.table.pending_checks < 10


# -- lanes: no other credential delays the holder ---------------------------------------

JUNK = "identity-junk-bearer"


def junk(waiter: int, expected: str | None, identity: str = JUNK) -> Beat:
    return Beat(waiter, KEY, expected, identity, vouched=False)


def test_a_credential_nobody_vouches_for_gets_its_own_lane_and_never_delays_the_holder() -> None:
    c = core()
    claimed(c)
    # A junk beat goes out at once, in a side lane...
    (side,) = sends(c.submit(junk(2, "T1"), 1.0))
    assert not side.main
    # ...and the holder's beat does not wait for it.
    (main,) = sends(c.submit(beat(3, "T1"), 1.1))
    assert main.main
    assert c.in_flight(KEY) == 2
    junk_401 = Unsuccessful("401 junk")
    assert replies(c.completed(KEY, side.flight, junk_401, 1.2)) == [(2, "forwarded", "401 junk")]
    assert replies(c.completed(KEY, main.flight, ok("T2"), 1.3)) == [(3, "forwarded", "200 T2")]


def test_side_lanes_are_bounded_per_credential_and_per_lease() -> None:
    c = core()
    claimed(c)
    first = sends(c.submit(junk(10, "T1", "j0"), 1.0))
    assert len(first) == 1
    # One credential: one flight and a short queue, then local 429s.
    assert sends(c.submit(junk(11, "T1", "j0"), 1.0)) == []
    assert sends(c.submit(junk(12, "T1", "j0"), 1.0)) == []
    assert replies(c.submit(junk(13, "T1", "j0"), 1.0)) == [(13, "throttled", 429)]
    # A few credentials per lease get a lane; any other beat is sent on its own (no lane, no queue),
    # as it would go directly, on the general capacity class.
    for n, identity in enumerate(("j1", "j2", "j3")):
        assert len(sends(c.submit(junk(20 + n, "T1", identity), 1.0))) == 1
    (alone,) = sends(c.submit(junk(30, "T1", "j4"), 1.0))
    assert not alone.main
    (again,) = sends(c.submit(junk(31, "T1", "j4"), 1.0))  # not queued behind its first: nothing is kept
    assert again.flight != alone.flight
    # The holder is never throttled by any of this.
    (main,) = sends(c.submit(beat(40, "T1"), 1.0))
    assert main.main
    # A queued side beat goes when its credential's flight comes back.
    (following,) = sends(c.completed(KEY, first[0].flight, Unsuccessful("401"), 1.1))
    assert (following.waiter, following.main) == (11, False)


def test_the_main_lane_queue_is_bounded_too() -> None:
    c = core()
    claimed(c)
    assert len(sends(c.submit(beat(2, "T1"), 1.0))) == 1
    for n in range(32):
        assert c.submit(beat(100 + n, "T1"), 1.0) == []
    assert replies(c.submit(beat(200, "T1"), 1.0)) == [(200, "throttled", 429)]


def test_the_holders_beat_never_waits_behind_a_flood_of_beats_that_do_not_present_the_current_value() -> None:
    """Issue 19: 32 beats with a valid token and stale or no values fill the queue; the holder still goes next."""
    c = core()
    claimed(c)
    (out,) = sends(c.submit(beat(2, "T1"), 1.0))  # the holder's beat, slow upstream
    for n in range(16):
        assert c.submit(beat(100 + n, "stale"), 1.0) == []
        assert c.submit(beat(200 + n, None), 1.0) == []
    c.abandoned(2, 5.0)  # the holder gave up on it and retries with the value it holds
    # The queue is full: the holder's retry takes the place of the newest of the flood, and goes first.
    assert replies(c.submit(beat(3, "T1"), 5.0)) == [(215, "throttled", 429)]
    # Current beats keep their order among themselves; again the newest of the flood makes room.
    assert replies(c.submit(beat(4, "T1"), 5.1)) == [(115, "throttled", 429)]
    done = c.completed(KEY, out.flight, ok("T2"), 5.2)
    # The first beat presenting the current value gets the answer its holder missed; the second is told
    # at once that the value is superseded; only then does the flood go up, one beat at a time.
    assert replies(done) == [(3, "handed_off", 200), (4, "rejected", 412)]
    assert [s.waiter for s in sends(done)] == [100]


def test_nothing_is_answered_locally_while_a_side_flight_may_move_the_lease() -> None:
    c = core(enabled=True, max_signal_delay_seconds=5.0, min_remaining_fraction=0.1)
    claimed(c, ttl=300)
    assert replies(c.submit(beat(2, "T1"), 0.5)) == [(2, "absorbed", 200)]
    (side,) = sends(c.submit(junk(3, "T1", OTHER), 0.6))
    # The other credential's beat may renew the lease for someone else: the holder's goes upstream.
    (main,) = sends(c.submit(beat(4, "T1"), 0.7))
    assert main.main
    # It did: that credential holds the lease now, and nothing older is repeated locally.
    assert replies(c.completed(KEY, side.flight, ok("T2"), 0.8)) == [(3, "forwarded", "200 T2")]
    c.completed(KEY, main.flight, Rejected("412", "active", "T2"), 0.9)
    (again,) = sends(c.submit(beat(5, "T2", OTHER), 1.0))
    assert again.main  # the new holder's credential is in the main lane now
    assert c.holder(KEY) == OTHER


def test_a_main_success_that_overlapped_a_side_success_is_not_kept() -> None:
    c = core(enabled=True, max_signal_delay_seconds=5.0, min_remaining_fraction=0.1)
    claimed(c, ttl=10)
    (main,) = sends(c.submit(beat(2, None), 1.0))  # an unconditional beat
    (side,) = sends(c.submit(junk(3, None, OTHER), 1.0))
    c.completed(KEY, side.flight, ok("T2"), 1.1)
    c.completed(KEY, main.flight, ok("T3"), 1.2)
    # Which of T2 and T3 the upstream holds now is not known here: no local answer on either.
    assert len(sends(c.submit(beat(4, "T3"), 1.3))) == 1


def test_leases_no_upstream_confirmed_leave_the_table_and_never_evict_real_ones() -> None:
    c: Core = Coalescer(tracking=LeaseTrackingSettings(max_tracked=2))
    for n in range(2):
        key = ("env_1", f"real_{n}")
        (send,) = sends(c.submit(Beat(n, key, "NO_HEARTBEAT", ME), 0.0))
        c.completed(key, send.flight, ok(f"R{n}"), 0.1)
    actions: list[Action[str, str]] = []
    for n in range(50):
        key = ("env_1", f"junk_{n}")
        (send,) = sends(c.submit(Beat(100 + n, key, "NO_HEARTBEAT", JUNK, vouched=False), 1.0))
        actions += c.completed(key, send.flight, Unsuccessful("401"), 1.1)
    assert sorted(v.work_id for v in c.leases(2.0)) == ["real_0", "real_1"]
    assert events(actions) == []


def test_a_retry_must_come_back_within_the_waiting_workers_interval() -> None:
    c = core()
    claimed(c, ttl=8)  # the SDK then beats every 4 s, and gives a beat 4 s
    (send,) = sends(c.submit(beat(2, "T1"), 10.0))
    assert c.retry_deadline(KEY, send.flight) == pytest.approx(14.0)
    # Nobody waits any more: no deadline, nothing to retry for.
    c.abandoned(2, 11.0)
    assert c.retry_deadline(KEY, send.flight) is None
    # Before any answer the SDK gives a beat 30 s.
    fresh = ("env_1", "work_new")
    (claim,) = sends(c.submit(Beat(3, fresh, "NO_HEARTBEAT", ME), 0.0))
    assert c.retry_deadline(fresh, claim.flight) == pytest.approx(30.0)


def test_retry_delays_respect_the_window() -> None:
    assert retry_delay(0, retry_after=1.0, time_left=None, draw=0.0, window_left=3.0) == 1.0
    assert retry_delay(0, retry_after=1.0, time_left=None, draw=0.0, window_left=1.2) is None
    assert retry_delay(0, retry_after=1.0, time_left=20.0, draw=0.0, window_left=None) == 1.0


def test_a_side_success_alone_on_the_lease_is_kept_for_its_now_holding_credential() -> None:
    """A holder the gateway could not vouch for (a sessions token issued before a restart) loses nothing:
    with no other flight out, its answer is as current as any, and is handed to its retry."""
    c = core()
    (claim,) = sends(c.submit(junk(1, "NO_HEARTBEAT", OTHER), 0.0))
    assert not claim.main
    c.abandoned(1, 0.5)  # the worker gave up before the answer came
    c.completed(KEY, claim.flight, ok("T1", ttl=10), 0.6)
    assert c.holder(KEY) == OTHER
    # Its retry presents the same claim with the same credential: the lost answer, once.
    assert replies(c.submit(junk(2, "NO_HEARTBEAT", OTHER), 0.7)) == [(2, "handed_off", 200)]
    # Had another flight overlapped it, nothing would be kept.
    d = core()
    (first,) = sends(d.submit(junk(1, "NO_HEARTBEAT", OTHER), 0.0))
    assert len(sends(d.submit(junk(2, "NO_HEARTBEAT", JUNK), 0.0))) == 1
    d.abandoned(1, 0.5)
    d.completed(KEY, first.flight, ok("T1", ttl=10), 0.6)
    assert len(sends(d.submit(junk(3, "NO_HEARTBEAT", OTHER), 0.7))) == 1


def test_the_core_asks_to_be_woken_when_a_lease_may_lapse_and_never_needs_polling() -> None:
    """Every deadline the core keeps is announced as a Wakeup once, when it becomes the earliest."""
    c: Core = Coalescer(tracking=LeaseTrackingSettings(retention_seconds=60.0, expiry_grace_seconds=1.0))
    # A first beat creates the lease's row, unconfirmed: nothing to wake for (it goes when idle).
    first = c.submit(beat(1, "NO_HEARTBEAT"), 0.0)
    assert [a for a in first if isinstance(a, Wakeup)] == []
    (send,) = sends(first)
    # Granted for 10 s: the lease may lapse at 0 + 10 + 1, earlier than any wakeup asked for.
    granted = c.completed(KEY, send.flight, ok("T1", ttl=10), 0.2)
    assert [a for a in granted if isinstance(a, Wakeup)] == [Wakeup(11.0)]
    # A renewal pushes the lease's end later, but the wakeup at 11 stands: no new one is asked.
    (send,) = sends(c.submit(beat(2, "T1"), 5.0))
    assert not any(isinstance(a, Wakeup) for a in c.completed(KEY, send.flight, ok("T2", ttl=10), 5.1))
    # At 11 the core sees the renewal and asks for the renewed lease's end; at that end it lapses.
    assert c.tick(11.0) == [Wakeup(16.0)]
    lapsed = c.tick(16.0)
    assert events(lapsed) == [("expired", None)]
    # Then only forgetting the row is left, after the retention time.
    assert [a for a in lapsed if isinstance(a, Wakeup)] == [Wakeup(76.0)]


def test_junk_credentials_filling_the_side_lanes_never_lock_out_an_honest_unvouched_worker() -> None:
    """A worker sending its own environment key (passed through, so not vouched for) while four junk
    Bearers keep their lanes busy: its claim goes upstream, and once accepted it is the holder."""
    c = core()
    key = ("env_1", "work_honest")
    for n in range(4):
        assert len(sends(c.submit(Beat(100 + n, key, "NO_HEARTBEAT", f"junk-{n}", vouched=False), 0.0))) == 1
    (claim,) = sends(c.submit(Beat(1, key, "NO_HEARTBEAT", "own-key", vouched=False), 0.1))
    assert replies(c.completed(key, claim.flight, ok("T1", ttl=300), 0.2)) == [(1, "forwarded", "200 T1")]
    assert c.holder(key) == "own-key"
    (echo,) = sends(c.submit(Beat(2, key, "T1", "own-key", vouched=False), 30.0))
    assert echo.main  # the holder's credential: the main lane, whatever the junk does


def test_a_junk_flood_leaves_nothing_behind_in_the_table_or_its_schedule() -> None:
    c = core()
    claimed(c, ttl=300)
    for n in range(5000):
        key = ("env_1", f"junk_{n}")
        (send,) = sends(c.submit(Beat(10 + n, key, "NO_HEARTBEAT", JUNK, vouched=False), 1.0))
        c.completed(key, send.flight, Unsuccessful("401"), 1.01)
    assert len(c) == 1
    assert c.table.pending_checks <= 2  # the real lease's own checks only


def test_a_lapse_is_recorded_even_while_other_credentials_keep_beating_the_lease() -> None:
    c = core()
    claimed(c, t=0.0, ttl=10)
    lapsed = []
    for t in range(1, 40):
        # A junk Bearer beats the held work id every second; the holder has stopped beating.
        (send,) = sends(c.submit(junk(100 + t, "T1", "junk"), float(t)))
        lapsed += events(c.completed(KEY, send.flight, Unsuccessful("401"), t + 0.01))
        lapsed += events(c.tick(t + 0.5))
    assert lapsed == [("expired", None)]


# -- edges the mutation run found untested (docs/mutation-testing.md) ---------------------------


def test_retry_delay_boundaries() -> None:
    # retry-after plus half the jitter drawn: a fleet told "1 s" does not come back in step.
    assert retry_delay(0, retry_after=1.0, time_left=None, draw=1.0) == 1.0 + 0.1 / 2
    # A retry landing exactly at the end of the budget is not tried: it would land as the lease lapses.
    assert retry_delay(0, retry_after=1.0, time_left=1.5, draw=0.0) is None
    # A known lease bounds the budget even below the unknown-lease budget.
    assert retry_delay(0, retry_after=2.0, time_left=2.4, draw=0.0) is None


def test_a_renewal_inside_the_grace_window_is_no_lapse() -> None:
    c: Core = Coalescer(tracking=LeaseTrackingSettings(expiry_grace_seconds=5.0))
    claimed(c, t=0.0, last="T1", ttl=10)
    (send,) = sends(c.submit(beat(2, "T1"), 6.0))
    c.completed(KEY, send.flight, ok("T2", ttl=10), 6.1)
    # The check asked for at 15 (sent 0 + 10 + 5) finds the lease renewed at 6: it looks again at 21.
    assert c.tick(15.0) == [Wakeup(21.0)]


def test_a_lapse_while_the_holders_beat_is_out_is_looked_at_again_not_recorded() -> None:
    c: Core = Coalescer(tracking=LeaseTrackingSettings(expiry_grace_seconds=1.0))
    claimed(c, t=0.0, last="T1", ttl=10)
    (send,) = sends(c.submit(beat(2, "T1"), 10.5))  # out, nothing queued behind it
    assert events(c.tick(11.0)) == []
    # It came back a success: renewed, nothing was lost.
    c.completed(KEY, send.flight, ok("T2", ttl=10), 11.5)
    assert events(c.tick(12.0)) == []


def test_an_expired_lease_keeps_its_ttl_in_the_table_and_the_event_names_it() -> None:
    c: Core = Coalescer(tracking=LeaseTrackingSettings(expiry_grace_seconds=5.0))
    claimed(c, t=0.0, ttl=10)
    (event,) = [a for a in c.tick(15.0) if isinstance(a, LeaseEvent)]
    assert (event.key, event.kind) == (KEY, LeaseEventKind.EXPIRED)
    (view,) = list(c.leases(15.0))
    assert (view.state, view.ttl_seconds) == ("expired", 10)


def test_a_forgotten_lease_frees_its_row_for_the_next() -> None:
    """A lease that expired and was forgotten no longer counts toward the cap, nor is it evicted again."""
    c: Core = Coalescer(tracking=LeaseTrackingSettings(max_tracked=2, retention_seconds=60.0, expiry_grace_seconds=5.0))

    def claim(n: int, t: float) -> list[tuple[tuple[str, str], LeaseEventKind]]:
        key = ("env_1", f"work_{n}")
        (send,) = sends(c.submit(beat(n, "NO_HEARTBEAT", key=key), t))
        return [
            (a.key, a.kind) for a in c.completed(key, send.flight, ok(f"T{n}", ttl=100), t) if isinstance(a, LeaseEvent)
        ]

    claimed(c, t=0.0, ttl=10)
    claim(2, 70.0)
    c.tick(15.0)  # the first lease expired
    c.tick(75.0)  # and is forgotten: one row left, of two
    assert len(c) == 1
    assert claim(3, 76.0) == [(("env_1", "work_3"), LeaseEventKind.CLAIMED)]  # room: no eviction
    # Full now: the next claim evicts the lease beaten longest ago, never the forgotten one again.
    assert claim(4, 77.0) == [
        (("env_1", "work_4"), LeaseEventKind.CLAIMED),
        (("env_1", "work_2"), LeaseEventKind.EVICTED),
    ]


def test_after_a_stop_neither_a_412_nor_a_lapse_counts_as_a_loss() -> None:
    c: Core = Coalescer(tracking=LeaseTrackingSettings(expiry_grace_seconds=1.0))
    claimed(c, t=0.0, last="T1", ttl=10)
    (send,) = sends(c.submit(beat(2, "T1"), 1.0))
    c.stop_seen(KEY, 1.1)  # while the beat is out
    done = c.completed(KEY, send.flight, ok("T2", ttl=10), 1.2)
    assert replies(done) == [(2, "forwarded", "200 T2")]
    assert c.lease_time_left(KEY, 1.3) is None  # an answer that may predate the stop is not kept
    (send,) = sends(c.submit(beat(3, "T2"), 2.0))
    rejected = Rejected("412", "stopped", "T2")
    assert events(c.completed(KEY, send.flight, rejected, 2.1)) == []
    assert events(c.tick(30.0)) == []


def test_an_unwritten_success_is_kept_only_for_its_own_waiter_and_only_with_time_to_use_it() -> None:
    c = core()
    claimed(c, t=0.0, last="T1", ttl=10)
    (send,) = sends(c.submit(beat(2, "T1"), 1.0))
    c.completed(KEY, send.flight, ok("T2", ttl=10), 1.1)
    c.unwritten(99, KEY, 1.2)  # not the waiter it was delivered to: nothing changes
    assert replies(c.submit(beat(3, "T1"), 1.3)) == [(3, "rejected", 412)]
    # Delivered to 4, unwritten with exactly the handoff minimum left (sent 2 + 10 - 11): kept.
    (send,) = sends(c.submit(beat(4, "T2"), 2.0))
    c.completed(KEY, send.flight, ok("T3", ttl=10), 2.1)
    c.unwritten(4, KEY, 11.0)
    assert replies(c.submit(beat(5, "T2"), 11.0)) == [(5, "handed_off", 200)]


def test_an_unconditional_success_is_never_handed_off() -> None:
    c = core()
    claimed(c, t=0.0, last="T1", ttl=10)
    (send,) = sends(c.submit(beat(2, None), 1.0))
    c.completed(KEY, send.flight, ok("T2", ttl=10), 1.1)
    c.unwritten(2, KEY, 1.2)
    assert len(sends(c.submit(beat(3, None), 1.3))) == 1  # goes upstream: nothing kept to hand over


def test_a_side_success_alone_is_delivered_with_its_events_and_kept_for_its_credential() -> None:
    c = core(enabled=True, max_signal_delay_seconds=100.0, min_remaining_fraction=0.1)
    (claim,) = sends(c.submit(junk(1, "NO_HEARTBEAT", OTHER), 0.0))
    done = c.completed(KEY, claim.flight, ok("T1", ttl=300), 0.1)
    assert replies(done) == [(1, "forwarded", "200 T1")]
    assert events(done) == [("claimed", None)]
    # Its credential holds the lease now, and its answer is as current as a main-lane one: absorbed.
    assert replies(c.submit(junk(2, "T1", OTHER), 1.0)) == [(2, "absorbed", 200)]
    # The worker paces itself by the answer it was given (TTL 10 s: a beat every 5 s, each bounded by 5 s),
    # and a retry of its next beat must come back within that.
    d = core()
    (claim,) = sends(d.submit(junk(1, "NO_HEARTBEAT", OTHER), 0.0))
    d.completed(KEY, claim.flight, ok("T1", ttl=10), 0.1)
    (send,) = sends(d.submit(junk(2, None, OTHER), 1.0))
    assert d.retry_deadline(KEY, send.flight) == 1.0 + 5.0


def test_a_side_success_that_went_unwritten_is_handed_to_its_retry() -> None:
    c = core()
    (claim,) = sends(c.submit(junk(1, "NO_HEARTBEAT", OTHER), 0.0))
    c.completed(KEY, claim.flight, ok("T1", ttl=30), 0.1)
    c.unwritten(1, KEY, 0.2)  # delivered, but the worker had gone
    assert replies(c.submit(junk(2, "NO_HEARTBEAT", OTHER), 0.3)) == [(2, "handed_off", 200)]


def test_a_side_success_is_not_kept_after_a_stop_or_when_it_did_not_have_the_lease_alone() -> None:
    c = core(enabled=True, max_signal_delay_seconds=100.0, min_remaining_fraction=0.1)
    (claim,) = sends(c.submit(junk(1, "NO_HEARTBEAT", OTHER), 0.0))
    c.stop_seen(KEY, 0.05)
    c.completed(KEY, claim.flight, ok("T1", ttl=300), 0.1)
    assert len(sends(c.submit(junk(2, "T1", OTHER), 1.0))) == 1  # not absorbed: goes upstream
    d = core(enabled=True, max_signal_delay_seconds=100.0, min_remaining_fraction=0.1)
    claimed(d, t=0.0, last="T0", ttl=300)
    (main,) = sends(d.submit(beat(2, None), 1.0))
    (side,) = sends(d.submit(junk(3, None, OTHER), 1.0))  # overlaps the holder's beat
    d.completed(KEY, main.flight, Failed("refused", may_have_applied=False), 1.1)
    d.completed(KEY, side.flight, ok("T1", ttl=300), 1.2)
    assert len(sends(d.submit(junk(4, "T1", OTHER), 2.0))) == 1  # not absorbed either


def test_a_side_412_that_shows_the_lease_moved_drops_what_was_known() -> None:
    for state, current in (("active", "T9"), ("queued", None)):
        c = core(enabled=True, max_signal_delay_seconds=100.0, min_remaining_fraction=0.1)
        claimed(c, t=0.0, last="T1", ttl=300)
        assert replies(c.submit(beat(2, "T1"), 1.0)) == [(2, "absorbed", 200)]
        (side,) = sends(c.submit(junk(3, "stale", OTHER), 2.0))
        c.completed(KEY, side.flight, Rejected("412", state, current), 2.1)
        # The holder's next echo goes upstream: the 412 said the lease is not where the gateway thought.
        assert len(sends(c.submit(beat(4, "T1"), 3.0))) == 1, state
    # A 412 that confirms what is known keeps it.
    c = core(enabled=True, max_signal_delay_seconds=100.0, min_remaining_fraction=0.1)
    claimed(c, t=0.0, last="T1", ttl=300)
    (side,) = sends(c.submit(junk(3, "stale", OTHER), 2.0))
    c.completed(KEY, side.flight, Rejected("412", "active", "T1"), 2.1)
    assert replies(c.submit(beat(4, "T1"), 3.0)) == [(4, "absorbed", 200)]


def test_a_completion_for_a_flight_the_lease_no_longer_has_is_ignored() -> None:
    c = core()
    claimed(c, last="T1")
    (send,) = sends(c.submit(beat(2, "T1"), 1.0))
    assert c.completed(KEY, send.flight + 1000, ok("T9"), 1.1) == []
    assert replies(c.completed(KEY, send.flight, ok("T2"), 1.2)) == [(2, "forwarded", "200 T2")]


def test_a_main_412_that_shows_the_lease_moved_past_a_kept_answer_drops_it() -> None:
    c = core()
    claimed(c, last="T1")
    (send,) = sends(c.submit(beat(2, "T1"), 1.0))
    c.abandoned(2, 1.1)
    c.completed(KEY, send.flight, ok("T2"), 1.2)  # kept for worker 2's retry
    (other,) = sends(c.submit(beat(3, "stale"), 1.3))
    c.completed(KEY, other.flight, Rejected("412", "active", "T9"), 1.4)  # the lease is past T2
    assert len(sends(c.submit(beat(4, "T1"), 1.5))) == 1  # no hand-off of an answer the lease moved past


def test_a_value_a_412_refused_is_refused_here_next_time() -> None:
    c = core()
    claimed(c, last="T1")
    (send,) = sends(c.submit(beat(2, "stale"), 1.0))
    assert events(c.completed(KEY, send.flight, Rejected("412", "active", "T1"), 1.1)) == []  # not the holder's
    (send,) = sends(c.submit(beat(3, "T1"), 1.2))
    c.completed(KEY, send.flight, ok("T2"), 1.3)
    assert replies(c.submit(beat(4, "stale"), 1.4)) == [(4, "rejected", 412)]
    (view,) = list(c.leases(1.4))
    assert view.last_outcome == "rejected"


def test_a_412_records_the_state_it_reports_and_a_loss_only_of_a_held_lease() -> None:
    c = core()
    claimed(c, last="T1", ttl=10)
    (send,) = sends(c.submit(beat(2, "T1"), 1.0))
    done = c.completed(KEY, send.flight, Rejected("412", "queued", None), 1.1)
    assert events(done) == [("lost", "requeued")]
    (view,) = list(c.leases(1.1))
    assert (view.state, view.ttl_seconds, view.last_outcome) == ("queued", 10, "rejected_upstream")
    # Once it is known to be queued, another 412 is no new loss.
    (send,) = sends(c.submit(beat(3, "T1"), 1.2))
    assert events(c.completed(KEY, send.flight, Rejected("412", "queued", None), 1.3)) == []


def test_a_refused_claim_never_stops_a_later_claim_from_going_up() -> None:
    """`NO_HEARTBEAT` is no value a lease moves past: a claim the API refused once may be granted later."""
    c = core()
    claimed(c, t=0.0, last="T1", ttl=10)
    # Past the lease's end a claim goes up, and the API says it was renewed meanwhile (another way).
    (claim,) = sends(c.submit(beat(2, "NO_HEARTBEAT"), 15.0))
    c.completed(KEY, claim.flight, Rejected("412", "active", "T2"), 15.1)
    (send,) = sends(c.submit(beat(3, "T2"), 16.0))
    c.completed(KEY, send.flight, ok("T3", ttl=10), 16.1)
    # Long after that lease lapsed too, a claim goes upstream again (the API may well grant it).
    assert len(sends(c.submit(beat(4, "NO_HEARTBEAT"), 40.0))) == 1


def test_absorption_off_means_every_beat_goes_up_however_fresh_the_lease() -> None:
    c = core(enabled=False, max_signal_delay_seconds=100.0, min_remaining_fraction=0.1)
    claimed(c, t=0.0, last="T1", ttl=300)
    assert len(sends(c.submit(beat(2, "T1"), 0.5))) == 1


def test_absorption_at_exactly_the_minimum_remaining_fraction() -> None:
    c = core(enabled=True, max_signal_delay_seconds=200.0, min_remaining_fraction=0.5)
    claimed(c, t=0.0, last="T1", ttl=300)
    # 150 s of 300 surely left is the fraction asked for: still absorbed; a moment later it is not.
    assert replies(c.submit(beat(2, "T1"), 150.0)) == [(2, "absorbed", 200)]
    assert len(sends(c.submit(beat(3, "T1"), 150.5))) == 1


def test_stopping_is_reported_once_and_stopped_once() -> None:
    c = core()
    claimed(c, last="T1", ttl=30)
    reported = []
    for n, (last, state) in enumerate((("T2", "stopping"), ("T3", "stopping"), ("T4", "stopped"), ("T5", "stopped"))):
        (send,) = sends(c.submit(beat(10 + n, None), 1.0 + n))
        done = c.completed(KEY, send.flight, ok(last, ttl=30, state=state), 1.1 + n)
        reported += [(a.key, a.kind) for a in done if isinstance(a, LeaseEvent)]
    assert reported == [(KEY, LeaseEventKind.STOPPING), (KEY, LeaseEventKind.STOPPED)]
    # A stopping lease that lapses was let go, not lost: no EXPIRED follows.
    assert events(c.tick(1000.0)) == []


def test_two_leases_lapsing_by_the_same_tick_are_both_recorded() -> None:
    c: Core = Coalescer(tracking=LeaseTrackingSettings(expiry_grace_seconds=1.0))
    for n in (1, 2):
        key = ("env_1", f"work_{n}")
        (send,) = sends(c.submit(beat(n, "NO_HEARTBEAT", key=key), 0.0))
        c.completed(key, send.flight, ok(f"T{n}", ttl=10), 0.0)
    assert events(c.tick(20.0)) == [("expired", None), ("expired", None)]


def test_the_sdk_workers_pace_at_its_bounds() -> None:
    assert worker_interval(1) == 1.0  # clamped up to a second
    assert worker_interval(None) == 30.0
    assert keeps_pace(10, 10, 0.0)  # the upstream's own answer keeps the pace
    assert keeps_pace(90, 60, 30.0)  # 30 s interval, 30 s left after it: just enough


def test_a_full_table_evicts_an_ended_lease_first_then_the_one_beaten_longest_ago() -> None:
    """A held lease's row is the last to go: a stopped one goes before it, however recently it was beaten."""
    c: Core = Coalescer(tracking=LeaseTrackingSettings(max_tracked=3, retention_seconds=600.0))

    def beaten(n: int, expected: str, t: float) -> list[tuple[str, LeaseEventKind]]:
        key = ("env_1", f"work_{n}")
        (send,) = sends(c.submit(beat(10 * n + int(t), expected, key=key), t))
        actions = c.completed(key, send.flight, ok(f"T{n}-{t}", ttl=100), t + 0.01)
        return [(a.key[1], a.kind) for a in actions if isinstance(a, LeaseEvent)]

    for n in (1, 2, 3):
        beaten(n, "NO_HEARTBEAT", float(n))
    c.stop_seen(("env_1", "work_3"), 3.5)  # the newest, but ended
    beaten(1, "T1-1.0", 4.0)  # work_1 beaten again: work_2 is now the longest without a beat
    assert beaten(4, "NO_HEARTBEAT", 5.0) == [("work_4", LeaseEventKind.CLAIMED), ("work_3", LeaseEventKind.EVICTED)]
    assert beaten(5, "NO_HEARTBEAT", 6.0) == [("work_5", LeaseEventKind.CLAIMED), ("work_2", LeaseEventKind.EVICTED)]
    assert sorted(v.work_id for v in c.leases(6.0)) == ["work_1", "work_4", "work_5"]


def test_the_table_counts_show_a_state_outside_the_protocol_as_unknown_and_the_shortest_active_ttl() -> None:
    """What the leases gauge and the TTL alert read: a state the API adds later still counts, as `unknown`."""
    c: Core = Coalescer()
    answers = {"work_1": ok("A", ttl=30), "work_2": ok("B", ttl=12), "work_3": ok("C", ttl=5, state="suspended")}
    for n, (work, answer) in enumerate(answers.items()):
        key = ("env_1", work)
        (send,) = sends(c.submit(beat(n, "NO_HEARTBEAT", key=key), 0.0))
        c.completed(key, send.flight, answer, 0.01)
    by_state, shortest = c.table_counts()
    assert dict(by_state) == {("env_1", "active"): 2, ("env_1", "unknown"): 1}
    assert shortest == {"env_1": 12}  # among active leases only: the suspended one's 5 s is not an active TTL


def test_a_lapse_is_reported_behind_a_check_that_a_shorter_ttl_made_stale() -> None:
    """A beat with a shorter TTL brings a lease's check forward and leaves its old one stale in the heap:
    the stale one is skipped, and every lapse due behind it is still reported in the same tick."""
    c: Core = Coalescer(tracking=LeaseTrackingSettings(retention_seconds=600.0, expiry_grace_seconds=5.0))
    a, b = ("env_1", "work_a"), ("env_1", "work_b")
    (send,) = sends(c.submit(beat(1, "NO_HEARTBEAT", key=a), 0.0))
    c.completed(a, send.flight, ok("A1", ttl=100), 0.0)  # checked at 105
    (send,) = sends(c.submit(beat(2, "A1", key=a), 1.0))
    c.completed(a, send.flight, ok("A2", ttl=5), 1.0)  # checked at 11 now: the 105 entry is stale
    (send,) = sends(c.submit(beat(3, "NO_HEARTBEAT", key=b), 50.0))
    c.completed(b, send.flight, ok("B1", ttl=60), 50.0)  # checked at 115, behind the stale 105
    events = [e for e in c.tick(200.0) if isinstance(e, LeaseEvent) and e.kind is LeaseEventKind.EXPIRED]
    lapsed = sorted(e.key[1] for e in events)
    assert lapsed == ["work_a", "work_b"]


def test_the_latency_margin_is_nothing_before_a_round_trip_and_twice_the_slowest_recent_one_after() -> None:
    """Before the gateway has timed any upstream heartbeat it adds no margin of its own (the
    worker model's floor applies); after, twice the slowest recent round trip."""
    c = core()
    assert (c.round_trip(), c.latency_margin()) == (0.0, 0.0)
    (send,) = sends(c.submit(beat(1, "NO_HEARTBEAT"), 0.0))
    c.completed(KEY, send.flight, ok("T1"), 0.3)
    assert (c.round_trip(), c.latency_margin()) == pytest.approx((0.3, 0.6))


def test_with_no_retention_an_ended_lease_still_busy_is_looked_at_later_not_forever() -> None:
    """`leases.retention_seconds: 0` is allowed. An ended lease whose beat is still out was rescheduled at the
    same instant, and `tick` popped that check forever: the replica's event loop hung (found by review)."""
    c: Core = Coalescer(tracking=LeaseTrackingSettings(retention_seconds=0.0, expiry_grace_seconds=0.0))
    claimed(c, t=0.0, last="T1", ttl=10)
    (send,) = sends(c.submit(beat(2, "T1"), 1.0))  # the next beat is out
    c.stop_seen(KEY, 1.1)  # ended: stopped through the gateway

    def hung(*_: object) -> None:
        raise TimeoutError("tick never returned")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, 2.0)
    try:
        actions = c.tick(20.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert [a.at for a in actions if isinstance(a, Wakeup)] == [21.0]  # looked at again a second later
    c.completed(KEY, send.flight, ok("T2"), 20.5)
    c.tick(21.0)
    assert len(c) == 0  # idle and ended, with no retention: forgotten
