"""The ``simulate`` subcommand: flags, the progress bar, the table, JSON and the chart.

Role: turn the command line into a :class:`shardgate.simulate.config.SimConfig`, run the
policies (:func:`shardgate.simulate.run.simulate`) and print the comparison. ``add_parser``
plugs the subcommand into ``shardgate``'s parser; ``main`` runs it alone
(``python3 -m shardgate.simulate``). Exit codes: 0 done, 2 a bad flag or trace file.

Invariant: importing this module is cheap (argparse only), since ``shardgate --help`` builds
every subcommand's parser; the simulator itself is imported when the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

HELP = "Simulate a fleet and compare routing policies with the router's own policy code."


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``simulate`` to a ``shardgate`` subparsers object."""
    parser = subparsers.add_parser("simulate", help=HELP, description=HELP)
    _add_flags(parser)
    parser.set_defaults(func=run)
    return parser


def _add_flags(p: argparse.ArgumentParser) -> None:
    what = p.add_argument_group("policies")
    what.add_argument("--policy", help="the policy to simulate (default: the router's default policy)")
    what.add_argument("--compare", help="comma-separated policies, run on the same fleet and traffic")
    what.add_argument("--jobs", type=int, help="policies simulated at once, each in its own process "
                      "(default: one per CPU; 1 gives the steadiest decisions/s)")
    fleet = p.add_argument_group("fleet")
    fleet.add_argument("--workers", type=int, default=100, help="workers serving the model (default 100)")
    fleet.add_argument("--capacity", default="8",
                       help='concurrent requests per worker: N, or shares like "90%%:100,10%%:50" '
                            "(default 8)")
    fleet.add_argument("--queue-limit", default="none",
                       help="requests a worker queues beyond its capacity before refusing (503, retried "
                            "elsewhere): N, Nx (times its capacity) or none, as vLLM and SGLang by "
                            "default (default none)")
    fleet.add_argument("--weights", choices=("capacity", "equal"), default="capacity",
                       help="worker weights proportional to capacity, or all equal (default capacity)")
    fleet.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="router",
                       help="a router setting, as in the deployment file (repeatable), e.g. "
                            "--set balance_abs_threshold=8 --set cache_threshold=0.5")
    fleet.add_argument("--proxies", type=int, default=1, help="proxy processes; each request lands on "
                       "a random one (default 1)")
    traffic = p.add_argument_group("traffic")
    traffic.add_argument("--requests", type=int, default=10_000, help="requests in all (default 10000)")
    traffic.add_argument("--rate", type=float, help="Poisson arrivals per second (default: from --load)")
    traffic.add_argument("--load", type=float, default=0.7,
                         help="offered load as a share of the fleet's capacity, when --rate is not "
                              "given (default 0.7)")
    traffic.add_argument("--burst", help="SIZE@EVERY: SIZE requests at once every EVERY seconds "
                                         "(instead of Poisson)")
    traffic.add_argument("--trace", help="JSON lines: {t, prompt_tokens, output_tokens, priority?, "
                                         "session?, prefix?, prefix_tokens?} (instead of generated traffic)")
    traffic.add_argument("--prompt-tokens", default="lognormal:200:0.8",
                         help="tokens of each turn's new message: N, A-B, exp:MEAN, lognormal:MEAN[:SIGMA] "
                              "(default lognormal:200:0.8)")
    traffic.add_argument("--output-tokens", default="lognormal:200:0.8",
                         help="output tokens per request, same forms (default lognormal:200:0.8)")
    traffic.add_argument("--turns", default="1-6", help="turns per conversation, same forms (default 1-6)")
    traffic.add_argument("--think", type=float, default=2.0,
                         help="mean seconds between an answer and the next turn (default 2)")
    traffic.add_argument("--system-prompts", type=int, default=8,
                         help="shared system prompts conversations start with (default 8; 0: none)")
    traffic.add_argument("--system-tokens", type=int, default=512,
                         help="tokens per system prompt (default 512)")
    traffic.add_argument("--priorities", default="100%:0",
                         help='shares of priorities, e.g. "90%%:0,10%%:1" (higher is served first)')
    faults = p.add_argument_group("failure scenario")
    faults.add_argument("--fail", help="SHARE%%@START[+DURATION]: that share of workers dies at START "
                                       "seconds (and comes back after DURATION)")
    faults.add_argument("--slow", help="SHARE%%xFACTOR@START[+DURATION]: that share runs FACTOR times slower")
    faults.add_argument("--detect", type=float, default=1.0,
                        help="seconds until the router takes a dead worker out of rotation (default 1)")
    costs = p.add_argument_group("worker cost model (per sequence slot)")
    costs.add_argument("--overhead-ms", type=float, default=10.0, help="per request (default 10)")
    costs.add_argument("--prefill-us-per-token", type=float, default=50.0,
                       help="per uncached prompt token (default 50)")
    costs.add_argument("--cached-us-per-token", type=float, default=0.0,
                       help="per cached prompt token (default 0)")
    costs.add_argument("--decode-ms-per-token", type=float, default=20.0,
                       help="per output token (default 20)")
    costs.add_argument("--kv-cache-tokens", type=int, default=131_072,
                       help="prefix cache per worker, in tokens (default 131072)")
    out = p.add_argument_group("output")
    out.add_argument("--seed", type=int, default=1, help="same seed, same figures (default 1)")
    out.add_argument("--samples", type=int, default=100, help="load samples over the run (default 100)")
    out.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    out.add_argument("--plot", metavar="PNG", help="write a chart (needs the 'plot' extra: matplotlib)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar (shown only on a TTY)")


