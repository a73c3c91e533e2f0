"""The ops listener: the back office on a port of its own (issue 11 item 6; docs/api-keys.md).

Real routers (two proxies, so both bind the ops port with SO_REUSEPORT) in front of a real mock
worker. With ``ops_port`` set, the ops port serves ``/workers``, ``/stats``, ``/metrics``,
``/routers``, ``/route/explain`` and the probes, never proxies anything, and needs no API key;
the data port refuses the back office (404) and keeps ``/health``. Without it, the back office
stays on the data port, behind the API key when keys are on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import assert_openai_error, chat, free_port, http, wait_for, worker_stats

from shardgate import launch

KEY = "sk-ops-test-4c5d6e7f8091a2b3"
BACK_OFFICE = ("/workers", "/stats", "/metrics", "/routers")


class Fleet:
    def __init__(self) -> None:
        self.worker = launch.mock_worker(["m1"])
        self.ops_port = free_port()
        self.router = launch.router([self.worker.url], "--port", str(free_port()), "--proxies", "2",
                                    "--ops-port", str(self.ops_port))
        self.url = self.router.url
        self.ops = f"http://127.0.0.1:{self.ops_port}"

    def stop(self) -> None:
        self.router.stop()
        self.worker.stop()


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    fleet = Fleet()
    try:
        yield fleet
    finally:
        fleet.stop()


def test_ops_port_serves_the_back_office(fleet: Fleet) -> None:
    status, head, body = http("GET", fleet.ops + "/metrics")
    assert status == 200, body
    assert head["content-type"].startswith("text/plain")
    assert b"shardgate_" in body
    workers = json.loads(http("GET", fleet.ops + "/workers")[2])["workers"]
    assert [w["url"] for w in workers] == [fleet.worker.url]
    for path in ("/stats", "/routers", "/health", "/readiness"):
        assert http("GET", fleet.ops + path)[0] == 200, path
    status, _, body = http("POST", fleet.ops + "/route/explain", chat("m1"))
    assert status == 200 and json.loads(body)["worker"] == fleet.worker.url


def test_data_port_refuses_the_back_office_and_keeps_probes(fleet: Fleet) -> None:
    for path in BACK_OFFICE:
        status, _, body = http("GET", fleet.url + path)
        assert status == 404, (path, body)
        assert_openai_error(body, "not_found")
    assert http("POST", fleet.url + "/route/explain", chat("m1"))[0] == 404
    for path in ("/health", "/readiness", "/v1/models"):
        assert http("GET", fleet.url + path)[0] == 200, path
    status, _, body = http("POST", fleet.url + "/v1/chat/completions", chat("m1"))
    assert status == 200, body


def test_ops_port_never_proxies(fleet: Fleet) -> None:
    before = worker_stats(fleet.worker)["requests"]
    for method, path, body in (("POST", "/v1/chat/completions", chat("m1")), ("GET", "/v1/models", None),
                               ("POST", "/workers/../v1/chat/completions", chat("m1")),
                               ("GET", "/metrics/%2e%2e/workers", None)):
        status, _, answer = http(method, fleet.ops + path, body)
        assert status == 404, (path, answer)
        assert_openai_error(answer, "not_found")
    assert worker_stats(fleet.worker)["requests"] == before


def test_ops_figures_cover_the_data_port(fleet: Fleet) -> None:
    def requests() -> int:
        return int(json.loads(http("GET", fleet.ops + "/stats")[2])["totals"]["requests"])

    before = requests()
    assert http("POST", fleet.url + "/v1/chat/completions", chat("m1"))[0] == 200
    wait_for(lambda: requests() == before + 1, what="the request counted on the ops port")


def test_with_keys_the_ops_port_needs_none_and_the_data_port_hides_the_back_office(
        start_worker, start_router) -> None:  # type: ignore[no-untyped-def]
    worker = start_worker(["m1"])
    ops = free_port()
    router = start_router([worker.url], "--ops-port", str(ops), env={"SHARDGATE_API_KEY": KEY})
    assert http("GET", f"http://127.0.0.1:{ops}/metrics")[0] == 200
    assert http("GET", f"http://127.0.0.1:{ops}/workers")[0] == 200
    assert http("GET", router.url + "/workers")[0] == 401  # the key first: nothing said without it
    assert http("GET", router.url + "/workers", headers={"Authorization": f"Bearer {KEY}"})[0] == 404
    assert http("GET", router.url + "/health")[0] == 200


def test_without_an_ops_port_the_back_office_stays_on_the_data_port(
        start_worker, start_router) -> None:  # type: ignore[no-untyped-def]
    worker = start_worker(["m1"])
    router = start_router([worker.url])
    for path in BACK_OFFICE:
        assert http("GET", router.url + path)[0] == 200, path


@pytest.mark.parametrize("clash", ["port", "admin_port"])
def test_ops_port_must_have_a_port_of_its_own(tmp_path: Path, clash: str) -> None:
    config = tmp_path / "deploy.yaml"
    config.write_text(f"port: 18080\nadmin_port: 18081\nops_port: {18080 if clash == 'port' else 18081}\n"
                      "workers: [{url: http://127.0.0.1:9, model: m}]\n")
    done = subprocess.run([sys.executable, "-m", "shardgate.cli", "check-config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert f"ops_port: must differ from {clash}" in done.stderr
