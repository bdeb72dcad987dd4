"""Log output: JSON lines (or plain text), with every known secret scrubbed.

Handlers never log headers or bodies; the scrubbing here is the second line
of defence, applied to the final line, exception text included.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TextIO

from aiohttp.http_exceptions import HttpProcessingError

from .redaction import REDACTED, Redactor
from .settings import LoggingSettings

__all__ = ["Scrubber", "configure_logging"]

# Anthropic keys and tokens the gateway does not hold can still reach a log
# line through a third-party library's message; scrub their shape too.
_KEY_SHAPE = re.compile(r"sk-ant-[A-Za-z0-9_\-]+")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s'\",]+")
# A header line quoted in a parser's error message: keep the name, drop the value.
_CREDENTIAL_HEADER = re.compile(r"(?i)((?:x-api-key|authorization|proxy-authorization|cookie)\s*[:=]\s*)[^\r\n'\",]+")


class Scrubber:
    def __init__(self, secrets: Iterable[str]) -> None:
        self._redactor = Redactor(secrets)

    def __call__(self, text: str) -> str:
        text = self._redactor.text(text)
        text = _KEY_SHAPE.sub(REDACTED, text)
        text = _CREDENTIAL_HEADER.sub(lambda m: m.group(1) + REDACTED, text)
        return _BEARER.sub(lambda m: m.group(1) + REDACTED, text)


class _JsonFormatter(logging.Formatter):
    def __init__(self, scrub: Scrubber) -> None:
        super().__init__()
        self._scrub = scrub

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # ASCII escapes keep control and bidi characters from a request out of terminals.
        return self._scrub(json.dumps(entry, default=str))


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


class _RepeatFilter(logging.Filter):
    """asyncio logs every failed accept() when descriptors run out (hundreds a second
    without uvloop): say it once every `every` seconds, with how often it happened."""

    def __init__(self, every: float = 10.0) -> None:
        super().__init__()
        self.every = every
        self._next = 0.0
        self._unsaid = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "asyncio" or not str(record.msg).startswith("socket.accept() out of system resource"):
            return True
        self._unsaid += 1
        if record.created < self._next:
            return False
        record.msg, record.args = "accept() failed %d time(s): out of file descriptors", (self._unsaid,)
        record.exc_info = record.exc_text = None
        self._next, self._unsaid = record.created + self.every, 0
        return True


def configure_logging(settings: LoggingSettings, secrets: Iterable[str], stream: TextIO | None = None) -> None:
    """Route every logger through one scrubbing handler on stderr."""
    scrub = Scrubber(secrets)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_ProtocolErrorFilter())
    handler.addFilter(_RepeatFilter())
    handler.setFormatter(_JsonFormatter(scrub) if settings.format == "json" else _TextFormatter(scrub))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level.upper())
    # aiohttp's own access log would print raw paths; ours prints templates.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
