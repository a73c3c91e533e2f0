"""A worker that accepts requests and never answers is found from live traffic and taken out.

Its /health keeps passing, so only traffic can tell: the coordinator sees requests pile up on it
with none completed for ``stall_timeout`` while its peers complete theirs, and ejects it with
the reason. Each client loses at most the request it had on the stalled worker; after the
ejection every request is answered by the healthy worker.
"""

from __future__ import annotations

import threading
from typing import Any

from conftest import chat, http, wait_for, worker_row


class Clients:
    """Clients in threads, each sending non-streamed requests one after another."""

    def __init__(self, url: str, count: int) -> None:
        self.url = url
        self.stop = threading.Event()
        self.results: list[list[int]] = [[] for _ in range(count)]
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self, i: int) -> None:
        while not self.stop.is_set():
            try:
                status, _, _ = http("POST", self.url + "/v1/chat/completions", chat("m1", content=f"c{i}"),
                                    timeout=4)
            except OSError:
                status = 0  # the client gave up (timeout)
            self.results[i].append(status)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


def test_a_stalled_worker_is_ejected_from_live_traffic(start_worker: Any, start_router: Any) -> None:
    healthy = start_worker(["m1"])
    stalled = start_worker(["m1"], "--stall")
    router = start_router([healthy.url, stalled.url], "--stall-timeout", "2", "--policy", "round_robin")
    clients = Clients(router.url, 6)
    try:
        row = wait_for(lambda: (r := worker_row(router, stalled.url)).get("ejected") and r,
                       what="the stalled worker to be ejected")
        assert "stalled" in row["health_reason"], row
        counts = [len(r) for r in clients.results]
        wait_for(lambda: all(len(r) >= n + 5 for r, n in zip(clients.results, counts, strict=True)),
                 what="every client served again")
    finally:
        clients.close()
    for results in clients.results:
        lost = [s for s in results if s != 200]
        assert len(lost) <= 1, results  # at most the request it had on the stalled worker
    assert worker_row(router, healthy.url)["healthy"]


def test_a_slow_worker_is_ejected_as_an_outlier(start_worker: Any, start_router: Any) -> None:
    """A worker that answers, but many times slower than its model's other workers, is taken out
    (Envoy-style outlier detection on time to first byte); its fast peers stay in."""
    fast = [start_worker(["m1"]), start_worker(["m1"])]
    slow = start_worker(["m1"], "--ttft", "0.5")
    router = start_router([w.url for w in fast] + [slow.url], "--policy", "round_robin",
                          "--slow-outlier-min-gap", "0.2")
    clients = Clients(router.url, 8)
    try:
        row = wait_for(lambda: (r := worker_row(router, slow.url)).get("ejected") and r,
                       what="the slow worker to be ejected")
        assert "slow: time to first byte" in row["health_reason"], row
        counts = [len(r) for r in clients.results]
        wait_for(lambda: all(len(r) >= n + 5 for r, n in zip(clients.results, counts, strict=True)),
                 what="every client served again")
    finally:
        clients.close()
    assert all(s == 200 for results in clients.results for s in results)  # slow is not failed
    assert all(not worker_row(router, w.url).get("ejected") for w in fast)


def test_a_slow_rule_that_is_off_ejects_nothing(start_worker: Any, start_router: Any) -> None:
    fast = start_worker(["m1"])
    slow = start_worker(["m1"], "--ttft", "0.3")
    router = start_router([fast.url, slow.url], "--policy", "round_robin",
                          "--slow-outlier-factor", "0")
    clients = Clients(router.url, 4)
    try:
        # Enough answers from the slow worker for the rule to have judged it, were it on.
        wait_for(lambda: worker_row(router, slow.url).get("requests", 0) >= 40,
                 what="40 answers from the slow worker")
    finally:
        clients.close()
    assert not worker_row(router, slow.url).get("ejected")
