"""The three data paths share one set of rules: the same failure moves the same counters.

Two failures are sent through each path: a worker that vanishes before answering (always
retried), and a worker that answers 429 (a retryable answer: retried within the retry budget,
then relayed as the worker gave it).

One router serves three models, one per path: ``m-http`` (http_regular), ``m-grpc``
(grpc_regular) and ``m-pd`` (http_pd, whose prefill worker is healthy). On each path the workers
that answer the client (the regular workers, or the decode workers) are real mock workers that
vanish mid-request before sending anything (``--drop-after 0``), while their health checks pass.
Each path's serving side uses ``consistent_hash`` with no routing key, so every pick is a
decision and a fallback (a random worker); the PD prefill side uses another policy so its
decisions are counted apart.

One request per path must then move exactly the same counters by the same amounts: a 502 in
OpenAI's shape, one request and one error, one retry (``max_tries`` 2: the second worker, never
the first again), two decisions and two fallbacks, one failure on each serving worker, and nothing
left in flight.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_openai_error, chat, free_port, get_json, http, set_worker, wait_for
from grpc_support import control

from shardgate import launch

POLICY = "consistent_hash"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    started: list[launch.Launched] = []

    def worker(model: str, *extra: str) -> launch.Launched:
        started.append(launch.mock_worker([model], *extra))
        return started[-1]

    try:
        http_workers = [worker("m-http", "--drop-after", "0") for _ in range(2)]
        grpc_workers = [worker("m-grpc", "--grpc", "--drop-after", "0") for _ in range(2)]
        prefill = worker("m-pd", "--role", "prefill")
        decode_workers = [worker("m-pd", "--role", "decode", "--drop-after", "0") for _ in range(2)]
        entries = ([{"url": w.url, "model": "m-http"} for w in http_workers]
                   + [{"url": w.url, "model": "m-grpc", "connection": "grpc"} for w in grpc_workers]
                   + [{"url": prefill.url, "model": "m-pd", "type": "prefill"}]
                   + [{"url": w.url, "model": "m-pd", "type": "decode"} for w in decode_workers])
        config = {"max_tries": 2, "policy": "round_robin", "workers": entries,
                  "models": {"m-http": {"policy": POLICY}, "m-grpc": {"policy": POLICY},
                             "m-pd": {"prefill_policy": "round_robin", "decode_policy": POLICY}}}
        path = Path(tmp_path_factory.mktemp("three-paths")) / "deploy.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        router = launch.router([], "--port", str(free_port()), "--proxies", "1", config=str(path))
        started.append(router)
        wait_for(lambda: get_json(router.url + "/readiness") is not None, what="router ready")
        yield {"router": router, "m-http": http_workers, "m-grpc": grpc_workers, "m-pd": decode_workers}
    finally:
        for process in reversed(started):
            process.stop()


def counters(router: launch.Launched, serving: list[launch.Launched]) -> dict[str, int]:
    """Every counter a failed attempt may move: router totals, the policy's decisions and
    fallbacks, and the serving workers' errors and in-flight gauges."""
    totals = get_json(router.url + "/stats")["totals"]
    out = {k: int(totals[k]) for k in ("requests", "errors", "rejected", "retries", "in_flight")}
    metrics = http("GET", router.url + "/metrics")[2].decode()
    for line in metrics.splitlines():
        for family in ("decisions", "fallbacks"):
            if line.startswith(f'shardgate_policy_{family}_total{{policy="{POLICY}"}}'):
                out[family] = int(float(line.rsplit(" ", 1)[1]))
    rows = {w["url"]: w for w in get_json(router.url + "/workers")["workers"]}
    for i, worker in enumerate(serving):
        out[f"worker{i}_errors"] = int(rows[worker.url]["errors"])
        out[f"worker{i}_in_flight"] = int(rows[worker.url]["in_flight"])
    return out


def moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in before}


def fail_once(fleet: dict[str, Any], model: str, expected_status: int = 502) -> dict[str, int]:
    router, serving = fleet["router"], fleet[model]
    before = counters(router, serving)
    status, _, body = http("POST", router.url + "/v1/chat/completions", chat(model, content=f"via {model}"))
    assert status == expected_status, body
    if expected_status == 502:
        assert_openai_error(body, "bad_gateway")

    def settled() -> dict[str, int] | None:
        after = counters(router, serving)
        return after if after["in_flight"] == 0 else None

    return moved(before, wait_for(settled, what=f"{model} request settled"))


EXPECTED = {"requests": 1, "errors": 1, "rejected": 0, "retries": 1, "in_flight": 0,
            "decisions": 2, "fallbacks": 2,
            "worker0_errors": 1, "worker0_in_flight": 0, "worker1_errors": 1, "worker1_in_flight": 0}


@pytest.mark.parametrize("model", ["m-http", "m-grpc", "m-pd"])
def test_a_worker_vanishing_before_its_answer_moves_the_same_counters_on_every_path(
        fleet: dict[str, Any], model: str) -> None:
    assert fail_once(fleet, model) == EXPECTED


def test_all_three_paths_agree(fleet: dict[str, Any]) -> None:
    seen = {model: fail_once(fleet, model) for model in ("m-http", "m-grpc", "m-pd")}
    assert seen["m-http"] == seen["m-grpc"] == seen["m-pd"], seen


def configure(fleet: dict[str, Any], model: str, **config: Any) -> None:
    for worker in fleet[model]:
        if model == "m-grpc":
            control(worker, "Configure", config)
        else:
            set_worker(worker, **config)


BUSY = {"requests": 1, "errors": 0, "rejected": 0, "retries": 1, "in_flight": 0,
        "decisions": 2, "fallbacks": 2,  # a 429 is "not now": no worker error
        "worker0_errors": 0, "worker0_in_flight": 0, "worker1_errors": 0, "worker1_in_flight": 0}


@pytest.mark.parametrize("model", ["m-http", "m-grpc", "m-pd"])
def test_a_busy_answer_is_retried_once_then_relayed_the_same_way_on_every_path(
        fleet: dict[str, Any], model: str) -> None:
    configure(fleet, model, drop_after=-1, fail_status=429)
    try:
        assert fail_once(fleet, model, expected_status=429) == BUSY
    finally:
        configure(fleet, model, drop_after=0, fail_status=0)
