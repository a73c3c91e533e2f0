"""Reading one client request at a time from llhttp's callbacks, within the request limits.

Role: :class:`RequestReader` is the parsing half of :class:`proxy_workers.serving.protocol.ClientProtocol`
(which adds the connection, dispatch and answers; flow control: its base
:class:`proxy_workers.serving.flow.InputFlow`). httptools calls its ``on_*``
methods; each complete request becomes a :class:`proxy_workers.forwarding.request.Request`,
handed to ``_enqueue``.

Invariants:
- One head budget per request, whatever the reads: the target's bytes and each field's (name +
  value + 4) against ``max_head_size``, the fields against ``max_header_count``. A complete head
  is checked when llhttp completes it (measured only when the bytes received could exceed the
  budget); an incomplete one after each read, against the bytes and fields received so far
  (ClientProtocol.data_received), so what llhttp and ``_headers`` hold stays bounded. The target
  over the budget gets 414, fields 431 (:mod:`proxy_workers.serving.rules`).
- Trailer fields (after a chunked body) count against the same budget and are dropped: they are
  never merged into the forwarded head, where they could set fields the router owns.
- The body counts against ``max_body_size`` as de-chunked, checked before each piece is kept
  (a declared Content-Length over it is refused with the head). The first piece is kept as it
  is (no copy); more pieces go to one bytearray, so memory stays ~1-2x the bytes received
  however small the pieces.
- Each field is classified once, as it arrives: an ordinary one becomes its line for the worker;
  hop-by-hop and router-read ones are handled aside (:mod:`proxy_workers.forwarding.headers`).
- Every request leaves with one valid ``traceparent`` (the client's kept when valid, else a fresh
  one) and the client's ``tracestate`` only alongside a valid traceparent
  (:mod:`proxy_workers.forwarding.tracecontext`). The router makes its own span (a new parent id
  under the client's) only when it exports spans (``proc.tracer``); otherwise it passes a valid
  traceparent through unchanged, so a worker's span is never the child of a span nobody records.
- The plain path pays one check per field (trailers) and a few per request for the limits; the
  rare cases (a head that may be over budget, trailers, Host not exactly once) take separate
  methods.
"""

from __future__ import annotations

import re
from itertools import chain
from typing import TYPE_CHECKING, Final

from proxy_workers.errors import BadRequest, BodyTooLarge, RouterError, VersionNotSupported
from proxy_workers.forwarding.headers import (
    NO_TOKENS,
    ROUTER_NOTES,
    ROUTER_READS,
    SPECIAL_REQUEST_HEADERS,
    connection_tokens,
    field_name,
    without_fields,
)
from proxy_workers.forwarding.request import Request
from proxy_workers.forwarding.tracecontext import (
    FRESH,
    bounded_tracestate,
    child_flags,
    parse_traceparent,
    refill,
    take,
    traceparent,
)
from proxy_workers.serving import rules

FEED_SLICE: Final = 16 * 1024  # the most the connection feeds the parser at once (ClientProtocol)

if TYPE_CHECKING:
    from collections import deque

    import httptools

    from proxy_workers.contract import ClientExchange
    from proxy_workers.serving.state import ProxyProcess

