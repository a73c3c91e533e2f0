"""The process contract between the coordinator and its proxies: how a proxy is started,
how it binds, and what its exit code means.

Invariants:
- A proxy is a fresh interpreter (``python -m proxy_workers``), never a fork of the coordinator,
  whose event loop and threads are running.
- Every listener of one router sets SO_REUSEADDR and SO_REUSEPORT before bind, so the proxies
  form one reuseport group and the kernel spreads connections across them. The coordinator's
  preflight binds the same way but never listens (a listening socket that never accepts would
  receive a share of connections).
- Exit code ``EXIT_BOOT_ERROR`` means "cannot start with this configuration" (bind failure, bad
  segment): the coordinator stops the service instead of restarting in a loop.
"""

from __future__ import annotations

import socket
import sys

EXIT_OK = 0
EXIT_BOOT_ERROR = 3
LISTEN_BACKLOG = 4096


def proxy_argv(instance: str, index: int) -> list[str]:
    return [sys.executable, "-m", "proxy_workers", "--instance", instance, "--index", str(index)]


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound, non-listening socket with the router's reuse options."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def listen_socket(host: str, port: int) -> socket.socket:
    sock = bind_socket(host, port)
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def process_args(pid: int) -> list[bytes]:
    """The command line of process ``pid`` (empty when it is gone or cannot be read)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().split(b"\0")
    except OSError:
        return []
