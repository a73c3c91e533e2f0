"""Header rules for both directions of every path, and for gRPC metadata: one place.

Role: which client fields reach a worker, which worker fields (or gRPC initial metadata) reach
the client, and how a ``Connection`` field's tokens extend the hop-by-hop set. Used by the client
protocol (request side), the HTTP worker connection (response side) and the gRPC path (both).

Invariants:
- Hop-by-hop fields (RFC 9110 7.6.1) and any field named in ``Connection`` never cross the router,
  in either direction.
- Fields the router sets itself (``X-Forwarded-For``, ``X-Request-ID``, ``traceparent`` and
  ``tracestate`` towards the worker; framing and ``X-Request-ID`` towards the client) are dropped
  from what is relayed, so neither a client nor a worker can set or strip them; a client's own
  values are read aside and kept when valid (trace context:
  :mod:`proxy_workers.forwarding.tracecontext`).
- Names are compared lowercased (HTTP field names are case-insensitive); relayed lines are
  written lowercased. :func:`field_name` lowercases through a bounded cache of the names seen,
  so a usual name costs a dict lookup and comes back with its hash computed for the set lookups
  that follow.
- gRPC: a worker's ``x-*`` initial metadata is relayed like an HTTP worker's extension headers,
  except the router's own (``x-request-id``, ``x-shardgate-*``); towards the worker the request id
  travels as ``x-request-id`` metadata, the trace context as ``traceparent``/``tracestate``
  metadata (the same values an HTTP worker gets).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from proxy_workers.contract import ClientRequest

# (Final: compiled code reads these sets directly, not by name.)
HOP_BY_HOP: Final = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                               b"transfer-encoding", b"upgrade"})
# Client fields never forwarded as they are: hop-by-hop, per-hop credentials, framing (the
# router re-frames the body), Host (the worker's), Expect (answered here), and the router's own.
REQUEST_DROP: Final = HOP_BY_HOP | {b"proxy-authorization", b"host", b"content-length", b"expect",
                                    b"x-forwarded-for", b"x-request-id"}
# Worker fields never relayed as they are: hop-by-hop, framing (re-framed per client), per-hop
# credentials, and the request id the router sets.
RESPONSE_DROP: Final = HOP_BY_HOP | {b"content-length", b"x-request-id", b"proxy-authenticate"}
# Headers the router reads itself but still forwards.
ROUTER_READS: Final = frozenset({b"x-shardgate-debug", b"x-shardgate-connection"})
# Trace context: the router forwards its own (the client's when valid, else a fresh one).
TRACE_CONTEXT: Final = frozenset({b"traceparent", b"tracestate"})
# Request fields kept aside while the head is read, handled when the request is complete.
ROUTER_NOTES: Final = ROUTER_READS | TRACE_CONTEXT | {b"x-forwarded-for", b"x-request-id"}
SPECIAL_REQUEST_HEADERS: Final = REQUEST_DROP | ROUTER_READS | TRACE_CONTEXT
NO_TOKENS: Final[frozenset[bytes]] = frozenset()


_NAMES: Final[dict[bytes, bytes]] = {}  # field name as sent -> lowercased (field_name)
_NAMES_MAX: Final = 1024  # past this many distinct spellings, names are lowercased uncached


def field_name(name: bytes) -> bytes:
    """``name`` lowercased (the form every rule here compares)."""
    low = _NAMES.get(name)
    if low is None:
        low = name.lower()
        if len(_NAMES) < _NAMES_MAX:  # bounded: a client cannot grow it by sending new names
            _NAMES[name] = low
    return low


def connection_tokens(value: bytes) -> frozenset[bytes]:
    """The field names a ``Connection`` value declares hop-by-hop (lowercased)."""
    return frozenset(t.strip().lower() for t in value.split(b","))


def without_fields(lines: list[bytes], names: frozenset[bytes]) -> list[bytes]:
    """Header lines (``name: value\\r\\n``, names lowercased) minus those whose name is in ``names``."""
    return [line for line in lines if line[:line.index(b":")] not in names]


def relayed_metadata(metadata: Iterable[tuple[str, object]] | None) -> bytes:
    """A gRPC worker's initial metadata as the response header lines an HTTP worker's would give."""
    out = []
    for key, value in metadata or ():
        if (isinstance(value, str) and key.startswith("x-") and key != "x-request-id"
                and not key.startswith("x-shardgate-") and value.isprintable()):
            out.append(b"%s: %s\r\n" % (key.encode("ascii"), value.encode("latin-1", "replace")))
    return b"".join(out)


def call_metadata(request: ClientRequest) -> tuple[tuple[str, str], ...]:
    """The gRPC metadata a worker call carries: the counterpart of the fields the router adds to
    an HTTP request (request id, trace context)."""
    metadata = [("x-request-id", request.request_id.decode())]
    if request.traceparent:  # always, for a request read from a client
        metadata.append(("traceparent", request.traceparent.decode()))
        if request.tracestate:
            metadata.append(("tracestate", request.tracestate.decode()))
    return tuple(metadata)
