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

from shm.loadboard import REFUSAL_REASONS
from shm.schema import Snapshot

_ROUTER_COUNTERS = (
    ("requests", "shardgate_requests_total", "Requests answered by the router (proxied or refused)."),
    ("errors", "shardgate_request_errors_total", "Requests that ended in a router error or truncation."),
    ("retries", "shardgate_retries_total", "Requests moved to another worker after a failure."),
    ("client_disconnects", "shardgate_client_disconnects_total",
     "Requests whose client went away before the response was complete."),
)
_WORKER_SERIES = (
    ("requests", "shardgate_worker_requests_total", "counter", "Requests sent to the worker."),
    ("errors", "shardgate_worker_errors_total", "counter", "Failed requests to the worker."),
    ("connect_errors", "shardgate_worker_connect_errors_total", "counter",
     "Failed connection attempts to the worker."),
    ("streams", "shardgate_worker_streams_total", "counter", "Streamed (SSE) responses from the worker."),
    ("in_flight", "shardgate_worker_in_flight_requests", "gauge", "Requests in flight to the worker."),
    ("latency_ewma_seconds", "shardgate_worker_latency_ewma_seconds", "gauge",
     "Moving average of request latency (EWMA, alpha 0.2)."),
    ("ttfb_ewma_seconds", "shardgate_worker_ttfb_ewma_seconds", "gauge",
     "Moving average of time to the worker's response head (EWMA, alpha 0.2)."),
)


_ADMISSION_REASONS = ("queue_full", "queue_timeout", "rate_limited", "shutdown")


def rejected_by_reason(proxies: list[dict[str, Any]]) -> dict[str, int]:
    """Requests refused before routing, by reason, summed over proxy rows (``LoadBoard.proxy_row``).

    Every reason is present (zeros included); "other" is the total minus the named reasons, so
    the values always add up to the ``rejected`` total."""
    out = {why: sum(int(p[f"refused_{why}"]) for p in proxies) for why in REFUSAL_REASONS}
    out["other"] = max(0, sum(int(p["rejected"]) for p in proxies) - sum(out.values()))
    return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(snap: Snapshot, proxies: list[dict[str, Any]], workers: list[dict[str, Any]],
                   version: str, decisions: dict[str, tuple[int, int]] | None = None,
                   coordinator_up: bool = True) -> str:
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    family("shardgate_build_info", "gauge", "Build information.")
    lines.append(f'shardgate_build_info{{version="{version}"}} 1')
    for key, name, help_text in _ROUTER_COUNTERS:
        family(name, "counter", help_text)
        lines.append(f"{name} {sum(int(p[key]) for p in proxies)}")
    family("shardgate_requests_rejected_total", "counter",
           "Requests the router refused before routing them, by reason (bad HTTP or JSON, limits, "
           "unknown model or path, admission control); summed over reasons: all refusals.")
    for why, count in rejected_by_reason(proxies).items():
        lines.append(f'shardgate_requests_rejected_total{{reason="{why}"}} {count}')
    family("shardgate_in_flight_requests", "gauge", "Requests in flight across all proxies.")
    lines.append(f"shardgate_in_flight_requests {sum(int(p['in_flight']) for p in proxies)}")
    _admission(lines, family, proxies)
    family("shardgate_proxies", "gauge", "Proxy processes configured.")
    lines.append(f"shardgate_proxies {len(proxies)}")
    family("shardgate_snapshot_generation", "gauge", "Generation of the routing snapshot in use.")
    lines.append(f"shardgate_snapshot_generation {snap.generation}")
    family("shardgate_snapshot_age_seconds", "gauge",
           "Seconds since the routing snapshot in use was published (grows while the coordinator is gone).")
    lines.append(f"shardgate_snapshot_age_seconds {max(time.time() - snap.created_at, 0.0):.3f}")
    family("shardgate_coordinator_up", "gauge",
           "1 while the coordinator runs (as the answering proxy sees it).")
    lines.append(f"shardgate_coordinator_up {1 if coordinator_up else 0}")
    family("shardgate_discovery_source_up", "gauge", "1 when a discovery source's last sync worked.")
    for source, error in sorted(snap.sources.items()):
        lines.append(f'shardgate_discovery_source_up{{source="{_escape(source)}"}} {0 if error else 1}')
    family("shardgate_notices", "gauge", "Problems the coordinator reports in /workers notices.")
    lines.append(f"shardgate_notices {len(snap.notices)}")
    family("shardgate_worker_ejected", "gauge", "1 while passive health keeps the worker out.")
    for w in workers:
        ejected = 1 if w.get("ejected") else 0
        lines.append(f'shardgate_worker_ejected{{worker="{_escape(w["url"])}"}} {ejected}')
    family("shardgate_worker_healthy", "gauge", "1 when the worker is healthy and not draining.")
    for w in workers:
        ok = 1 if w["healthy"] and not w["draining"] else 0
        lines.append(f'shardgate_worker_healthy{{worker="{_escape(w["url"])}"}} {ok}')
    for key, name, kind, help_text in _WORKER_SERIES:
        family(name, kind, help_text)
        for w in workers:
            lines.append(f'{name}{{worker="{_escape(w["url"])}"}} {w[key]}')
    family("shardgate_policy_decisions_total", "counter", "Routing decisions made, per policy.")
    for policy, (made, _) in sorted((decisions or {}).items()):
        lines.append(f'shardgate_policy_decisions_total{{policy="{policy}"}} {made}')
    family("shardgate_policy_fallbacks_total", "counter",
           "Decisions where the policy fell back (no key, backup shard, imbalance, cache miss...).")
    for policy, (_, fell) in sorted((decisions or {}).items()):
        lines.append(f'shardgate_policy_fallbacks_total{{policy="{policy}"}} {fell}')
    return "\n".join(lines) + "\n"


def _admission(lines: list[str], family: Any, proxies: list[dict[str, Any]]) -> None:
    """Admission control (docs/overload.md): queue depth and waits, admissions, refusals by reason."""
    def total(key: str) -> Any:
        return sum(p[key] for p in proxies)

    family("shardgate_admission_queue_depth", "gauge", "Requests waiting in the admission queues.")
    lines.append(f"shardgate_admission_queue_depth {int(total('queued'))}")
    family("shardgate_admission_queue_wait_seconds", "summary",
           "Time admitted requests spent in the admission queue.")
    lines.append(f"shardgate_admission_queue_wait_seconds_sum {float(total('queue_wait_seconds'))!r}")
    lines.append(f"shardgate_admission_queue_wait_seconds_count {int(total('queue_waits'))}")
    family("shardgate_admission_admitted_total", "counter",
           "Requests admission control let through (at once or after waiting).")
    lines.append(f"shardgate_admission_admitted_total {int(total('admitted'))}")
    family("shardgate_admission_rejected_total", "counter",
           "Requests admission control refused, by reason (429 rate_limited; 503 otherwise).")
    for why in _ADMISSION_REASONS:
        lines.append(f'shardgate_admission_rejected_total{{reason="{why}"}} {int(total(f"rejected_{why}"))}')
    family("shardgate_admission_abandoned_total", "counter",
           "Queued requests whose client disconnected before they were admitted.")
    lines.append(f"shardgate_admission_abandoned_total {int(total('queue_abandoned'))}")
