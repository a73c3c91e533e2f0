"""Run one or several policies over the same simulated fleet and workload.

Role: the API behind ``shardgate simulate`` (tests call it directly): validate the
configuration, build the fleet snapshot once, then for each policy fresh shared memory, a fresh
workload from the same seed and one :class:`shardgate.simulate.engine.Simulation`. Policies
run one after the other, or in ``jobs`` forked processes at once (a comparison's runs share
nothing but their inputs).

Invariants:
- Every policy of a comparison sees the same fleet, the same arrival times and the same
  conversation scripts as long as its decisions do not change them (follow-up turns wait for
  answers, so their timing is the policy's doing).
- A policy's figures do not depend on ``jobs``: each run is seeded by the seed and its policy
  name alone (decisions/s excepted: it measures the machine, which concurrent runs share).
- Forked runs inherit the snapshot (no copy through a pipe) and report their progress in a
  shared array of arrival counts, which the parent turns into one progress bar.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any

from shardgate.simulate.config import SimConfig
from shardgate.simulate.engine import Simulation
from shardgate.simulate.harness import Production, fleet_snapshot
from shardgate.simulate.stats import summarize
from shm.schema import Snapshot

Progress = Callable[[int, int], None]
ProgressFor = Callable[[str], Progress | None]

# What a forked run reads: set by the parent just before it forks (see ``_parallel``).
_SHARED: tuple[SimConfig, list[int], Snapshot, Any] | None = None


def default_jobs(policies: int) -> int:
    """One process per policy, at most one per CPU this process may use."""
    return max(1, min(policies, len(os.sched_getaffinity(0))))


def simulate(config: SimConfig, policies: Sequence[str], progress: ProgressFor | None = None,
             jobs: int = 1) -> list[dict[str, Any]]:
    """One report per policy, in order (see :func:`shardgate.simulate.stats.summarize`)."""
    config.validate()
    capacities = config.capacities()
    snapshot = fleet_snapshot(config.worker_urls(), config.worker_weights(capacities), config.settings(),
                              config.proxies)
    if jobs > 1 and len(policies) > 1:
        return _parallel(config, capacities, snapshot, policies, progress, jobs)
    return [run_policy(config, capacities, snapshot, policy, progress(policy) if progress else None)
            for policy in policies]


def run_policy(config: SimConfig, capacities: list[int], snapshot: Snapshot, policy: str,
               progress: Progress | None) -> dict[str, Any]:
    production = Production(snapshot, policy, config.proxies, config.seed)
    try:
        workload = config.workload(capacities)
        report = summarize(Simulation(config, production, capacities, workload, progress).run())
    finally:
        production.close()
    window = config.arrival_window(workload)
    report["offered_rate"] = round(workload.requests / window, 2) if window > 0 else None
    return report


def _parallel(config: SimConfig, capacities: list[int], snapshot: Snapshot, policies: Sequence[str],
              progress: ProgressFor | None, jobs: int) -> list[dict[str, Any]]:
    global _SHARED
    ctx = multiprocessing.get_context("fork")
    arrived = ctx.Array("q", len(policies), lock=False)  # single writer per element: no lock
    _SHARED = (config, capacities, snapshot, arrived)
    bar = progress(f"{len(policies)} policies") if progress else None
    total = config.workload(capacities).requests * len(policies)
    try:
        with ProcessPoolExecutor(max_workers=min(jobs, len(policies)), mp_context=ctx) as pool:
            futures = [pool.submit(_forked_run, i, policy) for i, policy in enumerate(policies)]
            pending = set(futures)
            while pending:
                _, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
                if any(f.exception() for f in futures if f.done()):
                    break
                if bar is not None:
                    bar(min(sum(arrived), total - 1), total)  # the full bar once all have returned
            reports = [f.result() for f in futures]
            if bar is not None:
                bar(total, total)
            return reports
    finally:
        _SHARED = None


def _forked_run(index: int, policy: str) -> dict[str, Any]:
    assert _SHARED is not None, "forked runs read the parent's inputs"
    config, capacities, snapshot, arrived = _SHARED

    def progress(done: int, total: int) -> None:
        arrived[index] = done

    return run_policy(config, capacities, snapshot, policy, progress)
