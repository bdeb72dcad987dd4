"""The standard `OTEL_*` variables checked before tracing starts: refused with the config, never a traceback.

OpenTelemetry reads them itself, and on a value it cannot use it raises at
import (`OTEL_PROPAGATORS=b3` without that package), raises when the tracer
is built (`OTEL_BSP_MAX_QUEUE_SIZE=0`), logs the value back (a malformed
`OTEL_EXPORTER_OTLP_HEADERS`, which holds a backend's key) or quietly falls
back to something else. Each is a config problem here, named by its variable;
a value that may hold a credential (an endpoint, the headers) is never shown.
No OpenTelemetry import: this runs whether or not the extra is installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

__all__ = ["otel_environment_problems"]

SAMPLERS = frozenset(
    {
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    }
)
# The propagators the SDK ships; others (b3, jaeger, ...) are packages of their own.
PROPAGATORS = frozenset({"tracecontext", "baggage", "none"})
POSITIVE_INTEGERS = (
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_EXPORT_TIMEOUT",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT",
)


def otel_environment_problems(environ: Mapping[str, str]) -> list[str]:
    """What in the `OTEL_*` variables tracing cannot honour, one line each."""
    problems = []
    exporter = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if exporter != "otlp":
        problems.append(f"OTEL_TRACES_EXPORTER={exporter!r}: only 'otlp' (OTLP over HTTP) is supported")
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = environ.get(name)
        if protocol is not None and protocol.strip().lower() != "http/protobuf":
            problems.append(f"{name}={protocol.strip()!r}: only 'http/protobuf' is supported")
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        endpoint = environ.get(name)
        if endpoint is not None and not _http_url(endpoint.strip()):
            problems.append(f"{name}: not an http:// or https:// URL (not shown: it may hold a credential)")
    for name in ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"):
        headers = environ.get(name)
        if headers is not None and not _name_value_pairs(headers):
            problems.append(f"{name}: not name=value pairs separated by commas (not shown: it may hold a key)")
    propagators = {p.strip().lower() for p in environ.get("OTEL_PROPAGATORS", "tracecontext,baggage").split(",")}
    if unknown := sorted(propagators - PROPAGATORS - {""}):
        problems.append(f"OTEL_PROPAGATORS: {', '.join(unknown)} not available (tracecontext, baggage or none)")
    sampler = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if sampler not in SAMPLERS:
        problems.append(f"OTEL_TRACES_SAMPLER={sampler!r}: one of {', '.join(sorted(SAMPLERS))}")
    elif sampler.endswith("traceidratio") and not _ratio(environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0")):
        problems.append("OTEL_TRACES_SAMPLER_ARG: a share of traces to sample, from 0 to 1")
    for name in POSITIVE_INTEGERS:
        value = environ.get(name)
        if value is not None and not (value.strip().isdigit() and int(value) > 0):
            problems.append(f"{name}={value.strip()!r}: a positive whole number")
    return problems


def _http_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _name_value_pairs(value: str) -> bool:
    items = [item.strip() for item in value.split(",") if item.strip()]
    return all("=" in item and item.partition("=")[0].strip() for item in items)


def _ratio(value: str) -> bool:
    try:
        share = float(value)
    except ValueError:
        return False
    return 0.0 <= share <= 1.0
