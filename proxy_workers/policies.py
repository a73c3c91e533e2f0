"""Load-balancing policies: one small class each, behind one interface.

Role: given a model's routable workers, pick one. Policies run inside a proxy process on every
request, so ``pick`` must be O(1) or O(candidates) with tiny constants and must never block.

Invariants:
- ``candidates`` is non-empty and holds only healthy, non-draining workers; the caller filters.
- Load figures come from :class:`LoadView`, the shared-memory board summed over all proxies, so
  "least connections" is least across the whole router, not within one process.
- A policy object lives across snapshot changes (state such as round-robin position survives a
  publish); state keyed by worker is keyed by the worker's stable slot.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from shm.loadboard import W_IN_FLIGHT, WORKER_FIELDS, LoadBoard
from shm.schema import Worker


class LoadView:
    """Read-only view of the load board for policies: global in-flight per worker slot."""

    __slots__ = ("_ints", "_proxies", "_stride", "_word0")

    def __init__(self, board: LoadBoard, proxies: int) -> None:
        self._ints = board.ints
        self._word0 = board.cell_word(0, 0, W_IN_FLIGHT)
        self._stride = board.worker_stride()
        self._proxies = max(1, proxies)

    def set_proxies(self, proxies: int) -> None:
        self._proxies = max(1, proxies)

    def in_flight(self, slot: int) -> int:
        ints, stride = self._ints, self._stride
        word = self._word0 + slot * WORKER_FIELDS
        total = 0
        for p in range(self._proxies):
            total += ints[word + p * stride]
        return total


class Policy:
    """Base class. Subclasses set ``name`` and implement ``pick``."""

    name = ""

    def __init__(self, load: LoadView, rng: random.Random | None = None) -> None:
        self.load = load
        self.rng = rng or random.Random()

    def pick(self, candidates: Sequence[Worker]) -> Worker:
        raise NotImplementedError

    def scores(self, candidates: Sequence[Worker]) -> dict[str, float]:
        """What the policy weighed, for explanations (default: nothing)."""
        return {}


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, load: LoadView, rng: random.Random | None = None) -> None:
        super().__init__(load, rng)
        # Start each process at a different place so N proxies don't move in lockstep.
        self._next = self.rng.randrange(1 << 16)

    def pick(self, candidates: Sequence[Worker]) -> Worker:
        self._next += 1
        return candidates[self._next % len(candidates)]


class WeightedRoundRobin(RoundRobin):
    """Smooth weighted round-robin (nginx): spreads a heavy worker's turns evenly.

    With equal weights it is plain round-robin, which is O(1) instead of O(n).
    """

    name = "weighted_round_robin"

    def __init__(self, load: LoadView, rng: random.Random | None = None) -> None:
        super().__init__(load, rng)
        self._current: dict[int, int] = {}
        self._seen: Sequence[Worker] | None = None
        self._uniform = True

    def pick(self, candidates: Sequence[Worker]) -> Worker:
        if candidates is not self._seen:
            # Candidate lists are built once per snapshot, so this check runs once per publish.
            first = candidates[0].weight
            self._uniform = all(w.weight == first for w in candidates)
            self._seen = candidates
        if self._uniform:
            return super().pick(candidates)
        current, total, best, best_score = self._current, 0, candidates[0], None
        for w in candidates:
            score = current.get(w.slot, 0) + w.weight
            current[w.slot] = score
            total += w.weight
            if best_score is None or score > best_score:
                best, best_score = w, score
        current[best.slot] -= total
        return best


class Random(Policy):
    name = "random"

    def pick(self, candidates: Sequence[Worker]) -> Worker:
        return candidates[int(self.rng.random() * len(candidates))]


class WeightedRandom(Policy):
    name = "weighted_random"

    def pick(self, candidates: Sequence[Worker]) -> Worker:
        return self.rng.choices(candidates, weights=[w.weight for w in candidates])[0]


class LeastConnections(Policy):
    """Fewest in-flight requests across all proxies; ties broken by a rotating start."""

    name = "least_connections"

    def __init__(self, load: LoadView, rng: random.Random | None = None) -> None:
        super().__init__(load, rng)
        self._start = 0

    def pick(self, candidates: Sequence[Worker]) -> Worker:
        n = len(candidates)
        self._start = (self._start + 1) % n
        in_flight = self.load.in_flight
        best, best_load = candidates[self._start], None
        for i in range(n):
            w = candidates[(self._start + i) % n]
            load = in_flight(w.slot) / w.weight
            if best_load is None or load < best_load:
                best, best_load = w, load
        return best

    def scores(self, candidates: Sequence[Worker]) -> dict[str, float]:
        return {w.url: float(self.load.in_flight(w.slot)) for w in candidates}


class PowerOfTwo(Policy):
    """Two random candidates; the one with fewer in-flight requests wins."""

    name = "power_of_two"

    def pick(self, candidates: Sequence[Worker]) -> Worker:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        rand = self.rng.random
        a = candidates[int(rand() * n)]
        b = candidates[int(rand() * n)]
        in_flight = self.load.in_flight
        return a if in_flight(a.slot) * b.weight <= in_flight(b.slot) * a.weight else b


POLICIES: dict[str, Callable[..., Policy]] = {
    cls.name: cls
    for cls in (RoundRobin, WeightedRoundRobin, Random, WeightedRandom, LeastConnections, PowerOfTwo)
}


def make_policy(name: str, load: LoadView) -> Policy:
    try:
        return POLICIES[name](load)
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
