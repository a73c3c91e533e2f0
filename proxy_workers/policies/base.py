"""Load-balancing policies: one small class each, behind one interface.

Role: given a model's routable workers, pick one. Policies run inside a proxy process on every
request, so ``pick`` must be O(1) or O(candidates) with tiny constants and must never block.
This module holds the interface, the environment every policy sees, and the simple policies;
the hashing, affinity and measured-load families live in ``hashing``, ``affinity`` and ``load``,
and ``registry`` maps names to classes.

Interface: ``pick(route, candidates, ctx) -> Worker``. ``route`` is what a policy sees of the
model's route (:class:`RouteView`, implemented by :class:`proxy_workers.routing.table.ModelRoute`:
its ring and full candidate list; policies never import routing, routing imports them); ``candidates`` is
what may be chosen now (``route.candidates``, or fewer on a retry); ``ctx`` is the request's
:class:`proxy_workers.routing.context.RequestContext`, where a policy notes its reason and scores.

Invariants:
- ``candidates`` is non-empty and holds only healthy, non-draining workers; the caller filters.
- Load figures come from the shared-memory board summed over all proxies, so "least
  connections" is least across the whole router, not within one process.
- A policy object lives across snapshot changes (round-robin position and smooth-weight credits
  survive a publish); state about a worker is keyed by its stable slot.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate
from math import gcd
from typing import TYPE_CHECKING, ClassVar, Protocol

from proxy_workers.policies.native import affinity_ops
from proxy_workers.policies.scan import Columns, Figure, columns_for, in_flight_figure
from shm.loadboard import W_IN_FLIGHT, WORKER_FIELDS, LoadBoard
from shm.settings import Settings

if TYPE_CHECKING:
    from proxy_workers.routing.context import RequestContext
    from shm.affinity import AffinityTable
    from shm.hashing import RingView
    from shm.schema import Worker


class LoadView:
    """Read-only view of the load board for policies: global in-flight per worker slot.

    A slot's cells are ``stride`` words apart from one proxy to the next; the offsets of proxies
    1.. are kept as a tuple (rebuilt when the proxy count changes), so a read is a loop over it.
    """

    __slots__ = ("_ints", "_offsets", "_stride", "_word0")

    def __init__(self, board: LoadBoard, proxies: int) -> None:
        self._ints = board.ints
        self._word0 = board.cell_word(0, 0, W_IN_FLIGHT)
        self._stride = board.worker_stride()
        self._offsets: tuple[int, ...] = ()
        self.set_proxies(proxies)

    def set_proxies(self, proxies: int) -> None:
        self._offsets = tuple(p * self._stride for p in range(1, max(1, proxies)))

    def pair(self, a: int, b: int) -> tuple[int, int]:
        """Global in-flight of two slots in one call."""
        ints = self._ints
        wa, wb = self._word0 + a * WORKER_FIELDS, self._word0 + b * WORKER_FIELDS
        la, lb = ints[wa], ints[wb]
        for off in self._offsets:
            la += ints[wa + off]
            lb += ints[wb + off]
        return la, lb

    def in_flight(self, slot: int) -> int:
        ints = self._ints
        word = self._word0 + slot * WORKER_FIELDS
        total = ints[word]
        for off in self._offsets:
            total += ints[word + off]
        return total


class PolicyEnv:
    """What every policy of one proxy process shares; refreshed on each snapshot."""

    __slots__ = ("_columns", "affinity", "board", "load", "proxies", "proxy", "settings")

    def __init__(self, board: LoadBoard, proxy: int, proxies: int, settings: Settings,
                 affinity: AffinityTable | None = None) -> None:
        self.board = board
        self.proxy = proxy
        self.proxies = max(1, proxies)
        self.settings = settings
        self.affinity = affinity_ops(affinity)
        self.load = LoadView(board, proxies)
        self._columns: dict[int, Columns] = {}

    def update(self, proxies: int, settings: Settings) -> None:
        self.proxies = max(1, proxies)
        self.settings = settings
        self.load.set_proxies(proxies)
        self._columns.clear()  # candidate lists are rebuilt with every snapshot

    def columns(self, candidates: Sequence[Worker]) -> Columns:
        """Columns for a candidate list, built once per list (per snapshot for route lists)."""
        cols = self._columns.get(id(candidates))
        if cols is None or cols.candidates is not candidates:
            if len(self._columns) > 4096:  # retries make throwaway lists; keep the cache bounded
                self._columns.clear()
            cols = self._columns[id(candidates)] = Columns(self, candidates)
        return cols


class RouteView(Protocol):
    """What a policy sees of a model's route."""

    model: str
    candidates: list[Worker]  # every routable worker (a retry passes fewer as ``candidates``)
    by_slot: dict[int, Worker]
    ring: RingView | None
    ring_workers: list[Worker | None]
    shard_workers: list[list[Worker]]


