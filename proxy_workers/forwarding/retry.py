"""The retry decision, for every path: what may be retried, where, and how often.

Role: one answer to "this attempt failed: try another worker, or give up?", used by the HTTP
exchange, the PD legs and pairs, and the gRPC legs.

Rules:
- Only while nothing has reached the client: once a response head is out, a failure truncates the
  response instead (callers check ``head_sent`` first).
- Where: never a worker this request already tried (:func:`proxy_workers.forwarding.attempts.pick_worker`).
- How often: at most ``max_tries`` attempts per request (PD: per side, and ``max_tries`` pairs).
- What, always: a refused or failed connection, a worker that closed before its response head,
  a gRPC call that failed with a transient status (:data:`RETRYABLE_GRPC`), a connect timeout.
  These cost the workers nothing, so no budget limits them. Not a time-to-first-byte timeout
  (the worker may still be generating).
- What, within a budget: a worker's *answer* whose status is in ``retry_statuses`` (408, 429 and
  5xx by default; a gRPC status counts as the HTTP status it maps to). Such a retry waits a
  jittered, doubling backoff (``retry_backoff`` .. ``retry_backoff_max``; a worker's
  ``Retry-After`` is waited out when it is not longer than ``retry_backoff_max``, else the answer
  is relayed), must fit in ``total_timeout``, and is allowed only while fewer than
  max(``retry_budget_min``, ``retry_budget`` x in-flight requests) of this proxy's requests are
  retrying answers (Envoy's retry budget: retries add at most that share of load). When a
  retry is not allowed the worker's own answer is relayed as it came (its Retry-After included).
- Any other 4xx is the worker's answer about the request itself: relayed, never retried.
- A stall: a streamed request whose worker sent no response head within ``stall_timeout``
  (engines send a stream's head at once) is a failed attempt, retried like a failed connection.
  Only streams: a non-streamed answer's head comes when generation ends, which may take long.
- Each retry is counted once (``retries`` on the proxy's row).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import TYPE_CHECKING

import msgspec

from proxy_workers.errors import BadGateway, RouterError

if TYPE_CHECKING:
    from proxy_workers.process_view import ProcessView
    from shm.settings import Settings

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


def parse_statuses(setting: str) -> frozenset[int]:
    """``retry_statuses`` as a set ("408, 429,500" -> {408, 429, 500}; "" -> none)."""
    return frozenset(int(part) for part in setting.split(",") if part.strip())


def retry_after(lines: Iterable[bytes]) -> float | None:
    """A worker's ``Retry-After`` in seconds, from its relayable header lines (delay-seconds form;
    an HTTP-date or garbage counts as absent)."""
    for line in lines:
        if line.startswith(b"retry-after:"):
            value = line[12:].strip()
            return float(value) if value.isdigit() else None
    return None


def backoff(settings: Settings, retries_done: int, rng: random.Random) -> float:
    """The wait before answer retry number ``retries_done + 1``: doubling, capped, +-20% jitter."""
    base = min(settings.retry_backoff * (2 ** retries_done), settings.retry_backoff_max)
    return base * rng.uniform(0.8, 1.2)


def answer_retry_delay(proc: ProcessView, attempts: int, retries_done: int, holds_budget: bool,
                       elapsed: float, worker_wait: float | None) -> float | None:
    """After a retryable worker answer (status already checked against ``retry_statuses``): the
    wait before trying another worker, or None when the answer must be relayed instead.

    ``attempts`` were made so far, ``retries_done`` of them answer retries; ``holds_budget`` says
    whether this request already counts in the proxy's retry budget; ``worker_wait`` is the
    answer's Retry-After, if any.
    """
    settings = proc.settings
    if attempts >= settings.max_tries:
        return None
    if not holds_budget and proc.retrying >= max(settings.retry_budget_min,
                                                 settings.retry_budget * len(proc.active)):
        return None
    delay = backoff(settings, retries_done, proc.rng)
    if worker_wait is not None:
        if worker_wait > settings.retry_backoff_max:
            return None  # the worker asked for a long wait: the client gets its answer and decides
        delay = max(delay, worker_wait)
    if elapsed + delay >= settings.total_timeout:
        return None
    return delay


class _StreamFlag(msgspec.Struct):
    stream: bool = False


_STREAM_FLAG = msgspec.json.Decoder(_StreamFlag)


def is_stream(body: bytes) -> bool:
    """Whether a request body asks for a stream (read only when a stall is suspected, not per request)."""
    try:
        return bool(body) and _STREAM_FLAG.decode(body).stream
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False


def stalled(settings: Settings, waited: float, body: bytes) -> bool:
    """An attempt that waited ``waited`` seconds for its response head has stalled (see the rules)."""
    return waited > settings.stall_timeout and is_stream(body)
