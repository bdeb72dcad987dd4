"""Asking the API which environment a session belongs to, when the gateway has not seen it.

A gateway learns a session's environment from the work item that named it
(`gateway.policy.links`). After a restart, on another replica, or for a worker that
polled elsewhere, it has not; for a client token of one environment that does
not matter, but a token of several environments could stand for any of
their keys. Rather than guess, or fall back to a wider key, the gateway reads
the session (`GET /v1/sessions/{id}`) with each of the token's environment
keys in turn and takes the `environment_id` the API reports, if it is one of
them. It is a read, sent only with keys the token may use; one lookup per
session and set of keys runs at a time and its answer is shared; a key that
could not read the session (401, 403, 404) is not tried for it again for a
while; a 429 or 5xx is passed on as a retryable error, never taken for "not
here". A lookup has one deadline for all its reads, and only so many run at
once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from typing import Literal, Protocol

from gateway.config.settings import Environment, HeaderSettings
from gateway.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gateway.observability.nobody import NOBODY
from gateway.policy.credentials import environment_key
from gateway.policy.headers import merge_betas
from gateway.policy.links import Links, links_in_answer
from gateway.policy.routing import Route, RouteName
from gateway.tasks import Tasks

from .client import Upstream, UpstreamRequest, fetch

__all__ = ["DiscoveryObserver", "DiscoveryResult", "SessionDiscovery"]

log = logging.getLogger("gateway.discovery")

DiscoveryResult = Literal["found", "not_found", "error"]
# Session ids are plain tokens (sesn_...); anything else is not looked up.
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}\Z")
# How long a session that no candidate key could read is not asked about again.
MISS_SECONDS = 30.0
MAX_MISSES = 10_000
# One lookup's deadline, all its reads together: a worker waits for it before its request is sent.
LOOKUP_TIMEOUT_SECONDS = 10.0
# Lookups running at once, all sessions together: each reads with up to one key per environment.
MAX_CONCURRENT_LOOKUPS = 32
# Answers that mean "not with this key": another environment's session, or none at all.
NOT_THIS_ENVIRONMENT = frozenset({401, 403, 404})
MAX_SESSION_BYTES = 1024 * 1024


class DiscoveryObserver(Protocol):
    def session_discovered(self, result: DiscoveryResult) -> None: ...


class SessionDiscovery:
    def __init__(self, upstream: Upstream, links: Links, *, observer: DiscoveryObserver | None = None) -> None:
        self._upstream = upstream
        self._links = links
        self._observer = observer or NOBODY
        # Running lookups, by session and the environments they ask about: a lookup
        # for other environments answers a different question.
        self._lookups: dict[tuple[str, frozenset[str]], asyncio.Task[str | None]] = {}
        # (session, environment) pairs whose key could not read the session, until when.
        self._misses: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_LOOKUPS)
        self._tasks = Tasks()

    async def environment_of(
        self, session_id: str, candidates: tuple[Environment, ...], headers: HeaderSettings
    ) -> Environment | None:
        """The candidate the session belongs to, or None; raises `UpstreamError` when the upstream could not say."""
        if not _SESSION_ID.match(session_id):
            return None
        now = time.monotonic()
        untried = tuple(e for e in candidates if not self._missed_recently(session_id, e.id, now))
        if not untried:
            return None
        key = (session_id, frozenset(e.id for e in untried))
        lookup = self._lookups.get(key)
        if lookup is None:
            # Its own task: the worker that started it may leave; the others still wait for it.
            lookup = self._tasks.spawn(
                self._look_up(session_id, untried, headers),
                name="session-discovery",
                when_done=lambda task: self._finished(key, task),
            )
            self._lookups[key] = lookup
        found = await asyncio.shield(lookup)
        return next((e for e in candidates if e.id == found), None)

    def _finished(self, key: tuple[str, frozenset[str]], task: asyncio.Task[str | None]) -> None:
        self._lookups.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here, whether or not a waiter is left to see it

    async def close(self) -> None:
        await self._tasks.close()

    async def _look_up(
        self, session_id: str, candidates: tuple[Environment, ...], headers: HeaderSettings
    ) -> str | None:
        try:
            async with self._slots:
                deadline = time.monotonic() + LOOKUP_TIMEOUT_SECONDS
                return await self._read_with_each_key(session_id, candidates, headers, deadline)
        except UpstreamError:
            self._observer.session_discovered("error")
            raise

    async def _read_with_each_key(
        self, session_id: str, candidates: tuple[Environment, ...], headers: HeaderSettings, deadline: float
    ) -> str | None:
        route = Route(RouteName.SESSIONS, "/v1/sessions/{id}", resource_id=session_id)
        served = {e.id for e in candidates}
        failure: UpstreamError | None = None
        for environment in candidates:
            left = deadline - time.monotonic()
            if left <= 0:
                failure = UpstreamTimeout(
                    "the upstream did not say in time which environment the session belongs to",
                    kind="timeout",
                    may_have_reached_upstream=True,
                )
                break
            credential = environment_key(environment)
            request = UpstreamRequest(
                "GET",
                f"/v1/sessions/{session_id}",
                (
                    (credential.header, credential.value),
                    ("anthropic-beta", merge_betas((), headers.anthropic_beta)),
                    ("anthropic-version", headers.anthropic_version),
                ),
                timeout=left,
                route="sessions",
            )
            try:
                answer = await fetch(self._upstream, request, max_bytes=MAX_SESSION_BYTES)
            except UpstreamError as error:
                failure = error
                continue
            if answer.status == 200:
                links = links_in_answer(route, answer.body, served)
                for link in links:
                    self._links.learn(link)
                if links:
                    self._observer.session_discovered("found")
                    return links[0].environment_id
            if answer.status in NOT_THIS_ENVIRONMENT or answer.status == 200:
                self._remember_miss(session_id, environment.id)
            else:
                # A 429 or a 5xx says nothing about where the session is: not remembered,
                # and passed on as an error the worker retries, as it would going direct.
                failure = UpstreamUnavailable(
                    f"the upstream answered {answer.status} when asked which environment the session belongs to",
                    kind="other",
                    may_have_reached_upstream=True,
                )
        if failure is not None:
            log.warning("could not ask the upstream which environment a session belongs to: %s", failure.message)
            raise failure
        self._observer.session_discovered("not_found")
        return None

    def _missed_recently(self, session_id: str, environment_id: str, now: float) -> bool:
        key = (session_id, environment_id)
        until = self._misses.get(key)
        if until is None:
            return False
        if now < until:
            return True
        del self._misses[key]
        return False

    def _remember_miss(self, session_id: str, environment_id: str) -> None:
        key = (session_id, environment_id)
        self._misses[key] = time.monotonic() + MISS_SECONDS
        self._misses.move_to_end(key)
        while len(self._misses) > MAX_MISSES:
            self._misses.popitem(last=False)
