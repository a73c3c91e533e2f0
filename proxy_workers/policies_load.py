"""Policies driven by measured figures: latency, the engines' own load, and per-minute quotas.

Role: ``least_latency`` (lowest moving average of time to the response head, which for streams is
the time to first token), ``least_loaded`` (the workers' own running + waiting requests, scraped by
the coordinator from vLLM/SGLang metrics), ``quota_aware`` (stay inside each worker's
requests-per-minute and tokens-per-minute budget; 429 when nobody can take the request).

Invariants:
- Every figure is global: EWMAs and quota windows are summed or averaged over all proxies' cells
  of the load board; engine figures are the coordinator's single copy.
- Engine figures older than ``STALE_INTERVALS`` scrape intervals are ignored (least_loaded then
  falls back to the router's own in-flight counts and says so).
- Quota windows are per minute with a sliding estimate: used = this minute + last minute times the
  share of it still inside a 60 s window. Usage is counted when a worker is picked, from an
  estimate of the request's tokens (prompt bytes / 4 + max_tokens).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from proxy_workers.context import RequestContext
from proxy_workers.errors import QuotaExceeded
from proxy_workers.policies import Policy, least_loaded_of
from shm.loadboard import (
    E_KV_USAGE,
    E_RUNNING,
    E_SCRAPED_AT,
    E_WAITING,
    W_Q_MINUTE,
    W_Q_PREV_REQUESTS,
    W_Q_PREV_TOKENS,
    W_Q_REQUESTS,
    W_Q_TOKENS,
    W_REQUESTS,
    W_TTFB_EWMA,
)
from shm.schema import Worker

if TYPE_CHECKING:
    from proxy_workers.routing import ModelRoute

STALE_INTERVALS = 3


class LeastLatency(Policy):
    name = "least_latency"

    def pick(self, route: ModelRoute, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        board, proxies = self.env.board, self.env.proxies
        ints, floats, stride = board.ints, board.floats, board.worker_stride()
        best, best_score = candidates[0], float("inf")
        for w in candidates:
            word = board.cell_word(0, w.slot)
            total, n = 0.0, 0
            for p in range(proxies):
                cell = word + p * stride
                if ints[cell + W_REQUESTS]:
                    total += floats[cell + W_TTFB_EWMA]
                    n += 1
            # A worker nobody has measured yet scores 0: it gets tried, and so measured.
            score = total / n if n else 0.0
            if score < best_score:
                best, best_score = w, score
        ctx.note("lowest time to first byte (EWMA)", ttfb_seconds=round(best_score, 6))
        return best


class LeastLoaded(Policy):
    name = "least_loaded"

    def pick(self, route: ModelRoute, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        board, env = self.env.board, self.env
        ints, floats = board.ints, board.floats
        fresh_after = time.time() - STALE_INTERVALS * env.settings.metrics_interval
        in_flight = env.load.in_flight
        best, best_score, stale = None, (float("inf"), 0.0), 0
        for w in candidates:
            base = board.engine_word(w.slot)
            if floats[base + E_SCRAPED_AT] < fresh_after:
                stale += 1
                continue
            # Requests sent since the last scrape are not in the engine's figures yet: our own
            # in-flight count is a floor for what the engine is running.
            running = max(ints[base + E_RUNNING], in_flight(w.slot))
            score = ((ints[base + E_WAITING] + running) / w.weight, floats[base + E_KV_USAGE])
            if score < best_score:
                best, best_score = w, score
        if best is None:
            ctx.note("no fresh engine metrics: least in-flight", fallback=True, stale=stale)
            return least_loaded_of(candidates, env.load, self.rng)
        ctx.note("fewest running + waiting requests (engine metrics)",
                 queue=best_score[0], kv_usage=round(best_score[1], 3))
        return best


class QuotaAware(Policy):
    name = "quota_aware"

    def pick(self, route: ModelRoute, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        env = self.env
        now = time.time()
        minute, into = divmod(now, 60.0)
        minute = int(minute)
        weight_prev = 1.0 - into / 60.0
        tokens = ctx.estimated_tokens()
        headroom = env.settings.quota_headroom
        best, best_ratio = None, float("inf")
        in_flight = env.load.in_flight
        for w in candidates:
            if not w.quota_rpm and not w.quota_tpm:
                ratio = 0.0
            else:
                used_req, used_tok = self._used(w.slot, minute, weight_prev)
                r = (used_req + 1) / w.quota_rpm if w.quota_rpm else 0.0
                t = (used_tok + tokens) / w.quota_tpm if w.quota_tpm else 0.0
                ratio = max(r, t)
                if ratio > headroom:
                    continue
            key = ratio + in_flight(w.slot) * 1e-6  # equal budgets: fewer in flight wins
            if key < best_ratio:
                best, best_ratio = w, key
        if best is None:
            retry = max(1, int(60 - into) + 1)
            raise QuotaExceeded(f"every worker for model '{route.model}' is at its per-minute quota",
                                retry_after=retry)
        if not ctx.dry_run:
            self._count(best.slot, minute, tokens)
        ctx.note("most quota left", quota_used=round(best_ratio, 3))
        return best

    def _used(self, slot: int, minute: int, weight_prev: float) -> tuple[float, float]:
        board, ints = self.env.board, self.env.board.ints
        stride, word = board.worker_stride(), board.cell_word(0, slot)
        req = tok = 0.0
        for p in range(self.env.proxies):
            cell = word + p * stride
            at = ints[cell + W_Q_MINUTE]
            if at == minute:
                req += ints[cell + W_Q_REQUESTS] + ints[cell + W_Q_PREV_REQUESTS] * weight_prev
                tok += ints[cell + W_Q_TOKENS] + ints[cell + W_Q_PREV_TOKENS] * weight_prev
            elif at == minute - 1:
                req += ints[cell + W_Q_REQUESTS] * weight_prev
                tok += ints[cell + W_Q_TOKENS] * weight_prev
        return req, tok

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
