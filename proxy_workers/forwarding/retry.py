"""The retry decision, for every path: what may be retried, where, and how often.

Role: one answer to "this attempt failed: try another worker, or give up?", used by the HTTP
exchange, the PD legs and pairs, and the gRPC legs.

Rules:
- Only while nothing has reached the client: once a response head is out, a failure truncates the
  response instead (callers check ``head_sent`` first).
- Where: never a worker this request already tried (:func:`proxy_workers.forwarding.attempts.pick_worker`).
- How often: at most ``max_tries`` attempts per request (PD: per side, and ``max_tries`` pairs).
- What: a refused or failed connection, a worker that closed before its response head, a gRPC
  call that failed with a transient status (:data:`RETRYABLE_GRPC`), a connect timeout. Not a
  time-to-first-byte timeout (the worker may still be generating), and not a worker's answer
  about the request itself: a 4xx other than :data:`RETRYABLE_STATUS` is the client's answer.
- Each retry is counted once (``retries`` on the proxy's row).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy_workers.errors import BadGateway, RouterError

if TYPE_CHECKING:
    from proxy_workers.contract import ProcessView

# Answers that say "not now" rather than "this request is wrong": another worker may take them.
RETRYABLE_STATUS = frozenset({408, 429})
# gRPC statuses that describe the worker or the transport, not the request.
RETRYABLE_GRPC = frozenset({"UNAVAILABLE", "UNKNOWN", "INTERNAL", "ABORTED", "DATA_LOSS", "CANCELLED"})


def refused_by_worker(status: int) -> bool:
    """A worker's answer that says the request itself is wrong: relayed, never retried."""
    return 400 <= status < 500 and status not in RETRYABLE_STATUS


def retry_or_give_up(proc: ProcessView, attempts: int, why: str, unit: str = "worker") -> RouterError | None:
    """After a failed attempt (``attempts`` made so far): None when another may be made (the retry
    is counted), else the 502 that ends the request."""
    if attempts < proc.settings.max_tries:
        proc.count_retry()
        return None
    return BadGateway(f"{why} (tried {attempts} {unit}(s))")
