"""Poll admission: idle long polls held at the gateway, so a fleet's polls cost few upstream calls.

An SDK worker polls with `block_ms=999` and, when the answer is `null`,
sleeps 1-3 s and polls again (environments-api.md §6.1): 10,000 idle
workers keep ~3,000 long polls open upstream, each holding a connection,
although one open poll per environment would pick up a new item as fast.
Per environment, at most `polls.max_upstream_per_environment` polls go
upstream at once. A poll beyond that waits here, in arrival order, for up to
its own block time; if a slot frees while it has at least half a second of
that left, it goes upstream for that worker (its own `Anthropic-Worker-ID`,
the block time it has left), else it is
answered as the API answers an empty queue: 200 with JSON `null`, with no
upstream call. An item is only ever fetched by a poll a worker still waits
for: a worker that leaves while held never goes upstream.

The API counts `workers_polling` (worker ids seen polling in the last 30 s).
With `polls.refresh_seconds` set, a worker id not seen upstream for that
long goes up at once, slot or not, so every polling worker is counted; the
cost is one upstream poll per worker per window (README, "Poll admission").
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol
from urllib.parse import parse_qsl

from gateway.config.settings import PollSettings
from gateway.observability.nobody import NOBODY

__all__ = ["PollAdmission", "PollObserver", "block_seconds"]

# The API's cap on a long poll.
MAX_BLOCK_MS = 999
# A freed slot goes to a held poll only with at least this much of its block time left: shorter
# upstream polls would cost more upstream calls for the same open-poll coverage.
MIN_FORWARDED_BLOCK = 0.5
# Worker ids remembered for `refresh_seconds`: beyond this many, the longest unseen are forgotten.
MAX_REMEMBERED_WORKERS = 100_000

PollOutcome = Literal["forwarded", "held", "answered_empty"]


class PollObserver(Protocol):
    def poll_admitted(self, environment_id: str, outcome: PollOutcome, held: int) -> None: ...


def block_seconds(raw_query: str | None) -> float | None:
    """The poll's own block time, or None when it is not a long poll the API would accept.

    Absent (the API does not block then), repeated or out of 1..999: such a poll is not held but
    sent on as it came, so the API answers it as it would (a 400 for a bad value).
    """
    values = [v for k, v in parse_qsl(raw_query or "", keep_blank_values=True) if k == "block_ms"]
    if len(values) != 1 or not values[0].isdigit() or not 1 <= int(values[0]) <= MAX_BLOCK_MS:
        return None
    return int(values[0]) / 1000


@dataclass(slots=True)
class _Waiter:
    slot: asyncio.Future[bool]
    # When its block time runs out.
    deadline: float


@dataclass(slots=True)
class _Environment:
    in_flight: int = 0
    # Held polls in arrival order; one that left or timed out stays until passed over (or pruned).
    waiting: deque[_Waiter] = field(default_factory=deque)
    held: int = 0


class PollAdmission:
    """Per environment: how many polls are upstream, and who waits for a slot, first come first served."""

    def __init__(
        self,
        settings: Callable[[], PollSettings],
        *,
        observer: PollObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # The settings in force (a reload swaps them): read per poll.
        self._settings = settings
        self._observer = observer or NOBODY
        self._clock = clock
        self._environments: dict[str, _Environment] = {}
        # Worker id (a digest: ids are the client's to choose, of any length) -> when its poll last went
        # upstream (for `refresh_seconds`), oldest first.
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    async def admit(self, environment_id: str, worker_id: str | None, block: float) -> float | None:
        """Wait for a slot for up to `block` seconds: the seconds waited, or None to answer empty here.

        When it returns a number, the caller owns a slot and must `release` it.
        """
        limit = self._settings().max_upstream_per_environment
        env = self._environments.setdefault(environment_id, _Environment())
        # Slots a reload freed (a higher limit, or none) go to those already waiting, first.
        self._fill(env, limit)
        refresh = self._due_refresh(worker_id)
        if limit is None or env.in_flight < limit or refresh:
            env.in_flight += 1
            self._forwarded(worker_id)
            self._observer.poll_admitted(environment_id, "forwarded", env.held)
            return 0.0
        started = self._clock()
        slot: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        env.waiting.append(_Waiter(slot, started + block))
        env.held += 1
        self._observer.poll_admitted(environment_id, "held", env.held)
        try:
            # Awaited bare (no shield, no wait_for, which may swallow a cancellation): a worker
            # leaving is always seen here, even when a slot was handed to it at that moment.
            async with asyncio.timeout(block):
                await slot
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            # The worker left while held: it never goes upstream; a slot handed to it goes on.
            self._leave(environment_id, env, slot)
            raise
        if slot.done() and not slot.cancelled():
            self._forwarded(worker_id)
            self._observer.poll_admitted(environment_id, "forwarded", env.held)
            return self._clock() - started
        self._leave(environment_id, env, slot)
        self._observer.poll_admitted(environment_id, "answered_empty", env.held)
        return None

    def release(self, environment_id: str) -> None:
        """A poll admitted upstream came back: its slot goes to the longest-waiting worker still there.

        Unless there are more slots out than the limit allows (a refresh went up beyond it, or a reload
        lowered it): then the slot is given back.
        """
        env = self._environments[environment_id]
        limit = self._settings().max_upstream_per_environment
        if limit is None or env.in_flight <= limit:
            self._hand_over(env)
        else:
            env.in_flight -= 1
        if not env.in_flight and not env.held:
            del self._environments[environment_id]

    def _fill(self, env: _Environment, limit: int | None) -> None:
        while env.held and (limit is None or env.in_flight < limit):
            env.in_flight += 1
            if not self._hand_over(env):
                return

    def _hand_over(self, env: _Environment) -> bool:
        """One slot (counted in `in_flight`) to the longest-waiting poll that can use it; or given back."""
        now = self._clock()
        while env.waiting:
            waiter = env.waiting.popleft()
            # One with too little block time left is not sent up: it is answered empty when its time is up.
            if not waiter.slot.done() and waiter.deadline - now >= MIN_FORWARDED_BLOCK:
                waiter.slot.set_result(True)  # the slot passes on: in_flight stays
                env.held -= 1
                return True
        env.in_flight -= 1
        return False

    def upstream(self, environment_id: str) -> int:
        """The environment's polls upstream now."""
        env = self._environments.get(environment_id)
        return env.in_flight if env is not None else 0

    def held(self, environment_id: str) -> int:
        env = self._environments.get(environment_id)
        return env.held if env is not None else 0

    def _leave(self, environment_id: str, env: _Environment, slot: asyncio.Future[bool]) -> None:
        if slot.done() and not slot.cancelled():
            self.release(environment_id)  # handed a slot as it left: pass it on
            return
        slot.cancel()
        env.held -= 1
        # Left in place (removing from the middle costs a pass); pruned once most entries are gone.
        if len(env.waiting) > 2 * env.held + 64:
            env.waiting = deque(w for w in env.waiting if not w.slot.done())

    def _due_refresh(self, worker_id: str | None) -> bool:
        window = self._settings().refresh_seconds
        if window is None or worker_id is None:
            return False
        last = self._seen.get(_worker_key(worker_id))
        return last is None or self._clock() - last >= window

    def _forwarded(self, worker_id: str | None) -> None:
        if self._settings().refresh_seconds is None or worker_id is None:
            return
        key = _worker_key(worker_id)
        self._seen[key] = self._clock()
        self._seen.move_to_end(key)
        while len(self._seen) > MAX_REMEMBERED_WORKERS:
            self._seen.popitem(last=False)


def _worker_key(worker_id: str) -> bytes:
    return hashlib.blake2b(worker_id.encode(), digest_size=16).digest()
