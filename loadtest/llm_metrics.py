"""Token-level figures of a locust run (TTFT, inter-token latency, tokens/s, output tokens), kept
out of locust's request statistics.

Role: the locustfile records, per kind of request (``chat``, ``stream``, ``session``), the time to
the first token, every gap between two content chunks, each stream's decode rate and each answer's
output token count. This module stores them, merges them across locust workers in a distributed
run, and at the end writes them out: ``<csv prefix>_llm.csv`` (one row per metric and kind),
``<csv prefix>_llm.json`` (the same rows plus the run's duration and output-token throughput), a
table on the console, and a section appended to the HTML report.

Why a store of its own, and not ``events.request``: locust adds every ``request`` event to its
Aggregated row (``RequestStats.log_request`` logs into ``total`` unconditionally, whatever the
name or request_type; locust issue #2289 asked for a way out and was closed without one). The old
locustfile reported TTFT that way, so every stream counted twice and requests/s was inflated by
about half. Here the figures go to a separate ``locust.stats.RequestStats`` instance that locust's
totals, console table, CSV and HTML never read. It still uses locust's own ``StatsEntry``: the same
percentile buckets and rounding as the request rows, memory bounded by the number of distinct
rounded values (not by the number of samples: a run records one ITL sample per token), and a
serialised form that ``report_to_master``/``worker_report`` can carry, which a plain list of
samples would not give us.

Invariants:
- Nothing here fires a locust event: the Aggregated row counts exactly the HTTP requests sent.
- Values are stored as ``round(value * scale)`` in the entries (ITL in tenths of a millisecond, so a
  5 ms gap keeps its 0.1 ms resolution under locust's 2-significant-digit bucketing) and divided
  back on output; every figure written out is in the metric's ``unit``.
- Only a completed, valid answer is recorded; a failed or interrupted request records nothing.
"""

from __future__ import annotations

import csv
import html
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from locust.env import Environment
from locust.runners import WorkerRunner
from locust.stats import RequestStats, StatsEntry


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    scale: float  # stored value = value * scale (see the module docstring)
    meaning: str


TTFT = Metric("TTFT", "ms", 1.0, "request sent to the first content chunk")
ITL = Metric("ITL", "ms", 10.0, "gap between two consecutive content chunks (every gap of every stream)")
DECODE = Metric("tokens/s", "tok/s", 1.0, "per stream: (output tokens - 1) / (last chunk - first chunk)")
OUTPUT = Metric("output tokens", "tokens", 1.0, "per answer: usage.completion_tokens, else content chunks")
METRICS = (TTFT, ITL, DECODE, OUTPUT)
KINDS = ("chat", "stream", "session")
PERCENTILES = (0.5, 0.9, 0.95, 0.99)
# What report_to_master carries under this key: the entries' stripped reports since the last one.
REPORT_KEY = "shardgate_llm_metrics"


def _order(entry: StatsEntry) -> tuple[int, int, str]:
    names = [m.name for m in METRICS]
    metric = names.index(entry.method) if entry.method in names else len(names)
    kind = KINDS.index(entry.name) if entry.name in KINDS else len(KINDS)
    return metric, kind, entry.name


