"""The secrets the gateway holds, kept out of everything it sends back to a worker.

The API never should, but an upstream error body or header could echo the
request's `Authorization`, which carries the real environment key. Every
configured key and token is replaced by `<redacted>` in response headers, in
heartbeat answers and in error bodies on their way to a worker (and, with
more patterns, in log lines: `gateway.observability.logs`). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["REDACTED", "Redactor"]

REDACTED = "<redacted>"


class Redactor:
    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        self.secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))
        self._encoded = tuple((s.encode(), REDACTED.encode()) for s in self.secrets)
        # Configured secrets are visible ASCII on one line (`gateway.config`); should one ever not be, the
        # values are searched one by one.
        self._one_line = not any("\n" in s for s in self.secrets)

    def text(self, value: str) -> str:
        for secret in self.secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value

    def body(self, body: bytes) -> bytes:
        for secret, redacted in self._encoded:
            if secret in body:
                body = body.replace(secret, redacted)
        return body

    def headers(self, pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        pairs = list(pairs)
        if self._one_line:
            # One search per secret over every value at once (a secret on one line cannot span two):
            # an answer's headers almost never echo one.
            joined = "\n".join(value for _, value in pairs)
            if not any(secret in joined for secret in self.secrets):
                return pairs
        return [(name, self.text(value)) for name, value in pairs]

    def with_(self, more: Iterable[str]) -> Redactor:
        """These secrets too (a reload's rotated-out keys stay redacted)."""
        return Redactor((*self.secrets, *more))
