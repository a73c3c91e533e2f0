"""The data plane outlives the control plane.

When the coordinator is killed, its proxies keep serving the last snapshot and say so
(``/health``: ``coordinator: gone`` and the snapshot's age; ``/metrics``:
``shardgate_coordinator_up 0``). A coordinator started again on the same address replaces them:
its own proxies serve first, then the old ones drain. Requests run all the while; none may fail.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import psutil
from conftest import chat, get_json, http, wait_for


class Load(threading.Thread):
    """Requests in a loop, each on a fresh connection, until stopped; failures are kept."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.ok = 0
        self.failures: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.done.is_set():
            i += 1
            try:
                status, _, body = http("POST", self.url + "/v1/chat/completions", chat("m1", content=f"r{i}"),
                                       timeout=10)
            except OSError as exc:
                self.failures.append(repr(exc))
                continue
            if status == 200:
                self.ok += 1
            else:
                self.failures.append(f"{status} {body[:200]!r}")

    def stop(self) -> None:
        self.done.set()
        self.join(30)


def health(url: str) -> dict[str, Any]:
    status, _, body = http("GET", url + "/health")
    assert status == 200, body
    return json.loads(body)


def test_proxies_serve_through_a_coordinator_kill_and_a_new_coordinator_replaces_them(
        start_worker: Any, start_router: Any) -> None:
    worker = start_worker(["m1"])
    first = start_router([worker.url], "--proxies", "2")
    port = first.url.rsplit(":", 1)[1]
    old_proxies = psutil.Process(first.pid).children()
    assert len(old_proxies) == 2
    load = Load(first.url)
    load.start()
    try:
        os.kill(first.pid, signal.SIGKILL)
        # Left unreaped on purpose: a dead coordinator may stay a zombie for a while (its parent
        # has not waited yet), and the new coordinator must still see it as dead.
        wait_for(lambda: psutil.Process(first.pid).status() == psutil.STATUS_ZOMBIE,
                 what="the coordinator to be dead (a zombie)")
        gone = wait_for(lambda: (h := health(first.url))["coordinator"] == "gone" and h,
                        what="the proxies to see their coordinator gone")
        served = load.ok
        wait_for(lambda: load.ok >= served + 20, what="requests served with no coordinator")
        age = health(first.url)["snapshot_age_seconds"]
        assert age >= gone["snapshot_age_seconds"]
        # Each proxy notices on its own sweep; the one answering /metrics may be the other one.
        down = "shardgate_coordinator_up 0"
        wait_for(lambda: down in http("GET", first.url + "/metrics")[2].decode().splitlines(),
                 what="/metrics to say the coordinator is down")

        second = start_router([worker.url], "--proxies", "1", "--port", port)
        new_proxies = psutil.Process(second.pid).children()
        wait_for(lambda: all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in old_proxies),
                 what="the old proxies to drain and exit")
        assert health(second.url)["coordinator"] == "running"
        answered_by = get_json(second.url + "/stats")["answered_by"]["pid"]
        assert answered_by in {p.pid for p in new_proxies}
        served = load.ok
        wait_for(lambda: load.ok >= served + 20, what="requests served by the new coordinator's proxies")
    finally:
        load.stop()
    assert load.failures == []
