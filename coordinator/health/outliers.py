"""Slow-outlier detection: a worker whose time to first byte is far above its model's other workers.

Role: the fourth passive-health rule (:mod:`coordinator.health.passive` applies it and ejects).
It compares each worker's time to first byte (TTFB: the response head, or a gRPC stream's first
message) with the median of the other workers that serve one of its models, as Envoy's outlier
detection compares a host's success rate with its cluster's. A worker is slow when its TTFB is
more than ``slow_outlier_factor`` times that median *and* more than ``slow_outlier_min_gap``
seconds above it (so 30 ms against 10 ms is never an outlier).

Where the figures come from: each proxy keeps a TTFB EWMA per worker on the load board
(``W_TTFB_EWMA``, alpha ``EWMA_ALPHA``, updated with every answer) and counts the answers
(``W_ANSWERS``). Only *fresh* figures are judged: a proxy's EWMA counts once that proxy has seen
``FRESH_ANSWERS`` answers from the worker since the first sample that saw it move after it was
first seen or readmitted (readmission clears ``PassiveState.ttfb_marks``), or since the proxy
restarted; by then the EWMA keeps ``(1 - alpha) ** FRESH_ANSWERS`` (1.2%) of what it held before,
so a worker readmitted after being slow or stalled is not judged on its old figure. A worker's TTFB is the
mean of its fresh proxies' EWMAs, weighted by their fresh answers.

Invariants:
- A worker is judged only against peers with fresh figures of their own, at least one of them.
- Ejection goes through the same panic guard as every other rule (``max_ejection_percent``,
  never a model's last routable worker).
- Reading costs two strided slices per proxy and runs only when the rule is on.
"""

from __future__ import annotations

from statistics import median
from typing import TYPE_CHECKING, cast

from coordinator.fleet.passive_state import PassiveState
from shm.loadboard import EWMA_ALPHA, W_ANSWERS, W_TTFB_EWMA, WORKER_FIELDS, LoadBoard

if TYPE_CHECKING:
    from coordinator.fleet.membership import WorkerState
    from shm.settings import Settings

FRESH_ANSWERS = 20
KEPT_AFTER_FRESH = (1 - EWMA_ALPHA) ** FRESH_ANSWERS  # what the EWMA still holds of older answers


def read_ttfb(board: LoadBoard, proxies: int, slots: int) -> tuple[list[list[int]], list[list[float]]]:
    """Per proxy: answers and TTFB EWMA of each worker slot."""
    answers, ttfb = [], []
    stop = slots * WORKER_FIELDS
    for p in range(proxies):
        start = board.cell_word(p, 0, W_ANSWERS)
        answers.append(board.ints[start:start + stop:WORKER_FIELDS].tolist())
        start = board.cell_word(p, 0, W_TTFB_EWMA)
        # typeshed types memoryview.tolist() as ints; a "d" view gives floats
        ttfb.append(cast("list[float]", board.floats[start:start + stop:WORKER_FIELDS].tolist()))
    return answers, ttfb


def fresh_ttfb(ps: PassiveState, slot: int, answers: list[list[int]],
               ttfb: list[list[float]]) -> float | None:
    """A worker's TTFB over fresh answers, or None while no proxy has enough of them."""
    now_answers = [column[slot] for column in answers]
    marks = ps.ttfb_marks
    if marks is None or len(marks) != len(now_answers):
        ps.ttfb_marks = now_answers  # first sight, or readmitted (marks were cleared)
        return None
    weighted = 0
    weighted_sum = 0.0
    for p, count in enumerate(now_answers):
        if count < marks[p]:  # the proxy restarted and zeroed its cells: start its count again
            marks[p] = count
        fresh = count - marks[p]
        if fresh >= FRESH_ANSWERS:
            weighted_sum += ttfb[p][slot] * fresh
            weighted += fresh
    return weighted_sum / weighted if weighted else None


def slow_outliers(states: list[WorkerState], answers: list[list[int]], ttfb: list[list[float]],
                  settings: Settings) -> list[tuple[WorkerState, str]]:
    """Workers whose fresh TTFB is far above the median of their models' other workers."""
    figures: dict[int, float] = {}
    for st in states:
        ps = st.passive
        if not isinstance(ps, PassiveState):
            continue
        seconds = fresh_ttfb(ps, st.slot, answers, ttfb)
        if seconds is not None and st.healthy and not st.ejected and not st.draining:
            figures[st.slot] = seconds
    if len(figures) < 2:
        return []
    by_model: dict[str, list[tuple[int, float]]] = {}
    for st in states:
        if st.slot in figures:
            for model in st.models:
                by_model.setdefault(model, []).append((st.slot, figures[st.slot]))
    found = []
    for st in states:
        mine = figures.get(st.slot)
        if mine is None:
            continue
        for model in st.models:
            peers = [s for slot, s in by_model[model] if slot != st.slot]
            if not peers:
                continue
            typical = median(peers)
            gap = mine - typical
            if mine > settings.slow_outlier_factor * typical and gap > settings.slow_outlier_min_gap:
                found.append((st, f"slow: time to first byte {mine:.2f}s, {mine / max(typical, 1e-6):.0f}x "
                                  f"the {typical:.2f}s median of model {model}'s other workers"))
                break
    return found
