"""Certificates read from files that rotate: loaded again, without a restart, when they change on disk.

A Kubernetes Secret mounted as a volume (not with `subPath`, which never
sees an update) rotates by swapping its `..data` symlink: the same path then
names other files. So the files' identity (device, inode, size, change time,
following links) is checked every `CHECK_SECONDS`, and a change loads the pair
again. Connections already open keep the certificate they were made with;
new ones get the new one.

A rotation must never leave a port without a working pair. Both files are
read once into a private snapshot, and the pair is tried from it on a scratch
context before the live one loads the same bytes. A rotation caught half way
(the new certificate, the old key) is skipped and tried again at the next
check. OpenSSL drops the old key as soon as a new load starts, so if the
live load still fails, the last good snapshot is loaded again. The watcher
itself never stops on an error.

CA bundles (the upstream's `ca_files`, a port's `client_ca_file`) rotate the
same way, and a changed bundle is added to the context's trust: an OpenSSL
store can only grow, which is what a CA rollover needs (the new CA trusted
while certificates from the old one are still in use). A CA taken out of a
bundle stays trusted until a restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Sequence

__all__ = ["CHECK_SECONDS", "Rotating", "RotatingCertificate", "RotatingTrust", "server_context"]

log = logging.getLogger("gateway.certificates")

CHECK_SECONDS = 10.0

Pair = tuple[bytes, bytes]
Identity = tuple[tuple[int, int, int, int], ...]


def _identity(paths: Sequence[str]) -> Identity | None:
    """What changes when a file is rewritten or its Secret's symlink swapped (None: one is missing now)."""
    try:
        stats = [os.stat(path) for path in paths]
    except OSError:
        return None
    return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


class Rotating:
    """TLS files of one context, checked every `CHECK_SECONDS` and loaded again when they change."""

    def __init__(self, context: ssl.SSLContext, files: Sequence[str], what: str) -> None:
        self.context = context
        self._files, self._what = tuple(files), what
        self._seen = _identity(self._files)

    def reload_if_changed(self) -> bool:
        """Load the files again if they changed and load whole; True if they did."""
        now = _identity(self._files)
        if now is None or now == self._seen or not self._reload():
            return False
        self._seen = now
        log.info("reloaded the %s", self._what, extra={"fields": {"event": "certificate_reloaded"}})
        return True

    def _reload(self) -> bool:
        """Load the changed files into the context; False (and the context as it was) if they do not load."""
        raise NotImplementedError

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(CHECK_SECONDS)
            try:
                self.reload_if_changed()
            except Exception:  # a watcher that dies leaves the port on a certificate that expires
                log.exception("checking the %s failed; checking again in %g s", self._what, CHECK_SECONDS)


class RotatingCertificate(Rotating):
    """A certificate and its key in `context`, loaded again whenever their files change."""

    def __init__(self, context: ssl.SSLContext, cert_file: str, key_file: str, what: str) -> None:
        super().__init__(context, (cert_file, key_file), what)
        self._good = self._read()
        _load(context, self._good)

    def _read(self) -> Pair:
        cert_file, key_file = self._files
        with open(cert_file, "rb") as cert, open(key_file, "rb") as key:
            return cert.read(), key.read()

    def _reload(self) -> bool:
        try:
            pair = self._read()
            _load(ssl.create_default_context(), pair)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            # Half way through a rotation, or a bad pair: the one loaded stays, and the next check tries again.
            log.warning("the %s on disk does not load (%s); keeping the one loaded", self._what, exc)
            return False
        try:
            _load(self.context, pair)
        except (OSError, ValueError) as exc:
            _load(self.context, self._good)  # the old key is gone already: the last good pair again
            log.error("the %s could not be swapped in (%s); keeping the one loaded", self._what, exc)
            return False
        self._good = pair
        return True


class RotatingTrust(Rotating):
    """CA bundles trusted by `context` (already loaded by the caller), added to it again when they change."""

    def _reload(self) -> bool:
        try:
            bundles = []
            for path in self._files:
                with open(path, encoding="ascii") as f:
                    bundles.append(f.read())
            for bundle in bundles:  # on a scratch context first: the live store keeps nothing half-read
                ssl.create_default_context().load_verify_locations(cadata=bundle)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.warning("a %s on disk does not load (%s); keeping the CAs loaded", self._what, exc)
            return False
        for bundle in bundles:
            self.context.load_verify_locations(cadata=bundle)
        return True


def _load(context: ssl.SSLContext, pair: Pair) -> None:
    """`load_cert_chain` from bytes, through anonymous in-memory files (`memfd`): the key never touches
    a disk, and a read-only root filesystem is no obstacle."""
    descriptors = [os.memfd_create(name, os.MFD_CLOEXEC) for name in ("tls.crt", "tls.key")]
    try:
        for descriptor, data in zip(descriptors, pair, strict=True):
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view) :]
        cert, key = (f"/proc/self/fd/{d}" for d in descriptors)
        context.load_cert_chain(cert, key)
    finally:
        for descriptor in descriptors:
            os.close(descriptor)


def server_context(
    cert_file: str, key_file: str, client_ca_file: str | None, port: str
) -> tuple[ssl.SSLContext, tuple[Rotating, ...]]:
    """A listening port's TLS (`port` names it in logs): its certificate, and the clients' CA when it
    requires client certificates; with what keeps each of them current."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.set_alpn_protocols(["http/1.1"])
    rotating: list[Rotating] = [RotatingCertificate(context, cert_file, key_file, f"{port}'s certificate")]
    if client_ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=client_ca_file)
        rotating.append(RotatingTrust(context, (client_ca_file,), f"{port}'s client CA"))
    return context, tuple(rotating)
