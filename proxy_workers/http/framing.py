"""What a worker's HTTP/1.1 response may be: the head budget and the transfer-coding rule.

Role: the rules :class:`proxy_workers.http.upstream.UpstreamConnection` applies to a worker's
response framing (RFC 9112 6, 7), kept apart from its callbacks. Nothing here runs for an
ordinary response: only for a Transfer-Encoding other than a lone ``chunked``, or a refusal.

Invariants:
- A response head (status line and fields, interim ones each counted afresh) may take
  :data:`MAX_RESPONSE_HEAD` bytes; beyond that the attempt fails.
- ``chunked`` is removed by llhttp only as the final coding; every other coding is relayed, in
  order, as its own ``transfer-encoding`` line (the proxy adds its own ``chunked`` after them).
  ``chunked`` anywhere else, or twice, is refused: it would be applied twice on the way out.
"""

from __future__ import annotations

MAX_RESPONSE_HEAD = 64 * 1024  # bytes; a worker's heads are a few hundred (nginx allows 4-8 KiB)


class WorkerProtocolError(Exception):
    """What a worker sent breaks HTTP/1.1 or this router's bounds; raised from a parser callback,
    it fails the attempt with its message as the reason (the connection is closed)."""


def coding_lines(value: bytes, chunked: bool, has_content: bool) -> tuple[list[bytes], bool]:
    """The lines to relay for one Transfer-Encoding field, and whether ``chunked`` is now the
    final coding; ``chunked`` says it already was (an earlier field)."""
    lines = []
    codings = [c for c in (c.strip().lower() for c in value.split(b",")) if c]
    for i, coding in enumerate(codings):
        if chunked or (coding == b"chunked" and i != len(codings) - 1):
            raise WorkerProtocolError("worker applied chunked before another transfer coding")
        if coding == b"chunked":
            chunked = True
        elif has_content:  # a 204 or 304 never has content, nor a coding
            lines.append(b"transfer-encoding: %s\r\n" % coding)
    return lines, chunked
