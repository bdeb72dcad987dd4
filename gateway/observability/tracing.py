"""OpenTelemetry traces of the lease story: the one module that speaks OpenTelemetry (the `otel` extra).

Imported only when `tracing.enabled` is true (`gateway.app`): with tracing off no
OpenTelemetry code is loaded, and no request pays for it.

- A **server span** per worker request (`gateway.edge.middleware.tracing_middleware`),
  continuing the worker's W3C `traceparent`/`tracestate`.
- A **flight span** per coalesced upstream heartbeat (`gateway.heartbeat.driver`): the
  parent of its upstream call (or calls, when one that surely never landed is retried),
  and the span every worker span its answer reached links to, but the one that started it.
  An answer given here (absorbed, rejected, throttled) has none.
- A **client span** per upstream exchange (`TracedUpstream`): its context is the
  `traceparent` the API is sent.
- **Lease events** (claimed, lost with its reason, stopped, expired, ...) on the span in
  which they were decided; one the lease table's own timer decides gets a short span.

What a span may carry is fixed here: methods, route templates and names, environment
labels, work ids (as the access log has them), statuses, outcomes and error kinds. Never
a header value, a key or token, a query string or a raw path.

Tracing never costs a request or a lease: every entry point here catches what
OpenTelemetry raises (a header it cannot parse, a bug), says so in one throttled log
line, and carries on untraced.

Where spans go, how many are sampled and the resource are the standard `OTEL_*`
variables, checked at start (`otel_environment`), read by the SDK. Spans leave through a `BatchSpanProcessor`: its own
thread and a bounded queue that drops when full, so the event loop never waits for an
export, and memory stays bounded when the collector is down. Shutting down waits for
the last export on a thread, for a bounded time (`Tracing.close`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import INVALID_SPAN, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue
from yarl import URL

from gateway import __version__
from gateway.errors import UpstreamError
from gateway.policy.redaction import REDACTED, Redactor
from gateway.upstream.client import Upstream, UpstreamRequest, UpstreamResponse

from .logs import QuietLog
from .otel_environment import otel_environment_problems

if TYPE_CHECKING:
    from gateway.observability.access_log import Exchange

__all__ = ["FlightLink", "SpanRef", "TracedUpstream", "Tracing", "TracingUnavailable"]

log = logging.getLogger("gateway.tracing")
# The W3C trace-context fields: what a worker sent of them never goes upstream as it came.
_TRACE_CONTEXT = frozenset({"traceparent", "tracestate"})
# The longest attribute value kept, unless OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT says otherwise.
MAX_ATTRIBUTE_LENGTH = 256
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


SERVICE_NAME = "heartbeat-gateway"
# How long a shutdown waits for the last spans to leave (the exporter's own timeout bounds each try).
CLOSE_SECONDS = 5.0
# Attribute names of the gateway's own, beside the semantic conventions' http.* ones.
_ENVIRONMENT = "heartbeat_gateway.environment"
_WORK_ID = "heartbeat_gateway.work_id"
_ROUTE = "heartbeat_gateway.route"


class _Trouble:
    """What a tracer failed at, at most one line every 10 s: never the exception's text (it may quote a
    header). One per tracer, with its spans."""

    def __init__(self) -> None:
        self._said = QuietLog(log, logging.WARNING, "tracing_failed", "tracing failed %d time(s), untraced; latest: %s")

    def __call__(self, where: str, error: BaseException) -> None:
        self._said.note(f"{where}: {type(error).__name__}")


class TracingUnavailable(Exception):
    """Tracing is asked for, but cannot be set up as asked (a message for the operator, no secrets)."""


class FlightLink(NamedTuple):
    """What a flight's answer carries for the workers it reaches: the flight span's context, and the server
    span that started it (not linked to itself). Ids only: the lease table keeps answers, never spans."""

    context: SpanContext
    starter: int


@dataclass(frozen=True, slots=True)
class SpanRef:
    """A span the gateway started, as the rest of the gateway holds it: it never calls OpenTelemetry itself."""

    span: Span
    # Its tracer's account of what failed.
    trouble: _Trouble = field(repr=False)
    # The server span a flight was started for (its first worker's), so that one is not linked twice.
    parent: SpanRef | None = None
    # Another's span standing in (a flight under an unsampled request, or one that could not be started):
    # told nothing, never ended here.
    borrowed: bool = False

    @property
    def exemplar(self) -> dict[str, str] | None:
        """A sampled span's ids, as a Prometheus exemplar and the access line's trace_id; None when not
        sampled (there is no trace to go to). Made when asked for: a flight's never is."""
        try:
            context = self.span.get_span_context()
            if not context.trace_flags.sampled:
                return None
            return {
                "trace_id": trace.format_trace_id(context.trace_id),
                "span_id": trace.format_span_id(context.span_id),
            }
        except Exception as error:
            self.trouble("exemplar", error)
            return None

    @property
    def link(self) -> FlightLink | None:
        """What the workers a flight answers link to; None if nothing can be."""
        try:
            starter = self.parent.span.get_span_context().span_id if self.parent is not None else 0
            return FlightLink(self.span.get_span_context(), starter)
        except Exception as error:
            self.trouble("link", error)
            return None

    def link_to(self, flight: FlightLink) -> None:
        """This span's answer came from `flight` (one another worker's beat started, or its own earlier one)."""
        try:
            own = self.span.get_span_context().span_id
            # An unsampled flight was never exported: a link to it would lead nowhere.
            if flight.context.trace_flags.sampled and own not in (flight.context.span_id, flight.starter):
                self.span.add_link(flight.context)
        except Exception as error:
            self.trouble("link", error)


