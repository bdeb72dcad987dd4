"""Prometheus metrics: the names, labels and units are a contract (README, "Operating").

One `GatewayMetrics` per app, on its own registry: nothing touches the
global default registry. Labels are bounded: `route` is a `RouteName`,
`environment` a configured label or `other`, never an id, token or raw path.
Every known label combination is created at start, so `rate()` sees the
first event.

`GatewayMetrics` is also the observer the upstream client and the heartbeat
driver report to, so neither imports prometheus_client.
"""

from __future__ import annotations

import itertools
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.platform_collector import PlatformCollector

from gateway import __version__
from gateway.config.settings import PoolName, Settings
from gateway.edge.polls import PollOutcome
from gateway.errors import UpstreamErrorKind
from gateway.heartbeat.driver import FAILSAFE_POINTS, FailsafePoint
from gateway.heartbeat.table import TableCounts
from gateway.heartbeat.wire import LeaseEventKind, LeaseState, LostReason, Outcome
from gateway.policy.routing import RouteName

__all__ = ["GatewayMetrics"]

PREFIX = "heartbeat_gateway"
# Client-facing and upstream latency, 1 ms to 30 s.
# Event-loop lag, 1 ms to 5 s.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Lease time left when a worker beats: how close the fleet runs to expiry.
REMAINING_BUCKETS = (1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)
ROUTES = tuple(r.value for r in RouteName)
OUTCOMES = tuple(o.value for o in Outcome)
LOST_REASONS = tuple(r.value for r in LostReason)
STOP_STATES = (LeaseEventKind.STOPPING, LeaseEventKind.STOPPED)
ERROR_KINDS: tuple[UpstreamErrorKind, ...] = ("timeout", "connect", "tls", "proxy", "reset", "other")
LEASE_STATES = tuple(s.value for s in LeaseState)
# Status codes worth a series from the start: what the gateway itself answers, and the lease protocol's.
CLIENT_CODES = ("200", "400", "401", "403", "404", "412", "413", "429", "500", "502", "504")
UPSTREAM_CODES = ("200", "412", "429", "500", "503")
DISCOVERY_RESULTS = ("found", "not_found", "error")
POLL_OUTCOMES: tuple[PollOutcome, ...] = ("forwarded", "held", "answered_empty")
POOL_REFUSALS = ("queue_full", "timeout")
SHED_ACTIONS = ("answered_empty", "refused")
# The key a client token was swapped for: an environment's, or the organisation-scoped default.
CREDENTIAL_KINDS = ("environment_key", "default_credential")
OTHER = "other"


