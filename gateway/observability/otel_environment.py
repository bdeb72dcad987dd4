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
    """What in the `OTEL_*` variables tracing cannot honour, one line each. As the specification says, an
    empty variable is unset, and a traces-specific one (`OTEL_EXPORTER_OTLP_TRACES_*`) replaces the general."""
    env = {name: value for name, value in environ.items() if name.startswith("OTEL_") and value.strip()}
    problems = []
    exporter = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if exporter not in ("otlp", "none"):
        problems.append(f"OTEL_TRACES_EXPORTER={exporter!r}: only 'otlp' (OTLP over HTTP) or 'none'")
    name, protocol = _effective(env, "PROTOCOL")
    if protocol is not None and protocol.strip().lower() != "http/protobuf":
        problems.append(f"{name}={protocol.strip()!r}: only 'http/protobuf' is supported")
    name, endpoint = _effective(env, "ENDPOINT")
    if endpoint is not None and not _http_url(endpoint.strip()):
        problems.append(f"{name}: not an http:// or https:// URL (not shown: it may hold a credential)")
    name, headers = _effective(env, "HEADERS")
    if headers is not None and not _name_value_pairs(headers):
        problems.append(f"{name}: not name=value pairs separated by commas (not shown: it may hold a key)")
    name, timeout = _effective(env, "TIMEOUT")
    if timeout is not None and not _number(timeout, above=0.0):
        problems.append(f"{name}={timeout.strip()!r}: a positive number (milliseconds)")
    name, compression = _effective(env, "COMPRESSION")
    if compression is not None and compression.strip().lower() not in ("gzip", "deflate", "none"):
        problems.append(f"{name}={compression.strip()!r}: gzip, deflate or none")
    if "OTEL_PROPAGATORS" in env:
        # The SDK looks each name up as it is written, after trimming spaces.
        named = [p.strip() for p in env["OTEL_PROPAGATORS"].split(",")]
        if unknown := [p for p in named if p not in PROPAGATORS]:
            shown = ", ".join(repr(p) for p in unknown)
            problems.append(f"OTEL_PROPAGATORS: {shown} not available (tracecontext, baggage or none, in lower case)")
    # The SDK lower-cases the sampler's name but does not trim it, and falls back to sampling everything.
    sampler = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").lower()
    if sampler not in SAMPLERS:
        problems.append(f"OTEL_TRACES_SAMPLER={sampler!r}: one of {', '.join(sorted(SAMPLERS))}")
    elif sampler.endswith("traceidratio") and not _number(env.get("OTEL_TRACES_SAMPLER_ARG", "1.0"), at_most=1.0):
        problems.append("OTEL_TRACES_SAMPLER_ARG: a share of traces to sample, from 0 to 1")
    sizes = {}
    for name in POSITIVE_INTEGERS:
        value = env.get(name)
        if value is None:
            continue
        try:
            sizes[name] = int(value.strip())
        except ValueError:
            sizes[name] = 0
        if sizes[name] <= 0:
            problems.append(f"{name}={value.strip()!r}: a positive whole number")
    queue, batch = sizes.get("OTEL_BSP_MAX_QUEUE_SIZE", 2048), sizes.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
    if 0 < queue < batch:
        problems.append(f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE ({batch}) is larger than OTEL_BSP_MAX_QUEUE_SIZE ({queue})")
    return problems


def _effective(env: Mapping[str, str], setting: str) -> tuple[str, str | None]:
    """The variable that sets an exporter setting, and its value: the traces-specific one, else the general."""
    for name in (f"OTEL_EXPORTER_OTLP_TRACES_{setting}", f"OTEL_EXPORTER_OTLP_{setting}"):
        if name in env:
            return name, env[name]
    return f"OTEL_EXPORTER_OTLP_{setting}", None


def _http_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        return False


def _name_value_pairs(value: str) -> bool:
    items = [item.strip() for item in value.split(",") if item.strip()]
    return all("=" in item and item.partition("=")[0].strip() for item in items)


def _number(value: str, *, above: float | None = None, at_most: float | None = None) -> bool:
    try:
        number = float(value)
    except ValueError:
        return False
    if above is not None and not number > above:
        return False
    return number >= 0.0 and (at_most is None or number <= at_most)
