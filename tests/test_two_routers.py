"""Several routers, one fleet (issue 5): two router instances on different ports watch the same
etcd prefix and, with ``consistent_hash``, send each session key to the same worker without
talking to each other. The ring is built by each coordinator from worker URLs (never slots), so
equal membership gives equal rings; this test checks it end to end through real processes.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import http, wait_for
from discovery_support import Etcd, etcd, needs_etcd, routable, workers_of  # noqa: F401 - fixture

PREFIX = "/shardgate-two-routers/workers/"


def _has_consistent_hash() -> bool:
    result = subprocess.run([sys.executable, "-m", "shardgate.cli", "serve", "--help"], capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    # A help text that fails to render is a bug to see, not a reason to skip: the test then runs.
    return result.returncode != 0 or "consistent_hash" in result.stdout


pytestmark = [needs_etcd, pytest.mark.skipif(not _has_consistent_hash(),
                                             reason="the consistent_hash policy is not in this build")]


def served_by(router_url: str, session: str) -> str:
    body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
    status, headers, raw = http("POST", router_url + "/v1/chat/completions", body,
                                headers={"X-Session-ID": session})
    assert status == 200, raw
    return headers["x-mock-worker"]


def test_two_routers_on_one_etcd_prefix_agree_on_every_session(start_worker, start_router,
                                                               etcd: Etcd) -> None:  # noqa: F811
    workers = [start_worker(["m1"]) for _ in range(3)]
    # Registered in a different order than their URLs sort, and with unequal weights.
    for i, w in enumerate(reversed(workers)):
        etcd.put(f"{PREFIX}w{i}", {"url": w.url, "model": "m1", "weight": 1 + i % 2})
    common = ("--etcd-endpoints", etcd.url, "--etcd-prefix", PREFIX, "--policy", "consistent_hash")
    first = start_router([], *common, "--proxies", "2")
    second = start_router([], *common, "--proxies", "1")
    assert first.url != second.url
    urls = {w.url for w in workers}
    for router in (first, second):
        wait_for(lambda r=router: set(workers_of(r)) == urls and all(map(routable, workers_of(r).values())),
                 what="both routers to see the three workers")

    sessions = [f"session-{i}" for i in range(20)]
    picks_first = {s: served_by(first.url, s) for s in sessions}
    picks_second = {s: served_by(second.url, s) for s in sessions}
    assert picks_first == picks_second
    assert len(set(picks_first.values())) > 1, "20 keys all on one worker: the ring is not spreading"
    # And a key stays put on repeated requests, whichever proxy of a router takes it.
    assert all(served_by(first.url, s) == picks_first[s] for s in sessions[:5])
