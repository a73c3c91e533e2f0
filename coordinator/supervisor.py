"""Supervision of the proxy processes: start, watch, restart with backoff, stop.

Role: keep ``N`` proxies running. Each is a fresh interpreter (``shm.process.proxy_argv``), in the
coordinator's process group (so a Ctrl-C or a group signal reaches everyone) with inherited
stdout/stderr.

Invariants:
- A proxy that exits with ``EXIT_BOOT_ERROR`` (bind or configuration failure) stops the service
  with one message (:class:`HaltServer`) instead of a restart loop.
- Any other exit while the service runs is restarted after a backoff that doubles per quick
  failure (0.1 s, 0.2 s, ... up to ``restart_backoff_max``) and resets once a proxy has lived
  ``STABLE_SECONDS``.
- A proxy counts as up once it has written its pid into its load-board row, which it does only
  after its listener accepts connections.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time

from shm.loadboard import P_PID, LoadBoard
from shm.process import EXIT_BOOT_ERROR, proxy_argv

STABLE_SECONDS = 10.0
log = logging.getLogger("shardgate.coordinator")


class HaltServer(BaseException):
    """Stop the whole service (raised through the main loop on purpose)."""

    def __init__(self, reason: str, exit_code: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit_code = exit_code


class ProxyHandle:
    __slots__ = ("failures", "index", "popen", "restart_at", "started_at")

    def __init__(self, index: int) -> None:
        self.index = index
        self.popen: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.failures = 0
        self.restart_at = 0.0


class Supervisor:
    def __init__(self, instance: str, count: int, board: LoadBoard, backoff_max: float) -> None:
        self.instance = instance
        self.board = board
        self.backoff_max = backoff_max
        self.handles = [ProxyHandle(i) for i in range(count)]
        self.stopping = False
        self.restarts = 0

    def start_all(self) -> None:
        for handle in self.handles:
            self._start(handle)

    def _start(self, handle: ProxyHandle) -> None:
        handle.popen = subprocess.Popen(proxy_argv(self.instance, handle.index), stdin=subprocess.DEVNULL)
        handle.started_at = time.monotonic()
        handle.restart_at = 0.0

    def pids(self) -> list[int]:
        return [h.popen.pid for h in self.handles if h.popen is not None and h.popen.poll() is None]

    def all_up(self) -> bool:
        """Every proxy is running and has announced itself on the load board."""
        for h in self.handles:
            if h.popen is None or h.popen.poll() is not None:
                return False
            if self.board.ints[self.board.proxy_word(h.index, P_PID)] != h.popen.pid:
                return False
        return True

    def poll(self) -> None:
        """Reap exited proxies and restart them when their backoff has passed."""
        now = time.monotonic()
        for h in self.handles:
            if h.popen is not None:
                code = h.popen.poll()
                if code is None:
                    continue
                self._exited(h, code, now)
            if h.popen is None and not self.stopping and now >= h.restart_at:
                log.info("restarting proxy %d", h.index)
                self.restarts += 1
                self._start(h)

    def _exited(self, h: ProxyHandle, code: int, now: float) -> None:
        h.popen = None
        if self.stopping:
            return
        if code == EXIT_BOOT_ERROR:
            raise HaltServer(f"proxy {h.index} could not start (its error is above); stopping")
        lived = now - h.started_at
        h.failures = 0 if lived >= STABLE_SECONDS else h.failures + 1
        delay = min(0.1 * 2 ** h.failures, self.backoff_max)
        h.restart_at = now + delay
        how = f"signal {-code}" if code < 0 else f"code {code}"
        log.warning("proxy %d exited with %s after %.1fs; restarting in %.1fs", h.index, how, lived, delay)

    def signal_all(self, sig: signal.Signals) -> None:
        for h in self.handles:
            if h.popen is not None and h.popen.poll() is None:
                try:
                    h.popen.send_signal(sig)
                except ProcessLookupError:
                    pass

    def running(self) -> int:
        return sum(1 for h in self.handles if h.popen is not None and h.popen.poll() is None)
