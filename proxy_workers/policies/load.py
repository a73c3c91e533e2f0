"""Policies driven by measured figures: latency, the engines' own load, and per-minute quotas.

Role: ``least_latency`` (lowest moving average of time to the response head, which for streams is
the time to first token), ``least_loaded`` (the workers' own running + waiting requests, scraped by
the coordinator from vLLM/SGLang metrics), ``quota_aware`` (stay inside each worker's
requests-per-minute and tokens-per-minute budget; 429 when nobody can take the request).

Invariants:
- Every figure is global: EWMAs and quota windows are summed or averaged over all proxies' cells
  of the load board; engine figures are the coordinator's single copy.
- least_latency and least_loaded compare every candidate of lists up to ``scan.EXACT_LIMIT`` and
  the best of ``scan.SAMPLE`` random ones beyond (``proxy_workers.policies.scan``).
- Engine figures older than ``STALE_INTERVALS`` scrape intervals are ignored (least_loaded then
  falls back to the router's own in-flight counts and says so).
- Quota windows are per minute with a sliding estimate (``proxy_workers.policies.quota``): used =
  this minute + last minute times the share of it still inside a 60 s window; admission and a
  refusal's ``Retry-After`` both follow it. Usage is counted when a worker is picked, from an
  estimate of the request's tokens (prompt bytes / 4 + max_tokens).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from proxy_workers.errors import QuotaExceeded
from proxy_workers.policies.base import Policy, PolicyEnv
from proxy_workers.policies.native import C_QUOTA_COUNTS
from proxy_workers.policies.quota import retry_after, seconds_until_within, used, window_at
from proxy_workers.routing.context import RequestContext
from shm.loadboard import (
    E_SCRAPED_AT,
    W_Q_MINUTE,
    W_Q_PREV_REQUESTS,
    W_Q_PREV_TOKENS,
    W_Q_REQUESTS,
    W_Q_TOKENS,
    WORKER_FIELDS,
)
from shm.schema import Worker

if TYPE_CHECKING:
    from proxy_workers.policies.base import RouteView

STALE_INTERVALS = 3
# _boardscan.quota_counts reads a cell's quota words as minute, then the four counts after it.
assert (W_Q_REQUESTS, W_Q_TOKENS, W_Q_PREV_REQUESTS, W_Q_PREV_TOKENS) == \
    tuple(W_Q_MINUTE + k for k in range(1, 5)), "the quota words must be adjacent, in this order"


class LeastLatency(Policy):
    name = "least_latency"

    def pick(self, route: RouteView, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        # A worker nobody has measured yet scores 0: it gets tried, and so measured.
        cols = self.columns(route, candidates)
        best, ttfb = cols.argmin(cols.ttfb, self.rng)
        ctx.note("lowest time to first byte (EWMA)", ttfb_seconds=round(ttfb, 6))
        return candidates[best]


class LeastLoaded(Policy):
    name = "least_loaded"

    def pick(self, route: RouteView, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        env = self.env
        # One scrape round covers every worker, so one worker's timestamp tells if it is stale.
        board = env.board
        scraped = board.floats[board.engine_word(candidates[0].slot) + E_SCRAPED_AT]
        if scraped < time.time() - STALE_INTERVALS * env.settings.metrics_interval:
            ctx.note("no fresh engine metrics: least in-flight", fallback=True)
            return self.least_loaded(route, candidates)
        cols = self.columns(route, candidates)
        best, score = cols.argmin(cols.queue, self.rng)
        ctx.note("fewest running + waiting requests (engine metrics)",
                 queue=round(score * candidates[best].weight))
        return candidates[best]


class QuotaAware(Policy):
    """Most budget left among two random workers; a full scan only when both are near their limit.

    Two random choices keep a pick O(1) at any fleet size (a full scan reads six board words per
    worker and proxy) while still steering away from workers close to their quota. Admission and
    the refusal's ``Retry-After`` both evaluate :func:`proxy_workers.policies.quota.used`.
    """

    name = "quota_aware"

    def __init__(self, env: PolicyEnv, rng: random.Random | None = None) -> None:
        super().__init__(env, rng)
        board = env.board  # a PolicyEnv keeps its board for life
        self._ints, self._stride, self._cell0 = board.ints, board.worker_stride(), board.cell_word(0, 0)

    def pick(self, route: RouteView, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        env = self.env
        minute, into, weight = window_at(time.time())
        tokens = ctx.estimated_tokens()
        headroom = env.settings.quota_headroom
        n = len(candidates)
        sample = candidates
        if n > 2:
            i = int(self.rng.random() * n)
            sample = [candidates[i], candidates[(i + 1 + int(self.rng.random() * (n - 1))) % n]]
        best, best_ratio = self._best(sample, minute, weight, tokens, headroom)
        if best is None and sample is not candidates:
            best, best_ratio = self._best(candidates, minute, weight, tokens, headroom)
        if best is None:
            wait = self._wait(candidates, minute, into, tokens, headroom)
            raise QuotaExceeded(f"every worker for model '{route.model}' is at its per-minute quota",
                                retry_after=retry_after(wait))
        if not ctx.dry_run:
            self._count(best.slot, minute, tokens)
        ctx.note("most quota left", quota_used=round(best_ratio, 3))
        return best

    def _best(self, workers: Sequence[Worker], minute: int, weight: float, tokens: int,
              headroom: float) -> tuple[Worker | None, float]:
        """The worker with the most budget left after this request (equal budgets: fewer in
        flight, read only then), among those within ``headroom``."""
        in_flight = self.env.load.in_flight
        best: Worker | None = None
        best_ratio, best_load = math.inf, -1
        for w in workers:
            ratio = self._ratio(w, minute, weight, tokens)
            if ratio > headroom or ratio > best_ratio:
                continue
            if ratio == best_ratio and best is not None:
                if best_load < 0:
                    best_load = in_flight(best.slot)
                load = in_flight(w.slot)
                if load < best_load:
                    best, best_load = w, load
            else:
                best, best_ratio, best_load = w, ratio, -1
        return best, best_ratio

    def _ratio(self, w: Worker, minute: int, weight: float, tokens: int) -> float:
        """Share of the worker's budget used once this request is counted (0: unlimited)."""
        rpm, tpm = w.quota_rpm, w.quota_tpm
        if not rpm and not tpm:
            return 0.0
        req, prev_req, tok, prev_tok = self._counts(w.slot, minute)
        r = (used(req, prev_req, weight) + 1) / rpm if rpm else 0.0
        t = (used(tok, prev_tok, weight) + tokens) / tpm if tpm else 0.0
        return r if r > t else t

    def _wait(self, workers: Sequence[Worker], minute: int, into: float, tokens: int,
              headroom: float) -> float | None:
        """Seconds until the first of ``workers`` would be admitted (None: never), by inverting
        the estimate ``_ratio`` uses: a ratio <= headroom is usage <= headroom x budget - need."""
        soonest: float | None = None
        for w in workers:
            req, prev_req, tok, prev_tok = self._counts(w.slot, minute)
            by_requests = seconds_until_within(req, prev_req, into, headroom * w.quota_rpm - 1) \
                if w.quota_rpm else 0.0
            by_tokens = seconds_until_within(tok, prev_tok, into, headroom * w.quota_tpm - tokens) \
                if w.quota_tpm else 0.0
            if by_requests is None or by_tokens is None:
                continue  # this request never fits this worker's budget
            wait = max(by_requests, by_tokens)
            if soonest is None or wait < soonest:
                soonest = wait
        return soonest

    def _counts(self, slot: int, minute: int) -> tuple[int, int, int, int]:
        """(requests, previous minute's requests, tokens, previous minute's tokens) over all
        proxies' cells, as of ``minute`` (a cell last written a minute ago holds only the
        previous minute; older cells hold nothing that still counts)."""
        ints, stride = self._ints, self._stride
        cell = self._cell0 + slot * WORKER_FIELDS
        if C_QUOTA_COUNTS is not None:
            return C_QUOTA_COUNTS(ints.obj, cell + W_Q_MINUTE, stride, self.env.proxies, minute)
        req = prev_req = tok = prev_tok = 0
        for _ in range(self.env.proxies):
            at = ints[cell + W_Q_MINUTE]
            if at == minute:
                req += ints[cell + W_Q_REQUESTS]
                tok += ints[cell + W_Q_TOKENS]
                prev_req += ints[cell + W_Q_PREV_REQUESTS]
                prev_tok += ints[cell + W_Q_PREV_TOKENS]
            elif at == minute - 1:
                prev_req += ints[cell + W_Q_REQUESTS]
                prev_tok += ints[cell + W_Q_TOKENS]
            cell += stride
        return req, prev_req, tok, prev_tok

    def _count(self, slot: int, minute: int, tokens: int) -> None:
        board = self.env.board
        ints, cell = board.ints, board.cell_word(self.env.proxy, slot)
        at = ints[cell + W_Q_MINUTE]
        if at != minute:
            last = at == minute - 1
            ints[cell + W_Q_PREV_REQUESTS] = ints[cell + W_Q_REQUESTS] if last else 0
            ints[cell + W_Q_PREV_TOKENS] = ints[cell + W_Q_TOKENS] if last else 0
            ints[cell + W_Q_REQUESTS] = 0
            ints[cell + W_Q_TOKENS] = 0
            ints[cell + W_Q_MINUTE] = minute
        ints[cell + W_Q_REQUESTS] += 1
        ints[cell + W_Q_TOKENS] += tokens
