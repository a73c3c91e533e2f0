"""Zero-downtime upgrade: SIGUSR2 hands the port to a successor generation without a failed request.

The successor is the same command line started again (so it runs the code and config installed
now). Its proxies join the SO_REUSEPORT group; once they serve, it SIGTERMs the old coordinator,
whose proxies take their queued connections, finish their requests and exit. Requests run all
the while, each on a fresh connection (the case that resets when a listener closes badly); none
may fail.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import psutil
from conftest import get_json, wait_for
from test_coordinator_loss import Load, health


def coordinators_on(port: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "shardgate.cli" in cmdline and "serve" in cmdline and port in cmdline:
            found.append(proc)
    return found


def test_sigusr2_upgrades_to_a_new_generation_without_a_failed_request(
        start_worker: Any, start_router: Any, tmp_path: Path) -> None:
    worker = start_worker(["m1"])
    config = tmp_path / "deploy.yaml"
    config.write_text(f"workers:\n  - url: {worker.url}\n    model: m1\n")
    old = start_router([], "--proxies", "2", config=str(config))
    port = old.url.rsplit(":", 1)[1]
    old_proxies = psutil.Process(old.pid).children()
    load = Load(old.url)
    load.start()
    successor: list[psutil.Process] = []
    try:
        served = load.ok
        wait_for(lambda: load.ok >= served + 10, what="load running")
        # The successor reads the config as it is now.
        config.write_text(f"workers:\n  - url: {worker.url}\n    model: m1\npolicy: round_robin\n")
        os.kill(old.pid, signal.SIGUSR2)
        assert old.popen.wait(30) == 0  # retired by its successor, after a clean drain
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in old_proxies)
        successor = [p for p in coordinators_on(port) if p.pid != old.pid]
        assert len(successor) == 1
        new_proxies = {p.pid for p in successor[0].children()}
        assert health(old.url)["coordinator"] == "running"
        assert get_json(old.url + "/stats")["answered_by"]["pid"] in new_proxies
        served = load.ok
        wait_for(lambda: load.ok >= served + 10, what="the new generation serving")
    finally:
        load.stop()
        for proc in successor:
            proc.terminate()
            proc.wait(30)
    assert load.failures == []
