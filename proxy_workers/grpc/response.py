"""The HTTP response of a gRPC-served request: its head, and the event that ends a cut stream.

Role: the bytes :class:`proxy_workers.grpc.exchange.GrpcExchange` writes to its client around the
translated answer, shaped as the HTTP routers' responses are. The exchange frames the body itself
(chunked for HTTP/1.1, one call per message), so nothing here runs per message.

Invariants:
- A whole answer (a length) gets ``content-length``; a stream (no length) is SSE: ``cache-control:
  no-cache``, chunked for an HTTP/1.1 client, close-delimited for an HTTP/1.0 one.
- A response that must close its connection (the client's wish, an HTTP/1.0 stream, a draining
  proxy) says ``connection: close`` and clears ``request.keep_alive``, which the client
  connection reads once the exchange ends.
- The head always ends with ``x-request-id``; ``x-shardgate-decision`` only when given (explain).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy_workers.errors import BadGateway, error_body

if TYPE_CHECKING:
    from proxy_workers.contract import ClientRequest


def response_head(req: ClientRequest, worker_headers: bytes, content_type: bytes, length: int | None,
                  draining: bool, decision: bytes | None) -> bytes:
    """A 200 head: ``worker_headers`` (relayed metadata), then the framing and connection fields;
    ``decision`` is the ``x-shardgate-decision`` value, if any."""
    out = [b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\n" % content_type, worker_headers]
    if length is not None:
        out.append(b"content-length: %d\r\n" % length)
    else:
        out.append(b"cache-control: no-cache\r\n")
        if req.http11:
            out.append(b"transfer-encoding: chunked\r\n")
        else:
            req.keep_alive = False  # close-delimited for an HTTP/1.0 client
    if not req.keep_alive or draining:
        req.keep_alive = False
        out.append(b"connection: close\r\n")
    if decision is not None:
        out.append(b"x-shardgate-decision: %s\r\n" % decision)
    out.append(b"x-request-id: %s\r\n\r\n" % req.request_id)
    return b"".join(out)


def interrupted_event(why: str) -> bytes:
    """The SSE event that tells a streaming client why its answer stops short."""
    return b"event: error\ndata: %s\n\n" % error_body(BadGateway(f"stream interrupted: {why}"))
