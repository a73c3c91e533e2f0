"""The /metrics families read straight from the load board's blocks: per model and per worker.

Role: sum, at scrape time, the per-proxy model blocks (requests by router/status/outcome, tokens,
duration/TTFT/TPOT histograms; layout: :mod:`shm.histograms`) and the worker cells' histogram and
error kinds, and write them in the text format. :mod:`proxy_workers.serving.metrics` calls it.

Invariants: counters are exact across proxies (each block has one writer; a reader may see a
value one update old). Request series whose count is 0 are left out (as a labelled counter
appears when first incremented); histograms are always complete (every bucket, cumulative,
``+Inf`` = ``_count``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shm.histograms import (
    DURATION_WORDS,
    LATENCY_BUCKETS,
    M_REQUESTS,
    M_TOKENS_IN,
    M_TOKENS_OUT,
    M_TPOT,
    OTHER_MODEL,
    OUTCOMES,
    ROUTERS,
    STATUS_CLASSES,
    STATUS_LABELS,
    TPOT_BUCKETS,
    TTFT_WORDS,
    histogram,
)
from shm.loadboard import W_ERR_STATUS, W_TTFB_HIST

if TYPE_CHECKING:
    from shm.loadboard import LoadBoard
    from shm.schema import Snapshot

Family = Callable[[str], None]


def escape(value: str) -> str:
    """A Prometheus label value, escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _le(bound: float) -> str:
    return repr(float(bound))


def _histogram(lines: list[str], name: str, labels: str, board: LoadBoard, word: int | tuple[int, ...],
               bounds: tuple[float, ...], blocks: list[int]) -> None:
    counts, total = histogram(board.ints, board.floats, word, bounds, blocks)
    for bound, count in zip(bounds, counts, strict=False):
        lines.append(f'{name}_bucket{{{labels},le="{_le(bound)}"}} {count}')
    lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {counts[-1]}')
    lines.append(f"{name}_sum{{{labels}}} {total!r}")
    lines.append(f"{name}_count{{{labels}}} {counts[-1]}")


def model_families(lines: list[str], family: Family, snap: Snapshot, board: LoadBoard) -> None:
    """Per-model requests, tokens and histograms, summed over the snapshot's proxies."""
    indexed = sorted((m, i) for m, i in snap.model_index.items() if 0 < i <= board.max_models)
    models = [(OTHER_MODEL, 0), *indexed]
    proxies = range(snap.proxies)
    blocks = {model: [board.model_word(p, index) for p in proxies] for model, index in models}
    ints = board.ints
    family("shardgate_model_requests_total")
    n_out = len(OUTCOMES)
    for model, bases in blocks.items():
        label = escape(model)
        for router, router_name in enumerate(ROUTERS):
            for klass in range(STATUS_CLASSES):
                for outcome, outcome_name in enumerate(OUTCOMES):
                    field = M_REQUESTS + (router * STATUS_CLASSES + klass) * n_out + outcome
                    count = sum(ints[b + field] for b in bases)
                    if count:
                        lines.append(f'shardgate_model_requests_total{{model="{label}",router="{router_name}",'
                                     f'status="{STATUS_LABELS[klass]}",outcome="{outcome_name}"}} {count}')
    for name, field in (("shardgate_input_tokens_total", M_TOKENS_IN),
                        ("shardgate_output_tokens_total", M_TOKENS_OUT)):
        family(name)
        for model, bases in blocks.items():
            lines.append(f'{name}{{model="{escape(model)}"}} {sum(ints[b + field] for b in bases)}')
    fields: tuple[tuple[str, int | tuple[int, ...], tuple[float, ...]], ...] = (
        ("shardgate_request_duration_seconds", DURATION_WORDS, LATENCY_BUCKETS),
        ("shardgate_time_to_first_token_seconds", TTFT_WORDS, LATENCY_BUCKETS),
        ("shardgate_time_per_output_token_seconds", M_TPOT, TPOT_BUCKETS))
    for name, words, bounds in fields:
        family(name)
        for model, bases in blocks.items():
            _histogram(lines, name, f'model="{escape(model)}"', board, words, bounds, bases)


def worker_families(lines: list[str], family: Family, snap: Snapshot, board: LoadBoard,
                    workers: list[dict[str, Any]]) -> None:
    """Per-worker info, errors by kind and first-byte histogram."""
    proxies = range(snap.proxies)
    family("shardgate_worker_info")
    for w in workers:
        lines.append(f'shardgate_worker_info{{worker="{escape(w["url"])}",type="{w["type"]}",'
                     f'connection="{w["connection"]}"}} 1')
    family("shardgate_worker_errors_by_kind_total")
    for w in workers:
        url = escape(w["url"])
        status = board.cell_figure(w["slot"], snap.proxies, W_ERR_STATUS)
        connect = int(w["connect_errors"])
        other = max(int(w["errors"]) - connect - status, 0)
        for kind, count in (("connect", connect), ("status", status), ("other", other)):
            lines.append(f'shardgate_worker_errors_by_kind_total{{worker="{url}",kind="{kind}"}} {count}')
    family("shardgate_worker_first_byte_seconds")
    for w in workers:
        cells = [board.cell_word(p, w["slot"]) for p in proxies]
        _histogram(lines, "shardgate_worker_first_byte_seconds", f'worker="{escape(w["url"])}"', board,
                   W_TTFB_HIST, LATENCY_BUCKETS, cells)


def proxy_families(lines: list[str], family: Family, proxies: list[dict[str, Any]]) -> None:
    """Per-proxy liveness and restarts (the coordinator restarts a proxy that died)."""
    family("shardgate_proxy_up")
    for i, p in enumerate(proxies):
        lines.append(f'shardgate_proxy_up{{proxy="{i}"}} {1 if p.get("alive") else 0}')
    family("shardgate_proxy_restarts_total")
    for i, p in enumerate(proxies):
        lines.append(f'shardgate_proxy_restarts_total{{proxy="{i}"}} {int(p["restarts"])}')
