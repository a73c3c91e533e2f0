"""Key-affinity policies over the coordinator's consistent-hash ring.

Role: ``consistent_hash`` (a key always lands on the same worker while it is healthy; removing a
worker moves only its keys) and ``consistent_hash_bounded`` (the same, but a worker whose global
in-flight load exceeds the mean times ``bounded_load_factor`` is passed over, clockwise).

Invariants:
- The ring is the coordinator's (published in the snapshot, keyed by worker URL), so every proxy
  and every router instance watching the same fleet maps a key to the same worker.
- Unusable owners (unhealthy, draining, already tried) are skipped clockwise: the next owner is
  the natural backup, and keys of healthy workers never move.
- A request without a routing key gets a random worker (reported as a fallback).
- The load bound's mean is exact up to ``scan.EXACT_LIMIT`` candidates and a sample's (of
  ``scan.SAMPLE``) beyond, so proxies may disagree about a worker right at the bound.
- Memos (a key's owner; for the bounded variant its first ``BACKUPS`` usable owners, with the
  owners skipped before each) hold only ring positions, never loads, and belong to one candidate
  list: a new snapshot brings a new list and an empty memo.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from math import ceil
from typing import TYPE_CHECKING

from proxy_workers.policies.base import Policy, PolicyEnv
from proxy_workers.routing.context import RequestContext
from shm.schema import Worker

if TYPE_CHECKING:
    from proxy_workers.policies.base import RouteView


def ring_pick(route: RouteView, candidates: Sequence[Worker], h: int,
              accept: object = None) -> tuple[Worker | None, int]:
    """First usable worker clockwise from ``h``; (worker, owners skipped)."""
    ring = route.ring
    if ring is None or not ring.points:
        return None, 0
    owners = route.ring_workers
    allowed = None if candidates is route.candidates else {w.slot for w in candidates}
    i = ring.index(h)
    first = owners[ring.owners[i if i < len(ring.points) else 0]]
    if first is not None and (allowed is None or first.slot in allowed) and (
            accept is None or accept(first)):  # type: ignore[operator]
        return first, 0
    skipped = 0
    for owner in ring.walk(h):
        w = owners[owner]
        if w is None or (allowed is not None and w.slot not in allowed):
            skipped += 1
            continue
        if accept is None or accept(w):  # type: ignore[operator]
            return w, skipped
        skipped += 1
    return None, skipped


MEMO_SIZE = 65536


class ConsistentHash(Policy):
    """The key's owner on the ring. Owners found without skipping are memoised per candidate list
    (a new snapshot brings a new list and an empty memo), since session keys repeat."""

    name = "consistent_hash"

    def __init__(self, env: PolicyEnv, rng: random.Random | None = None) -> None:
        super().__init__(env, rng)
        self._memo: dict[str, Worker] = {}
        self._memo_for: Sequence[Worker] | None = None

    def pick(self, route: RouteView, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        key = ctx.routing_key()
        if key is None:
            ctx.note("no routing key: random worker", fallback=True)
            return candidates[int(self.rng.random() * len(candidates))]
        memo = self._memo  # per route, so per model: the key alone identifies the ring position
        if candidates is route.candidates:
            if self._memo_for is not candidates:
                memo.clear()
                self._memo_for = candidates
            known = memo.get(key)
            if known is not None:
                ctx.reason = "key's worker on the ring"
                return known
        worker, skipped = ring_pick(route, candidates, ctx.key_hash())  # type: ignore[arg-type]
        if worker is not None and not skipped and candidates is route.candidates:
            if len(memo) >= MEMO_SIZE:
                memo.clear()
            memo[key] = worker
        if worker is None:
            ctx.note("no ring for this model: random worker", fallback=True)
            return candidates[int(self.rng.random() * len(candidates))]
        if skipped:
            ctx.note(f"key's worker unavailable: next on the ring ({skipped} skipped)", fallback=True,
                     skipped=skipped)
        else:
            ctx.reason = "key's worker on the ring"
        return worker


BACKUPS = 4  # owners per key that consistent_hash_bounded remembers (the owner and 3 backups)


class ConsistentHashBounded(Policy):
    """The key's owner unless it is above the load bound; then the next owner clockwise.

    A key's first ``BACKUPS`` usable owners are memoised per candidate list (as
    ``consistent_hash`` memoises the first), so a pick is a dictionary lookup, the total load
    and a load read per owner tried; only keys whose remembered owners are all above the bound
    walk the ring.
    """

    name = "consistent_hash_bounded"

    def __init__(self, env: PolicyEnv, rng: random.Random | None = None) -> None:
        super().__init__(env, rng)
        self._memo: dict[str, tuple[tuple[Worker, int], ...]] = {}
        self._memo_for: Sequence[Worker] | None = None

    def pick(self, route: RouteView, candidates: Sequence[Worker], ctx: RequestContext) -> Worker:
        key = ctx.routing_key()
        if key is None:
            ctx.note("no routing key: random worker", fallback=True)
            return candidates[int(self.rng.random() * len(candidates))]
        # Over ``scan.EXACT_LIMIT`` candidates the total is estimated from a sample: reading every
        # worker would cost more than the whole decision budget, and the bound is loose anyway.
        total = self.columns(route, candidates).total_load(self.rng)
        # Capacity per worker, rounded up as in the bounded-loads paper (Mirrokni et al.): the +1
        # counts the request being placed, and the ceiling lets an idle fleet keep every key on
        # its owner (1 / n * factor alone is below one request for n > factor).
        limit = ceil((total + 1) / len(candidates) * self.env.settings.bounded_load_factor)
        in_flight = self.env.load.in_flight
        worker: Worker | None = None
        skipped = 0
        for owner, before in self._owners(route, candidates, key, ctx):
            if in_flight(owner.slot) + 1 <= limit:
                worker, skipped = owner, before
                break
        else:
            worker, skipped = ring_pick(route, candidates, ctx.key_hash(),  # type: ignore[arg-type]
                                        lambda w: in_flight(w.slot) + 1 <= limit)
        if worker is None:
            worker, _ = ring_pick(route, candidates, ctx.key_hash())  # type: ignore[arg-type]
            ctx.note("every worker above the load bound: the key's worker anyway", fallback=True)
            return worker or candidates[0]
        if skipped:
            ctx.note(f"spilled past {skipped} worker(s) above the load bound", fallback=True,
                     load_limit=limit)
        else:
            ctx.reason = "key's worker on the ring (within the load bound)"
        return worker

    def _owners(self, route: RouteView, candidates: Sequence[Worker], key: str,
                ctx: RequestContext) -> tuple[tuple[Worker, int], ...]:
        """The key's first ``BACKUPS`` usable owners clockwise, each with the owners skipped
        before it (memoised for the route's list; computed for a retry's)."""
        stable = candidates is route.candidates
        if stable:
            if self._memo_for is not candidates:
                self._memo.clear()
                self._memo_for = candidates
            known = self._memo.get(key)
            if known is not None:
                return known
        found = tuple(_walk_usable(route, candidates, ctx.key_hash(), BACKUPS))  # type: ignore[arg-type]
        if stable:
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            self._memo[key] = found
        return found


def _walk_usable(route: RouteView, candidates: Sequence[Worker], h: int,
                 count: int) -> list[tuple[Worker, int]]:
    """Up to ``count`` usable owners clockwise from ``h``, each with the owners skipped before it
    (the ``skipped`` that ``ring_pick`` would report had it stopped there)."""
    ring = route.ring
    if ring is None or not ring.points:
        return []
    owners = route.ring_workers
    allowed = None if candidates is route.candidates else {w.slot for w in candidates}
    out: list[tuple[Worker, int]] = []
    skipped = 0
    for owner in ring.walk(h):
        w = owners[owner]
        if w is not None and (allowed is None or w.slot in allowed):
            out.append((w, skipped))
            if len(out) >= count:
                break
        skipped += 1
    return out
