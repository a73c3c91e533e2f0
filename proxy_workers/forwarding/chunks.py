"""HTTP/1.1 chunked framing of what the router relays to a client (RFC 9112 7.1): one place.

Role: :func:`chunk` frames one piece of a response body the router re-chunks (an HTTP worker's
answer of unknown length, a gRPC answer, an SSE error event) for a client; the last chunk is
:data:`LAST_CHUNK`.

Invariants: a chunk is never empty (an empty one would end the body); its size line is lowercase
hex. Size lines are cached for sizes under :data:`CACHED_SIZES` (a stream's chunks repeat a few
sizes): a dict lookup instead of ``%x`` formatting, which compiled code leaves to CPython.
"""

from __future__ import annotations

from typing import Final

LAST_CHUNK: Final = b"0\r\n\r\n"
CACHED_SIZES: Final = 1 << 16
_SIZE_LINES: Final[dict[int, bytes]] = {}  # chunk size -> b"<hex>\r\n"


def chunk(data: bytes) -> bytes:
    """``data`` (not empty) as one chunk."""
    size = len(data)
    line = _SIZE_LINES.get(size)
    if line is None:
        line = b"%x\r\n" % size
        if size < CACHED_SIZES:
            _SIZE_LINES[size] = line
    return b"".join((line, data, b"\r\n"))
