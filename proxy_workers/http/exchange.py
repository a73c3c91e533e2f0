"""One proxied request over HTTP: pick a worker, send, stream the answer back, retry or fail cleanly.

Role: the per-request state machine between a client connection
(:class:`proxy_workers.contract.ClientSink`) and an :class:`proxy_workers.http.upstream.UpstreamConnection`;
it is a :class:`proxy_workers.contract.ClientExchange` towards the client and an
:class:`proxy_workers.http.upstream.UpstreamOwner` towards the worker. It also carries the decode leg of
an HTTP PD request, reporting to its :class:`PairOwner` instead of the client. Callback driven (no
task per request) because a task costs more than the whole routing decision.

What happens when an attempt fails or runs out of time (retries, a worker's answer retried
elsewhere, the timeouts) is the :class:`proxy_workers.http.recovery.Recovery` mixin's, which
also defines the phases.

Invariants:
- Picks, their counting and the worker cell's books go through :mod:`proxy_workers.forwarding.attempts`.
  Once the response head is written, a failure truncates the response instead of being retried
  (an SSE stream gets an error event first).
- Every path ends in :meth:`Exchange._end` exactly once, which settles the load-board gauges.
- A client that goes away aborts the worker connection at once so the GPU stops generating.
- Back-pressure: while the client's socket is full (``pause_upstream``), the worker connection is
  not read once the head is relayed, so the proxy holds at most one read of the worker's body
  beyond the client transport's high-water mark (how the worker's silence is then judged:
  :mod:`proxy_workers.http.recovery`).
- What a worker's response may be (one final response, bounded head, transfer codings) is
  :mod:`proxy_workers.http.upstream`'s; an HTTP/1.0 client cannot receive a transfer coding, so a
  coded answer fails the attempt (RFC 9112 6.1) instead of reaching it undecodable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy_workers.errors import BadGateway, RouterError, error_body, reason
from proxy_workers.forwarding.attempts import CLOSED, first_byte, open_cell, pick_worker, settle
from proxy_workers.forwarding.chunks import LAST_CHUNK, chunk
from proxy_workers.forwarding.retry import stalled
from proxy_workers.forwarding.usage import stream_tokens, usage_tokens
from proxy_workers.http.framing import WorkerProtocolError
from proxy_workers.http.pools import pool_for
from proxy_workers.http.recovery import CONNECT, DONE, STREAMING, WAIT_HEAD, Recovery
from proxy_workers.routing.decision import describe, header_value

if TYPE_CHECKING:
    import asyncio

    from proxy_workers.contract import ClientSink, Figures, UpstreamConnectionView
    from proxy_workers.forwarding.request import Request
    from proxy_workers.http.owners import PairOwner
    from proxy_workers.http.upstream import UpstreamConnection
    from proxy_workers.process_view import ProcessView
    from proxy_workers.routing.context import RequestContext
    from proxy_workers.routing.table import ModelRoute
    from shm.schema import Worker


_STATUS_LINES: dict[int, bytes] = {}  # status -> "HTTP/1.1 200 OK\r\n", built once per status


class Exchange(Recovery):
    __slots__ = (
        "chunked",
        "client",
        "ctx",
        "events",
        "first_at",
        "head_sent",
        "out",
        "paused",
        "pd",
        "phase_started",
        "proc",
        "request",
        "route",
        "server_error",
        "sse",
        "started",
        "status",
        "tail",
        "tail2",
        "tried",
        "worker",
    )

    def __init__(self, proc: ProcessView, client: ClientSink, request: Request,
                 route: ModelRoute, ctx: RequestContext) -> None:
        self.proc = proc
        self.client = client
        self.request = request
        self.route = route
        self.ctx = ctx
        self.server_error = False
        self.pd: PairOwner | None = None  # set when this is the decode leg of a PD request
        self.tried: list[int] = []
        self.worker: Worker | None = None
        self.conn: UpstreamConnection | None = None
        self.cell = CLOSED
        self.out: list[bytes] = []
        self.head_sent = False
        self.paused = False  # the client's socket is full: the worker is not read meanwhile
        self.chunked = False
        self.sse = False
        # What the request's record reads at its end (figures): the status relayed, when the
        # first chunk of a stream went out, its data events, and the last two body reads (the
        # usage object ends an answer; forwarding.usage).
        self.status = 0
        self.first_at = 0.0
        self.events = 0
        self.tail = self.tail2 = b""
        self._fresh_retry = False
        self.answer_retries = 0  # worker answers retried; > 0 holds a place in the retry budget
        self.backoff: asyncio.TimerHandle | None = None
        self.connecting: asyncio.Future | None = None
        self.started = self.phase_started = self.last_io = proc.loop.time()
        self.phase = CONNECT
        proc.active.add(self)

    # -- sending -------------------------------------------------------------------------

    def _attempt(self, last_failure: str = "") -> None:
        try:
            worker = pick_worker(self.proc, self.route, self.ctx, self.tried, last_failure)
        except RouterError as err:  # none left, or a policy's refusal (e.g. 429 from quota_aware)
            self._fail(err)
            return
        self.tried.append(worker.slot)
        self._use(worker)

    def start(self) -> None:
        """The first attempt (the exchange joined ``proc.active`` when it was made). A method, not an
        alias: in a compiled class an assignment in the class body declares an attribute."""
        self._attempt()

    def _use(self, worker: Worker) -> None:
        proc = self.proc
        self.worker = worker
        self.cell = open_cell(proc, worker.slot)
        now = proc.loop.time()
        self.phase, self.phase_started = CONNECT, now
        pool = pool_for(proc, worker.url)
        conn = None if self._fresh_retry else pool.take()
        if conn is not None:
            self._send(conn, True, now)
        else:
            self.connecting = pool.connect(self._connected)

    def _connected(self, future: asyncio.Future[tuple[asyncio.BaseTransport, UpstreamConnection]]) -> None:
        ok = not future.cancelled() and future.exception() is None
        if future is not self.connecting:
            if ok:  # an attempt that was given up on: keep the socket for the next request
                conn = future.result()[1]
                conn.idle_since = self.proc.loop.time()
                conn.pool.put(conn)
            return
        self.connecting = None
        if not ok:
            exc = "timed out" if future.cancelled() else future.exception()
            self._attempt_failed(f"cannot connect to {self._url()}: {exc}", connect_error=True)
            return
        self._send(future.result()[1], False, self.proc.loop.time())

    def _send(self, conn: UpstreamConnection, reused: bool, now: float) -> None:
        self.conn = conn
        self._fresh_retry = reused  # a reused socket that fails silently earns one fresh try
        self.phase, self.phase_started = WAIT_HEAD, now
        conn.send(self, self.request.wire(conn.authority))

    # -- receiving (called by UpstreamConnection) ---------------------------------------

    def on_response_head(self, conn: UpstreamConnectionView, status: int) -> None:
        if status >= 400 and status in self.proc.retry_statuses and self._drop_for_retry(conn, status):
            return
        req = self.request
        upstream = self.conn  # ``conn`` itself, typed: compiled, its fields are read directly
        assert upstream is not None
        self.status = status
        line = _STATUS_LINES.get(status)
        if line is None:
            line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, reason(status))
        # The worker's header lines arrive built, hop-by-hop fields already left out.
        out = self.out
        out.append(line)
        out += upstream.lines if upstream.conn_tokens is None else upstream.relayed_lines()
        self.sse = upstream.content_type.startswith(b"text/event-stream")
        length = upstream.length
        if length is not None:
            out.append(b"content-length: %s\r\n" % length)
        elif status not in (204, 304):
            # Unknown length (chunked or close-delimited upstream): re-chunk for HTTP/1.1
            # clients, close-delimit for HTTP/1.0 ones.
            self.chunked = req.http11
            if req.http11:
                out.append(b"transfer-encoding: chunked\r\n")
            else:
                if any(line.startswith(b"transfer-encoding:") for line in out):
                    out.clear()
                    raise WorkerProtocolError(f"{self._url()} sent a transfer coding an HTTP/1.0 client "
                                              "cannot receive")
                req.keep_alive = False
        if not req.keep_alive or self.proc.draining:
            req.keep_alive = False
            out.append(b"connection: close\r\n")
        if req.explain:
            decision = describe(self.route, self.ctx, self.worker)
            out.append(b"x-shardgate-decision: %s\r\n" % header_value(decision))
        out.append(b"x-request-id: %s\r\n\r\n" % req.request_id)  # joined with the body that follows
        self.head_sent = True
        # Relayed as is, but a 5xx counts as a failed attempt for passive health (Envoy's rule).
        self.server_error = status >= 500
        now = self.proc.loop.time()
        self.phase, self.last_io = STREAMING, now
        first_byte(self.proc, self.cell, now - self.phase_started, self.sse)
        if self.paused:
            self.pause_upstream()

    def on_response_body(self, body: bytes) -> None:
        self.tail2, self.tail = self.tail, body
        if self.sse:
            self.events += body.count(b"data:")
            if not self.first_at:
                self.first_at = self.proc.loop.time()
        if self.chunked:
            self.out.append(chunk(body))
        else:
            self.out.append(body)

    def on_response_complete(self, conn: UpstreamConnectionView) -> None:
        if self.chunked:
            self.out.append(LAST_CHUNK)
        self.phase = DONE

    def after_upstream_data(self) -> None:
        """After each packet from the worker: one write to the client, then finish if complete."""
        out = self.out
        if out:
            self.client.write(b"".join(out) if len(out) > 1 else out[0])
            out.clear()
        if self.phase == DONE:
            self._complete()
        else:
            self.last_io = self.proc.loop.time()

    # -- endings ---------------------------------------------------------------------------

    def _url(self) -> str:
        return self.worker.url if self.worker is not None else "?"

    def _complete(self) -> None:
        conn, self.conn = self.conn, None
        now = self.proc.loop.time()
        error = self.server_error
        # (positional: a keyword argument costs ~200 instructions on this per-request call)
        self.cell = settle(self.proc, self.cell, not error, now - self.started, True, False, error)
        if conn is not None:
            conn.release(now)
        self._end(error=False)

    def _fail(self, err: RouterError) -> None:
        self.phase = DONE
        self.client.send_error(err, self.request)
        self._end(error=True)

    def _truncate(self, why: str) -> None:
        """The head is out: tell an SSE client why, then close the connection."""
        self.phase = DONE
        if self.sse:
            event = b"event: error\ndata: %s\n\n" % error_body(BadGateway(f"stream interrupted: {why}"))
            self.out.append(chunk(event) if self.chunked else event)
        self._flush()
        self.cell = settle(self.proc, self.cell, ok=False)
        self.request.keep_alive = False
        self._end(error=True)

    def _flush(self) -> None:
        if self.out:
            self.client.write(b"".join(self.out))
            self.out.clear()

    def _end(self, error: bool) -> None:
        self.phase = DONE
        if self.answer_retries:
            self._release_budget()
        if self.pd is not None:
            self.proc.active.discard(self)
            self.pd.exchange_done(self, error)
            return
        self.client.exchange_done(self, error)

    # -- called from outside ---------------------------------------------------------------

    def figures(self) -> Figures:
        """What the request's record needs (serving.records): status relayed (0: none), time of
        the first chunk of a stream (0.0: none or not a stream), input and output tokens, the
        worker's URL, retries, model and policy."""
        usage = usage_tokens(self.tail, self.tail2) if self.tail else None
        if usage is None:
            tokens_in, tokens_out = 0, stream_tokens(self.events) if self.sse else 0
        else:
            tokens_in, tokens_out = usage
        worker, route = self.worker, self.route
        return (self.status, self.first_at, tokens_in, tokens_out, worker.url if worker is not None else "",
                len(self.tried) - 1 if self.tried else 0, route.model, route.policy.name)

    def client_gone(self) -> None:
        """The client disconnected: abort the worker connection so generation stops."""
        if self.cancel():
            self.proc.count_disconnect()

    def cancel(self) -> bool:
        """Abort the worker connection and end silently; False if already ended."""
        if self.phase == DONE:
            return False
        self._abandon_connect()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()
        # A client that gave up on a stalled worker leaves a failure on it (passive health sees
        # stalls even when clients time out first); any other abandoned attempt is neutral.
        stall = self.phase == WAIT_HEAD and stalled(self.proc.settings, self.proc.loop.time()
                                                    - self.phase_started, self.request.body)
        self.phase = DONE
        self.cell = settle(self.proc, self.cell, ok=False, count_error=stall)
        self._release_budget()
        self.proc.active.discard(self)
        return True

    def pause_upstream(self) -> None:
        self.paused = True
        conn = self.conn
        # Only a relayed answer waits: a head still awaited keeps being read (it is bounded, and
        # the first-byte timers must measure the worker, not the client).
        if self.phase == STREAMING and conn is not None:
            conn.pause_reading()

    def resume_upstream(self) -> None:
        if self.paused:
            self.paused = False
            self.last_io = self.proc.loop.time()  # the idle clock restarts: the worker was not silent
        conn = self.conn
        if conn is not None:
            conn.resume_reading()

