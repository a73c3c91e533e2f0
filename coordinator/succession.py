"""Zero-downtime upgrade: a coordinator hands the port to a successor running new code and config.

Role: on SIGUSR2 the running coordinator starts its successor: the same command line, run by
the same interpreter, so whatever is installed now (new code) and whatever the config file and
environment say now (new config) is what runs. The successor starts as any coordinator does; its
proxies join the listeners' ``SO_REUSEPORT`` group, so for a while both generations accept. Once
the successor's proxies serve, it takes over (under systemd: ``MAINPID=<its pid>`` with
``READY=1``, :mod:`coordinator.notify`), then tells its predecessor it is retired (one byte on a
pipe the predecessor made) and sends it SIGTERM. The predecessor stops cleanly: its proxies take
their queued connections, finish their requests and streams, and exit.

Under systemd (``NotifyAccess=all``, docs/systemd.md) the order matters: systemd must hear the
new main pid before the old main process exits, or it would take the exit for the service's end.
A retired predecessor says nothing more to systemd (no ``STOPPING=1``, no watchdog pings): the
service is not stopping, its main process changed.

Invariants:
- The predecessor keeps serving until the successor is ready: a successor that fails to start
  (bad config, broken code) changes nothing; the old generation simply goes on.
- Only the coordinator that started a successor is ever signalled by it (its pid travels in the
  successor's environment, and is checked to still be a shardgate coordinator).
- A SIGTERM is a retirement only if the retirement byte came first; any other SIGTERM (say,
  ``systemctl stop`` in the middle of an upgrade) is a stop, and also stops a successor that has
  not taken over yet.
- One upgrade at a time: a second SIGUSR2 while a successor is starting is ignored (logged).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from shm.process import process_args

log = logging.getLogger("shardgate.coordinator")
PREDECESSOR_ENV = "SHARDGATE_PREDECESSOR"  # "<pid>:<fd of the retirement pipe>"
RETIRED = b"r"


class Succession:
    """The upgrade state of one coordinator: its predecessor (if it is one's successor) and its
    successor (while an upgrade is under way)."""

    def __init__(self) -> None:
        self.successor: subprocess.Popen[bytes] | None = None
        self._retirement: int | None = None  # read end of the pipe the successor writes RETIRED on
        # Taken out of the environment at once: neither our proxies nor our own successor inherit it.
        self.predecessor, self._notice = _parse(os.environ.pop(PREDECESSOR_ENV, ""))

    @property
    def takes_over(self) -> bool:
        """This coordinator was started by SIGUSR2 and announces itself as the main process."""
        return self.predecessor is not None

    def start_successor(self) -> None:
        """SIGUSR2: start the next generation (it retires this one once it serves)."""
        if self.successor is not None and self.successor.poll() is None:
            log.warning("upgrade already under way (successor pid %d); SIGUSR2 ignored", self.successor.pid)
            return
        self._close_retirement()
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        argv = [sys.executable, "-m", "shardgate.cli", *sys.argv[1:]]
        env = {**os.environ, PREDECESSOR_ENV: f"{os.getpid()}:{write_end}"}
        # systemd names the watchdog's process; the successor feeds it once it is the main one.
        env.pop("WATCHDOG_PID", None)
        try:
            self.successor = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, pass_fds=(write_end,))
        finally:
            os.close(write_end)
        self._retirement = read_end
        log.info("upgrade: started successor pid %d (%s); this generation serves until it is ready",
                 self.successor.pid, " ".join(argv))

    def poll(self) -> None:
        """Every tick: a successor that exited before taking over is reported (we still serve)."""
        successor = self.successor
        if successor is None or successor.poll() is None:
            return
        self.successor = None
        self._close_retirement()
        log.error("upgrade failed: the successor (pid %d) exited with %s before taking over; this "
                  "generation keeps serving", successor.pid, successor.returncode)

    def retired(self) -> bool:
        """At a SIGTERM: True if our successor took over (then this generation just drains)."""
        if self._retirement is None:
            return False
        try:
            return os.read(self._retirement, 1) == RETIRED
        except BlockingIOError:
            return False

    def abandon(self) -> None:
        """A stop before the successor took over: the upgrade is called off, the successor stopped."""
        successor = self.successor
        if successor is not None and successor.poll() is None:
            log.warning("stopping during an upgrade: stopping the successor (pid %d) too", successor.pid)
            successor.terminate()

    def retire_predecessor(self) -> None:
        """Called by a successor once it serves and has announced itself: the predecessor drains."""
        pid, notice = self.predecessor, self._notice
        self.predecessor = self._notice = None
        if pid is None or not _is_coordinator(pid):
            return
        if notice is not None:
            try:
                os.write(notice, RETIRED)
            except OSError:
                pass  # the predecessor is gone; the SIGTERM below finds nothing either
            os.close(notice)
        os.kill(pid, signal.SIGTERM)
        log.info("upgrade: serving; the previous coordinator (pid %d) is draining", pid)

    def _close_retirement(self) -> None:
        if self._retirement is not None:
            os.close(self._retirement)
            self._retirement = None


def _parse(value: str) -> tuple[int | None, int | None]:
    """(predecessor pid, retirement pipe fd) from ``SHARDGATE_PREDECESSOR``; Nones if absent."""
    pid, _, fd = value.partition(":")
    if not pid.isdigit():
        return None, None
    return int(pid), (int(fd) if fd.isdigit() else None)


def _is_coordinator(pid: int) -> bool:
    args = process_args(pid)
    return any(b"shardgate" in arg for arg in args) and b"serve" in args
