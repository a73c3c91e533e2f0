"""Prometheus text exposition of the router's figures, totals across all proxy processes.

Role: render what the load board and the snapshot say in the Prometheus text format (0.0.4).
The board already aggregates across processes, so prometheus_client's multiprocess mode (a
directory of mmap files per process) is not needed.

Invariants: names carry the ``shardgate_`` prefix and base units; counters end in ``_total``;
label values are bounded (worker URLs from the configured fleet, never request data).
"""

from __future__ import annotations

import time
from typing import Any

from proxy_workers.serving.metrics_board import escape, model_families, proxy_families, worker_families
from shm.loadboard import REFUSAL_REASONS, LoadBoard
from shm.metricdefs import BY_NAME
from shm.schema import Snapshot

_ROUTER_COUNTERS = (
    ("requests", "shardgate_requests_total"),
    ("errors", "shardgate_request_errors_total"),
    ("retries", "shardgate_retries_total"),
    ("client_disconnects", "shardgate_client_disconnects_total"),
)
_WORKER_SERIES = (
    ("requests", "shardgate_worker_requests_total"),
    ("errors", "shardgate_worker_errors_total"),
    ("connect_errors", "shardgate_worker_connect_errors_total"),
    ("streams", "shardgate_worker_streams_total"),
    ("in_flight", "shardgate_worker_in_flight_requests"),
    ("latency_ewma_seconds", "shardgate_worker_latency_ewma_seconds"),
    ("ttfb_ewma_seconds", "shardgate_worker_ttfb_ewma_seconds"),
)


_ADMISSION_REASONS = ("queue_full", "queue_timeout", "rate_limited", "shutdown")


def rejected_by_reason(proxies: list[dict[str, Any]]) -> dict[str, int]:
    """Requests refused before routing, by reason, summed over proxy rows (``LoadBoard.proxy_row``).

    Every reason is present (zeros included); "other" is the total minus the named reasons, so
    the values always add up to the ``rejected`` total."""
    out = {why: sum(int(p[f"refused_{why}"]) for p in proxies) for why in REFUSAL_REASONS}
    out["other"] = max(0, sum(int(p["rejected"]) for p in proxies) - sum(out.values()))
    return out


def render_metrics(snap: Snapshot, proxies: list[dict[str, Any]], workers: list[dict[str, Any]],
                   version: str, decisions: dict[str, tuple[int, int]] | None = None,
                   coordinator_up: bool = True, board: LoadBoard | None = None) -> str:
    lines: list[str] = []

    def family(name: str) -> None:
        declared = BY_NAME[name]  # the one declaration (shm.metricdefs)
        lines.append(f"# HELP {name} {declared.help}")
        lines.append(f"# TYPE {name} {declared.kind}")

    family("shardgate_build_info")
    lines.append(f'shardgate_build_info{{version="{version}"}} 1')
    for key, name in _ROUTER_COUNTERS:
        family(name)
        lines.append(f"{name} {sum(int(p[key]) for p in proxies)}")
    family("shardgate_retries_by_reason_total")
    by_status = sum(int(p["retries_status"]) for p in proxies)
    lines.append(f'shardgate_retries_by_reason_total{{reason="status"}} {by_status}')
    lines.append('shardgate_retries_by_reason_total{reason="failure"} '
                 f'{max(sum(int(p["retries"]) for p in proxies) - by_status, 0)}')
    family("shardgate_requests_rejected_total")
    for why, count in rejected_by_reason(proxies).items():
        lines.append(f'shardgate_requests_rejected_total{{reason="{why}"}} {count}')
    family("shardgate_in_flight_requests")
    lines.append(f"shardgate_in_flight_requests {sum(int(p['in_flight']) for p in proxies)}")
    _admission(lines, family, proxies)
    family("shardgate_proxies")
    lines.append(f"shardgate_proxies {len(proxies)}")
    family("shardgate_snapshot_generation")
    lines.append(f"shardgate_snapshot_generation {snap.generation}")
    family("shardgate_snapshot_age_seconds")
    lines.append(f"shardgate_snapshot_age_seconds {max(time.time() - snap.created_at, 0.0):.3f}")
    family("shardgate_coordinator_up")
    lines.append(f"shardgate_coordinator_up {1 if coordinator_up else 0}")
    family("shardgate_discovery_source_up")
    for source, error in sorted(snap.sources.items()):
        lines.append(f'shardgate_discovery_source_up{{source="{escape(source)}"}} {0 if error else 1}')
    family("shardgate_notices")
    lines.append(f"shardgate_notices {len(snap.notices)}")
    family("shardgate_worker_ejected")
    for w in workers:
        ejected = 1 if w.get("ejected") else 0
        lines.append(f'shardgate_worker_ejected{{worker="{escape(w["url"])}"}} {ejected}')
    family("shardgate_worker_healthy")
    for w in workers:
        ok = 1 if w["healthy"] and not w["draining"] else 0
        lines.append(f'shardgate_worker_healthy{{worker="{escape(w["url"])}"}} {ok}')
    for key, name in _WORKER_SERIES:
        family(name)
        for w in workers:
            lines.append(f'{name}{{worker="{escape(w["url"])}"}} {w[key]}')
    if board is not None:
        model_families(lines, family, snap, board)
        worker_families(lines, family, snap, board, workers)
    proxy_families(lines, family, proxies)
    family("shardgate_policy_decisions_total")
    for policy, (made, _) in sorted((decisions or {}).items()):
        lines.append(f'shardgate_policy_decisions_total{{policy="{policy}"}} {made}')
    family("shardgate_policy_fallbacks_total")
    for policy, (_, fell) in sorted((decisions or {}).items()):
        lines.append(f'shardgate_policy_fallbacks_total{{policy="{policy}"}} {fell}')
    return "\n".join(lines) + "\n"


def _admission(lines: list[str], family: Any, proxies: list[dict[str, Any]]) -> None:
    """Admission control (docs/overload.md): queue depth and waits, admissions, refusals by reason."""
    def total(key: str) -> Any:
        return sum(p[key] for p in proxies)

    family("shardgate_admission_queue_depth")
    lines.append(f"shardgate_admission_queue_depth {int(total('queued'))}")
    family("shardgate_admission_queue_wait_seconds")
    lines.append(f"shardgate_admission_queue_wait_seconds_sum {float(total('queue_wait_seconds'))!r}")
    lines.append(f"shardgate_admission_queue_wait_seconds_count {int(total('queue_waits'))}")
    family("shardgate_admission_admitted_total")
    lines.append(f"shardgate_admission_admitted_total {int(total('admitted'))}")
    family("shardgate_admission_rejected_total")
    for why in _ADMISSION_REASONS:
        lines.append(f'shardgate_admission_rejected_total{{reason="{why}"}} {int(total(f"rejected_{why}"))}')
    family("shardgate_admission_abandoned_total")
    lines.append(f"shardgate_admission_abandoned_total {int(total('queue_abandoned'))}")
