"""Policy names to classes, and the stable numbering used by the decision counters.

Invariant: ``POLICY_INDEX`` follows ``shm.settings.POLICY_NAMES`` (the declared order), so every
proxy counts a policy's decisions in the same load-board column.
"""

from __future__ import annotations

from proxy_workers.policies.affinity import CacheAware, SessionAffinity
from proxy_workers.policies.base import (
    LeastConnections,
    Policy,
    PolicyEnv,
    PowerOfTwo,
    Random,
    RoundRobin,
    WeightedRandom,
    WeightedRoundRobin,
)
from proxy_workers.policies.hashing import ConsistentHash, ConsistentHashBounded
from proxy_workers.policies.load import LeastLatency, LeastLoaded, QuotaAware
from shm.settings import POLICY_NAMES

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (RoundRobin, WeightedRoundRobin, Random, WeightedRandom, LeastConnections,
                              LeastLatency, PowerOfTwo, ConsistentHash, ConsistentHashBounded,
                              SessionAffinity, CacheAware, LeastLoaded, QuotaAware)
}
POLICY_INDEX: dict[str, int] = {name: i for i, name in enumerate(POLICY_NAMES)}

if set(POLICIES) != set(POLICY_NAMES):  # pragma: no cover - a developer error, caught at import
    raise ImportError(f"policies declared {sorted(POLICY_NAMES)} but implemented {sorted(POLICIES)}")


def make_policy(name: str, env: PolicyEnv) -> Policy:
    try:
        policy = POLICIES[name](env)
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
    policy.index = POLICY_INDEX[name]
    return policy
