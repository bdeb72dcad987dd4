"""Log output: JSON lines (or plain text), with every known secret scrubbed.

Handlers never log headers or bodies; the scrubbing here is the second line
of defence, applied to the final line, exception text included.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TextIO

from aiohttp.http_exceptions import HttpProcessingError

from gateway.config.settings import LoggingSettings
from gateway.policy.redaction import REDACTED, Redactor

__all__ = ["DirectLines", "QuietLog", "Scrubber", "configure_logging", "direct_lines"]

# Anthropic keys and tokens the gateway does not hold can still reach a log
# line through a third-party library's message; scrub their shape too.
_KEY_SHAPE = re.compile(r"sk-ant-[A-Za-z0-9_\-]+")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s'\",]+")
# A header line quoted in a parser's error message: keep the name, drop the value.
_CREDENTIAL_HEADER = re.compile(r"(?i)((?:x-api-key|authorization|proxy-authorization|cookie)\s*[:=]\s*)[^\r\n'\",]+")

# Whether any of the three can match, in one pass. `re` is slow at this one
# (45 µs on a 500-character line: a case-insensitive alternation has no
# literal to skip ahead by); for ASCII text, which every JSON line is, the
# lower-cased text's substring scans say the same in 2 µs.
_SHAPE_WORDS = ("bearer", "x-api-key", "authorization", "cookie")
_ANY_SHAPE = re.compile("sk-ant-|(?i:" + "|".join(map(re.escape, _SHAPE_WORDS)) + ")")


def _may_hold_a_shape(text: str) -> bool:
    """False only where none of the scrubbing patterns can match (True may be a false alarm)."""
    if not text.isascii():
        # Unicode case folding reaches past ASCII (the Kelvin sign matches `k`): the regex decides.
        return _ANY_SHAPE.search(text) is not None
    if "sk-ant-" in text:
        return True
    lowered = text.lower()
    return any(word in lowered for word in _SHAPE_WORDS)


class Scrubber:
    def __init__(self, secrets: Iterable[str]) -> None:
        self._redactor = Redactor(secrets)

    def __call__(self, text: str) -> str:
        text = self._redactor.text(text)
        if not _may_hold_a_shape(text):
            return text  # the common case, one scan instead of three substitutions
        text = _KEY_SHAPE.sub(REDACTED, text)
        text = _CREDENTIAL_HEADER.sub(lambda m: m.group(1) + REDACTED, text)
        return _BEARER.sub(lambda m: m.group(1) + REDACTED, text)


# Built once: `json.dumps` with `default` builds an encoder per call.
_ENCODER = json.JSONEncoder(default=str)
# Distinct constant parts of lines kept encoded (`DirectLines.write`): more than a fleet's routes, templates
# and statuses make; past it they are encoded again from scratch.
MAX_LINE_HEADS = 4096
# Every JSON line's own keys, which no field may replace ("exception" is the record's too).
_OWN_KEYS = frozenset({"time", "level", "logger", "message", "exception"})


class _Clock:
    """ISO 8601 UTC times to the millisecond, the date and time of day formatted once a second."""

    def __init__(self) -> None:
        self._second: int | None = None
        self._prefix = ""

    def iso(self, created: float) -> str:
        # Rounded as `datetime.fromtimestamp` rounds, so the two always agree.
        fraction, whole = math.modf(created)
        micros = round(fraction * 1_000_000)
        second = int(whole) + micros // 1_000_000
        micros %= 1_000_000
        if second != self._second:
            # isoformat, not strftime: its year is always four digits.
            self._prefix = datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds").removesuffix("+00:00")
            self._second = second
        return f"{self._prefix}.{micros // 1000:03d}+00:00"


class _JsonFormatter(logging.Formatter):
    def __init__(self, scrub: Scrubber) -> None:
        super().__init__()
        self._scrub = scrub
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        exception = self.formatException(record.exc_info) if record.exc_info else None
        return self.line(
            record.created,
            record.levelname,
            record.name,
            record.getMessage(),
            fields if isinstance(fields, dict) else None,
            exception,
        )

    def line(
        self,
        created: float,
        level: str,
        logger: str,
        message: str,
        fields: dict[str, object] | None,
        exception: str | None = None,
    ) -> str:
        entry: dict[str, object] = {
            "time": self._clock.iso(created),
            "level": level.lower(),
            "logger": logger,
            "message": message,
        }
        if fields:
            entry.update(_own_keys_kept(fields))
        if exception is not None:
            entry["exception"] = exception
        # ASCII escapes keep control and bidi characters from a request out of terminals.
        return self._scrub(_ENCODER.encode(entry))

    def head(self, level: str, logger: str, message: str, fields: dict[str, object]) -> str:
        """A line's members after its time, encoded and scrubbed as `line` does, without the braces."""
        entry: dict[str, object] = {"level": level.lower(), "logger": logger, "message": message}
        entry.update(_own_keys_kept(fields))
        return self._scrub(_ENCODER.encode(entry))[1:-1]

    def line_from(self, created: float, head: str, varying: dict[str, object]) -> str:
        """`line`, its constant members as `head` gave them; `varying` encoded and scrubbed here."""
        if not varying:
            return f'{{"time": "{self._clock.iso(created)}", {head}}}'
        tail = self._scrub(_ENCODER.encode(_own_keys_kept(varying)))[1:-1]
        return f'{{"time": "{self._clock.iso(created)}", {head}, {tail}}}'