class Tracing:
    """The gateway's tracer: spans started and ended where the lease story happens."""

    def __init__(self, provider: TracerProvider, *, upstream_url: str) -> None:
        self._provider = provider
        self._trouble = _Trouble()
        # The secrets the gateway holds now, kept out of the one attribute a client writes (the work id,
        # read from the path); the composition root gives the live settings' redactor.
        self.redactor: Callable[[], Redactor] = lambda: Redactor(())
        self._tracer = provider.get_tracer("heartbeat-gateway", __version__)
        # OTEL_PROPAGATORS (W3C trace context and baggage unless set otherwise).
        self._propagator = propagate.get_global_textmap()
        upstream = URL(upstream_url)
        self._server: dict[str, AttributeValue] = {"server.address": upstream.host or ""}
        if upstream.port is not None:
            self._server["server.port"] = upstream.port
        # Whether a span under an unsampled one is never sampled, as with every sampler OTEL_TRACES_SAMPLER
        # names (parent-based ones follow the parent; a ratio decides by the trace id, the same for the
        # whole trace): then no span of the gateway's is made under an unsampled request, only its context
        # passed on, and most requests at a low sampling ratio cost a fraction of a traced one.
        sampler = provider.sampler.get_description()
        self._unsampled_stays = (
            sampler in ("AlwaysOffSampler", "AlwaysOnSampler")
            or sampler.startswith("TraceIdRatioBased")
            or "localParentNotSampled:AlwaysOffSampler" in sampler
        )

    def _unkept(self, parent: SpanRef | None) -> bool:
        """A span under `parent` would never be kept: it is not made (called inside a guard)."""
        return parent is not None and self._unsampled_stays and not parent.span.is_recording()

    @classmethod
    def from_environment(cls, upstream_url: str) -> Tracing:
        """As the `OTEL_*` variables say: the endpoint, headers and timeout (`OTEL_EXPORTER_OTLP_*`),
        the sampler (`OTEL_TRACES_SAMPLER[_ARG]`), the resource (`OTEL_SERVICE_NAME`,
        `OTEL_RESOURCE_ATTRIBUTES`) and the batching (`OTEL_BSP_*`)."""
        problems = otel_environment_problems(os.environ)
        if problems:
            raise TracingUnavailable("; ".join(problems))
        if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
            # Contexts are continued and passed upstream, but no span leaves the process.
            return cls.with_processor(None, upstream_url=upstream_url)
        return cls.with_processor(BatchSpanProcessor(OTLPSpanExporter()), upstream_url=upstream_url)

    @classmethod
    def with_processor(cls, processor: SpanProcessor | None, *, upstream_url: str) -> Tracing:
        resource = Resource.create({"service.version": __version__})
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
        # A value a client wrote (a junk work id) is cut short, as the log's fields are.
        limit = None if "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT" in os.environ else MAX_ATTRIBUTE_LENGTH
        # The exit hook would flush on the main thread, holding the process up; `close` does it bounded.
        provider = TracerProvider(
            resource=resource, span_limits=SpanLimits(max_attribute_length=limit), shutdown_on_exit=False
        )
        if processor is not None:
            provider.add_span_processor(processor)
        return cls(provider, upstream_url=upstream_url)

    # -- server spans (one per worker request) ----------------------------------------

    def start_server(self, method: str, headers: Mapping[str, str]) -> SpanRef:
        """A worker request's span, continuing the trace its `traceparent` names (if valid)."""
        try:
            parent = self._propagator.extract(headers)
            span = self._tracer.start_span(_method(method), context=parent, kind=SpanKind.SERVER)
            return SpanRef(span, self._trouble)
        except Exception as error:  # a header the propagator chokes on: the request goes on untraced
            self._trouble("server span", error)
            return SpanRef(INVALID_SPAN, self._trouble)

    def finish_server(self, ref: SpanRef, exchange: Exchange, status: int) -> None:
        """Named and described once the request is done, from what the request path wrote down."""
        try:
            self._describe(ref.span, exchange, status)
        except Exception as error:
            self._trouble("server span", error)
        finally:
            with contextlib.suppress(Exception):
                ref.span.end()

    def _describe(self, span: Span, exchange: Exchange, status: int) -> None:
        if not span.is_recording():  # not sampled: nothing it is told is kept
            return
        method = _method(exchange.method)
        span.update_name(f"{method} {exchange.path_template}")
        attributes: dict[str, AttributeValue] = {
            "http.request.method": method,
            "http.route": exchange.path_template,
            "http.response.status_code": status,
            _ROUTE: exchange.route,
        }
        for name, value in (
            (_ENVIRONMENT, exchange.environment),
            (_WORK_ID, self._scrubbed(exchange.work_id)),
            ("heartbeat_gateway.heartbeat.outcome", exchange.heartbeat_outcome),
            ("heartbeat_gateway.poll", exchange.poll),
            ("error.type", exchange.error),
        ):
            if value is not None:
                attributes[name] = value
        span.set_attributes(attributes)
        if status >= 500:
            if exchange.error is None:
                span.set_attribute("error.type", str(status))
            span.set_status(Status(StatusCode.ERROR))

    def _scrubbed(self, work_id: str | None) -> str | None:
        """The work id, which is whatever a client put in the path: never a secret the gateway holds."""
        if work_id is None:
            return None
        work_id = self.redactor().text(work_id)
        return REDACTED if "sk-ant-" in work_id else work_id

    @contextlib.contextmanager
    def current(self, ref: SpanRef) -> Iterator[None]:
        """`ref` as the current span (of this task), for what is decided inside: lease events, discoveries."""
        token = None
        try:
            token = otel_context.attach(trace.set_span_in_context(ref.span))
        except Exception as error:
            self._trouble("context", error)
        try:
            yield
        finally:
            if token is not None:
                try:
                    otel_context.detach(token)
                except Exception as error:
                    self._trouble("context", error)

    # -- flights (one upstream heartbeat, whoever waits for it) -----------------------

    def start_flight(self, parent: SpanRef | None, environment: str, work_id: str) -> SpanRef:
        """The span of one upstream heartbeat, under the beat whose request it sends (`parent`)."""
        try:
            if parent is not None and self._unkept(parent):
                return _stand_in(parent)  # unsampled: nothing a flight span is told would be kept
            context = trace.set_span_in_context(parent.span) if parent is not None else None
            attributes: dict[str, AttributeValue] = {_ENVIRONMENT: environment}
            if (scrubbed := self._scrubbed(work_id)) is not None:
                attributes[_WORK_ID] = scrubbed
            span = self._tracer.start_span("heartbeat flight", context=context, kind=SpanKind.INTERNAL)
            span.set_attributes(attributes)
            return SpanRef(span, self._trouble, parent)
        except Exception as error:
            self._trouble("flight span", error)
            return _stand_in(parent) if parent is not None else SpanRef(INVALID_SPAN, self._trouble)

    def finish_flight(self, ref: SpanRef, result: str) -> None:
        """`result`: what the flight brought back (succeeded, rejected, unsuccessful, failed or cancelled)."""
        if ref.borrowed:
            return
        try:
            ref.span.set_attribute("heartbeat_gateway.flight.result", result)
            if result in ("failed", "cancelled"):
                ref.span.set_status(Status(StatusCode.ERROR))
        except Exception as error:
            self._trouble("flight span", error)
        finally:
            with contextlib.suppress(Exception):
                ref.span.end()

    # -- lease events ------------------------------------------------------------------

    def lease_event(self, kind: str, reason: str | None, environment: str, work_id: str) -> None:
        """On the span it was decided in; a timer's decision (no span current) gets one of its own."""
        try:
            attributes: dict[str, AttributeValue] = {_ENVIRONMENT: environment}
            if (scrubbed := self._scrubbed(work_id)) is not None:
                attributes[_WORK_ID] = scrubbed
            if reason is not None:
                attributes["heartbeat_gateway.lease.reason"] = reason
            name = f"lease {kind}"
            span = trace.get_current_span()
            if span.get_span_context().is_valid:
                span.add_event(name, attributes)
                return
            with self._tracer.start_as_current_span(name, kind=SpanKind.INTERNAL, attributes=attributes) as own:
                own.add_event(name, attributes)
        except Exception as error:
            self._trouble("lease event", error)

    # -- client spans (one per upstream exchange) ----------------------------------------

    def traced(self, upstream: Upstream) -> Upstream:
        """`upstream`, every exchange of which is a client span."""
        return TracedUpstream(upstream, self)

    @asynccontextmanager
    async def client(self, inner: Upstream, request: UpstreamRequest) -> AsyncIterator[UpstreamResponse]:
        """`request` sent through `inner` in a client span, whose context the API is sent instead of the worker's."""
        span, outbound = self._client_span(request)
        try:
            async with inner.exchange(outbound) as response:
                self._answered(span, response.status)
                yield response
        except UpstreamError as error:
            self._failed(span, error.kind)
            raise
        except asyncio.CancelledError:
            self._failed(span, "cancelled")
            raise
        except BaseException as error:  # the worker's side broke off (a stream it stopped reading)
            self._failed(span, type(error).__name__)
            raise
        finally:
            with contextlib.suppress(Exception):
                span.end()

    def _client_span(self, request: UpstreamRequest) -> tuple[Span, UpstreamRequest]:
        """The exchange's span, and the request carrying its context; untraced if that cannot be done."""
        try:
            if request.trace is not None and self._unkept(request.trace):
                # Unsampled: the API is sent the request's context, and no span is made that would not be kept.
                return INVALID_SPAN, self._carrying(request, request.trace)
            parent = trace.set_span_in_context(request.trace.span) if request.trace is not None else None
            method = _method(request.method)
            span = self._tracer.start_span(
                f"{method} {request.route}",
                context=parent,
                kind=SpanKind.CLIENT,
                attributes={**self._server, "http.request.method": method, _ROUTE: request.route},
            )
            return span, self._carrying(request, SpanRef(span, self._trouble, request.trace))
        except Exception as error:
            self._trouble("client span", error)
            return INVALID_SPAN, request

    def _carrying(self, request: UpstreamRequest, ref: SpanRef) -> UpstreamRequest:
        """`request` with `ref`'s context in place of any the worker sent. The W3C fields always go (a
        worker's `tracestate` belongs to its `traceparent`); its baggage goes on as it came."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=trace.set_span_in_context(ref.span))
        replaced = _TRACE_CONTEXT.union(name.lower() for name in carrier)
        headers = tuple((k, v) for k, v in request.headers if k.lower() not in replaced) + tuple(carrier.items())
        return dataclasses.replace(request, headers=headers, trace=ref)

    def _answered(self, span: Span, status: int) -> None:
        try:
            span.set_attribute("http.response.status_code", status)
            if status >= 400:
                span.set_attribute("error.type", str(status))
                span.set_status(Status(StatusCode.ERROR))
        except Exception as error:
            self._trouble("client span", error)

    def _failed(self, span: Span, kind: str) -> None:
        try:
            span.set_attribute("error.type", kind)
            span.set_status(Status(StatusCode.ERROR))
        except Exception as error:
            self._trouble("client span", error)

    # -- the exporter --------------------------------------------------------------------

    async def close(self) -> None:
        """Send what is queued and stop the exporter, on a thread: a collector that is down holds a
        drain up for `CLOSE_SECONDS` at most, and never blocks the event loop (`force_flush` would)."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def shut_down() -> None:
            try:
                self._provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                    loop.call_soon_threadsafe(_settle, done)

        threading.Thread(target=shut_down, name="otel-shutdown", daemon=True).start()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_SECONDS):
                await done


class TracedUpstream:
    """An `Upstream` whose every exchange is a client span (`Tracing.client`)."""

    def __init__(self, inner: Upstream, tracing: Tracing) -> None:
        self._inner = inner
        self._tracing = tracing

    def exchange(self, request: UpstreamRequest) -> AbstractAsyncContextManager[UpstreamResponse]:
        return self._tracing.client(self._inner, request)

    async def close(self) -> None:
        await self._inner.close()


def _stand_in(ref: SpanRef) -> SpanRef:
    """`ref`'s span standing in for a flight's: its context carried on, never told or ended as a flight."""
    return SpanRef(ref.span, ref.trouble, ref.parent, borrowed=True)


def _method(method: str) -> str:
    """As the semantic conventions ask: a method aiohttp accepted but HTTP does not name is `_OTHER` (it is
    whatever a client sent)."""
    return method if method in _METHODS else "_OTHER"


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
