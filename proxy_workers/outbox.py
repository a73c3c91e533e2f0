"""Writes held to the end of the event-loop iteration, then sent together.

Role: one :class:`Outbox` per proxy process. A connection with something to send (a client
connection's answer, a worker connection's request) keeps it and registers with the outbox; once
the loop has run every I/O callback of its current iteration, the outbox flushes each connection
(one ``transport.write`` apiece).

Why: on loopback, a ``write`` to a socket whose reader sleeps in ``epoll_wait`` pays for waking
that process, and spread over an iteration those wakeups happen one by one (the reader wakes,
takes one message, sleeps again). Sent back to back, most of them find the reader already awake.
Measured with peers.py's chat load: the proxy's kernel time per request fell by about 40%.

Invariants:
- What a connection sends keeps its order: everything it sends goes through its own held output
  (:class:`Sender`), and a connection that closes flushes what it holds first; an aborted one
  drops it (an abort discards unsent data anyway).
- The flush runs within the iteration that queued it (``call_soon`` runs after the iteration's I/O
  callbacks), so nothing waits on a timer or on more traffic: latency grows by microseconds.
- A flush scheduled while another runs goes to the next iteration; a connection registered twice
  (after being flushed) is simply flushed twice, the second time with nothing to send.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Sender(Protocol):
    """A connection whose writes the outbox holds (``ClientProtocol``, ``UpstreamConnection``)."""

    def flush_output(self) -> None:
        """Write what is held to the transport (nothing if it is gone or closing)."""


class Outbox:
    """The connections with held output, flushed at the end of the loop iteration."""

    __slots__ = ("_loop", "_scheduled", "_senders")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._senders: list[Sender] = []
        self._scheduled = False

    def hold(self, sender: Sender) -> None:
        """``sender`` now holds output (it was holding none): flush it at the iteration's end."""
        self._senders.append(sender)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        senders, self._senders = self._senders, []
        for sender in senders:
            sender.flush_output()
