"""The load board: per-proxy, per-worker counters in shared memory.

Role: lets every proxy see the load all proxies put on each worker, so "least connections" means
least across the whole router, and lets any proxy answer /stats, /workers and /metrics with totals.

Layout (8-byte words after a 64-byte header; the same bytes are viewed as int64 and as float64)::

    header: magic, layout version, max_proxies, max_workers, PROXY_FIELDS, WORKER_FIELDS
    proxy rows:   max_proxies x PROXY_FIELDS words      (row p written only by proxy p; the
                  last MAX_REFUSAL_REASONS words count refusals by reason)
    worker cells: max_proxies x max_workers x WORKER_FIELDS words
                  (cell [p][w] written only by proxy p; w is the worker's stable slot)
    engine rows:  max_workers x ENGINE_FIELDS words     (written only by the coordinator: the
                  workers' own load figures scraped from their /metrics)
    decisions:    max_proxies x MAX_POLICIES x 2 words  (decisions, fallbacks; row p by proxy p)
    model blocks: max_proxies x (max_models + 1) x MODEL_FIELDS words (block [p][m] written only
                  by proxy p; m is the model's index in the snapshot, 0 = "other"; the layout
                  of a block: shm.histograms)

Invariants:
- Single writer per row: proxy p writes only row p and cells [p][*], so plain stores suffice
  (no locks, no atomics); readers sum across p and may see a value one update old.
- Counters are monotonic except IN_FLIGHT and QUEUED (gauges) and the EWMAs. A proxy that restarts in the
  same row zeroes its gauges first (its predecessor's in-flight requests died with it) and keeps
  the monotonic counters, so totals never go backwards.
"""

from __future__ import annotations

import struct
from typing import Final

from shm.histograms import LATENCY_BUCKETS, MODEL_FIELDS
from shm.segment import Segment

MAGIC = int.from_bytes(b"SGLOAD01", "little")
# 2: proxy rows grew to 24 words (admission control's queue gauge and counters).
# 4: proxy rows grew to 56 words (requests refused before routing, by reason).
# 5: per-model blocks (requests by router/status/outcome, tokens, histograms), worker cells grew
#    to 33 words (5xx answers, a TTFB histogram), retries by reason, max_models in the header.
# 6: a whole answer (no stream) is recorded once, in M_WHOLE, serving both the duration and the
#    TTFT histograms.
LAYOUT_VERSION = 6
HEADER_WORDS = 8

# Word offsets are Final literals: the compiled request path inlines them instead of looking them
# up at each use (docs/compiled-hot-path.md).

