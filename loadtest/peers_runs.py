"""Run ``../shared/bench/peers.py`` several times and report the spread of the router/nginx ratio.

Role: on a small shared machine one peers.py run (three rounds) can land anywhere in a wide band
(this machine: chat 1.9-2.7x nginx for the same code, depending on where the scheduler puts the
proxy, wrk and the backend). A target is met when the runs meet it, not one lucky run: this
script repeats peers.py, keeps every round's ratio, and prints each run's median, every round,
the median over all rounds and how many rounds are within the target.

Usage (from the repository root, with the project installed or ``PYTHONPATH`` set)::

    python3 loadtest/peers_runs.py --runs 4                        # chat, target 2.0
    python3 loadtest/peers_runs.py --runs 3 --scenario stream      # target 1.5
    python3 loadtest/peers_runs.py --router-cmd 'env PYTHONPATH=/tmp/wt python3 -m shardgate.cli serve ...'

Only nginx is measured as a peer (the targets are ratios to nginx). Prints a table and, last, one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

PEERS = Path(__file__).resolve().parent.parent.parent / "shared" / "bench" / "peers.py"
DEFAULT_CMD = "shardgate serve --worker {w1} --worker {w2} --port {port} --proxies {proxies}"
TARGETS = {"chat": 2.0, "stream": 1.5}
_ROUND = re.compile(r"round (\d+) (\S+)\s+([\d.]+) us/")


def host_steal_seconds() -> float:
    """CPU time the hypervisor took from this VM's vCPUs so far (/proc/stat's steal column).

    On this project's 2-vCPU VM it is what makes runs of the same code differ by up to 40%: a run
    with a few seconds of steal costs more per request, for the router and nginx alike."""
    try:
        with open("/proc/stat") as stat:
            return int(stat.readline().split()[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def one_run(args: argparse.Namespace) -> list[float]:
    """The router/nginx ratio of each round of one peers.py run."""
    out = subprocess.run([sys.executable, str(args.peers), "--peers", "nginx", "--scenario", args.scenario,
                          "--router-cmd", args.router_cmd], capture_output=True, text=True).stdout
    rounds: dict[int, dict[str, float]] = {}
    for number, system, cost in _ROUND.findall(out):
        rounds.setdefault(int(number), {})[system] = float(cost)
    return [r["router"] / r["nginx"] for _, r in sorted(rounds.items()) if r.get("nginx")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scenario", choices=sorted(TARGETS), default="chat")
    parser.add_argument("--router-cmd", default=DEFAULT_CMD)
    parser.add_argument("--peers", type=Path, default=PEERS, help="path of peers.py")
    args = parser.parse_args()
    if not args.peers.exists():
        sys.exit(f"peers.py not found at {args.peers} (--peers PATH)")
    target = TARGETS[args.scenario]
    every: list[float] = []
    runs: list[float] = []
    steals: list[float] = []
    for run in range(1, args.runs + 1):
        before = host_steal_seconds()
        ratios = one_run(args)
        steals.append(host_steal_seconds() - before)
        if not ratios:
            print(f"run {run}: no figures (is the router command right?)", flush=True)
            continue
        runs.append(statistics.median(ratios))
        every += ratios
        print(f"run {run}: {runs[-1]:.3f} (rounds {', '.join(f'{r:.2f}' for r in ratios)}); "
              f"host steal {steals[-1]:.1f} s", flush=True)
    if not every:
        return 1
    within = sum(r <= target for r in every)
    summary = {"scenario": args.scenario, "target": target, "runs": [round(r, 3) for r in runs],
               "rounds": [round(r, 3) for r in every], "median_round": round(statistics.median(every), 3),
               "rounds_within_target": within, "rounds_total": len(every),
               "host_steal_seconds": [round(s, 1) for s in steals]}
    print(f"median of {len(every)} rounds: {summary['median_round']} (target {target}); "
          f"{within} of {len(every)} rounds within it")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
