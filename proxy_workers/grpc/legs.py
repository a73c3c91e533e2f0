"""One Generate call to one gRPC worker ("a leg"), with its load-board books and its Abort.

Role: the part of :mod:`proxy_workers.grpc.exchange` that touches the load board, the worker's
``Abort`` RPC and its channel's state, so the exchange's control flow stays readable. A regular
request has one leg per attempt; a PD request has a prefill leg and a decode leg at once.

Invariants:
- A leg counts in flight on its worker's cell from construction until :meth:`Leg.settle`, which
  runs at most once (later calls do nothing), like ``Exchange._settle`` for HTTP attempts.
- :meth:`Leg.abort` cancels the call if it still runs and sends ``Abort(request_id)`` in the
  background (bounded by ``connect_timeout``); a worker that is gone or has finished is fine.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import grpc

from proxy_workers.forwarding.attempts import first_byte, open_cell, settle
from shm.proto import worker_pb2 as pb

if TYPE_CHECKING:
    from proxy_workers.process_view import ProcessView
    from shm.schema import Worker

_background: set[asyncio.Task[Any]] = set()  # Abort RPCs in flight (kept from the GC)


class Leg:
    """One call; ``call`` is the grpc.aio UnaryStreamCall once started."""

    __slots__ = ("call", "cell", "proc", "rid", "worker")

    def __init__(self, proc: ProcessView, worker: Worker, rid: str) -> None:
        self.proc = proc
        self.worker = worker
        self.rid = rid
        self.call: Any = None
        self.cell = open_cell(proc, worker.slot)

    @property
    def open(self) -> bool:
        return self.cell >= 0

    def connected(self) -> bool:
        """Whether the worker's channel is connected (``connect_timeout`` applies only while not)."""
        channel = self.proc.grpc_channels.channel(self.worker.url)
        return channel is not None and channel.get_state() == grpc.ChannelConnectivity.READY

    def first_message(self, waited: float, stream: bool) -> None:
        """The first message came ``waited`` seconds after the call started (TTFT)."""
        if self.cell >= 0:
            first_byte(self.proc, self.cell, waited, stream)

    def settle(self, ok: bool, latency: float, count_error: bool = True, connect_error: bool = False) -> None:
        """Close the books of this leg (once)."""
        self.cell = settle(self.proc, self.cell, ok, latency, count_error, connect_error)

    def abort(self) -> None:
        """Cancel the call if it runs, and tell the worker to drop the request (and its KV)."""
        call = self.call
        if call is None:
            return
        if not call.done():
            call.cancel()
        proc = self.proc
        stub = proc.grpc_channels.stub(self.worker.url)
        task = proc.loop.create_task(_send_abort(stub, self.rid, proc.settings.connect_timeout))
        _background.add(task)
        task.add_done_callback(_background.discard)


async def _send_abort(stub: Any, rid: str, timeout: float) -> None:
    try:
        await stub.Abort(pb.AbortRequest(request_id=rid, reason="client went away"), timeout=timeout)
    except grpc.aio.AioRpcError:
        pass  # the worker is gone or the call already ended: nothing left to stop

