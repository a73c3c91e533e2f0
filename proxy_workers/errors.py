"""Errors the router itself answers, each carrying its HTTP status, rendered in OpenAI's shape.

Invariants:
- Every response the router writes on its own behalf (not a worker's) goes through
  :func:`render`, so clients always get ``{"error": {"message", "type", "param", "code"}}`` JSON.
- A value the client sent is echoed at most :data:`ECHO_LIMIT` characters long (:func:`clip`),
  and a whole message at most :data:`MESSAGE_LIMIT` (:func:`error_body`), whatever raised it.
- Each error has a ``reason``: the bounded name it is counted and logged under when it refuses a
  request (``shm.loadboard.REFUSAL_REASONS``); by default its ``code``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from proxy_workers.contract import Refusal

_REASONS = {
    200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
    405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Payload Too Large", 414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}


ECHO_LIMIT = 128  # characters of a client's value quoted back in an error message
MESSAGE_LIMIT = 1024  # characters of any error message (a backstop for values quoted unclipped)


def reason(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def clip(value: object) -> str:
    """A client's value as an error message may quote it: at most ECHO_LIMIT characters."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= ECHO_LIMIT:
        return text
    return f"{text[:ECHO_LIMIT]}... ({len(text)} characters)"


class RouterError(Exception):
    """An error answered by the router. ``status`` is the HTTP status sent to the client."""

    status = 500
    type = "server_error"
    code: str | None = None
    reason: str | None = None  # counted and logged as this (None: the code); see the module doc

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if reason is not None:
            self.reason = reason

    def headers(self) -> bytes:
        """Extra response header lines this error carries (e.g. Retry-After)."""
        return b""


class BadRequest(RouterError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class ModelNotFound(RouterError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class NotFound(RouterError):
    status, type, code = 404, "invalid_request_error", "not_found"


class MethodNotAllowed(RouterError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class BodyTooLarge(RouterError):
    status, type, code = 413, "invalid_request_error", "body_too_large"


class RequestTimeout(RouterError):
    status, type, code = 408, "invalid_request_error", "request_timeout"


class HeadersTooLarge(RouterError):
    status, type, code = 431, "invalid_request_error", "headers_too_large"


class VersionNotSupported(RouterError):
    status, type, code, reason = 505, "invalid_request_error", "http_version_not_supported", "bad_http"


class UriTooLong(RouterError):
    status, type, code = 414, "invalid_request_error", "uri_too_long"


class InternalError(RouterError):
    status, type, code = 500, "server_error", "internal_error"


class _RetryAfter(RouterError):
    """An answer that tells the client when to try again (the ``Retry-After`` header, seconds)."""

    def __init__(self, message: str, retry_after: int, *, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = max(1, int(retry_after))

    def headers(self) -> bytes:
        return b"retry-after: %d\r\n" % self.retry_after


class QuotaExceeded(_RetryAfter):
    """Every candidate worker is at its per-minute quota (quota_aware)."""

    status, type, code = 429, "rate_limit_error", "quota_exceeded"


class RateLimited(_RetryAfter):
    """The client is over its requests- or tokens-per-minute limit (admission control)."""

    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class Overloaded(_RetryAfter):
    """The fleet is saturated: the admission queue is full, the wait in it timed out, or the
    proxy is shutting down with the request still queued. ``code`` says which."""

    status, type, code = 503, "service_unavailable", "overloaded"


class WorkersSaturated(_RetryAfter):
    """Every candidate worker is at its ``max_concurrency`` (raised by a capped route's pick)."""

    status, type, code = 503, "service_unavailable", "workers_saturated"


class BadGateway(RouterError):
    status, type, code = 502, "upstream_error", "bad_gateway"


class NoHealthyWorker(RouterError):
    status, type, code = 503, "service_unavailable", "no_healthy_worker"


class UpstreamTimeout(RouterError):
    status, type, code = 504, "upstream_error", "upstream_timeout"


_ENCODER = msgspec.json.Encoder()


def error_body(err: Refusal) -> bytes:
    message = err.message
    if len(message) > MESSAGE_LIMIT:
        message = message[:MESSAGE_LIMIT] + "... (truncated)"
    return _ENCODER.encode(
        {"error": {"message": message, "type": err.type, "param": err.param, "code": err.code}}
    )


def render(err: Refusal, request_id: str = "", close: bool = False) -> bytes:
    """A complete HTTP/1.1 response for ``err``."""
    return render_response(err.status, error_body(err), request_id=request_id, close=close,
                           extra=err.headers())


def render_response(
    status: int,
    body: bytes,
    content_type: bytes = b"application/json",
    request_id: str = "",
    close: bool = False,
    extra: bytes = b"",
) -> bytes:
    """A complete HTTP/1.1 response with a Content-Length body (router-generated answers)."""
    head = [b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
            % (status, reason(status), content_type, len(body))]
    if request_id:
        head.append(b"x-request-id: %s\r\n" % request_id.encode())
    if close:
        head.append(b"connection: close\r\n")
    head.append(extra)
    head.append(b"\r\n")
    head.append(body)
    return b"".join(head)
