"""Figures of a simulation run, their summary, and the comparison table.

Role: collect what the event loop measures (:class:`Figures`), reduce it to the per-policy
report (:func:`summarize`), and print policies side by side (:func:`table`).

Definitions (also in docs/simulator.md):
- *load* of a worker = its requests in flight (running + queued), the router's own measure.
  It is sampled ``samples`` times, evenly over the arrival window, across the live workers; each
  sample gives the max, mean, p50, p99 and standard deviation. The report shows ratios of their
  averages over the samples: max/mean = avg(max) / avg(mean), p99/p50 = avg(p99) / avg(p50),
  CV = avg(std) / avg(mean). Averaging the figures before dividing weighs each sample by its
  load, so the nearly idle first moments of a run (where one request on one worker makes max/mean
  huge) do not swamp the rest. ``peak``: the highest load any worker had at a sample.
- *requests per worker*: attempts routed to each worker over the run (max/mean, CV).
- percentiles are nearest-rank; TTFT and end-to-end latency are simulated seconds from arrival,
  so queueing and retries count.
- *prefix-cache hit rate*: prompt tokens found in the serving worker's prefix cache / prompt
  tokens served.
- *decisions/s*: ``route.pick`` calls / wall seconds spent inside them (the one figure that is
  not reproducible: it measures this machine).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from operator import mul
from typing import Any


def pct(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 when empty)."""
    if not ordered:
        return 0.0
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class Figures:
    """Raw figures of one run (filled by :mod:`shardgate.simulate.engine`)."""

    def __init__(self, policy: str, workers: int) -> None:
        self.policy = policy
        self.workers = workers
        self.picks = 0
        self.pick_ns = 0
        self.retries = 0       # extra attempts: dead workers, requests moved off a dying one
        self.refused = 0       # attempts a worker refused (its queue was full)
        self.rejected = 0      # requests no worker took (tries used up, or the router refused)
        self.refusals: dict[str, int] = {}  # the router's own refusals by error class
        self.failed = 0        # streams cut by a worker's death
        self.completed = 0
        self.queued = 0
        self.queue_wait = 0.0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.e2e: list[float] = []
        self.ttfts: dict[int, list[float]] = {}
        # (t, mean, max, p50, p99, std) of the live workers' loads
        self.samples: list[tuple[float, float, float, float, float, float]] = []
        self.served: list[int] = []
        self.sim_seconds = 0.0
        self.wall_seconds = 0.0
        self.cpu_seconds = 0.0  # this process's CPU time over the run (wall time includes waiting for a CPU)

    def ttft(self, priority: int, seconds: float) -> None:
        got = self.ttfts.get(priority)
        if got is None:
            got = self.ttfts[priority] = []
        got.append(seconds)

    def sample(self, t: float, loads: list[int]) -> None:
        n = len(loads)
        if not n:
            return
        loads.sort()
        total = sum(loads)
        mean = total / n
        var = max(0.0, sum(map(mul, loads, loads)) / n - mean * mean)
        self.samples.append((t, mean, float(loads[-1]), float(pct(loads, 0.5)), float(pct(loads, 0.99)),
                             math.sqrt(var)))