def config_of(args: argparse.Namespace) -> Any:
    from shardgate.simulate.config import SimConfig
    from shardgate.simulate.workers import CostModel

    return SimConfig(
        workers=args.workers, capacity=args.capacity, queue_limit=args.queue_limit, weights=args.weights,
        requests=args.requests, rate=args.rate, load=args.load, burst=args.burst, trace=args.trace,
        prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens, turns=args.turns,
        think=args.think, system_prompts=args.system_prompts, system_tokens=args.system_tokens,
        priorities=args.priorities, fail=args.fail, slow=args.slow, detect=args.detect,
        proxies=args.proxies, seed=args.seed, samples=args.samples, router=_pairs(args.router),
        costs=CostModel(overhead=args.overhead_ms / 1e3, prefill_per_token=args.prefill_us_per_token / 1e6,
                        cached_per_token=args.cached_us_per_token / 1e6,
                        decode_per_token=args.decode_ms_per_token / 1e3,
                        kv_cache_tokens=args.kv_cache_tokens))


def _pairs(items: list[str]) -> dict[str, str]:
    from shardgate.simulate.workload import SpecError

    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise SpecError(f"bad --set {item!r}: use NAME=VALUE")
        out[name.strip().replace("-", "_")] = value.strip()
    return out


class Bar:
    """A one-line progress bar on stderr, drawn only on a TTY and only once a run lasts > 1 s."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.shown = False

    def for_policy(self, policy: str) -> Callable[[int, int], None] | None:
        if not self.enabled:
            return None
        started = time.monotonic()
        last = [0.0]

        def update(done: int, total: int) -> None:
            now = time.monotonic()
            if done < total and (now - started < 1.0 or now - last[0] < 0.2):
                return
            last[0] = now
            filled = int(30 * done / max(1, total))
            sys.stderr.write(f"\r{policy:<24} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} requests")
            if done >= total:
                sys.stderr.write("\n" if self.shown or now - started >= 1.0 else "\r\033[K")
            sys.stderr.flush()
            self.shown = done < total

        return update


def run(args: argparse.Namespace) -> int:
    from proxy_workers.policies.registry import POLICIES
    from shardgate.simulate.run import default_jobs, simulate
    from shardgate.simulate.stats import table
    from shardgate.simulate.workload import SpecError
    from shm.settings import Settings

    names = [p.strip() for p in (args.compare or args.policy or Settings().policy).split(",") if p.strip()]
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        print(f"shardgate simulate: unknown policy {', '.join(unknown)}; "
              f"known: {', '.join(sorted(POLICIES))}", file=sys.stderr)
        return 2
    try:
        config = config_of(args)  # validated by simulate()
        started = time.perf_counter()
        jobs = args.jobs if args.jobs is not None else default_jobs(len(names))
        reports = simulate(config, names, Bar(not args.no_progress).for_policy, jobs)
        elapsed = time.perf_counter() - started
    except (SpecError, OSError) as exc:
        print(f"shardgate simulate: {exc}", file=sys.stderr)
        return 2
    if args.plot:
        from shardgate.simulate.plot import plot

        error = plot(reports, args.plot, describe(config, reports))
        if error:
            print(f"shardgate simulate: {error}", file=sys.stderr)
            return 2
    if args.json:
        import msgspec

        print(json.dumps({"config": msgspec.to_builtins(config), "seconds": round(elapsed, 2),
                          "reports": reports}))
        return 0
    print(describe(config, reports))
    print(table(reports))
    print(f"{elapsed:.1f} s; simulated {max(r['sim_seconds'] for r in reports):.1f} s"
          + (f"; chart: {args.plot}" if args.plot else ""))
    return 0


def describe(config: Any, reports: list[dict[str, Any]]) -> str:
    """One line: the fleet and the traffic, as run."""
    traffic = f"trace {config.trace}" if config.trace else (
        f"bursts {config.burst}" if config.burst else
        f"Poisson {reports[0]['offered_rate']:.0f}/s" if reports else "Poisson")
    scenario = "".join(f", {k} {v}" for k, v in (("fail", config.fail), ("slow", config.slow)) if v)
    return (f"{config.workers} workers (capacity {config.capacity}, queue {config.queue_limit}), "
            f"{reports[0]['requests'] if reports else config.requests} requests, {traffic}, "
            f"turns {config.turns}, seed {config.seed}{scenario}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardgate simulate", description=HELP)
    _add_flags(parser)
    return run(parser.parse_args(argv))
