"""Routing topology derived from membership: the four routers, shard maps and hash rings.

Role: pure functions the coordinator runs before each publish (no I/O, easy to test).

RouterManager rule (the seed design): exactly four routers, each serving every model its workers
allow, and a router with no model is not created:

    http_regular  a model with regular HTTP workers
    http_pd       a model with both prefill and decode HTTP workers
    grpc_regular  a model with regular gRPC workers
    grpc_pd       a model with both prefill and decode gRPC workers

Invariants:
- Rings are keyed by stable names (shard names, or worker URLs), never by slots, so two router
  instances watching the same fleet build identical rings and agree on every key.
- A ring is rebuilt only when its member list changes (a health flip changes nothing here: the
  proxies walk past unhealthy owners), which keeps publishes cheap at 10,000 workers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from shm.hashing import Ring, build_ring
from shm.schema import Worker

ROUTER_NAMES = ("http_regular", "http_pd", "grpc_regular", "grpc_pd")


def assign_routers(workers: Iterable[Worker]) -> dict[str, tuple[str, ...]]:
    kinds: dict[tuple[str, str], set[str]] = {}
    for w in workers:
        for model in w.models:
            kinds.setdefault((w.connection, model), set()).add(w.type)
    routers: dict[str, set[str]] = {name: set() for name in ROUTER_NAMES}
    for (connection, model), types in kinds.items():
        if "regular" in types:
            routers[f"{connection}_regular"].add(model)
        if {"prefill", "decode"} <= types:
            routers[f"{connection}_pd"].add(model)
    return {name: tuple(sorted(models)) for name, models in routers.items() if models}


def model_shards(workers: Iterable[Worker]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Model -> shard -> slots, for models whose regular workers declare shards."""
    shards: dict[str, dict[str, list[int]]] = {}
    for w in workers:
        if w.shard is None or w.type != "regular":
            continue
        for model in w.models:
            shards.setdefault(model, {}).setdefault(w.shard, []).append(w.slot)
    return {m: {s: tuple(slots) for s, slots in sorted(by.items())} for m, by in shards.items()}


def ring_members(model: str, workers: Sequence[Worker],
                 shards: dict[str, dict[str, tuple[int, ...]]],
                 weights: dict[int, int] | None = None) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(member names, weights) of a model's ring: its shards, else its regular workers' URLs.

    ``weights`` (slot -> configured weight) replaces the published weights while a slow start
    scales them, so a ramp never reshapes the ring.
    """
    if model in shards:
        names = tuple(shards[model])
        return names, tuple(1 for _ in names)
    members = sorted((w.url, w.weight if weights is None else weights.get(w.slot, w.weight))
                     for w in workers if model in w.models and w.type == "regular")
    return tuple(url for url, _ in members), tuple(weight for _, weight in members)


class RingCache:
    """Builds a model's ring once per distinct member list."""

    def __init__(self) -> None:
        self._rings: dict[str, tuple[tuple[str, ...], tuple[int, ...], Ring]] = {}

    def rings(self, workers: Sequence[Worker], shards: dict[str, dict[str, tuple[int, ...]]],
              base_weights: dict[int, int] | None = None) -> dict[str, Ring]:
        models = {m for w in workers for m in w.models}
        out = {}
        for model in sorted(models):
            names, weights = ring_members(model, workers, shards, base_weights)
            if not names:
                continue
            cached = self._rings.get(model)
            if cached is None or cached[0] != names or cached[1] != weights:
                cached = (names, weights, build_ring(names, weights))
                self._rings[model] = cached
            out[model] = cached[2]
        for gone in set(self._rings) - models:
            del self._rings[gone]
        return out
