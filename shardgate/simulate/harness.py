"""The router's own decision machinery, fed by the simulator instead of by traffic.

Role: build, in this process, what a proxy decides with, from production code only: the fleet
snapshot (``coordinator.fleet.membership.Fleet``: slots, weights, the consistent-hash ring of
worker URLs), a load board and an affinity table in POSIX shared memory, and per simulated proxy
a ``PolicyEnv`` and a ``RoutingTable`` whose route for the model is what ``pick`` is called on.
The simulator then writes the board as proxies and the coordinator would, through their own
functions: ``proxy_workers.forwarding.attempts`` opens and settles a worker cell per attempt
(in-flight, requests, errors, the TTFB and latency EWMAs), ``coordinator.health.engine_metrics``
writes the engine rows least_loaded reads.

Invariants:
- Fresh segments per run (per policy of a comparison): no policy sees another's load or
  affinity entries. They are unlinked on ``close``, also after an error.
- Each simulated proxy writes only its own board cells and affinity region (the single-writer rule),
  and its policy object has its own ``random.Random`` seeded from the run's seed: same seed,
  same decisions.
- A health change is published as a new snapshot generation and every proxy rebuilds its
  table from it, keeping its policy object (``RoutingTable(snapshot, env, previous)``), as a
  proxy does when the coordinator publishes.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import msgspec

from coordinator.fleet.membership import Fleet
from coordinator.health.engine_metrics import write_figures
from proxy_workers.policies.base import PolicyEnv
from proxy_workers.policies.registry import POLICIES, POLICY_INDEX
from proxy_workers.process_view import ProcessView
from proxy_workers.routing.table import ModelRoute, RoutingTable
from shardgate.simulate.workload import MODEL
from shm.affinity import AffinityTable, table_size
from shm.loadboard import LoadBoard, board_size
from shm.schema import ModelPolicy, Snapshot, WorkerSpec
from shm.segment import Segment, new_instance_id, segment_name
from shm.settings import Settings


def fleet_snapshot(urls: Sequence[str], weights: Sequence[int], settings: Settings, proxies: int) -> Snapshot:
    """One model served by every worker, as the coordinator would publish it (slot i = urls[i])."""
    fleet = Fleet(settings.max_workers)
    fleet.apply([WorkerSpec(url=url, model=MODEL, weight=weight) for url, weight in zip(urls, weights,
                                                                                         strict=True)])
    return fleet.snapshot(settings, {}, proxies, 1, os.getpid())


class Production:
    """Board, affinity table and per-proxy routes for one policy; ``close`` unlinks them."""

    def __init__(self, snapshot: Snapshot, policy: str, proxies: int, seed: int) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; known: {', '.join(sorted(POLICIES))}")
        self.settings = settings = snapshot.settings
        self.proxies = proxies
        self._segments: list[Segment] = []
        instance = new_instance_id()
        try:
            seg = self._segment(segment_name(instance, "load"), board_size(proxies, settings.max_workers))
            self.board = LoadBoard.create(seg, proxies, settings.max_workers)
            seg = self._segment(segment_name(instance, "affinity"),
                                table_size(proxies, settings.affinity_capacity))
            self.affinity = AffinityTable.create(seg, proxies, settings.affinity_capacity)
        except BaseException:
            self.close()
            raise
        override = msgspec.convert({"policy": policy}, ModelPolicy)  # the name checked against the Literal
        self.snapshot = msgspec.structs.replace(snapshot, model_policies={MODEL: override})
        self.envs = [PolicyEnv(self.board, p, proxies, settings, self.affinity) for p in range(proxies)]
        self.tables = [RoutingTable(self.snapshot, env, None) for env in self.envs]
        for p, table in enumerate(self.tables):
            # A seeded policy object instead of the registry's unseeded one; the table keeps it
            # across later snapshots (the same carry-over a proxy relies on).
            seeded = POLICIES[policy](self.envs[p], random.Random(f"{seed}:{policy}:{p}"))
            seeded.index = POLICY_INDEX[policy]
            table.route_for(MODEL).policy = seeded
        self.routes: list[ModelRoute] = [t.route_for(MODEL) for t in self.tables]
        self.proxy_views = [ProcessView(self.board, p) for p in range(proxies)]

    def _segment(self, name: str, size: int) -> Segment:
        seg = Segment.create(name, size)
        self._segments.append(seg)
        return seg

    def set_down(self, down: set[int]) -> None:
        """Publish the workers in ``down`` as unhealthy (the others healthy); every proxy rebuilds."""
        workers = tuple(msgspec.structs.replace(w, healthy=w.slot not in down,
                                                health_reason="simulated failure" if w.slot in down else "")
                        for w in self.snapshot.workers)
        self.snapshot = msgspec.structs.replace(self.snapshot, workers=workers,
                                                generation=self.snapshot.generation + 1)
        for p, env in enumerate(self.envs):
            env.update(self.proxies, self.settings)
            self.tables[p] = RoutingTable(self.snapshot, env, self.tables[p])
            self.routes[p] = self.tables[p].route_for(MODEL)

    def engine_rows(self, figures: Sequence[tuple[int, int, float]]) -> None:
        """The coordinator's scrape round: running, waiting, KV usage for every slot."""
        board = self.board
        for slot, row in enumerate(figures):
            write_figures(board, slot, row)

    def close(self) -> None:
        for name in ("board", "affinity"):
            part = getattr(self, name, None)
            if part is not None:
                part.close()
        for seg in self._segments:
            seg.close()
            seg.unlink()
        self._segments = []
