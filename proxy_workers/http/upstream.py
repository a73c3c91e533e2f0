"""Connections to workers: an asyncio Protocol parsing responses with httptools.

Role: carry one request at a time to a worker and feed the parsed response back to the attempt
that owns the connection (an :class:`UpstreamOwner`: an HTTP exchange, a PD decode leg, a PD
prefill leg, or an answer being dropped for a retry). The keep-alive pools that open and keep
these connections are :mod:`proxy_workers.http.pools`'.

Invariants:
- A connection belongs to at most one exchange; it returns to its pool only after a complete
  response that allows keep-alive, and never after an abort (a client disconnect closes it, which
  is how the worker learns to stop generating).
- A parse error from a worker never escapes: it becomes a 502 (before the head reached the
  client) or a truncated response (after).
- Response header rules (what is relayed, what is hop-by-hop) are
  :mod:`proxy_workers.forwarding.headers`'; fields are classified once, as they arrive.
- One request, one final response (RFC 9112 9.3): interim 1xx responses (100, 102, 103...) are
  read and dropped, never relayed; a 101 fails the attempt (nobody asked to switch protocols).
  Anything after the final response (a second response, garbage) is a protocol error: the
  answer already read stands, the connection is closed instead of pooled. A partial next head
  left inside the parser is caught when the connection is next used (a parse error there).
- Transfer codings (RFC 9112 6.1, 6.3, 7; the rule: :mod:`proxy_workers.http.framing`): the
  router decodes none; the bytes are relayed as they came, the codings as ``transfer-encoding``
  lines, and a body whose final coding is not chunked is read until the worker closes. An owner
  that cannot deliver a coding (an HTTP/1.0 client) refuses it.
- An owner refuses what a worker sent by raising :class:`WorkerProtocolError` from a callback:
  the connection closes and the owner's ``upstream_failed`` gets the reason.

Bounds (what a worker can make a proxy buffer, per connection):
- The response head, interim ones included: at most :data:`MAX_RESPONSE_HEAD` bytes are read
  before it is complete (plus what else came in that same read); a longer head fails the
  attempt, as nginx's "upstream sent too big header". The relayed lines are built from it.
- The body is not buffered: each read is written to the client at once, and while the client's
  socket is full (its transport above the high-water mark) the exchange pauses reading here,
  so a worker's excess waits in the kernel's socket buffers, not in the proxy. A PD prefill
  answer is buffered up to ``MAX_PREFILL_ANSWER`` (:mod:`proxy_workers.forwarding.handoff`).
- A chunked body's trailer fields are parsed and dropped (never relayed, never kept). One
  trailer field is held by httptools until it ends; that is the only worker input bounded by
  time alone (``total_timeout``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol, cast

import httptools

from proxy_workers.compiled import mypyc_attr
from proxy_workers.forwarding.headers import (
    NO_TOKENS,
    RESPONSE_DROP,
    connection_tokens,
    field_name,
    without_fields,
)
from proxy_workers.http.framing import MAX_RESPONSE_HEAD, WorkerProtocolError, coding_lines

if TYPE_CHECKING:
    from proxy_workers.contract import UpstreamConnectionView
    from proxy_workers.outbox import Outbox


class ConnectionPool(Protocol):
    """What a connection and its owners use of its pool (:class:`proxy_workers.http.pools.WorkerPool`).

    A Protocol, so that only the pools, which make connections, import the other module (no import
    cycle, not even a type-only one: tests/test_boundaries.py)."""

    authority: bytes
    outbox: Outbox

    def put(self, conn: UpstreamConnection) -> None: ...

    def forget(self, conn: UpstreamConnection) -> None: ...


@mypyc_attr(allow_interpreted_subclasses=True)
class UpstreamOwner:
    """An HTTP attempt (regular exchange, PD decode or prefill leg, a dropped answer), as the
    worker connection that carries it sees it: the parsed response, piece by piece.

    A base class, not a Protocol: compiled, the connection calls these through a vtable instead
    of looking them up by name, four times a request. Owners that run interpreted (PD prefill
    legs, dropped answers) subclass it too (``allow_interpreted_subclasses``)."""

    __slots__ = ()

    def on_response_head(self, conn: UpstreamConnectionView, status: int) -> None:
        raise NotImplementedError

    def on_response_body(self, body: bytes) -> None:
        raise NotImplementedError

    def on_response_complete(self, conn: UpstreamConnectionView) -> None:
        raise NotImplementedError

    def after_upstream_data(self) -> None:
        """Called once after each packet from the worker, when its callbacks have run."""
        raise NotImplementedError

    def upstream_failed(self, conn: UpstreamConnectionView, why: str) -> None:
        raise NotImplementedError


class _NoOwner(UpstreamOwner):
    """The owner of an idle connection, or of one whose final response has been read: a response
    arriving for nobody is a protocol error (the connection is dropped)."""

    __slots__ = ()

    def on_response_head(self, conn: UpstreamConnectionView, status: int) -> None:
        raise WorkerProtocolError("worker sent a second response to one request")

    def on_response_body(self, body: bytes) -> None: ...

    def on_response_complete(self, conn: UpstreamConnectionView) -> None: ...

    def after_upstream_data(self) -> None: ...

    def upstream_failed(self, conn: UpstreamConnectionView, why: str) -> None: ...


NO_OWNER: UpstreamOwner = _NoOwner()


class _Interim(UpstreamOwner):
    """Owns the connection while an interim (1xx) response is read: nothing of it reaches the
    owner, and its end hands the connection back for the final response."""

    __slots__ = ("owner",)

    def __init__(self, owner: UpstreamOwner) -> None:
        self.owner = owner

    def on_response_head(self, conn: UpstreamConnectionView, status: int) -> None: ...

    def on_response_body(self, body: bytes) -> None: ...  # llhttp frames no 1xx with content

    def on_response_complete(self, conn: UpstreamConnectionView) -> None:
        cast(UpstreamConnection, conn).interim_done(self.owner)

    def after_upstream_data(self) -> None:
        self.owner.after_upstream_data()

    def upstream_failed(self, conn: UpstreamConnectionView, why: str) -> None:
        self.owner.upstream_failed(conn, why)


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to a worker."""

    __slots__ = ("authority", "chunked", "conn_tokens", "content_type", "exchange", "head_room",
                 "idle_since", "keep_alive", "length", "lines", "outbox", "parser", "paused", "pool",
                 "received", "transport", "until_eof")

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.authority = pool.authority  # (the pool's, kept here: read for every request sent)
        self.outbox = pool.outbox
        self.transport: asyncio.Transport | None = None
        self.exchange: UpstreamOwner = NO_OWNER
        self.parser = httptools.HttpResponseParser(self)
        self.received = False
        self.keep_alive = False
        self.until_eof = False  # the response body is delimited by the worker closing (RFC 9112 6.3)
        self.idle_since = 0.0
        self.paused = False  # reading paused by the owner (the client's socket is full)
        self.head_room: int = MAX_RESPONSE_HEAD  # head bytes still allowed; 0 once the head is complete
        self._reset()

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream transport (TCP)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is NO_OWNER:
            # A worker talking on an idle keep-alive connection: it is out of sync; drop it.
            self.close()
            return
        room = self.head_room
        if room:  # the head is still arriving: it may take ``room`` more bytes (0 once complete)
            self.received = True
            if len(data) >= room:
                rest = self._overflow(exchange, data, room)
                if rest is None:
                    return
                data = rest
            else:
                self.head_room = room - len(data)
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._bad_bytes(exchange, exc)
            return
        exchange.after_upstream_data()

    def _overflow(self, exchange: UpstreamOwner, data: bytes, room: int) -> bytes | None:
        """A read that reaches the head budget: parse up to it; the rest is parsed (returned) only
        if the head completed within the budget, else the attempt fails."""
        # -1: still arriving; the head completing sets 0, an interim response's end the full budget.
        self.head_room = -1
        try:
            self.parser.feed_data(data[:room])
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._bad_bytes(exchange, exc)
            return None
        left = self.head_room
        if left < 0:  # no complete head within the budget
            self._fail(f"worker's response head exceeds {MAX_RESPONSE_HEAD} bytes")
            return None
        if left:  # an interim response ended within the budget: the final head has a budget of its own
            self.data_received(data[room:])
            return None
        return data[room:]

    def _bad_bytes(self, exchange: UpstreamOwner, exc: Exception) -> None:
        """The parser refused the worker's bytes (or an owner refused what they said)."""
        if self.exchange is NO_OWNER:
            # The final response was complete before these bytes (a second response, garbage):
            # it is the answer; the connection is out of sync and is not reused.
            self.keep_alive = False
            self.close()
            exchange.after_upstream_data()
            return
        cause = exc.__context__
        refused = isinstance(cause, WorkerProtocolError)
        self._fail(str(cause) if refused else f"malformed response from worker: {cause or exc}")

    def _fail(self, why: str) -> None:
        owner, self.exchange = self.exchange, NO_OWNER
        self.keep_alive = False
        self.close()
        owner.upstream_failed(self, why)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)
        exchange, self.exchange = self.exchange, NO_OWNER
        self.transport = None
        if exchange is NO_OWNER:
            return
        if exc is None and self.until_eof:
            # A body without Content-Length or chunking ends with the connection: that is its
            # complete end (llhttp has no EOF callback, so the message is completed here).
            self.until_eof = False
            exchange.on_response_complete(self)
            exchange.after_upstream_data()
            return
        exchange.upstream_failed(self, "worker closed the connection" if exc is None else str(exc))

    def pause_writing(self) -> None:  # the request body is small; nothing to pause
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks ---------------------------------------------------------------

    def _reset(self) -> None:
        """Per-response state, reset when a request is sent (no on_message_begin callback:
        each httptools callback costs ~0.1 us on the hot path) and after an interim response."""
        self.lines: list[bytes] = []  # header lines to relay, hop-by-hop ones already left out
        self.length: bytes | None = None  # Content-Length, as the worker sent it
        self.chunked = False
        self.content_type = b""
        self.until_eof = False
        self.conn_tokens: frozenset[bytes] | None = None
        self.head_room = MAX_RESPONSE_HEAD

    def on_header(self, name: bytes, value: bytes) -> None:
        # Each field is classified once, here: a relayed one becomes its client-side line right
        # away (names lowercased; HTTP field names are case-insensitive), a hop-by-hop one is
        # only noted for framing. A field after the head (head_room 0) is a trailer: dropped.
        if not self.head_room:
            return
        low = field_name(name)
        if low not in RESPONSE_DROP:
            self.lines.append(b"%s: %s\r\n" % (low, value))
            if low == b"content-type":
                self.content_type = value
        elif low == b"content-length":
            self.length = value
        elif low == b"transfer-encoding":
            if value == b"chunked" and not self.chunked:
                self.chunked = True
            else:
                self._codings(value)
        elif low == b"connection" and value.lower() not in (b"close", b"keep-alive"):
            tokens = connection_tokens(value)
            self.conn_tokens = tokens if self.conn_tokens is None else self.conn_tokens | tokens

    def _codings(self, value: bytes) -> None:
        """A Transfer-Encoding other than a lone ``chunked``: llhttp frames the body by its last
        coding; every coding but a final ``chunked`` is relayed for the client to undo."""
        content = self.parser.get_status_code() not in (204, 304)
        lines, self.chunked = coding_lines(value, self.chunked, content)
        self.lines += lines

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if status < 200:
            self._interim(status)
            return
        self.keep_alive = parser.should_keep_alive()
        self.head_room = 0
        if self.length is None and not self.chunked:
            self.until_eof = status not in (204, 304)
        self.exchange.on_response_head(self, status)

    def _interim(self, status: int) -> None:
        if self.exchange is NO_OWNER:
            NO_OWNER.on_response_head(self, status)  # after the final response: refused as a second one
        if status == 101:
            raise WorkerProtocolError("worker switched protocols (101) unasked")
        # 100, 102, 103 or an unknown 1xx (RFC 9110 15.2: a client must read and drop it; llhttp
        # frames every 1xx as content-less): not relayed, its fields not kept.
        self.exchange = _Interim(self.exchange)

    def interim_done(self, owner: UpstreamOwner) -> None:
        """An interim response ended: the owner waits for the final one, with a fresh head budget."""
        self.exchange = owner
        self._reset()

    def relayed_lines(self) -> list[bytes]:
        """The header lines to relay, minus any the worker named in its Connection header."""
        return without_fields(self.lines, self.conn_tokens or NO_TOKENS)

    def on_body(self, body: bytes) -> None:
        self.exchange.on_response_body(body)

    def on_message_complete(self) -> None:
        # The connection belongs to nobody from here until the owner releases it: a response
        # following in the same read is then refused (NO_OWNER), not relayed.
        exchange, self.exchange = self.exchange, NO_OWNER
        exchange.on_response_complete(self)

    # -- used by the exchange ------------------------------------------------------------

    def send(self, exchange: UpstreamOwner, data: bytes) -> None:
        self._reset()
        self.received = False
        self.exchange = exchange
        transport = self.transport
        assert transport is not None  # a pooled or new connection is open when it is handed out
        self.outbox.write(transport, data)  # sent at the end of this loop iteration

    def release(self, now: float) -> None:
        """Back to the pool if the response allows it, else closed."""
        self.exchange = NO_OWNER
        if self.keep_alive and self.transport is not None and not self.transport.is_closing():
            # A slow client may have paused reading (backpressure) just as the response ended;
            # the exchange that would have resumed it is gone, so a pooled socket must read.
            if self.paused:
                self.resume_reading()
            self.idle_since = now
            self.pool.put(self)
        else:
            self.close()

    def pause_reading(self) -> None:
        """Stop reading the worker's answer (back-pressure from the client)."""
        if self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.outbox.flush()  # what was written goes out before the close
            self.transport.close()

    def abort(self) -> None:
        """Close at once (RST): the worker sees the client is gone and stops generating."""
        self.exchange = NO_OWNER
        if self.transport is not None:
            self.transport.abort()