def _avg(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ratio(samples: Sequence[tuple[float, ...]], top: int, bottom: int) -> float | None:
    """avg(field ``top``) / avg(field ``bottom``) over the samples (None when the bottom is 0)."""
    below = sum(s[bottom] for s in samples)
    return sum(s[top] for s in samples) / below if below else None


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def summarize(fig: Figures) -> dict[str, Any]:
    """The per-policy report (JSON-ready)."""
    ttft_all = sorted(v for values in fig.ttfts.values() for v in values)
    e2e = sorted(fig.e2e)
    served = fig.served or [0]
    mean_served = sum(served) / len(served)
    var_served = sum((s - mean_served) ** 2 for s in served) / len(served)
    samples = fig.samples
    requests = fig.completed + fig.rejected + fig.failed
    return {
        "policy": fig.policy,
        "requests": requests,
        "completed": fig.completed,
        "rejected": fig.rejected,
        "failed": fig.failed,
        "retries": fig.retries,
        "refused_by_workers": fig.refused,
        "router_refusals": dict(sorted(fig.refusals.items())),
        "queued": fig.queued,
        "queued_share": _r(fig.queued / requests if requests else 0.0, 4),
        "mean_queue_wait_s": _r(fig.queue_wait / fig.queued if fig.queued else 0.0, 4),
        "load": {
            "max_over_mean": _r(_ratio(samples, 2, 1)),
            "p99_over_p50": _r(_ratio(samples, 4, 3)),
            "cv": _r(_ratio(samples, 5, 1)),
            "peak": max((s[2] for s in samples), default=0.0),
            "mean": _r(_avg([s[1] for s in samples])),
            "samples": len(samples),
        },
        "requests_per_worker": {
            "max": max(served), "min": min(served), "mean": _r(mean_served),
            "cv": _r(math.sqrt(var_served) / mean_served if mean_served else 0.0, 4),
            "by_slot": served,  # slot i is the i-th worker (config.urls order)
        },
        "ttft_s": {"p50": _r(pct(ttft_all, 0.5), 4), "p90": _r(pct(ttft_all, 0.9), 4),
                   "p99": _r(pct(ttft_all, 0.99), 4)},
        "ttft_p99_s_by_priority": {str(p): _r(pct(sorted(v), 0.99), 4) for p, v in sorted(fig.ttfts.items())},
        "e2e_s": {"p50": _r(pct(e2e, 0.5), 4), "p90": _r(pct(e2e, 0.9), 4), "p99": _r(pct(e2e, 0.99), 4)},
        "prefix_cache_hit_rate": _r(fig.cached_tokens / fig.prompt_tokens if fig.prompt_tokens else 0.0, 4),
        "decisions": fig.picks,
        "decisions_per_s": round(fig.picks / (fig.pick_ns / 1e9)) if fig.pick_ns else None,
        "pick_us_mean": _r(fig.pick_ns / fig.picks / 1000 if fig.picks else None, 2),
        "sim_seconds": _r(fig.sim_seconds, 3),
        "wall_seconds": _r(fig.wall_seconds, 2),
        "cpu_seconds": _r(fig.cpu_seconds, 2),
        # t, mean load, CV of that sample (the chart's curve)
        "series": [[_r(s[0], 3), _r(s[1], 3), _r(s[5] / s[1] if s[1] else 0.0, 4)] for s in samples],
    }


COLUMNS = (
    ("policy", 20), ("max/mean", 8), ("p99/p50", 7), ("CV", 5), ("peak", 5), ("queued", 7), ("rejected", 8),
    ("TTFT p50", 8), ("TTFT p99", 8), ("E2E p50", 7), ("E2E p99", 7), ("cache hit", 9), ("decisions/s", 11),
)


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(reports: list[dict[str, Any]]) -> str:
    """Policies side by side; loads and latencies as defined in the module docstring."""
    head = " ".join(f"{name:<{w}}" if i == 0 else f"{name:>{w}}" for i, (name, w) in enumerate(COLUMNS))
    lines = [head, "-" * len(head)]
    for r in reports:
        load, ttft, e2e = r["load"], r["ttft_s"], r["e2e_s"]
        cells = [
            r["policy"], _cell(load["max_over_mean"], ".2f"), _cell(load["p99_over_p50"], ".2f"),
            _cell(load["cv"], ".3f"), _cell(load["peak"], ".0f"), str(r["queued"]), str(r["rejected"]),
            _cell(ttft["p50"], ".3f"), _cell(ttft["p99"], ".3f"), _cell(e2e["p50"], ".2f"),
            _cell(e2e["p99"], ".2f"), _cell(100 * r["prefix_cache_hit_rate"], ".1f") + "%",
            _cell(r["decisions_per_s"], ",d"),
        ]
        lines.append(" ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                              for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS, strict=True))))
    return "\n".join(lines)
