"""Worker membership: who is in the fleet, in which slot, serving what, and how healthy.

Role: the coordinator's model of the fleet, and the only place a :class:`shm.schema.Snapshot` is
assembled from it.

Invariants:
- A worker keeps its slot for as long as it stays in the fleet (a re-read config that changes
  its weight or labels keeps the slot, so its load-board counters carry on). New workers get
  fresh slots; freed slots are reused (lowest first) only once the capacity is exhausted.
- The slot capacity is the ``max_workers`` setting (the load board's width); adding a worker
  beyond it is refused with a clear error instead of corrupting another worker's counters.
- A snapshot is built whole from this state and checked before it is published.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from coordinator.fleet import topology
from shm.keys import upstream_ref
from shm.schema import ModelPolicy, Snapshot, Worker, WorkerSpec
from shm.settings import Settings

if TYPE_CHECKING:
    from coordinator.fleet.passive_state import PassiveState

Key = tuple[str, str | None, str]
RAMP_SCALE = 10  # slow start moves in tenths of a worker's weight


def spec_key(spec: WorkerSpec) -> Key:
    return (spec.url, spec.model, spec.type)


class FleetFull(Exception):
    status = 507


class WorkerState:
    """What the coordinator knows about one worker."""

    __slots__ = ("discovered", "draining", "eject_reason", "ejected", "fails", "healthy", "last_check",
                 "models", "models_read_at", "passes", "passive", "ramp_armed", "ramp_from", "reason", "slot",
                 "source", "spec")

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
        self.last_check = 0.0  # monotonic time of the last health check or discovery attempt
        self.models_read_at = 0.0  # monotonic time models were last read (workers without a model)
        # Passive health (coordinator.health.passive): ejected workers are published unhealthy.
        self.ejected = False
        self.eject_reason = ""
        self.passive: PassiveState | None = None  # made by coordinator.health.passive on first sample
        # Slow start: armed when the worker should ramp the next time it becomes routable;
        # ramp_from is the monotonic time the ramp began (0: not ramping).
        self.ramp_armed = False
        self.ramp_from = 0.0
        self.draining = False  # admin drain: published as draining, leaves once idle
        self.source = ""       # the discovery source it came from (coordinator.discovery.sources)

    def record(self, ok: bool, reason: str, fall: int, rise: int) -> bool:
        """Count one check result; True when the health state flipped."""
        if ok:
            self.fails, self.passes = 0, self.passes + 1
            if not self.healthy and self.passes >= rise:
                self.healthy, self.reason = True, ""
                self.ramp_armed = True  # a recovered worker takes its share back gradually
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

    def routable(self) -> bool:
        """Healthy by every check, models known, not ejected and not draining."""
        return self.healthy and self.discovered and not self.ejected and not self.draining

    def to_worker(self, weight: int | None = None) -> Worker:
        spec = self.spec
        reason = self.reason or (self.eject_reason if self.ejected else "")
        return Worker(slot=self.slot, url=spec.url, models=self.models, type=spec.type,
                      connection=spec.connection,
                      weight=spec.weight if weight is None else weight, labels=spec.labels,
                      shard=spec.shard,
                      healthy=self.healthy and self.discovered and not self.ejected,
                      draining=self.draining, health_reason=reason,
                      quota_rpm=spec.quota.requests_per_minute if spec.quota else 0,
                      quota_tpm=spec.quota.tokens_per_minute if spec.quota else 0,
                      bootstrap_port=spec.bootstrap_port,
                      ejected=self.ejected, max_concurrency=spec.max_concurrency,
                      api_key_ref=upstream_ref(spec.api_key_env, spec.api_key_file))


class Fleet:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.states: dict[Key, WorkerState] = {}
        self._free: list[int] = []
        self._next_slot = 0
        self.notices: list[str] = []
        self.sources: dict[str, str] = {}
        # Set once the first snapshot is out: workers that join later get a slow start.
        self.started = False
        self._rings = topology.RingCache()
        self._ramps: dict[int, int] = {}  # slot -> slow-start step (1..9 tenths) last published
        # Model -> its index in the load board's per-model figures (Snapshot.model_index): kept
        # for the coordinator's life, so a model that leaves and comes back keeps its series.
        self.model_index: dict[str, int] = {}

    def apply(self, specs: Iterable[WorkerSpec]) -> tuple[list[str], list[str]]:
        """Make the fleet equal to ``specs``; returns (added, removed) URLs."""
        wanted = {spec_key(s): s for s in specs}
        removed = [k for k in self.states if k not in wanted]
        new = sum(1 for k in wanted if k not in self.states)
        free = len(self._free) + len(removed) + self.capacity - self._next_slot
        if new > free:
            # Checked before anything changes: a refused apply leaves the fleet as it was.
            raise FleetFull(f"cannot add {new} worker(s): only {free} of max_workers={self.capacity} "
                            "slots are free")
        for key in removed:
            heapq.heappush(self._free, self.states.pop(key).slot)
        added = []
        for key, spec in wanted.items():
            state = self.states.get(key)
            if state is None:
                state = self.states[key] = WorkerState(spec, self._allocate(spec.url))
                state.ramp_armed = self.started
                added.append(spec.url)
            else:
                state.spec = spec
        return added, [k[0] for k in removed]

    def _allocate(self, url: str) -> int:
        # Fresh slots first: a reused slot carries its previous worker's counters until every
        # proxy notices the new URL and resets its own cell (proxy_workers.serving.protocol).
        if self._next_slot < self.capacity:
            self._next_slot += 1
            return self._next_slot - 1
        if self._free:
            return heapq.heappop(self._free)
        raise FleetFull(f"cannot add {url}: all max_workers={self.capacity} slots are in use")

    def snapshot(self, settings: Settings, models: dict[str, ModelPolicy], proxies: int,
                 generation: int, coordinator_pid: int,
                 aliases: dict[str, dict[str, float]] | None = None) -> Snapshot:
        """The snapshot to publish next, checked whole.

        Not a pure read: it advances the slow-start ramps to now, remembers their steps (what
        :meth:`advance_ramps` compares with) and marks the fleet started (later joiners ramp).
        """
        ramps = self._step_ramps(time.monotonic(), settings.slow_start)
        self._ramps = ramps
        if ramps:
            # Worker.weight is an int, so while anything ramps every weight is scaled by
            # RAMP_SCALE and a ramping worker gets its tenth-steps of that: ratios are kept.
            weights = {s.slot: (s.spec.weight * ramps[s.slot] if s.slot in ramps
                                else s.spec.weight * RAMP_SCALE) for s in self.states.values()}
            workers = tuple(sorted((s.to_worker(weights[s.slot]) for s in self.states.values()),
                                   key=lambda w: w.slot))
        else:
            workers = tuple(sorted((s.to_worker() for s in self.states.values()), key=lambda w: w.slot))
        index: dict[str, list[int]] = {}
        for w in workers:
            for model in w.models:
                index.setdefault(model, []).append(w.slot)
        shards = topology.model_shards(workers)
        self._index_models(index, settings.max_models)
        snapshot = Snapshot(generation=generation, created_at=time.time(), coordinator_pid=coordinator_pid,
                            proxies=proxies, settings=settings, workers=workers,
                            models={m: tuple(slots) for m, slots in index.items()},
                            model_policies=models, notices=tuple(self.notices),
                            routers=topology.assign_routers(workers), shards=shards,
                            rings=self._rings.rings(workers, shards, self._base_weights() if ramps else None),
                            aliases=aliases or {}, sources=dict(self.sources),
                            model_index=dict(self.model_index))
        check_consistent(snapshot)
        self.started = True
        return snapshot

    def _index_models(self, models: dict[str, list[int]], max_models: int) -> None:
        """Give each newly seen model the next free index (1..max_models); past the cap, none."""
        known = self.model_index
        for model in sorted(models):
            if model not in known and len(known) < max_models:
                known[model] = len(known) + 1

    def _base_weights(self) -> dict[int, int]:
        # Rings use configured weights: a slow start must not move keys between workers.
        return {s.slot: s.spec.weight for s in self.states.values()}

    def _step_ramps(self, now: float, slow_start: float) -> dict[int, int]:
        """Move every ramp to ``now``; slot -> weight in tenths (1..9) of the workers still ramping.

        Mutates: an armed worker that is routable starts its ramp here, a finished ramp ends here.
        """
        steps: dict[int, int] = {}
        if slow_start <= 0:
            return steps  # (arms left set are harmless: nothing ramps while this is off)
        for s in self.states.values():
            if s.ramp_armed and s.routable():
                s.ramp_armed, s.ramp_from = False, now
            if s.ramp_from:
                step = int((now - s.ramp_from) / slow_start * RAMP_SCALE) + 1
                if step >= RAMP_SCALE:
                    s.ramp_from = 0.0
                else:
                    steps[s.slot] = step
        return steps

    def advance_ramps(self, now: float, slow_start: float) -> bool:
        """Advance the slow-start ramps to ``now`` (starting armed ones, ending finished ones).

        True when a worker's step differs from the last snapshot's: time to publish.
        """
        return self._step_ramps(now, slow_start) != self._ramps


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
