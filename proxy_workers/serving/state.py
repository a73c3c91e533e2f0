"""State of one proxy process, and one parsed request.

Role: :class:`ProxyProcess` holds what every connection of a proxy process shares (snapshot
reader, routing table, load board views, pools, counters). What the request path reads of it is
its base, :class:`proxy_workers.process_view.ProcessView`.

Invariants: the routing table is rebuilt only when the snapshot generation moves: at once for a
small snapshot, else in steps of one event-loop iteration each (:meth:`ProxyProcess.snapshot_steps`),
requests in between using the previous table; this process writes only its own load-board row and
cells.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from proxy_workers.forwarding.retry import parse_statuses
from proxy_workers.grpc.channels import GrpcChannels
from proxy_workers.http.pools import Pools
from proxy_workers.outbox import Outbox
from proxy_workers.policies.base import PolicyEnv
from proxy_workers.process_view import ProcessView
from proxy_workers.routing.context import parse_hash_headers
from proxy_workers.routing.table import RoutingTable
from proxy_workers.serving.accesslog import AccessLog
from proxy_workers.serving.admission import Admission
from proxy_workers.serving.auth import KeyGate, UpstreamKeys, gate_for
from proxy_workers.serving.tracing import make_tracer
from shm.affinity import AffinityTable
from shm.loadboard import LoadBoard
from shm.schema import Snapshot
from shm.snapshot import SnapshotReader, gc_paused

if TYPE_CHECKING:
    from proxy_workers.contract import ClientExchange, RequestGate

log = logging.getLogger("shardgate.proxy")
# Up to this payload (~2,500 workers) taking a snapshot costs ~3 ms and is done at once; beyond,
# in steps (decode, build, release, collect), each one event-loop iteration.
SNAPSHOT_AT_ONCE_BYTES = 256 * 1024


class Connection(Protocol):
    """A client connection as the process's sweep and shutdown see it."""

    exchange: ClientExchange | None
    reading_since: float
    idle_since: float
    transport: asyncio.Transport | None

    @property
    def idle(self) -> bool: ...

    def check_deadline(self, now: float, header_timeout: float, keepalive: float) -> None: ...

    def close(self) -> None:
        """Close once what was written is out."""


