"""Which C helpers the policies use in this process: the load-board scan and quota counts, the
affinity table's per-request operations and cache_aware's prefix CRCs, or their Python twins.

Role: one rule for both C modules (``_boardscan.c``, ``_affinity.c``): they are built and stamped
with the compiled request path (``proxy_workers.compiled.C_SOURCES``), so they are used exactly
when it runs compiled; a pure install, a stale build or ``SHARDGATE_PURE=1`` runs the twins
(``scan.PyFigure``, ``shm.affinity.AffinityTable``), which hold the rules and answer the same
(tests/test_policy_scale.py compares them).
"""

from __future__ import annotations

from typing import Any, Protocol

import proxy_workers
from shm.affinity import HEADER_WORDS, PROBES, AffinityTable


class AffinityOps(Protocol):
    """What policies do with the affinity table on a request (``shm.affinity.AffinityTable``'s
    methods of these names say what they do)."""

    def lookup(self, key: int, proxies: int, now: float, ttl: float, usable: Any = None,
               latest: bool = False) -> tuple[int, float] | None: ...

    def record(self, proxy: int, key: int, slot: int, now: float, created: float | None = None) -> None: ...

    def record_many(self, proxy: int, keys: list[int], slot: int, now: float) -> None: ...


def _load() -> tuple[Any, Any, Any, Any]:
    if proxy_workers.BUILD != "compiled":
        return None, None, None, None
    try:
        from proxy_workers.policies import _affinity, _boardscan
    except ImportError:  # a build that compiled the mypyc modules only
        return None, None, None, None
    return _boardscan.Figure, _boardscan.quota_counts, _affinity.Table, _affinity.chained_keys


# The C load-board Figure (twin: scan.PyFigure), quota counts (twin: load.QuotaAware._counts),
# affinity Table (twin: shm.affinity.AffinityTable) and chained prefix CRCs (twin: the zlib loop
# of affinity.prefix_keys); all None, or none.
C_FIGURE, C_QUOTA_COUNTS, C_AFFINITY, C_KEYS = _load()


def affinity_ops(table: AffinityTable | None) -> AffinityOps | None:
    """``table``'s per-request operations: in C over the same mapping when built, else the table."""
    if table is None or C_AFFINITY is None:
        return table
    return C_AFFINITY(table.words.obj, HEADER_WORDS, table.capacity, PROBES,
                      table.max_proxies)
