"""Supervision of the proxy processes: start, watch, restart with backoff, stop.

Role: keep ``N`` proxies running, as gunicorn's arbiter keeps its workers. Each proxy is a fresh
interpreter (``shm.process.proxy_argv``), in the coordinator's process group (so a Ctrl-C or a
group signal reaches everyone) with inherited stdout/stderr.

Invariants:
- A proxy that exits with ``EXIT_BOOT_ERROR`` (bind or configuration failure) stops the service
  with one message (:class:`HaltServer`) instead of a restart loop.
- Any other exit while the service runs is restarted after a backoff that doubles per quick
  failure (0.1 s, 0.2 s, ... up to ``restart_backoff_max``) and resets once a proxy has lived
  ``STABLE_SECONDS``.
- A proxy counts as up once it has written its pid into its load-board row, which it does only
  after its listener accepts connections.
- Watchdog: a proxy that is up and whose heartbeat (``P_HEARTBEAT``, rewritten every sweep) has
  not moved for ``watchdog_timeout`` seconds is wedged (a blocked event loop, SIGSTOP): it is
  killed with SIGKILL and goes through the ordinary restart path above, so its share of the
  port's connections goes to a live process. Never while stopping (a draining proxy may be slow
  on purpose), never before the proxy has claimed its row, and at most one kill per process.
- The watchdog measures how long the heartbeat has *stood still* on the coordinator's monotonic
  clock rather than comparing the proxy's wall-clock stamp with ours: a wall-clock step (NTP, a
  resumed VM) would otherwise make every proxy look stale at once and kill them all.
- Heartbeats are tracked whatever ``watchdog_timeout`` is; :meth:`Supervisor.trouble` reads them
  (every proxy running, serving, beating within ``HEARTBEAT_STALE``) to decide whether the
  coordinator may feed systemd's watchdog.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Protocol

from shm.loadboard import P_HEARTBEAT, P_PID, LoadBoard
from shm.process import EXIT_BOOT_ERROR, proxy_argv

STABLE_SECONDS = 10.0
SYSTEMD_ONLY = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"})
FIRST_BACKOFF = 0.1
HEARTBEAT_STALE = 2.0  # seconds without a heartbeat (one every 0.25 s) that make a proxy not alive
log = logging.getLogger("shardgate.coordinator")


class ProxyProcess(Protocol):
    """What the supervisor needs of a started proxy (``subprocess.Popen`` has it)."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...


Spawn = Callable[[list[str]], ProxyProcess]


def spawn_proxy(argv: list[str]) -> ProxyProcess:
    """The production spawn: a child in our process group, with our stdout and stderr.

    systemd hears only from coordinators (the unit has ``NotifyAccess=all`` for upgrades,
    coordinator.succession): a proxy does not even get the notify socket's address."""
    env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_ONLY}
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=env)


