"""What every data path reads and counts of its proxy process: one class, not a Protocol.

Role: :class:`ProcessView` is the proxy process as the request path sees it: the load-board
views and this process's words in them (and the counting that writes those words), the event
loop, the settings, the routing table, the running exchanges, the pools and channels the paths
send through, and where an ended request's record goes. :class:`proxy_workers.serving.state.ProxyProcess`
is the one subclass that runs (it fills in the rest and takes snapshots); the simulator
(``shardgate.simulate``) makes a bare one over its own board.

Why a class: compiled (docs/compiled-hot-path.md), an attribute of a class is read at a fixed
offset, a few instructions, where an attribute of a ``typing.Protocol`` is looked up by name
(~200 instructions); a request reads about thirty of these. The behaviours stay Protocols
(:mod:`proxy_workers.contract`); this is state.

Invariants:
- Imported by every layer (routing, forwarding, the three paths, serving); it imports none of
  them at run time, and only :mod:`proxy_workers.routing.table` for a type, so no import cycle
  runs through it (tests/test_boundaries.py).
- This process writes only its own words of the board: its row, its worker cells, its decision
  counters (the single-writer rule the board's readers rely on).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from shm.loadboard import (
    P_DISCONNECTS,
    P_ERRORS,
    P_REJECTED,
    P_REQUESTS,
    P_RETRIES,
    P_RETRIES_STATUS,
    LoadBoard,
)

if TYPE_CHECKING:
    import asyncio
    import random

    from proxy_workers.contract import ClientExchange
    from proxy_workers.routing.table import RoutingTable
    from shm.settings import Settings


class ProcessView:
    """A proxy process's shared state, as the request path reads it (see the module docstring)."""

    # Slots: interpreted (SHARDGATE_PURE=1), an instance dict of this many attributes stops
    # sharing its keys and CPython's attribute caches miss; compiled, they are the struct's fields.
    __slots__ = ("_table", "access_log", "active", "cell0", "connection_preference", "decision0", "draining",
                 "floats", "grpc_channels", "hash_fallback", "hash_headers", "index", "ints", "loop",
                 "max_body_size", "max_head_size", "max_header_count", "max_json_depth", "model_blocks",
                 "other_block", "pools", "retry_statuses", "retrying", "rid_counter", "rid_prefix", "rng",
                 "row", "settings", "tracer")

    # Set by the process (serving.state.ProxyProcess); the simulator sets none of them.
    _table: RoutingTable  # the routing table in use (latest_table)
    loop: asyncio.AbstractEventLoop
    settings: Settings  # and the ones every request reads, as fields (use_settings)
    max_head_size: int
    max_header_count: int
    max_body_size: int
    max_json_depth: int
    hash_fallback: str
    connection_preference: str
    rng: random.Random
    hash_headers: tuple[bytes, ...]  # the settings' hash_headers, parsed (routing.context)
    draining: bool
    active: set[ClientExchange]  # running exchanges (the sweep checks their deadlines)
    retry_statuses: frozenset[int]  # worker answers retried elsewhere (the settings', parsed)
    retrying: int  # requests of this process retrying a worker's answer now (the retry budget)
    # Per-model figures (serving.records): model -> this proxy's block; block 0 is "other".
    model_blocks: dict[str, int]
    other_block: int
    # Each path's own means of sending, typed where they are used (a type here would tie this
    # module to the paths): proxy_workers.http.pools.Pools, proxy_workers.grpc.channels.GrpcChannels.
    pools: Any
    grpc_channels: Any
    # Where an ended request's record goes (serving.records), None when off:
    # serving.accesslog.AccessLog and serving.tracing.Tracer (modules that import records).
    access_log: Any
    tracer: Any

    def __init__(self, board: LoadBoard, index: int) -> None:
        self.index = index
        self.ints: memoryview[int] = board.ints  # the board's words, as int64 and as float64 (same memory)
        self.floats: memoryview[float] = board.floats
        self.cell0 = board.cell_word(index, 0)  # this process's first worker cell
        self.decision0 = board.decision_word(index, 0)  # its first decision counter
        self.row = board.proxy_word(index, 0)  # its row
        self.rid_prefix = os.urandom(4).hex().encode()
        self.rid_counter = 0

    def use_settings(self, settings: Settings) -> None:
        """Take ``settings``; those every request reads are copied to fields (compiled, a field
        is read at a fixed offset, a settings Struct's by name)."""
        self.settings = settings
        self.max_head_size = settings.max_head_size
        self.max_header_count = settings.max_header_count
        self.max_body_size = settings.max_body_size
        self.max_json_depth = settings.max_json_depth
        self.hash_fallback = settings.hash_fallback
        self.connection_preference = settings.connection_preference

    def latest_table(self) -> RoutingTable:
        """The routing table to route by: the one held here (a process that takes snapshots,
        ``ProxyProcess``, first takes the newest one published)."""
        return self._table

    def next_request_id(self) -> bytes:
        """A request id unique across the fleet's proxies: this process's random prefix and a
        decimal count (``%s`` formatting is compiled; ``%x`` goes through CPython's, ~5x the cost)."""
        self.rid_counter += 1
        return b"%s-%s" % (self.rid_prefix, str(self.rid_counter).encode())

    def count_request(self, error: bool) -> None:
        ints, row = self.ints, self.row
        ints[row + P_REQUESTS] += 1
        if error:
            ints[row + P_ERRORS] += 1

    def count_retry(self, answer: bool = False) -> None:
        """One retry; ``answer``: of a worker's answer (a retryable status), counted apart too."""
        ints, row = self.ints, self.row
        ints[row + P_RETRIES] += 1
        if answer:
            ints[row + P_RETRIES_STATUS] += 1

    def count_rejected(self) -> None:
        """A request the router refused before routing it (it is a request, and an error)."""
        ints, row = self.ints, self.row
        ints[row + P_REJECTED] += 1
        ints[row + P_REQUESTS] += 1
        ints[row + P_ERRORS] += 1

    def count_disconnect(self) -> None:
        ints, row = self.ints, self.row
        ints[row + P_DISCONNECTS] += 1
        ints[row + P_REQUESTS] += 1
