"""The live status page: ``/dashboard`` (a static HTML page) and ``/dashboard.json`` (its data).

Role: serves ``static/dashboard.html`` (plain HTML, one inline script, one inline style: no
build step, no CDN, works offline) and builds the one JSON document the page polls: workers with
their state, routers and their models, decisions per policy, proxies and totals. The figures are
the load board's, gathered by :mod:`proxy_workers.serving.endpoints` (as for ``/stats``) and
shaped here. Both paths are in ``endpoints.BACK_OFFICE``, so the one rule that places the back
office (data port or ops listener, API key or not) places the dashboard too (docs/dashboard.md).

Invariants:
- No server-side history: rates and the chart are computed by the page from successive polls
  (differences of monotonic counters over the server's ``generated_at``). A ring kept here would
  be per proxy process, and successive polls are answered by whichever proxy the kernel picks,
  so the page would see N different histories; the load board holds none (nothing on the request
  path records time series), so the page's own memory is the only consistent one.
- Nothing here runs on the proxied request path: the page and its JSON cost only when asked for.
- The page treats every string from the fleet as text (``textContent``, attributes through
  ``setAttribute``, never ``innerHTML``); the Content-Security-Policy admits only the page's own
  inline script and style (by their SHA-256), so injected markup could not run anyway.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from functools import cache
from importlib import resources
from typing import Any

from shm.schema import Snapshot, Worker

# endpoints.answer returns (status, body, content type) and the response writer puts the content
# type on its own ``content-type:`` line: the page's other header lines ride on that value (the
# same trick as the upstream key on the Host line, proxy_workers/serving/auth.py). They are fixed
# literals and hashes computed here, never request data, so nothing can inject a line.
_JSON_TYPE = b"application/json\r\ncache-control: no-store\r\nx-content-type-options: nosniff"
_STATIC = "static/dashboard.html"
_INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.S)
WORKER_FIELDS = ("in_flight", "requests", "errors", "connect_errors", "streams",
                 "ttfb_ewma_seconds", "latency_ewma_seconds", "last_error_at")


@cache
def page() -> tuple[bytes, bytes]:
    """(the page's bytes, its content type with its other header lines), read once per process."""
    html = resources.files("proxy_workers.serving").joinpath(_STATIC).read_bytes()
    # The CSP names the page's inline script and style by the SHA-256 of their exact text.
    found = {kind.decode(): _hash(text) for kind, text in _INLINE.findall(html)}
    if len(_INLINE.findall(html)) != 2 or set(found) != {"script", "style"}:
        raise RuntimeError(f"{_STATIC} must hold exactly one inline script and one inline style")
    csp = (f"default-src 'none'; script-src {found['script']}; style-src {found['style']};"
           " connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none';"
           " frame-ancestors 'none'")
    # no-cache: the browser revalidates (here: refetches; 12 KiB) so an upgrade's page is seen at
    # once; the page is the same for every fleet, its data comes from /dashboard.json (no-store).
    content_type = (b"text/html; charset=utf-8\r\ncache-control: no-cache\r\n"
                    b"x-content-type-options: nosniff\r\nreferrer-policy: no-referrer\r\n"
                    b"content-security-policy: " + csp.encode())
    return html, content_type


def _hash(text: bytes) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text).digest()).decode() + "'"


def answer_page() -> tuple[int, bytes, bytes]:
    body, content_type = page()
    return 200, body, content_type


def worker_state(w: Worker) -> str:
    """One word for the page: ejected (passive health), unhealthy (active checks), draining, healthy.

    Ejected first: an ejected worker is also not ``healthy``, and ejection is the more specific
    reason; draining shows only for a worker that is otherwise healthy."""
    if w.ejected:
        return "ejected"
    if not w.healthy:
        return "unhealthy"
    if w.draining:
        return "draining"
    return "healthy"


def _worker(w: Worker, view: dict[str, Any]) -> dict[str, Any]:
    return {"url": w.url, "models": list(w.models), "type": w.type, "connection": w.connection,
            "weight": w.weight, "shard": w.shard, "state": worker_state(w), "reason": w.health_reason,
            **{k: view[k] for k in WORKER_FIELDS}}


def document(snap: Snapshot, views: list[dict[str, Any]], proxies: list[dict[str, Any]],
             decisions: dict[str, tuple[int, int]], coordinator: bool,
             answered_by: dict[str, int], version: str) -> dict[str, Any]:
    """The ``/dashboard.json`` document. ``views``: the ``/workers`` rows, in snapshot order."""
    keys = ("requests", "errors", "rejected", "in_flight", "client_disconnects", "retries")
    totals = {k: sum(int(p[k]) for p in proxies) for k in keys}
    workers = [_worker(w, v) for w, v in zip(snap.workers, views, strict=True)]
    totals["workers"] = len(workers)
    totals["healthy_workers"] = sum(1 for w in workers if w["state"] == "healthy")
    return {
        "generated_at": time.time(),
        "version": version,
        "coordinator": "running" if coordinator else "gone",
        "snapshot": {"generation": snap.generation, "age_seconds": round(time.time() - snap.created_at, 3)},
        "answered_by": answered_by,
        "totals": totals,
        "workers": workers,
        "routers": [{"name": name, "models": list(models)} for name, models in snap.routers.items()],
        "decisions": [{"policy": name, "decisions": made, "fallbacks": fell}
                      for name, (made, fell) in decisions.items()],
        "proxies": [{"index": p["index"], "pid": int(p["pid"]), "alive": p["alive"],
                     "requests": int(p["requests"]), "in_flight": int(p["in_flight"]),
                     "restarts": int(p["restarts"]), "rss_bytes": p.get("rss_bytes", 0),
                     "cpu_percent": p.get("cpu_percent", 0.0)} for p in proxies],
        "notices": list(snap.notices),
    }


def json_type() -> bytes:
    return _JSON_TYPE
