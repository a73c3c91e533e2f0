"""The router's own endpoints, answered by whichever proxy process receives them.

Role: ``/health``, ``/readiness``, ``/v1/models``, and the back office (``/stats``, ``/workers``,
``/metrics``, ``/routers``, ``/route/explain``, the status page ``/dashboard`` and its
``/dashboard.json``), on the data port or the ops listener. Figures
are totals across all proxy processes, read from the shared-memory load board, so the answer does
not depend on which process the kernel handed the connection to.

Invariant: nothing here is on the proxied request path; clarity beats microseconds.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import msgspec
import psutil

from proxy_workers.errors import MethodNotAllowed, NotFound
from proxy_workers.policies.registry import POLICY_INDEX
from proxy_workers.routing.decision import describe, prepare
from proxy_workers.routing.paths import PROXIED_PATHS
from proxy_workers.routing.table import PDRoute, routable
from proxy_workers.serving import dashboard
from proxy_workers.serving.metrics import rejected_by_reason, render_metrics
from shm.loadboard import P_PID
from shm.schema import Snapshot, Worker

if TYPE_CHECKING:
    from proxy_workers.forwarding.request import Request
    from proxy_workers.serving.state import ProxyProcess

VERSION = "0.1.0"
_JSON = b"application/json"
_encode = msgspec.json.Encoder().encode
_processes: dict[int, psutil.Process] = {}


# The back office: what an operator reads (worker URLs, figures, decisions), not a client. With
# an ops listener (ops_port) it is served there only; else on the data port, behind the API key
# when keys are on (docs/api-keys.md). The status page is the back office drawn (docs/dashboard.md).
BACK_OFFICE = frozenset({"/workers", "/stats", "/metrics", "/routers", "/route/explain",
                         "/dashboard", "/dashboard.json"})
OPS_PATHS = BACK_OFFICE | {"/health", "/readiness"}


def answer(proc: ProxyProcess, request: Request, ops: bool = False) -> tuple[int, bytes, bytes]:
    """(status, body, content type) for a router endpoint; raises RouterError otherwise.

    ``ops``: the request came to the ops listener, which serves :data:`OPS_PATHS` only; the data
    port refuses the back office while an ops listener serves it."""
    path = request.path.decode("latin-1")
    if ops:
        if path not in OPS_PATHS:
            raise NotFound(f"no route for {path} on the ops listener; it serves "
                           + ", ".join(sorted(OPS_PATHS)))
    elif path in BACK_OFFICE and proc.settings.ops_port:
        raise NotFound(f"no route for {path} on this port (the back office is on the ops listener)")
    if path == "/route/explain":
        if request.method != b"POST":
            raise MethodNotAllowed("/route/explain accepts POST only (the request body to explain)")
        return _explain(proc, request)
    handler = _GET.get(path)
    if handler is None and path.startswith("/v1/models/"):
        return _model(proc, path[len("/v1/models/"):])
    if handler is None:
        raise NotFound(f"no route for {path}; the router proxies /v1/* and "
                       + ", ".join(p.decode() for p in PROXIED_PATHS) + " and serves /health, "
                       "/readiness, /v1/models, /stats, /workers, /routers, /metrics, "
                       "/dashboard, POST /route/explain")
    if request.method not in (b"GET", b"HEAD"):
        raise MethodNotAllowed(f"{path} accepts GET only")
    return handler(proc)


def _explain(proc: ProxyProcess, request: Request) -> tuple[int, bytes, bytes]:
    """The routing decision for a request body, without sending it anywhere."""
    request.explain = True
    route, ctx = prepare(proc, request, dry_run=True)
    if isinstance(route, PDRoute):
        prefill = route.prefill.pick(ctx)
        worker = route.decode.pick(ctx)
        decision = describe(route.decode, ctx, worker)
        decision["prefill_worker"] = prefill.url
        decision["pd_dialect"] = route.dialect
        return 200, _encode(decision), _JSON
    worker = route.pick(ctx)
    return 200, _encode(describe(route, ctx, worker)), _JSON


def _routers(proc: ProxyProcess) -> tuple[int, bytes, bytes]:
    """The four routers and their models, in the seed's form; a router with no model is absent."""
    routers = _snapshot(proc).routers
    body = {"routers": [{name: list(models)} for name, models in routers.items()]}
    return 200, _encode(body), _JSON


