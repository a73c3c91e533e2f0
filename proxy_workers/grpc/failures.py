"""What a failed gRPC call means for its request: retry elsewhere, a timeout, or the worker's answer.

Role: the failure rules of :class:`proxy_workers.grpc.exchange.GrpcExchange`, kept apart from its
control flow. :func:`classify` reads a ``grpc.aio.AioRpcError`` raised by a leg's call and says
what to raise and how the leg's books close (:meth:`proxy_workers.grpc.legs.Leg.settle`).

Invariants:
- A transient status (:data:`proxy_workers.forwarding.retry.RETRYABLE_GRPC`), or any failure after
  the response head is out, is a :class:`Failed` the exchange settles itself (a failed worker;
  a connect failure counted as such); after the head it truncates the response, never retries.
- The call's deadline (the request's ``total_timeout``) is an ``UpstreamTimeout`` naming that
  setting, mid-stream too; the worker counts it as a failure.
- A worker's answer about the request whose status is in ``retry_statuses`` is a :class:`Failed`
  carrying that answer (relayed if no retry is allowed); a 5xx counts against the worker, a 429
  does not. Any other answer is relayed as is and the worker counts as having answered (ok).
- Only the failure path runs this: nothing here is paid per message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy_workers.errors import RouterError, UpstreamTimeout
from proxy_workers.forwarding.retry import RETRYABLE_GRPC
from proxy_workers.grpc.translate import worker_error

if TYPE_CHECKING:
    import grpc

# How the failed leg is settled before the classified exception is raised: (ok, count_error),
# or None when the exchange settles it itself (a Failed without an answer).
Settlement = tuple[bool, bool] | None


class Failed(Exception):
    """A worker failed; another may serve the request if nothing reached the client yet."""

    def __init__(self, why: str, connect: bool = False, answer: RouterError | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.connect = connect
        self.answer = answer  # a worker's retryable answer: relayed if no retry is allowed


def classify(exc: grpc.aio.AioRpcError, url: str, head_sent: bool, retry_statuses: frozenset[int],
             total_timeout: float) -> tuple[Exception, Settlement]:
    """The exception a failed call on worker ``url`` becomes, and how its leg is settled."""
    code, details = exc.code().name, exc.details() or ""
    if code == "DEADLINE_EXCEEDED":  # the call's total_timeout deadline
        # Mid-stream too: the SSE error event names total_timeout, as the HTTP path's does,
        # rather than a bare "DEADLINE_EXCEEDED" that names no setting (the exchange truncates).
        return UpstreamTimeout(f"request exceeded total_timeout={total_timeout}s ({details})"), (False, True)
    why = f"{url}: {code} {details}".strip()
    if head_sent or code in RETRYABLE_GRPC:
        return Failed(why, connect=code == "UNAVAILABLE" and "connect" in details.lower()), None
    answer = worker_error(code, details)
    if answer.status in retry_statuses:  # e.g. RESOURCE_EXHAUSTED (429)
        # A 5xx counts against the worker (passive health); a 429 says "not now".
        return Failed(why, answer=answer), (False, answer.status >= 500)
    return answer, (True, True)  # the worker answered; it was the request it refused
