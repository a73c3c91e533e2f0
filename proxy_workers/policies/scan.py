"""Load figures over a candidate list, for the policies that compare workers: exact scans of
lists up to ``EXACT_LIMIT``, samples of longer ones, both in numpy over the shared-memory board.

Role: ``least_connections``, ``least_latency``, ``least_loaded``, new assignments of
``session_affinity`` and ``cache_aware``, cache_aware's balance check and
``consistent_hash_bounded``'s load bound all ask "which candidate scores lowest" (or the total).
:class:`Columns` answers with numpy over the board's words: index arrays built once per list
(per snapshot for a route's), then per decision one gather, a sum over the proxies' columns, a
multiplication by the weights' integer factors and an argmin: a handful of numpy calls whatever
the list's length up to ``EXACT_LIMIT``, each ~0.5-1 us on 100 values on a shared 2-core machine
(the whole pick: 7-9 us there, README "Performance"). In Python the reads alone cost ~25 ns per
worker and proxy (a memoryview item each).

Invariants:
- Every figure is global: in-flight counts and TTFB EWMAs are summed over all proxies' cells of
  the load board when read; engine figures are the coordinator's single copy. Nothing but slot
  indexes (as board word indexes) is kept between decisions, so every proxy reads the same numbers.
- Up to ``EXACT_LIMIT`` candidates the answer is the exact argmin; ties go to the first from a
  caller-chosen start (the list is stored twice over, so the scan from any start is one slice
  and argmin's first lowest is the first from there), so an idle fleet is spread over rather
  than piled onto the first worker. Weighted scores are integers (load x lcm / weight) while the
  weights' least common multiple is small, so equal ratios tie exactly.
- A longer list is put once (per list: per snapshot for a route's) in a shuffled order, which
  decisions sweep ``SAMPLE`` candidates at a time; each decision reads the next window and the
  ``MEMORY`` runners-up of the previous decision (re-read, so never stale) and takes the lowest:
  best of d choices with memory, which finds a worker that just freed up within n / SAMPLE
  decisions and keeps it until used. Reading a whole 10,000-worker column costs ~0.7 ms in
  Python and ~35-110 us in numpy (each worker's cell is its own cache line), 2-5x the whole
  decision budget. ``loadtest/policy_sampling.py`` measures the cost in load terms.
- Lists that live for one request (a retry's, without the workers already tried) are not put in
  order: a long one is sampled directly (``SAMPLE`` random candidates, scanned exactly).
- numpy is imported only by processes that make a scanning policy (:func:`load_numpy`).
- The numpy views export the board's mapping itself, not ``LoadBoard.ints``, so closing the
  board still works; the mapping is unmapped when the last view goes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from functools import lru_cache
from math import lcm
from typing import TYPE_CHECKING, Any, Protocol

from shm.loadboard import (
    E_RUNNING,
    E_WAITING,
    ENGINE_FIELDS,
    W_IN_FLIGHT,
    W_TTFB_EWMA,
    WORKER_FIELDS,
    LoadBoard,
)

if TYPE_CHECKING:
    import numpy as np

    from shm.schema import Worker
else:
    np = None  # imported by load_numpy()

class ScanEnv(Protocol):
    """What a scan needs of its policy environment (``policies.base.PolicyEnv``, which imports
    this module: a Protocol keeps the import graph acyclic)."""

    proxies: int
    proxy: int

    def arrays(self) -> BoardArrays: ...

    def columns(self, candidates: Sequence[Worker]) -> Columns: ...


EXACT_LIMIT = 1024
SAMPLE = 64
MEMORY = 8  # sampled scans remember this many runners-up (Mitzenmacher, Prabhakar, Shah 2002)
_SHUFFLE_SEED = 0x5EED  # the same order in every proxy (tidy, not needed for correctness)


def load_numpy() -> None:
    """Import numpy (~0.1 s and ~10 MB per process): called when a policy that scans is made
    (``Policy.scans``), so a proxy whose policies never scan (the default) does not pay for it."""
    global np
    if np is None:
        import numpy
        np = numpy


class BoardArrays:
    """numpy views of the whole board mapping, as int64 words and as float64 words, and where
    a worker's cell and engine row start in them (``LoadBoard``'s layout)."""

    __slots__ = ("cell_base", "engine_base", "floats", "stride", "words")

    def __init__(self, board: LoadBoard) -> None:
        mapping: Any = board.ints.obj  # the mmap (see the module's last invariant)
        self.words = np.frombuffer(mapping, dtype=np.int64, count=len(board.ints))
        self.floats = self.words.view(np.float64)
        self.cell_base = board.cell_word(0, 0)
        self.stride = board.worker_stride()  # proxy p's cell of a slot: + p * stride
        self.engine_base = board.engine_word(0)

    def cell_words(self, slots: np.ndarray, proxies: int, field: int) -> list[np.ndarray]:
        """Word indexes of ``field`` in each proxy's cells of ``slots``: one array per proxy."""
        first = self.cell_base + slots * WORKER_FIELDS + field
        return [first + p * self.stride for p in range(proxies)]

    def engine_words(self, slots: np.ndarray, fields: Sequence[int]) -> list[np.ndarray]:
        """Word indexes of engine ``fields`` of ``slots``: one array per field."""
        first = self.engine_base + slots * ENGINE_FIELDS
        return [first + f for f in fields]


