"""Writes held to the end of the event-loop iteration, then sent together.

Role: one :class:`Outbox` per proxy process. What the proxy sends on a connection (a client's
answer, a worker's request) is queued here; once the loop has run every I/O callback of its
current iteration, the outbox writes the queue out, in order, one ``transport.write`` per item.

Why: on loopback, a ``write`` to a socket whose reader sleeps in ``epoll_wait`` pays for waking
that process, and spread over an iteration those wakeups happen one by one (the reader wakes,
takes one message, sleeps again). Sent back to back, most of them find the reader already awake.
Measured with peers.py's chat load: the proxy's kernel time per request fell by about 40%.

Invariants:
- Order holds: one queue for every connection, written in the order it was filled; a connection
  that closes calls :meth:`Outbox.flush` first, so what it wrote goes out before its close. An
  aborted (or lost) connection's items are skipped: its transport is closing, and an abort
  discards unsent data anyway. A write that raises aborts its own connection (logged); the rest
  of the queue is still written.
- The flush runs within the iteration that queued it (``call_soon`` callbacks run after the
  iteration's I/O callbacks), so nothing waits on a timer or on more traffic: latency grows by
  microseconds. Items queued while a flush runs go out in the next iteration.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("shardgate.proxy")


class Outbox:
    """Writes queued during a loop iteration, flushed at its end (or before a close)."""

    __slots__ = ("_loop", "_queue", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: list[tuple[asyncio.WriteTransport, bytes]] = []
        self._scheduled = False

    def write(self, transport: asyncio.WriteTransport, data: bytes) -> None:
        """Queue ``data`` for ``transport``; it is written at the end of this loop iteration."""
        self._queue.append((transport, data))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write everything queued (called by the loop, and before any connection closes)."""
        self._scheduled = False
        queue, self._queue = self._queue, []
        for transport, data in queue:
            if not transport.is_closing():
                try:
                    transport.write(data)
                except Exception:  # one connection's failure must not cost the others their writes
                    log.exception("write to %s failed", transport.get_extra_info("peername"))
                    transport.abort()