class LLMMetrics:
    """The store; ``attach`` it to the environment from ``events.init`` (the locustfile does)."""

    def __init__(self) -> None:
        # No response-times cache: that only serves locust's "current" (last 10 s) percentiles.
        self.stats = RequestStats(use_response_times_cache=False)
        self.environment: Environment | None = None
        self.started: float | None = None
        self.stopped: float | None = None

    # ---- recording (called by the users, in their greenlets) ----

    def record(self, metric: Metric, kind: str, value: float) -> None:
        self.stats.get(kind, metric.name).log(round(value * metric.scale), 0)

    def first_token(self, kind: str, seconds: float) -> None:
        self.record(TTFT, kind, seconds * 1000.0)

    def inter_token(self, kind: str, seconds: float) -> None:
        self.record(ITL, kind, seconds * 1000.0)

    def decode_rate(self, kind: str, tokens_per_second: float) -> None:
        self.record(DECODE, kind, tokens_per_second)

    def output_tokens(self, kind: str, tokens: int) -> None:
        self.record(OUTPUT, kind, tokens)

    # ---- locust hooks ----

    def attach(self, environment: Environment, **_: Any) -> None:
        self.environment = environment
        events = environment.events
        events.test_start.add_listener(self._on_test_start)
        events.test_stop.add_listener(self._on_test_stop)
        events.report_to_master.add_listener(self._on_report_to_master)
        events.worker_report.add_listener(self._on_worker_report)
        # "quit" fires after locust wrote its HTML report and printed its own tables, so the HTML
        # file exists to be extended and our table comes last on the console.
        events.quit.add_listener(self._on_quit)

    def _on_test_start(self, **_: Any) -> None:
        self.stats.reset_all()
        self.started, self.stopped = time.time(), None

    def _on_test_stop(self, **_: Any) -> None:
        self.stopped = time.time()

    def _on_report_to_master(self, client_id: str, data: dict[str, Any], **_: Any) -> None:
        data[REPORT_KEY] = [entry.get_stripped_report() for entry in self.stats.entries.values()]

    def _on_worker_report(self, client_id: str, data: dict[str, Any], **_: Any) -> None:
        for report in data.get(REPORT_KEY, ()):
            entry = StatsEntry.unserialize(report, self.stats)
            self.stats.get(entry.name, entry.method).extend(entry)

    def _on_quit(self, **_: Any) -> None:
        env = self.environment
        if env is None or isinstance(env.runner, WorkerRunner):
            return  # a worker's figures went to the master; only the master (or a local run) reports
        options = env.parsed_options
        prefix = getattr(options, "csv_prefix", None)
        if prefix:
            self.write_csv(Path(f"{prefix}_llm.csv"))
            Path(f"{prefix}_llm.json").write_text(json.dumps(self.summary(), indent=1) + "\n")
        html_file = getattr(options, "html_file", None)
        if html_file and Path(html_file).exists():
            self.extend_html(Path(html_file))
        print(self.table(), flush=True)

    # ---- output ----

    def duration(self) -> float:
        if self.started is None:
            return 0.0
        return max((self.stopped or time.time()) - self.started, 1e-9)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per (metric, kind) with figures in the metric's unit."""
        scales = {m.name: m for m in METRICS}
        out = []
        for entry in sorted(self.stats.entries.values(), key=_order):
            metric = scales[entry.method]
            if not entry.num_requests:
                continue

            def unscale(value: float, metric: Metric = metric) -> float:
                return round(value / metric.scale, 2)

            row: dict[str, Any] = {
                "metric": metric.name, "kind": entry.name, "unit": metric.unit,
                "count": entry.num_requests, "mean": unscale(entry.avg_response_time),
                "min": unscale(entry.min_response_time or 0), "max": unscale(entry.max_response_time),
            }
            for p in PERCENTILES:
                row[f"p{round(p * 100)}"] = unscale(entry.get_response_time_percentile(p))
            row["sum"] = unscale(entry.total_response_time)
            out.append(row)
        return out

    def summary(self) -> dict[str, Any]:
        rows = self.rows()
        duration = self.duration()
        tokens = {r["kind"]: r["sum"] for r in rows if r["metric"] == OUTPUT.name}
        throughput = {kind: round(n / duration, 1) for kind, n in tokens.items()}
        throughput["all"] = round(sum(tokens.values()) / duration, 1)
        return {"duration_s": round(duration, 2), "rows": rows, "output_tokens_per_s": throughput,
                "definitions": {m.name: f"{m.meaning} ({m.unit})" for m in METRICS}}

    def write_csv(self, path: Path) -> None:
        rows = self.rows()
        fields = ["metric", "kind", "unit", "count", "mean", "min",
                  *[f"p{round(p * 100)}" for p in PERCENTILES], "max", "sum"]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    def table(self) -> str:
        head = (f"{'metric':<16} {'kind':<8} {'count':>7} {'mean':>8} {'p50':>8} {'p90':>8} {'p99':>8} "
                f"{'max':>8}")
        lines = ["Token-level metrics (not requests; the request rows above are the only requests):",
                 head, "-" * len(head)]
        for r in self.rows():
            label = f"{r['metric']} ({r['unit']})" if r["unit"] != "tokens" else r["metric"]
            lines.append(f"{label:<16} {r['kind']:<8} {r['count']:>7} {r['mean']:>8.1f} {r['p50']:>8.1f} "
                         f"{r['p90']:>8.1f} {r['p99']:>8.1f} {r['max']:>8.1f}")
        summary = self.summary()
        rates = ", ".join(f"{k} {v}" for k, v in summary["output_tokens_per_s"].items())
        lines.append(f"output tokens/s over {summary['duration_s']} s: {rates}")
        return "\n".join(lines)

    def html_section(self) -> str:
        cols = ["metric", "kind", "unit", "count", "mean", "p50", "p90", "p95", "p99", "max"]
        cell = "border:1px solid #888;padding:2px 8px;text-align:right"
        head = "".join(f"<th style='{cell}'>{c}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td style='{cell}'>{html.escape(str(r[c]))}</td>" for c in cols)
                       + "</tr>" for r in self.rows())
        summary = self.summary()
        rates = ", ".join(f"{k} {v}" for k, v in summary["output_tokens_per_s"].items())
        notes = "".join(f"<li>{html.escape(name)}: {html.escape(text)}</li>"
                        for name, text in summary["definitions"].items())
        return ("\n<section id='shardgate-llm-metrics' style='font-family:sans-serif;margin:2em'>"
                "<h2>Token-level metrics (not counted as requests)</h2>"
                f"<table style='border-collapse:collapse'><tr>{head}</tr>{body}</table>"
                f"<p>Output tokens/s over {summary['duration_s']} s: {html.escape(rates)}</p>"
                f"<ul>{notes}</ul></section>\n")

    def extend_html(self, path: Path) -> None:
        text = path.read_text(encoding="utf-8")
        section = self.html_section()
        at = text.rfind("</body>")
        path.write_text(text[:at] + section + text[at:] if at >= 0 else text + section, encoding="utf-8")