def _by_candidate(rows: list[np.ndarray]) -> np.ndarray:
    """Index rows (one per figure summed) as one array of shape (positions, rows): the words of
    a slice of positions are then contiguous, and one gather reads them all."""
    return np.ascontiguousarray(np.stack(rows, axis=1))


Score = Callable[["Columns", Any], "tuple[np.ndarray, float]"]  # (scores, unit) at scan positions
MULTIPLIER_LIMIT = 1 << 20  # weights whose least common multiple is above this are divided by


class Columns:
    """One candidate list in scan order: for each scan position, the board words to read
    (every proxy's in-flight and TTFB cells, the engine row) and the candidate's weight.

    Exact lists are stored twice over (positions ``m..2m-1`` repeat ``0..m-1``), so a scan that
    starts at any position is one contiguous slice; sampled lists repeat their first ``SAMPLE``
    positions for the same reason. A decision is then a few numpy calls on ~100 values: a
    gather per proxy, in-place adds, a multiplication by the weights' integer factors, an
    argmin. Index arrays, weights and factors are built here, once per candidate list.
    """

    __slots__ = ("_factors", "_flight", "_floats", "_memory", "_next", "_pos", "_positions", "_queue",
                 "_ttfb", "_unit", "_weights", "_words", "candidates", "exact", "size")

    def __init__(self, env: ScanEnv, candidates: Sequence[Worker],
                 positions: list[int] | None = None) -> None:
        """``positions``: scan only these candidates, exactly (a one-off sample of a retry's list)."""
        arrays = env.arrays()
        self._words, self._floats = arrays.words, arrays.floats
        self.candidates = candidates
        n = len(candidates)
        self.exact = positions is not None or n <= EXACT_LIMIT
        if positions is not None:
            order = list(positions)
        else:
            order = list(range(n))
            if not self.exact:
                random.Random(_SHUFFLE_SEED).shuffle(order)
        self.size = len(order)
        order += order if self.exact else order[:SAMPLE]  # any window is one slice
        self._pos = order
        slots = np.array([candidates[i].slot for i in order], dtype=np.intp)
        flight = arrays.cell_words(slots, env.proxies, W_IN_FLIGHT)
        self._flight = _by_candidate(flight)
        self._ttfb = _by_candidate(arrays.cell_words(slots, env.proxies, W_TTFB_EWMA))
        engine = arrays.engine_words(slots, (E_RUNNING, E_WAITING))
        self._queue = _by_candidate([*flight, *engine])  # engine queue + in flight
        self._weights, self._factors, self._unit = _weighing([candidates[i].weight for i in order])
        self._positions = np.arange(len(order), dtype=np.intp)  # scan positions, for sampled reads
        self._memory = np.empty(0, dtype=np.intp)
        self._next = env.proxy * SAMPLE % self.size  # proxies sweep from different places

    # -- figures and scores at scan positions (a slice or an index array) -----------------

    def loads(self, at: Any) -> np.ndarray:
        """Global in-flight (summed over proxies) of the candidates at ``at``."""
        return _gather_sum(self._words, self._flight, at)

    def in_flight(self, at: Any) -> tuple[np.ndarray, float]:
        """Score: global in-flight, not weighted (cache_aware's balance rule)."""
        return _gather_sum(self._words, self._flight, at), 1.0

    def weighted_loads(self, at: Any) -> tuple[np.ndarray, float]:
        """Score: global in-flight ÷ weight."""
        return self._weighed(_gather_sum(self._words, self._flight, at), at)

    def ttfb_sums(self, at: Any) -> tuple[np.ndarray, float]:
        """Score: time-to-first-byte EWMAs summed over proxies (0.0 where nobody measured yet).

        Summing instead of averaging keeps this to one read per proxy; once every proxy has
        measured every worker the order is the same as the mean's.
        """
        return _gather_sum(self._floats, self._ttfb, at), 1.0

    def weighted_engine_queue(self, at: Any) -> tuple[np.ndarray, float]:
        """Score: (engine running + waiting + router in-flight) ÷ weight; the in-flight count
        corrects for requests sent since the last scrape."""
        return self._weighed(_gather_sum(self._words, self._queue, at), at)

    def _weighed(self, totals: np.ndarray, at: Any) -> tuple[np.ndarray, float]:
        """``totals`` ÷ weight, as integers times the weights' common multiple where it is
        small (exact: equal ratios tie), else as floats; and the unit that turns one back."""
        if self._factors is not None:
            totals *= self._factors[at] if type(at) is slice else self._factors.take(at)
            return totals, self._unit
        if self._weights is not None:
            return totals / self._weights[at], 1.0
        return totals, 1.0

    # -- decisions -----------------------------------------------------------------------

    def _window(self) -> slice:
        """What a read covers: every candidate, or the sweep's next ``SAMPLE``."""
        if self.exact:
            return slice(0, self.size)
        start = self._next
        self._next = (start + SAMPLE) % self.size
        return slice(start, start + SAMPLE)

    def argmin(self, score: Score, rng: random.Random, tie: int | None = None) -> tuple[int, float]:
        """(position in the candidate list, score) of the lowest-scoring scanned candidate.

        On an exact scan a tie goes to the first from position ``tie`` (wrapping; random when
        None): the scan reads the rotation that starts there, and argmin takes the first
        lowest. A sampled scan reads the sweep's next window and the remembered candidates,
        takes the lowest, and remembers the ``MEMORY`` next lowest for the next decision.
        """
        if self.exact:
            m = self.size
            start = int(rng.random() * m) if tie is None else tie % m
            scores, unit = score(self, slice(start, start + m))
            k = int(scores.argmin())
            return self._pos[start + k], float(scores[k]) * unit
        window = self._window()
        read = self._positions[window]
        if len(self._memory):
            read = np.concatenate((read, self._memory))
        scores, unit = score(self, read)
        ranked = scores.argsort(kind="stable")
        k = int(ranked[0])
        self._memory = read[ranked[1:MEMORY + 1]]
        return self._pos[int(read[k])], float(scores[k]) * unit

    def read_loads(self, rng: random.Random) -> LoadRead:
        """Global in-flight over what a decision scans, read once (cache_aware's balance rule
        and its least-loaded choice both use it)."""
        if self.exact:
            start = int(rng.random() * self.size)
            at = slice(start, start + self.size)
        else:
            at = self._window()
        return LoadRead(self, at, self.loads(at))

    def lowest(self, at: slice, scores: np.ndarray) -> int:
        """Position in the candidate list of the first lowest of ``scores`` (read at ``at``)."""
        return self._pos[at.start + int(scores.argmin())]

    def total_load(self, rng: random.Random) -> float:
        """Global in-flight summed over the candidates: exact, or scaled up from a sample."""
        window = self._window()
        total = int(self.loads(window).sum())
        if self.exact and self.size == len(self.candidates):
            return total
        return total * len(self.candidates) / (window.stop - window.start)


