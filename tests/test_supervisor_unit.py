"""Unit tests of :class:`coordinator.supervisor.Supervisor` with fake processes and a fake clock.

The supervisor takes its process-spawning call and its monotonic clock as constructor parameters;
here they are a :class:`FakeSpawn` that hands out :class:`FakeProcess` objects (Popen's ``pid``,
``poll`` and ``send_signal``) and a :class:`FakeClock` the test moves by hand, so restart
backoff, boot errors, stopping and the watchdog are checked without a process or a sleep. The
load board is a real :class:`shm.loadboard.LoadBoard` over anonymous memory.
"""

from __future__ import annotations

import logging
import mmap
import re
import signal

import pytest
from conftest import FakeClock

from coordinator.supervisor import FIRST_BACKOFF, STABLE_SECONDS, HaltServer, Supervisor
from shm.loadboard import P_HEARTBEAT, P_PID, LoadBoard, board_size
from shm.process import EXIT_BOOT_ERROR
from shm.segment import Segment

TIMEOUT = 5.0


class FakeProcess:
    def __init__(self, pid: int, argv: list[str]) -> None:
        self.pid = pid
        self.argv = argv
        self.code: int | None = None
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return self.code

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)

    def exit(self, code: int) -> None:
        self.code = code


class FakeSpawn:
    def __init__(self) -> None:
        self.started: list[FakeProcess] = []

    def __call__(self, argv: list[str]) -> FakeProcess:
        proc = FakeProcess(10_000 + len(self.started), argv)
        self.started.append(proc)
        return proc


def memory_board(proxies: int = 4) -> LoadBoard:
    size = board_size(proxies, 8)
    return LoadBoard.create(Segment("unit-test-board", size, False, mmap.mmap(-1, size)), proxies, 8)


class Rig:
    """A supervisor of ``count`` fake proxies, and the levers a proxy would pull on the board."""

    def __init__(self, count: int = 2, backoff_max: float = 10.0, watchdog: float = 0.0) -> None:
        self.clock = FakeClock()
        self.spawn = FakeSpawn()
        self.board = memory_board()
        self.sup = Supervisor("inst", count, self.board, backoff_max, watchdog, spawn=self.spawn,
                              clock=self.clock)
        self.sup.start_all()

    def proc(self, index: int) -> FakeProcess:
        popen = self.sup.handles[index].popen
        assert isinstance(popen, FakeProcess)
        return popen

    def claim(self, index: int) -> None:
        """What a proxy does once its listener is up: its pid, then a first heartbeat."""
        self.board.ints[self.board.proxy_word(index, P_PID)] = self.proc(index).pid
        self.beat(index)

    def beat(self, index: int, value: float | None = None) -> None:
        word = self.board.proxy_word(index, P_HEARTBEAT)
        self.board.floats[word] = self.board.floats[word] + 0.25 if value is None else value


# -- start, up, restart with backoff ------------------------------------------------------------


def test_start_all_spawns_one_proxy_per_row_with_its_index() -> None:
    rig = Rig(count=3)
    assert [p.argv[-1] for p in rig.spawn.started] == ["0", "1", "2"]
    assert all("--instance" in p.argv and "inst" in p.argv for p in rig.spawn.started)
    assert rig.sup.running() == 3 and rig.sup.pids() == [p.pid for p in rig.spawn.started]


def test_a_proxy_is_up_only_once_it_has_claimed_its_row() -> None:
    rig = Rig(count=2)
    assert not rig.sup.all_up()
    rig.claim(0)
    assert not rig.sup.all_up()
    rig.claim(1)
    assert rig.sup.all_up()
    rig.proc(1).exit(1)
    assert not rig.sup.all_up(), "an exited proxy is not up, whatever its row says"


