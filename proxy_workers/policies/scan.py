"""Load figures over a candidate list, for the policies that compare workers: exact scans of
lists up to ``EXACT_LIMIT``, samples of longer ones, both in numpy over the shared-memory board.

Role: ``least_connections``, ``least_latency``, ``least_loaded``, new assignments of
``session_affinity`` and ``cache_aware``, cache_aware's balance check and
``consistent_hash_bounded``'s load bound all ask "which candidate scores lowest" (or the total).
:class:`Columns` answers with numpy views of the board's columns (no copies): a gather per proxy,
an add, an argmin. In Python the same scan costs ~25 ns per worker and proxy for the reads alone
(a memoryview item each), ~12 us at 100 workers with two proxies; numpy does it in ~2.5 us and
grows by ~5 ns per worker, so exactness stays affordable to ``EXACT_LIMIT``.

Invariants:
- Every figure is global: in-flight counts and TTFB EWMAs are summed over all proxies' cells of
  the load board when read; engine figures are the coordinator's single copy. Nothing but slot
  indexes is kept between decisions, so every proxy reads the same numbers.
- Up to ``EXACT_LIMIT`` candidates the answer is the exact argmin; ties go to the first from a
  caller-chosen start (a ramp of tiny offsets, far below any real difference, added before the
  argmin), so an idle fleet is spread over rather than piled onto the first worker.
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
TIE_SPAN = 1e-7  # the tie-breaking ramp's total height: below any difference of load ÷ weight
_SHUFFLE_SEED = 0x5EED  # the same order in every proxy (tidy, not needed for correctness)


def load_numpy() -> None:
    """Import numpy (~0.1 s and ~10 MB per process): called when a policy that scans is made
    (``Policy.scans``), so a proxy whose policies never scan (the default) does not pay for it."""
    global np
    if np is None:
        import numpy
        np = numpy


class BoardArrays:
    """numpy views of the board's per-worker columns: [proxy][slot] cells and engine rows."""

    __slots__ = ("in_flight", "running", "ttfb", "waiting")

    def __init__(self, board: LoadBoard) -> None:
        mapping: Any = board.ints.obj  # the mmap (see the module's last invariant)
        words = np.frombuffer(mapping, dtype=np.int64, count=len(board.ints))
        size = board.max_proxies * board.max_workers * WORKER_FIELDS
        cells = words[board.cell_base:board.cell_base + size].reshape(
            board.max_proxies, board.max_workers, WORKER_FIELDS)
        self.in_flight = cells[:, :, W_IN_FLIGHT]
        self.ttfb = cells.view(np.float64)[:, :, W_TTFB_EWMA]
        engine = words[board.engine_base:board.engine_base + board.max_workers * ENGINE_FIELDS]
        engine = engine.reshape(board.max_workers, ENGINE_FIELDS)
        self.running = engine[:, E_RUNNING]
        self.waiting = engine[:, E_WAITING]


Score = Callable[["Columns", slice], "np.ndarray"]  # a window, or an array of scan positions