class LoadRead:
    """One read of global in-flight (``Columns.read_loads``): its lowest and highest figure,
    then the least loaded candidate, unweighted or per unit of weight.

    On an exact list the read covers every candidate from a random start, so the least loaded
    comes from the same read (ties to the first from that start, as ``Columns.argmin``). On a
    sampled list the read is the sweep's window: the unweighted least loaded is the candidate
    whose load is ``low``; the weighted one is ``Columns.argmin``'s (the next window and the
    remembered runners-up).
    """

    __slots__ = ("_at", "_cols", "_loads", "high", "low")

    def __init__(self, cols: Columns, at: slice, loads: np.ndarray) -> None:
        self._cols, self._at, self._loads = cols, at, loads
        self.low = int(loads[loads.argmin()])  # argmin and an item: cheaper than min() here
        self.high = int(loads[loads.argmax()])

    @property
    def sampled(self) -> bool:
        """Whether the read covers a sample of the list (not every candidate)."""
        return not self._cols.exact

    def least_loaded(self, rng: random.Random, weighted: bool) -> int:
        """Position in the candidate list of the least loaded candidate (÷ weight if ``weighted``)."""
        cols = self._cols
        if not weighted:
            return cols.lowest(self._at, self._loads)  # the candidate ``low`` was read from
        if not cols.exact:
            return cols.argmin(Columns.weighted_loads, rng)[0]
        scores, _ = cols._weighed(self._loads.copy(), self._at)
        return cols.lowest(self._at, scores)


