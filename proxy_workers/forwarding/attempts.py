"""Load-board accounting of one attempt on one worker, shared by every kind of leg.

Role: the single place that opens and closes a worker cell's books for an attempt (HTTP
exchange, PD prefill leg, gRPC leg), so "in flight", error counts, consecutive failures and the
moving averages mean the same thing whichever router sent the request.

Invariants: a cell is opened once (in-flight + 1, requests + 1) and closed once (in-flight - 1);
callers keep the returned cell index and set it to -1 after closing. Writes go only to this proxy's
own cells (the load board's single-writer rule).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from shm.loadboard import (
    EWMA_ALPHA,
    W_CONNECT_ERRORS,
    W_ERRORS,
    W_FAILS_IN_ROW,
    W_IN_FLIGHT,
    W_LAST_ERROR,
    W_LATENCY_EWMA,
    W_REQUESTS,
    W_STREAMS,
    W_TTFB_EWMA,
    WORKER_FIELDS,
)

if TYPE_CHECKING:
    from proxy_workers.serving.protocol import ProxyProcess


def open_cell(proc: ProxyProcess, slot: int) -> int:
    """Count an attempt starting on worker ``slot``; returns its cell index."""
    cell = proc.cell0 + slot * WORKER_FIELDS
    ints = proc.ints
    ints[cell + W_IN_FLIGHT] += 1
    ints[cell + W_REQUESTS] += 1
    return cell


def first_byte(proc: ProxyProcess, cell: int, waited: float, stream: bool) -> None:
    """The worker's answer started ``waited`` seconds after the attempt was sent."""
    floats = proc.floats
    floats[cell + W_TTFB_EWMA] += EWMA_ALPHA * (waited - floats[cell + W_TTFB_EWMA])
    if stream:
        proc.ints[cell + W_STREAMS] += 1


def close_cell(proc: ProxyProcess, cell: int, ok: bool, latency: float | None = None,
               count_error: bool = True, connect_error: bool = False) -> None:
    """Close an attempt: in-flight back down; success or failure recorded for passive health.

    ``count_error=False`` is for attempts that neither succeeded nor failed (cancelled, or a
    stale pooled socket retried on the same worker).
    """
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
        proc.floats[cell + W_LAST_ERROR] = time.time()
