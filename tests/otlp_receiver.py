"""An OTLP/HTTP trace receiver in a process of its own: what the tests stand up where a collector would be.

No OpenTelemetry Collector or Jaeger installs here, so this is the smallest
faithful one: `POST /v1/traces` takes an `ExportTraceServiceRequest` (protobuf,
gzip or not, as the SDK's exporter sends it) and answers as a collector does;
`GET /spans` returns every span received so far as JSON (ids in hex, attribute
values as plain values), for a test to read.

    python tests/otlp_receiver.py --port 4318
"""

from __future__ import annotations

import argparse
import gzip
from typing import Any

from aiohttp import ClientSession, web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

SPANS = web.AppKey("spans", list[dict[str, Any]])


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind) if kind is not None else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs if isinstance(pair, KeyValue)}


def spans_of(request: ExportTraceServiceRequest) -> list[dict[str, Any]]:
    out = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append(
                    {
                        "resource": resource,
                        "scope": scope_spans.scope.name,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "trace_state": span.trace_state,
                        "name": span.name,
                        "kind": span.kind,
                        "start_ns": span.start_time_unix_nano,
                        "end_ns": span.end_time_unix_nano,
                        "attributes": _attributes(span.attributes),
                        "events": [{"name": e.name, "attributes": _attributes(e.attributes)} for e in span.events],
                        "links": [{"trace_id": k.trace_id.hex(), "span_id": k.span_id.hex()} for k in span.links],
                        "status": span.status.code,
                    }
                )
    return out


async def receive(request: web.Request) -> web.Response:
    body = await request.read()
    if request.headers.get("Content-Encoding", "").lower() == "gzip":
        body = gzip.decompress(body)
    message = ExportTraceServiceRequest()
    message.ParseFromString(body)
    request.app[SPANS].extend(spans_of(message))
    return web.Response(body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf")


async def listed(request: web.Request) -> web.Response:
    return web.json_response(request.app[SPANS])


async def received(url: str) -> list[dict[str, Any]]:
    """What the receiver at `url` has been sent so far."""
    async with ClientSession() as session, session.get(f"{url}/spans") as r:
        spans: list[dict[str, Any]] = await r.json()
        return spans


def create_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[SPANS] = []
    app.router.add_post("/v1/traces", receive)
    app.router.add_get("/spans", listed)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(create_app(), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