def _weighing(weights: list[int]) -> tuple[np.ndarray | None, np.ndarray | None, float]:
    """(float weights or None, integer factors or None, unit) for ``Columns._weighed``: None
    and None when all weights are equal (no weighing), factors = lcm ÷ weight when the least
    common multiple is at most ``MULTIPLIER_LIMIT``, unit = 1 ÷ lcm."""
    if all(w == weights[0] for w in weights):
        return None, None, 1.0
    multiple = 1
    for w in set(weights):
        multiple = lcm(multiple, max(w, 1))
        if multiple > MULTIPLIER_LIMIT:
            return np.array(weights, dtype=np.float64), None, 1.0
    return None, np.array([multiple // max(w, 1) for w in weights], dtype=np.int64), 1.0 / multiple


def _gather_sum(words: np.ndarray, index: np.ndarray, at: Any) -> np.ndarray:
    """The words at ``index[at]`` (shape (positions, rows)) summed over the rows: one gather,
    then one add for two rows, else a product with a vector of ones (one call, cheaper here
    than ``sum(axis=1)`` or an add per row)."""
    read = words.take(index[at] if type(at) is slice else index.take(at, axis=0))  # 5x fancy's speed
    rows = read.shape[1]
    if rows == 1:
        return read[:, 0]
    if rows == 2:
        return read[:, 0] + read[:, 1]
    return read @ _ones(rows, read.dtype.char)


@lru_cache(maxsize=64)
def _ones(rows: int, dtype: str) -> np.ndarray:
    return np.ones(rows, dtype=dtype)


def columns_for(env: ScanEnv, candidates: Sequence[Worker], stable: bool,
                rng: random.Random) -> Columns:
    """Columns for ``candidates``: built once for lists that live as long as the snapshot
    (``stable``: a route's, a shard's); a long one-request list gets a one-off sample."""
    if stable or len(candidates) <= EXACT_LIMIT:
        return env.columns(candidates)
    return Columns(env, candidates, rng.sample(range(len(candidates)), SAMPLE))
