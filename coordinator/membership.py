"""Worker membership: who is in the fleet, in which slot, serving what, and how healthy.

Role: the coordinator's model of the fleet, and the only place a :class:`shm.schema.Snapshot` is
assembled from it.

Invariants:
- A worker keeps its slot for as long as it stays in the fleet (a re-read config that changes
  its weight or labels keeps the slot, so its load-board counters carry on). Freed slots are
  reused lowest first, only after the worker left.
- The slot capacity is the ``max_workers`` setting (the load board's width); adding a worker
  beyond it is refused with a clear error instead of corrupting another worker's counters.
- A snapshot is built whole from this state and checked before it is published.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable

from coordinator import topology
from shm.schema import ModelPolicy, Snapshot, Worker, WorkerSpec
from shm.settings import Settings

Key = tuple[str, str | None, str]


def spec_key(spec: WorkerSpec) -> Key:
    return (spec.url, spec.model, spec.type)


class FleetFull(Exception):
    status = 507


class WorkerState:
    """What the coordinator knows about one worker."""

    __slots__ = ("discovered", "fails", "healthy", "last_check", "models", "passes", "reason",
                 "slot", "spec")

    def __init__(self, spec: WorkerSpec, slot: int) -> None:
        self.spec = spec
        self.slot = slot
        self.models: tuple[str, ...] = (spec.model,) if spec.model else ()
        self.discovered = spec.model is not None
        # Optimistic start: a configured worker takes traffic until checks say otherwise; the
        # proxies' failover covers the gap. A worker whose models are unknown routes nothing.
        self.healthy = True
        self.fails = 0
        self.passes = 0
        self.reason = "" if self.discovered else "models not discovered yet"
        self.last_check = 0.0

    def record(self, ok: bool, reason: str, fall: int, rise: int) -> bool:
        """Count one check result; True when the health state flipped."""
        if ok:
            self.fails, self.passes = 0, self.passes + 1
            if not self.healthy and self.passes >= rise:
                self.healthy, self.reason = True, ""
                return True
            if self.healthy and self.reason:
                self.reason = ""
                return True
            return False
        self.passes, self.fails = 0, self.fails + 1
        self.reason = reason
        if self.healthy and self.fails >= fall:
            self.healthy = False
            return True
        return False

    def to_worker(self) -> Worker:
        spec = self.spec
        return Worker(slot=self.slot, url=spec.url, models=self.models, type=spec.type,
                      connection=spec.connection,
                      weight=spec.weight, labels=spec.labels, shard=spec.shard,
                      healthy=self.healthy and self.discovered, health_reason=self.reason,
                      quota_rpm=spec.quota.requests_per_minute if spec.quota else 0,
                      quota_tpm=spec.quota.tokens_per_minute if spec.quota else 0)


class Fleet:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.states: dict[Key, WorkerState] = {}
        self._free: list[int] = []
        self._next_slot = 0
        self.notices: list[str] = []
        self._rings = topology.RingCache()

    def apply(self, specs: Iterable[WorkerSpec]) -> tuple[list[str], list[str]]:
        """Make the fleet equal to ``specs``; returns (added, removed) URLs."""
        wanted = {spec_key(s): s for s in specs}
        removed = [k for k in self.states if k not in wanted]
        for key in removed:
            heapq.heappush(self._free, self.states.pop(key).slot)
        added = []
        for key, spec in wanted.items():
            state = self.states.get(key)
            if state is None:
                self.states[key] = WorkerState(spec, self._allocate(spec.url))
                added.append(spec.url)
            else:
                state.spec = spec
        return added, [k[0] for k in removed]

    def _allocate(self, url: str) -> int:
        if self._free:
            return heapq.heappop(self._free)
        if self._next_slot >= self.capacity:
            raise FleetFull(f"cannot add {url}: all max_workers={self.capacity} slots are in use")
        self._next_slot += 1
        return self._next_slot - 1

    def snapshot(self, settings: Settings, models: dict[str, ModelPolicy], proxies: int,
                 generation: int, coordinator_pid: int,
                 aliases: dict[str, dict[str, float]] | None = None) -> Snapshot:
        workers = tuple(sorted((s.to_worker() for s in self.states.values()), key=lambda w: w.slot))
        index: dict[str, list[int]] = {}
        for w in workers:
            for model in w.models:
                index.setdefault(model, []).append(w.slot)
        shards = topology.model_shards(workers)
        snapshot = Snapshot(generation=generation, created_at=time.time(), coordinator_pid=coordinator_pid,
                            proxies=proxies, settings=settings, workers=workers,
                            models={m: tuple(slots) for m, slots in index.items()},
                            model_policies=models, notices=tuple(self.notices),
                            routers=topology.assign_routers(workers), shards=shards,
                            rings=self._rings.rings(workers, shards), aliases=aliases or {})
        check_consistent(snapshot)
        return snapshot


def check_consistent(snapshot: Snapshot) -> None:
    """Refuse to publish a snapshot whose indexes point nowhere (a bug, never an input error)."""
    slots = {w.slot for w in snapshot.workers}
    if len(slots) != len(snapshot.workers):
        raise AssertionError("two workers share a slot")
    for model, members in snapshot.models.items():
        missing = set(members) - slots
        if missing:
            raise AssertionError(f"model {model} lists unknown slots {sorted(missing)}")
    for alias in snapshot.aliases:
        if alias in snapshot.models:
            raise AssertionError(f"alias {alias} shadows a model of the same name")
