"""The client side of a proxy process: HTTP/1.1 parsing with httptools, dispatch, responses.

Role: :class:`ClientProtocol` reads requests from one client connection, answers the router's own
endpoints, and hands ``/v1/*`` requests to the exchange of the router that serves them (HTTP,
HTTP PD or gRPC: each a :class:`proxy_workers.contract.ClientExchange`; this class is their
:class:`proxy_workers.contract.ClientSink`).

Invariants:
- llhttp does the framing and rejects what it rejects (smuggling attempts, bad chunking): any
  parser error is a 400 and the connection is closed. Upgrades are refused: the Upgrade header of
  a request without a body is ignored (RFC 9110 7.8), the request answered over HTTP/1.1 and the
  connection closed after it; one with a body gets 400 (llhttp cannot read that body).
- The request body is buffered up to ``max_body_size`` (the router must read ``model`` before it
  can pick a worker); a larger declared or actual body gets 413 before more is read.
- Hop-by-hop headers, and any header the client names in ``Connection``, are dropped before the
  router adds its own (``X-Forwarded-For``, ``X-Request-ID``), so a client cannot strip those
  (the rules: :mod:`proxy_workers.forwarding.headers`).
- A request refused before routing (bad HTTP or JSON, a limit, an unknown model or path) is
  counted once as rejected; every other request is counted when its exchange ends.
- Responses go out in request order (pipelined requests wait their turn).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import httptools

from proxy_workers.errors import (
    BadRequest,
    BodyTooLarge,
    HeadersTooLarge,
    InternalError,
    MethodNotAllowed,
    RequestTimeout,
    RouterError,
    render,
    render_response,
)
from proxy_workers.forwarding.headers import (
    NO_TOKENS,
    ROUTER_NOTES,
    ROUTER_READS,
    SPECIAL_REQUEST_HEADERS,
    connection_tokens,
    without_fields,
)
from proxy_workers.forwarding.request import Request
from proxy_workers.http.exchange import Exchange
from proxy_workers.http.pd import PDExchange
from proxy_workers.routing.decision import prepare
from proxy_workers.serving import endpoints

if TYPE_CHECKING:
    from proxy_workers.contract import ClientExchange, ClientRequest, ClientSink, Refusal
    from proxy_workers.routing.context import RequestContext
    from proxy_workers.serving.state import ProxyProcess

log = logging.getLogger("shardgate.proxy")
MAX_HEAD_BYTES = 64 * 1024
REFUSED_METHODS = frozenset({b"HEAD", b"CONNECT", b"TRACE"})
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:@/+=-]{1,128}$")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class ClientProtocol(asyncio.Protocol):
    """One client connection."""

    __slots__ = ("_body", "_body_len", "_conn_tokens", "_continue_pending", "_expect", "_head_done",
                 "_head_len", "_headers", "_noted", "_parts", "_stopped", "_upgrade", "_url", "exchange",
                 "idle_since", "parser", "peer", "proc", "queue", "reading_since", "transport")

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
        self._stopped = False  # llhttp stopped after that request: later bytes are not HTTP/1.1
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._parts: list[bytes] = []  # header lines for the worker, built as headers arrive
        self._noted: list[tuple[bytes, bytes]] = []  # fields in ROUTER_NOTES, rare
        self._body: list[bytes] = []
        self._body_len = 0
        self._head_len = 0  # bytes received while this request's head was incomplete
        self._head_done = False
        self._conn_tokens: frozenset[bytes] = NO_TOKENS
        self._continue_pending = False
        self._expect = False

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream transport (TCP)
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0] if peer else "unknown").encode()
        self.proc.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        if not self._head_done:
            self._head_len += len(data)  # an upper bound of the head's size (see the check below)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # llhttp stops after a request that asks to upgrade (it is already complete and
            # dispatched, with keep-alive off); what follows would be the other protocol.
            self._stopped = True
        except httptools.HttpParserCallbackError as exc:
            # Our own callbacks raised: a RouterError is an answer, anything else is a bug.
            cause = exc.__context__
            if not isinstance(cause, RouterError):
                log.error("internal error while handling a request", exc_info=cause)
                cause = InternalError("internal router error; see the router's log")
            self.fail_connection(cause)
        except httptools.HttpParserError as exc:
            self.fail_connection(BadRequest(f"malformed HTTP request: {exc}"))
        else:
            # A head still incomplete after MAX_HEAD_BYTES of input is refused: what llhttp
            # buffers stays bounded, at no cost per header.
            if self._head_len > MAX_HEAD_BYTES and not self._head_done:
                self.fail_connection(HeadersTooLarge(f"request head exceeds {MAX_HEAD_BYTES} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.proc.connections.discard(self)
        self.queue.clear()
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.client_gone()
            self._gone(exchange)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.pause_upstream()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.resume_upstream()

    # -- httptools callbacks ---------------------------------------------------------------

    # No on_message_begin: each httptools callback costs ~0.3 us, so per-message state is reset
    # at the end of the previous message and a new message is noticed by its first URL bytes.

    def on_url(self, url: bytes) -> None:
        if not self._url:
            self.reading_since = self.proc.loop.time()
            self.idle_since = 0.0  # a request is arriving: header_timeout governs it, not keepalive
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        low = name.lower()
        self._headers.append((low, value))
        # Each field is classified once, here: an ordinary one becomes its line for the worker
        # right away; hop-by-hop and router-read ones are handled by _special_header.
        if low not in SPECIAL_REQUEST_HEADERS:
            self._parts.append(b"%s: %s\r\n" % (low, value))
        elif low != b"host":  # Host is the worker's (set per pool); nothing to note
            self._special_header(low, value)

    def _special_header(self, name: bytes, value: bytes) -> None:
        if name == b"content-length":
            limit = self.proc.settings.max_body_size
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
        if self.parser.should_upgrade():
            # llhttp treats everything after an upgrading head as the new protocol, so a body
            # cannot be read: such a request is refused rather than forwarded without its body.
            if any(n == b"transfer-encoding" or (n == b"content-length" and int(v) > 0)
                   for n, v in self._headers):
                raise BadRequest("protocol upgrades are not supported")
            self._upgrade = True
        if self._expect:
            if self.exchange is None and not self.queue:
                self.write(CONTINUE)
            else:
                # A pipelined request: its interim answer must not land inside an earlier
                # response; it goes out when the connection's earlier requests are answered.
                self._continue_pending = True

    def on_body(self, body: bytes) -> None:
        self._body_len += len(body)
        if self._body_len > self.proc.settings.max_body_size:
            raise BodyTooLarge(f"request body exceeds max_body_size={self.proc.settings.max_body_size}")
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        keep_alive = parser.should_keep_alive()
        # HTTP/1.0 keeps a connection only when a Connection header asks for it, so keep-alive
        # without one means 1.1 (and get_http_version, which builds a string, is skipped).
        http11 = (keep_alive and not self._conn_tokens) or parser.get_http_version() == "1.1"
        request = Request(parser.get_method(), self._url, http11, keep_alive and not self._upgrade)
        self._continue_pending = False  # the body came anyway; no interim answer is due
        body = self._body
        request.body = body[0] if len(body) == 1 else b"".join(body)
        self._prepare(request)
        self._reset()
        self.reading_since = 0.0
        if self.exchange is None and not self.queue:
            self.dispatch(request)
        else:
            self.queue.append(request)

    # -- requests --------------------------------------------------------------------------

    def _prepare(self, request: Request) -> None:
        """Request id, and the upstream head minus its request line and Host."""
        supplied_id, forwarded_for = self._apply_notes(request) if self._noted else (b"", self.peer)
        parts = self._parts
        if self._conn_tokens:
            # Rare: the client named headers as hop-by-hop in Connection; leave those out too.
            parts = without_fields(parts, self._conn_tokens)
        request.headers = self._headers
        request.peer = self.peer
        request.request_id = rid = supplied_id or self.proc.next_request_id()
        parts.append(b"x-forwarded-for: %s\r\nx-request-id: %s\r\n" % (forwarded_for, rid))
        request.upstream_head = b"".join(parts)

    def _apply_notes(self, request: Request) -> tuple[bytes, bytes]:
        """The fields kept aside (ROUTER_NOTES): (client's request id or b"", X-Forwarded-For)."""
        forwarded: list[bytes] = []
        supplied_id = b""
        for name, value in self._noted:
            if name == b"x-forwarded-for":
                forwarded.append(value)  # repeated fields form one list; keep every hop
            elif name == b"x-request-id":
                if _REQUEST_ID.match(value):
                    supplied_id = value
            else:
                try:
                    self._router_header(request, name, value)
                except RouterError as err:
                    request.error = err
        forwarded.append(self.peer)
        return supplied_id, b", ".join(forwarded)

    @staticmethod
    def _router_header(request: Request, name: bytes, value: bytes) -> None:
        if name == b"x-shardgate-debug":
            request.explain = value.strip() in (b"1", b"true")
        elif name == b"x-shardgate-connection":
            wanted = value.strip().lower().decode("latin-1")
            if wanted not in ("http", "grpc", "any"):
                raise BadRequest("X-Shardgate-Connection must be http, grpc or any",
                                 param="X-Shardgate-Connection")
            request.connection = wanted

    def dispatch(self, request: Request) -> None:
        self.idle_since = 0.0
        proc = self.proc
        try:
            if request.error is not None:
                raise request.error
            if proc.gate is not None:
                proc.gate.check(request)
            path = request.path
            if not path.startswith(b"/v1/") or path.startswith(b"/v1/models"):
                self._answer_locally(request)
                return
            if request.method in REFUSED_METHODS:
                raise MethodNotAllowed(f"{request.method.decode()} is not supported on {path.decode()}")
            route, ctx = prepare(proc, request)
            if proc.limits_on:  # admission control: start, queue (self.exchange waits) or raise
                proc.admission.arrive(self, request, route, ctx)
                return
            exchange = DATA_PATHS[ctx.router](proc, self, request, route, ctx)
            self.exchange = exchange
            exchange.start()
        except RouterError as err:
            self.refuse(err, request)  # refused before any worker: still a request

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
        control's 429/503 ...): counted as rejected, answered, then the connection goes on."""
        self.exchange = None
        self.proc.count_rejected()
        self.send_error(err, request)
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
        if self.exchange is exchange:
            self.exchange = None
        self._next(exchange.request)

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
            if self.transport is not None:
                self.transport.close()
            return
        if self.queue:
            self.dispatch(self.queue.popleft())
        else:
            self.idle_since = self.proc.loop.time()
            if self._continue_pending:  # a request's head waits for its 100 Continue
                self._continue_pending = False
                self.write(CONTINUE)

    # -- output ----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def send_error(self, err: Refusal, request: ClientRequest) -> None:
        if self.proc.draining:
            request.keep_alive = False
        self.write(_for_method(request, render(err, request.request_id.decode(),
                                               close=not request.keep_alive)))

    def fail_connection(self, err: RouterError) -> None:
        """A request that cannot be parsed or is refused before its body: answer and close."""
        exchange = self.exchange
        if exchange is not None:
            if exchange.head_sent:
                # Mid-response garbage (a pipelined request): drop the connection; the response
                # in progress cannot be followed by an error answer.
                if self.transport is not None:
                    self.transport.close()
                return
            # Nothing reached the client yet (e.g. an internal error while dispatching): release
            # the worker and answer.
            self.exchange = None
            exchange.client_gone()
            self._gone(exchange)
        self.proc.count_rejected()
        self.write(render(err, close=True))
        if self.transport is not None:
            self.transport.close()

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
            if self.transport is not None:
                self.transport.close()


def _grpc_exchange(proc: ProxyProcess, client: ClientSink, request: Request, route: Any,
                   ctx: RequestContext) -> ClientExchange:
    from proxy_workers.grpc.exchange import GrpcExchange  # grpc is loaded on first use only

    return GrpcExchange(proc, client, request, route, ctx)


# The data path of each of the four routers. The route's kind follows from the router
# (routing.decision.prepare): a ModelRoute for the regular routers, a PDRoute for http_pd, either
# for the gRPC path, which serves both of its routers.
if TYPE_CHECKING:
    ExchangeFactory: TypeAlias = Callable[[ProxyProcess, ClientSink, Request, Any, RequestContext],
                                          ClientExchange]
DATA_PATHS: dict[str, ExchangeFactory] = {"http_regular": Exchange, "http_pd": PDExchange,
                                          "grpc_regular": _grpc_exchange, "grpc_pd": _grpc_exchange}


def _for_method(request: ClientRequest, response: bytes) -> bytes:
    """A response to HEAD carries no content (RFC 9110 9.3.2): the head alone, Content-Length kept."""
    if request.method == b"HEAD":
        return response[:response.index(b"\r\n\r\n") + 4]
    return response
