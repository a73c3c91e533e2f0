"""Per-model request figures and histograms in the load board: their layout and bucket bounds.

Role: the one place that says where a request's figures go in shared memory, so the proxies that
write them (:mod:`proxy_workers.serving.records`) and the exposition that sums them at scrape time
(:mod:`proxy_workers.serving.metrics_board`) agree word for word.

Layout of one *model block* (``MODEL_FIELDS`` words; one block per proxy per model index, index 0
being ``model="other"``: unknown, absent, or past ``max_models``)::

    M_REQUESTS + (router * STATUS_CLASSES + status // 100) * OUTCOMES + outcome   request counters
    M_TOKENS_IN, M_TOKENS_OUT                                                      token counters
    M_WHOLE / M_DURATION_REST / M_TTFT_STREAM: len(LATENCY_BUCKETS) + 1 bucket counts, then
        the sum (a float word)
    M_TPOT: len(TPOT_BUCKETS) + 1 bucket counts, then the sum

Three latency histograms are written, two are exposed: a whole (non-streamed) answer's TTFT *is*
its duration, so it is observed once, in M_WHOLE, which both exposed histograms include
(``DURATION_WORDS``, ``TTFT_WORDS``): request duration = whole answers + the rest (streams,
requests never answered); TTFT = whole answers + streams' first chunks. That saves a non-streamed
request (most of them) a second bucket search and two shared-memory writes.

A histogram's words count observations per bucket, not cumulatively (one increment per
observation); the last bucket is ``+Inf``; ``_count`` is the sum of the buckets. Cumulating is the
reader's job, at scrape time.

Bucket bounds (seconds): LATENCY_BUCKETS span 5 ms (a cached short answer) to 5 minutes (a long
generation), roughly x2-x2.5 apart, as vLLM's and sglang-router's do, so a p99 of either TTFT or
the whole request falls in a bucket a few tens of percent wide. TPOT_BUCKETS span 1 ms to 1 s per
token (fast decoders emit ~5-50 ms/token), finer where engines actually sit.

Invariants: labels are bounded by construction: models by ``max_models`` (+ "other"), routers,
status classes and outcomes by the fixed tuples below. Single writer per block (its proxy).
"""

from __future__ import annotations

from typing import Final

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)

# Routers as labels; "none": refused before a router took the request.
ROUTERS = ("http_regular", "http_pd", "grpc_regular", "grpc_pd", "none")
ROUTER_INDEX = {name: i for i, name in enumerate(ROUTERS)}
R_NONE: Final = 4  # ROUTER_INDEX["none"] (Final: inlined by compiled code)
assert R_NONE == ROUTER_INDEX["none"]
# Status classes by status // 100; class 0 ("none"): nothing was answered (the client left first).
STATUS_CLASSES: Final = 6
STATUS_LABELS = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")
# How a request ended (docs/metrics.md): answered below 400; answered 400+ or cut short after
# routing; refused before any worker; client went away before the end.
OUTCOMES = ("success", "error", "rejected", "client_gone")
O_SUCCESS: Final = 0
O_ERROR: Final = 1
O_REJECTED: Final = 2
O_CLIENT_GONE: Final = 3

# Word offsets in a model block are Final literals: the compiled request path inlines them
# instead of looking them up at each use (docs/compiled-hot-path.md); the asserts below keep
# them equal to what they are derived from.
M_REQUESTS: Final = 0
M_TOKENS_IN: Final = 120  # M_REQUESTS + routers x status classes x outcomes
M_TOKENS_OUT: Final = 121
HIST_WORDS: Final = 17  # len(LATENCY_BUCKETS) + 2: buckets, +Inf, sum
M_WHOLE: Final = 122
M_DURATION_REST: Final = 139  # M_WHOLE + HIST_WORDS
M_TTFT_STREAM: Final = 156
M_TPOT: Final = 173
MODEL_FIELDS: Final = 188  # M_TPOT + len(TPOT_BUCKETS) + 2
# Each histogram's last word is its sum (a float word; the rest count).
WHOLE_SUM: Final = 138  # M_WHOLE + HIST_WORDS - 1
REST_SUM: Final = 155
TTFT_SUM: Final = 172
TPOT_SUM: Final = 187  # M_TPOT + len(TPOT_BUCKETS) + 1
assert M_TOKENS_IN == M_REQUESTS + len(ROUTERS) * STATUS_CLASSES * len(OUTCOMES)
assert M_TOKENS_OUT == M_TOKENS_IN + 1 and M_WHOLE == M_TOKENS_OUT + 1
assert HIST_WORDS == len(LATENCY_BUCKETS) + 2
assert (M_DURATION_REST, M_TTFT_STREAM, M_TPOT) == (M_WHOLE + HIST_WORDS, M_WHOLE + 2 * HIST_WORDS,
                                                    M_WHOLE + 3 * HIST_WORDS)
assert MODEL_FIELDS == M_TPOT + len(TPOT_BUCKETS) + 2 and TPOT_SUM == MODEL_FIELDS - 1
assert (WHOLE_SUM, REST_SUM, TTFT_SUM) == (M_DURATION_REST - 1, M_TTFT_STREAM - 1, M_TPOT - 1)
DURATION_WORDS = (M_WHOLE, M_DURATION_REST)  # the exposed request-duration histogram
TTFT_WORDS = (M_WHOLE, M_TTFT_STREAM)        # the exposed time-to-first-token histogram

OTHER_MODEL = "other"


def histogram(ints: memoryview[int], floats: memoryview[float], words: int | tuple[int, ...],
              bounds: tuple[float, ...], blocks: list[int]) -> tuple[list[int], float]:
    """Cumulative bucket counts (``+Inf`` last) and the sum of the histogram(s) at ``words`` of
    each block base in ``blocks``, summed over them (the reader side)."""
    n = len(bounds) + 1
    counts = [0] * n
    total = 0.0
    for base in blocks:
        for word in (words,) if isinstance(words, int) else words:
            at = base + word
            for i in range(n):
                counts[i] += ints[at + i]
            total += floats[at + n]
    running = 0
    for i in range(n):
        running += counts[i]
        counts[i] = running
    return counts, total
