"""Lifecycle of a running router: proxy crashes, reloads, graceful and forced stops, shared memory,
boot failures, cross-proxy figures, health checks and model discovery.

Everything runs through the real CLI (``python -m shardgate.cli serve``) against real mock workers
on real sockets. Waits poll a condition against a deadline (``wait_for``); nothing asserts on
elapsed time. Signals meant for the coordinator alone go to its pid with ``os.kill``; its proxies
are its children (psutil) and are listed by ``GET /stats``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import posix_ipc
import psutil
import pytest
from conftest import DEADLINE, Stream, chat, free_port, get_json, http, set_worker, wait_for, worker_stats

from shardgate import launch

CHAT = "/v1/chat/completions"
SHM_DIR = Path("/dev/shm")
CLI = [sys.executable, "-m", "shardgate.cli"]


# -- helpers -----------------------------------------------------------------------------------


def try_json(url: str) -> Any:
    """GET a JSON document; None when the connection fails (a proxy may be dying or restarting)."""
    try:
        status, _, body = http("GET", url)
    except (OSError, urllib.error.URLError):
        return None
    return json.loads(body) if status == 200 else None


def try_chat(url: str, model: str = "m1") -> int | None:
    """One non-streamed chat on a new connection; its status, or None when the connection failed."""
    try:
        status, _, _ = http("POST", url + CHAT, chat(model))
    except (OSError, urllib.error.URLError):
        return None
    return status


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


def refuses_connections(url: str) -> bool:
    try:
        with socket.create_connection(address(url), timeout=2):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def proxy_children(router: launch.Launched) -> list[psutil.Process]:
    return psutil.Process(router.pid).children()


def gone(process: psutil.Process) -> bool:
    """The process no longer runs (a zombie waiting for init to reap it counts as gone)."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def segments_of(pid: int) -> list[Path]:
    return sorted(p for p in SHM_DIR.iterdir() if p.name.startswith(f"shardgate.{pid}-"))


def worker_row(url: str, router: launch.Launched) -> dict[str, Any] | None:
    doc = try_json(router.url + "/workers")
    if doc is None:
        return None
    rows = [w for w in doc["workers"] if w["url"] == url]
    return rows[0] if rows else None


@pytest.fixture
def streams() -> Iterator[Callable[..., Stream]]:
    opened: list[Stream] = []

    def start(url: str, model: str = "m1") -> Stream:
        stream = Stream(url, model)
        opened.append(stream)
        stream.start()
        return stream

    yield start
    for stream in opened:
        stream.close()


@pytest.fixture
def extra_processes() -> Iterator[list[launch.Launched]]:
    """Processes a test launches itself (beyond the start_worker/start_router fixtures)."""
    started: list[launch.Launched] = []
    yield started
    for process in started:
        process.stop()


# -- 1. a crashed proxy is replaced ------------------------------------------------------------


def test_sigkilled_proxy_is_replaced_and_service_continues(start_worker, start_router) -> None:
    worker = start_worker(["m1"])
    router = start_router([worker.url], "--proxies", "2")
    before = get_json(router.url + "/stats")["proxies"]
    children = {p.pid for p in proxy_children(router)}
    assert {row["pid"] for row in before} == children and len(children) == 2
    victim = before[0]["pid"]
    assert before[0]["restarts"] == 0

    os.kill(victim, signal.SIGKILL)
    outcomes: list[int | None] = []

    def replaced() -> bool:
        outcomes.append(try_chat(router.url))  # traffic keeps flowing while we wait
        stats = try_json(router.url + "/stats")
        if stats is None:
            return False
        row = stats["proxies"][0]
        return row["pid"] not in (0, victim) and row["alive"] and row["restarts"] >= 1

    wait_for(replaced, what="proxy 0 to be replaced")
    # Requests are sequential: only one can have been on the dying proxy's connection.
    failed = [o for o in outcomes if o != 200]
    assert len(failed) <= 1, outcomes
    assert all(o in (200, None) for o in outcomes), outcomes

    stats = get_json(router.url + "/stats")
    new_pids = {row["pid"] for row in stats["proxies"]}
    assert victim not in new_pids
    assert new_pids == {p.pid for p in proxy_children(router)}, "the replacement is the coordinator's child"
    assert stats["proxies"][1]["pid"] == before[1]["pid"], "the surviving proxy was left alone"
    assert not psutil.pid_exists(victim) or gone(psutil.Process(victim))
    for _ in range(10):
        assert try_chat(router.url) == 200


