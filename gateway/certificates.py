"""Certificates read from files that rotate: loaded again, without a restart, when they change on disk.

A Kubernetes Secret mounted as a volume (not with `subPath`, which never
sees an update) rotates by swapping its `..data` symlink: the same path then
names other files. So the files' identity (device, inode, size, change time,
following links) is checked every `CHECK_SECONDS`, and a change loads the pair
again. A pair is tried on a scratch context first: a rotation caught half
way (the new certificate, the old key) is skipped and tried again at the next
check, and the context keeps the pair it had. Connections already open keep
the certificate they were made with; new ones get the new one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl

__all__ = ["CHECK_SECONDS", "RotatingCertificate", "server_context"]

log = logging.getLogger("gateway.certificates")

CHECK_SECONDS = 10.0


class RotatingCertificate:
    """A certificate and its key in `context`, loaded again whenever their files change."""

    def __init__(self, context: ssl.SSLContext, cert_file: str, key_file: str, what: str) -> None:
        self.context = context
        self._context, self._cert_file, self._key_file, self._what = context, cert_file, key_file, what
        self._seen = self._identity()
        context.load_cert_chain(cert_file, key_file)

    def _identity(self) -> tuple[tuple[int, int, int, int], ...] | None:
        try:
            stats = [os.stat(path) for path in (self._cert_file, self._key_file)]
        except OSError:
            return None
        return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)

    def reload_if_changed(self) -> bool:
        """Load the pair again if its files changed and it loads whole; True if it did."""
        now = self._identity()
        if now is None or now == self._seen:
            return False
        try:
            ssl.create_default_context().load_cert_chain(self._cert_file, self._key_file)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            # Half way through a rotation, or a bad pair: the one loaded stays, and the next check tries again.
            log.warning("the %s on disk does not load (%s); keeping the one loaded", self._what, exc)
            return False
        self._context.load_cert_chain(self._cert_file, self._key_file)
        self._seen = now
        log.info("reloaded the %s", self._what, extra={"fields": {"event": "certificate_reloaded"}})
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(CHECK_SECONDS)
            self.reload_if_changed()


def server_context(cert_file: str, key_file: str, client_ca_file: str | None, what: str) -> RotatingCertificate:
    """A listening port's TLS: its certificate (rotating), and the clients' CA when it requires client certificates."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.set_alpn_protocols(["http/1.1"])
    if client_ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=client_ca_file)
    return RotatingCertificate(context, cert_file, key_file, what)