class Policy:
    """Base class. Subclasses set ``name`` and implement ``pick``."""

    # ClassVar: read on the classes themselves (policies.registry); compiled, a plain class-body
    # value would be an instance attribute's default instead.
    name: ClassVar[str] = ""
    index = 0  # column of the decision counters (policy_registry.POLICY_INDEX)

    def __init__(self, env: PolicyEnv, rng: random.Random | None = None) -> None:
        self.env = env
        self.rng = rng or random.Random()

    def pick(self, route: RouteView, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        raise NotImplementedError

    def columns(self, route: RouteView, candidates: Sequence[Worker]) -> Columns:
        """Board columns over ``candidates`` (exact, or sampled for long lists: see ``scan``)."""
        if candidates is route.candidates:  # the common case, without the search of ``_stable``
            return self.env.columns(candidates)
        return columns_for(self.env, candidates, _stable(route, candidates), self.rng)

    def least_loaded(self, route: RouteView, candidates: Sequence[Worker]) -> Worker:
        """Fewest global in-flight requests per unit of weight.

        A tie goes to the first from a random starting point: new sessions and cold prompts on
        an idle fleet then spread instead of all landing on the first worker.
        """
        cols = self.columns(route, candidates)
        return candidates[cols.argmin(cols.flight, self.rng)[0]]


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, env: PolicyEnv, rng: random.Random | None = None) -> None:
        super().__init__(env, rng)
        # Start each process at a different place so N proxies don't move in lockstep.
        self._next = self.rng.randrange(1 << 16)

    def pick(self, route: RouteView, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        self._next += 1
        ctx.reason = ctx.reason or "next worker in turn"
        return candidates[self._next % len(candidates)]


SCHEDULE_EXACT_LIMIT = 200_000


def smooth_schedule(weights: Sequence[int]) -> list[int]:
    """Indexes in smooth weighted round-robin order, one full cycle.

    The exact nginx sequence costs O(n x total weight) to build, so it is used while that stays
    under ``SCHEDULE_EXACT_LIMIT``; larger fleets get rounds (round r lists every worker whose
    weight exceeds r), which gives every worker the same share with coarser interleaving.
    """
    divisor = 0
    for w in weights:
        divisor = gcd(divisor, w)
    ws = [w // (divisor or 1) for w in weights]
    total = sum(ws)
    if len(ws) * total <= SCHEDULE_EXACT_LIMIT:
        current = [0] * len(ws)
        order = []
        for _ in range(total):
            for i, w in enumerate(ws):
                current[i] += w
            best = current.index(max(current))
            current[best] -= total
            order.append(best)
        return order
    return [i for r in range(max(ws)) for i, w in enumerate(ws) if w > r]


class WeightedRoundRobin(RoundRobin):
    """Smooth weighted round-robin (nginx): spreads a heavy worker's turns evenly.

    The cycle is built once per candidate list (once per publish), so a pick is O(1) whatever
    the weights; with equal weights it is plain round-robin.
    """

    name = "weighted_round_robin"

    def __init__(self, env: PolicyEnv, rng: random.Random | None = None) -> None:
        super().__init__(env, rng)
        # id(list) -> (list, cycle): the route's list and, for sharded models, each shard's.
        self._orders: dict[int, tuple[Sequence[Worker], list[Worker]]] = {}

    def pick(self, route: RouteView, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        ctx.reason = ctx.reason or "smooth weighted round-robin"
        self._next += 1
        cached = self._orders.get(id(candidates))
        if cached is None or cached[0] is not candidates:
            if not _stable(route, candidates):
                # A retry's shortened list: a weighted draw, leaving the cycles alone.
                return self.rng.choices(candidates, weights=[w.weight for w in candidates])[0]
            if len(self._orders) > 256:
                self._orders.clear()
            cached = self._orders[id(candidates)] = (candidates, _cycle(candidates))
        order = cached[1]
        return order[self._next % len(order)]


def _stable(route: RouteView, candidates: Sequence[Worker]) -> bool:
    """True for lists that live as long as the snapshot: the route's, or one of its shards'."""
    return candidates is route.candidates or any(candidates is s for s in route.shard_workers)


def _cycle(candidates: Sequence[Worker]) -> list[Worker]:
    first = candidates[0].weight
    if all(w.weight == first for w in candidates):
        return list(candidates)
    return [candidates[i] for i in smooth_schedule([w.weight for w in candidates])]


class Random(Policy):
    name = "random"

    def pick(self, route: RouteView, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        ctx.reason = "uniformly random"
        return candidates[int(self.rng.random() * len(candidates))]


class WeightedRandom(Policy):
    name = "weighted_random"

    def __init__(self, env: PolicyEnv, rng: random.Random | None = None) -> None:
        super().__init__(env, rng)
        self._seen: Sequence[Worker] | None = None
        self._cumulative: list[int] = []

    def pick(self, route: RouteView, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        ctx.reason = "random in proportion to weight"
        if candidates is not self._seen:
            self._cumulative = list(accumulate(w.weight for w in candidates))
            self._seen = candidates
        cumulative = self._cumulative
        return candidates[bisect_right(cumulative, self.rng.random() * cumulative[-1])]


class LeastConnections(Policy):
    """Fewest in-flight requests across all proxies (÷ weight); ties rotate. Exact up to
    ``scan.EXACT_LIMIT`` candidates, the best of ``scan.SAMPLE`` random ones beyond."""

    name = "least_connections"

    def __init__(self, env: PolicyEnv, rng: random.Random | None = None) -> None:
        super().__init__(env, rng)
        self._start = 0

    def pick(self, route: RouteView, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        self._start += 1
        cols = self.columns(route, candidates)
        best, _ = cols.argmin(cols.flight, self.rng, self._start)
        if ctx.scores is not None:
            ctx.scores["in_flight"] = {w.url: self.env.load.in_flight(w.slot) for w in candidates[:64]}
        ctx.reason = "fewest in-flight requests across all proxies"
        return candidates[best]


class PowerOfTwo(Policy):
    """Two distinct random candidates; the one with fewer in-flight requests (÷ weight) wins.

    For the route's candidates the pair is compared by one call on an in-flight figure of the
    list (``scan.in_flight_figure``, rebuilt when the snapshot changes the list): four board
    words and two weight factors, no ``Worker`` objects scattered over the heap (at 10,000
    workers those misses cost more than the rest of the pick). A shard's or a retry's list, and
    an explained pick (which shows both loads), are read through their workers: indexing shard
    lists would rebuild the figure whenever consecutive requests go to different shards.
    """

    name = "power_of_two"

    def __init__(self, env: PolicyEnv, rng: random.Random | None = None) -> None:
        super().__init__(env, rng)
        self._list: Sequence[Worker] | None = None
        self._figure: Figure | None = None

    def pick(self, route: RouteView, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        n = len(candidates)
        ctx.reason = "less loaded of two random workers"
        if n == 1:
            return candidates[0]
        rand = self.rng.random
        i = int(rand() * n)
        # The second draw skips the first: two equal draws would send to a busy worker unopposed.
        j = (i + 1 + int(rand() * (n - 1))) % n
        if candidates is not route.candidates or ctx.scores is not None:
            return self._less_loaded(candidates[i], candidates[j], ctx)
        figure = self._figure
        if candidates is not self._list or figure is None:
            figure = self._figure = in_flight_figure(self.env, candidates)
            self._list = candidates
        return candidates[figure.lower(i, j)]

    def _less_loaded(self, a: Worker, b: Worker, ctx: RequestContext) -> Worker:
        la, lb = self.env.load.pair(a.slot, b.slot)
        if ctx.scores is not None:
            ctx.scores["in_flight"] = {a.url: la, b.url: lb}
        return a if la * b.weight <= lb * a.weight else b