def _snapshot(proc: ProxyProcess) -> Snapshot:
    return proc.latest_table().snapshot


def _health(proc: ProxyProcess) -> tuple[int, bytes, bytes]:
    """Up (200) while this proxy serves, coordinator or not; says how old its snapshot is."""
    snap = _snapshot(proc)
    healthy = sum(1 for w in snap.workers if routable(w))
    return 200, _encode({"status": "ok", "healthy_workers": healthy, "workers": len(snap.workers),
                         "coordinator": "gone" if proc.orphaned_since else "running",
                         "snapshot_generation": snap.generation,
                         "snapshot_age_seconds": round(time.time() - snap.created_at, 3)}), _JSON


def _readiness(proc: ProxyProcess) -> tuple[int, bytes, bytes]:
    table = proc.latest_table()
    unready = sorted(m for m in table.routes if not table.serving(m)[0])
    ready = bool(table.routes) and not unready
    body = {"status": "ready" if ready else "not ready", "unready_models": unready}
    return (200 if ready else 503), _encode(body), _JSON


def _model_entry(model: str, healthy: int, total: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "shardgate",
            "healthy_workers": healthy, "workers": total}


def _models(proc: ProxyProcess) -> tuple[int, bytes, bytes]:
    table = proc.latest_table()
    served = {m: table.serving(m) for m in sorted(table.routes)}
    data = [_model_entry(m, healthy, total) for m, (healthy, total) in served.items() if healthy]
    for alias, targets in sorted(table.aliases.items()):
        live = [m for m in targets if served.get(m, (0, 0))[0]]
        if live:
            entry = _model_entry(alias, sum(served[m][0] for m in live), sum(served[m][1] for m in live))
            entry["alias_of"] = dict(targets)
            data.append(entry)
    return 200, _encode({"object": "list", "data": data}), _JSON


def _model(proc: ProxyProcess, name: str) -> tuple[int, bytes, bytes]:
    healthy, total = proc.latest_table().serving(name)
    if not healthy:
        raise NotFound(f"The model '{name}' does not exist or is not served here.")
    return 200, _encode(_model_entry(name, healthy, total)), _JSON


def _worker_view(proc: ProxyProcess, w: Worker, proxies: int) -> dict[str, Any]:
    totals = proc.board.worker_totals(w.slot, proxies)
    return {"url": w.url, "slot": w.slot, "models": list(w.models), "type": w.type,
            "connection": w.connection, "weight": w.weight, "labels": w.labels, "shard": w.shard,
            "healthy": w.healthy, "draining": w.draining, "health_reason": w.health_reason,
            "ejected": w.ejected, **totals,
            # What the engine says of itself (least_loaded); engine_scraped_at 0: never scraped.
            **proc.board.engine(w.slot)}


def _workers(proc: ProxyProcess) -> tuple[int, bytes, bytes]:
    snap = _snapshot(proc)
    workers = [_worker_view(proc, w, snap.proxies) for w in snap.workers]
    return 200, _encode({"workers": workers, "notices": list(snap.notices), "sources": snap.sources}), _JSON


def _proxy_rows(proc: ProxyProcess, proxies: int) -> list[dict[str, Any]]:
    rows = []
    for index in range(proxies):
        row = proc.board.proxy_row(index)
        pid = int(row["pid"])
        row["index"] = index
        row.update(_process_figures(pid))
        rows.append(row)
    return rows


def _process_figures(pid: int) -> dict[str, Any]:
    if not pid:
        return {"alive": False}
    try:
        process = _processes.get(pid)
        if process is None:
            process = _processes[pid] = psutil.Process(pid)
        cpu = process.cpu_times()
        return {"alive": True, "rss_bytes": process.memory_info().rss,
                "cpu_seconds": round(cpu.user + cpu.system, 3),
                "cpu_percent": process.cpu_percent(None)}
    except psutil.Error:
        _processes.pop(pid, None)
        return {"alive": False}


