"""How an HTTP exchange recovers, or gives up: retries, a worker's answer retried elsewhere, timeouts.

Role: the :class:`Recovery` mixin of :class:`proxy_workers.http.exchange.Exchange` (its only
subclass): what happens when an attempt fails (a connect error, a worker connection lost, a
retryable answer) and the deadlines the periodic sweep enforces (``check_deadline``). Its slots
are the part of the exchange's state it changes (set by ``Exchange.__init__``); it also defines
the exchange's phases.

Invariants:
- Whether to retry is :func:`proxy_workers.forwarding.retry.retry_or_give_up`'s answer (retry only
  while nothing reached the client, never the same worker, at most ``max_tries``; a
  time-to-first-byte timeout is not retried); a worker's answer in ``retry_statuses`` is retried
  elsewhere by :func:`proxy_workers.forwarding.retry.answer_retry_delay`'s rule, its body read and
  dropped (:class:`proxy_workers.http.owners.DroppedAnswer`), and holds a place in the retry
  budget until the exchange ends. A PD decode leg never retries alone: its PD exchange forms a
  new pair.
- Once the response head is written, a failure or a timeout truncates the response instead.
- While the client's socket is full the worker is not read, so its silence is the client's
  doing: ``idle_timeout`` ends such a stream as a stalled client, never as a worker failure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from proxy_workers.errors import RouterError, UpstreamTimeout
from proxy_workers.forwarding.attempts import settle
from proxy_workers.forwarding.retry import answer_retry_delay, retry_after, retry_or_give_up, stalled
from proxy_workers.http.owners import DroppedAnswer
from proxy_workers.http.upstream import UpstreamOwner

if TYPE_CHECKING:
    import asyncio

    from proxy_workers.contract import UpstreamConnectionView
    from proxy_workers.forwarding.request import Request
    from proxy_workers.http.owners import PairOwner
    from proxy_workers.http.upstream import UpstreamConnection
    from proxy_workers.process_view import ProcessView
    from proxy_workers.routing.table import ModelRoute
    from shm.schema import Worker


CONNECT: Final = 0
WAIT_HEAD: Final = 1
STREAMING: Final = 2
DONE: Final = 3
DROPPING: Final = 4
BACKOFF: Final = 5
HANDED_OFF: Final = 6
# HANDED_OFF: a PD decode leg whose pair is being replaced; the PD exchange carries on without it.


class Recovery(UpstreamOwner):
    """Failures and deadlines of an :class:`proxy_workers.http.exchange.Exchange` (module docstring)."""

    # The attempt's state this class changes; Exchange.__init__ sets it, Exchange's slots hold the rest.
    __slots__ = ("_fresh_retry", "answer_retries", "backoff", "cell", "conn", "connecting", "last_io",
                 "phase")

    _fresh_retry: bool
    answer_retries: int
    backoff: asyncio.TimerHandle | None
    cell: int
    conn: UpstreamConnection | None
    connecting: asyncio.Future | None
    last_io: float
    phase: int

    # Provided by the exchange (Exchange), read here.
    proc: ProcessView
    request: Request
    route: ModelRoute
    pd: PairOwner | None
    tried: list[int]
    worker: Worker | None
    head_sent: bool
    paused: bool
    started: float
    phase_started: float

    def _attempt(self, last_failure: str = "") -> None:
        raise NotImplementedError

    def _use(self, worker: Worker) -> None:
        raise NotImplementedError

    def _url(self) -> str:
        raise NotImplementedError

    def _fail(self, err: RouterError) -> None:
        raise NotImplementedError

    def _truncate(self, why: str) -> None:
        raise NotImplementedError

    # -- a worker's answer retried elsewhere (forwarding.retry's rules) ----------------------

    def _drop_for_retry(self, conn: UpstreamConnectionView, status: int) -> bool:
        """A retryable answer arrived before anything reached the client: if the retry rules allow
        another try, the answer is read and dropped (True); else it is relayed as it came (False)."""
        proc, pd = self.proc, self.pd
        attempts = pd.pairs if pd is not None else len(self.tried)
        now = proc.loop.time()
        delay = answer_retry_delay(proc, attempts, self.answer_retries, self.answer_retries > 0,
                                   now - self.started, retry_after(conn.lines))
        upstream = self.conn
        if delay is None or upstream is None or (pd is None and not self._untried_left()):
            return False
        why = f"{self._url()} answered {status}"
        # A 5xx counts against the worker (passive health); a 408/429 says "not now", not "broken".
        self.cell = settle(proc, self.cell, ok=False, count_error=status >= 500, server_error=True)
        if not self.answer_retries:
            proc.retrying += 1
        self.answer_retries += 1
        self.phase, self.last_io = DROPPING, now
        upstream.exchange = DroppedAnswer(self, why, delay)
        return True

    def _untried_left(self) -> bool:
        tried = self.tried
        return any(w.slot not in tried for w in self.route.candidates)

    def answer_dropped(self, why: str, delay: float, reusable: bool) -> None:
        """The retried answer was read to its end (or its connection went): try the next worker."""
        conn, self.conn = self.conn, None
        if conn is not None:
            if reusable:
                conn.release(self.proc.loop.time())
            else:
                conn.abort()
        if self.phase != DROPPING:
            return  # the request ended meanwhile (client gone, timed out)
        pd = self.pd
        if pd is not None:  # a decode leg: the PD exchange forms a new pair
            # Not DONE: this runs inside the worker connection's callback, which ends by calling
            # after_upstream_data, and DONE there would end the whole PD request.
            self.phase = HANDED_OFF
            self._release_budget()
            self.proc.active.discard(self)
            pd.decode_failed(self, why)
            return
        self.proc.count_retry(answer=True)
        self.phase = BACKOFF
        self.backoff = self.proc.loop.call_later(delay, self._after_backoff, why)

    def _after_backoff(self, why: str) -> None:
        self.backoff = None
        if self.phase == BACKOFF:
            self._attempt(why)

    def _release_budget(self) -> None:
        if self.answer_retries:
            self.proc.retrying -= 1
            self.answer_retries = 0

    # -- a failed attempt -------------------------------------------------------------------

    def upstream_failed(self, conn: UpstreamConnectionView, why: str) -> None:
        if conn is not self.conn or self.phase == DONE:
            return
        self.conn = None
        if self.head_sent:
            self._truncate(why)
        elif self._fresh_retry and not conn.received:
            # A pooled keep-alive socket the worker had already closed: same worker, new socket.
            self.cell = settle(self.proc, self.cell, ok=False, count_error=False)
            assert self.worker is not None  # a connection was in use: a worker was picked
            self._use(self.worker)
        else:
            self._attempt_failed(why, connect_error=False)

    def _attempt_failed(self, why: str, connect_error: bool) -> None:
        self._fresh_retry = False
        self.cell = settle(self.proc, self.cell, ok=False, connect_error=connect_error)
        if self.pd is not None:
            # A PD decode leg does not retry alone: its prefill's KV went to this worker, so the
            # PD exchange starts a new pair.
            self.phase = DONE
            self.proc.active.discard(self)
            self.pd.decode_failed(self, why)
            return
        give_up = retry_or_give_up(self.proc, len(self.tried), why)
        if give_up is None:
            self._attempt(why)
        else:
            self._fail(give_up)

    # -- deadlines (the periodic sweep) -----------------------------------------------------

    def check_deadline(self, now: float) -> None:
        """Called by the periodic sweep; enforces connect, first-byte, idle and total timeouts."""
        settings = self.proc.settings
        phase = self.phase
        if now - self.started > settings.total_timeout:
            self._time_out(f"request exceeded total_timeout={settings.total_timeout}s")
        elif phase == CONNECT and now - self.phase_started > settings.connect_timeout:
            self._abandon_connect()
            self._attempt_failed(f"connect to {self._url()} timed out", connect_error=True)
        elif phase == WAIT_HEAD and stalled(settings, now - self.phase_started, self.request.body):
            conn, self.conn = self.conn, None
            if conn is not None:
                conn.abort()  # the worker may be wedged; the connection is not reused
            self._attempt_failed(f"{self._url()} sent no response head within "
                                 f"stall_timeout={settings.stall_timeout}s (stalled)", connect_error=False)
        elif phase == WAIT_HEAD and now - self.phase_started > settings.first_byte_timeout:
            self._time_out("worker sent no response within "
                           f"first_byte_timeout={settings.first_byte_timeout}s")
        elif phase in (STREAMING, DROPPING) and now - self.last_io > settings.idle_timeout:
            if self.paused and phase == STREAMING:
                self._client_stalled(f"client read nothing for idle_timeout={settings.idle_timeout}s")
            else:
                self._time_out(f"worker was silent for idle_timeout={settings.idle_timeout}s")

    def _client_stalled(self, why: str) -> None:
        """The client stopped reading a stream: the worker is released (not blamed), the client's
        connection ends once what it holds is out."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()  # the worker stops generating for a reader that is not there
        self.cell = settle(self.proc, self.cell, ok=False, count_error=False)
        self._truncate(why)  # its SSE event is there should the client read again

    def _abandon_connect(self) -> None:
        """Stop whatever is pending before a worker connection is in use: a connect, a backoff."""
        connecting, self.connecting = self.connecting, None
        if connecting is not None:
            connecting.cancel()
        backoff, self.backoff = self.backoff, None
        if backoff is not None:
            backoff.cancel()

    def _time_out(self, why: str) -> None:
        self._abandon_connect()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()
        if self.head_sent:
            self._truncate(why)
        else:
            self.cell = settle(self.proc, self.cell, ok=False)
            self._fail(UpstreamTimeout(why))