class GatewayMetrics:
    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._child = _Children().child
        self._labels: dict[str, str] = {}
        self.environments: tuple[str, ...] = ()

        self.requests = Counter(f"{PREFIX}_requests", "Client-facing responses.", ["route", "code"], registry=r)
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Client-facing request duration, until the response is complete.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_requests = Counter(
            f"{PREFIX}_upstream_requests", "Answers from the upstream API.", ["route", "code"], registry=r
        )
        self.upstream_duration = Histogram(
            f"{PREFIX}_upstream_request_duration_seconds",
            "Upstream time to response headers (a stream's body is not included).",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            f"{PREFIX}_upstream_errors",
            "Upstream exchanges that failed without an answer.",
            ["route", "kind"],
            registry=r,
        )
        self.upstream_retries = Counter(
            f"{PREFIX}_upstream_retries", "Upstream requests sent again by the gateway.", ["route"], registry=r
        )
        # Requests in flight and upstream connections in use change twice per request: counted in plain
        # ints and read when scraped (`_LiveGauges`), not written through a locked gauge each time.
        self._inflight: Tally[str] = Tally()
        self._pools: Callable[[], Mapping[PoolName, tuple[int, int]]] = dict
        r.register(_LiveGauges(self))
        self.heartbeats = Counter(
            f"{PREFIX}_heartbeats", "Worker heartbeats answered, by decision.", ["environment", "outcome"], registry=r
        )
        self.conflicts = Counter(
            f"{PREFIX}_heartbeat_conflicts", "412 answers delivered to workers.", ["environment"], registry=r
        )
        self.leases_lost = Counter(
            f"{PREFIX}_leases_lost", "Leases lost, by reason.", ["environment", "reason"], registry=r
        )
        self.work_stops = Counter(
            f"{PREFIX}_work_stops",
            "Leases whose heartbeat first reported stopping, or stopped.",
            ["environment", "state"],
            registry=r,
        )
        self.lease_remaining = Histogram(
            f"{PREFIX}_lease_remaining_seconds",
            "Lease time surely left when a worker heartbeat arrives.",
            ["environment"],
            buckets=REMAINING_BUCKETS,
            registry=r,
        )
        self.lease_evictions = Counter(
            f"{PREFIX}_lease_evictions", "Leases dropped from the full lease table.", registry=r
        )
        self.internal_errors = Counter(
            f"{PREFIX}_internal_errors",
            "Heartbeat decisions or actions that failed unexpectedly (a bug): the failsafe answered the "
            "lease's waiters with a 502 and reset the lease.",
            ["where"],
            registry=r,
        )
        self.polls = Counter(
            f"{PREFIX}_polls",
            "Long polls, by what admission did: forwarded upstream, held at the gateway (then forwarded or "
            "answered), answered empty at the gateway.",
            ["environment", "outcome"],
            registry=r,
        )
        self.polls_waiting = Gauge(
            f"{PREFIX}_polls_waiting",
            "Long polls held at the gateway for an upstream slot.",
            ["environment"],
            registry=r,
        )
        self.loop_lag_seconds = Histogram(
            f"{PREFIX}_event_loop_lag_seconds",
            "How late the event loop ran a timer (sampled 20 times a second): the wait of a ready request.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.overload = Gauge(
            f"{PREFIX}_overload_level",
            "0 calm; 1 long polls answered empty at the gateway; 2 also new requests but lease calls refused 503.",
            registry=r,
        )
        self.polls_shed_share_gauge = Gauge(
            f"{PREFIX}_overload_polls_shed_share",
            "The share of long polls answered empty at the gateway at the first overload level (1 at the second).",
            registry=r,
        )
        self.shed = Counter(
            f"{PREFIX}_requests_shed",
            "Requests shed while overloaded: polls answered_empty (null, as an empty queue) or refused (503).",
            ["route", "action"],
            registry=r,
        )
        self.session_discoveries = Counter(
            f"{PREFIX}_session_discoveries",
            "Sessions whose environment the gateway asked the API for, by result.",
            ["result"],
            registry=r,
        )
        self.credentials_chosen = Counter(
            f"{PREFIX}_credentials_injected",
            "Client-token requests sent upstream with a gateway-held key, by route and kind of key.",
            ["route", "credential"],
            registry=r,
        )
        self.pool_limit = Gauge(
            f"{PREFIX}_upstream_pool_limit", "Upstream exchanges a class may have at once.", ["pool"], registry=r
        )
        self.pool_wait = Histogram(
            f"{PREFIX}_upstream_pool_wait_seconds",
            "Time a request waited for an upstream connection of its class (only those that waited).",
            ["pool"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.pool_refusals = Counter(
            f"{PREFIX}_upstream_pool_refused",
            "Requests answered 503 for want of an upstream connection of their class.",
            ["pool", "reason"],
            registry=r,
        )
        self.config_reloads = Counter(
            f"{PREFIX}_config_reloads",
            "Configuration reloads (SIGHUP), by result.",
            ["result"],
            registry=r,
        )
        Gauge(f"{PREFIX}_build_info", "The running version.", ["version"], registry=r).labels(__version__).set(1)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self._initialise()
        self.set_environments(settings)

    def set_environments(self, settings: Settings) -> None:
        """Name the configured environments (again, after a reload); new ones start at zero."""
        self._labels = {env.id: env.label for env in settings.environments}
        envs = self.environments = (*dict.fromkeys(self._labels.values()), OTHER)
        _start_at_zero(
            (self.heartbeats, envs, OUTCOMES),
            (self.leases_lost, envs, LOST_REASONS),
            (self.work_stops, envs, STOP_STATES),
            (self.conflicts, envs),
            (self.lease_remaining, envs),
            (self.polls, envs, POLL_OUTCOMES),
            (self.polls_waiting, envs),
        )

    def _initialise(self) -> None:
        pools = tuple(pool.value for pool in PoolName)
        _start_at_zero(
            (self.requests, ROUTES, CLIENT_CODES),
            (self.upstream_requests, ROUTES, UPSTREAM_CODES),
            (self.upstream_errors, ROUTES, ERROR_KINDS),
            (self.request_duration, ROUTES),
            (self.upstream_duration, ROUTES),
            (self.upstream_retries, ROUTES),
            (self.shed, ROUTES, SHED_ACTIONS),
            (self.internal_errors, FAILSAFE_POINTS),
            (self.config_reloads, ("success", "failure")),
            (self.session_discoveries, DISCOVERY_RESULTS),
            (self.pool_wait, pools),
            (self.pool_refusals, pools, POOL_REFUSALS),
            (self.credentials_chosen, ROUTES, CREDENTIAL_KINDS),
        )

    def environment(self, environment_id: str | None) -> str:
        return self._labels.get(environment_id or "", OTHER)

    def track_pools(self, counts: Callable[[], Mapping[PoolName, tuple[int, int]]]) -> None:
        """Export each class's connections in use and requests queued, read from its gate when scraped."""
        self._pools = counts

    def track_leases(self, counts: Callable[[], TableCounts]) -> None:
        """Export the lease table as gauges, from counts the core keeps as leases change."""
        self.registry.register(_LeaseTableCollector(counts, self))

    # -- the client-facing side -------------------------------------------------------

    def request_started(self, route: str) -> None:
        self._inflight[route] += 1

    def request_finished(self, route: str, status: int, seconds: float, exemplar: dict[str, str] | None = None) -> None:
        """`exemplar`: the request's trace, when it was sampled (shown in the OpenMetrics exposition)."""
        self._inflight[route] -= 1
        self.request_refused(route, status, seconds, exemplar)

    def request_refused(self, route: str, status: int, seconds: float, exemplar: dict[str, str] | None = None) -> None:
        """A request answered before its route was known (or without raising the in-flight gauge)."""
        self._child(self.requests, route, str(status)).inc()
        self._child(self.request_duration, route).observe(seconds, exemplar)

    def heartbeat_answered(self, environment_id: str, outcome: Outcome, lost_reason: LostReason | None) -> None:
        env = self.environment(environment_id)
        self._child(self.heartbeats, env, outcome).inc()
        if lost_reason is not None:
            self._child(self.leases_lost, env, lost_reason).inc()
            if lost_reason is not LostReason.NOT_EXTENDED:
                self._child(self.conflicts, env).inc()

    def credential_injected(self, route: str, credential: str) -> None:
        self._child(self.credentials_chosen, route, credential).inc()

    def request_shed(self, route: str, action: str) -> None:
        self._child(self.shed, route, action).inc()

    # -- OverloadObserver -------------------------------------------------------------

    def loop_lag(self, seconds: float) -> None:
        self.loop_lag_seconds.observe(seconds)

    def overload_level(self, level: int) -> None:
        self.overload.set(level)

    def polls_shed_share(self, share: float) -> None:
        self.polls_shed_share_gauge.set(share)

    # -- CapacityObserver -------------------------------------------------------------

    def pool_sized(self, pool: PoolName, limit: int) -> None:
        self.pool_limit.labels(pool.value).set(limit)

    def pool_waited(self, pool: PoolName, seconds: float) -> None:
        self._child(self.pool_wait, pool.value).observe(seconds)

    def pool_refused(self, pool: PoolName, reason: str) -> None:
        self._child(self.pool_refusals, pool.value, reason).inc()

    # -- PollObserver -------------------------------------------------------------------

    def poll_admitted(self, environment_id: str, outcome: PollOutcome, held: int) -> None:
        env = self.environment(environment_id)
        self._child(self.polls, env, outcome).inc()
        self._child(self.polls_waiting, env).set(held)

    # -- DiscoveryObserver ------------------------------------------------------------

    def session_discovered(self, result: str) -> None:
        self.session_discoveries.labels(result).inc()

    # -- UpstreamObserver -----------------------------------------------------------

    def upstream_answered(
        self, route: str, status: int, seconds: float, exemplar: dict[str, str] | None = None
    ) -> None:
        self._child(self.upstream_requests, route, str(status)).inc()
        self._child(self.upstream_duration, route).observe(seconds, exemplar)

    def upstream_failed(self, route: str, kind: UpstreamErrorKind) -> None:
        self.upstream_errors.labels(route, kind).inc()

    # -- HeartbeatObserver ------------------------------------------------------------

    def retried(self, route: str) -> None:
        self.upstream_retries.labels(route).inc()

    def lease_event(self, environment_id: str, kind: LeaseEventKind, reason: LostReason | None) -> None:
        env = self.environment(environment_id)
        if kind in STOP_STATES:
            self.work_stops.labels(env, kind).inc()
        elif kind is LeaseEventKind.EXPIRED:
            self.leases_lost.labels(env, LostReason.EXPIRED).inc()
        elif kind is LeaseEventKind.EVICTED:
            self.lease_evictions.inc()

    def lease_remaining_at_beat(self, environment_id: str, seconds: float) -> None:
        self._child(self.lease_remaining, self.environment(environment_id)).observe(max(0.0, seconds))

    def internal_error(self, where: FailsafePoint) -> None:
        self.internal_errors.labels(where).inc()


class _LiveGauges:
    """Gauges read when scraped: requests in flight by route, and each upstream class's connections in use
    and requests queued. Every route and class is listed, at 0 before its first request."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        inflight = GaugeMetricFamily(f"{PREFIX}_inflight_requests", "Client requests being served.", labels=["route"])
        counts = self._metrics._inflight
        for route in dict.fromkeys((*ROUTES, *counts)):
            inflight.add_metric([route], counts[route])
        yield inflight
        pools = self._metrics._pools()
        in_use = GaugeMetricFamily(
            f"{PREFIX}_upstream_pool_connections",
            "Upstream exchanges in progress, by class of capacity.",
            labels=["pool"],
        )
        queued = GaugeMetricFamily(
            f"{PREFIX}_upstream_pool_queued",
            "Requests waiting for an upstream connection, by class.",
            labels=["pool"],
        )
        for pool in PoolName:
            used, waiting = pools.get(pool, (0, 0))
            in_use.add_metric([pool.value], used)
            queued.add_metric([pool.value], waiting)
        yield in_use
        yield queued


class _Children:
    """`metric.labels(*labels)`, remembered: on the request path, labels() costs a lock and a check.

    Status codes are bounded in practice (the HTTP set), and every other label is, so this stays small.
    """

    def __init__(self) -> None:
        self._known: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: MetricWrapperBase, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._known.get(key)
        if child is None:
            child = self._known[key] = metric.labels(*labels)
        return child


def _start_at_zero(*series: tuple[Any, ...]) -> None:
    """Each `(metric, values of its first label, values of its second, ...)`: a series for every combination,
    so a dashboard and a `rate()` see 0 before the first event rather than nothing."""
    for metric, *label_values in series:
        for labels in itertools.product(*label_values):
            metric.labels(*labels)


class _LeaseTableCollector:
    """`heartbeat_gateway_leases{environment,state}` and the shortest lease TTL seen, per environment."""

    def __init__(self, table: Callable[[], TableCounts], metrics: GatewayMetrics) -> None:
        self._table = table
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        # A few rows per environment id, whatever the number of leases: a scrape costs nothing per lease.
        by_state, active_ttls = self._table()
        counts: Tally[tuple[str, str]] = Tally()
        shortest: dict[str, int] = {}
        for (environment_id, state), rows in by_state.items():
            counts[(self._metrics.environment(environment_id), state)] += rows
        for environment_id, seconds in active_ttls.items():
            env = self._metrics.environment(environment_id)
            shortest[env] = min(shortest.get(env, seconds), seconds)
        leases = GaugeMetricFamily(
            f"{PREFIX}_leases", "Leases in the gateway's table.", labels=["environment", "state"]
        )
        for env in self._metrics.environments:
            for state in LEASE_STATES:
                leases.add_metric([env, state], counts[(env, state)])
        yield leases
        ttl = GaugeMetricFamily(
            f"{PREFIX}_lease_ttl_seconds",
            "The shortest TTL among active leases in the table (absent when there are none).",
            labels=["environment"],
        )
        for env, seconds in sorted(shortest.items()):
            ttl.add_metric([env], seconds)
        yield ttl
