"""Prefill/decode disaggregation over HTTP: both dialects real engines speak.

Role: :class:`PDExchange` serves one request of a model routed to ``http_pd``. It owns the prefill
leg(s) (:class:`PrefillLeg`) and hands the decode leg to an ordinary
:class:`proxy_workers.http.exchange.Exchange`, which streams the answer to the client unchanged.
It is a :class:`proxy_workers.contract.ClientExchange` towards the client; the handoff bodies are
:mod:`proxy_workers.forwarding.handoff`'s, shared with gRPC PD.

- ``two_phase`` (vLLM): the prefill worker gets a copy of the request with ``max_tokens`` and
  ``max_completion_tokens`` 1, ``stream`` false, no ``stream_options``, and
  ``kv_transfer_params = {"do_remote_decode": true, "do_remote_prefill": false, ...}``; the opaque
  ``kv_transfer_params`` of its JSON answer go into the original request, sent to decode.
- ``bootstrap`` (SGLang): ``bootstrap_host`` (the prefill worker's host), ``bootstrap_port`` (its
  configured bootstrap port, may be null) and ``bootstrap_room`` (random 63-bit; one per item for
  batched inputs) are added to the body; prefill and decode get it at the same time.

Invariants:
- The router never looks inside a KV handle; it copies ``kv_transfer_params`` verbatim.
- Failures: prefill fails -> another prefill worker, before decode starts (two_phase); decode
  fails before its first byte -> a new pair (never the failed decode worker; a prefill worker is
  passed over only if it failed, so a model with one prefill worker survives a decode failure);
  after the first byte -> no retry. In bootstrap mode a failure of either leg before the decode
  answer starts cancels the other and tries a new pair; a leg that was only cancelled did not
  fail, so its worker may serve the new pair. At most ``max_tries`` pairs.
- A prefill worker's client-error answer (4xx other than 408/429: the request itself is wrong) is
  the answer: passed to the client as is, not retried, and not counted against the worker.
- Load accounting covers both legs until the decode stream ends; a client disconnect cancels
  both legs.

Bounds: a prefill answer is buffered up to ``MAX_PREFILL_ANSWER`` bytes (the rest is read and
dropped; the handle is then missing and the leg fails); the decode answer is streamed by its
:class:`Exchange` under the client's back-pressure. A client whose socket is full pauses the
decode leg, including one that starts later (a new pair, or decode after a two_phase prefill).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from proxy_workers.errors import BadGateway, BadRequest, NoHealthyWorker, RouterError, render_response
from proxy_workers.forwarding.attempts import first_byte, open_cell, pick_worker, settle
from proxy_workers.forwarding.handoff import (
    MAX_PREFILL_ANSWER,
    bootstrap_body,
    decode_body,
    kv_handle,
    prefill_body,
)
from proxy_workers.forwarding.retry import refused_by_worker, retry_or_give_up
from proxy_workers.http.exchange import Exchange
from proxy_workers.http.pools import pool_for
from proxy_workers.http.upstream import UpstreamOwner

if TYPE_CHECKING:
    import asyncio

    from proxy_workers.contract import ClientRequest, ClientSink, Figures, UpstreamConnectionView
    from proxy_workers.forwarding.request import Request
    from proxy_workers.http.upstream import UpstreamConnection
    from proxy_workers.process_view import ProcessView
    from proxy_workers.routing.context import RequestContext
    from proxy_workers.routing.table import PDRoute
    from shm.schema import Worker

_decode_json = msgspec.json.decode
_encode_json = msgspec.json.encode


class PrefillLeg(UpstreamOwner):
    """One request to a prefill worker; its answer is small and buffered (never streamed)."""

    __slots__ = ("answer", "cell", "conn", "connecting", "content_type", "done", "kept", "pd", "request",
                 "reused", "sent_at", "started", "status", "worker")

    def __init__(self, pd: PDExchange, worker: Worker, request: ClientRequest) -> None:
        self.pd = pd
        self.worker = worker
        self.request = request
        self.conn: UpstreamConnection | None = None
        self.connecting: asyncio.Future | None = None
        self.answer: list[bytes] = []
        self.kept = 0  # bytes in ``answer`` (a running count: a sum per read would be quadratic)
        self.status = 0
        self.content_type = b"application/json"
        self.done = False
        self.reused = False
        self.started = self.sent_at = pd.proc.loop.time()
        self.cell = open_cell(pd.proc, worker.slot)  # held until the whole PD request ends

    def start(self) -> None:
        pool = pool_for(self.pd.proc, self.worker.url)
        conn = pool.take()
        if conn is not None:
            self.reused = True
            self._send(conn)
        else:
            self.connecting = pool.connect(self._connected)

    def _connected(self, future: asyncio.Future[tuple[asyncio.BaseTransport, UpstreamConnection]]) -> None:
        if future is not self.connecting:
            if not future.cancelled() and future.exception() is None:
                future.result()[1].close()
            return
        self.connecting = None
        if future.cancelled() or future.exception() is not None:
            self.pd.prefill_failed(self, f"cannot connect to {self.worker.url}", connect_error=True)
            return
        self._send(future.result()[1])

    def _send(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.sent_at = self.pd.proc.loop.time()
        conn.send(self, self.request.wire(conn.authority))

    # The upstream-callback contract (see proxy_workers.http.upstream.UpstreamConnection).
    def on_response_head(self, conn: UpstreamConnectionView, status: int) -> None:
        self.status = status
        self.content_type = conn.content_type or self.content_type
        proc = self.pd.proc
        first_byte(proc, self.cell, proc.loop.time() - self.sent_at, False)

    def on_response_body(self, body: bytes) -> None:
        if self.kept < MAX_PREFILL_ANSWER:
            self.answer.append(body)
            self.kept += len(body)

    def on_response_complete(self, conn: UpstreamConnectionView) -> None:
        self.done = True

    def after_upstream_data(self) -> None:
        if self.done and self.conn is not None:
            conn, self.conn = self.conn, None
            conn.release(self.pd.proc.loop.time())
            self.pd.prefill_done(self)

    def upstream_failed(self, conn: UpstreamConnectionView, why: str) -> None:
        if conn is self.conn and not self.done:
            self.conn = None
            if self.reused and not conn.received:
                # A keep-alive socket the worker had already closed: same worker, new socket.
                self.reused = False
                self.connecting = pool_for(self.pd.proc, self.worker.url).connect(self._connected)
                return
            self.pd.prefill_failed(self, why)

    def cancel(self) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()  # the engine frees the prefill it was computing

    def settle(self, ok: bool, connect_error: bool = False) -> None:
        """Release this leg's load-board gauge (once)."""
        self.cell = settle(self.pd.proc, self.cell, ok, connect_error=connect_error)

    def check_deadline(self, now: float) -> None:
        settings = self.pd.proc.settings
        if self.done:
            return
        if self.conn is None and now - self.started > settings.connect_timeout:
            self.cancel()
            self.pd.prefill_failed(self, f"connect to {self.worker.url} timed out", connect_error=True)
        elif self.conn is not None and now - self.sent_at > settings.first_byte_timeout:
            self.cancel()
            self.pd.prefill_failed(self, f"prefill worker {self.worker.url} did not answer in time")


