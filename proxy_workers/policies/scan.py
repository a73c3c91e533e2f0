"""Load figures over a candidate list, for the policies that compare workers: exact scans of
small lists, samples of large ones.

Role: ``least_connections``, ``least_latency``, ``least_loaded``, new assignments of
``session_affinity`` and ``cache_aware``, cache_aware's balance check and
``consistent_hash_bounded``'s load bound all ask "which candidate scores lowest" (or the total).
:class:`Columns` answers with one C-level read per proxy and field (``operator.itemgetter`` over
the board's words: a few tens of ns per worker, against ~230 ns for a Python call per worker).

Invariants:
- Every figure is global: in-flight counts and TTFB EWMAs are summed over all proxies' cells of
  the load board when read; engine figures are the coordinator's single copy. Nothing is cached
  between decisions but the word indexes, so every proxy reads the same numbers.
- A list of at most ``EXACT_LIMIT`` candidates is scanned whole: the answer is the exact argmin
  (ties go to the first from a caller-chosen start, so an idle fleet is spread over).
- A longer list is split once per list (once per snapshot for a route's list) into blocks of
  ``BLOCK`` candidates in a shuffled order; a decision reads two distinct random blocks and takes
  the lowest of those ``SAMPLE`` candidates (best of d random choices, d = 64). Reading a whole
  10,000-worker column costs ~0.7 ms in Python and ~35-110 us even in numpy (each worker's cell
  is its own cache line), the whole budget 20 times over; the best of 64 is the exact minimum
  whenever at least 1 in 64 workers share it, and otherwise a worker close to it (the
  power-of-d-choices result: the maximum load falls as ln ln n / ln d).
- Lists that live only for one request (a retry's, without the workers already tried) are not
  split: a long one is sampled directly (``SAMPLE`` random candidates, per-slot reads).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from itertools import pairwise
from operator import add, itemgetter, truediv
from typing import TYPE_CHECKING, Any

from shm.loadboard import E_RUNNING, E_WAITING, W_IN_FLIGHT, W_TTFB_EWMA

if TYPE_CHECKING:
    from proxy_workers.policies.base import PolicyEnv
    from shm.schema import Worker

EXACT_LIMIT = 256
BLOCK = 32
SAMPLE = 2 * BLOCK
_SHUFFLE_SEED = 0x5EED  # the same block split in every proxy (not needed for correctness: tidy)


def _getter(words: list[int]) -> Callable[[Any], tuple]:
    """An itemgetter that always returns a tuple (itemgetter of one index returns the item)."""
    if len(words) == 1:
        one = words[0]
        return lambda seq: (seq[one],)
    return itemgetter(*words)


class Block:
    """Getters over a fixed set of candidates: the whole list, or one block of a long one.

    ``index[k]`` is the position in the candidate list of the block's k-th worker.
    """

    __slots__ = ("_engine", "_in_flight", "_ttfb", "floats", "index", "ints", "weights")

    def __init__(self, env: PolicyEnv, workers: Sequence[Worker], index: list[int]) -> None:
        board = env.board
        stride = board.worker_stride()
        base = [board.cell_word(0, w.slot) for w in workers]
        self.index = index
        self.ints, self.floats = board.ints, board.floats
        proxies = range(env.proxies)
        self._in_flight = [_getter([b + p * stride + W_IN_FLIGHT for b in base]) for p in proxies]
        self._ttfb = [_getter([b + p * stride + W_TTFB_EWMA for b in base]) for p in proxies]
        engine = [board.engine_word(w.slot) for w in workers]
        self._engine = tuple(_getter([e + f for e in engine]) for f in (E_RUNNING, E_WAITING))
        self.weights = [w.weight for w in workers]

    def loads(self) -> list[int]:
        """Global in-flight per worker (summed over proxies)."""
        ints = self.ints
        getters = self._in_flight
        total: Any = getters[0](ints)
        for g in getters[1:]:
            total = map(add, total, g(ints))
        return list(total)

    def weighted_loads(self) -> list[float]:
        return list(map(truediv, self.loads(), self.weights))

    def ttfb_sums(self) -> list[float]:
        """Time-to-first-byte EWMAs summed over proxies (0.0 where nobody measured yet).

        Summing instead of averaging keeps this to one C-level read per proxy; once every
        proxy has measured every worker the order is the same as the mean's.
        """
        floats = self.floats
        total: Any = self._ttfb[0](floats)
        for g in self._ttfb[1:]:
            total = map(add, total, g(floats))
        return list(total)

    def engine_queue(self) -> list[int]:
        """Engine running + waiting + router in-flight per worker (the last two correct for
        requests sent since the last scrape)."""
        running, waiting = self._engine
        ints = self.ints
        return list(map(add, map(add, running(ints), waiting(ints)), self.loads()))

    def weighted_engine_queue(self) -> list[float]:
        return list(map(truediv, self.engine_queue(), self.weights))


Score = Callable[[Block], list[Any]]


class Columns:
    """Board columns over one candidate list: the whole list as one block, or blocks to sample."""

    __slots__ = ("blocks", "candidates", "exact", "whole")

    def __init__(self, env: PolicyEnv, candidates: Sequence[Worker],
                 positions: list[int] | None = None) -> None:
        """``positions``: scan only these candidates, exactly (a one-off sample of a retry's list)."""
        self.candidates = candidates
        n = len(candidates)
        self.exact = positions is not None or n <= EXACT_LIMIT
        if self.exact:
            index = list(range(n)) if positions is None else positions
            self.whole = Block(env, [candidates[i] for i in index], index)
            self.blocks = [self.whole]
            return
        order = list(range(n))
        random.Random(_SHUFFLE_SEED).shuffle(order)
        # n // BLOCK blocks; the remainder joins the last, so every block holds >= BLOCK workers.
        cuts = [i * BLOCK for i in range(n // BLOCK)] + [n]
        self.blocks = [Block(env, [candidates[i] for i in order[a:b]], order[a:b])
                       for a, b in pairwise(cuts)]
        self.whole = self.blocks[0]  # unused for sampled lists; set for type stability

    def scanned(self, rng: random.Random) -> tuple[Block, ...]:
        """The blocks a decision reads: the whole list, or two distinct random blocks."""
        if self.exact:
            return (self.whole,)
        blocks = self.blocks
        nb = len(blocks)
        i = int(rng.random() * nb)
        return blocks[i], blocks[(i + 1 + int(rng.random() * (nb - 1))) % nb]

    def argmin(self, score: Score, rng: random.Random, tie: int | None = None) -> tuple[int, Any]:
        """(position in the candidate list, score) of the lowest-scoring scanned candidate.

        On an exact scan a tie goes to the first from position ``tie`` (wrapping; random when
        None); a sample is in random order already, so its first lowest wins.
        """
        if self.exact:
            scores = score(self.whole)
            k = _first_min(scores, int(rng.random() * len(scores)) if tie is None else tie % len(scores))
            return self.whole.index[k], scores[k]
        a, b = self.scanned(rng)
        scores = score(a) + score(b)
        low = min(scores)
        k = scores.index(low)
        size = len(a.index)
        return (a.index[k] if k < size else b.index[k - size]), low

    def min_max_loads(self, rng: random.Random) -> tuple[int, int, int]:
        """(position of the least loaded, its load, the highest load) over the scanned candidates,
        by global in-flight (not weighted, as sglang's balance check)."""
        if self.exact:
            loads = self.whole.loads()
            k = _first_min(loads, int(rng.random() * len(loads)))
            return self.whole.index[k], loads[k], max(loads)
        a, b = self.scanned(rng)
        loads = a.loads() + b.loads()
        low = min(loads)
        k = loads.index(low)
        size = len(a.index)
        return (a.index[k] if k < size else b.index[k - size]), low, max(loads)

    def total_load(self, rng: random.Random) -> float:
        """Global in-flight summed over the candidates: exact, or scaled up from a sample of a
        long list."""
        if self.exact:
            return sum(self.whole.loads()) * len(self.candidates) // len(self.whole.index)
        total = count = 0
        for block in self.scanned(rng):
            total += sum(block.loads())
            count += len(block.index)
        return total * len(self.candidates) / count


def _first_min(scores: list[Any], start: int) -> int:
    """Index of the smallest score; among equals the first from ``start`` (wrapping)."""
    low = min(scores)
    try:
        return scores.index(low, start)
    except ValueError:
        return scores.index(low)


def columns_for(env: PolicyEnv, candidates: Sequence[Worker], stable: bool,
                rng: random.Random) -> Columns:
    """Columns for ``candidates``: built once for lists that live as long as the snapshot
    (``stable``: a route's, a shard's); a long one-request list gets a one-off sample."""
    if stable or len(candidates) <= EXACT_LIMIT:
        return env.columns(candidates)
    return Columns(env, candidates, rng.sample(range(len(candidates)), SAMPLE))
