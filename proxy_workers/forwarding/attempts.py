"""One attempt on one worker, for every path: the pick, its counting, and the worker cell's books.

Role: the single place that (1) picks a worker for an attempt and counts the decision, and (2)
opens and closes a worker cell's books for the attempt, so "decisions", "fallbacks", "in flight",
error counts, consecutive failures and the moving averages mean the same thing whichever path sent
the request (HTTP exchange, PD prefill and decode legs, gRPC legs).

Invariants:
- Every pick that returns a worker counts one decision for the route's policy; a pick the policy
  marked as a fallback counts once more, as a fallback (``decisions >= fallbacks`` always).
  Whether a pick is a fallback is decided per pick: the context's mark is cleared first.
- A pick never returns a worker in ``exclude`` (the workers this request must not try again);
  the caller records the one it gets. With nothing left after a failure the answer is 502 naming
  the last failure; with nothing at all, 503.
- A cell is opened once (in-flight + 1, requests + 1) and closed once (in-flight - 1):
  :func:`settle` closes an open cell and returns the closed marker (-1), which callers store, so a
  second settle does nothing. Writes go only to this proxy's own cells (the single-writer rule).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from proxy_workers.errors import BadGateway, NoHealthyWorker
from shm.histograms import LATENCY_BUCKETS
from shm.loadboard import (
    EWMA_ALPHA,
    W_ANSWERS,
    W_CONNECT_ERRORS,
    W_ERR_STATUS,
    W_ERRORS,
    W_FAILS_IN_ROW,
    W_IN_FLIGHT,
    W_LAST_ERROR,
    W_LATENCY_EWMA,
    W_REQUESTS,
    W_STREAMS,
    W_TTFB_EWMA,
    W_TTFB_HIST,
    W_TTFB_SUM,
    WORKER_FIELDS,
)

if TYPE_CHECKING:
    from proxy_workers.process_view import ProcessView
    from proxy_workers.routing.context import RequestContext
    from proxy_workers.routing.table import ModelRoute
    from shm.schema import Worker

CLOSED = -1  # a settled attempt's cell


def bucket(bounds: tuple[float, ...], value: float) -> int:
    """The histogram bucket of ``value``: the first bound >= it (``bisect_left``); len(bounds) for
    +Inf. A scan from the smallest bound, compiled: the few bounds a request's times pass cost
    less than a call to ``bisect``."""
    index = 0
    for bound in bounds:
        if value <= bound:
            return index
        index += 1
    return index


def pick_worker(proc: ProcessView, route: ModelRoute, ctx: RequestContext, exclude: Sequence[int],
                last_failure: str = "") -> Worker:
    """A worker for the next attempt, not one in ``exclude``; the decision is counted.

    Raises NoHealthyWorker (503) when the route has no usable worker at all, BadGateway (502)
    when the workers left were all tried, or a policy's own refusal (e.g. 429 from quota_aware).
    """
    ctx.fallback = False
    try:
        worker = route.pick(ctx, exclude)
    except NoHealthyWorker as err:
        if exclude:
            raise BadGateway(f"{err.message}; last failure: {last_failure}" if last_failure
                             else err.message) from None
        raise
    word = proc.decision0 + route.policy.index * 2  # (inline: this runs on every request)
    ints = proc.ints
    ints[word] += 1
    if ctx.fallback:
        ints[word + 1] += 1
    return worker


def open_cell(proc: ProcessView, slot: int) -> int:
    """Count an attempt starting on worker ``slot``; returns its cell index."""
    cell = proc.cell0 + slot * WORKER_FIELDS
    ints = proc.ints
    ints[cell + W_IN_FLIGHT] += 1
    ints[cell + W_REQUESTS] += 1
    return cell


def first_byte(proc: ProcessView, cell: int, waited: float, stream: bool) -> None:
    """The worker's answer started ``waited`` seconds after the attempt was sent (``cell`` open)."""
    floats = proc.floats
    floats[cell + W_TTFB_EWMA] += EWMA_ALPHA * (waited - floats[cell + W_TTFB_EWMA])
    floats[cell + W_TTFB_SUM] += waited
    ints = proc.ints
    ints[cell + W_ANSWERS] += 1
    ints[cell + W_TTFB_HIST + bucket(LATENCY_BUCKETS, waited)] += 1  # the per-worker histogram
    if stream:
        ints[cell + W_STREAMS] += 1


def settle(proc: ProcessView, cell: int, ok: bool, latency: float | None = None,
           count_error: bool = True, connect_error: bool = False, server_error: bool = False) -> int:
    """Close an attempt's books if ``cell`` is still open; returns :data:`CLOSED` to store.

    In-flight goes back down; success or failure is recorded for passive health.
    ``count_error=False`` is for attempts that neither succeeded nor failed (cancelled, or a stale
    pooled socket retried on the same worker). ``connect_error`` and ``server_error`` (the worker
    answered 5xx) say what kind of failure it was, for the worker's figures.
    """
    if cell < 0:
        return -1  # CLOSED (a literal: this runs on every request)
    ints = proc.ints
    ints[cell + W_IN_FLIGHT] -= 1
    if count_error:
        ints[cell + W_FAILS_IN_ROW] = 0 if ok else ints[cell + W_FAILS_IN_ROW] + 1
    if ok:
        if latency is not None:
            floats = proc.floats
            floats[cell + W_LATENCY_EWMA] += EWMA_ALPHA * (latency - floats[cell + W_LATENCY_EWMA])
    elif count_error:
        ints[cell + W_ERRORS] += 1
        if connect_error:
            ints[cell + W_CONNECT_ERRORS] += 1
        elif server_error:
            ints[cell + W_ERR_STATUS] += 1
        proc.floats[cell + W_LAST_ERROR] = time.time()
    return -1  # CLOSED
