"""One parsed client request, and the bytes a worker gets for it.

Role: what the client protocol (:mod:`proxy_workers.serving.protocol`) hands every data path. It
satisfies :class:`proxy_workers.contract.ClientRequest`.

Invariants:
- ``upstream_head`` holds the header lines a worker gets, already filtered by the request-side
  header rules (:mod:`proxy_workers.forwarding.headers`); the request line, Host and framing are
  added per worker at send time (:meth:`Request.wire`).
- The body is always forwarded with Content-Length, never chunked: a client's chunked upload was
  de-chunked while it was read.
- The trace context every worker call of the request carries (PD legs and retries included) is
  in ``upstream_head``, written by the reader: a valid version-00 ``traceparent`` line last, and a
  ``tracestate`` line before it if one is forwarded
  (:mod:`proxy_workers.forwarding.tracecontext`). :attr:`Request.traceparent` and
  :attr:`Request.tracestate` read them from there (for gRPC metadata and spans), so the hot path
  stores nothing more.
"""

from __future__ import annotations

import re

from proxy_workers.errors import RouterError

BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
_TRACEPARENT_LINE = len(b"traceparent: 00-") + 32 + 1 + 16 + len(b"-01\r\n")
_TRACESTATE = re.compile(rb"(?:^|\n)tracestate: ([^\r]*)\r\n")


class Request:
    __slots__ = ("body", "connection", "error", "explain", "headers", "http11", "keep_alive", "method",
                 "model", "path", "peer", "request_id", "upstream_head", "url")

    def __init__(self, method: bytes, url: bytes, http11: bool, keep_alive: bool) -> None:
        self.method = method
        self.url = url
        q = url.find(b"?")
        self.path = url if q < 0 else url[:q]
        self.http11 = http11
        self.keep_alive = keep_alive
        self.request_id = b""
        self.upstream_head = b""  # header lines for the worker, without framing
        self.body = b""
        self.model: str | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.peer = b""
        self.explain = False  # X-Shardgate-Debug: 1 asks for the decision in a response header
        self.connection = ""  # X-Shardgate-Connection: http | grpc (router preference)
        # A refusal found while the request was read, answered when its turn comes (pipelining).
        self.error: RouterError | None = None

    @property
    def traceparent(self) -> bytes:
        """The traceparent every worker call carries (b"" for a request never read to its end)."""
        line = self.upstream_head[-_TRACEPARENT_LINE:]
        return line[13:-2] if line.startswith(b"traceparent: ") else b""

    @property
    def tracestate(self) -> bytes:
        """The tracestate forwarded with it (b"": none). Only the router writes this field."""
        found = _TRACESTATE.search(self.upstream_head)
        return found.group(1) if found else b""

    def wire(self, authority: bytes) -> bytes:
        """The request as a worker at ``authority`` gets it, built in one step at send time.

        The body is always framed with Content-Length, never chunked (a client's chunked upload
        was de-chunked while it was read).
        """
        body = self.body
        if body or self.method in BODY_METHODS:  # join is about twice as fast as %-formatting here
            return b"".join((self.method, b" ", self.url, b" HTTP/1.1\r\nhost: ", authority, b"\r\n",
                             self.upstream_head, b"content-length: %d\r\n\r\n" % len(body), body))
        return b"".join((self.method, b" ", self.url, b" HTTP/1.1\r\nhost: ", authority, b"\r\n",
                         self.upstream_head, b"\r\n"))

    def with_body(self, body: bytes) -> Request:
        """A copy of this request carrying another body (a PD leg's rewritten JSON)."""
        copy = Request(self.method, self.url, self.http11, self.keep_alive)
        # The legs share the trace context (in upstream_head): both are calls of the router's span.
        for name in ("request_id", "upstream_head", "headers", "peer", "explain", "connection", "model"):
            setattr(copy, name, getattr(self, name))
        copy.body = body
        return copy
