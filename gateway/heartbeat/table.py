"""The lease table: which leases the gateway keeps, what it counts, and when it looks at each again. Pure: no I/O.

The coalescer (`core`) decides what to do with beats; this keeps the rows
those decisions act on, and their upkeep:

- A lease enters the table for good only once the upstream accepted a beat
  for it (`confirm`); other rows go as soon as nothing waits on them, and
  only confirmed leases count toward, and are evicted by, the size cap:
  beats no upstream accepted (a junk credential's) never take a real lease's
  row.
- One pending check per lease, in a heap: a lease that lapsed unrenewed
  through this gateway is reported expired; an ended one is forgotten after
  the retention time. `next_deadline` tells the driver when to look again.
- Counts by (environment, state) and the active leases' TTLs are kept as
  rows change, so a metrics scrape costs nothing per lease.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Generic, TypeVar

from gateway.config.settings import LeaseTrackingSettings

from .lease import Lease, LeaseKey
from .wire import LastOutcome, LeaseState

__all__ = ["EXPIRY_RECHECK_SECONDS", "LeaseTable", "LeaseView", "TableCounts"]

R = TypeVar("R")

_STATES = frozenset(s.value for s in LeaseState)
# A lapsed lease whose holder's beat is in flight is looked at again this much later.
EXPIRY_RECHECK_SECONDS = 1.0

# Rows by (environment id, state), and the shortest active TTL by environment id.
TableCounts = tuple[Mapping[tuple[str, str], int], Mapping[str, int]]


@dataclass(frozen=True, slots=True)
class LeaseView:
    """One row of the lease table, for the admin API."""

    environment_id: str
    work_id: str
    state: str
    last_heartbeat: str | None
    ttl_seconds: int | None
    seconds_left: float | None
    last_outcome: LastOutcome | None
    in_flight: bool
    waiting: int


class LeaseTable(Generic[R]):
    def __init__(self, tracking: LeaseTrackingSettings | None = None) -> None:
        self.tracking = tracking or LeaseTrackingSettings()
        # In the order leases were last beaten, oldest first.
        self._leases: dict[LeaseKey, Lease[R]] = {}
        self._confirmed = 0
        # (when, key): times at which a lease may need expiring or forgetting.
        self._deadlines: list[tuple[float, LeaseKey]] = []
        self._by_state: Counter[tuple[str, str]] = Counter()
        # Ended leases, in the order they ended.
        self._ended: dict[LeaseKey, None] = {}
        self._active_ttls: dict[str, Counter[int]] = {}

    # -- rows ------------------------------------------------------------------------

    def get(self, key: LeaseKey) -> Lease[R] | None:
        return self._leases.get(key)

    def touch(self, key: LeaseKey, now: float) -> Lease[R]:
        """The lease a beat is for, made the most recently beaten (created, unconfirmed, if new)."""
        lease = self._leases.pop(key, None)
        if lease is None:
            # No check is scheduled yet: an unconfirmed row leaves as soon as nothing waits on it
            # (a junk flood must not leave a heap entry per beat), a confirmed one schedules its own.
            lease = Lease(key, last_seen=now)
            self._count(lease, 1)
        self._leases[key] = lease
        lease.last_seen = now
        return lease

    def forget_if_unconfirmed(self, lease: Lease[R]) -> None:
        """A lease no upstream answer confirmed leaves the table as soon as nothing waits on it."""
        if not lease.confirmed and lease.idle and self._leases.get(lease.key) is lease:
            del self._leases[lease.key]
            self._ended.pop(lease.key, None)
            self._count(lease, -1)

    def remove(self, lease: Lease[R]) -> None:
        del self._leases[lease.key]
        self._ended.pop(lease.key, None)
        self._count(lease, -1)
        if lease.confirmed:
            self._confirmed -= 1

    def confirm(self, lease: Lease[R]) -> list[LeaseKey]:
        """The upstream accepted a first beat for `lease`: it takes a row, evicting one if the table is full.

        Returns the evicted lease's key, if any. Call before the lease's first
        success is recorded on it (`confirmed` is still False).
        """
        evicted = self._evict_if_full()
        self._confirmed += 1
        return evicted

    def observed(self, lease: Lease[R], state: str, ttl_seconds: int | None) -> None:
        """The lease's state or TTL changed: the counts follow."""
        self._count(lease, -1)
        lease.state, lease.ttl_seconds = state, ttl_seconds
        self._count(lease, 1)

    def mark_ended(self, lease: Lease[R], ended: bool) -> None:
        """Stopped, lost or expired (or not): ended leases are the first to go from a full table."""
        lease.ended = ended
        if ended:
            self._ended.setdefault(lease.key, None)
        else:
            self._ended.pop(lease.key, None)

    # -- checks over time ------------------------------------------------------------

    def schedule(self, lease: Lease[R], when: float) -> None:
        """Make sure the lease is checked no later than `when`; one pending check per lease.

        A check that comes due recomputes when the next one is needed, so a
        later time never needs its own entry while an earlier one is pending.
        """
        if lease.next_check is not None and lease.next_check <= when:
            return
        lease.next_check = when
        heapq.heappush(self._deadlines, (when, lease.key))

    def due(self, now: float) -> list[LeaseKey]:
        """Check every lease whose time came; returns the leases found expired (lapsed unrenewed)."""
        expired: list[LeaseKey] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            when, key = heapq.heappop(self._deadlines)
            lease = self._leases.get(key)
            if lease is None or lease.next_check != when:
                continue  # forgotten, or superseded by an earlier check
            lease.next_check = None
            if self._check(lease, now):
                expired.append(key)
        return expired

    def next_deadline(self) -> float | None:
        """When `due` next has something to do (stale checks, superseded or forgotten, are skipped)."""
        deadlines = self._deadlines
        while deadlines:
            when, key = deadlines[0]
            lease = self._leases.get(key)
            if lease is not None and lease.next_check == when:
                return when
            heapq.heappop(deadlines)
        return None

    @property
    def pending_checks(self) -> int:
        """Checks waiting in the schedule, stale ones included: bounded by the rows, not by the beats."""
        return len(self._deadlines)

    def _check(self, lease: Lease[R], now: float) -> bool:
        """Look at one lease whose time came. True: it lapsed, unrenewed through this gateway."""
        sent, ttl = lease.last_success_sent_at, lease.ttl_seconds
        grace = self.tracking.expiry_grace_seconds
        if not lease.ended and sent is not None and ttl is not None:
            if now < sent + ttl + grace:
                self.schedule(lease, sent + ttl + grace)  # renewed since
                return False
            if not lease.main.idle:
                # The holder's beat is on its way and may renew it: look again shortly. (Side lanes,
                # other credentials' beats, do not hold the check off: a junk stream must not hide a loss.)
                self.schedule(lease, now + EXPIRY_RECHECK_SECONDS)
                return False
            # Nobody renewed it through this gateway: a loss no one else reports.
            self.observed(lease, LeaseState.EXPIRED, lease.ttl_seconds)
            self.mark_ended(lease, True)
            lease.known = None
            lease.last_seen = now
            self.schedule(lease, now + self.tracking.retention_seconds)
            return True
        # Ended, or never granted: forget it once it has been quiet for the retention time.
        retention = self.tracking.retention_seconds
        if not lease.idle:
            # Busy still: looked at again later, never at `now` (with a retention of 0, `due` would pop the
            # same check forever and the event loop would hang).
            self.schedule(lease, now + max(retention, EXPIRY_RECHECK_SECONDS))
        elif now - lease.last_seen >= retention:
            self.remove(lease)
        else:
            self.schedule(lease, lease.last_seen + retention)
        return False

    def _evict_if_full(self) -> list[LeaseKey]:
        if self._confirmed < self.tracking.max_tracked:
            return []
        # One per new lease: ended leases first (longest ended), then the longest since a beat. Both
        # orders are kept as leases change, so this costs the same at 100 or 100,000 leases.
        for key in itertools.chain(self._ended, self._leases):
            lease = self._leases[key]
            if lease.idle and lease.confirmed:
                self.remove(lease)
                return [key]
        return []

    # -- views -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._leases)

    def views(self, now: float) -> Iterator[LeaseView]:
        for lease in self._leases.values():
            left = None
            if lease.last_success_sent_at is not None and lease.ttl_seconds and not lease.ended:
                left = max(0.0, lease.last_success_sent_at + lease.ttl_seconds - now)
            environment_id, work_id = lease.key
            yield LeaseView(
                environment_id=environment_id,
                work_id=work_id,
                state=lease.state,
                last_heartbeat=lease.last_heartbeat,
                ttl_seconds=lease.ttl_seconds,
                seconds_left=left,
                last_outcome=lease.last_outcome,
                in_flight=bool(lease.flights()),
                waiting=sum(lane.waiting() for lane in lease.lanes()),
            )

    def counts(self) -> TableCounts:
        """Rows by (environment id, state), and the shortest TTL among active leases per environment.

        States outside `LeaseState` count as unknown. Constant time in the table's size.
        """
        shortest = {env: min(ttls) for env, ttls in self._active_ttls.items() if ttls}
        return MappingProxyType(self._by_state), shortest

    def _count(self, lease: Lease[R], sign: int) -> None:
        env, _ = lease.key
        state = lease.state if lease.state in _STATES else LeaseState.UNKNOWN
        key = (env, str(state))
        self._by_state[key] += sign
        if not self._by_state[key]:
            del self._by_state[key]
        if state == LeaseState.ACTIVE and lease.ttl_seconds:
            ttls = self._active_ttls.setdefault(env, Counter())
            ttls[lease.ttl_seconds] += sign
            if not ttls[lease.ttl_seconds]:
                del ttls[lease.ttl_seconds]
                if not ttls:
                    del self._active_ttls[env]
