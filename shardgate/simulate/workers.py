"""Simulated inference workers: concurrent slots, a priority queue, a prefix cache, per-token costs.

Role: the servers of the discrete-event simulation. A worker runs up to ``capacity`` requests at
once (continuous batching: one slot per sequence), queues the rest up to ``queue_limit`` (beyond
that it refuses, as an engine answering 503/429 does), and charges each request

    service = overhead + prefill_per_token x uncached prompt tokens
                       + cached_per_token x cached prompt tokens
                       + decode_per_token x output tokens

all times ``slow`` (1, or a slowdown factor during a failure scenario). The first token leaves
after the overhead and the prefill; the answer ends after the decode.

Prefix cache (per worker, LRU, ``kv_cache_tokens`` tokens): what a worker has served stays cached
until evicted. A conversation's entry holds how many of its tokens (prompt and answer of the last
turn served here) are cached; a shared system prompt has its own entry, touched after every
conversation that uses it, so it is evicted only after all of them (as block-level LRU behaves).
Cached prefixes are counted in whole ``BLOCK_TOKENS`` blocks (vLLM's paged KV block).

Invariants:
- ``load`` = running + queued: exactly the requests the router counts as in flight on it.
- A queue is served highest priority first, then first come first served.
- A dead worker holds nothing: its requests were handed back to the engine when it died.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

import msgspec

from shardgate.simulate.workload import Request

BLOCK_TOKENS = 16


class CostModel(msgspec.Struct, frozen=True, kw_only=True):
    """Seconds per request and per token, per sequence slot (see the module docstring)."""

    overhead: float = 0.010
    prefill_per_token: float = 0.00005   # 20,000 prompt tokens/s per sequence
    cached_per_token: float = 0.0        # a cached prefix is not recomputed
    decode_per_token: float = 0.020      # 50 output tokens/s per sequence
    kv_cache_tokens: int = 131_072       # prefix cache per worker

    def first_token(self, prompt: int, cached: int) -> float:
        return self.overhead + (prompt - cached) * self.prefill_per_token + cached * self.cached_per_token

    def decode(self, output: int) -> float:
        return output * self.decode_per_token


class SimWorker:
    """One server: slots, queue, prefix cache and the counters the report needs."""

    __slots__ = ("alive", "cache", "cache_used", "capacity", "load", "queue", "queue_limit", "running",
                 "served", "slot", "slow")

    def __init__(self, slot: int, capacity: int, queue_limit: int) -> None:
        self.slot = slot
        self.capacity = capacity
        self.queue_limit = queue_limit
        self.slow = 1.0
        self.alive = True
        # A dict, not a set: insertion order, so a dying worker's requests are retried in the
        # same order in every run (a set of objects iterates in memory-address order).
        self.running: dict[Request, None] = {}
        self.queue: list[tuple[int, int, Request]] = []  # (-priority, arrival order, request)
        self.load = 0
        self.served = 0  # attempts started here (requests routed to it)
        self.cache: OrderedDict[int, int] = OrderedDict()  # entry key -> tokens it holds
        self.cache_used = 0

    def accepts(self) -> bool:
        """A free slot or room in the queue (else the worker refuses the request)."""
        return len(self.running) < self.capacity or len(self.queue) < self.queue_limit

    def cached_prefix(self, req: Request) -> int:
        """Prompt tokens of ``req`` already in this worker's prefix cache (whole blocks)."""
        conv, cache = req.conv, self.cache
        own = cache.get(conv.id)
        if own is not None:
            cached = min(own + conv.sys_tokens, req.prompt)
        elif conv.sys >= 0 and ~conv.sys in cache:
            cached = conv.sys_tokens
        else:
            return 0
        return cached - cached % BLOCK_TOKENS

    def remember(self, req: Request, capacity: int) -> None:
        """After serving ``req``: its prompt and answer are cached; evict least recently used.

        Entries hold the tokens they add: a conversation's own tokens (beyond its system prompt),
        a system prompt's tokens (key ``~number``: negative, conversation ids are >= 0).
        """
        conv, cache = req.conv, self.cache
        own = req.prompt + req.output - conv.sys_tokens
        self.cache_used += own - cache.pop(conv.id, 0)
        cache[conv.id] = own
        if conv.sys >= 0:
            self.cache_used += conv.sys_tokens - cache.pop(~conv.sys, 0)
            cache[~conv.sys] = conv.sys_tokens  # after its conversation: evicted after all of them
        while self.cache_used > capacity and cache:
            self.cache_used -= cache.popitem(last=False)[1]

    def forget_all(self) -> None:
        """A restart: nothing cached, nothing running or queued."""
        self.cache.clear()
        self.cache_used = 0
        self.running.clear()
        self.queue.clear()
        self.load = 0

    def push(self, req: Request, order: int) -> None:
        heapq.heappush(self.queue, (-req.priority, order, req))

    def pop(self) -> Request:
        return heapq.heappop(self.queue)[2]
