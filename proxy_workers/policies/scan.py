"""Load figures over a candidate list, for the policies that compare workers: exact scans of
lists up to ``EXACT_LIMIT``, samples of longer ones, read straight from the shared-memory board.

Role: ``least_connections``, ``least_latency``, ``least_loaded``, new assignments of
``session_affinity`` and ``cache_aware``, cache_aware's balance check and
``consistent_hash_bounded``'s load bound all ask "which candidate scores lowest" (or the total).
:class:`Columns` answers through one :class:`Figure` per figure (in-flight, TTFB, engine queue):
built once per candidate list (per snapshot for a route's), it holds for each scan position the
board words to sum (each proxy's cell, and the engine row) and the candidate's weight factor, so
a decision is one call over the board's words. In C (``_boardscan.c``, built with the request
path; ``native`` says when it is used) that call costs ~0.1 us per 100 candidates (README
"Performance"); :class:`PyFigure`, its pure-Python twin, answers the same where the request path
runs interpreted (no compiler at install, a stale build, ``SHARDGATE_PURE=1``), at ~40 ns per
word read.

Invariants:
- Every figure is global: in-flight counts and TTFB EWMAs are summed over all proxies' cells of
  the load board when read; engine figures are the coordinator's single copy. Nothing but board
  word indexes is kept between decisions, so every proxy reads the same numbers.
- Up to ``EXACT_LIMIT`` candidates the answer is the exact argmin; ties go to the first from a
  caller-chosen start (the list is stored twice over, so the scan from any start is one range),
  so an idle fleet is spread over rather than piled onto the first worker. Weighted scores are
  integers (load x lcm / weight) while the weights' least common multiple is small, so equal
  ratios tie exactly.
- A longer list is put once (per list: per snapshot for a route's) in a shuffled order, which
  decisions sweep ``SAMPLE`` candidates at a time; each decision reads the next window and the
  ``MEMORY`` runners-up of the previous decision (re-read, so never stale) and takes the lowest:
  best of d choices with memory, which finds a worker that just freed up within n / SAMPLE
  decisions and keeps it until used. Reading a whole 10,000-worker column would cost ~20 us in C
  (each worker's cell is its own cache line) and ~1 ms in Python, more than the decision budget.
  ``loadtest/policy_sampling.py`` measures the cost in load terms.
- Lists that live for one request (a retry's, without the workers already tried) are not put in
  order: a long one is sampled directly (``SAMPLE`` random candidates, scanned exactly).
- A C Figure holds the board's mapping (a buffer export) for its life: closing the board still
  works, and the mapping is unmapped when the last Figure goes.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Sequence
from math import lcm
from typing import TYPE_CHECKING, Protocol

from proxy_workers.policies.native import C_FIGURE
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
    from shm.schema import Worker


class ScanEnv(Protocol):
    """What a scan needs of its policy environment (``policies.base.PolicyEnv``, which imports
    this module: a Protocol keeps the import graph acyclic)."""

    board: LoadBoard
    proxies: int
    proxy: int

    def columns(self, candidates: Sequence[Worker]) -> Columns: ...


EXACT_LIMIT = 1024
SAMPLE = 64
MEMORY = 8  # sampled scans remember this many runners-up (Mitzenmacher, Prabhakar, Shah 2002)
_SHUFFLE_SEED = 0x5EED  # the same order in every proxy (tidy, not needed for correctness)
MULTIPLIER_LIMIT = 1 << 20  # weights whose least common multiple is above this are divided by


class Figure(Protocol):
    """One figure of one candidate list, by scan position (``_boardscan.Figure`` or
    :class:`PyFigure`). Scores are the sum of a position's words, times its integer weight
    factor and the figure's unit (or ÷ its weight) when ``weighted``; ties go to the first read."""

    @property
    def positions(self) -> int: ...

    def lowest(self, start: int, count: int, weighted: bool) -> tuple[int, float]:
        """(k, score) of the first lowest of positions ``start .. start+count-1``, k from start."""

    def sample(self, start: int, count: int, memory: tuple[int, ...], keep: int,
               weighted: bool) -> tuple[int, float, tuple[int, ...]]:
        """(position, score, next ``keep`` lowest positions) over positions ``start ..
        start+count-1`` then ``memory``, in that read order."""

    def extent(self, start: int, count: int) -> tuple[int, float, float]:
        """(k of the first lowest, lowest, highest), unweighted."""

    def total(self, start: int, count: int) -> float:
        """The unweighted sum."""

    def lower(self, i: int, j: int) -> int:
        """``i`` or ``j``: the position with the lower weighted score (``i`` on a tie)."""


