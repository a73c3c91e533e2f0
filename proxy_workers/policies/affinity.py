"""Policies that remember where things went: sticky sessions and KV-cache-aware routing.

Role: ``session_affinity`` keeps a session on its worker until it is idle for ``session_ttl``;
``cache_aware`` sends a prompt to the worker most likely to hold its prefix in KV cache. Both
remember through :class:`shm.affinity.AffinityTable`, shared by all proxies, so the answer does not
depend on which proxy process the kernel handed the connection to.

Invariants:
- New assignments go to the least loaded worker (global in-flight ÷ weight). A reassignment after
  a worker failure claims precedence over the stale entry (``AffinityTable`` docs).
- cache_aware keys are 64-bit chained CRCs of the prompt's prefix blocks, so an identical prefix
  gives identical keys in every process. Only checkpoint blocks (about two per doubling of the
  prompt, plus the last) are recorded and probed: a 32,000-character prompt costs ~20 table
  operations, not 500. The match rate is therefore approximate (to within a checkpoint), as
  sglang's approximate tree is.
- cache_aware balances first: when ``max - min > balance_abs_threshold`` and
  ``max > min * balance_rel_threshold`` (in-flight over the model's workers), the least loaded
  worker wins regardless of the cache (sglang's rule and defaults: 0.3 / 64 / 1.5).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from proxy_workers.policies.base import Policy, least_loaded_of
from proxy_workers.routing.context import RequestContext
from shm.schema import Worker

if TYPE_CHECKING:
    from proxy_workers.policies.base import RouteView

MAX_BLOCKS = 512
_SEED_B = 0x9E3779B9


def checkpoints(n_blocks: int) -> list[int]:
    """Block counts at which prefixes are recorded: 1, 2, 3, 4, 6, 8, 12, 16, ... and n."""
    points, a = [], 1
    while a < n_blocks:
        points.append(a)
        b = a + a // 2
        if a < b < n_blocks:
            points.append(b)
        a *= 2
    points.append(n_blocks)
    return sorted(set(points))


def prefix_keys(model: str, text: str, block: int) -> list[tuple[int, int]]:
    """(blocks covered, 64-bit key) for each checkpoint prefix of ``text``."""
    data = text.encode()
    n = min((len(data) + block - 1) // block, MAX_BLOCKS)
    if n == 0:
        return []
    wanted = checkpoints(n)
    seed = zlib.crc32(model.encode())
    a, b, out, at = seed, seed ^ _SEED_B, [], 0
    for count in wanted:
        chunk = data[at * block: count * block]
        a, b = zlib.crc32(chunk, a), zlib.crc32(chunk, b)
        at = count
        out.append((count, (a << 32) | b))
    return out


def _usable(route: RouteView, candidates: Sequence[Worker]) -> dict[int, Worker]:
    return route.by_slot if candidates is route.candidates else {w.slot: w for w in candidates}


class SessionAffinity(Policy):
    name = "session_affinity"

    def pick(self, route: RouteView, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        h = ctx.key_hash()
        env = self.env
        if h is None or env.affinity is None:
            ctx.note("no session key: least loaded worker", fallback=True)
            return least_loaded_of(candidates, env, self.rng)
        usable = _usable(route, candidates)
        now, ttl = time.time(), env.settings.session_ttl
        found = env.affinity.lookup(h, env.proxies, now, ttl, usable.__contains__)
        if found is not None:
            slot, created = found
            if not ctx.dry_run:
                env.affinity.record(env.proxy, h, slot, now, created)
            ctx.reason = "session's worker"
            return usable[slot]
        worker = least_loaded_of(candidates, env, self.rng)
        earliest = env.affinity.earliest(h, env.proxies, now, ttl)
        if earliest is None:
            ctx.reason = "new session: least loaded worker"
        else:
            ctx.note("session's worker unavailable: moved to the least loaded", fallback=True)
        if not ctx.dry_run:
            # A reassignment claims precedence over the stale entry (see shm.affinity).
            created = now if earliest is None else earliest - 1e-6
            env.affinity.record(env.proxy, h, worker.slot, now, created)
        return worker


class CacheAware(Policy):
    name = "cache_aware"

    def pick(self, route: RouteView, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        env, settings = self.env, self.env.settings
        loads = env.columns(candidates).loads()
        lo, hi = min(loads), max(loads)
        keys = prefix_keys(route.model, ctx.prompt(), settings.cache_block_chars)
        if hi - lo > settings.balance_abs_threshold and hi > lo * settings.balance_rel_threshold:
            worker = candidates[loads.index(lo)]
            ctx.note("load imbalanced: least loaded worker", fallback=True, min_load=lo, max_load=hi)
        else:
            matched, rate = self._match(route, candidates, keys)
            if matched is not None and rate > settings.cache_threshold:
                worker = matched
                ctx.note("prefix cached on this worker", match_rate=round(rate, 3))
            else:
                worker = least_loaded_of(candidates, env, self.rng)
                ctx.note("prefix match below cache_threshold: least loaded worker", fallback=True,
                         match_rate=round(rate, 3))
        if not ctx.dry_run:
            self._remember(keys, worker)
        return worker

    def _match(self, route: RouteView, candidates: Sequence[Worker],
               keys: list[tuple[int, int]]) -> tuple[Worker | None, float]:
        """The worker holding the longest recorded prefix, and the share of the prompt it covers."""
        env = self.env
        affinity = env.affinity
        if not keys or affinity is None:
            return None, 0.0
        usable = _usable(route, candidates)
        now, ttl = time.time(), env.settings.session_ttl
        total = keys[-1][0]
        for count, key in reversed(keys):
            found = affinity.lookup(key, env.proxies, now, ttl, usable.__contains__, latest=True)
            if found is not None:
                return usable[found[0]], count / total
        return None, 0.0

    def _remember(self, keys: list[tuple[int, int]], worker: Worker) -> None:
        env = self.env
        if env.affinity is None:
            return
        now = time.time()
        for _, key in keys:
            env.affinity.record(env.proxy, key, worker.slot, now)
