"""The grpc_regular and grpc_pd routers' data path: one OpenAI HTTP request served over gRPC.

Role: :class:`GrpcExchange` is what :class:`proxy_workers.http.exchange.Exchange` is to HTTP workers,
with the same contract towards :class:`proxy_workers.serving.protocol.ClientProtocol` (``request``,
``head_sent``, ``conn``, ``start``, ``client_gone``, ``check_deadline``; it joins ``proc.active``
and reports its end through ``client.exchange_done``, which counts it). It translates the request
(:mod:`proxy_workers.grpc.translate`), calls ``Worker.Generate`` on a cached channel
(:mod:`proxy_workers.grpc.channels`) and writes the answer as the HTTP routers would: SSE chunks,
or one JSON object (its head: :mod:`proxy_workers.grpc.response`). One asyncio task per request:
gRPC's API is coroutines, and a gRPC call costs far more than the task.

Whether a failed leg is retried, and the deadlines the periodic sweep enforces, are the
:class:`proxy_workers.grpc.recovery.GrpcRecovery` mixin's, which also defines the phases.

Invariants:
- After the head is out a failure truncates the response (SSE: an ``event: error`` first),
  closing the connection; before, it is retried or answered (:mod:`proxy_workers.grpc.recovery`).
- ``total_timeout`` is also sent as each call's gRPC deadline, so the worker stops too.
- gRPC PD (vLLM's two-phase handoff): prefill (one token, ``do_remote_decode``) -> its opaque
  ``kv_transfer_params`` -> the decode request, unread. A failed prefill is replaced before decode
  starts; a decode that fails before the first byte gets a new pair; nothing is retried after.
- Every leg (a call to one worker) is counted in flight on the load board from its start until
  the request ends: a prefill leg stays counted until the decode stream ends. Each leg is
  settled exactly once.
- A client that goes away cancels every running call and sends ``Abort`` to every leg's worker,
  so no GPU keeps generating (or holding KV) for nobody.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import grpc

from proxy_workers.errors import InternalError, RouterError
from proxy_workers.forwarding.attempts import pick_worker
from proxy_workers.forwarding.chunks import LAST_CHUNK, chunk
from proxy_workers.forwarding.headers import call_metadata, relayed_metadata
from proxy_workers.grpc.failures import Failed, classify
from proxy_workers.grpc.legs import Leg
from proxy_workers.grpc.recovery import DONE, STREAMING, WAIT_FIRST, GrpcRecovery
from proxy_workers.grpc.response import interrupted_event, response_head
from proxy_workers.grpc.translate import Renderer, WorkerError, decode_request, prefill_request, to_request
from proxy_workers.routing.decision import describe, header_value
from proxy_workers.routing.table import ModelRoute, PDRoute
from shm.proto import worker_pb2 as pb

if TYPE_CHECKING:
    from proxy_workers.contract import ClientRequest, ClientSink, Figures
    from proxy_workers.process_view import ProcessView
    from proxy_workers.routing.context import RequestContext
    from shm.schema import Worker

log = logging.getLogger("shardgate.proxy")


class GrpcExchange(GrpcRecovery):
    __slots__ = ("client", "ctx", "current", "first_at", "gone", "head_route", "head_sent", "head_worker",
                 "last_io", "legs", "paused", "phase", "phase_started", "picks", "prefill_worker", "proc",
                 "render", "request", "route", "sse", "started", "task", "usage")

    def __init__(self, proc: ProcessView, client: ClientSink, request: ClientRequest,
                 route: ModelRoute | PDRoute, ctx: RequestContext) -> None:
        self.proc = proc
        self.client = client
        self.request = request
        self.route = route
        self.ctx = ctx
        self.head_sent = False
        self.sse = False
        self.gone = False
        self.answer_retries = 0  # worker answers retried; > 0 holds a place in the retry budget
        self.legs: list[Leg] = []
        self.current: Leg | None = None
        self.expired: BaseException | None = None  # set by check_deadline, raised by _read
        self.last_why = ""
        self.head_route: ModelRoute | None = None
        self.head_worker: Worker | None = None
        self.prefill_worker: Worker | None = None
        self.render: Renderer | None = None
        self.task: asyncio.Task[None] | None = None
        # Set while the client's socket is full: the next read from the worker waits for it, and
        # HTTP/2 flow control then holds the worker back (what is buffered stays one window).
        self.paused: asyncio.Future[None] | None = None
        now = proc.loop.time()
        self.started = self.phase_started = self.last_io = now
        self.phase = WAIT_FIRST
        # The request's record (figures): first chunk of a stream, the usage of the Complete
        # message (exact whether or not the client asked for it), workers picked.
        self.first_at = 0.0
        self.usage: tuple[int, int] = (0, 0)
        self.picks = 0

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self.proc.active.add(self)
        self.task = self.proc.loop.create_task(self._run())

    async def _run(self) -> None:
        try:
            req, plan = to_request(self.request.path, self.request.body, self.ctx.model or "",
                                   self.request.request_id.decode())
            self.render = Renderer(plan)
            if isinstance(self.route, PDRoute):
                await self._pd(self.route, req)
            else:
                await self._regular(self.route, req)
        except asyncio.CancelledError:
            if not self.gone:  # the proxy is shutting down: nothing can be answered any more
                self._release(abort=True, ok=False, count_error=False)
                self._release_budget()
        except RouterError as err:
            self._give_up(err)
        except Exception:
            rid = self.request.request_id.decode("latin-1")
            log.exception("gRPC exchange failed (request_id=%s)", rid, extra={"request_id": rid})
            self._give_up(InternalError("internal router error; see the router's log"))

    def client_gone(self) -> None:
        """The client disconnected: cancel every call and Abort every leg."""
        if self.phase == DONE:
            return
        self.phase = DONE
        self.gone = True
        self._release(abort=True, ok=False, count_error=False)
        self._release_budget()
        self.proc.active.discard(self)
        self.proc.count_disconnect()
        if self.task is not None:
            self.task.cancel()

    def pause_upstream(self) -> None:
        """The client's socket is full: stop reading the worker's stream until it drains."""
        if self.paused is None and self.phase != DONE:
            self.paused = self.proc.loop.create_future()

    def resume_upstream(self) -> None:
        self.last_io = self.proc.loop.time()  # the idle clock measures the worker again
        self._wake()

    def _wake(self) -> None:
        paused, self.paused = self.paused, None
        if paused is not None and not paused.done():
            paused.set_result(None)

    # -- the two routers -----------------------------------------------------------------

    async def _regular(self, route: ModelRoute, req: pb.GenerateRequest) -> None:
        tried: list[int] = []
        while True:
            leg = self._open(self._pick(route, tried), req)
            self.head_route, self.head_worker = route, leg.worker
            try:
                await self._relay(leg)
            except Failed as failed:
                if self._leg_failed(leg, failed):
                    return
                await self._retry(failed, tried, route)
                continue
            await self._done(leg)
            return

    def _leg_failed(self, leg: Leg, failed: Failed) -> bool:
        """Close a failed leg's books; True when its answer had started (the stream is then
        truncated: no retry after the first byte)."""
        self._settle(leg, ok=False, connect_error=failed.connect)
        if self.head_sent:
            self._truncate(failed.why)
            return True
        return False

    async def _pd(self, route: PDRoute, req: pb.GenerateRequest) -> None:
        tried_prefill: list[int] = []
        tried_decode: list[int] = []
        ask = prefill_request(req)
        while True:
            prefill, handle = await self._prefill(route.prefill, ask, tried_prefill)
            leg = self._open(self._pick(route.decode, tried_decode), decode_request(req, handle))
            self.head_route, self.head_worker, self.prefill_worker = route.decode, leg.worker, prefill.worker
            try:
                await self._relay(leg)
            except Failed as failed:
                if self._leg_failed(leg, failed):
                    return
                # The pair failed on its decode side: release the prefill's KV, form a new pair
                # (the prefill worker did its part: it may be picked again).
                prefill.abort()
                self._settle(prefill, ok=True)
                tried_prefill.remove(prefill.worker.slot)
                await self._retry(failed, tried_decode, route.decode)
                continue
            await self._done(leg)
            return

    async def _prefill(self, route: ModelRoute, ask: pb.GenerateRequest,
                       tried: list[int]) -> tuple[Leg, bytes]:
        """A prefill leg that answered with a KV handle (kept open: it holds the KV)."""
        while True:
            leg = self._open(self._pick(route, tried), ask)
            try:
                handle = b""
                while (msg := await self._read(leg)) is not grpc.aio.EOF:
                    if self.phase == WAIT_FIRST:
                        self._first_message(leg)
                    if msg.HasField("complete"):
                        handle = msg.complete.kv_transfer_params
                if not handle:
                    raise Failed(f"prefill worker {leg.worker.url} returned no kv_transfer_params")
                return leg, handle
            except Failed as failed:
                self._settle(leg, ok=False, connect_error=failed.connect)
                await self._retry(failed, tried, route)

    # -- one leg ---------------------------------------------------------------------------

    def _pick(self, route: ModelRoute, tried: list[int]) -> Worker:
        worker = pick_worker(self.proc, route, self.ctx, tried, self.last_why)
        self.picks += 1
        tried.append(worker.slot)
        return worker

    def _open(self, worker: Worker, req: pb.GenerateRequest) -> Leg:
        """Start a Generate call on ``worker``; it counts in flight from now."""
        proc = self.proc
        rid = f"{self.request.request_id.decode()}.{proc.next_request_id().decode()}"
        leg = Leg(proc, worker, rid)
        self.legs.append(leg)
        ask = pb.GenerateRequest()
        ask.CopyFrom(req)  # the call serializes later: each leg owns its message
        ask.request_id = rid
        now = proc.loop.time()
        left = max(proc.settings.total_timeout - (now - self.started), 0.001)
        leg.call = proc.grpc_channels.stub(worker.url).Generate(
            ask, timeout=left, metadata=call_metadata(self.request))
        self.current, self.expired = leg, None
        self.phase, self.phase_started, self.last_io = WAIT_FIRST, now, now
        return leg

    async def _read(self, leg: Leg) -> Any:
        """The leg's next message (or EOF); failures become Failed, RouterError or a timeout."""
        if self.paused is not None:
            await self.paused
            expired, self.expired = self.expired, None
            if expired is not None:
                raise expired
        try:
            msg = await leg.call.read()
        except asyncio.CancelledError:
            expired, self.expired = self.expired, None
            task = asyncio.current_task()
            if expired is None or (task is not None and task.cancelling()):
                raise
            if isinstance(expired, RouterError):  # a timeout: the worker counts it as a failure
                leg.abort()  # it may still be generating
                self._settle(leg, ok=False)
            raise expired from None
        except grpc.aio.AioRpcError as exc:
            proc = self.proc
            failure, settlement = classify(exc, leg.worker.url, self.head_sent, proc.retry_statuses,
                                           proc.settings.total_timeout)
            if settlement is not None:
                self._settle(leg, ok=settlement[0], count_error=settlement[1])
            raise failure from None
        self.last_io = self.proc.loop.time()
        return msg

    def _first_message(self, leg: Leg, stream: bool = False) -> None:
        leg.first_message(self.proc.loop.time() - self.phase_started, stream)
        self.phase = STREAMING

    async def _relay(self, leg: Leg) -> None:
        """Write the leg's answer to the client, whole; raises Failed on a worker failure."""
        render = self.render
        assert render is not None
        stream = render.plan.stream
        text: list[str] = []
        msg = await self._read(leg)
        if msg is grpc.aio.EOF:
            raise Failed(f"{leg.worker.url} ended the stream without an answer")
        self._first_message(leg, stream)
        headers = relayed_metadata(await leg.call.initial_metadata())
        if stream:
            self._write_head(headers, b"text/event-stream", None)
        while msg is not grpc.aio.EOF:
            if msg.HasField("chunk"):
                if stream:
                    self._out(render.delta(msg.chunk.text))
                    if not self.first_at:
                        self.first_at = self.proc.loop.time()
                else:
                    text.append(msg.chunk.text)
            elif msg.HasField("complete"):
                done = msg.complete
                self.usage = (done.usage.prompt_tokens, done.usage.completion_tokens)
                if stream:
                    self._out(render.end(done.finish_reason, done.usage), last=True)
                else:
                    body = render.whole("".join(text), done.finish_reason, done.usage)
                    self._write_head(headers, b"application/json", len(body))
                    self.client.write(body)
                return
            msg = await self._read(leg)
        raise Failed(f"{leg.worker.url} ended the stream without a Complete message")

    async def _done(self, leg: Leg) -> None:
        """The answer is out, whole: end the exchange, then let the call end (status, trailers).

        The exchange ends first: a client that hangs up on the complete answer must not turn the
        worker's last moments into an abort.
        """
        self._release(abort=False, ok=True)
        self._finish(error=False)
        try:
            while await leg.call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError:
            pass

    def figures(self) -> Figures:
        """The request's record (serving.records): 200 once the head is out; retries are the
        workers picked past those a request needs (one; two for PD)."""
        worker, route = self.head_worker, self.head_route
        needed = 2 if isinstance(self.route, PDRoute) else 1
        return (200 if self.head_sent else 0, self.first_at, self.usage[0], self.usage[1],
                worker.url if worker is not None else "", max(self.picks - needed, 0), self.route.model,
                route.policy.name if route is not None else "")

    # -- output ------------------------------------------------------------------------------

    def _write_head(self, worker_headers: bytes, content_type: bytes, length: int | None) -> None:
        decision = None
        if self.request.explain and self.head_route is not None:
            if self.prefill_worker is not None and self.ctx.scores is not None:
                self.ctx.scores["prefill_worker"] = self.prefill_worker.url  # as the http_pd router
            decision = header_value(describe(self.head_route, self.ctx, self.head_worker))
        self.sse = length is None
        self.client.write(response_head(self.request, worker_headers, content_type, length,
                                        self.proc.draining, decision))
        self.head_sent = True

    def _out(self, data: bytes, last: bool = False) -> None:
        if self.request.http11:
            data = chunk(data) + (LAST_CHUNK if last else b"")
        self.client.write(data)

    # -- endings -----------------------------------------------------------------------------

    def _settle(self, leg: Leg, ok: bool, count_error: bool = True, connect_error: bool = False) -> None:
        leg.settle(ok, self.proc.loop.time() - self.started, count_error, connect_error)
        if leg in self.legs:
            self.legs.remove(leg)

    def _release(self, abort: bool, ok: bool, count_error: bool = True) -> None:
        for leg in list(self.legs):
            if abort:
                leg.abort()
            self._settle(leg, ok=ok, count_error=count_error)

    def _give_up(self, err: RouterError) -> None:
        if self.phase == DONE:
            return
        self._release(abort=True, ok=False, count_error=False)
        if self.head_sent:
            self._truncate(err.message)
        else:
            self.phase = DONE
            self.client.send_error(err, self.request)
            # A worker's own answer, relayed, is not a router error (as an HTTP worker's 4xx/5xx).
            self._finish(error=not isinstance(err, WorkerError))

    def _truncate(self, why: str) -> None:
        """The head is out: tell an SSE client why, then close the connection."""
        self._release(abort=True, ok=False, count_error=False)
        if self.sse:
            self._out(interrupted_event(why))
        self.request.keep_alive = False
        self._finish(error=True)

    def _finish(self, error: bool) -> None:
        self._release_budget()
        self.phase = DONE
        self.current = None
        self.client.exchange_done(self, error)