class PyFigure:
    """:class:`Figure` in Python, for installs without the C build: the same answers as
    ``_boardscan.Figure`` (tests/test_policy_scale.py compares them), slower."""

    __slots__ = ("_divide", "_index", "_rows", "_scale", "_unit", "_words", "positions")

    def __init__(self, board: LoadBoard, index: array[int], rows: int, floats: bool,
                 scale: array[float] | None = None, divide: bool = False, unit: float = 1.0) -> None:
        words = board.floats if floats else board.ints
        self._words, self._rows, self._unit, self._divide = words, rows, unit, divide
        self._index = [tuple(index[i:i + rows]) for i in range(0, len(index), rows)]
        self._scale = None if scale is None else list(scale)
        self.positions = len(self._index)

    def _raw(self, pos: int) -> float:
        words = self._words
        total: float = 0.0
        for word in self._index[pos]:
            total += words[word]
        return float(total)

    def _score(self, pos: int, weighted: bool) -> float:
        raw = self._raw(pos)
        if not weighted or self._scale is None:
            return raw
        return raw / self._scale[pos] if self._divide else raw * self._scale[pos]

    def _unit_of(self, weighted: bool) -> float:
        return self._unit if weighted and self._scale is not None and not self._divide else 1.0

    def lowest(self, start: int, count: int, weighted: bool) -> tuple[int, float]:
        best, low = 0, self._score(start, weighted)
        for k in range(1, count):
            s = self._score(start + k, weighted)
            if s < low:
                best, low = k, s
        return best, low * self._unit_of(weighted)

    def sample(self, start: int, count: int, memory: tuple[int, ...], keep: int,
               weighted: bool) -> tuple[int, float, tuple[int, ...]]:
        reads = [*range(start, start + count), *memory]
        scored = sorted(((self._score(p, weighted), i, p) for i, p in enumerate(reads)))
        runners = tuple(p for _, _, p in scored[1:keep + 1])
        return scored[0][2], scored[0][0] * self._unit_of(weighted), runners

    def extent(self, start: int, count: int) -> tuple[int, float, float]:
        raws = [self._raw(start + k) for k in range(count)]
        low = min(raws)
        return raws.index(low), low, max(raws)

    def total(self, start: int, count: int) -> float:
        return sum(self._raw(start + k) for k in range(count))

    def lower(self, i: int, j: int) -> int:
        return i if self._score(i, True) <= self._score(j, True) else j


Weighing = tuple["array[float] | None", bool, float]  # (per-position scale, divide by it, unit)


def make_figure(board: LoadBoard, index: array[int], rows: int, floats: bool,
                weighing: Weighing | None = None) -> Figure:
    """A Figure over ``index`` (per scan position, ``rows`` board words to sum), weighted by
    ``weighing`` (None: never weighted)."""
    scale, divide, unit = (None, False, 1.0) if weighing is None else weighing
    if C_FIGURE is not None:
        return C_FIGURE(board.ints.obj, index, rows, floats, scale, divide, unit)
    return PyFigure(board, index, rows, floats, scale, divide, unit)


