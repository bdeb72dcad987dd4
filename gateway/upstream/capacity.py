"""Upstream capacity by class: each class has its own connections, and a bounded, timed queue for them.

A heartbeat must never wait for a connection that an event stream or a long
poll holds: a replica serving 1,000 sessions keeps 1,000 streams open for
minutes, and idle workers keep long polls in flight most of the time. So
upstream capacity is split, as Envoy splits it with per-priority circuit
breakers and HAProxy with per-server `maxconn` and queues:

- `lease`: heartbeat, ack and stop with a credential the gateway vouches for
  (its own injected key, a sessions token it saw issued, or the credential the
  API last accepted on that lease);
- `poll`: long polls;
- `stream`: session event streams;
- `other`: everything else, including lease calls with a credential nobody
  vouches for (a junk Bearer takes no lease capacity).

Each `Gate` admits up to `max_connections` exchanges at once (its own aiohttp
connector has the same limit, so aiohttp never queues behind it), queues at
most `max_queued` more in arrival order, each for at most
`max_queue_seconds` (or less, when its request says its caller will not wait
that long), and refuses the rest at once with a 503 `overloaded_error` and
`retry-after`: an overloaded class answers fast instead of letting requests
pile up unbounded, and never answers after the caller has given up.

The `lease` class is sized by default to the worker connections the replica
accepts (`PoolSettings.limit`): each carries one request at a time, so lease
calls never wait for a connection unless an operator set a smaller number.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from contextlib import suppress
from typing import Protocol

from gateway.config.settings import DEFAULT_MAX_CLIENT_CONNECTIONS, PoolName, PoolSettings
from gateway.errors import CapacityExceeded
from gateway.observability.nobody import NOBODY

__all__ = ["CapacityObserver", "Gate"]


class CapacityObserver(Protocol):
    """Told about waits and refusals: for metrics, without this module importing them. (How many
    connections are in use and queued is read from the gate when the metrics are scraped, not told
    on every change: two gauge updates per exchange that only a scrape would ever look at.)"""

    def pool_waited(self, pool: PoolName, seconds: float) -> None: ...

    def pool_refused(self, pool: PoolName, reason: str) -> None: ...

    def pool_sized(self, pool: PoolName, limit: int) -> None: ...


class Gate:
    def __init__(
        self,
        pool: PoolName,
        settings: PoolSettings,
        *,
        client_connections: int = DEFAULT_MAX_CLIENT_CONNECTIONS,
        observer: CapacityObserver | None = None,
    ) -> None:
        self.pool = pool
        self.settings = settings
        # Fixed at start: the connector behind the gate is built with it.
        self.limit = settings.limit(client_connections)
        self._observer = observer or NOBODY
        self._observer.pool_sized(pool, self.limit)
        self.in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        # Since when someone has been waiting without a break (None: nobody waits).
        self._queued_since: float | None = None

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def saturated_for(self, now: float | None = None) -> float:
        """Seconds this class has had requests waiting for a connection, without a break."""
        if self._queued_since is None:
            return 0.0
        return (time.monotonic() if now is None else now) - self._queued_since

    async def acquire(self, max_wait: float | None = None) -> None:
        """Take one of the class's connections, to `release` once its exchange is over; raises
        `CapacityExceeded` when none comes.

        `max_wait`: the caller gives up sooner than the class's `max_queue_seconds` (a
        heartbeat whose worker aborts it then); it is refused then rather than sent late.
        """
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
        else:
            await self._wait(max_wait)

    def release(self) -> None:
        """Give back what `acquire` took: to the first waiter still waiting, else to the class."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to it; in_use stays
                self._after_dequeue()
                return
        self.in_use -= 1
        self._after_dequeue()

    async def _wait(self, max_wait: float | None) -> None:
        settings = self.settings
        if len(self._waiters) >= settings.max_queued:
            self._observer.pool_refused(self.pool, "queue_full")
            raise self._refusal("its queue is full")
        patience = settings.max_queue_seconds if max_wait is None else min(settings.max_queue_seconds, max_wait)
        if patience <= 0:
            self._observer.pool_refused(self.pool, "timeout")
            raise self._refusal("no connection is free, and the request cannot wait")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        if self._queued_since is None:
            self._queued_since = time.monotonic()
        started = time.monotonic()
        # The deadline fails the future, not the task: a cancelled task means the client left.
        timer = loop.call_later(patience, _expire, waiter)
        try:
            await waiter
        except TimeoutError:
            self._forget(waiter)
            self._observer.pool_refused(self.pool, "timeout")
            raise self._refusal(f"no connection came free in {patience:g} s") from None
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()  # the slot was handed over just as the client left: pass it on
            else:
                self._forget(waiter)
            raise
        finally:
            timer.cancel()
            self._observer.pool_waited(self.pool, time.monotonic() - started)

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        with suppress(ValueError):
            self._waiters.remove(waiter)
        self._after_dequeue()

    def _after_dequeue(self) -> None:
        if not self._waiters:
            self._queued_since = None

    def _refusal(self, why: str) -> CapacityExceeded:
        # A second or two: long enough for streams or polls to finish, short against any lease.
        retry_after = max(1, math.ceil(min(self.settings.max_queue_seconds, 2.0)))
        return CapacityExceeded(
            f"the gateway's {self.pool.value} upstream capacity is exhausted: {why}; retry shortly",
            retry_after=retry_after,
        )


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
