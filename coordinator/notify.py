"""systemd's notify protocol (sd_notify(3)), spoken by the coordinator and only by it.

Role: the one place that knows ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and the message formats.
The arbiter says *what* happened (ready, reloading, reloaded, reload refused, stopping, a loop
tick with or without healthy proxies); this module says it to systemd. No dependency: one
AF_UNIX datagram per message, as libsystemd's ``sd_notify`` sends it.

Invariants:
- Everything is a no-op when ``$NOTIFY_SOCKET`` is unset or not a usable address (not run under
  systemd, or ``Type=`` is not ``notify``); nothing here ever raises to the caller. A send that
  fails (systemd gone, queue full past ``SEND_TIMEOUT``) is dropped and logged at debug level.
- One message is one datagram of newline-separated ``KEY=VALUE`` lines; a ``@`` at the start of
  the socket path names the abstract namespace (replaced by a NUL byte). A value never contains
  a newline (``STATUS`` text is flattened), so a status can never inject another key.
- The environment is read once, when the :class:`Notifier` is made (by the coordinator, before
  any proxy starts). The proxies inherit ``$NOTIFY_SOCKET`` but never import this module, and
  their environment drops it (:mod:`coordinator.supervisor`).
- After a zero-downtime upgrade (:mod:`coordinator.succession`) the successor's ``READY=1``
  carries ``MAINPID=`` (the unit needs ``NotifyAccess=all``); the retired predecessor then sends
  nothing at all, so systemd sees one service whose main process changed, not a stop.
- ``READY=1`` is sent once listeners are bound and the first snapshot is published; every
  ``RELOADING=1`` (with ``MONOTONIC_USEC``, CLOCK_MONOTONIC in µs, as systemd >= 253 requires and
  252 ignores) is followed by ``READY=1``, also when the reload is refused (then with a
  ``STATUS=`` saying so); ``STOPPING=1`` starts the stop.
- ``WATCHDOG=1`` is sent at most every ``$WATCHDOG_USEC`` / 3 (under the half systemd asks for),
  and only from the coordinator's main loop, only while the caller reports its proxies alive
  (:meth:`coordinator.supervisor.Supervisor.proxies_alive`), and never after ``STOPPING=1``. A
  wedged loop or a wedged proxy therefore starves systemd's watchdog. ``$WATCHDOG_PID``, when
  set, must be our pid (as ``sd_watchdog_enabled`` checks), else the watchdog is off.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

SEND_TIMEOUT = 0.5      # seconds a send may block (a full receive queue) before it is dropped
WATCHDOG_FRACTION = 3   # ping every WATCHDOG_USEC / 3: comfortably under systemd's "half"
log = logging.getLogger("shardgate.coordinator")


def socket_address(value: str | None) -> str | None:
    """The address ``$NOTIFY_SOCKET`` names: a path, or ``\\0name`` for ``@name``; None if unusable."""
    if not value:
        return None
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # a relative path, or a vsock address (systemd >= 253): not for us


def format_message(*fields: str) -> bytes:
    """``KEY=VALUE`` lines joined by newlines; a newline inside a value becomes a space."""
    lines = []
    for field in fields:
        key, sep, value = field.partition("=")
        if not sep or not key or not key.isupper() or not key.replace("_", "").isalnum():
            raise ValueError(f"not a KEY=VALUE notify field: {field!r}")
        lines.append(f"{key}={' '.join(value.splitlines())}")
    return "\n".join(lines).encode()


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings for this process, or None when no watchdog is asked for."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    return usec / 1e6 / WATCHDOG_FRACTION


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares ``MONOTONIC_USEC`` with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """The coordinator's line to systemd (see the module docstring for the rules it keeps)."""

    def __init__(self, environ: Mapping[str, str] | None = None, *, pid: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        env = os.environ if environ is None else environ
        self.address = socket_address(env.get("NOTIFY_SOCKET"))
        self.interval = watchdog_interval(env, os.getpid() if pid is None else pid) \
            if self.address else None
        self.clock = clock
        self.pinged_at: float | None = None
        self.stop_sent = False
        self.withheld = False  # the last tick withheld the ping (said once, in a STATUS line)
        self.serving = ""      # the STATUS of the last READY=1, restored when a withholding ends

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """One datagram with ``fields``; True if it was handed to the socket."""
        if self.address is None:
            return False
        data = format_message(*fields)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(SEND_TIMEOUT)
                sock.sendto(data, self.address)
        except OSError as exc:
            log.debug("systemd notify %r not sent: %s", data, exc)
            return False
        return True

    def ready(self, status: str, main_pid: int | None = None) -> None:
        """Serving (first start, or the end of a reload): ``READY=1`` with what is served.

        ``main_pid``: a successor taking over after an upgrade names itself the service's main
        process in the same datagram (``MAINPID=``; systemd accepts it from a process of the
        unit's cgroup with ``NotifyAccess=all``)."""
        self.serving = status
        handover = (f"MAINPID={main_pid}",) if main_pid is not None else ()
        self.send(*handover, "READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", "STATUS=reloading the configuration")

    def reload_refused(self, reason: str) -> None:
        """The end of a refused reload: still ``READY=1`` (the old configuration serves on)."""
        self.send("READY=1", f"STATUS=reload refused, running configuration kept: {reason}")

    def stopping(self) -> None:
        self.stop_sent = True
        self.send("STOPPING=1", "STATUS=stopping: draining the proxies")

    def retire(self) -> None:
        """Our successor is the main process now: say nothing more (no STOPPING=1, no pings)."""
        self.stop_sent = True

    def tick(self, check: Callable[[], str]) -> bool:
        """A main-loop tick: ping the watchdog if a ping is due and nothing is wrong.

        ``check`` (called only when a watchdog is asked for) returns an empty string when every
        proxy is alive, else what is wrong with them. Then no
        ping is sent, and a ``STATUS=`` line says why (once per stretch of trouble); when the
        trouble ends, a ping is sent at once with the serving status again. Returns True when
        ``WATCHDOG=1`` was sent.
        """
        if self.interval is None or self.stop_sent:
            return False
        now = self.clock()
        trouble = check()
        if trouble:
            if not self.withheld:
                self.withheld = True
                self.status(f"watchdog withheld: {trouble}")
            return False
        if self.withheld:
            self.withheld = False
            self.pinged_at = now
            return self.send("WATCHDOG=1", f"STATUS={self.serving}")
        if self.pinged_at is not None and now - self.pinged_at < self.interval:
            return False
        self.pinged_at = now
        return self.send("WATCHDOG=1")