def _stats(proc: ProxyProcess) -> tuple[int, bytes, bytes]:
    snap = _snapshot(proc)
    proxies = _proxy_rows(proc, snap.proxies)
    keys = ("requests", "errors", "rejected", "in_flight", "client_disconnects", "retries")
    totals = {k: sum(int(p[k]) for p in proxies) for k in keys}
    workers = [_worker_view(proc, w, snap.proxies) for w in snap.workers]
    body = {"totals": totals, "rejected_by_reason": rejected_by_reason(proxies),
            "admission": _admission(proc, proxies), "proxies": proxies, "workers": workers,
            "snapshot": {"generation": snap.generation,
                         "age_seconds": round(time.time() - snap.created_at, 3),
                         "coordinator_pid": snap.coordinator_pid},
            "answered_by": {"index": proc.index, "pid": int(proc.ints[proc.row + P_PID])}}
    return 200, _encode(body), _JSON


ADMISSION_REASONS = ("queue_full", "queue_timeout", "rate_limited", "shutdown")


def _admission(proc: ProxyProcess, proxies: list[dict[str, Any]]) -> dict[str, Any]:
    """Admission control's figures summed over proxies, and the limits in force (docs/overload.md)."""
    def total(key: str) -> Any:
        return sum(p[key] for p in proxies)

    s = proc.settings
    waits = int(total("queue_waits"))
    wait_seconds = float(total("queue_wait_seconds"))
    return {"enabled": proc.limits_on, "queued": int(total("queued")), "admitted": int(total("admitted")),
            "queue_waits": waits, "queue_wait_seconds_total": round(wait_seconds, 6),
            "queue_wait_mean_seconds": round(wait_seconds / waits, 6) if waits else 0.0,
            "rejected": {r: int(total(f"rejected_{r}")) for r in ADMISSION_REASONS},
            "abandoned": int(total("queue_abandoned")),
            "limits": {"max_concurrent_requests": s.max_concurrent_requests, "queue_size": s.queue_size,
                       "queue_timeout": s.queue_timeout, "rate_limit_rpm": s.rate_limit_rpm,
                       "rate_limit_tpm": s.rate_limit_tpm,
                       "capped_workers": sum(1 for w in _snapshot(proc).workers if w.max_concurrency)}}


def _metrics(proc: ProxyProcess) -> tuple[int, bytes, bytes]:
    snap = _snapshot(proc)
    proxies = _proxy_rows(proc, snap.proxies)
    workers = [_worker_view(proc, w, snap.proxies) for w in snap.workers]
    decisions = {name: proc.board.decisions(index, snap.proxies) for name, index in POLICY_INDEX.items()}
    text = render_metrics(snap, proxies, workers, VERSION, decisions, not proc.orphaned_since, proc.board)
    return 200, text.encode(), b"text/plain; version=0.0.4; charset=utf-8"


def _dashboard(proc: ProxyProcess) -> tuple[int, bytes, bytes]:
    """The status page itself: the same static bytes for every fleet (its data is polled)."""
    return dashboard.answer_page()


def _dashboard_json(proc: ProxyProcess) -> tuple[int, bytes, bytes]:
    """What the status page polls: /workers, /routers and /stats' totals and decisions in one read."""
    snap = _snapshot(proc)
    proxies = _proxy_rows(proc, snap.proxies)
    views = [_worker_view(proc, w, snap.proxies) for w in snap.workers]
    decisions = {name: proc.board.decisions(index, snap.proxies) for name, index in POLICY_INDEX.items()}
    answered_by = {"index": proc.index, "pid": int(proc.ints[proc.row + P_PID])}
    body = dashboard.document(snap, views, proxies, decisions, not proc.orphaned_since, answered_by, VERSION)
    return 200, _encode(body), dashboard.json_type()


_GET = {"/routers": _routers, "/health": _health, "/readiness": _readiness, "/v1/models": _models,
        "/stats": _stats, "/workers": _workers, "/metrics": _metrics,
        "/dashboard": _dashboard, "/dashboard.json": _dashboard_json}
