"""When a client connection reads: flow control of its input, the bound on what it buffers.

Role: :class:`InputFlow`, between :class:`proxy_workers.serving.reading.RequestReader` (parsing)
and :class:`proxy_workers.serving.protocol.ClientProtocol` (the connection, dispatch, answers):
it pauses and resumes reading from the client, parses a large read a slice at a time, holds
what arrives past a pause, and relays the client transport's write back-pressure to the
exchange (``pause_upstream``/``resume_upstream``). Its slots are the flow state it owns (set by
``ClientProtocol.__init__``).

Invariants:
- Bounded memory per connection (docs/security.md, "Memory"). Reading from the client stops
  (``pause_reading``) while ``max_pipelined`` requests, or queued bodies of ``max_body_size``
  bytes in all, wait; or while the client's own write buffer is above its high-water mark (and
  then the next queued request waits until it drains). A read larger than FEED_SLICE is parsed a
  slice at a time so that parsing stops there too, the rest held until reading resumes. A body is
  accumulated in one bytearray. Worst case for one connection, B = max_body_size, H = the Python
  objects of one head (~3 x max_head_size + 200 B x max_header_count, ~210 KiB by default)::

      queued bodies < 2 B   +  the request being read ~2.1 B (bytearray, then its bytes copy)
      + (max_pipelined + 1) x H  +  one slice of tiny requests past the cap (~0.6 MiB)
      + one unparsed read held (<= 256 KiB)  +  llhttp's unfinished field (<= max_head_size)
      + the write buffer's high-water mark (64 KiB) and one answer of the router's own

  about 4 B + 4.5 MiB: ~133 MiB with the defaults (B = 32 MiB), ~4.6 MiB with B = 16 KiB.
- ``header_timeout`` is for a client that is slow to send: it does not run while reading is
  paused, and starts again for a request partly read when reading resumes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy_workers.serving.reading import FEED_SLICE, RequestReader

if TYPE_CHECKING:
    import asyncio


class InputFlow(RequestReader):
    """A client connection's input flow control (see the module docstring)."""

    __slots__ = ("_blocked", "_held", "_stopped", "_write_paused")

    # Set by ClientProtocol.__init__ (what each means: its comments there).
    _blocked: bool
    _held: bytes
    _stopped: bool
    _write_paused: bool

    # Provided by the connection (ClientProtocol), read here.
    transport: asyncio.Transport | None
    _queued_bytes: int

    def data_received(self, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def _drain_queue(self) -> None:
        raise NotImplementedError

    def _receive_in_slices(self, data: bytes | memoryview) -> None:
        """Parse ``data`` FEED_SLICE bytes at a time; once blocked, hold the rest (or drop it, stopped)."""
        view = memoryview(data)
        for start in range(0, len(view), FEED_SLICE):
            if self._stopped:
                return
            if self._blocked:
                self._held += view[start:]
                return
            self.data_received(view[start:start + FEED_SLICE])

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_input()
        if self.exchange is not None:
            self.exchange.pause_upstream()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.exchange is not None:
            self.exchange.resume_upstream()
        elif self.queue:  # a queued request waited for the client to read (_drain_queue)
            self._drain_queue()
        self._update_input()

    def _stop(self) -> None:
        """Parse nothing more on this connection (its last request is being answered)."""
        self._stopped = True
        self._held = b""
        self._update_input()

    def _update_input(self) -> None:
        """Pause reading while stopped, write-paused, or while max_pipelined requests (or queued
        bodies of max_body_size bytes in all) wait; else resume."""
        settings = self.proc.settings
        block = (self._stopped or self._write_paused or len(self.queue) >= settings.max_pipelined
                 or self._queued_bytes >= settings.max_body_size)
        if block == self._blocked:
            return
        self._blocked = block
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if block:
            transport.pause_reading()
            # header_timeout is for a client that is slow to send, not for time we do not read.
            self.reading_since = 0.0
        elif self._held:
            # Parsed from the loop, not from here: this may run inside a callback of the parser.
            self.proc.loop.call_soon(self._release_held)
        else:
            self._resume_reading(transport)

    def _release_held(self) -> None:
        transport = self.transport
        if self._blocked or transport is None or transport.is_closing():
            return
        held, self._held = self._held, b""
        self._receive_in_slices(held)
        if not self._blocked:
            self._resume_reading(transport)

    def _resume_reading(self, transport: asyncio.Transport) -> None:
        if self._url:  # a request was partly read: its header_timeout starts again
            self.reading_since = self.proc.loop.time()
        transport.resume_reading()