class ProxyProcess(ProcessView):
    """State shared by every connection of one proxy process (what the request path reads of it:
    its base, :class:`proxy_workers.process_view.ProcessView`)."""

    # Slots (as its base's): interpreted, past 30 attributes an instance dict stops sharing its
    # keys and CPython's attribute caches miss (measured: +1.3k instructions/request).
    __slots__ = ("_taking", "admission", "admitted", "board", "cell_owner", "connections", "env",
                 "gate", "limits_on", "model_owner", "orphan_logged", "orphaned_since", "outbox", "reader",
                 "upstream_keys")

    def __init__(self, loop: asyncio.AbstractEventLoop, index: int, reader: SnapshotReader,
                 board: LoadBoard, affinity: AffinityTable | None = None) -> None:
        super().__init__(board, index)
        self.loop = loop
        self.reader = reader
        self.board = board
        snapshot = reader.current()
        if snapshot is None:
            raise RuntimeError("no snapshot published yet")
        self.use_settings(snapshot.settings)
        self.env = PolicyEnv(board, index, snapshot.proxies, snapshot.settings, affinity)
        self.hash_headers = parse_hash_headers(snapshot.settings.hash_headers)
        self.rng = random.Random()
        self.outbox = Outbox(loop)  # writes sent together at the end of each loop iteration
        self.pools = Pools(loop, self.settings.pool_size, self.outbox)
        self.grpc_channels = GrpcChannels()
        self._table = RoutingTable(snapshot, self.env, None)
        self.cell_owner: list[str | None] = []
        self._claim_cells(snapshot)
        # Per-model figures (serving.records): model -> this proxy's block; block 0 is "other".
        self.model_owner: list[str | None] = [None] * (board.max_models + 1)
        self.model_blocks = {}
        self.other_block = board.model_word(index, 0)
        self._claim_models(snapshot)
        # The access log and the tracer (each None when off): what serving.records hands each
        # ended request to.
        self.access_log = AccessLog.open(snapshot.settings, index)
        self.tracer = make_tracer()  # None unless spans are exported (docs/tracing.md)
        self._taking = False  # a new snapshot is being taken, step by step
        self.active = set()
        self.connections: set[Connection] = set()
        self.draining = False
        self.retry_statuses = parse_statuses(self.settings.retry_statuses)
        self.retrying = 0
        self.orphaned_since = 0.0  # wall time the coordinator was found gone (0: it runs)
        self.orphan_logged = 0.0
        # Admission control (docs/overload.md): ``limits_on`` is the one check a request pays
        # when every limit is off; ``admitted`` holds the exchanges that took a place.
        # Client API keys and workers' own keys (docs/api-keys.md): the gate is None when both
        # are off, so an open router pays one attribute check per request.
        self.upstream_keys = UpstreamKeys()
        self.gate: RequestGate | None = gate_for(
            snapshot, self.upstream_keys.apply(snapshot.workers, self.pools, self.grpc_channels), None)
        self.admission = Admission(self)
        self.admitted = self.admission.admitted
        self.limits_on = self.admission.update(self.settings, snapshot.proxies, index, self._table.capped)

    def latest_table(self) -> RoutingTable:
        """The routing table, after taking the newest snapshot if one was published.

        Noticing costs one compare; a small new snapshot is taken here, at once, so the caller
        already routes by it; a large one starts being taken in steps (see ``_take_snapshot``)."""
        if self.reader.moved() and not self._taking:
            self._take_snapshot()
        return self._table

    def _take_snapshot(self) -> None:
        """A small snapshot is taken at once, so the request that noticed it is already routed
        by it (an admin change is seen by the next request); a large one is taken in steps,
        one per loop iteration, so that no single pause of the event loop grows with the fleet."""
        steps = self.snapshot_steps()
        if self.reader.pending_bytes() <= SNAPSHOT_AT_ONCE_BYTES:
            for _ in steps:
                pass
        else:
            self._taking = True
            self.loop.call_soon(self._next_step, steps)

    def _next_step(self, steps: Iterator[str]) -> None:
        try:
            more = next(steps, None) is not None
        except Exception:  # a bug must not leave the process on its old snapshot for good
            log.exception("taking a new snapshot failed; the previous one stays in use")
            more = False
        if more:
            self.loop.call_soon(self._next_step, steps)
        else:
            self._taking = False

    def snapshot_steps(self) -> Iterator[str]:
        """Taking a new snapshot, one step per event-loop iteration, so that no step blocks the
        loop for long (at 10,000 workers each is a few ms); requests in between keep using the
        previous table. Yields each finished step's name (the snapshot bench times them).

        The cyclic collector is paused until the last step, which runs the young-generation
        collection the ~100,000 new objects call for: otherwise it would start inside whichever
        step allocated the one object too many, and add ~1.5 ms to it."""
        with gc_paused():
            snapshot = self.reader.current()  # copy, CRC and decode
            if snapshot is None or snapshot is self._table.snapshot:
                return  # torn or undecodable: the previous snapshot stays, the next compare retries
            yield "decode"
            previous = self._table
            self._snapshot_changed(snapshot)
            yield "build"
            del previous  # the last reference to the old table and snapshot: freeing them is a step
            yield "release"
        gc.collect(0)
        yield "collect"

    def _claim_cells(self, snapshot: Snapshot) -> None:
        """Reset this proxy's cells of slots that now belong to a different worker."""
        owners = self.cell_owner
        for w in snapshot.workers:
            slot = w.slot
            if slot >= len(owners):
                owners.extend([None] * (slot + 1 - len(owners)))
            if owners[slot] != w.url:
                if owners[slot] is not None:
                    self.board.reset_cell(self.index, slot)
                owners[slot] = w.url

    def _claim_models(self, snapshot: Snapshot) -> None:
        """Map models to this proxy's blocks; a block whose index now names another model (a new
        coordinator numbered them anew) is zeroed first, by its only writer."""
        owners, board, blocks = self.model_owner, self.board, {}
        for model, number in snapshot.model_index.items():
            if not 0 < number < len(owners):
                continue  # past this board's max_models: counted as "other"
            if owners[number] != model:
                if owners[number] is not None:
                    board.reset_model(self.index, number)
                owners[number] = model
            blocks[model] = board.model_word(self.index, number)
        self.model_blocks = blocks

    def _snapshot_changed(self, snapshot: Snapshot) -> None:
        self._claim_cells(snapshot)
        self._claim_models(snapshot)
        if snapshot.settings.access_log != self.settings.access_log \
                or snapshot.settings.log_format != self.settings.log_format:
            if self.access_log is not None:
                self.access_log.close()
            self.access_log = AccessLog.open(snapshot.settings, self.index)
        self.use_settings(snapshot.settings)
        self.retry_statuses = parse_statuses(snapshot.settings.retry_statuses)
        self.env.update(snapshot.proxies, snapshot.settings)
        self.hash_headers = parse_hash_headers(snapshot.settings.hash_headers)
        self.pools.limit = snapshot.settings.pool_size
        self._table = RoutingTable(snapshot, self.env, self._table)
        urls = {w.url for w in snapshot.workers}
        self.pools.retain(urls)
        self.grpc_channels.retain(urls)
        keyed = self.upstream_keys.apply(snapshot.workers, self.pools, self.grpc_channels)
        self.gate = gate_for(snapshot, keyed, self.gate if isinstance(self.gate, KeyGate) else None)
        self.limits_on = self.admission.update(snapshot.settings, snapshot.proxies, self.index,
                                               self._table.capped)


def freeze_startup_heap() -> None:
    """Hide what exists at start-up (modules, classes, the first snapshot) from the collector.

    It lives as long as the process; out of the collector's sight, a full collection scans a few
    hundred objects instead of ~23,000 (0.4 ms instead of 4 ms at 10,000 workers), so it is no
    longer a long pause of the event loop. Called once, when the proxy is ready to serve.
    """
    gc.collect()
    gc.freeze()