def serving_proxy(router: launch.Launched, stream: Stream) -> psutil.Process:
    """The proxy process holding the stream's client connection."""
    client = stream.sock.getsockname()[:2]
    for child in proxy_children(router):
        for conn in child.net_connections(kind="tcp"):
            if conn.raddr and tuple(conn.raddr)[:2] == client:
                return child
    raise AssertionError(f"no proxy holds the connection from {client}")


def test_crashed_proxy_releases_its_in_flight_load(start_worker, start_router, streams) -> None:
    worker = start_worker(["m1"], "--tps", "2", "--output-tokens", "200")
    router = start_router([worker.url], "--proxies", "2")
    stream = streams(router.url)
    stream.wait_first_event()
    wait_for(lambda: get_json(router.url + "/workers")["workers"][0]["in_flight"] == 1,
             what="the stream to count as in flight")
    victim = serving_proxy(router, stream)
    index = [p["pid"] for p in get_json(router.url + "/stats")["proxies"]].index(victim.pid)

    victim.kill()
    stream.finish(timeout=30)
    assert not stream.complete
    wait_for(lambda: (s := try_json(router.url + "/stats")) is not None
             and s["proxies"][index]["pid"] not in (0, victim.pid) and s["proxies"][index]["alive"],
             what="the crashed proxy to be replaced")
    # Least-load policies read this gauge: a dead proxy's requests must not count as load forever.
    wait_for(lambda: get_json(router.url + "/workers")["workers"][0]["in_flight"] == 0,
             what="the dead proxy's in-flight count to be released")
    wait_for(lambda: worker_stats(worker)["aborted"] == 1, what="the worker to see the abort")
    set_worker(worker, tps=0)
    for _ in range(4):
        assert try_chat(router.url) == 200


def test_proxies_exit_when_their_coordinator_dies(start_worker, start_router) -> None:
    worker = start_worker(["m1"])
    router = start_router([worker.url], "--proxies", "2", "--orphan-timeout", "0.5")
    proxies = proxy_children(router)
    os.kill(router.pid, signal.SIGKILL)
    assert router.popen.wait(10) == -signal.SIGKILL
    wait_for(lambda: all(gone(p) for p in proxies), what="orphaned proxies to exit")
    wait_for(lambda: refuses_connections(router.url), what="the port to be released")


# -- 2. SIGHUP applies a new worker list -------------------------------------------------------


def _write_workers(path: Path, *urls: str) -> None:
    path.write_text("workers:\n" + "".join(f"  - url: {u}\n    model: m1\n" for u in urls))


def test_sighup_applies_new_worker_list_without_restarting_proxies(start_worker, start_router,
                                                                    tmp_path) -> None:
    a, b = start_worker(["m1"]), start_worker(["m1"])
    config = tmp_path / "deploy.yaml"
    _write_workers(config, a.url)
    router = start_router([], "--proxies", "2", config=str(config))
    assert [w["url"] for w in get_json(router.url + "/workers")["workers"]] == [a.url]
    assert try_chat(router.url) == 200
    pids = sorted(p["pid"] for p in get_json(router.url + "/stats")["proxies"])
    a_before = worker_stats(a)["requests"]
    assert a_before >= 1

    _write_workers(config, b.url)
    os.kill(router.pid, signal.SIGHUP)
    wait_for(lambda: [w["url"] for w in get_json(router.url + "/workers")["workers"]] == [b.url],
             what="/workers to list only B")
    # Every proxy must route with the new list, whichever one a connection lands on.
    b_before = worker_stats(b)["requests"]
    for _ in range(10):
        assert try_chat(router.url) == 200
    assert worker_stats(b)["requests"] == b_before + 10
    assert worker_stats(a)["requests"] == a_before
    assert sorted(p["pid"] for p in get_json(router.url + "/stats")["proxies"]) == pids
    assert router.popen.poll() is None


def test_sighup_with_a_broken_file_keeps_the_running_configuration(start_worker, start_router,
                                                                    tmp_path) -> None:
    a = start_worker(["m1"])
    config = tmp_path / "deploy.yaml"
    _write_workers(config, a.url)
    router = start_router([], config=str(config))
    generation = get_json(router.url + "/stats")["snapshot"]["generation"]

    config.write_text("workers:\n  - url: ftp://nowhere:1\n")
    os.kill(router.pid, signal.SIGHUP)
    wait_for(lambda: "reload refused" in router.stderr_text(), what="the refused reload to be logged")
    assert "ftp://nowhere:1" in router.stderr_text()
    assert [w["url"] for w in get_json(router.url + "/workers")["workers"]] == [a.url]
    assert get_json(router.url + "/stats")["snapshot"]["generation"] == generation
    assert try_chat(router.url) == 200
    assert router.popen.poll() is None


