"""Load-balancing policies: one small class each, behind one interface.

Role: given a model's routable workers, pick one. Policies run inside a proxy process on every
request, so ``pick`` must be O(1) or O(candidates) with tiny constants and must never block.
This module holds the interface, the environment every policy sees, and the simple policies;
the hashing, affinity and measured-load families live in ``policies_hash``, ``policies_affinity``
and ``policies_load``, and ``policy_registry`` maps names to classes.

Interface: ``pick(route, candidates, ctx) -> Worker``. ``route`` is the model's
:class:`proxy_workers.routing.ModelRoute` (its ring and full candidate list); ``candidates`` is
what may be chosen now (``route.candidates``, or fewer on a retry); ``ctx`` is the request's
:class:`proxy_workers.context.RequestContext`, where a policy notes its reason and scores.

Invariants:
- ``candidates`` is non-empty and holds only healthy, non-draining workers; the caller filters.
- Load figures come from the shared-memory board summed over all proxies, so "least
  connections" is least across the whole router, not within one process.
- A policy object lives across snapshot changes (round-robin position and smooth-weight credits
  survive a publish); state about a worker is keyed by its stable slot.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from shm.loadboard import W_IN_FLIGHT, WORKER_FIELDS, LoadBoard
from shm.settings import Settings

if TYPE_CHECKING:
    from proxy_workers.context import RequestContext
    from proxy_workers.routing import ModelRoute
    from shm.affinity import AffinityTable
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


class PolicyEnv:
    """What every policy of one proxy process shares; refreshed on each snapshot."""

    __slots__ = ("affinity", "board", "load", "proxies", "proxy", "settings")

    def __init__(self, board: LoadBoard, proxy: int, proxies: int, settings: Settings,
                 affinity: AffinityTable | None = None) -> None:
        self.board = board
        self.proxy = proxy
        self.proxies = max(1, proxies)
        self.settings = settings
        self.affinity = affinity
        self.load = LoadView(board, proxies)

    def update(self, proxies: int, settings: Settings) -> None:
        self.proxies = max(1, proxies)
        self.settings = settings
        self.load.set_proxies(proxies)


def least_loaded_of(candidates: Sequence[Worker], load: LoadView,
                    rng: random.Random | None = None) -> Worker:
    """Fewest global in-flight requests per unit of weight.

    A tie goes to the first candidate, or, with ``rng``, to the first from a random starting
    point: new sessions and cold prompts on an idle fleet then spread instead of all landing on
    the first worker.
    """
    in_flight = load.in_flight
    n = len(candidates)
    start = int(rng.random() * n) if rng is not None and n > 1 else 0
    best, best_load = candidates[start], None
    for i in range(n):
        w = candidates[(start + i) % n]
        score = in_flight(w.slot) / w.weight
        if best_load is None or score < best_load:
            best, best_load = w, score
    return best


class Policy:
    """Base class. Subclasses set ``name`` and implement ``pick``."""

    name = ""
    needs_prompt = False  # True: the context decodes the prompt text for this policy

    def __init__(self, env: PolicyEnv, rng: random.Random | None = None) -> None:
        self.env = env
        self.rng = rng or random.Random()

    def pick(self, route: ModelRoute, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        raise NotImplementedError


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, env: PolicyEnv, rng: random.Random | None = None) -> None:
        super().__init__(env, rng)
        # Start each process at a different place so N proxies don't move in lockstep.
        self._next = self.rng.randrange(1 << 16)

    def pick(self, route: ModelRoute, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        self._next += 1
        ctx.reason = ctx.reason or "next worker in turn"
        return candidates[self._next % len(candidates)]


class WeightedRoundRobin(RoundRobin):
    """Smooth weighted round-robin (nginx): spreads a heavy worker's turns evenly.

    With equal weights it is plain round-robin, which is O(1) instead of O(n).
    """

    name = "weighted_round_robin"

    def __init__(self, env: PolicyEnv, rng: random.Random | None = None) -> None:
        super().__init__(env, rng)
        self._current: dict[int, int] = {}
        self._seen: Sequence[Worker] | None = None
        self._uniform = True

    def pick(self, route: ModelRoute, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        if candidates is not self._seen:
            # Candidate lists are built once per snapshot, so this check runs once per publish.
            first = candidates[0].weight
            self._uniform = all(w.weight == first for w in candidates)
            self._seen = candidates
        ctx.reason = ctx.reason or "smooth weighted round-robin"
        if self._uniform:
            self._next += 1
            return candidates[self._next % len(candidates)]
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

    def pick(self, route: ModelRoute, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        ctx.reason = "uniformly random"
        return candidates[int(self.rng.random() * len(candidates))]


class WeightedRandom(Policy):
    name = "weighted_random"

    def pick(self, route: ModelRoute, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        ctx.reason = "random in proportion to weight"
        return self.rng.choices(candidates, weights=[w.weight for w in candidates])[0]


class LeastConnections(Policy):
    """Fewest in-flight requests across all proxies (÷ weight); ties rotate."""

    name = "least_connections"

    def __init__(self, env: PolicyEnv, rng: random.Random | None = None) -> None:
        super().__init__(env, rng)
        self._start = 0

    def pick(self, route: ModelRoute, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        n = len(candidates)
        self._start = (self._start + 1) % n
        in_flight = self.env.load.in_flight
        best, best_load = candidates[self._start], None
        for i in range(n):
            w = candidates[(self._start + i) % n]
            load = in_flight(w.slot) / w.weight
            if best_load is None or load < best_load:
                best, best_load = w, load
        if ctx.scores is not None:
            ctx.scores["in_flight"] = {w.url: in_flight(w.slot) for w in candidates[:64]}
        ctx.reason = "fewest in-flight requests across all proxies"
        return best


class PowerOfTwo(Policy):
    """Two distinct random candidates; the one with fewer in-flight requests (÷ weight) wins."""

    name = "power_of_two"

    def pick(self, route: ModelRoute, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        n = len(candidates)
        ctx.reason = "less loaded of two random workers"
        if n == 1:
            return candidates[0]
        rand = self.rng.random
        i = int(rand() * n)
        a = candidates[i]
        # The second draw skips the first: two equal draws would send to a busy worker unopposed.
        b = candidates[(i + 1 + int(rand() * (n - 1))) % n]
        in_flight = self.env.load.in_flight
        la, lb = in_flight(a.slot), in_flight(b.slot)
        if ctx.scores is not None:
            ctx.scores["in_flight"] = {a.url: la, b.url: lb}
        return a if la * b.weight <= lb * a.weight else b
