"""Run one or several policies over the same simulated fleet and workload.

Role: the API behind ``shardgate simulate`` (tests call it directly): validate the
configuration, build the fleet snapshot once, then for each policy fresh shared memory, a fresh
workload from the same seed and one :class:`shardgate.simulate.engine.Simulation`.

Invariant: every policy of a comparison sees the same fleet, the same arrival times and the same
conversation scripts as long as its decisions do not change them (follow-up turns wait for
answers, so their timing is the policy's doing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from shardgate.simulate.config import SimConfig
from shardgate.simulate.engine import Simulation
from shardgate.simulate.harness import Production, fleet_snapshot
from shardgate.simulate.stats import summarize

ProgressFor = Callable[[str], Callable[[int, int], None] | None]


def simulate(config: SimConfig, policies: Sequence[str],
             progress: ProgressFor | None = None) -> list[dict[str, Any]]:
    """One report per policy (see :func:`shardgate.simulate.stats.summarize`)."""
    config.validate()
    capacities = config.capacities()
    settings = config.settings()
    snapshot = fleet_snapshot(config.worker_urls(), config.worker_weights(capacities), settings,
                              config.proxies)
    reports = []
    for policy in policies:
        production = Production(snapshot, policy, config.proxies, config.seed)
        try:
            workload = config.workload(capacities)
            sim = Simulation(config, production, capacities, workload,
                             progress(policy) if progress else None)
            report = summarize(sim.run())
            window = config.arrival_window(workload)
            report["offered_rate"] = round(workload.requests / window, 2) if window > 0 else None
            reports.append(report)
        finally:
            production.close()
    return reports