def test_restart_backoff_doubles_per_quick_failure_up_to_the_maximum() -> None:
    rig = Rig(count=1, backoff_max=1.0)
    delays = []
    for _ in range(6):
        rig.clock.advance(0.5)  # a quick failure: far less than STABLE_SECONDS
        rig.proc(0).exit(1)
        rig.sup.poll()
        handle = rig.sup.handles[0]
        assert handle.popen is None
        delay = handle.restart_at - rig.clock.now
        delays.append(round(delay, 6))
        rig.clock.advance(delay - 0.001)
        rig.sup.poll()
        assert handle.popen is None, "restarted before its backoff passed"
        rig.clock.advance(0.001)
        rig.sup.poll()
        assert handle.popen is not None, "not restarted once its backoff passed"
    assert delays == [0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert rig.sup.restarts == 6 and len(rig.spawn.started) == 7


def test_backoff_resets_after_a_proxy_lived_stable_seconds() -> None:
    rig = Rig(count=1)
    for _ in range(3):  # build up some failures
        rig.proc(0).exit(1)
        rig.sup.poll()
        rig.clock.advance(rig.sup.handles[0].restart_at - rig.clock.now)
        rig.sup.poll()
    assert rig.sup.handles[0].failures == 3
    rig.clock.advance(STABLE_SECONDS)
    rig.proc(0).exit(1)
    rig.sup.poll()
    handle = rig.sup.handles[0]
    assert handle.failures == 0 and handle.restart_at - rig.clock.now == pytest.approx(FIRST_BACKOFF)


def test_boot_error_exit_halts_the_service_instead_of_restarting() -> None:
    rig = Rig(count=2)
    rig.proc(1).exit(EXIT_BOOT_ERROR)
    with pytest.raises(HaltServer) as raised:
        rig.sup.poll()
    assert "proxy 1 could not start" in raised.value.reason and raised.value.exit_code == 1
    assert rig.sup.restarts == 0 and len(rig.spawn.started) == 2


def test_nothing_is_restarted_while_stopping() -> None:
    rig = Rig(count=2)
    rig.sup.stopping = True
    rig.proc(0).exit(0)
    rig.proc(1).exit(EXIT_BOOT_ERROR)  # a boot error during a stop halts nothing either
    for _ in range(3):
        rig.clock.advance(STABLE_SECONDS)
        rig.sup.poll()
    assert rig.sup.running() == 0 and rig.sup.restarts == 0 and len(rig.spawn.started) == 2


def test_signal_all_reaches_running_proxies_only() -> None:
    rig = Rig(count=2)
    rig.proc(0).exit(0)
    first, second = rig.proc(0), rig.proc(1)
    rig.sup.signal_all(signal.SIGTERM)
    assert first.signals == [] and second.signals == [signal.SIGTERM]


# -- watchdog ------------------------------------------------------------------------------------


def test_watchdog_kills_a_proxy_whose_heartbeat_stands_still_and_restarts_it(caplog) -> None:
    rig = Rig(count=2, watchdog=TIMEOUT)
    rig.claim(0)
    rig.claim(1)
    caplog.set_level(logging.INFO, "shardgate.coordinator")
    for _ in range(40):  # 10 s of sweeps: proxy 1 keeps beating, proxy 0 is frozen
        rig.clock.advance(0.25)
        rig.beat(1)
        rig.sup.poll()
        if rig.proc(0).signals:
            break
    victim = rig.proc(0)
    assert victim.signals == [signal.SIGKILL]
    assert rig.proc(1).signals == [], "a proxy that beats is left alone"
    assert rig.sup.watchdog_kills == 1
    said = r"proxy 0 \(pid \d+\) is not responding: no heartbeat for 5\.\ds \(watchdog_timeout 5s\)"
    assert re.search(said, caplog.text), caplog.text

    rig.sup.poll()
    assert victim.signals == [signal.SIGKILL], "one kill per process"
    victim.exit(-signal.SIGKILL)
    rig.sup.poll()
    assert "exited with signal 9" in caplog.text and "killed by the watchdog: no heartbeat" in caplog.text
    rig.clock.advance(rig.sup.handles[0].restart_at - rig.clock.now)
    rig.sup.poll()
    assert rig.proc(0) is not victim and rig.sup.restarts == 1


def test_watchdog_counts_silence_from_the_last_change_it_saw() -> None:
    rig = Rig(count=1, watchdog=TIMEOUT)
    rig.claim(0)
    rig.sup.poll()
    rig.clock.advance(TIMEOUT)  # exactly the timeout: not yet
    rig.sup.poll()
    assert rig.proc(0).signals == []
    rig.beat(0, 1.0)  # a step back of the proxy's wall clock still counts as a heartbeat
    rig.clock.advance(1.0)
    rig.sup.poll()
    rig.clock.advance(TIMEOUT)
    rig.sup.poll()
    assert rig.proc(0).signals == []
    rig.clock.advance(0.01)
    rig.sup.poll()
    assert rig.proc(0).signals == [signal.SIGKILL]


def test_watchdog_ignores_a_proxy_that_has_not_claimed_its_row() -> None:
    rig = Rig(count=1, watchdog=TIMEOUT)
    # The row still holds the previous process's pid and a stale heartbeat (a restart in progress).
    rig.board.ints[rig.board.proxy_word(0, P_PID)] = 4242
    for _ in range(10):
        rig.clock.advance(TIMEOUT)
        rig.sup.poll()
    assert rig.proc(0).signals == []


def test_watchdog_is_off_at_zero_and_while_stopping() -> None:
    off = Rig(count=1, watchdog=0.0)
    off.claim(0)
    stopping = Rig(count=1, watchdog=TIMEOUT)
    stopping.claim(0)
    stopping.sup.poll()
    stopping.sup.stopping = True
    for rig in (off, stopping):
        for _ in range(5):
            rig.clock.advance(TIMEOUT)
            rig.sup.poll()
        assert rig.proc(0).signals == []


def test_watchdog_timeout_can_change_while_running() -> None:
    rig = Rig(count=1, watchdog=TIMEOUT)
    rig.claim(0)
    rig.sup.poll()
    rig.sup.watchdog_timeout = 0.0  # a reload turned it off ...
    rig.sup.poll()
    rig.clock.advance(60)
    rig.sup.poll()
    assert rig.proc(0).signals == []
    rig.sup.watchdog_timeout = TIMEOUT  # ... and on again: the silence counts from now on
    rig.sup.poll()
    assert rig.proc(0).signals == []
    rig.clock.advance(TIMEOUT + 0.1)
    rig.sup.poll()
    assert rig.proc(0).signals == [signal.SIGKILL]
