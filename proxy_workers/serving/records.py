"""The end of a request: the one place that turns it into a :class:`RequestRecord`.

Role: :func:`end_request` is called exactly once per request the router counts, by the client
connection (:mod:`proxy_workers.serving.protocol`): when its exchange ends (answered, failed or
cut short), when it is refused before any worker, or when its client goes away. It builds the
record and hands it to what consumes it: the per-model figures of /metrics (written here, on the
load board), the access log (when on) and the tracer (when on).

Invariants:
- One record per request; the figures come from the exchange's ``figures()`` (status, first
  chunk time, tokens, worker, retries, model, policy), never from the request's body.
- Metrics cost a few word increments on this proxy's own model block (single writer); buckets
  are found by a scan of a small tuple (``forwarding.attempts.bucket``). Nothing here
  allocates but the exchange's ``figures()`` tuple and, when the access log or the tracer is
  on, the record.
- Bounded labels: a model without an index in the snapshot (unknown, absent, or past
  ``max_models``) is written to block 0, ``model="other"``.
- TTFT: a stream's is the time to its first chunk to the client; a whole (non-streamed) answer's
  is the time to its last byte, i.e. its duration. Time per output token is observed once per
  stream that produced two tokens or more: (end - first chunk) / (output tokens - 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from proxy_workers.forwarding.attempts import bucket
from shm.histograms import (
    LATENCY_BUCKETS,
    M_DURATION_REST,
    M_TOKENS_IN,
    M_TOKENS_OUT,
    M_TPOT,
    M_TTFT_STREAM,
    M_WHOLE,
    O_CLIENT_GONE,
    O_ERROR,
    O_REJECTED,
    O_SUCCESS,
    OUTCOMES,
    R_NONE,
    REST_SUM,
    ROUTER_INDEX,
    ROUTERS,
    STATUS_CLASSES,
    TPOT_BUCKETS,
    TPOT_SUM,
    TTFT_SUM,
    WHOLE_SUM,
)

if TYPE_CHECKING:
    from proxy_workers.contract import ClientExchange, ClientRequest
    from proxy_workers.process_view import ProcessView

_N_OUT: Final = 4  # len(OUTCOMES)
assert len(OUTCOMES) == _N_OUT


class RequestRecord:
    """One ended request, as metrics, the access log and the tracer see it.

    ``status`` 0: nothing was answered (the client left first). ``ttft`` in seconds (-1.0: none,
    no answer started). ``worker`` the URL of the worker that answered last ("" if none).
    """

    __slots__ = ("duration", "model", "outcome", "policy", "request", "retries", "router", "sent", "status",
                 "tokens_in", "tokens_out", "ttft", "worker")

    def __init__(self, request: ClientRequest, router: int, model: str, policy: str, worker: str, status: int,
                 outcome: int, duration: float, ttft: float, tokens_in: int, tokens_out: int, retries: int,
                 sent: int) -> None:
        self.request = request
        self.router = router
        self.model = model
        self.policy = policy
        self.worker = worker
        self.status = status
        self.outcome = outcome
        self.duration = duration
        self.ttft = ttft
        self.tokens_in = tokens_in
        self.tokens_out = tokens_out
        self.retries = retries
        self.sent = sent

    @property
    def router_name(self) -> str:
        return ROUTERS[self.router]

    @property
    def outcome_name(self) -> str:
        return OUTCOMES[self.outcome]


def end_request(proc: ProcessView, request: ClientRequest, exchange: ClientExchange | None, outcome: int,
                status: int, started: float, sent: int) -> RequestRecord | None:
    """Record one ended request; ``exchange`` None for a refusal (``outcome`` O_REJECTED).

    ``status`` is the status the router answered itself (a refusal, an error after routing), 0 if
    none; a status relayed from a worker comes from the exchange. ``started`` is the loop time
    the request was dispatched; ``sent`` the bytes written to the client for it. Returns the
    record, or None when nothing consumes records (access log and tracer off).
    """
    now = proc.loop.time()
    duration = now - started
    if exchange is None:
        router, model, policy, worker, first_at, tokens_in, tokens_out, retries = \
            R_NONE, request.model or "", "", "", 0.0, 0, 0, 0
    else:
        relayed, first_at, tokens_in, tokens_out, worker, retries, model, policy = exchange.figures()
        router = ROUTER_INDEX[exchange.ctx.router]
        if relayed and not status:
            status = relayed
        if outcome == O_SUCCESS and status >= 400:
            outcome = O_ERROR
    whole = not first_at and status and outcome != O_CLIENT_GONE
    if first_at:
        ttft = first_at - started
    elif whole:
        ttft = duration  # a whole answer: its first token reached the client with its last byte
    else:
        ttft = -1.0
    # -- metrics: this proxy's block of the model (block 0: "other") ----------------------------
    base = proc.model_blocks.get(model, proc.other_block)
    ints = proc.ints
    klass = status // 100 if status < 600 else 0
    ints[base + (router * STATUS_CLASSES + klass) * _N_OUT + outcome] += 1
    if outcome != O_REJECTED:
        floats = proc.floats
        if whole:  # one observation serves the duration and the TTFT histograms (shm.histograms)
            ints[base + M_WHOLE + bucket(LATENCY_BUCKETS, duration)] += 1
            floats[base + WHOLE_SUM] += duration
        else:
            ints[base + M_DURATION_REST + bucket(LATENCY_BUCKETS, duration)] += 1
            floats[base + REST_SUM] += duration
            if ttft >= 0.0:
                ints[base + M_TTFT_STREAM + bucket(LATENCY_BUCKETS, ttft)] += 1
                floats[base + TTFT_SUM] += ttft
        if tokens_in:
            ints[base + M_TOKENS_IN] += tokens_in
        if tokens_out:
            ints[base + M_TOKENS_OUT] += tokens_out
            if first_at and tokens_out > 1:
                tpot = (now - first_at) / (tokens_out - 1)
                ints[base + M_TPOT + bucket(TPOT_BUCKETS, tpot)] += 1
                floats[base + TPOT_SUM] += tpot
    # -- the record's consumers: the access log and the tracer (both off: None) -----------------------
    # The record is made only when one of them is on: with both off (the default) a request pays
    # two attribute checks, not an object.
    access, tracer = proc.access_log, proc.tracer
    if access is None and tracer is None:
        return None
    record = RequestRecord(request, router, model, policy, worker, status, outcome, duration, ttft,
                           tokens_in, tokens_out, retries, sent)
    if access is not None:
        access.write(record)
    if tracer is not None:  # the request's span (proxy_workers.serving.tracing), exported off the loop
        tracer.end(request, model=model, router=ROUTERS[router], policy=policy, worker=worker, status=status,
                   retries=retries, started=started, ended=now)
    return record
