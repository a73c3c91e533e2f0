"""``shardgate simulate`` checks itself: against theory, against itself, and against the real router.

- Known properties on the production policy code: round_robin spreads equal requests perfectly
  evenly; power_of_two's fullest worker holds far fewer requests than random's (balls into bins:
  ~log n / log log n above the mean against ~log log n); least_connections beats random on tail
  latency under load; cache_aware finds the prefixes a multi-turn workload shares.
- Reproducibility: the same seed gives the same figures (decisions/s excepted: wall clock).
- A failure scenario conserves requests: each one completes, fails mid-stream or is rejected,
  and the dead workers receive nothing once the router has taken them out.
- One trace replayed through ``shardgate serve`` with mock workers and through the simulator
  gives the same per-worker request counts for deterministic policies (round_robin: the same
  counts up to the random start each proxy draws; consistent_hash: the same count per URL,
  since the ring is built from the worker URLs).

Small fleets only: every simulation here takes well under a second.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import get_json, http, wait_for, worker_row

from shardgate import launch
from shardgate.simulate.config import SimConfig
from shardgate.simulate.run import simulate
from shardgate.simulate.workload import MODEL, SpecError, Traced, read_trace, write_trace

ROOT = Path(__file__).resolve().parents[1]
NOT_REPRODUCIBLE = ("decisions_per_s", "pick_us_mean", "wall_seconds", "cpu_seconds")


def run_one(policy: str, **config: Any) -> dict[str, Any]:
    return simulate(SimConfig(**config), [policy])[0]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardgate.simulate", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, stdin=subprocess.DEVNULL)


def test_round_robin_is_perfectly_even_on_equal_costs() -> None:
    report = run_one("round_robin", workers=10, requests=1000, turns="1", prompt_tokens="100",
                     output_tokens="100", queue_limit="none")
    per = report["requests_per_worker"]
    assert per["by_slot"] == [100] * 10 and per["cv"] == 0.0
    assert report["completed"] == 1000 and report["rejected"] == 0


def test_power_of_two_max_load_far_below_random() -> None:
    # Nothing finishes before the last arrival (40 s answers, 2 s of arrivals): the loads are
    # exactly balls in bins. 2,000 balls in 100 bins: random's fullest ~mean + sqrt(2 mean ln n)
    # (~+13), two choices' ~mean + ln ln n / ln 2 (~+2).
    common: dict[str, Any] = dict(workers=100, requests=2000, capacity="1000", queue_limit="none", turns="1",
                                  rate=1000.0, prompt_tokens="100", output_tokens="2000", system_prompts=0,
                                  seed=3)
    random_, p2c = simulate(SimConfig(**common), ["random", "power_of_two"])
    mean = 20
    excess_random = random_["requests_per_worker"]["max"] - mean
    excess_p2c = p2c["requests_per_worker"]["max"] - mean
    assert excess_random >= 6, random_["requests_per_worker"]
    assert excess_p2c * 3 <= excess_random, (p2c["requests_per_worker"], random_["requests_per_worker"])
    assert p2c["load"]["peak"] < random_["load"]["peak"]


def test_least_connections_beats_random_on_tail_latency() -> None:
    random_, least = simulate(SimConfig(workers=20, requests=4000, load=0.85, seed=3),
                              ["random", "least_connections"])
    assert least["ttft_s"]["p99"] * 4 < random_["ttft_s"]["p99"], (least["ttft_s"], random_["ttft_s"])
    assert least["e2e_s"]["p99"] < random_["e2e_s"]["p99"]
    assert least["load"]["cv"] < random_["load"]["cv"]
    assert least["queued"] < random_["queued"]


def test_cache_aware_finds_shared_prefixes() -> None:
    config = SimConfig(workers=20, requests=3000, load=0.5, turns="3-6", seed=5)
    rr, cache = simulate(config, ["round_robin", "cache_aware"])
    assert cache["prefix_cache_hit_rate"] > rr["prefix_cache_hit_rate"] + 0.2, (rr, cache)


def strip(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in NOT_REPRODUCIBLE}


def test_same_seed_same_figures() -> None:
    args = ("--workers", "30", "--requests", "1500", "--compare",
            "round_robin,power_of_two,least_connections,cache_aware,session_affinity,least_latency",
            "--fail", "10%@5+10", "--json")
    first, second, other = cli(*args, "--seed", "7"), cli(*args, "--seed", "7"), cli(*args, "--seed", "8")
    for run in (first, second, other):
        assert run.returncode == 0, run.stderr
        assert run.stderr == ""  # no progress bar without a TTY
    a, b, c = (json.loads(r.stdout)["reports"] for r in (first, second, other))
    assert [strip(r) for r in a] == [strip(r) for r in b]
    assert [strip(r) for r in a] != [strip(r) for r in c]


def test_failure_scenario_conserves_requests_and_drains_dead_workers() -> None:
    report = run_one("least_connections", workers=20, requests=3000, load=0.8, fail="25%@10", detect=1.0,
                     seed=2)
    assert report["completed"] + report["failed"] + report["rejected"] == 3000
    assert report["failed"] > 0 and report["retries"] > 0
    # The dead workers (chosen from the seed) got requests only until the router saw them die.
    before = run_one("least_connections", workers=20, requests=3000, load=0.8, seed=2)
    dead = [i for i, n in enumerate(report["requests_per_worker"]["by_slot"])
            if n < before["requests_per_worker"]["by_slot"][i] / 2]
    assert len(dead) == 5, report["requests_per_worker"]["by_slot"]


def test_slow_workers_raise_latency() -> None:
    base = dict(workers=20, requests=2000, load=0.6, seed=4)
    normal = run_one("round_robin", **base)
    slowed = run_one("round_robin", **base, slow="50%x4@0")
    assert slowed["e2e_s"]["p50"] > normal["e2e_s"]["p50"] * 1.5


def test_bad_specs_exit_2() -> None:
    for args in (("--capacity", "90%:100,20%:50"), ("--fail", "10"), ("--prompt-tokens", "zipf:3"),
                 ("--policy", "nope"), ("--trace", "/nonexistent.jsonl")):
        run = cli("--workers", "4", "--requests", "10", *args)
        assert run.returncode == 2, (args, run.stdout, run.stderr)
        assert run.stderr.startswith("shardgate simulate: "), run.stderr
    with pytest.raises(SpecError):
        SimConfig(capacity="0").validate()


def test_table_and_chart(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "compare.png"
    run = cli("--workers", "10", "--requests", "300", "--compare", "round_robin,random", "--plot", str(png))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[1].split()[:3] == ["policy", "max/mean", "p99/p50"]
    assert [line.split()[0] for line in lines[3:5]] == ["round_robin", "random"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# the same trace through the real router and through the simulator


def trace_lines(n: int) -> list[dict[str, Any]]:
    # Far apart in time: neither the router nor the simulator has two requests in flight at once.
    return [{"t": 100.0 * i, "prompt_tokens": 40 + 5 * i, "output_tokens": 4, "session": f"s{i % 7}"}
            for i in range(n)]


def replay(router: launch.Launched, trace: Path) -> None:
    """Send the simulator's own requests (same bodies, same session header), one at a time."""
    workload = Traced(read_trace(trace), None)
    for t in workload.arrival_times():
        req = workload.make(t)
        headers = {name.decode(): value.decode() for name, value in req.headers}
        status, _, body = http("POST", router.url + "/v1/chat/completions", req.body, headers)
        assert status == 200, body