def test_sighup_with_an_empty_file_keeps_the_workers(start_worker, start_router, tmp_path) -> None:
    # An editor that truncates before writing, or a deploy that lost the list: refusing is the
    # same rule as at start ("no workers"), instead of taking every worker out of service.
    a = start_worker(["m1"])
    config = tmp_path / "deploy.yaml"
    _write_workers(config, a.url)
    router = start_router([], config=str(config))
    config.write_text("")
    os.kill(router.pid, signal.SIGHUP)
    wait_for(lambda: "reload refused" in router.stderr_text(), what="the refused reload to be logged")
    assert "no workers" in router.stderr_text()
    assert [w["url"] for w in get_json(router.url + "/workers")["workers"]] == [a.url]
    assert try_chat(router.url) == 200


def test_refused_reload_leaves_the_fleet_untouched(start_worker, start_router, tmp_path) -> None:
    a, b = start_worker(["m1"]), start_worker(["m1"])
    config = tmp_path / "deploy.yaml"
    config.write_text("max_workers: 2\nworkers:\n" + "".join(
        f"  - url: {u}\n    model: m1\n" for u in (a.url, b.url)))
    router = start_router([], "--health-interval", "0.2", "--health-fall", "1", config=str(config))
    # Three new workers in place of two: the file raises max_workers, but the load board was
    # sized at start, so the new list cannot fit and the reload must change nothing at all.
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(3)]
    config.write_text("max_workers: 3\nworkers:\n" + "".join(f"  - url: {u}\n    model: m1\n" for u in dead))
    os.kill(router.pid, signal.SIGHUP)
    wait_for(lambda: "reload refused" in router.stderr_text(), what="the refused reload to be logged")
    # Force a publish after the refusal (a health flip), then look at what was published.
    set_worker(a, fail_health=True)
    wait_for(lambda: (r := worker_row(a.url, router)) is not None and not r["healthy"],
             what="a publish after the refused reload")
    assert sorted(w["url"] for w in get_json(router.url + "/workers")["workers"]) == sorted([a.url, b.url])
    assert try_chat(router.url) == 200


# -- 3. SIGTERM drains -------------------------------------------------------------------------


def test_sigterm_lets_an_in_flight_stream_finish(start_worker, start_router, streams) -> None:
    worker = start_worker(["m1"], "--tps", "10", "--output-tokens", "30")
    router = start_router([worker.url], "--proxies", "2")
    proxies = proxy_children(router)
    stream = streams(router.url)
    stream.wait_first_event()

    os.kill(router.pid, signal.SIGTERM)
    wait_for(lambda: refuses_connections(router.url), what="new connections to be refused")
    stream.finish(timeout=60)
    assert stream.error is None, stream.error
    assert stream.complete, stream.data[-300:]
    assert router.popen.wait(30) == 0
    wait_for(lambda: worker_stats(worker)["completed"] == 1, what="the worker to count the stream done")
    assert worker_stats(worker)["aborted"] == 0
    wait_for(lambda: all(gone(p) for p in proxies), what="every proxy to exit")
    assert refuses_connections(router.url)


# -- 4. shared-memory segments -----------------------------------------------------------------


def test_segments_are_private_and_removed_at_exit(start_worker, start_router) -> None:
    worker = start_worker(["m1"])
    router = start_router([worker.url])
    segs = segments_of(router.pid)
    kinds = sorted(re.sub(r"^shardgate\.\d+-[0-9a-f]+\.", "", p.name) for p in segs)
    assert kinds == ["affinity", "board", "snap"], segs
    assert len({p.name.rsplit(".", 1)[0] for p in segs}) == 1, "all segments belong to one instance"
    for seg in segs:
        assert stat.S_IMODE(seg.stat().st_mode) == 0o600, seg
        assert seg.stat().st_uid == os.getuid()

    os.kill(router.pid, signal.SIGTERM)
    assert router.popen.wait(30) == 0
    assert not any(p.exists() for p in segs), segs
    assert segments_of(router.pid) == []


def test_stale_segment_of_a_dead_pid_is_removed_at_start(start_worker, start_router) -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    assert not psutil.pid_exists(dead_pid)
    name = f"/shardgate.{dead_pid}-deadbeef.snap"
    stale = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=4096)
    stale.close_fd()
    try:
        assert (SHM_DIR / name[1:]).exists()
        worker = start_worker(["m1"])
        router = start_router([worker.url])
        assert not (SHM_DIR / name[1:]).exists(), "the stale segment survived a start"
        assert try_chat(router.url) == 200
        assert len(segments_of(router.pid)) == 3
    finally:
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            pass


