"""The coordinator's watchdog against a real wedged proxy.

A router with two proxies and a short ``watchdog_timeout`` runs through the real CLI; one proxy
is frozen with SIGSTOP (its event loop stops, so its heartbeat on the load board stands still
while its listening socket keeps receiving a share of the connections). The coordinator must
SIGKILL it and start a replacement in the same row, and the service must keep answering.

Waits poll a condition against a deadline (``wait_for``); nothing asserts on elapsed time.
Requests use short client timeouts because, until the kill, the kernel still hands some new
connections to the frozen proxy, which never accepts them.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.error
from typing import Any

import psutil
from conftest import chat, get_json, http, wait_for

from shardgate import launch

CHAT = "/v1/chat/completions"
CLIENT_TIMEOUT = 2.0


def try_json(url: str) -> Any:
    try:
        status, _, body = http("GET", url, timeout=CLIENT_TIMEOUT)
    except (OSError, urllib.error.URLError):
        return None
    return json.loads(body) if status == 200 else None


def try_chat(url: str) -> int | None:
    try:
        return http("POST", url + CHAT, chat("m1"), timeout=CLIENT_TIMEOUT)[0]
    except (OSError, urllib.error.URLError):
        return None


def gone(pid: int) -> bool:
    """Not running any more (reaped, or a zombie waiting to be)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_stopped_proxy_is_killed_and_replaced(start_worker, start_router) -> None:
    worker = start_worker(["m1"])
    router: launch.Launched = start_router([worker.url], "--proxies", "2", "--watchdog-timeout", "1.5")
    before = get_json(router.url + "/stats")["proxies"]
    children = {p.pid for p in psutil.Process(router.pid).children()}
    assert {row["pid"] for row in before} == children and len(children) == 2
    victim, survivor = before[0]["pid"], before[1]["pid"]

    os.kill(victim, signal.SIGSTOP)
    try:
        wait_for(lambda: gone(victim), what="the stopped proxy to be killed")

        def replaced() -> bool:
            stats = try_json(router.url + "/stats")
            if stats is None:
                return False
            row = stats["proxies"][0]
            return row["pid"] not in (0, victim) and row["alive"] and row["restarts"] >= 1

        wait_for(replaced, what="proxy 0 to be replaced")
    finally:
        if not gone(victim):
            os.kill(victim, signal.SIGCONT)  # leave nothing frozen behind a failed assertion

    stats = get_json(router.url + "/stats")
    pids = {row["pid"] for row in stats["proxies"]}
    assert victim not in pids
    assert pids == {p.pid for p in psutil.Process(router.pid).children()}, "the replacement is a child"
    assert stats["proxies"][1]["pid"] == survivor, "the live proxy was left alone"
    for _ in range(20):
        assert try_chat(router.url) == 200

    log = wait_for(lambda: "killed by the watchdog" in (text := router.stderr_text()) and text,
                   what="the restart's log line")
    assert f"pid {victim}) is not responding: no heartbeat for" in log, log
    assert "exited with signal 9" in log, log