def _own_keys_kept(fields: dict[str, object]) -> dict[str, object]:
    """`fields`, less any that would replace the line's own: a consumer filtering on `level` sees the record's."""
    if _OWN_KEYS.isdisjoint(fields):
        return fields
    return {k: v for k, v in fields.items() if k not in _OWN_KEYS}


class DirectLines:
    """Info lines written straight to the handler's stream, in the JSON formatter's own shape.

    For the access log, one line per request: `logging`'s record, caller
    lookup and handler chain cost more than the line itself (the profile in
    docs/benchmarks.md). The line is the formatter's, scrubbed the same way;
    only the filters (which never touch these records) are skipped.
    """

    def __init__(self, handler: logging.StreamHandler[TextIO], formatter: _JsonFormatter) -> None:
        self._handler = handler
        self._formatter = formatter
        # Each distinct message and constant fields, encoded and scrubbed once (`write`'s `varying`).
        self._heads: dict[tuple[str, str, tuple[tuple[str, object], ...]], str] = {}

    def serves(self, logger: logging.Logger) -> bool:
        """Whether `logging` would send this logger's records to this handler and nowhere else
        (no handler put beside it or in its place, a test's capture or an error tracker say)."""
        current: logging.Logger | None = logger
        while current is not None and current.parent is not None:
            if current.handlers or not current.propagate:
                return False
            current = current.parent
        return current is not None and current.handlers == [self._handler]

    def write(
        self, logger: str, message: str, fields: dict[str, object], varying: dict[str, object] | None = None
    ) -> None:
        """One info line of `fields` and `varying`.

        With `varying`, the message and `fields` are taken to repeat from line to line (a routine
        request's method, route, template and status, across a fleet's requests): they are encoded and
        scrubbed once per distinct set, and only `varying` (ids, durations) each time. `fields`' values
        must then be hashable.
        """
        created = time.time()
        if varying is None:
            line = self._formatter.line(created, "info", logger, message, fields)
        else:
            key = (logger, message, tuple(fields.items()))
            head = self._heads.get(key)
            if head is None:
                if len(self._heads) >= MAX_LINE_HEADS:
                    self._heads.clear()
                head = self._heads[key] = self._formatter.head("info", logger, message, fields)
            line = self._formatter.line_from(created, head, varying)
        try:
            with self._handler.lock or contextlib.nullcontext():
                self._handler.stream.write(line + self._handler.terminator)
                self._handler.flush()
        except Exception:
            # As `logging` does: a log that cannot be written never fails the request.
            self._handler.handleError(logging.makeLogRecord({"name": logger, "msg": message, "created": created}))


_direct: DirectLines | None = None


def direct_lines(logger: logging.Logger) -> DirectLines | None:
    """Where this logger's info lines can go without `logging`'s machinery (else None: use `logging`):
    when the log is JSON and `configure_logging`'s handler is the only one they would reach."""
    if _direct is not None and _direct.serves(logger):
        return _direct
    return None


class _TextFormatter(logging.Formatter):
    def __init__(self, scrub: Scrubber) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self._scrub = scrub

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line += " " + " ".join(f"{k}={_quoted(v)}" for k, v in fields.items() if k != "event")
        return self._scrub(line)


