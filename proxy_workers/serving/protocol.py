"""The client side of a proxy process: HTTP/1.1 parsing with httptools, dispatch, responses.

Role: :class:`ClientProtocol` reads requests from one client connection, answers the router's own
endpoints, and hands ``/v1/*`` requests, and the native paths of
:data:`proxy_workers.routing.paths.PROXIED_PATHS` (looked up only off the ``/v1/`` path), to the
exchange of the router that serves them (HTTP, HTTP PD or gRPC,
:mod:`proxy_workers.serving.dispatch`; each a
:class:`proxy_workers.contract.ClientExchange`; this class is their
:class:`proxy_workers.contract.ClientSink`).

Invariants:
- llhttp does the framing and rejects what it rejects (smuggling attempts, bad chunking): any
  parser error is a 400 and the connection is closed. Upgrades are refused: the Upgrade header of
  a request without a body is ignored (RFC 9110 7.8), the request answered over HTTP/1.1 and the
  connection closed after it; one with a body gets 400 (llhttp cannot read that body).
- Limits hold whatever the reads (docs/security.md): one head budget per request
  (``max_head_size``, ``max_header_count``; target and fields counted as llhttp delivers them,
  trailer fields too) -> 414 or 431; the body (``max_body_size``, counted as de-chunked) -> 413
  before more is read. Trailer fields are never forwarded. The rules llhttp does not apply (Host
  count, dot segments) live in :mod:`proxy_workers.serving.rules`.
- Hop-by-hop headers, and any header the client names in ``Connection``, are dropped before the
  router adds its own (``X-Forwarded-For``, ``X-Request-ID``), so a client cannot strip those
  (the rules: :mod:`proxy_workers.forwarding.headers`).
- Responses go out in request order (pipelined requests wait their turn), refusals included: a
  request that cannot be read to its end is answered after the requests before it, then the
  connection closes. Every refusal before a worker goes through :meth:`ClientProtocol.refuse`,
  which counts it once, by reason (:mod:`proxy_workers.serving.refusals`); every other request
  is counted when its exchange ends.
- Bounded memory per connection (docs/security.md, "Memory"): reading stops while requests,
  or their bodies, wait past their caps, or while the client does not read what it is sent
  (when, and the worst case: :mod:`proxy_workers.serving.flow`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Final, cast

import httptools

from proxy_workers.errors import (
    BadRequest,
    InternalError,
    MethodNotAllowed,
    RequestTimeout,
    RouterError,
    clip,
    render,
    render_response,
)
from proxy_workers.forwarding.request import Request
from proxy_workers.routing.decision import prepare, prepare_any
from proxy_workers.routing.paths import ANY_WORKER, PROXIED_PATHS
from proxy_workers.serving import endpoints, rules
from proxy_workers.serving.admission import Waiting
from proxy_workers.serving.dispatch import DATA_PATHS
from proxy_workers.serving.flow import InputFlow
from proxy_workers.serving.reading import CONTINUE, FEED_SLICE
from proxy_workers.serving.records import end_request
from proxy_workers.serving.refusals import note_refusal
from proxy_workers.serving.rules import CLEAN_PATHS
from shm.histograms import O_CLIENT_GONE, O_ERROR, O_REJECTED, O_SUCCESS

if TYPE_CHECKING:
    from proxy_workers.contract import ClientExchange, ClientRequest, ClientSink, Refusal
    from proxy_workers.routing.context import RequestContext
    from proxy_workers.serving.state import ProxyProcess

log = logging.getLogger("shardgate.proxy")
REFUSED_METHODS: Final = frozenset({b"HEAD", b"CONNECT", b"TRACE"})
# FEED_SLICE (reading): a read larger than this is parsed a slice at a time, so that parsing can
# stop between slices when the pipelining cap is reached: what one read adds past it stays small.


class ClientProtocol(InputFlow, asyncio.Protocol):
    """One client connection: its requests (read by :class:`RequestReader`, when to read:
    :class:`InputFlow`), their answers."""

    __slots__ = ("_draining_queue", "_queued_bytes", "err_status", "exchange", "parser", "peer", "proc",
                 "queue", "req_started", "sent", "transport")

    def __init__(self, proc: ProxyProcess) -> None:
        self.proc = proc
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.exchange: ClientExchange | None = None
        self.queue: deque[Request] = deque()
        self.peer = b""
        self.idle_since = proc.loop.time()
        self.reading_since = 0.0
        self._upgrade = False  # a request asked to upgrade: it is answered, then the connection closed
        self._stopped = False  # nothing more is parsed: after an upgrade, or a request refused unread
        self._write_paused = False  # the client's write buffer is above its high-water mark
        self._blocked = False  # reading is paused: stopped, write-paused, or max_pipelined waiting
        self._held = b""  # the unparsed rest of a read, while blocked
        self._draining_queue = False  # _drain_queue is on the stack
        self._queued_bytes = 0  # body bytes of the queued requests
        # The request being answered, for its record (serving.records): when it was dispatched,
        # bytes written for it, and the status of an error the router answered itself.
        self.req_started = 0.0
        self.sent = 0
        self.err_status = 0
        self._reset()

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream transport (TCP)
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0] if peer else "unknown").encode()
        self.proc.connections.add(self)

    def data_received(self, data: bytes | memoryview) -> None:
        if self._blocked or len(data) > FEED_SLICE:
            self._receive_in_slices(data)
            return
        if not self._head_done:
            self._head_len += len(data)  # an upper bound of the head's size (see the check below)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # llhttp stops after a request that asks to upgrade (it is already complete and
            # dispatched, with keep-alive off); what follows would be the other protocol.
            self._stop()
        except httptools.HttpParserCallbackError as exc:
            # Our own callbacks raised: a RouterError is an answer, anything else is a bug.
            cause = exc.__context__
            if not isinstance(cause, RouterError):
                log.error("internal error while handling a request", exc_info=cause)
                cause = InternalError("internal router error; see the router's log")
            self.fail_connection(cause)
        except httptools.HttpParserError as exc:
            self.fail_connection(BadRequest(f"malformed HTTP request: {exc}", reason="bad_http"))
        else:
            # A head still incomplete after a read: llhttp buffers its unfinished field, and the
            # fields so far are held, so it is refused once more than its budget of bytes (or of
            # fields) arrived; a complete head is checked exactly (on_headers_complete).
            if self._head_len and not self._head_done and (
                    self._head_len > self.proc.max_head_size
                    or len(self._headers) > self.proc.max_header_count):
                self._incomplete_head_refusal()

    def _incomplete_head_refusal(self) -> None:
        settings = self.proc.settings
        if len(self._url) > settings.max_head_size:  # on_url has every piece received so far
            self.fail_connection(rules.target_too_long(settings.max_head_size))
        elif len(self._headers) > settings.max_header_count:
            self.fail_connection(rules.too_many_fields(settings.max_header_count))
        else:
            self.fail_connection(rules.head_too_large(settings.max_head_size))

    def connection_lost(self, exc: Exception | None) -> None:
        self.proc.connections.discard(self)
        self.queue.clear()
        self._queued_bytes = 0
        self._held = b""
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.client_gone()
            self._gone(exchange)
            if not isinstance(exchange, Waiting):  # still in admission's queue: no exchange, no record
                end_request(self.proc, exchange.request, exchange, O_CLIENT_GONE, 0, self.req_started,
                            self.sent)
        # The parser refers back to this protocol: break the cycle so the connection's buffers
        # are freed now, not by the cyclic collector.
        self.parser = None  # type: ignore[assignment]

    # -- reading: a complete request, dispatched now or queued ------------------------------

    def _enqueue(self, request: Request) -> None:
        if self.exchange is None and not self.queue:
            self.dispatch(request)
        else:
            self.queue.append(request)
            self._queued_bytes += len(request.body)
            self._update_input()

    # -- requests --------------------------------------------------------------------------

    def dispatch(self, request: Request) -> None:
        self.idle_since = 0.0
        proc = self.proc
        self.req_started = proc.loop.time()
        self.sent = self.err_status = 0
        try:
            if request.error is not None:
                raise request.error
            path = request.path
            if path not in CLEAN_PATHS:  # before any prefix check
                rules.check_path(path)
            if proc.gate is not None:
                proc.gate.check(request)
            if not path.startswith(b"/v1/") or path.startswith(b"/v1/models"):
                rule = PROXIED_PATHS.get(path)  # native endpoints (routing.paths): off the /v1/ path
                if rule is None:
                    self._answer_locally(request)
                    return
                if request.method not in rule.methods:
                    raise MethodNotAllowed(f"{clip(path.decode('latin-1'))} accepts "
                                           f"{', '.join(sorted(m.decode() for m in rule.methods))} only")
                route, ctx = prepare_any(proc, request) if rule.route_by == ANY_WORKER else \
                    prepare(proc, request)
            else:
                if request.method in REFUSED_METHODS:
                    raise MethodNotAllowed(f"{request.method.decode()} is not supported on "
                                           f"{clip(path.decode('latin-1'))}")
                route, ctx = prepare(proc, request)
            if proc.limits_on:  # admission control: start, queue (self.exchange waits) or raise
                proc.admission.arrive(self, request, route, ctx)
                return
            exchange = DATA_PATHS[ctx.router](proc, self, request, route, ctx)
            self.exchange = exchange
            exchange.start()
        except RouterError as err:
            self.refuse(err, request)  # refused before any worker: still a request
        except Exception:  # a bug: answered with 500 and logged, the connection closed after it
            rid = request.request_id.decode("latin-1")
            log.exception("internal error while dispatching a request (request_id=%s)", rid,
                          extra={"request_id": rid})
            started = self.exchange
            if started is not None and started.request is request:
                self.exchange = None
                started.client_gone()
                self._gone(started)
            request.keep_alive = False
            self.refuse(InternalError("internal router error; see the router's log"), request)

    def begin(self, request: ClientRequest, route: Any, ctx: RequestContext, sink: ClientSink,
              admitted: set[ClientExchange]) -> None:
        """Start the exchange of a request admission control let through (now or from its queue);
        it reports to ``sink``, which frees its place when it ends, then calls ``exchange_done``."""
        exchange = DATA_PATHS[ctx.router](self.proc, sink, cast(Request, request), route, ctx)
        self.exchange = exchange
        admitted.add(exchange)  # before start: an exchange may end inside it
        exchange.start()

    def refuse(self, err: Refusal, request: ClientRequest) -> None:
        """Answer a request refused before any worker (bad request, unknown model, admission
        control's 429/503 ...): counted as rejected, by reason, answered, then the connection goes on."""
        self.exchange = None
        note_refusal(self.proc, err, request)
        self.send_error(err, request)
        end_request(self.proc, request, None, O_REJECTED, err.status, self.req_started, self.sent)
        self._next(request)

    def _answer_locally(self, request: Request) -> None:
        status, body, content_type = endpoints.answer(self.proc, request)
        if self.proc.draining:
            request.keep_alive = False
        self.write(_for_method(request, render_response(status, body, content_type,
                                                        request.request_id.decode(),
                                                        close=not request.keep_alive)))
        self._next(request)

    def exchange_done(self, exchange: ClientExchange, error: bool) -> None:
        """Any kind of exchange ended: it leaves the active set and counts once as a request."""
        proc = self.proc
        proc.active.discard(exchange)
        proc.count_request(error)
        request = exchange.request
        end_request(proc, request, exchange, O_ERROR if error else O_SUCCESS, self.err_status,
                    self.req_started, self.sent)
        if self.exchange is exchange:
            self.exchange = None
        self._next(request)

    def _gone(self, exchange: ClientExchange) -> None:
        """An exchange ended silently (``client_gone``): free its admission place, if it took one."""
        if self.proc.admitted:
            self.proc.admission.done(exchange)

    def _next(self, request: ClientRequest) -> None:
        # While the proxy drains, a response whose head promised keep-alive (it went out before
        # the stop) leaves the connection open: the client's next request is answered, with
        # Connection: close, instead of finding the connection closed under it (the drain closes
        # idle connections after a linger; serving.process).
        if not request.keep_alive:
            self.close()
            return
        if self.queue:
            self._drain_queue()
            if self.queue or self.exchange is not None:
                return
        self.idle_since = self.proc.loop.time()
        if self._continue_pending:  # a request's head waits for its 100 Continue
            self._continue_pending = False
            self.write(CONTINUE)

    def _drain_queue(self) -> None:
        """Dispatch queued requests in order while each is answered at once (local answers,
        refusals) and the client reads; stop at one that starts an exchange. A loop, not a
        recursion: a dispatch that answers at once calls _next again, which returns to it here."""
        if self._draining_queue:
            return
        self._draining_queue = True
        try:
            while self.queue and self.exchange is None and not self._write_paused:
                transport = self.transport
                if transport is None or transport.is_closing():
                    return
                request = self.queue.popleft()
                self._queued_bytes -= len(request.body)
                self.dispatch(request)
        finally:
            self._draining_queue = False
        if self._blocked:
            self._update_input()

    # -- output ----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send ``data``, at the end of this loop iteration (proxy_workers.outbox)."""
        if self.transport is not None:
            self.sent += len(data)
            self.proc.outbox.write(self.transport, data)

    def close(self) -> None:
        """Close the connection once what was written is out."""
        if self.transport is not None:
            self.proc.outbox.flush()
            self.transport.close()

    def send_error(self, err: Refusal, request: ClientRequest) -> None:
        self.err_status = err.status
        if self.proc.draining:
            request.keep_alive = False
        self.write(_for_method(request, render(err, request.request_id.decode(),
                                               close=not request.keep_alive)))

    def fail_connection(self, err: RouterError) -> None:
        """A request that cannot be read to its end (unparseable, over a limit, too slow): it is
        refused in its turn, after the answers to the requests before it, and the connection
        closes after that; nothing more is read."""
        self._stop()
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # the last request asked to close (llhttp then refuses what follows): done
        request = Request(b"", self._url, True, False)  # keep_alive False: close after the answer
        request.error = err
        request.peer = self.peer
        request.request_id = self.proc.next_request_id()
        self._reset()
        self.reading_since = 0.0
        self._enqueue(request)

    @property
    def idle(self) -> bool:
        """Between requests: no exchange, nothing queued, no request arriving."""
        return self.exchange is None and not self.queue and not self.reading_since

    def check_deadline(self, now: float, settings_header: float, keepalive: float) -> None:
        if self.reading_since and now - self.reading_since > settings_header:
            self.reading_since = 0.0
            self.fail_connection(
                RequestTimeout(f"request not received within header_timeout={settings_header}s"))
        elif self.idle_since and not self.exchange and now - self.idle_since > keepalive:
            self.close()


def _for_method(request: ClientRequest, response: bytes) -> bytes:
    """A response to HEAD carries no content (RFC 9110 9.3.2): the head alone, Content-Length kept."""
    if request.method == b"HEAD":
        return response[:response.index(b"\r\n\r\n") + 4]
    return response