def test_an_unreadable_segment_whose_proxies_still_run_is_kept_at_start(start_worker, start_router) -> None:
    """A dead coordinator's segments stay while a process that is one of its proxies runs, even
    when this coordinator cannot read them (another version's layout: here, 4 KiB of zeros), so
    nothing is removed from under serving proxies after an upgrade or downgrade."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    instance = f"{int(finished.stdout)}-0ddba11"
    name = f"/shardgate.{instance}.snap"
    unreadable = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=4096)
    unreadable.close_fd()
    # Stands in for a proxy of that instance: what counts is its command line (set once Popen
    # returns: it waits for the exec).
    proxy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "proxy_workers",
                              "--instance", instance, "--index", "0"])
    try:
        router = start_router([start_worker(["m1"]).url])
        assert (SHM_DIR / name[1:]).exists(), "a live proxy's segment was removed as stale"
        assert try_chat(router.url) == 200
    finally:
        proxy.kill()
        proxy.wait()
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            pass


# -- 5. a boot failure is one message, not a restart loop --------------------------------------


def test_occupied_port_fails_boot_with_one_message(start_worker) -> None:
    worker = start_worker(["m1"])
    with socket.socket() as blocker:  # no SO_REUSEPORT: nobody else may bind this port
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        argv = [*CLI, "serve", "--worker", worker.url, "--port", str(port), "--proxies", "1"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"127.0.0.1:{port}" in lines[0]
    assert "ready" not in out
    assert segments_of(proc.pid) == [], "nothing may be created when the address is taken"
    assert worker_stats(worker)["requests"] == 0


# -- 6. a second SIGINT exits at once ----------------------------------------------------------


def test_second_sigint_exits_at_once(start_worker, start_router, streams) -> None:
    worker = start_worker(["m1"], "--tps", "2", "--output-tokens", "200")
    router = start_router([worker.url], "--proxies", "2")
    proxies = proxy_children(router)
    assert len(proxies) == 2
    segs = segments_of(router.pid)
    stream = streams(router.url)
    stream.wait_first_event()

    os.kill(router.pid, signal.SIGINT)
    # The first interrupt starts a graceful stop: proxies stop accepting, the stream goes on.
    wait_for(lambda: refuses_connections(router.url), what="the graceful stop to begin")
    assert router.popen.poll() is None, "the first SIGINT must not end a stop that has streams in flight"
    os.kill(router.pid, signal.SIGINT)
    assert router.popen.wait(10) == 130
    wait_for(lambda: all(gone(p) for p in proxies), what="every proxy to be killed")
    stream.finish(timeout=30)
    assert not stream.complete, "a forced stop cannot have let a 100 s stream finish"
    assert not any(p.exists() for p in segs), segs


# -- 7. /stats totals across proxies -----------------------------------------------------------


def test_stats_totals_across_proxies(start_worker, start_router) -> None:
    worker = start_worker(["m1"])
    router = start_router([worker.url], "--proxies", "2")
    sent = 0
    for _ in range(40):
        assert try_chat(router.url) == 200  # urllib opens a new connection per request
        sent += 1

    def per_proxy() -> list[int]:
        return [p["requests"] for p in get_json(router.url + "/stats")["proxies"]]

    wait_for(lambda: sum(per_proxy()) == sent, what=f"{sent} requests counted")

    def both_served() -> bool:
        nonlocal sent
        if all(per_proxy()):
            return True
        assert try_chat(router.url) == 200
        sent += 1
        return False

    wait_for(both_served, timeout=60, what="both proxies to serve requests")
    seen: dict[int, dict[str, Any]] = {}

    def answered_by_both() -> bool:
        stats = get_json(router.url + "/stats")
        if stats["totals"]["requests"] != sent:
            return False  # a counter one update behind: ask again
        seen[stats["answered_by"]["index"]] = stats
        return len(seen) == 2

    wait_for(answered_by_both, what="/stats answered by both proxies with the final totals")
    for index, stats in seen.items():
        rows = stats["proxies"]
        assert stats["answered_by"]["pid"] == rows[index]["pid"]
        assert stats["totals"]["requests"] == sent
        assert stats["totals"]["errors"] == 0
        assert sum(p["requests"] for p in rows) == sent
        assert all(p["requests"] > 0 for p in rows)
        assert stats["workers"][0]["requests"] == sent
        for row in rows:
            assert row["alive"] is True
            assert isinstance(row["pid"], int) and row["pid"] > 0
            assert isinstance(row["rss_bytes"], int) and row["rss_bytes"] > 0
            assert isinstance(row["cpu_seconds"], float | int) and row["cpu_seconds"] >= 0
    assert {p["pid"] for p in seen[0]["proxies"]} == {p.pid for p in proxy_children(router)}
    assert seen[0]["totals"] == seen[1]["totals"]
    assert worker_stats(worker)["requests"] == sent


# -- 8. load is visible across proxies ---------------------------------------------------------


def test_in_flight_is_visible_from_every_proxy(start_worker, start_router, streams) -> None:
    worker = start_worker(["m1"], "--tps", "2", "--output-tokens", "200")
    router = start_router([worker.url], "--proxies", "2")
    stream = streams(router.url)
    stream.wait_first_event()
    views: dict[int, int] = {}

    def from_both_proxies() -> bool:
        stats = get_json(router.url + "/stats")
        views[stats["answered_by"]["index"]] = stats["workers"][0]["in_flight"]
        return len(views) == 2

    wait_for(from_both_proxies, what="/stats from both proxies")
    assert views == {0: 1, 1: 1}
    for _ in range(6):
        assert get_json(router.url + "/workers")["workers"][0]["in_flight"] == 1

    stream.close()  # the client goes away: the gauge must settle back to zero
    stream.finish(timeout=30)
    wait_for(lambda: get_json(router.url + "/workers")["workers"][0]["in_flight"] == 0,
             what="in_flight back to 0 after the client left")
    wait_for(lambda: worker_stats(worker)["aborted"] == 1, what="the worker to see the abort")


# -- 9. active health checks -------------------------------------------------------------------


def test_failing_health_check_takes_worker_out_and_back(start_worker, start_router) -> None:
    a, b = start_worker(["m1"]), start_worker(["m1"])
    router = start_router([a.url, b.url], "--health-interval", "0.2", "--health-fall", "2",
                          "--health-rise", "2")
    set_worker(a, fail_health=True)
    row = wait_for(lambda: (r := worker_row(a.url, router)) is not None and not r["healthy"] and r,
                   what="A to become unhealthy")
    assert "503" in row["health_reason"], row
    assert worker_row(b.url, router)["healthy"]
    assert get_json(router.url + "/health")["healthy_workers"] == 1

    a_before, b_before = worker_stats(a)["requests"], worker_stats(b)["requests"]
    for _ in range(10):
        assert try_chat(router.url) == 200
    assert worker_stats(a)["requests"] == a_before, "an unhealthy worker received traffic"
    assert worker_stats(b)["requests"] == b_before + 10

    set_worker(a, fail_health=False)
    wait_for(lambda: (r := worker_row(a.url, router)) is not None and r["healthy"], what="A healthy again")
    assert worker_row(a.url, router)["health_reason"] == ""
    for _ in range(10):
        assert try_chat(router.url) == 200
    assert worker_stats(a)["requests"] > a_before, "a recovered worker gets traffic again"


# -- 10. model discovery -----------------------------------------------------------------------


def test_models_are_discovered_from_workers(start_worker, start_router) -> None:
    worker = start_worker(["m1", "m2"])
    router = start_router([worker.url])
    ids = [m["id"] for m in get_json(router.url + "/v1/models")["data"]]
    assert ids == ["m1", "m2"]
    assert get_json(router.url + "/workers")["workers"][0]["models"] == ["m1", "m2"]
    status, _, body = http("POST", router.url + CHAT, chat("m2"))
    assert status == 200, body
    assert json.loads(body)["model"] == "m2"
    assert worker_stats(worker)["last_body"]["model"] == "m2"
    status, _, body = http("POST", router.url + CHAT, chat("m3"))
    assert status == 404, body


def test_worker_started_after_the_router_is_discovered(start_router, extra_processes) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    router = start_router([url])
    row = get_json(router.url + "/workers")["workers"][0]
    assert row["url"] == url and row["healthy"] is False and row["health_reason"], row
    assert get_json(router.url + "/v1/models")["data"] == []
    status, _, body = http("POST", router.url + CHAT, chat("late"))
    assert status == 404, body

    late = launch.Launched([sys.executable, "-m", "shardgate.mocks.worker", "--port", str(port),
                            "--model", "late"], launch.READY_WORKER)
    extra_processes.append(late)
    assert late.url == url
    wait_for(lambda: [m["id"] for m in get_json(router.url + "/v1/models")["data"]] == ["late"],
             timeout=DEADLINE + 15, what="the late worker's model to be discovered")
    row = get_json(router.url + "/workers")["workers"][0]
    assert row["healthy"] is True and row["models"] == ["late"], row
    status, _, body = http("POST", router.url + CHAT, chat("late"))
    assert status == 200, body
    assert worker_stats(late)["requests"] == 1
