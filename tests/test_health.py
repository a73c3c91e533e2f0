"""Health (issue 5): babysitter checks, passive ejection, half-open readmission, the panic guard,
slow start. Real routers and mock workers; faults are injected through ``POST /mock/config``
(``drop_after: 0`` aborts each inference connection before any byte, which the proxies count as
a failed attempt and retry elsewhere, so clients still get 200s).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from conftest import get_json, set_worker, wait_for, worker_stats
from discovery_support import routable, send_chats, wait_until, workers_of

from coordinator.fleet.membership import Fleet
from coordinator.health.passive import PassiveHealth, allowed_ejections
from shm.schema import WorkerSpec
from shm.settings import Settings

# Active checks are made slow so that only the data plane's failures can eject.
PASSIVE = ("--health-interval", "60", "--passive-interval", "0.1", "--proxies", "2")


def two_free_ports() -> int:
    """A port P such that P and P + 1 are both free (the babysitter convention)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two adjacent free ports")


def test_babysitter_health_target_checks_port_plus_one(start_worker, start_router) -> None:
    port = two_free_ports()
    worker = start_worker(["m1"], "--port", str(port))
    babysitter = start_worker(["unused"], "--port", str(port + 1))
    other = start_worker(["m1"])
    router = start_router([worker.url, other.url], "--health-target", "babysitter", "--health-interval",
                          "0.2", "--health-fall", "1", "--health-rise", "1")
    set_worker(babysitter, fail_health=True)
    row = wait_for(lambda: (r := workers_of(router)[worker.url]) and not r["healthy"] and r,
                   what="the worker to fail through its babysitter")
    assert "503" in row["health_reason"]
    set_worker(babysitter, fail_health=False)
    wait_for(lambda: workers_of(router)[worker.url]["healthy"], what="the babysitter to pass again")