class Columns:
    """One candidate list's slots in scan order, with its weights, over the board's columns."""

    __slots__ = ("_all", "_in_flight", "_inverse", "_memory", "_next", "_order", "_pos", "_ramp",
                 "_running", "_slots", "_ttfb", "_waiting", "candidates", "exact", "size")

    def __init__(self, env: ScanEnv, candidates: Sequence[Worker],
                 positions: list[int] | None = None) -> None:
        """``positions``: scan only these candidates, exactly (a one-off sample of a retry's list)."""
        arrays = env.arrays()
        proxies = range(env.proxies)
        self._in_flight = [arrays.in_flight[p] for p in proxies]
        self._ttfb = [arrays.ttfb[p] for p in proxies]
        self._running, self._waiting = arrays.running, arrays.waiting
        self.candidates = candidates
        n = len(candidates)
        self.exact = positions is not None or n <= EXACT_LIMIT
        if positions is not None:
            order = positions
        elif self.exact:
            order = list(range(n))
        else:
            order = list(range(n))
            random.Random(_SHUFFLE_SEED).shuffle(order)
            order += order[:SAMPLE]  # a window that starts near the end wraps around
        self._pos = order
        self.size = len(order) if self.exact else n
        self._all = slice(0, self.size)
        self._slots = np.array([candidates[i].slot for i in order], dtype=np.intp)
        weights = np.array([candidates[i].weight for i in order], dtype=np.float64)
        self._inverse = None if (weights == weights[0]).all() else 1.0 / weights
        m = self.size
        ramp = np.arange(m, dtype=np.float64) * (TIE_SPAN / max(m, 1))
        self._ramp = np.concatenate((ramp, ramp))
        self._order = np.arange(len(order), dtype=np.intp)  # positions in the scan order
        self._memory = np.empty(0, dtype=np.intp)
        self._next = env.proxy * SAMPLE % m  # proxies sweep from different places

    # -- scores over a window of the scan order ------------------------------------------

    def loads(self, window: slice) -> np.ndarray:
        """Global in-flight (summed over proxies) of the window's candidates."""
        return _summed(self._in_flight, self._slots[window])

    def weighted_loads(self, window: slice) -> np.ndarray:
        total = self.loads(window)
        return total if self._inverse is None else total * self._inverse[window]

    def ttfb_sums(self, window: slice) -> np.ndarray:
        """Time-to-first-byte EWMAs summed over proxies (0.0 where nobody measured yet).

        Summing instead of averaging keeps this to one read per proxy; once every proxy has
        measured every worker the order is the same as the mean's.
        """
        return _summed(self._ttfb, self._slots[window])

    def weighted_engine_queue(self, window: slice) -> np.ndarray:
        """(Engine running + waiting + router in-flight) ÷ weight; the in-flight count corrects
        for requests sent since the last scrape."""
        idx = self._slots[window]
        total = self.loads(window)
        total += self._running[idx]
        total += self._waiting[idx]
        return total if self._inverse is None else total * self._inverse[window]

    # -- decisions -----------------------------------------------------------------------

    def _window(self, rng: random.Random) -> slice:
        """Where a sampled read starts: the next ``SAMPLE`` candidates of the sweep."""
        if self.exact:
            return self._all
        start = self._next
        self._next = (start + SAMPLE) % self.size
        return slice(start, start + SAMPLE)

    def argmin(self, score: Score, rng: random.Random, tie: int | None = None) -> tuple[int, float]:
        """(position in the candidate list, score) of the lowest-scoring scanned candidate.

        On an exact scan a tie goes to the first from position ``tie`` (wrapping; random when
        None). A sampled scan reads the sweep's next window and the remembered candidates,
        takes the lowest, and remembers the ``MEMORY`` next lowest for the next decision.
        """
        if self.exact:
            scores = score(self, self._all)
            m = self.size
            start = int(rng.random() * m) if tie is None else tie % m
            k = int((scores + self._ramp[m - start:2 * m - start]).argmin())
            return self._pos[k], float(scores[k])
        window = self._window(rng)
        read = np.concatenate((self._order[window], self._memory))
        scores = score(self, read)  # type: ignore[arg-type]
        best = np.argpartition(scores, MEMORY)[:MEMORY + 1]
        k = int(best[scores[best].argmin()])
        self._memory = read[best[best != k]]
        return self._pos[int(read[k])], float(scores[k])

    def load_range(self, rng: random.Random) -> tuple[int, int]:
        """(lowest, highest) global in-flight over the scanned candidates, not weighted
        (sglang's balance check)."""
        ordered = np.sort(self.loads(self._window(rng)))  # one call for both ends
        return int(ordered[0]), int(ordered[-1])

    def total_load(self, rng: random.Random) -> float:
        """Global in-flight summed over the candidates: exact, or scaled up from a sample."""
        window = self._window(rng)
        total = int(self.loads(window).sum())
        if self.exact and self.size == len(self.candidates):
            return total
        return total * len(self.candidates) / (window.stop - window.start)


def _summed(rows: list[np.ndarray], idx: np.ndarray) -> np.ndarray:
    """One figure of the slots ``idx``, summed over the proxies' rows (a fresh array)."""
    total = rows[0][idx]
    for row in rows[1:]:
        total += row[idx]
    return total


def columns_for(env: ScanEnv, candidates: Sequence[Worker], stable: bool,
                rng: random.Random) -> Columns:
    """Columns for ``candidates``: built once for lists that live as long as the snapshot
    (``stable``: a route's, a shard's); a long one-request list gets a one-off sample."""
    if stable or len(candidates) <= EXACT_LIMIT:
        return env.columns(candidates)
    return Columns(env, candidates, rng.sample(range(len(candidates)), SAMPLE))