_flat = chain.from_iterable
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:@/+=-]{1,128}$")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class RequestReader:
    """The httptools callbacks of a client connection, and the state of the request being read."""

    __slots__ = ("_body", "_body_len", "_conn_tokens", "_continue_pending", "_expect", "_head_done",
                 "_head_len", "_head_size", "_headers", "_hosts", "_noted", "_parts", "_trailers", "_upgrade",
                 "_url", "idle_since", "reading_since")

    # Provided by the connection (ClientProtocol).
    proc: ProxyProcess
    parser: httptools.HttpRequestParser
    peer: bytes
    exchange: ClientExchange | None
    queue: deque[Request]

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def _enqueue(self, request: Request) -> None:
        raise NotImplementedError

    def dispatch(self, request: Request) -> None:
        raise NotImplementedError

    def _reset(self) -> None:
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._parts: list[bytes] = []  # header lines for the worker, built as headers arrive
        self._noted: list[tuple[bytes, bytes]] = []  # fields in ROUTER_NOTES, rare
        self._body: bytes | bytearray = b""
        self._body_len = 0
        self._head_len = 0  # bytes received while this request's head was incomplete
        self._head_size = 0  # measured at the first trailer field (trailers count in the budget)
        self._hosts = 0
        self._head_done = False
        self._conn_tokens: frozenset[bytes] = NO_TOKENS
        self._continue_pending = False
        self._expect = False

    # -- httptools callbacks ---------------------------------------------------------------

    # No on_message_begin: each httptools callback costs ~0.3 us, so per-message state is reset
    # at the end of the previous message and a new message is noticed by its first URL bytes.

    def on_url(self, url: bytes) -> None:
        if not self._url:
            self.reading_since = self.proc.loop.time()
            self.idle_since = 0.0  # a request is arriving: header_timeout governs it, not keepalive
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:  # a trailer field (after a chunked body)
            self._trailer(name, value)
            return
        low = field_name(name)
        self._headers.append((low, value))
        # Each field is classified once, here: an ordinary one becomes its line for the worker
        # right away; hop-by-hop and router-read ones are handled by _special_header.
        if low not in SPECIAL_REQUEST_HEADERS:
            self._parts.append(b"%s: %s\r\n" % (low, value))
        elif low != b"host":  # Host is the worker's (set per pool); only counted (RFC 9112 3.2)
            self._special_header(low, value)
        else:
            self._hosts += 1

    def _trailer(self, name: bytes, value: bytes) -> None:
        """A trailer field: counted against the request's head budget, then dropped (never
        forwarded: it could set fields the router owns)."""
        settings = self.proc.settings
        if not self._head_size:  # the first trailer field of this request
            self._head_size = self._exact_head_size()
            self._trailers = 0
        self._trailers += 1
        if len(self._headers) + self._trailers > settings.max_header_count:
            raise rules.too_many_fields(settings.max_header_count)
        self._head_size += len(name) + len(value) + 4
        if self._head_size > settings.max_head_size:
            raise rules.head_too_large(settings.max_head_size)

    def _special_header(self, name: bytes, value: bytes) -> None:
        if name == b"content-length":
            limit = self.proc.max_body_size
            if int(value) > limit:
                raise BodyTooLarge(f"request body of {int(value)} bytes exceeds max_body_size={limit}")
        elif name == b"connection":
            # Repeated Connection fields form one list: every field's tokens count.
            self._conn_tokens |= connection_tokens(value)
        elif name == b"expect":
            self._expect = value.lower() == b"100-continue"
        elif name in ROUTER_NOTES:
            self._noted.append((name, value))
            if name in ROUTER_READS:
                self._parts.append(b"%s: %s\r\n" % (name, value))

    def on_headers_complete(self) -> None:
        self._head_done = True
        # The head budget. Each feed is at most FEED_SLICE bytes, so the head is at most the bytes
        # counted while it was incomplete (_head_len) plus one feed: within the budget by that
        # bound (nearly always), it is not measured; else it is, exactly (_check_head).
        proc = self.proc
        if (self._head_len + FEED_SLICE > proc.max_head_size
                or len(self._headers) > proc.max_header_count or self._hosts != 1):
            self._check_head()
        if self.parser.should_upgrade():
            # llhttp treats everything after an upgrading head as the new protocol, so a body
            # cannot be read: such a request is refused rather than forwarded without its body.
            if any(n == b"transfer-encoding" or (n == b"content-length" and int(v) > 0)
                   for n, v in self._headers):
                raise BadRequest("protocol upgrades are not supported", reason="upgrade")
            self._upgrade = True
        # RFC 9110 10.1.1: a server MUST ignore 100-continue in an HTTP/1.0 request.
        if self._expect and self.parser.get_http_version() != "1.0":
            if self.exchange is None and not self.queue:
                self.write(CONTINUE)
            else:
                # A pipelined request: its interim answer must not land inside an earlier
                # response; it goes out when the connection's earlier requests are answered.
                self._continue_pending = True

    def _exact_head_size(self) -> int:
        """The head as the budget counts it: the target, and each field's name, value and 4 bytes."""
        headers = self._headers
        return len(self._url) + sum(map(len, _flat(headers))) + 4 * len(headers)

    def _check_head(self) -> None:
        """Refuse a complete head over the budget (414/431), or with Host not exactly once."""
        settings = self.proc.settings
        if len(self._url) > settings.max_head_size:
            raise rules.target_too_long(settings.max_head_size)
        if len(self._headers) > settings.max_header_count:
            raise rules.too_many_fields(settings.max_header_count)
        if self._exact_head_size() > settings.max_head_size:
            raise rules.head_too_large(settings.max_head_size)
        err = rules.host_error(self._hosts, self.parser.get_http_version() == "1.1")
        if err is not None:
            raise err

    def on_body(self, body: bytes) -> None:
        size = self._body_len + len(body)
        if size > self.proc.max_body_size:
            raise BodyTooLarge(f"request body exceeds max_body_size={self.proc.settings.max_body_size}")
        self._body_len = size
        if size == len(body):
            self._body = body  # the first piece (often the whole body): no copy
        elif isinstance(self._body, bytearray):
            self._body += body
        else:
            # More pieces (a chunked or slow upload): one growing buffer, so memory stays within
            # a small factor of the body however small the pieces.
            self._body = bytearray(self._body) + body

    def on_message_complete(self) -> None:
        parser = self.parser
        keep_alive = parser.should_keep_alive()
        # HTTP/1.0 keeps a connection only when a Connection header asks for it, so keep-alive
        # without one means 1.1 (and get_http_version, which builds a string, is skipped).
        http11 = (keep_alive and not self._conn_tokens) or self._version() == "1.1"
        request = Request(parser.get_method(), self._url, http11, keep_alive and not self._upgrade)
        self._continue_pending = False  # the body came anyway; no interim answer is due
        body = self._body
        request.body = body if type(body) is bytes else bytes(body)
        self._prepare(request)
        self._reset()
        self.reading_since = 0.0
        if self.exchange is None and not self.queue:
            self.dispatch(request)
        else:
            self._enqueue(request)

    def _version(self) -> str:
        """The request's HTTP version: 1.0 or 1.1 (llhttp also reads 0.9 and 2.0: refused, 505)."""
        version = self.parser.get_http_version()
        if version not in ("1.0", "1.1"):
            raise VersionNotSupported(f"HTTP/{version} is not supported; use HTTP/1.1")
        return version

    def _prepare(self, request: Request) -> None:
        """Request id, and the upstream head minus its request line and Host."""
        parts = self._parts
        if self._conn_tokens:
            # Rare: the client named headers as hop-by-hop in Connection; leave those out too,
            # router-read ones included (the router then sets X-Forwarded-For and the id alone).
            parts = without_fields(parts, self._conn_tokens)
            self._noted = [(n, v) for n, v in self._noted if n not in self._conn_tokens]
        # Without a client's trace context, a fresh traceparent: a list pop (see tracecontext).
        supplied_id, forwarded_for, trace = (self._apply_notes(request, parts) if self._noted
                                             else (b"", self.peer, take() if FRESH else refill()))
        request.headers = self._headers
        request.peer = self.peer
        request.request_id = rid = supplied_id or self.proc.next_request_id()
        # The traceparent line comes last: Request.traceparent reads it there.
        parts.append(b"x-forwarded-for: %s\r\nx-request-id: %s\r\ntraceparent: %s\r\n"
                     % (forwarded_for, rid, trace))
        request.upstream_head = b"".join(parts)

    def _apply_notes(self, request: Request, parts: list[bytes]) -> tuple[bytes, bytes, bytes]:
        """The fields kept aside (ROUTER_NOTES): (client's request id or b"", X-Forwarded-For,
        traceparent to forward); a tracestate to forward is added to ``parts``."""
        forwarded: list[bytes] = []
        parents: list[bytes] = []
        states: list[bytes] = []
        supplied_id = b""
        for name, value in self._noted:
            if name == b"x-forwarded-for":
                forwarded.append(value)  # repeated fields form one list; keep every hop
            elif name == b"x-request-id":
                if _REQUEST_ID.match(value):
                    supplied_id = value
            elif name == b"traceparent":
                parents.append(value)
            elif name == b"tracestate":
                states.append(value)
            else:
                try:
                    self._router_header(request, name, value)
                except RouterError as err:
                    request.error = err
        forwarded.append(self.peer)
        return supplied_id, b", ".join(forwarded), self._trace_context(parts, parents, states)

    def _trace_context(self, parts: list[bytes], parents: list[bytes], states: list[bytes]) -> bytes:
        """The traceparent to forward: the client's when valid (its tracestate then added to
        ``parts``), else a fresh one."""
        fresh = take() if FRESH else refill()
        parsed = parse_traceparent(parents) if parents else None
        if parsed is None:
            return fresh
        trace, parent, flags = parsed
        if states:
            state = bounded_tracestate(states)
            if state:
                parts.append(b"tracestate: %s\r\n" % state)
        # proc.tracer is None unless spans are exported (proxy_workers.serving.tracing).
        if self.proc.tracer is not None:
            # The router's span (the fresh span id), a child of the client's; the worker's spans
            # are its children.
            return traceparent(trace, fresh[36:52], child_flags(flags))
        # Not exporting: the client's traceparent as it came (a version above 00 is rewritten as
        # 00, the only version we may emit), so the worker's spans are the client's children.
        return traceparent(trace, parent, flags)

    @staticmethod
    def _router_header(request: Request, name: bytes, value: bytes) -> None:
        if name == b"x-shardgate-debug":
            request.explain = value.strip() in (b"1", b"true")
        elif name == b"x-shardgate-connection":
            wanted = value.strip().lower().decode("latin-1")
            if wanted not in ("http", "grpc", "any"):
                raise BadRequest("X-Shardgate-Connection must be http, grpc or any",
                                 param="X-Shardgate-Connection", reason="invalid_request")
            request.connection = wanted