def weighing(weights: list[int]) -> Weighing:
    """How scores are weighted: nothing when all weights are equal; integer factors lcm ÷ weight
    (multiply, then times the unit 1 ÷ lcm) while the least common multiple is at most
    ``MULTIPLIER_LIMIT``, so equal ratios tie exactly; else divide by the weight."""
    if all(w == weights[0] for w in weights):
        return None, False, 1.0
    multiple = 1
    for w in set(weights):
        multiple = lcm(multiple, max(w, 1))
        if multiple > MULTIPLIER_LIMIT:
            return array("d", [float(max(w, 1)) for w in weights]), True, 1.0
    return array("d", [float(multiple // max(w, 1)) for w in weights]), False, 1.0 / multiple


def figure_of(env: ScanEnv, workers: Sequence[Worker], field: int, floats: bool,
              weighed: Weighing | None = None, engine: bool = False) -> Figure:
    """``field`` summed over every proxy's cell of each of ``workers`` (positions in their order),
    plus its engine row's running and waiting counts with ``engine``. The index is built flat, in
    one pass: a 10,000-worker list is built on the first request after a snapshot."""
    board, proxies = env.board, env.proxies
    stride, first = board.worker_stride(), board.cell_word(0, 0, field)
    offsets = [p * stride for p in range(proxies)]
    if not engine:
        index = array("q", [first + w.slot * WORKER_FIELDS + o for w in workers for o in offsets])
        return make_figure(board, index, proxies, floats, weighed)
    index = array("q")
    running, waiting = board.engine_word(0, E_RUNNING), board.engine_word(0, E_WAITING)
    for w in workers:
        cell, row = first + w.slot * WORKER_FIELDS, w.slot * ENGINE_FIELDS
        index.extend([cell + o for o in offsets])
        index.append(running + row)
        index.append(waiting + row)
    return make_figure(board, index, proxies + 2, floats, weighed)


def in_flight_figure(env: ScanEnv, workers: Sequence[Worker]) -> Figure:
    """Global in-flight ÷ weight of ``workers``, positions in their order (power_of_two's pair)."""
    return figure_of(env, workers, W_IN_FLIGHT, False, weighing([w.weight for w in workers]))


class Columns:
    """One candidate list in scan order, with a :class:`Figure` per figure a policy compares:

    - ``flight``: global in-flight ÷ weight (least_connections, new sessions, cache_aware);
    - ``ttfb``: time-to-first-byte EWMAs summed over proxies, 0.0 where nobody measured yet
      (least_latency): a sum is one read per proxy, and once every proxy has measured every
      worker it orders workers as the mean does;
    - ``queue``: (engine running + waiting + router in-flight) ÷ weight (least_loaded): the
      in-flight count corrects for requests sent since the last scrape.

    Exact lists are stored twice over (positions ``m..2m-1`` repeat ``0..m-1``), so a scan that
    starts at any position is one range; sampled lists repeat their first ``SAMPLE`` positions
    for the same reason. Each figure is built on first use: a policy reads one or two of them.
    """

    __slots__ = ("_env", "_flight", "_memory", "_next", "_pos", "_queue", "_ttfb", "_weighed",
                 "_workers", "candidates", "exact", "size")

    def __init__(self, env: ScanEnv, candidates: Sequence[Worker],
                 positions: list[int] | None = None) -> None:
        """``positions``: scan only these candidates, exactly (a one-off sample of a retry's list)."""
        self._env = env
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
        order += order if self.exact else order[:SAMPLE]  # any window is one range
        self._pos = order
        self._workers = [candidates[i] for i in order]
        self._weighed: Weighing | None = None
        self._flight: Figure | None = None
        self._ttfb: Figure | None = None
        self._queue: Figure | None = None
        self._memory: tuple[int, ...] = ()
        self._next = env.proxy * SAMPLE % self.size  # proxies sweep from different places

    @property
    def flight(self) -> Figure:
        if self._flight is None:
            self._flight = figure_of(self._env, self._workers, W_IN_FLIGHT, False, self._weighing())
        return self._flight

    @property
    def ttfb(self) -> Figure:
        if self._ttfb is None:
            self._ttfb = figure_of(self._env, self._workers, W_TTFB_EWMA, True)
        return self._ttfb

    @property
    def queue(self) -> Figure:
        if self._queue is None:
            self._queue = figure_of(self._env, self._workers, W_IN_FLIGHT, False, self._weighing(),
                                    engine=True)
        return self._queue

    def _weighing(self) -> Weighing:
        if self._weighed is None:
            self._weighed = weighing([w.weight for w in self._workers])
        return self._weighed

    def _window(self) -> tuple[int, int]:
        """(start, count) of what a sampled read covers: the sweep's next ``SAMPLE``."""
        start = self._next
        self._next = (start + SAMPLE) % self.size
        return start, SAMPLE

    def _start(self, rng: random.Random, tie: int | None) -> int:
        return int(rng.random() * self.size) if tie is None else tie % self.size

    def argmin(self, figure: Figure, rng: random.Random, tie: int | None = None) -> tuple[int, float]:
        """(position in the candidate list, weighted score) of the lowest-scoring candidate.

        On an exact scan a tie goes to the first from position ``tie`` (wrapping; random when
        None). A sampled scan reads the sweep's next window and the remembered candidates,
        takes the lowest, and remembers the ``MEMORY`` next lowest for the next decision.
        """
        if self.exact:
            start = self._start(rng, tie)
            k, score = figure.lowest(start, self.size, True)
            return self._pos[start + k], score
        start, count = self._window()
        best, score, self._memory = figure.sample(start, count, self._memory, MEMORY, True)
        return self._pos[best], score

    def read_loads(self, rng: random.Random) -> LoadRead:
        """Global in-flight over what a decision scans, read once for cache_aware's balance rule
        and its unweighted least-loaded choice."""
        start, count = (self._start(rng, None), self.size) if self.exact else self._window()
        return LoadRead(self, start, count)

    def total_load(self, rng: random.Random) -> float:
        """Global in-flight summed over the candidates: exact, or scaled up from a sample."""
        if self.exact:
            total = self.flight.total(0, self.size)
            whole = self.size == len(self.candidates)
            return int(total) if whole else total * len(self.candidates) / self.size
        start, count = self._window()
        return self.flight.total(start, count) * len(self.candidates) / count


class LoadRead:
    """One read of global in-flight (``Columns.read_loads``): its lowest and highest figure,
    then the least loaded candidate, unweighted (from the same read) or per unit of weight
    (``Columns.argmin`` over the in-flight figure: the same range again on an exact list, the
    next window and the remembered runners-up on a sampled one)."""

    __slots__ = ("_cols", "_count", "_lowest", "_start", "high", "low")

    def __init__(self, cols: Columns, start: int, count: int) -> None:
        self._cols, self._start, self._count = cols, start, count
        k, low, high = cols.flight.extent(start, count)
        self._lowest, self.low, self.high = k, int(low), int(high)

    @property
    def sampled(self) -> bool:
        """Whether the read covers a sample of the list (not every candidate)."""
        return not self._cols.exact

    def least_loaded(self, rng: random.Random, weighted: bool) -> int:
        """Position in the candidate list of the least loaded candidate (÷ weight if ``weighted``)."""
        cols = self._cols
        if not weighted:
            return cols._pos[self._start + self._lowest]  # the candidate ``low`` was read from
        if not cols.exact:
            return cols.argmin(cols.flight, rng)[0]
        k, _ = cols.flight.lowest(self._start, self._count, True)
        return cols._pos[self._start + k]


def columns_for(env: ScanEnv, candidates: Sequence[Worker], stable: bool,
                rng: random.Random) -> Columns:
    """Columns for ``candidates``: built once for lists that live as long as the snapshot
    (``stable``: a route's, a shard's); a long one-request list gets a one-off sample."""
    if stable or len(candidates) <= EXACT_LIMIT:
        return env.columns(candidates)
    return Columns(env, candidates, rng.sample(range(len(candidates)), SAMPLE))