def _quoted(value: object) -> str:
    """A field value that cannot pose as another field: values from requests are quoted when odd."""
    text = str(value)
    if text and all(c.isascii() and (c.isalnum() or c in "-_./:{}…") for c in text):
        return text
    return json.dumps(text)


class _ProtocolErrorFilter(logging.Filter):
    """aiohttp logs a malformed request with the offending header line and a
    traceback; keep the fact, drop the text, which can carry a credential."""

    def filter(self, record: logging.LogRecord) -> bool:
        kind = record.exc_info[0] if record.exc_info else None
        if record.name == "aiohttp.server" and kind is not None and issubclass(kind, HttpProcessingError):
            record.msg, record.args = "malformed HTTP request refused", ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class _Throttle:
    """At most one report every `every` seconds, carrying how many times it happened since the last."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._next = 0.0
        self._unsaid = 0

    def happened(self, now: float) -> int | None:
        """It happened again: the count to report now, or None while the last report is recent."""
        self._unsaid += 1
        if now < self._next:
            return None
        count, self._unsaid, self._next = self._unsaid, 0, now + self.every
        return count


class QuietLog:
    """A line for something that may happen in floods: at most one every `every` seconds, with how many
    times it happened since the last (`template` takes that count and the latest occurrence)."""

    def __init__(self, logger: logging.Logger, level: int, event: str, template: str, every: float = 10.0) -> None:
        self._logger, self._level, self._event, self._template = logger, level, event, template
        self._throttle = _Throttle(every)

    def note(self, latest: str) -> None:
        count = self._throttle.happened(time.monotonic())
        if count is not None:
            fields = {"event": self._event, "count": count, "reason": latest}
            self._logger.log(self._level, self._template, count, latest, extra={"fields": fields})


class _RepeatFilter(logging.Filter):
    """asyncio logs every failed accept() when descriptors run out (hundreds a second
    without uvloop): say it once every `every` seconds, with how often it happened."""

    def __init__(self, every: float = 10.0) -> None:
        super().__init__()
        self._throttle = _Throttle(every)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "asyncio" or not str(record.msg).startswith("socket.accept() out of system resource"):
            return True
        count = self._throttle.happened(record.created)
        if count is None:
            return False
        record.msg, record.args = "accept() failed %d time(s): out of file descriptors", (count,)
        record.exc_info = record.exc_text = None
        return True


class _OpenTelemetryFilter(logging.Filter):
    """OpenTelemetry logs every failed export and every span a full queue drops (a collector down for an
    hour would fill the log), and its propagators log a header they could not parse. Each kind is one line
    every `every` seconds with how often it happened, and never the library's text: it may quote a
    worker's header, or the collector's endpoint or key."""

    def __init__(self, every: float = 60.0) -> None:
        super().__init__()
        self._throttles: dict[str, _Throttle] = {}
        self._every = every

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("opentelemetry"):
            return True
        if record.levelno < logging.WARNING:
            return False
        kind = _otel_kind(record)
        throttle = self._throttles.setdefault(kind, _Throttle(self._every))
        count = throttle.happened(record.created)
        if count is None:
            return False
        record.msg, record.args = "%s, %d time(s) since the last report", (kind, count)
        record.exc_info = record.exc_text = None
        return True


def _otel_kind(record: logging.LogRecord) -> str:
    text = str(record.msg).lower()
    if "queue" in text and "full" in text:
        return "spans dropped: the export queue is full"
    if record.name.startswith("opentelemetry.exporter"):
        return "trace export failed"
    if "propagat" in record.name or "baggage" in record.name:
        return "a trace header could not be read"
    return f"OpenTelemetry warning ({record.name})"


def configure_logging(settings: LoggingSettings, secrets: Iterable[str], stream: TextIO | None = None) -> None:
    """Route every logger through one scrubbing handler on stderr."""
    scrub = Scrubber(secrets)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_ProtocolErrorFilter())
    handler.addFilter(_RepeatFilter())
    handler.addFilter(_OpenTelemetryFilter())
    formatter = _JsonFormatter(scrub) if settings.format == "json" else _TextFormatter(scrub)
    handler.setFormatter(formatter)
    global _direct
    _direct = DirectLines(handler, formatter) if isinstance(formatter, _JsonFormatter) else None
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level.upper())
    # aiohttp's own access log would print raw paths; ours prints templates.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