def test_consecutive_failures_eject_and_half_open_readmits(start_worker, start_router) -> None:
    a, b, c = start_worker(["m1"]), start_worker(["m1"]), start_worker(["m1"])
    router = start_router([a.url, b.url, c.url], *PASSIVE, "--passive-consecutive-failures", "3",
                          "--passive-failure-rate", "0", "--ejection-time", "1")
    set_worker(a, drop_after=0)

    def ejected(url: str, count: int = 1) -> bool:
        row = workers_of(router)[url]
        return not row["healthy"] and f"(ejection {count})" in row["health_reason"]

    def traffic_until(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
        def step() -> bool:
            assert send_chats(router, 3) == [200] * 3  # failover hides every failed attempt
            return predicate()
        wait_until(step, what=what)

    traffic_until(lambda: ejected(a.url), "A to be ejected by consecutive failures")
    assert "failed attempts in a row" in workers_of(router)[a.url]["health_reason"]
    before = worker_stats(a)["requests"]
    assert send_chats(router, 9) == [200] * 9
    assert worker_stats(a)["requests"] == before, "an ejected worker got traffic"

    # After 1 s the half-open probe (GET /health, which A passes) lets A back; it still drops
    # every request, so the first failure ejects it again, for longer.
    traffic_until(lambda: ejected(a.url, 2), "A to be re-ejected while half-open")
    assert "failed again while half-open" in workers_of(router)[a.url]["health_reason"]
    assert "ejected for 2s" in workers_of(router)[a.url]["health_reason"]

    set_worker(a, drop_after=-1)
    wait_until(lambda: routable(workers_of(router)[a.url]), what="A to be readmitted")
    wait_until(lambda: (send_chats(router, 3), worker_stats(a)["completed"] > 0)[1],
               what="A to serve traffic again")


def test_failure_rate_over_the_window_ejects(start_worker, start_router) -> None:
    a, b, c = start_worker(["m1"]), start_worker(["m1"]), start_worker(["m1"])
    router = start_router([a.url, b.url, c.url], *PASSIVE, "--passive-consecutive-failures", "0",
                          "--passive-failure-rate", "0.5", "--passive-min-requests", "4",
                          "--passive-window", "30", "--ejection-time", "60")
    set_worker(a, drop_after=0)
    wait_until(lambda: (send_chats(router, 3), not workers_of(router)[a.url]["healthy"])[1],
               what="A to be ejected by its failure rate")
    reason = workers_of(router)[a.url]["health_reason"]
    assert "attempts failed in the last 30s" in reason, reason


def test_a_killed_worker_is_ejected_from_connect_errors(start_worker, start_router) -> None:
    a, b = start_worker(["m1"]), start_worker(["m1"])
    router = start_router([a.url, b.url], *PASSIVE, "--passive-consecutive-failures", "2")
    a.stop()
    wait_until(lambda: (send_chats(router, 2) == [200, 200], not workers_of(router)[a.url]["healthy"])[1],
               what="the dead worker to be ejected")
    assert workers_of(router)[a.url]["connect_errors"] >= 1


def test_panic_guard_never_ejects_more_than_the_allowed_share(start_worker, start_router) -> None:
    a, b = start_worker(["m1"]), start_worker(["m1"])
    router = start_router([a.url, b.url], *PASSIVE, "--passive-consecutive-failures", "2",
                          "--max-ejection-percent", "50", "--ejection-time", "60")
    set_worker(a, drop_after=0)
    set_worker(b, drop_after=0)

    def one_ejected_and_a_notice() -> bool:
        send_chats(router, 2)  # 502s: both workers fail
        doc = get_json(router.url + "/workers")
        ejected = [w for w in doc["workers"] if "ejected" in w["health_reason"]]
        return len(ejected) == 1 and any("stays in" in n for n in doc["notices"])

    wait_until(one_ejected_and_a_notice, what="one ejection and a refusal notice for the other")
    rows = workers_of(router)
    assert sum(1 for r in rows.values() if r["healthy"]) == 1, rows  # the model keeps one worker


def test_slow_start_ramps_a_new_workers_weight(start_worker, start_router, tmp_path: Path) -> None:
    a, b = start_worker(["m1"]), start_worker(["m1"])
    config = tmp_path / "deploy.yaml"
    config.write_text(f"workers:\n  - url: {a.url}\n    model: m1\n")
    router = start_router([], "--slow-start", "3", "--config-watch-interval", "0.1", config=str(config))
    assert workers_of(router)[a.url]["weight"] == 1  # no slow start at the router's own start
    config.write_text(f"workers:\n  - url: {a.url}\n    model: m1\n  - url: {b.url}\n    model: m1\n")
    # While B ramps, weights are in tenths: A has 10, B climbs from 1 towards 10.
    seen: set[int] = set()

    def ramp_done() -> bool:
        rows = workers_of(router)
        if b.url in rows and rows[a.url]["weight"] == 10:
            seen.add(rows[b.url]["weight"])
        return b.url in rows and rows[a.url]["weight"] == 1 and rows[b.url]["weight"] == 1 and len(seen) >= 2

    wait_until(ramp_done, what="B's ramp to pass through several steps and end")
    assert seen and max(seen) < 10 and min(seen) >= 1, seen


# -- pure parts --------------------------------------------------------------------------------


@pytest.mark.parametrize(("total", "percent", "allowed"), [(1, 50, 0), (2, 50, 1), (3, 50, 1), (4, 50, 2),
                                                            (10, 10, 1), (3, 100, 3), (5, 0, 0)])
def test_allowed_ejections(total: int, percent: int, allowed: int) -> None:
    assert allowed_ejections(total, percent) == allowed


def test_sliding_window_forgets_old_failures_and_sees_new_ones() -> None:
    """The failure rate counts only the last passive_window seconds (driven with a fake clock):
    old failures slide out, and recent ones count even after a long good history (a cumulative
    ratio would miss both)."""
    from shm.loadboard import W_ERRORS, W_REQUESTS, LoadBoard, board_size
    from shm.segment import Segment, new_instance_id, segment_name

    seg = Segment.create(segment_name(new_instance_id(), "board"), board_size(1, 4))
    board = LoadBoard.create(seg, 1, 4)
    try:
        fleet = Fleet(4)
        fleet.apply([WorkerSpec(url=f"http://w{i}:1", model="m") for i in range(3)])
        passive = PassiveHealth(board, 1)
        settings = Settings(passive_consecutive_failures=0, passive_failure_rate=0.4, passive_window=10,
                            passive_min_requests=20)
        state = next(s for s in fleet.states.values() if s.slot == 0)

        def at(now: float, requests: int, errors: int) -> bool:
            board.ints[board.cell_word(0, 0, W_REQUESTS)] += requests
            board.ints[board.cell_word(0, 0, W_ERRORS)] += errors
            passive.sample(fleet, settings, now)
            return state.ejected

        assert not at(0.0, 0, 0)     # baseline
        assert not at(1.0, 10, 9)    # 90%, but fewer than 20 attempts: not judged yet
        assert not at(20.0, 20, 5)   # window (10, 20]: 5 of 20; cumulative 14 of 30 would eject
        assert not at(21.0, 1000, 0)
        assert at(40.0, 20, 12)      # window (30, 40]: 12 of 20, after 1000 good attempts
        assert "12 of 20 attempts failed in the last 10s" in state.eject_reason
    finally:
        board.close()
        seg.unlink()


def test_slow_outliers_are_judged_on_fresh_answers_only() -> None:
    """The slow-outlier rule reads each proxy's TTFB EWMA only once that proxy has seen
    FRESH_ANSWERS answers since the worker was first seen or readmitted: a worker readmitted after
    being slow is not ejected again on its old figure, and is when it is slow again."""
    from coordinator.health.outliers import FRESH_ANSWERS
    from shm.loadboard import W_ANSWERS, W_REQUESTS, W_TTFB_EWMA, LoadBoard, board_size
    from shm.segment import Segment, new_instance_id, segment_name

    seg = Segment.create(segment_name(new_instance_id(), "board"), board_size(1, 4))
    board = LoadBoard.create(seg, 1, 4)
    try:
        fleet = Fleet(4)
        fleet.apply([WorkerSpec(url=f"http://w{i}:1", model="m") for i in range(3)])
        passive = PassiveHealth(board, 1)
        settings = Settings(passive_consecutive_failures=0, passive_failure_rate=0, slow_outlier_factor=3,
                            slow_outlier_min_gap=0.5, max_ejection_percent=50, ejected_probe_interval=1)
        slow = next(s for s in fleet.states.values() if s.slot == 2)

        def at(now: float, answers: int, ttfb: tuple[float, float, float]) -> bool:
            for slot, seconds in enumerate(ttfb):
                board.ints[board.cell_word(0, slot, W_REQUESTS)] += answers
                board.ints[board.cell_word(0, slot, W_ANSWERS)] += answers
                board.floats[board.cell_word(0, slot, W_TTFB_EWMA)] = seconds
            passive.sample(fleet, settings, now)
            return slow.ejected

        assert not at(0.0, 0, (0.1, 0.1, 2.0))                  # first sight: marks taken
        assert not at(1.0, FRESH_ANSWERS - 1, (0.1, 0.1, 2.0))  # too few fresh answers yet
        assert at(2.0, 1, (0.1, 0.1, 2.0))                      # 20 fresh: 2.0 s vs 0.1 s
        assert "slow: time to first byte 2.00s" in slow.eject_reason
        assert passive.probed(slow, "", settings, 100.0)        # ejection over, probe passes
        assert not slow.ejected
        # Its EWMA still holds the old figure: not judged until 20 answers after its return.
        assert not at(101.0, 1, (0.1, 0.1, 2.0))                # marks taken again
        assert not at(102.0, FRESH_ANSWERS - 1, (0.1, 0.1, 2.0))  # 19 fresh: the old figure waits
        assert not at(103.0, 1, (0.1, 0.1, 0.12))               # 20 fresh, and fast
        assert at(104.0, 5, (0.1, 0.1, 1.5))                    # slow again
    finally:
        board.close()
        seg.unlink()