@pytest.mark.parametrize("policy", ["round_robin", "consistent_hash"])
def test_trace_replay_matches_the_real_router(policy: str, tmp_path: Path,
                                              start_worker: Callable[..., launch.Launched],
                                              start_router: Callable[..., launch.Launched]) -> None:
    trace = tmp_path / "trace.jsonl"
    write_trace(trace, trace_lines(20))
    workers = [start_worker([MODEL]) for _ in range(3)]
    urls = [w.url for w in workers]
    router = start_router(urls, "--policy", policy)
    wait_for(lambda: http("GET", router.url + "/readiness")[0] == 200, what="the model discovered")
    replay(router, trace)
    real = {url: worker_row(router, url)["requests"] for url in urls}
    assert sum(real.values()) == 20, get_json(router.url + "/workers")

    report = run_one(policy, workers=3, urls=urls, trace=str(trace), capacity="4")
    simulated = dict(zip(urls, report["requests_per_worker"]["by_slot"], strict=True))
    assert report["completed"] == 20
    if policy == "round_robin":  # each proxy starts its turn at a random worker
        assert sorted(simulated.values()) == sorted(real.values()) == [6, 7, 7]
    else:
        assert simulated == real


def test_parallel_runs_give_the_same_figures() -> None:
    config = SimConfig(workers=12, requests=600, seed=9)
    policies = ["round_robin", "power_of_two", "least_connections"]
    one = simulate(config, policies, jobs=1)
    two = simulate(config, policies, jobs=2)
    assert [strip(r) for r in one] == [strip(r) for r in two]


def test_router_settings_reach_the_policies() -> None:
    # sglang's absolute balance threshold (64 in flight) lets cache_aware pile a system prompt's
    # conversations onto one 8-slot worker; the router's default (4) stops the herd.
    sglang, default = (simulate(SimConfig(workers=40, requests=3000, seed=5, router=router),
                                ["cache_aware"])[0] for router in ({"balance_abs_threshold": "64"}, {}))
    assert default["ttft_s"]["p99"] * 4 < sglang["ttft_s"]["p99"], (default["ttft_s"], sglang["ttft_s"])
    assert default["load"]["cv"] < sglang["load"]["cv"]
    run = cli("--workers", "4", "--requests", "10", "--set", "cache_threshold=2")
    assert run.returncode == 2 and "cache_threshold" in run.stderr, run.stderr


def test_priorities_are_served_first() -> None:
    report = run_one("random", workers=20, requests=3000, load=0.95, priorities="80%:0,20%:1", seed=2)
    by_priority = report["ttft_p99_s_by_priority"]
    assert by_priority["1"] * 2 < by_priority["0"], by_priority