class HaltServer(BaseException):
    """Stop the whole service (raised through the main loop on purpose)."""

    def __init__(self, reason: str, exit_code: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit_code = exit_code


class ProxyHandle:
    """One proxy slot: the process in it (None between an exit and its restart) and its history."""

    __slots__ = ("beat", "beat_seen_at", "failures", "index", "kill_reason", "popen", "restart_at",
                 "started_at", "watched_since")

    def __init__(self, index: int) -> None:
        self.index = index
        self.popen: ProxyProcess | None = None
        self.started_at = 0.0
        self.failures = 0
        self.restart_at = 0.0
        # Watchdog: the heartbeat value last read and when (monotonic) it was seen to change.
        self.beat = 0.0
        self.beat_seen_at: float | None = None
        self.watched_since: float | None = None  # when the watchdog (timeout > 0) began watching it
        self.kill_reason = ""  # set when the watchdog killed this process; reported at its exit


class Supervisor:
    def __init__(self, instance: str, count: int, board: LoadBoard, backoff_max: float,
                 watchdog_timeout: float = 0.0, *, spawn: Spawn = spawn_proxy,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.instance = instance
        self.board = board
        self.backoff_max = backoff_max
        self.watchdog_timeout = watchdog_timeout  # 0: off; both may change on reload
        self.spawn = spawn
        self.clock = clock
        self.handles = [ProxyHandle(i) for i in range(count)]
        self.stopping = False
        self.restarts = 0        # every restart, whatever ended the previous process
        self.watchdog_kills = 0  # of which the watchdog caused this many

    def start_all(self) -> None:
        for handle in self.handles:
            self._start(handle)

    def _start(self, handle: ProxyHandle) -> None:
        handle.popen = self.spawn(proxy_argv(self.instance, handle.index))
        handle.started_at = self.clock()
        handle.restart_at = 0.0
        handle.beat, handle.beat_seen_at, handle.watched_since, handle.kill_reason = 0.0, None, None, ""

    def pids(self) -> list[int]:
        return [h.popen.pid for h in self.handles if h.popen is not None and h.popen.poll() is None]

    def claimed(self, h: ProxyHandle) -> bool:
        """The running process of ``h`` has written its pid into its board row (it is serving)."""
        return h.popen is not None and self.board.ints[self.board.proxy_word(h.index, P_PID)] == h.popen.pid

    def all_up(self) -> bool:
        """Every proxy is running and has announced itself on the load board."""
        return all(h.popen is not None and h.popen.poll() is None and self.claimed(h) for h in self.handles)

    def poll(self) -> None:
        """Reap exited proxies, kill wedged ones, restart them when their backoff has passed."""
        now = self.clock()
        for h in self.handles:
            if h.popen is not None:
                code = h.popen.poll()
                if code is None:
                    self._watch(h, now)
                    continue
                self._exited(h, code, now)
            if h.popen is None and not self.stopping and now >= h.restart_at:
                log.info("restarting proxy %d", h.index)
                self.restarts += 1
                self._start(h)

    def _watch(self, h: ProxyHandle, now: float) -> None:
        """The watchdog's look at one running proxy (its heartbeat is tracked whatever the timeout)."""
        if h.kill_reason or not self.claimed(h):
            return
        assert h.popen is not None
        beat = self.board.floats[self.board.proxy_word(h.index, P_HEARTBEAT)]
        if beat != h.beat or h.beat_seen_at is None:
            # Any change counts as alive (even a step back of the proxy's wall clock).
            h.beat, h.beat_seen_at = beat, now
        timeout = self.watchdog_timeout
        if timeout <= 0:
            h.watched_since = None  # turned on again by a reload: silence counts from then, not before
            return
        if h.watched_since is None:
            h.watched_since = now
        if self.stopping:
            return
        silent = now - max(h.beat_seen_at, h.watched_since)
        if silent <= timeout:
            return
        h.kill_reason = f"no heartbeat for {silent:.1f}s (watchdog_timeout {timeout:g}s)"
        log.error("proxy %d (pid %d) is not responding: %s; killing it with SIGKILL", h.index,
                  h.popen.pid, h.kill_reason)
        self.watchdog_kills += 1
        try:
            h.popen.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass  # it exited meanwhile; the next poll reaps it like any exit

    def trouble(self, stale_after: float = HEARTBEAT_STALE) -> str:
        """Empty when every proxy runs, serves and beat within ``stale_after`` s (as of the last
        :meth:`poll`); else what is wrong with the first one that does not. systemd's watchdog is
        fed only while this is empty."""
        now = self.clock()
        for h in self.handles:
            if h.popen is None or h.popen.poll() is not None:
                return f"proxy {h.index} is not running"
            if not self.claimed(h) or h.beat_seen_at is None:
                return f"proxy {h.index} (pid {h.popen.pid}) is starting"
            if h.kill_reason or now - h.beat_seen_at > stale_after:
                return f"proxy {h.index} (pid {h.popen.pid}): no heartbeat for {now - h.beat_seen_at:.1f}s"
        return ""

    def _exited(self, h: ProxyHandle, code: int, now: float) -> None:
        h.popen = None
        if self.stopping:
            return
        if code == EXIT_BOOT_ERROR:
            raise HaltServer(f"proxy {h.index} could not start (its error is above); stopping")
        lived = now - h.started_at
        h.failures = 0 if lived >= STABLE_SECONDS else h.failures + 1
        delay = min(FIRST_BACKOFF * 2 ** h.failures, self.backoff_max)
        h.restart_at = now + delay
        how = f"signal {-code}" if code < 0 else f"code {code}"
        why = f" (killed by the watchdog: {h.kill_reason})" if h.kill_reason else ""
        log.warning("proxy %d exited with %s after %.1fs%s; restarting in %.1fs", h.index, how, lived,
                    why, delay)

    def signal_all(self, sig: signal.Signals) -> None:
        for h in self.handles:
            if h.popen is not None and h.popen.poll() is None:
                try:
                    h.popen.send_signal(sig)
                except ProcessLookupError:
                    pass

    def running(self) -> int:
        return sum(1 for h in self.handles if h.popen is not None and h.popen.poll() is None)