class PDExchange:
    """One PD request; presents the Exchange contract to the ClientProtocol."""

    __slots__ = ("answered", "client", "ctx", "decode", "doc", "ended", "failed_prefill", "legs", "pairs",
                 "paused", "proc", "refused_status", "request", "route", "tried_decode", "tried_prefill")

    def __init__(self, proc: ProcessView, client: ClientSink, request: Request, route: PDRoute,
                 ctx: RequestContext) -> None:
        self.proc = proc
        self.client = client
        self.request = request
        self.route = route
        self.ctx = ctx
        self.legs: list[PrefillLeg] = []
        self.decode: Exchange | None = None
        self.tried_prefill: list[int] = []  # every prefill attempt (bounded by max_tries)
        self.failed_prefill: list[int] = []  # the prefill workers a new pick must avoid
        self.tried_decode: list[int] = []
        self.pairs = 0
        self.ended = False
        self.paused = False  # the client's socket is full: a decode leg started meanwhile starts paused
        self.answered: Exchange | None = None  # the decode leg that answered the client (figures)
        self.refused_status = 0  # a prefill worker's client-error answer, relayed (figures)
        try:
            doc = _decode_json(request.body) if request.body else {}
        except msgspec.DecodeError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise BadRequest("the request body must be a JSON object")
        self.doc: dict[str, Any] = doc

    @property
    def head_sent(self) -> bool:
        return self.decode is not None and self.decode.head_sent

    def pause_upstream(self) -> None:
        self.paused = True
        if self.decode is not None:
            self.decode.pause_upstream()

    def resume_upstream(self) -> None:
        self.paused = False
        if self.decode is not None:
            self.decode.resume_upstream()

    def start(self) -> None:
        self.proc.active.add(self)
        self._new_pair()

    # -- pairs -----------------------------------------------------------------------------

    def _retry_pair(self, why: str) -> None:
        """A pair failed before the answer started: another pair, if the retry rule allows one."""
        give_up = retry_or_give_up(self.proc, self.pairs, f"prefill/decode pair failed: {why}",
                                   "pair(s) of workers")
        if give_up is not None:
            self._fail(give_up)
        else:
            self._new_pair(why)

    def _new_pair(self, last_failure: str = "") -> None:
        if not self._decode_left():
            # Checked before any prefill work: the route is pinned for the request, so a pair is
            # possible only with an untried decode worker.
            model = self.route.model
            if self.tried_decode:
                self._fail(BadGateway(f"every healthy decode worker for model '{model}' failed this request"))
            else:
                self._fail(NoHealthyWorker(f"no healthy decode worker for model '{model}'"))
            return
        self.pairs += 1
        prefill = self._pick_prefill(last_failure)
        if prefill is None:
            return
        if self.route.dialect == "bootstrap":
            body = _encode_json(bootstrap_body(self.doc, prefill, self.proc.rng))
            self._start_decode(body)
            if self.ended:
                return  # the decode leg was refused at once (e.g. a policy's 429): no prefill
            self._start_prefill(prefill, body)
        else:
            self._start_prefill(prefill, _encode_json(prefill_body(self.doc)))

    def _decode_left(self) -> bool:
        """Whether a decode worker this request has not tried yet is available."""
        tried = self.tried_decode
        return any(w.slot not in tried for w in self.route.decode.candidates)

    def _pick_prefill(self, last_failure: str = "") -> Worker | None:
        try:
            worker = pick_worker(self.proc, self.route.prefill, self.ctx, self.failed_prefill, last_failure)
        except RouterError as err:  # none left, or a policy's refusal
            self._fail(err)
            return None
        self.tried_prefill.append(worker.slot)
        if self.ctx.scores is not None:
            self.ctx.scores["prefill_worker"] = worker.url
        return worker

    def _start_prefill(self, worker: Worker, body: bytes) -> None:
        leg = PrefillLeg(self, worker, self.request.with_body(body))
        self.legs.append(leg)
        leg.start()

    def _start_decode(self, body: bytes) -> None:
        exchange = Exchange(self.proc, self.client, self.request.with_body(body), self.route.decode, self.ctx)
        exchange.pd = self
        exchange.tried = self.tried_decode  # shared: a new pair never reuses a failed decode worker
        exchange.paused = self.paused
        self.decode = exchange
        exchange.start()

    # -- leg events ------------------------------------------------------------------------

    def prefill_done(self, leg: PrefillLeg) -> None:
        if self.ended:
            return
        if refused_by_worker(leg.status):
            self._refused(leg)
            return
        if not 200 <= leg.status < 300:
            self.prefill_failed(leg, f"prefill worker {leg.worker.url} answered {leg.status}")
            return
        if self.route.dialect == "bootstrap":
            return  # the decode leg is already under way; this leg's gauge waits for it
        handle = kv_handle(b"".join(leg.answer))
        if handle is None:
            self.prefill_failed(leg, f"prefill worker {leg.worker.url} returned no kv_transfer_params")
            return
        self._start_decode(_encode_json(decode_body(self.doc, handle)))

    def _refused(self, leg: PrefillLeg) -> None:
        """The prefill worker found the request itself wrong: that is the client's answer."""
        if self.head_sent:
            return  # bootstrap: the decode worker's own answer is already on its way
        self._cancel_decode()
        request = self.request
        request.keep_alive = request.keep_alive and not self.proc.draining
        self.client.write(render_response(leg.status, b"".join(leg.answer), leg.content_type,
                                          request.request_id.decode(), close=not request.keep_alive))
        self.refused_status = leg.status
        self._finish(error=False)

    def prefill_failed(self, leg: PrefillLeg, why: str, connect_error: bool = False) -> None:
        if self.ended:
            return
        leg.settle(ok=False, connect_error=connect_error)
        self.failed_prefill.append(leg.worker.slot)
        if self.route.dialect == "bootstrap":
            if self.head_sent:
                return  # decode is answering; its KV already arrived
            decode = self.decode
            self._cancel_decode()
            if decode is not None and decode.worker is not None and self.tried_decode \
                    and self.tried_decode[-1] == decode.worker.slot:
                self.tried_decode.pop()  # cancelled, not failed: the new pair may use it again
            self._retry_pair(why)
            return
        give_up = retry_or_give_up(self.proc, len(self.tried_prefill), why, "prefill worker")
        if give_up is not None:
            self._fail(give_up)
            return
        worker = self._pick_prefill(why)
        if worker is not None:
            self._start_prefill(worker, _encode_json(prefill_body(self.doc)))

    def decode_failed(self, exchange: Exchange, why: str) -> None:
        """The decode leg failed before its first byte: a new pair."""
        self.decode = None
        for leg in self.legs:
            leg.cancel()
            leg.settle(ok=True)  # the prefill itself did not fail
        self.legs.clear()
        self._retry_pair(why)

    def exchange_done(self, exchange: Exchange, error: bool) -> None:
        """The decode leg ended (answer complete, error written, or truncated)."""
        self.request.keep_alive = exchange.request.keep_alive
        self.answered = exchange
        self._finish(error)

    # -- endings ---------------------------------------------------------------------------

    def _cancel_decode(self) -> None:
        decode, self.decode = self.decode, None
        if decode is not None:
            decode.cancel()

    def _settle_legs(self, ok: bool) -> None:
        for leg in self.legs:
            leg.cancel()
            leg.settle(ok=ok)
        self.legs.clear()

    def _finish(self, error: bool) -> None:
        if self.ended:
            return
        self.ended = True
        self._settle_legs(ok=True)
        self.client.exchange_done(self, error)

    def _fail(self, err: RouterError) -> None:
        if self.ended:
            return
        self._cancel_decode()
        self.client.send_error(err, self.request)
        self._finish(error=True)

    def figures(self) -> Figures:
        """The request's record (serving.records): the decode leg's answer, when one started;
        retries count every prefill and decode attempt past the first of each."""
        decode = self.answered or self.decode
        retries = max(len(self.tried_prefill) + len(self.tried_decode) - 2, 0)
        if decode is None:
            policy = self.route.decode.policy.name
            return self.refused_status, 0.0, 0, 0, "", retries, self.route.model, policy
        figures = decode.figures()
        return (*figures[:5], retries, *figures[6:])

    def client_gone(self) -> None:
        """Cancel both legs: nobody is waiting for either."""
        if self.ended:
            return
        self.ended = True
        self._cancel_decode()
        self._settle_legs(ok=True)
        self.proc.active.discard(self)
        self.proc.count_disconnect()

    def check_deadline(self, now: float) -> None:
        for leg in list(self.legs):
            leg.check_deadline(now)
