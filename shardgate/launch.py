"""Start shardgate's own processes as real subprocesses: mock workers and the router.

Role: one launcher shared by ``shardgate demo``, the tests and the load-test scripts, so they all
start components exactly as an operator would (the real CLI, real sockets).

Invariant: a launched process is in its own session (its own process group), so ``stop`` can
signal the whole group: the router's proxies go with their coordinator.
"""

from __future__ import annotations

import os
import queue
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from signal import SIGKILL, SIGTERM

READY_WORKER = re.compile(r"mock-worker ready on ((?:http|grpc)://\S+)")
READY_ROUTER = re.compile(r"shardgate ready on (http://\S+)")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proxies_rss_mb(router: Launched) -> float:
    """Resident memory of a launched router's proxy processes (its coordinator's children), MiB."""
    import psutil

    return sum(p.memory_info().rss for p in psutil.Process(router.pid).children()) / 2**20


class Launched:
    """A running subprocess whose stdout is read until its ready line."""

    def __init__(self, argv: Sequence[str], ready: re.Pattern[str], timeout: float = 30.0,
                 env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        # stderr goes to a file and stdout is drained by a thread: a pipe nobody reads would
        # block the process once it fills (64 KiB of log lines).
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.stdout_lines: list[str] = []
        self.popen = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self._stderr,
                                      stdin=subprocess.DEVNULL, text=True, start_new_session=True,
                                      env={**os.environ, **(env or {})})
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        self.url = self._wait_ready(ready, timeout)

    def _drain(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.stdout_lines.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def stderr_text(self) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read()

    def _wait_ready(self, ready: re.Pattern[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:  # the process exited
                break
            match = ready.search(line)
            if match:
                return match.group(1)
        seen = self.stdout_lines
        self.stop(SIGKILL)
        err = self.stderr_text()
        raise RuntimeError(f"{' '.join(self.argv)} did not become ready:\n{''.join(seen)}{err}")

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, sig: int = SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal the process group, wait, SIGKILL what remains; returns the exit code."""
        self.signal(sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(SIGKILL)
            return self.popen.wait(5)
        finally:
            self.signal(SIGKILL)  # proxies orphaned by a killed coordinator


def mock_worker(models: Sequence[str] = ("mock-model",), *extra: str) -> Launched:
    argv = [sys.executable, "-m", "shardgate.mocks.worker", "--port", "0"]
    for model in models:
        argv += ["--model", model]
    return Launched(argv + list(extra), READY_WORKER)


def router(workers: Sequence[str], *extra: str, config: str | None = None,
           env: dict[str, str] | None = None) -> Launched:
    argv = [sys.executable, "-m", "shardgate.cli", "serve"]
    for url in workers:
        argv += ["--worker", url]
    if config:
        argv += ["--config", config]
    return Launched(argv + list(extra), READY_ROUTER, env=env)
