"""What sampling costs the scanning policies: sampled against exact picks on the same evolving load.

Role: beyond ``scan.EXACT_LIMIT`` candidates, least_connections (and least_latency, least_loaded,
new sessions of session_affinity and cache_aware) compare ``scan.SAMPLE`` candidates instead of
all. This script measures the price in load terms, in-process on a real load board in shared
memory (2 proxies, weights 1 and 2 mixed as in ``bench_policies.py``), with the production
``least_connections`` driven through ``RoutingTable``/``ModelRoute.pick``:

- a closed loop holds ``--load`` requests in flight per unit of weight on average: each decision
  adds one in-flight request to the picked worker (on alternate proxies' cells) and, once the
  fleet is full, one random in-flight request finishes (exponential service times); decisions
  are measured from then on;
- per decision, the picked worker's load ÷ weight is compared with the exact minimum over the
  whole fleet at that moment (``excess``), and every 100 decisions the fleet's maximum
  load ÷ weight is compared with the mean;
- the same seed runs once with the sample and once with ``EXACT_LIMIT`` raised above the fleet.

Latency, queueing and cache effects need a model of the workers: that is ``shardgate simulate``.
Needs numpy (the ``test`` or ``load`` extra). Usage::

    PYTHONPATH=. python3 loadtest/policy_sampling.py --workers 10000 --load 4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics

import msgspec
import numpy as np

from coordinator.fleet.membership import Fleet
from loadtest.bench_policies import MODEL, PROXIES, max_proxies_for, worker_specs
from loadtest.scratch_shm import Shm
from proxy_workers.policies import scan
from proxy_workers.policies.base import PolicyEnv
from proxy_workers.routing.context import RequestContext
from proxy_workers.routing.table import RoutingTable
from shm.loadboard import W_IN_FLIGHT, LoadBoard
from shm.schema import ModelPolicy
from shm.settings import Settings


def run(board: LoadBoard, settings: Settings, n: int, load: float, decisions: int, seed: int,
        exact: bool) -> dict[str, float]:
    fleet = Fleet(settings.max_workers)
    fleet.apply(worker_specs(n))
    snapshot = fleet.snapshot(settings, {MODEL: ModelPolicy(policy="least_connections")}, PROXIES, 1,
                              os.getpid())
    limit = scan.EXACT_LIMIT
    scan.EXACT_LIMIT = n if exact else limit
    try:
        env = PolicyEnv(board, 0, PROXIES, settings, None)
        route = RoutingTable(snapshot, env, None).route_for(MODEL)
        route.policy.rng = random.Random(seed)
        route.pick(RequestContext(MODEL, None, b"", [], b"", (), "random"))  # builds the columns
    finally:
        scan.EXACT_LIMIT = limit
    ints = board.ints
    words = [[board.cell_word(p, w.slot, W_IN_FLIGHT) for w in route.candidates] for p in range(PROXIES)]
    for row in words:
        for word in row:
            ints[word] = 0
    weights = np.array([w.weight for w in route.candidates], dtype=np.float64)
    position = {w.slot: i for i, w in enumerate(route.candidates)}
    counts = np.zeros(n)
    capacity = int(load * weights.sum())
    rng = random.Random(seed + 1)
    running: list[tuple[int, int]] = []  # (proxy, position) per in-flight request
    excess, at_min, spread = [], 0, []
    ctx = RequestContext(MODEL, None, b"", [], b"", (), "random")
    measured = 0
    for d in range(capacity + decisions):  # fill the fleet, then measure at steady state
        if len(running) >= capacity:
            k = rng.randrange(len(running))
            p, i = running[k]
            running[k] = running[-1]
            running.pop()
            ints[words[p][i]] -= 1
            counts[i] -= 1
        per_weight = counts / weights
        low = per_weight.min()
        i = position[route.pick(ctx).slot]
        if d >= capacity:
            measured += 1
            excess.append(per_weight[i] - low)
            at_min += per_weight[i] == low
            if measured % 100 == 0:
                spread.append(float(per_weight.max() / per_weight.mean()))
        p = d % PROXIES
        ints[words[p][i]] += 1
        counts[i] += 1
        running.append((p, i))
    for row in words:
        for word in row:
            ints[word] = 0
    return {"mean_excess": round(statistics.fmean(excess), 4), "share_at_min": round(at_min / measured, 4),
            "max_over_mean": round(statistics.fmean(spread), 3) if spread else 0.0}


def measure(workers: int, load: float, decisions: int, seed: int) -> dict[str, dict[str, float]]:
    """``run`` sampled and exact on one scratch board (``loadtest/bench_policies.py --quality``)."""
    settings = msgspec.structs.replace(Settings(), max_workers=max(workers, Settings().max_workers))
    shm = Shm()
    try:
        _, board = shm.board(settings.max_workers, max_proxies_for(PROXIES))
        try:
            return {mode: run(board, settings, workers, load, decisions, seed, exact=mode == "exact")
                    for mode in ("sampled", "exact")}
        finally:
            board.close()
    finally:
        shm.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=10_000)
    parser.add_argument("--load", type=float, default=4.0, help="in-flight requests per unit of weight")
    parser.add_argument("--decisions", type=int, default=50_000, help="measured, after filling the fleet")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    result = measure(args.workers, args.load, args.decisions, args.seed)
    print(f"least_connections, {args.workers} workers, {args.load:g} in flight per unit of weight, "
          f"{args.decisions} decisions (sample of {scan.SAMPLE} beyond {scan.EXACT_LIMIT} candidates):")
    for mode, figures in result.items():
        print(f"  {mode:<8} picked load - exact minimum {figures['mean_excess']:.4f} (mean, per unit "
              f"of weight); picks at the minimum {figures['share_at_min']:.1%}; fleet max/mean load "
              f"{figures['max_over_mean']:.3f}")
    print(json.dumps({"workers": args.workers, "load": args.load, "decisions": args.decisions, **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
