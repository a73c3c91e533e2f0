"""Policies that remember where things went: sticky sessions and KV-cache-aware routing.

Role: ``session_affinity`` keeps a session on its worker until it is idle for ``session_ttl``;
``cache_aware`` sends a prompt to the worker most likely to hold its prefix in KV cache. Both
remember through :class:`shm.affinity.AffinityTable`, shared by all proxies, so the answer does not
depend on which proxy process the kernel handed the connection to.

Invariants:
- New assignments go to the least loaded worker (global in-flight ÷ weight; exact up to
  ``scan.EXACT_LIMIT`` candidates, the best of ``scan.SAMPLE`` random ones beyond). A
  reassignment after a worker failure claims precedence over the stale entry (``AffinityTable``).
- cache_aware keys are 64 bits of a prompt prefix: its length and a chained CRC-32 of its bytes,
  so an identical prefix gives identical keys in every process. Prefixes are keyed at checkpoint
  blocks (about two per doubling of the prompt), at message ends (the last ``MAX_ENDS``) and at
  the prompt's end: a 32,000-character prompt costs ~20 table operations, not 500, and a follow-up turn, which
  starts with the whole previous prompt, matches all of it (its last key is a message end of the
  follow-up). The match rate is the matched bytes over the prompt's bytes; a match ending where
  an assistant message starts also counts that message, which the matched worker generated and
  so holds in its cache.
- cache_aware balances first: when ``max - min > balance_abs_threshold`` and
  ``max > min * balance_rel_threshold`` (in-flight over the model's workers; for long lists over
  the sample and the worker holding the prefix, which a sample alone would rarely include, so a
  hot worker would never look imbalanced), the least loaded worker wins regardless of the
  cache (sglang's rule; its defaults 0.3 / 64 / 1.5 except the absolute threshold, 4 here: 64
  lets a shared system prompt's conversations pile onto one worker, docs/simulator.md).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

from proxy_workers.policies.base import Policy
from proxy_workers.policies.native import C_KEYS
from proxy_workers.routing.context import RequestContext
from shm.schema import Worker

if TYPE_CHECKING:
    from proxy_workers.policies.base import RouteView

MAX_BLOCKS = 512
MAX_ENDS = 32  # message ends keyed per prompt: the latest, where follow-ups and branches match
_MODEL_SEEDS: dict[str, int] = {}


@lru_cache(maxsize=MAX_BLOCKS)
def checkpoints(n_blocks: int) -> tuple[int, ...]:
    """Block counts at which prefixes are recorded: 1, 2, 3, 4, 6, 8, 12, 16, ... and n."""
    points, a = [], 1
    while a < n_blocks:
        points.append(a)
        b = a + a // 2
        if a < b < n_blocks:
            points.append(b)
        a *= 2
    points.append(n_blocks)
    return tuple(sorted(set(points)))


_OFFSETS: dict[int, dict[int, tuple[int, ...]]] = {}  # block size -> n_blocks -> offsets


def _checkpoint_offsets(n_blocks: int, block: int) -> tuple[int, ...]:
    """Byte offsets of the checkpoints before the last (which is the prompt's end), memoised
    (two dict lookups: cheaper than ``lru_cache``'s argument tuple; at most ``MAX_BLOCKS`` per
    block size, of which a process has one or two)."""
    by_count = _OFFSETS.get(block)
    if by_count is None:
        by_count = _OFFSETS[block] = {}
    offsets = by_count.get(n_blocks)
    if offsets is None:
        offsets = by_count[n_blocks] = tuple(c * block for c in checkpoints(n_blocks)[:-1])
    return offsets


def prefix_keys(model: str, text: str, block: int,
                ends: Sequence[tuple[int, str]] = ()) -> list[tuple[int, int]]:
    """(bytes covered, 64-bit key) for each keyed prefix of ``text``, shortest first: checkpoint
    blocks, message ends (byte offsets, from ``RequestContext.prompt_ends``) and the whole text,
    within the first ``MAX_BLOCKS`` blocks. A key depends only on the model and the prefix's
    bytes: the prefix's length (high 32 bits) and a CRC-32 chained over its pieces from a
    per-model seed (low 32 bits: one C call for the whole chain where ``native`` has it, else a
    ``zlib.crc32`` call per prefix)."""
    data = text.encode()
    limit = min(len(data), MAX_BLOCKS * block)
    if limit == 0:
        return []
    offsets: Sequence[int] = _checkpoint_offsets((limit + block - 1) // block, block)
    if ends:
        offsets = _with_ends(offsets, ends, limit)
    crc = _MODEL_SEEDS.get(model)
    if crc is None:
        crc = _MODEL_SEEDS[model] = zlib.crc32(model.encode())
    if C_KEYS is not None:
        return C_KEYS(data, offsets, limit, crc)
    at, out = 0, []
    for offset in offsets:
        crc = zlib.crc32(data[at:offset], crc)
        out.append((offset, (offset << 32) | crc))
        at = offset
    crc = zlib.crc32(data[at:limit], crc)
    out.append((limit, (limit << 32) | crc))
    return out


def _with_ends(offsets: Sequence[int], ends: Sequence[tuple[int, str]], limit: int) -> list[int]:
    """The checkpoint ``offsets`` and the last ``MAX_ENDS`` message ends below ``limit``, merged
    in order without repeats (both are ascending)."""
    merged: list[int] = []
    i, n = 0, len(offsets)
    for end, _ in ends[-MAX_ENDS:] if len(ends) > MAX_ENDS else ends:
        if end >= limit:
            break
        while i < n and offsets[i] < end:
            merged.append(offsets[i])
            i += 1
        if (i < n and offsets[i] == end) or (merged and merged[-1] == end):
            continue
        merged.append(end)
    merged.extend(offsets[i:])
    return merged


def covered(offset: int, ends: Sequence[tuple[int, str]], total: int) -> int:
    """Bytes a worker holding the prefix up to ``offset`` has cached: the prefix, and the
    assistant message right after it when the prefix ends where one starts (it generated it)."""
    for i, (end, _) in enumerate(ends):
        if end == offset:
            if i + 1 < len(ends) and ends[i + 1][1] == "assistant":
                return min(ends[i + 1][0], total)
            break
        if end > offset:
            break
    return offset


def _usable(route: RouteView, candidates: Sequence[Worker]) -> dict[int, Worker]:
    return route.by_slot if candidates is route.candidates else {w.slot: w for w in candidates}


class SessionAffinity(Policy):
    name = "session_affinity"

    def pick(self, route: RouteView, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        h = ctx.key_hash()
        env = self.env
        if h is None or env.affinity is None:
            ctx.note("no session key: least loaded worker", fallback=True)
            return self.least_loaded(route, candidates)
        usable = _usable(route, candidates)
        now, ttl = time.time(), env.settings.session_ttl
        # The earliest live entry, usable or not: one probe answers both "whose session is it"
        # and, when nobody's, "is it new"; only an unusable answer needs the filtered lookup.
        found = env.affinity.lookup(h, env.proxies, now, ttl)
        earliest = None if found is None else found[1]
        if found is not None and found[0] not in usable:
            found = env.affinity.lookup(h, env.proxies, now, ttl, usable.__contains__)
        if found is not None:
            slot, created = found
            if not ctx.dry_run:
                env.affinity.record(env.proxy, h, slot, now, created)
            ctx.reason = "session's worker"
            return usable[slot]
        worker = self.least_loaded(route, candidates)
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
    """Longest recorded prefix's worker, when it holds enough of the prompt; else least loaded.

    Every decision records its prefix keys for the chosen worker (one probe and a store each;
    an entry already there is only marked seen), so the table's least-recently-seen eviction
    follows real use. The same in C and in Python (``native``): a simulation gives the same
    figures on either build.
    """

    name = "cache_aware"

    def pick(self, route: RouteView, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        env, settings = self.env, self.env.settings
        read = self.columns(route, candidates).read_loads(self.rng)
        lo, hi = read.low, read.high
        ends = ctx.prompt_ends()
        keys = prefix_keys(route.model, ctx.prompt(), settings.cache_block_chars, ends)
        matched, rate = None, 0.0
        if not self._imbalanced(lo, hi):
            matched, rate = self._match(route, candidates, keys, ends)
            if matched is not None and read.sampled:  # a sample's max can miss the matched worker
                hi = max(hi, env.load.in_flight(matched.slot))
        if self._imbalanced(lo, hi):
            worker = candidates[read.least_loaded(self.rng, weighted=False)]
            ctx.note("load imbalanced: least loaded worker", fallback=True, min_load=lo, max_load=hi)
        elif matched is not None and rate > settings.cache_threshold:
            worker = matched
            ctx.note("prefix cached on this worker", match_rate=round(rate, 3))
        else:
            worker = candidates[read.least_loaded(self.rng, weighted=True)]
            ctx.note("prefix match below cache_threshold: least loaded worker", fallback=True,
                     match_rate=round(rate, 3))
        if not ctx.dry_run and env.affinity is not None and keys:
            self._remember(keys, worker.slot)
        return worker

    def _imbalanced(self, low: int, high: int) -> bool:
        """sglang's balance rule over global in-flight counts."""
        settings = self.env.settings
        return high - low > settings.balance_abs_threshold and high > low * settings.balance_rel_threshold

    def _remember(self, keys: list[tuple[int, int]], slot: int) -> None:
        env = self.env
        env.affinity.record_many(env.proxy, [key for _, key in keys], slot, time.time())  # type: ignore[union-attr]

    def _match(self, route: RouteView, candidates: Sequence[Worker], keys: list[tuple[int, int]],
               ends: Sequence[tuple[int, str]]) -> tuple[Worker | None, float]:
        """The worker that last saw the longest keyed prefix, and the share of the prompt it holds."""
        env = self.env
        affinity = env.affinity
        if not keys or affinity is None:
            return None, 0.0
        usable = _usable(route, candidates)
        now, ttl = time.time(), env.settings.session_ttl
        total = keys[-1][0]
        for offset, key in reversed(keys):
            found = affinity.lookup(key, env.proxies, now, ttl, usable.__contains__, latest=True)
            if found is not None:
                return usable[found[0]], covered(offset, ends, total) / total
        return None, 0.0
