"""The admin API and ``shardgate workers`` (issue 5): auth, SSRF refusals, add / remove /
re-weight / shards, one publish per change, survival across SIGHUP, and a drain that lets an open
stream finish. Real routers (two proxies, so "every proxy" means something) and mock workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, get_json, http, wait_for, worker_stats
from discovery_support import AUTH, TOKEN, Stream, routable, send_chats, wait_until, workers_of

from coordinator.discovery.urlcheck import address_problem, parse_cidrs, shape_problem


def admin_router(start_router, workers: list[str], *extra: str, token: str | None = TOKEN,
                 config: str | None = None):  # type: ignore[no-untyped-def]
    port = free_port()
    env = {"SHARDGATE_ADMIN_TOKEN": token} if token else {"SHARDGATE_ADMIN_TOKEN": ""}
    router = start_router(workers, "--admin-port", str(port), "--proxies", "2", *extra, env=env,
                          config=config)
    router.admin = f"http://127.0.0.1:{port}"
    return router


def admin(router, method: str, path: str, body: Any = None,
          headers: dict[str, str] | None = None) -> tuple[int, Any]:  # type: ignore[no-untyped-def]
    import json

    status, _, raw = http(method, router.admin + path, body, headers=AUTH if headers is None else headers)
    return status, json.loads(raw)


def test_admin_auth(start_worker, start_router) -> None:
    a = start_worker(["m1"])
    router = admin_router(start_router, [a.url])
    status, doc = admin(router, "GET", "/admin/workers", headers={})
    assert status == 401 and doc["error"]["code"] == "missing_token"
    status, doc = admin(router, "GET", "/admin/workers", headers={"Authorization": "Bearer wrong"})
    assert status == 401 and doc["error"]["code"] == "invalid_token"
    status, doc = admin(router, "GET", "/admin/workers", headers={"Authorization": f"Basic {TOKEN}"})
    assert status == 401
    status, doc = admin(router, "GET", "/admin/workers")
    assert status == 200 and [w["url"] for w in doc["workers"]] == [a.url]
    assert doc["workers"][0]["source"] == "file"
    # Liveness needs no token.
    assert http("GET", router.admin + "/health")[0] == 200


def test_admin_without_a_configured_token_refuses_everything(start_worker, start_router) -> None:
    a = start_worker(["m1"])
    router = admin_router(start_router, [a.url], token=None)
    status, doc = admin(router, "GET", "/admin/workers", headers={"Authorization": "Bearer anything"})
    assert status == 403 and "no token is configured" in doc["error"]["message"]
    status, _ = admin(router, "POST", "/admin/workers", {"url": a.url}, headers={})
    assert status == 403


def test_admin_token_from_a_file(start_worker, start_router, tmp_path: Path) -> None:
    a = start_worker(["m1"])
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    token_file.chmod(0o600)
    router = admin_router(start_router, [a.url], "--admin-token-file", str(token_file), token=None)
    assert admin(router, "GET", "/admin/workers", headers={"Authorization": "Bearer from-a-file"})[0] == 200
    assert admin(router, "GET", "/admin/workers")[0] == 401


SSRF_URLS = ["http://169.254.169.254", "http://169.254.169.254:80/", "file:///etc/passwd",
             "gopher://127.0.0.1:70", "http://[fd00:ec2::254]:80", "http://[::ffff:169.254.169.254]:80",
             "http://0.0.0.0:8000", "http://user:pw@127.0.0.1:8000", "http://224.0.0.1:80",
             "http://127.0.0.1:8000/v1/models", "ftp://127.0.0.1:21"]


def test_ssrf_urls_are_refused(start_worker, start_router) -> None:
    a = start_worker(["m1"])
    router = admin_router(start_router, [a.url])
    for url in SSRF_URLS:
        status, doc = admin(router, "POST", "/admin/workers", {"url": url, "model": "m1"})
        assert status == 400, (url, doc)
    assert list(workers_of(router)) == [a.url]


def test_cidr_allowlist_restricts_workers(start_worker, start_router) -> None:
    a = start_worker(["m1"])
    router = admin_router(start_router, [a.url], "--worker-cidrs", "10.0.0.0/8")
    status, doc = admin(router, "POST", "/admin/workers", {"url": "http://127.0.0.1:9", "model": "m1"})
    assert status == 400 and "outside worker_cidrs" in doc["error"]["message"]


def test_url_rules_without_a_network() -> None:
    import ipaddress

    assert shape_problem("gopher://x:70")[0]
    assert shape_problem("http://x:99999")[0]
    assert not shape_problem("https://worker.internal:8443")[0]
    cidrs = parse_cidrs("10.0.0.0/8, fd00::/8")
    ip = ipaddress.ip_address
    assert address_problem(ip("10.1.2.3"), cidrs) == ""
    assert "outside" in address_problem(ip("192.168.1.1"), cidrs)
    assert "link-local" in address_problem(ip("169.254.169.254"), ())
    assert "metadata" in address_problem(ip("100.100.100.200"), ())
    assert address_problem(ip("::1"), ()) == ""  # loopback is fine unless worker_cidrs says no
    with pytest.raises(ValueError, match="not a network"):
        parse_cidrs("10.0.0.0/33")


def test_add_reweight_remove_in_one_publish_each(start_worker, start_router) -> None:
    a, b = start_worker(["m1"]), start_worker(["m1"])
    router = admin_router(start_router, [a.url])
    status, doc = admin(router, "POST", "/admin/workers", {"url": b.url + "/", "model": "m1", "weight": 2})
    assert status == 201, doc
    assert doc["worker"]["url"] == b.url and doc["worker"]["source"] == "admin"
    generation = doc["generation"]
    # The answer comes after the publish: every proxy sees B from this generation on.
    for _ in range(6):
        assert get_json(router.url + "/stats")["snapshot"]["generation"] >= generation
        assert workers_of(router)[b.url]["weight"] == 2
    wait_for(lambda: routable(workers_of(router).get(b.url)), what="B to be routable")

    status, doc = admin(router, "POST", "/admin/workers/weight", {"url": b.url, "weight": 5})
    assert status == 200 and workers_of(router)[b.url]["weight"] == 5
    assert admin(router, "POST", "/admin/workers/weight", {"url": b.url, "weight": 0})[0] == 400
    unknown = {"url": "http://127.0.0.1:1", "weight": 2}
    assert admin(router, "POST", "/admin/workers/weight", unknown)[0] == 404
    assert admin(router, "POST", "/admin/workers", b"{nope")[0] == 400

    # Removing a worker the config file lists works too (it stays out until added again).
    status, doc = admin(router, "POST", "/admin/workers/remove", {"url": a.url})
    assert status == 200 and list(workers_of(router)) == [b.url]
    before = worker_stats(a)["requests"]
    assert send_chats(router, 4) == [200] * 4
    assert worker_stats(a)["requests"] == before


def test_admin_changes_survive_a_sighup_reload(start_worker, start_router, tmp_path: Path) -> None:
    a, b, c = start_worker(["m1"]), start_worker(["m1"]), start_worker(["m1"])
    config = tmp_path / "deploy.yaml"
    config.write_text(f"workers:\n  - url: {a.url}\n    model: m1\n")
    router = admin_router(start_router, [], "--config-watch-interval", "0", config=str(config))
    assert admin(router, "POST", "/admin/workers", {"url": b.url, "model": "m1"})[0] == 201
    assert admin(router, "POST", "/admin/workers/weight", {"url": a.url, "weight": 4})[0] == 200
    config.write_text(f"workers:\n  - url: {a.url}\n    model: m1\n  - url: {c.url}\n    model: m1\n")
    os.kill(router.pid, signal.SIGHUP)
    wait_for(lambda: set(workers_of(router)) == {a.url, b.url, c.url}, what="file + admin workers")
    assert workers_of(router)[a.url]["weight"] == 4  # the admin's weight still patches the file's A
    sources = {w["url"]: w["source"] for w in admin(router, "GET", "/admin/workers")[1]["workers"]}
    assert sources == {a.url: "file", b.url: "admin", c.url: "file"}


def test_drain_lets_an_open_stream_finish_then_the_worker_leaves(start_worker, start_router) -> None:
    slow = start_worker(["m1"], "--tps", "5", "--output-tokens", "15")
    fast = start_worker(["m1"])
    router = admin_router(start_router, [slow.url])
    stream = Stream(router.url)
    stream.start()
    assert stream.first.wait(15) and stream.error is None
    wait_for(lambda: worker_stats(slow)["in_flight"] == 1, what="the stream to be on the slow worker")
    assert admin(router, "POST", "/admin/workers", {"url": fast.url, "model": "m1"})[0] == 201

    status, doc = admin(router, "POST", "/admin/workers/drain", {"url": slow.url})
    assert status == 202, doc
    row = workers_of(router)[slow.url]
    assert row["draining"] and row["in_flight"] == 1
    # No new request reaches the draining worker; the open stream carries on.
    wait_for(lambda: routable(workers_of(router).get(fast.url)), what="the fast worker")
    assert send_chats(router, 5) == [200] * 5
    assert worker_stats(slow)["requests"] == 1
    assert any("draining" in n for n in get_json(router.url + "/workers")["notices"])

    stream.join(30)
    assert stream.error is None and stream.status == 200 and stream.complete, stream.body[-200:]
    wait_until(lambda: slow.url not in workers_of(router), what="the drained worker to leave")
    assert worker_stats(slow)["completed"] == 1 and worker_stats(slow)["aborted"] == 0


def test_drain_can_be_cancelled(start_worker, start_router) -> None:
    a, b = start_worker(["m1"]), start_worker(["m1"])
    router = admin_router(start_router, [a.url, b.url])
    assert admin(router, "POST", "/admin/workers/drain", {"url": a.url})[0] == 202
    assert workers_of(router)[a.url]["draining"]
    status, doc = admin(router, "POST", "/admin/workers/drain", {"url": a.url, "cancel": True})
    assert status == 200 and doc["cancelled"]
    assert not workers_of(router)[a.url]["draining"]


def test_shards_add_list_remove(start_worker, start_router) -> None:
    a, b, c = start_worker(["m1"]), start_worker(["m1"]), start_worker(["m1"])
    router = admin_router(start_router, [a.url, b.url, c.url])
    status, doc = admin(router, "POST", "/admin/shards", {"model": "m1", "shard": "s1",
                                                          "workers": [a.url, b.url]})
    assert status == 200, doc
    status, doc = admin(router, "POST", "/admin/shards", {"model": "m1", "shard": "s2", "workers": [c.url]})
    assert status == 200, doc
    status, doc = admin(router, "GET", "/admin/shards")
    assert doc["shards"] == {"m1": {"s1": sorted([a.url, b.url]), "s2": [c.url]}}
    assert workers_of(router)[a.url]["shard"] == "s1"
    assert admin(router, "POST", "/admin/shards", {"model": "m1", "shard": "s3",
                                                   "workers": ["http://127.0.0.1:1"]})[0] == 404
    status, doc = admin(router, "POST", "/admin/shards/remove", {"model": "m1", "shard": "s1"})
    assert status == 200 and sorted(doc["removed"]) == sorted([a.url, b.url])
    assert list(workers_of(router)) == [c.url]
    assert admin(router, "POST", "/admin/shards/remove", {"model": "m1", "shard": "s1"})[0] == 404


def workers_cli(router, *args: str, token: str = TOKEN) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDGATE_")}
    env.update({"SHARDGATE_ADMIN_URL": router.admin, "SHARDGATE_ADMIN_TOKEN": token})
    return subprocess.run([sys.executable, "-m", "shardgate.cli", "workers", *args], capture_output=True,
                          text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)


def test_workers_cli(start_worker, start_router) -> None:
    a, b = start_worker(["m1"]), start_worker(["m1"])
    router = admin_router(start_router, [a.url])
    result = workers_cli(router, "add", b.url, "--model", "m1", "--weight", "3", "--label", "zone=b")
    assert result.returncode == 0, result.stderr
    assert f"added {b.url}" in result.stdout
    result = workers_cli(router, "list")
    assert result.returncode == 0 and b.url in result.stdout and "admin" in result.stdout
    assert workers_cli(router, "weight", b.url, "7").returncode == 0
    assert workers_of(router)[b.url]["weight"] == 7
    result = workers_cli(router, "drain", b.url, "--wait")
    assert result.returncode == 0 and "drained and left" in result.stdout, result.stderr
    assert list(workers_of(router)) == [a.url]
    result = workers_cli(router, "remove", "http://127.0.0.1:1")
    assert result.returncode == 1 and "404" in result.stderr
    result = workers_cli(router, "list", token="wrong")
    assert result.returncode == 1 and "401" in result.stderr
    result = workers_cli(router, "add", "http://169.254.169.254:80")
    assert result.returncode == 1 and "link-local" in result.stderr
