"""Connections to workers: an asyncio Protocol parsing responses with httptools, and keep-alive pools.

Role: carry one request at a time to a worker and feed the parsed response back to the attempt
that owns the connection (a :class:`proxy_workers.contract.UpstreamOwner`: an HTTP exchange, a PD
decode leg or a PD prefill leg).

Invariants:
- A connection belongs to at most one exchange; it returns to its pool only after a complete
  response that allows keep-alive, and never after an abort (a client disconnect closes it, which
  is how the worker learns to stop generating).
- Pools are LIFO (the most recently used socket is the least likely to have been closed by the
  worker) and bounded by the ``pool_size`` setting; idle sockets older than ``keepalive_timeout``
  are closed by the proxy's periodic sweep.
- A parse error from a worker never escapes: it becomes a 502 (before the head reached the
  client) or a truncated response (after).
- Response header rules (what is relayed, what is hop-by-hop) are
  :mod:`proxy_workers.forwarding.headers`'; fields are classified once, as they arrive.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import httptools

from proxy_workers.forwarding.headers import NO_TOKENS, RESPONSE_DROP, connection_tokens, without_fields

if TYPE_CHECKING:
    from proxy_workers.contract import UpstreamConnectionView, UpstreamOwner


class _NoOwner:
    """The owner of an idle connection: a response arriving for nobody is dropped with it."""

    def on_response_head(self, conn: UpstreamConnectionView, status: int) -> None: ...

    def on_response_body(self, body: bytes) -> None: ...

    def on_response_complete(self, conn: UpstreamConnectionView) -> None: ...

    def after_upstream_data(self) -> None: ...

    def upstream_failed(self, conn: UpstreamConnectionView, why: str) -> None: ...


NO_OWNER: UpstreamOwner = _NoOwner()


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to a worker."""

    __slots__ = ("chunked", "conn_tokens", "content_type", "exchange", "idle_since", "keep_alive", "length",
                 "lines", "parser", "pool", "received", "transport", "until_eof")

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.exchange: UpstreamOwner = NO_OWNER
        self.parser = httptools.HttpResponseParser(self)
        self.received = False
        self.keep_alive = False
        self.until_eof = False  # the response body is delimited by the worker closing (RFC 9112 6.3)
        self.idle_since = 0.0
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
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.exchange = NO_OWNER
            self.close()
            exchange.upstream_failed(self, f"malformed response from worker: {exc}")
            return
        exchange.after_upstream_data()

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
        each httptools callback costs ~0.1 us on the hot path)."""
        self.lines: list[bytes] = []  # header lines to relay, hop-by-hop ones already left out
        self.length: bytes | None = None  # Content-Length, as the worker sent it
        self.chunked = False
        self.content_type = b""
        self.until_eof = False
        self.conn_tokens: frozenset[bytes] | None = None

    def on_header(self, name: bytes, value: bytes) -> None:
        # Each field is classified once, here: a relayed one becomes its client-side line right
        # away (names lowercased; HTTP field names are case-insensitive), a hop-by-hop one is
        # only noted for framing.
        low = name.lower()
        if low not in RESPONSE_DROP:
            self.lines.append(b"%s: %s\r\n" % (low, value))
            if low == b"content-type":
                self.content_type = value
        elif low == b"content-length":
            self.length = value
        elif low == b"transfer-encoding":
            # Only a final "chunked" coding frames a body; "gzip" alone does not.
            if value.rstrip().lower().endswith(b"chunked"):
                self.chunked = True
        elif low == b"connection" and value.lower() not in (b"close", b"keep-alive"):
            tokens = connection_tokens(value)
            self.conn_tokens = tokens if self.conn_tokens is None else self.conn_tokens | tokens

    def on_headers_complete(self) -> None:
        parser = self.parser
        self.keep_alive = parser.should_keep_alive()
        status = parser.get_status_code()
        self.until_eof = (self.length is None and not self.chunked and status >= 200
                          and status not in (204, 304))
        self.exchange.on_response_head(self, status)

    def relayed_lines(self) -> list[bytes]:
        """The header lines to relay, minus any the worker named in its Connection header."""
        return without_fields(self.lines, self.conn_tokens or NO_TOKENS)

    def on_body(self, body: bytes) -> None:
        self.exchange.on_response_body(body)

    def on_message_complete(self) -> None:
        self.until_eof = False
        self.exchange.on_response_complete(self)

    # -- used by the exchange ------------------------------------------------------------

    def send(self, exchange: UpstreamOwner, data: bytes) -> None:
        self._reset()
        self.received = False
        self.exchange = exchange
        transport = self.transport
        assert transport is not None  # a pooled or new connection is open when it is handed out
        transport.write(data)

    def release(self, now: float) -> None:
        """Back to the pool if the response allows it, else closed."""
        self.exchange = NO_OWNER
        if self.keep_alive and self.transport is not None and not self.transport.is_closing():
            # A slow client may have paused reading (backpressure) just as the response ended;
            # the exchange that would have resumed it is gone, so a pooled socket must read.
            self.transport.resume_reading()
            self.idle_since = now
            self.pool.put(self)
        else:
            self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close at once (RST): the worker sees the client is gone and stops generating."""
        self.exchange = NO_OWNER
        if self.transport is not None:
            self.transport.abort()


class WorkerPool:
    """Idle keep-alive connections to one worker, plus what is needed to open new ones."""

    __slots__ = ("authority", "host", "idle", "limit", "loop", "port", "ssl", "url")

    def __init__(self, loop: asyncio.AbstractEventLoop, url: str, limit: int) -> None:
        parts = urlsplit(url)
        self.loop = loop
        self.url = url
        self.host = parts.hostname or "127.0.0.1"
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if parts.scheme == "https" else None
        self.port = parts.port or (443 if self.ssl else 80)
        self.authority = parts.netloc.encode()
        self.limit = limit
        self.idle: list[UpstreamConnection] = []

    def take(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    def put(self, conn: UpstreamConnection) -> None:
        if len(self.idle) < self.limit:
            self.idle.append(conn)
        else:
            conn.close()

    def forget(self, conn: UpstreamConnection) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def connect(self, done: Callable[[asyncio.Future[Any]], None]) -> asyncio.Future[Any]:
        """Open a new connection; ``done`` gets the future of (transport, protocol)."""
        future = asyncio.ensure_future(self.loop.create_connection(
            lambda: UpstreamConnection(self), self.host, self.port, ssl=self.ssl))
        future.add_done_callback(done)
        return future

    def close_idle(self, older_than: float) -> None:
        keep = []
        for conn in self.idle:
            if conn.idle_since < older_than:
                conn.close()
            else:
                keep.append(conn)
        self.idle[:] = keep

    def close_all(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class Pools:
    """All worker pools of one proxy process, keyed by worker URL."""

    __slots__ = ("limit", "loop", "pools")

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self.loop = loop
        self.limit = limit
        self.pools: dict[str, WorkerPool] = {}

    def get(self, url: str) -> WorkerPool:
        pool = self.pools.get(url)
        if pool is None:
            pool = self.pools[url] = WorkerPool(self.loop, url, self.limit)
        return pool

    def retain(self, urls: set[str]) -> None:
        """Drop pools of workers that left the fleet (their idle sockets are closed)."""
        for url in list(self.pools):
            if url not in urls:
                self.pools.pop(url).close_all()

    def sweep(self, older_than: float) -> None:
        for pool in self.pools.values():
            if pool.idle:
                pool.close_idle(older_than)
