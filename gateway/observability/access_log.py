"""One log record per client request, filled in along the request path.

Handlers write what they learn (route, environment, upstream status,
heartbeat outcome) into the request's `Exchange`; the access-log middleware
emits it once the response is done. Fields are templates and ids, never
raw paths, query strings or header values.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from aiohttp import web

from .logs import direct_lines

if TYPE_CHECKING:
    from .tracing import SpanRef

__all__ = ["EXCHANGE", "Exchange", "log_exchange"]

log = logging.getLogger("gateway.access")


@dataclass(slots=True)
class Exchange:
    method: str
    route: str = "other"
    path_template: str = "/…"
    environment: str | None = None
    work_id: str | None = None
    status: int | None = None
    duration_ms: float | None = None
    upstream_status: int | None = None
    request_id: str | None = None
    heartbeat_outcome: str | None = None
    # A long poll's way through the gateway: forwarded, held_then_forwarded, answered_empty or shed.
    poll: str | None = None
    error: str | None = None
    # Whether the in-flight gauge was raised for this request (only once its route is known).
    counted_inflight: bool = False
    # The request's server span, when tracing is on (`gateway.observability.tracing`).
    trace: SpanRef | None = None


EXCHANGE = web.RequestKey("exchange", Exchange)
# Ids and durations differ from request to request; the other fields take few values.
_VARYING_FIELDS = ("work_id", "duration_ms", "request_id")
_CONSTANT_FIELDS = tuple(
    f.name for f in fields(Exchange) if f.name not in ("counted_inflight", "trace", *_VARYING_FIELDS)
)


# Routes whose successful requests are routine: a fleet sends them all the time.
ROUTINE_ROUTES = frozenset({"heartbeat", "poll"})


def log_exchange(exchange: Exchange, sample_routine: float = 1.0, exemplar: dict[str, str] | None = None) -> None:
    """`exemplar`: the request's sampled trace (`SpanRef.exemplar`, made once for the metrics and this line)."""
    if not log.isEnabledFor(logging.INFO):
        return
    routine = exchange.route in ROUTINE_ROUTES and exchange.error is None and (exchange.status or 500) < 400
    if routine and sample_routine < 1.0 and random.random() >= sample_routine:
        return
    # What repeats across a fleet's requests (the line's head, encoded once per distinct set), and what does not.
    fields: dict[str, object] = {"event": "request"}
    for name in _CONSTANT_FIELDS:
        if (value := getattr(exchange, name)) is not None:
            fields[name] = value
    varying: dict[str, object] = {}
    for name in _VARYING_FIELDS:
        if (value := getattr(exchange, name)) is not None:
            varying[name] = value
    if exemplar is not None:
        # The line a trace search starts from (only a sampled trace can be found).
        varying["trace_id"] = exemplar["trace_id"]
    message = f"{exchange.method} {exchange.path_template} {exchange.status}"
    direct = direct_lines(log)
    if direct is not None:
        direct.write(log.name, message, fields, varying)
        return
    log.info("%s", message, extra={"fields": fields | varying})
