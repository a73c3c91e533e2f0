"""Zero-downtime upgrade: a coordinator hands the port to a successor running new code and config.

Role: on SIGUSR2 the running coordinator starts its successor: the same command line, run by
the same interpreter, so whatever is installed now (new code) and whatever the config file and
environment say now (new config) is what runs. The successor starts as any coordinator does; its
proxies join the listeners' ``SO_REUSEPORT`` group, so for a while both generations accept. Once
the successor's proxies serve, it sends SIGTERM to its predecessor, which stops cleanly: its
proxies take their queued connections, finish their requests and streams, and exit.

Invariants:
- The predecessor keeps serving until the successor is ready: a successor that fails to start
  (bad config, broken code) changes nothing; the old generation simply goes on.
- Only the coordinator that started a successor is ever signalled by it (its pid travels in the
  successor's environment, and is checked to still be a shardgate coordinator).
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
PREDECESSOR_ENV = "SHARDGATE_PREDECESSOR"


class Succession:
    """The upgrade state of one coordinator."""

    def __init__(self) -> None:
        self.successor: subprocess.Popen[bytes] | None = None

    def start_successor(self) -> None:
        """SIGUSR2: start the next generation (it retires this one once it serves)."""
        if self.successor is not None and self.successor.poll() is None:
            log.warning("upgrade already under way (successor pid %d); SIGUSR2 ignored", self.successor.pid)
            return
        argv = [sys.executable, "-m", "shardgate.cli", *sys.argv[1:]]
        env = {**os.environ, PREDECESSOR_ENV: str(os.getpid())}
        # systemd hears only from its main process (NotifyAccess=main); under systemd an upgrade
        # is a restart for now (docs/systemd.md), so the successor does not speak to it.
        env.pop("NOTIFY_SOCKET", None)
        self.successor = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)
        log.info("upgrade: started successor pid %d (%s); this generation serves until it is ready",
                 self.successor.pid, " ".join(argv))

    def poll(self) -> None:
        """Every tick: a successor that exited before taking over is reported (we still serve)."""
        successor = self.successor
        if successor is None or successor.poll() is None:
            return
        self.successor = None
        log.error("upgrade failed: the successor (pid %d) exited with %s before taking over; this "
                  "generation keeps serving", successor.pid, successor.returncode)


def retire_predecessor() -> None:
    """Called by a successor once its proxies serve: the predecessor drains and exits."""
    value = os.environ.pop(PREDECESSOR_ENV, "")
    if not value.isdigit():
        return
    pid = int(value)
    if not _is_coordinator(pid):
        return
    os.kill(pid, signal.SIGTERM)
    log.info("upgrade: serving; the previous coordinator (pid %d) is draining", pid)


def _is_coordinator(pid: int) -> bool:
    args = process_args(pid)
    return any(b"shardgate" in arg for arg in args) and b"serve" in args
