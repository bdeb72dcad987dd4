"""How credentials are written, read the same way wherever the gateway reads them. Pure: no I/O.

A Bearer value, base64 that arrives without its padding (a sessions token's
JWT-style secret, a Basic credential), and the digest kept in place of a
token so that no table ever holds one.
"""

from __future__ import annotations

import base64
import hashlib

__all__ = ["b64decode_unpadded", "bearer_value", "token_digest"]


def bearer_value(authorization: str | None) -> str | None:
    """The credential of `Bearer <value>` (scheme case-insensitive, spaces trimmed); None for any other scheme."""
    if authorization is None:
        return None
    parts = authorization.split(None, 1)
    if not parts or parts[0].lower() != "bearer":
        return None
    return parts[1].strip() if len(parts) == 2 else ""


def b64decode_unpadded(text: str, *, urlsafe: bool = False) -> bytes:
    """base64 as it is often sent, without its `=` padding. Raises ValueError (binascii.Error) if not base64."""
    padded = text + "=" * (-len(text) % 4)
    return base64.urlsafe_b64decode(padded) if urlsafe else base64.b64decode(padded, validate=False)


def token_digest(token: str) -> str:
    """What the gateway keeps of a token it must recognise later: its SHA-256, never the token."""
    return hashlib.sha256(token.encode()).hexdigest()