# Proxy row fields.
P_PID: Final = 0
P_STARTED: Final = 1
P_HEARTBEAT: Final = 2
P_REQUESTS: Final = 3
P_ERRORS: Final = 4
P_IN_FLIGHT: Final = 5
P_DISCONNECTS: Final = 6
P_RETRIES: Final = 7
P_GENERATION: Final = 8
P_TORN_READS: Final = 9
P_RESTARTS: Final = 10
P_REJECTED: Final = 11
# Admission control (proxy_workers.serving.admission): queue depth (a gauge), requests admitted,
# requests that waited and their total wait (seconds, float), refusals by reason, and requests
# whose client left while queued.
P_QUEUED: Final = 12
P_ADMITTED: Final = 13
P_QUEUE_WAITS: Final = 14
P_QUEUE_WAIT_SECONDS: Final = 15
P_REJ_QUEUE_FULL: Final = 16
P_REJ_QUEUE_TIMEOUT: Final = 17
P_REJ_RATE_LIMITED: Final = 18
P_REJ_SHUTDOWN: Final = 19
P_QUEUE_ABANDONED: Final = 20
# Retries by reason: P_RETRIES counts them all; this word those caused by a worker's answer (a
# retryable status); the rest followed a failure (connect error, broken connection, stall).
P_RETRIES_STATUS: Final = 21
# Requests refused before a worker (P_REJECTED), by reason: word P_REFUSED + i counts
# REFUSAL_REASONS[i]. The names are the bounded label set of /metrics and /stats (errors carry
# one; proxy_workers.serving.refusals counts them); a refusal of another reason is counted in
# P_REJECTED only, and shown as "other" (the total minus the named ones).
REFUSAL_REASONS = (
    "bad_http", "uri_too_long", "headers_too_large", "too_many_fields", "body_too_large",
    "bad_host", "bad_path", "upgrade", "bad_json", "json_too_deep", "invalid_request",
    "request_timeout", "method_not_allowed", "not_found", "model_not_found", "no_healthy_worker",
    "workers_saturated", "quota_exceeded", "rate_limit_exceeded", "queue_full", "queue_timeout",
    "shutting_down", "overloaded", "invalid_api_key", "internal_error",
)
P_REFUSED: Final = 24
MAX_REFUSAL_REASONS = 32
REFUSAL_INDEX = {name: i for i, name in enumerate(REFUSAL_REASONS)}
PROXY_FIELDS = P_REFUSED + MAX_REFUSAL_REASONS
PROXY_FLOAT_FIELDS = frozenset({P_STARTED, P_HEARTBEAT, P_QUEUE_WAIT_SECONDS})
PROXY_FIELD_NAMES = {
    P_PID: "pid", P_STARTED: "started_at", P_HEARTBEAT: "heartbeat", P_REQUESTS: "requests",
    P_ERRORS: "errors", P_IN_FLIGHT: "in_flight", P_DISCONNECTS: "client_disconnects",
    P_RETRIES: "retries", P_GENERATION: "snapshot_generation", P_TORN_READS: "torn_reads",
    P_RESTARTS: "restarts", P_REJECTED: "rejected", P_QUEUED: "queued", P_ADMITTED: "admitted",
    P_QUEUE_WAITS: "queue_waits", P_QUEUE_WAIT_SECONDS: "queue_wait_seconds",
    P_REJ_QUEUE_FULL: "rejected_queue_full", P_REJ_QUEUE_TIMEOUT: "rejected_queue_timeout",
    P_REJ_RATE_LIMITED: "rejected_rate_limited", P_REJ_SHUTDOWN: "rejected_shutdown",
    P_QUEUE_ABANDONED: "queue_abandoned", P_RETRIES_STATUS: "retries_status",
    **{P_REFUSED + i: f"refused_{name}" for i, name in enumerate(REFUSAL_REASONS)},
}
assert len(REFUSAL_REASONS) <= MAX_REFUSAL_REASONS

# Worker cell fields.
W_IN_FLIGHT: Final = 0
W_REQUESTS: Final = 1
W_ERRORS: Final = 2
W_LATENCY_EWMA: Final = 3
W_TTFB_EWMA: Final = 4
W_LAST_ERROR: Final = 5
W_CONNECT_ERRORS: Final = 6
W_STREAMS: Final = 7
# quota_aware: a per-minute window (minute number, requests and tokens in it, and in the one before)
W_Q_MINUTE: Final = 8
W_Q_REQUESTS: Final = 9
W_Q_TOKENS: Final = 10
W_Q_PREV_REQUESTS: Final = 11
W_Q_PREV_TOKENS: Final = 12
# Passive health: consecutive failed attempts on this worker by this proxy (0 after a success).
W_FAILS_IN_ROW: Final = 13
# Attempts whose response head (or first gRPC message) arrived: the worker is answering. Passive
# health tells a stalled worker (attempts end only by being abandoned) from a slow one by it.
W_ANSWERS: Final = 14
# Attempts the worker answered with a 5xx (errors by kind: connect, status, the rest "other").
W_ERR_STATUS: Final = 15
# Time to the worker's first byte (response head, first gRPC message), a histogram over
# shm.histograms.LATENCY_BUCKETS: non-cumulative bucket counts (+Inf last), then the sum.
W_TTFB_HIST: Final = 16
# Literal (Final, see above), checked against the buckets just below.
W_TTFB_SUM: Final = 32  # W_TTFB_HIST + len(LATENCY_BUCKETS) + 1
WORKER_FIELDS: Final = W_TTFB_SUM + 1
assert W_TTFB_SUM == W_TTFB_HIST + len(LATENCY_BUCKETS) + 1
WORKER_FLOAT_FIELDS = frozenset({W_LATENCY_EWMA, W_TTFB_EWMA, W_LAST_ERROR, W_TTFB_SUM})

