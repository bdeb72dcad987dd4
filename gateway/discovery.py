"""Asking the API which environment a session belongs to, when the gateway has not seen it.

A gateway learns a session's environment from the work item that named it
(`gateway.links`). After a restart, on another replica, or for a worker that
polled elsewhere, it has not; for a client token of one environment that does
not matter, but a token of several environments could stand for any of
their keys. Rather than guess, or fall back to a wider key, the gateway reads
the session (`GET /v1/sessions/{id}`) with each of the token's environment
keys in turn and takes the `environment_id` the API reports, if it is one of
them. It is a read, sent only with keys the token may use; one lookup per
session runs at a time and its answer is shared; a session no key could read
is not asked about again for a while.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from typing import Literal, Protocol

from .credentials import environment_key
from .errors import UpstreamError
from .headers import merge_betas
from .links import Links, links_in_answer
from .routing import Route, RouteName
from .settings import Environment, HeaderSettings
from .upstream import Upstream, UpstreamRequest, fetch

__all__ = ["DiscoveryObserver", "DiscoveryResult", "SessionDiscovery"]

log = logging.getLogger("gateway.discovery")

DiscoveryResult = Literal["found", "not_found", "error"]
# Session ids are plain tokens (sesn_...); anything else is not looked up.
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}\Z")
# How long a session that no candidate key could read is not asked about again.
MISS_SECONDS = 30.0
MAX_MISSES = 10_000
# Each lookup's own deadline: a worker waits for it before its request is sent.
LOOKUP_TIMEOUT_SECONDS = 10.0
MAX_SESSION_BYTES = 1024 * 1024


class DiscoveryObserver(Protocol):
    def session_discovered(self, result: DiscoveryResult) -> None: ...


class _Unobserved:
    def session_discovered(self, result: DiscoveryResult) -> None:
        pass


class SessionDiscovery:
    def __init__(self, upstream: Upstream, links: Links, *, observer: DiscoveryObserver | None = None) -> None:
        self._upstream = upstream
        self._links = links
        self._observer = observer or _Unobserved()
        self._lookups: dict[str, asyncio.Task[str | None]] = {}
        self._misses: OrderedDict[str, float] = OrderedDict()

    async def environment_of(
        self, session_id: str, candidates: tuple[Environment, ...], headers: HeaderSettings
    ) -> Environment | None:
        """The candidate the session belongs to, or None; raises `UpstreamError` if no candidate could be asked."""
        if not _SESSION_ID.match(session_id) or self._missed_recently(session_id):
            return None
        lookup = self._lookups.get(session_id)
        if lookup is None:
            # Its own task: the worker that started it may leave; the others still wait for it.
            lookup = asyncio.get_running_loop().create_task(
                self._look_up(session_id, candidates, headers), name="session-discovery"
            )
            self._lookups[session_id] = lookup
            lookup.add_done_callback(lambda task: self._finished(session_id, task))
        found = await asyncio.shield(lookup)
        return next((e for e in candidates if e.id == found), None)

    def _finished(self, session_id: str, task: asyncio.Task[str | None]) -> None:
        self._lookups.pop(session_id, None)
        if not task.cancelled():
            task.exception()  # retrieved here, whether or not a waiter is left to see it

    async def close(self) -> None:
        for task in list(self._lookups.values()):
            task.cancel()
        await asyncio.gather(*self._lookups.values(), return_exceptions=True)

    async def _look_up(
        self, session_id: str, candidates: tuple[Environment, ...], headers: HeaderSettings
    ) -> str | None:
        route = Route(RouteName.SESSIONS, "/v1/sessions/{id}", resource_id=session_id)
        served = {e.id for e in candidates}
        failure: UpstreamError | None = None
        for environment in candidates:
            request = UpstreamRequest(
                "GET",
                f"/v1/sessions/{session_id}",
                (
                    (environment_key(environment).header, environment_key(environment).value),
                    ("anthropic-beta", merge_betas((), headers.anthropic_beta)),
                    ("anthropic-version", headers.anthropic_version),
                ),
                timeout=LOOKUP_TIMEOUT_SECONDS,
                route="sessions",
            )
            try:
                answer = await fetch(self._upstream, request, max_bytes=MAX_SESSION_BYTES)
            except UpstreamError as error:
                failure = error
                continue
            if answer.status != 200:
                continue
            links = links_in_answer(route, answer.body, served)
            for link in links:
                self._links.learn(link)
            if links:
                self._observer.session_discovered("found")
                return links[0].environment_id
        if failure is not None:
            self._observer.session_discovered("error")
            log.warning("could not ask the upstream which environment a session belongs to: %s", failure.message)
            raise failure
        self._observer.session_discovered("not_found")
        self._remember_miss(session_id)
        return None

    def _missed_recently(self, session_id: str) -> bool:
        until = self._misses.get(session_id)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self._misses[session_id]
        return False

    def _remember_miss(self, session_id: str) -> None:
        self._misses[session_id] = time.monotonic() + MISS_SECONDS
        self._misses.move_to_end(session_id)
        while len(self._misses) > MAX_MISSES:
            self._misses.popitem(last=False)
