"""Errors the gateway itself answers with, each carrying its HTTP status.

Every refusal and every upstream failure is one of these; one middleware
(`gateway.edge.middleware.error_middleware`) renders them as Anthropic-shaped JSON,
so workers' SDKs parse them like any API error::

    GatewayError
    ├── RequestRefused              the gateway refused the request; the upstream was not called
    │   ├── InvalidRequest          400 invalid_request_error
    │   ├── AuthenticationFailed    401 authentication_error
    │   ├── PermissionDenied        403 permission_error
    │   ├── NotFound                404 not_found_error
    │   ├── MethodNotAllowed        405 invalid_request_error
    │   ├── RequestTimedOut         408 timeout_error (the client's request body stalled)
    │   ├── RequestTooLarge         413 request_too_large
    │   └── Overloaded              503 overloaded_error, with retry-after: the replica sheds work
    └── UpstreamError               the upstream exchange failed (kind: connect, tls, proxy, reset, timeout, other)
        ├── UpstreamUnavailable     502 api_error
        ├── UpstreamTimeout         504 timeout_error
        └── CapacityExceeded        503 overloaded_error, with retry-after (kind: capacity): the
                                    gateway's own capacity for the class is used up; nothing was sent

The status and type pairs follow the API's own error table
(https://platform.claude.com/docs/en/api/errors). Messages never contain a
key or token: they are written here or in `gateway.upstream.client`, never copied
from a request.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal, Self

__all__ = [
    "AuthenticationFailed",
    "CapacityExceeded",
    "GatewayError",
    "InvalidRequest",
    "MethodNotAllowed",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "RequestRefused",
    "RequestTimedOut",
    "RequestTooLarge",
    "UpstreamError",
    "UpstreamErrorKind",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "error_body",
]

# `tls`: the handshake with the upstream failed (certificate, hostname, protocol); `proxy`: the
# egress proxy refused or could not be reached. Neither ever sent the request.
UpstreamErrorKind = Literal["connect", "tls", "proxy", "reset", "timeout", "other", "capacity"]


class GatewayError(Exception):
    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "api_error"
    # Seconds a client should wait before trying again (sent as `retry-after`), where the error says.
    retry_after: int | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> bytes:
        return error_body(self.error_type, self.message)

    def copy(self) -> Self:
        """The same error as a fresh object, for each of several waiters to raise its own.

        A shared exception object would share its traceback (each raise adds to
        it). The copy is made without calling `__init__`, whose signature each
        subclass chooses (`CapacityExceeded` takes `retry_after`, not `kind`):
        every attribute comes across as it is, whatever the subclass.
        """
        clone = type(self).__new__(type(self), *self.args)
        clone.__dict__.update(self.__dict__)
        return clone


class RequestRefused(GatewayError):
    """The gateway answered by itself: nothing was sent upstream."""


class InvalidRequest(RequestRefused):
    status = 400
    error_type = "invalid_request_error"


class AuthenticationFailed(RequestRefused):
    status = 401
    error_type = "authentication_error"


class PermissionDenied(RequestRefused):
    status = 403
    error_type = "permission_error"


class NotFound(RequestRefused):
    status = 404
    error_type = "not_found_error"


class MethodNotAllowed(RequestRefused):
    # The API's table has no 405 type; it uses invalid_request_error for other 4xx.
    status = 405
    error_type = "invalid_request_error"


class RequestTimedOut(RequestRefused):
    status = 408
    error_type = "timeout_error"


class RequestTooLarge(RequestRefused):
    status = 413
    error_type = "request_too_large"


class Overloaded(RequestRefused):
    """The replica sheds work while its event loop runs late (`gateway.edge.overload`)."""

    status = 503
    error_type = "overloaded_error"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamError(GatewayError):
    """The upstream exchange failed.

    `may_have_reached_upstream` is False only when the request surely never
    left the gateway (the connection could not be opened). A heartbeat that
    may have reached the API must never be re-sent: the first attempt may have
    been applied, and a retry with the same `expected_last_heartbeat` would
    then earn a spurious 412.
    """

    # With tracing, the heartbeat flight it ended (`gateway.observability.tracing.FlightLink`), for the
    # span of each worker it reaches to link to; opaque here.
    flight: Any = None

    def __init__(self, message: str, *, kind: UpstreamErrorKind, may_have_reached_upstream: bool) -> None:
        super().__init__(message)
        self.kind: UpstreamErrorKind = kind
        self.may_have_reached_upstream = may_have_reached_upstream


class UpstreamUnavailable(UpstreamError):
    status = 502
    error_type = "api_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    error_type = "timeout_error"


class CapacityExceeded(UpstreamError):
    """No upstream connection of the request's class came free in time; the request was not sent."""

    status = 503
    error_type = "overloaded_error"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, kind="capacity", may_have_reached_upstream=False)
        self.retry_after = retry_after


def error_body(error_type: str, message: str) -> bytes:
    """The API's error envelope: {"type": "error", "error": {"type": ..., "message": ...}}."""
    return json.dumps({"type": "error", "error": {"type": error_type, "message": message}}).encode()