# Engine rows: what the worker itself reports (vLLM / SGLang metrics), scraped by the coordinator.
E_RUNNING: Final = 0
E_WAITING: Final = 1
E_KV_USAGE: Final = 2
E_SCRAPED_AT: Final = 3
ENGINE_FIELDS: Final = 4
ENGINE_FLOAT_FIELDS = frozenset({E_KV_USAGE, E_SCRAPED_AT})

MAX_POLICIES = 32

EWMA_ALPHA: Final = 0.2


def board_size(max_proxies: int, max_workers: int, max_models: int = 64) -> int:
    words = (HEADER_WORDS + max_proxies * PROXY_FIELDS + max_proxies * max_workers * WORKER_FIELDS
             + max_workers * ENGINE_FIELDS + max_proxies * MAX_POLICIES * 2
             + max_proxies * (max_models + 1) * MODEL_FIELDS)
    return words * 8


class LoadBoard:
    """Views over the board. ``ints`` and ``floats`` alias the same words."""

    __slots__ = ("_seg", "cell_base", "decision_base", "engine_base", "floats", "ints", "max_models",
                 "max_proxies", "max_workers", "model_base")

    def __init__(self, segment: Segment) -> None:
        self._seg = segment
        self.ints = segment.buf.cast("q")
        self.floats = segment.buf.cast("d")
        if self.ints[0] != MAGIC or self.ints[1] != LAYOUT_VERSION:
            raise ValueError(f"{segment.name} is not a shardgate load board of this version")
        self.max_proxies = self.ints[2]
        self.max_workers = self.ints[3]
        self.cell_base = HEADER_WORDS + self.max_proxies * PROXY_FIELDS
        self.engine_base = self.cell_base + self.max_proxies * self.max_workers * WORKER_FIELDS
        self.decision_base = self.engine_base + self.max_workers * ENGINE_FIELDS
        self.max_models = self.ints[6]
        self.model_base = self.decision_base + self.max_proxies * MAX_POLICIES * 2

    @classmethod
    def create(cls, segment: Segment, max_proxies: int, max_workers: int, max_models: int = 64) -> LoadBoard:
        struct.pack_into("<7q", segment.buf, 0, MAGIC, LAYOUT_VERSION, max_proxies, max_workers,
                         PROXY_FIELDS, WORKER_FIELDS, max_models)
        return cls(segment)

    def model_word(self, proxy: int, model: int, field: int = 0) -> int:
        """Index of field ``field`` of model block [proxy][model] (model 0: "other")."""
        return self.model_base + (proxy * (self.max_models + 1) + model) * MODEL_FIELDS + field

    def reset_model(self, proxy: int, model: int) -> None:
        """Zero a model block when its index now belongs to another model (by its own proxy)."""
        base = self.model_word(proxy, model)
        self.ints[base:base + MODEL_FIELDS] = _zeros(MODEL_FIELDS)

    def proxy_word(self, proxy: int, field: int) -> int:
        return HEADER_WORDS + proxy * PROXY_FIELDS + field

    def cell_word(self, proxy: int, slot: int, field: int = 0) -> int:
        """Index of field ``field`` of cell [proxy][slot] in ``ints``/``floats``."""
        return self.cell_base + (proxy * self.max_workers + slot) * WORKER_FIELDS + field

    def engine_word(self, slot: int, field: int = 0) -> int:
        return self.engine_base + slot * ENGINE_FIELDS + field

    def decision_word(self, proxy: int, policy: int, fallback: bool = False) -> int:
        return self.decision_base + (proxy * MAX_POLICIES + policy) * 2 + (1 if fallback else 0)

    def decisions(self, policy: int, proxies: int) -> tuple[int, int]:
        """(decisions, fallbacks) of policy number ``policy``, summed over proxies."""
        ints = self.ints
        made = sum(ints[self.decision_word(p, policy)] for p in range(proxies))
        fell = sum(ints[self.decision_word(p, policy, True)] for p in range(proxies))
        return made, fell

    def engine(self, slot: int) -> dict[str, float]:
        base = self.engine_word(slot)
        return {"engine_running": self.ints[base + E_RUNNING],
                "engine_waiting": self.ints[base + E_WAITING],
                "engine_kv_usage": self.floats[base + E_KV_USAGE],
                "engine_scraped_at": self.floats[base + E_SCRAPED_AT]}

    def worker_stride(self) -> int:
        """Distance in words between cell [p][w] and cell [p+1][w]."""
        return self.max_workers * WORKER_FIELDS

    # -- writer side (one proxy) ---------------------------------------------------------

    def reset_gauges(self, proxy: int) -> None:
        """Zero the in-flight gauges of a proxy row (its previous owner's requests are gone)."""
        self.ints[self.proxy_word(proxy, P_IN_FLIGHT)] = 0
        self.ints[self.proxy_word(proxy, P_QUEUED)] = 0
        ints, stride = self.ints, WORKER_FIELDS
        start = self.cell_word(proxy, 0, W_IN_FLIGHT)
        for word in range(start, start + self.max_workers * stride, stride):
            if ints[word]:
                ints[word] = 0

    def reset_cell(self, proxy: int, slot: int) -> None:
        """Zero a cell's counters when its slot now belongs to another worker.

        In-flight is left alone: requests to the previous worker still settle against it, and
        the gauge returns to its true value as they do.
        """
        base = self.cell_word(proxy, slot)
        for field in range(WORKER_FIELDS):
            if field != W_IN_FLIGHT:
                self.ints[base + field] = 0

    # -- reader side (anyone) ------------------------------------------------------------

    def worker_in_flight(self, slot: int, proxies: int) -> int:
        """In-flight requests on a worker, summed over the first ``proxies`` rows."""
        ints, word, stride = self.ints, self.cell_word(0, slot, W_IN_FLIGHT), self.worker_stride()
        return sum(ints[word + p * stride] for p in range(proxies))

    def worker_totals(self, slot: int, proxies: int) -> dict[str, float]:
        """All counters of one worker summed over proxies; EWMAs averaged over proxies with data."""
        ints, floats = self.ints, self.floats
        # Counters stay ints (JSON shows 3, not 3.0); the EWMAs added below are floats.
        out: dict[str, float] = {"in_flight": 0, "requests": 0, "errors": 0, "connect_errors": 0,
                                 "streams": 0}
        lat: list[float] = []
        ttfb: list[float] = []
        last_error = 0.0
        for p in range(proxies):
            base = self.cell_word(p, slot)
            out["in_flight"] += ints[base + W_IN_FLIGHT]
            out["requests"] += ints[base + W_REQUESTS]
            out["errors"] += ints[base + W_ERRORS]
            out["connect_errors"] += ints[base + W_CONNECT_ERRORS]
            out["streams"] += ints[base + W_STREAMS]
            if ints[base + W_REQUESTS]:
                lat.append(floats[base + W_LATENCY_EWMA])
                ttfb.append(floats[base + W_TTFB_EWMA])
            last_error = max(last_error, floats[base + W_LAST_ERROR])
        out["latency_ewma_seconds"] = sum(lat) / len(lat) if lat else 0.0
        out["ttfb_ewma_seconds"] = sum(ttfb) / len(ttfb) if ttfb else 0.0
        out["last_error_at"] = last_error
        return out

    def proxy_row(self, proxy: int) -> dict[str, float]:
        row: dict[str, float] = {}
        for field, name in PROXY_FIELD_NAMES.items():
            word = self.proxy_word(proxy, field)
            row[name] = self.floats[word] if field in PROXY_FLOAT_FIELDS else self.ints[word]
        return row

    def cell_figure(self, slot: int, proxies: int, field: int) -> int:
        """One int field of a worker's cells summed over the first ``proxies`` rows."""
        ints, word, stride = self.ints, self.cell_word(0, slot, field), self.worker_stride()
        return sum(ints[word + p * stride] for p in range(proxies))

    def close(self) -> None:
        self.ints.release()
        self.floats.release()


def _zeros(n: int) -> memoryview:
    return memoryview(bytearray(n * 8)).cast("q")
