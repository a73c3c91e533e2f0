"""The comparison chart (PNG), drawn with matplotlib when the ``plot`` extra is installed.

Role: one figure per comparison: bars per policy for tail latency, load spread, prefix-cache hit
rate and decisions/s, and the coefficient of variation of per-worker load over simulated time.
Invariant: matplotlib is imported only here, only when a chart is asked for, with the Agg backend
(no display needed).
"""

from __future__ import annotations

from typing import Any

BARS = (
    ("TTFT p99 (s)", lambda r: r["ttft_s"]["p99"]),
    ("end-to-end p99 (s)", lambda r: r["e2e_s"]["p99"]),
    ("load max/mean (time-averaged)", lambda r: r["load"]["max_over_mean"] or 0.0),
    ("prefix-cache hit rate (%)", lambda r: 100 * r["prefix_cache_hit_rate"]),
    ("decisions/s (policy code)", lambda r: r["decisions_per_s"] or 0),
)


def plot(reports: list[dict[str, Any]], path: str, title: str) -> str | None:
    """Write the chart to ``path``; returns an error message instead when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return "--plot needs matplotlib: pip install 'shardgate[plot]'"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["policy"] for r in reports]
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(reports))]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (label, value) in zip(axes.flat, BARS, strict=False):
        values = [value(r) for r in reports]
        ax.bar(range(len(names)), values, color=colors)
        ax.set_title(label, fontsize=10)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        if label.startswith("decisions") and max(values, default=0) > 0:
            ax.set_yscale("log")
        for i, v in enumerate(values):
            ax.annotate(f"{v:,.0f}" if v >= 100 else f"{v:.2f}", (i, v), ha="center", va="bottom", fontsize=7)
    ax = axes.flat[-1]
    for r, color in zip(reports, colors, strict=True):
        series = r["series"]
        ax.plot([s[0] for s in series], [s[2] for s in series], label=r["policy"], color=color)
    ax.set_title("per-worker load CV over simulated time", fontsize=10)
    ax.set_xlabel("s", fontsize=8)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
