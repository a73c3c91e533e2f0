"""W3C Trace Context (``traceparent``, ``tracestate``) for the requests the router forwards.

Role: the rules every data path shares for the trace context a worker gets. The client protocol
(:mod:`proxy_workers.serving.reading`) applies them once per request and writes the result as
header lines of the request's ``upstream_head`` (:class:`proxy_workers.forwarding.request.Request`
reads ``traceparent`` back from there); the HTTP paths send those lines, the gRPC paths the same
values as metadata
(:func:`proxy_workers.forwarding.headers.call_metadata`).

Invariants:
- Every forwarded request carries exactly one valid version-00 ``traceparent`` (55 characters):
  a client's valid one keeps its trace id; an invalid, repeated or absent one is replaced by a
  fresh one (new trace id, sampled), so a worker's spans always join a trace.
- ``tracestate`` is forwarded only when the client's ``traceparent`` was valid (W3C: a vendor
  that cannot parse traceparent must not use tracestate), only if every member is well formed
  with no key repeated, and bounded as the spec asks (at most 32 members and 512 characters,
  members over 128 characters dropped first, then from the end).
- Fresh ids come from ``os.urandom`` (cryptographically random, so trace ids cannot be guessed
  and ratio samplers that read either half of the id see uniform bits), made ``BATCH`` at a time
  in C (:func:`refill`): a request takes one from a list. A forked child starts with an empty
  list, so no two processes ever hand out the same ids.
- All-zero ids are invalid (W3C); a client's are refused. A fresh span id is all zero with
  probability 2**-64 (once in millions of years at 100,000 requests/s): not worth a check per
  batch.
"""

from __future__ import annotations

import os
import re
import struct

BATCH = 256  # fresh traceparents made per os.urandom call
MAX_TRACESTATE = 512  # characters (W3C: propagate at least 512; we propagate at most that)
MAX_MEMBERS = 32
MAX_MEMBER = 128  # longer members are the first dropped when truncating

_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16
_HEX_DIGIT = bytes(b"0123456789abcdef"[b & 15] for b in range(256))  # a bytes.translate table
_cut = struct.Struct("55s" * BATCH).unpack  # a batch's buffer -> its BATCH values
# version-trace_id-parent_id-flags; versions above 00 may add fields after a dash (W3C 4.3).
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z", re.S)
_MEMBER = re.compile(
    rb"(?:[a-z][a-z0-9_*/-]{0,255}|[a-z0-9][a-z0-9_*/-]{0,240}@[a-z][a-z0-9_*/-]{0,13})"
    rb"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]\Z")

# Fresh traceparents ("00-<trace>-<span>-01"): ``take() if FRESH else refill()``. FRESH is only
# ever changed in place (``take`` is its bound pop, which saves an attribute lookup a request).
FRESH: list[bytes] = []
take = FRESH.pop


def refill() -> bytes:
    """Make ``BATCH`` fresh traceparents and hand out one (the caller found ``FRESH`` empty).

    All in C, about 700 CPU instructions a traceparent: one random byte per character, mapped to
    a hex digit by its low 4 bits (unbiased: 256 is a multiple of 16), the fixed characters
    written over them a column at a time, then cut into values. (hexlify + split + join, the
    obvious way, costs three times as much.)
    """
    buf = bytearray(os.urandom(55 * BATCH)).translate(_HEX_DIGIT)
    buf[0::55] = buf[1::55] = buf[53::55] = b"0" * BATCH  # version 00, flags 01 (sampled)
    buf[2::55] = buf[35::55] = buf[52::55] = b"-" * BATCH
    buf[54::55] = b"1" * BATCH
    FRESH.extend(_cut(buf))
    return FRESH.pop()


def fresh_traceparent() -> bytes:
    """A new traceparent: a new trace, the router's span as its root, sampled."""
    return take() if FRESH else refill()


os.register_at_fork(after_in_child=FRESH.clear)


def parse_traceparent(values: list[bytes]) -> tuple[bytes, bytes, bytes] | None:
    """(trace id, parent id, flags) of a client's traceparent fields, or None if not valid.

    More than one field is invalid (the header is not a list). A version above 00 is read as far
    as version 00 goes (W3C forward compatibility); version ff is invalid.
    """
    if len(values) != 1:
        return None
    m = _TRACEPARENT.match(values[0].strip())
    if m is None:
        return None
    version, trace, parent, flags, rest = m.groups()
    if version == b"ff" or (version == b"00" and rest is not None):
        return None
    if trace == _ZERO_TRACE or parent == _ZERO_SPAN:
        return None
    return trace, parent, flags


def traceparent(trace: bytes, span: bytes, flags: bytes) -> bytes:
    """A version-00 traceparent value."""
    return b"00-%s-%s-%s" % (trace, span, flags)


def child_flags(flags: bytes) -> bytes:
    """The flags a child span inherits: sampled (0x01) and random (0x02); W3C says unknown
    flags are not propagated by a vendor that makes its own span."""
    return b"%02x" % (int(flags, 16) & 0x03)


def bounded_tracestate(values: list[bytes]) -> bytes:
    """The client's tracestate fields as one value to forward, or b"" (none, or not valid).

    Repeated fields form one list (RFC 9110 5.3). Empty members are skipped; a malformed member
    or a repeated key drops the whole header (relaying a half-understood list would be worse than
    none). Over the bounds, members over 128 characters go first, then members from the end.
    """
    members = [m.strip(b" \t") for m in b",".join(values).split(b",")]
    members = [m for m in members if m]
    if not members:
        return b""
    keys = set()
    for member in members:
        if _MEMBER.match(member) is None:
            return b""
        keys.add(member[:member.index(b"=")])
    if len(keys) != len(members):
        return b""
    if len(members) > MAX_MEMBERS or sum(map(len, members)) + len(members) - 1 > MAX_TRACESTATE:
        members = [m for m in members if len(m) <= MAX_MEMBER]
        while members and (len(members) > MAX_MEMBERS
                           or sum(map(len, members)) + len(members) - 1 > MAX_TRACESTATE):
            members.pop()
    return b",".join(members)
