"""Discovery sources (issue 5): the service registry, etcd, and the config file watched on disk.

Real processes throughout: ``shardgate registry`` and an ``etcd`` server on loopback, routers and
mock workers through the CLI. A fake registry (a tiny in-test HTTP server) is used only where a
real one cannot misbehave on demand: answering garbage. Unit tests of the pure parts come last.
"""

from __future__ import annotations

import asyncio
import http.server as http_server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import get_json, http, wait_for
from discovery_support import (
    Etcd,
    etcd,  # noqa: F401 - fixture
    needs_etcd,
    notices_of,
    registry,  # noqa: F401 - fixture
    routable,
    send_chats,
    wait_until,
    workers_of,
)

from coordinator.discovery.etcd import EtcdSource, WatchBroken, prefix_end
from coordinator.discovery.registry import RegistrySource
from coordinator.discovery.sources import Overrides, Source, merge, spec_from_entry
from coordinator.discovery.urlcheck import UrlChecker
from shm.schema import WorkerSpec
from shm.settings import Settings

FAST_REGISTRY = ("--registry-interval", "0.2", "--proxies", "2")


def register(reg, url: str, **fields) -> None:  # type: ignore[no-untyped-def]
    status, _, body = http("POST", reg.url + "/register", {"url": url, "model": "m1", **fields})
    assert status == 200, body


# -- the service registry ----------------------------------------------------------------------


def test_registry_sync_adds_workers_and_removes_them_only_after_the_grace_period(
        start_worker, start_router, registry) -> None:  # noqa: F811
    a, b = start_worker(["m1"]), start_worker(["m1"])
    register(registry, a.url)
    register(registry, b.url)
    grace = 2.0
    router = start_router([], "--registry-url", registry.url, "--registry-grace", str(grace), *FAST_REGISTRY)
    wait_for(lambda: routable(workers_of(router).get(a.url)) and routable(workers_of(router).get(b.url)),
             what="both registered workers to be routable")
    assert send_chats(router, 6) == [200] * 6
    assert workers_of(router)[a.url]["requests"] + workers_of(router)[b.url]["requests"] == 6

    status, _, _ = http("POST", registry.url + "/unregister", {"url": b.url})
    assert status == 200
    gone_from_registry = time.monotonic()
    wait_until(lambda: b.url not in workers_of(router), what="B to be removed after the grace period")
    # Removal can only come once the grace period has passed since B was last listed.
    assert time.monotonic() - gone_from_registry >= grace - 0.25
    assert list(workers_of(router)) == [a.url]
    assert send_chats(router, 3) == [200] * 3

    # A worker that re-registers comes back at the next poll.
    register(registry, b.url)
    wait_for(lambda: routable(workers_of(router).get(b.url)), what="B to come back")


def test_registry_heartbeats_keep_an_entry_and_expiry_drops_it(start_worker) -> None:
    from discovery_support import start_registry

    reg = start_registry(ttl=1.0)
    try:
        a = start_worker(["m1"])
        register(reg, a.url)
        assert http("POST", reg.url + "/heartbeat", {"url": a.url})[0] == 200
        assert [s["url"] for s in get_json(reg.url + "/services")["services"]] == [a.url]
        wait_for(lambda: get_json(reg.url + "/services")["services"] == [], what="the entry to expire")
        # An expired worker learns it must register again.
        assert http("POST", reg.url + "/heartbeat", {"url": a.url})[0] == 404
        assert http("POST", reg.url + "/register", {"url": "ftp://x:1"})[0] == 400
        assert http("POST", reg.url + "/register", b"not json")[0] == 400
    finally:
        reg.stop()


def test_registry_writes_can_require_a_token(tmp_path: Path) -> None:
    import sys

    from discovery_support import READY_REGISTRY

    from shardgate import launch

    token = tmp_path / "registry-token"
    token.write_text("reg-secret\n")
    reg = launch.Launched([sys.executable, "-m", "shardgate.cli", "registry", "--port", "0",
                           "--token-file", str(token)], READY_REGISTRY)
    try:
        entry = {"url": "http://127.0.0.1:9", "model": "m1"}
        assert http("POST", reg.url + "/register", entry)[0] == 401
        assert http("POST", reg.url + "/register", entry, headers={"Authorization": "Bearer nope"})[0] == 401
        right = {"Authorization": "Bearer reg-secret"}
        assert http("POST", reg.url + "/register", entry, headers=right)[0] == 200
        # Reads stay open: routers only read.
        assert [s["url"] for s in get_json(reg.url + "/services")["services"]] == [entry["url"]]
    finally:
        reg.stop()


def test_registry_outage_keeps_the_fleet_and_shows_the_error(start_worker, start_router,
                                                             registry) -> None:  # noqa: F811
    a = start_worker(["m1"])
    register(registry, a.url)
    router = start_router([], "--registry-url", registry.url, "--registry-grace", "0.5", *FAST_REGISTRY)
    wait_for(lambda: routable(workers_of(router).get(a.url)), what="A from the registry")
    registry.stop()
    wait_for(lambda: any(n.startswith("registry:") for n in notices_of(router)),
             what="the registry's error in /workers notices")
    failed_at = time.monotonic()
    assert "keeping its last 1 worker(s)" in " ".join(notices_of(router))
    # Well past the grace period (0.5 s) the worker stays: an outage is not a removal. (Letting
    # time pass is the point here, not a way to wait for something.)
    wait_for(lambda: time.monotonic() - failed_at > 2.0, what="four grace periods to pass")
    assert list(workers_of(router)) == [a.url]
    assert send_chats(router, 3) == [200] * 3


class FakeRegistry:
    """GET /services answers whatever ``self.body`` holds (bytes), so a test can serve garbage."""

    def __init__(self) -> None:
        fake = self
        self.body = b'{"services": []}'

        class Handler(http_server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = fake.body
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http_server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve(self, services: list[dict]) -> None:
        self.body = json.dumps({"services": services}).encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_registry() -> Iterator[FakeRegistry]:
    fake = FakeRegistry()
    yield fake
    fake.close()


def test_registry_garbage_keeps_the_last_good_membership(start_worker, start_router, fake_registry) -> None:
    a, b = start_worker(["m1"]), start_worker(["m1"])
    # One good entry, one pointing at the cloud metadata address: the bad one is left out.
    fake_registry.serve([{"url": a.url, "model": "m1"}, {"url": "http://169.254.169.254", "model": "m1"}])
    router = start_router([], "--registry-url", fake_registry.url, *FAST_REGISTRY)
    wait_for(lambda: routable(workers_of(router).get(a.url)), what="A from the registry")
    assert list(workers_of(router)) == [a.url]
    assert any("169.254.169.254" in n and "link-local" in n for n in notices_of(router))

    fake_registry.body = b"<html>502 Bad Gateway</html>"
    wait_for(lambda: any("not JSON" in n for n in notices_of(router)), what="the garbage to be reported")
    assert list(workers_of(router)) == [a.url]
    assert send_chats(router, 2) == [200, 200]
    fake_registry.body = b'{"services": "nope"}'
    wait_for(lambda: any("expected a list" in n for n in notices_of(router)), what="the wrong shape reported")
    assert list(workers_of(router)) == [a.url]

    # The seed's own entry shape (host + port, models list) works too, and the notice clears.
    host, port = b.url.removeprefix("http://").split(":")
    fake_registry.serve([{"url": a.url, "model": "m1"},
                         {"name": "b", "host": host, "port": int(port), "models": ["m1"],
                          "babysitter_url": f"http://{host}:{int(port) + 1}"}])
    wait_for(lambda: routable(workers_of(router).get(b.url)), what="B in the seed's format")
    wait_for(lambda: notices_of(router) == [], what="the notices to clear")


# -- etcd ---------------------------------------------------------------------------------------


PREFIX = "/shardgate-test/workers/"


def etcd_router(start_router, server: Etcd, *extra: str):  # type: ignore[no-untyped-def]
    return start_router([], "--etcd-endpoints", server.url, "--etcd-prefix", PREFIX, "--proxies", "2", *extra)


@needs_etcd
def test_etcd_adds_and_removes_workers(start_worker, start_router, etcd: Etcd) -> None:  # noqa: F811
    a, b = start_worker(["m1"]), start_worker(["m1"])
    etcd.put(PREFIX + "a", {"url": a.url, "model": "m1"})
    router = etcd_router(start_router, etcd)
    assert list(workers_of(router)) == [a.url]  # listed before the router said ready

    etcd.put(PREFIX + "b", {"url": b.url, "model": "m1", "weight": 3})
    wait_for(lambda: routable(workers_of(router).get(b.url)), what="B from the etcd watch")
    assert workers_of(router)[b.url]["weight"] == 3
    assert send_chats(router, 4) == [200] * 4

    etcd.delete(PREFIX + "a")
    wait_for(lambda: list(workers_of(router)) == [b.url], what="A to leave")
    # A key outside the prefix and a bad value are ignored; the bad one is reported.
    etcd.put("/elsewhere/x", {"url": a.url})
    etcd.put(PREFIX + "bad", "{not json")
    wait_for(lambda: any("key " + PREFIX + "bad" in n for n in notices_of(router)), what="the bad key")
    assert list(workers_of(router)) == [b.url]
    etcd.put(PREFIX + "b", {"url": b.url, "model": "m1", "weight": 3, "colour": "red"})
    wait_for(lambda: any("colour" in n for n in notices_of(router)), what="the unknown field reported")
    assert workers_of(router)[b.url]["weight"] == 3  # its last good value stays


@needs_etcd
def test_etcd_outage_keeps_the_fleet_and_a_restart_resumes_the_watch(start_worker, start_router,
                                                                     etcd: Etcd) -> None:  # noqa: F811
    a, b = start_worker(["m1"]), start_worker(["m1"])
    etcd.put(PREFIX + "a", {"url": a.url, "model": "m1"})
    router = etcd_router(start_router, etcd)
    wait_for(lambda: routable(workers_of(router).get(a.url)), what="A")

    etcd.kill()
    wait_for(lambda: any(n.startswith("etcd:") for n in notices_of(router)), what="the etcd error")
    assert list(workers_of(router)) == [a.url]
    assert send_chats(router, 2) == [200, 200]

    etcd.start()  # same data and ports: the router lists again and watches from there
    wait_for(lambda: not any(n.startswith("etcd:") for n in notices_of(router)), what="etcd back")
    etcd.put(PREFIX + "b", {"url": b.url, "model": "m1"})
    wait_for(lambda: routable(workers_of(router).get(b.url)), what="B after the restart")
    etcd.delete(PREFIX + "a")
    wait_for(lambda: list(workers_of(router)) == [b.url], what="A removed after the restart")


@needs_etcd
def test_etcd_relists_after_a_compacted_watch(etcd: Etcd) -> None:  # noqa: F811
    # In process, against the real server: a watch asked to start at a compacted revision is
    # cancelled by etcd with compact_revision, and the source answers by listing again.
    etcd.put(PREFIX + "a", {"url": "http://127.0.0.1:1", "model": "m1"})
    etcd.put(PREFIX + "a", {"url": "http://127.0.0.1:2", "model": "m1"})
    compacted = etcd.compact()
    settings = Settings(etcd_endpoints=etcd.url, etcd_prefix=PREFIX)
    changes: list[int] = []
    source = EtcdSource(settings, UrlChecker(), lambda: changes.append(1))

    async def scenario() -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            with pytest.raises(WatchBroken, match="compacted"):
                await source._watch(session, compacted - 2)  # as if we had listed long ago
            task = asyncio.ensure_future(source.run(session))
            while source.lists == 0:
                await asyncio.sleep(0.02)
            task.cancel()

    asyncio.run(scenario())
    assert [s.url for s in source.specs.values()] == ["http://127.0.0.1:2"]
    assert changes


# -- the config file ---------------------------------------------------------------------------


def test_config_file_change_is_applied_without_a_signal(start_worker, start_router, tmp_path: Path) -> None:
    a, b = start_worker(["m1"]), start_worker(["m1"])
    config = tmp_path / "deploy.yaml"
    config.write_text(f"workers:\n  - url: {a.url}\n    model: m1\n")
    router = start_router([], "--config-watch-interval", "0.2", config=str(config))
    assert list(workers_of(router)) == [a.url]
    replacement = tmp_path / "deploy.yaml.new"
    replacement.write_text(f"workers:\n  - url: {a.url}\n    model: m1\n  - url: {b.url}\n    model: m1\n")
    replacement.replace(config)  # an atomic rename, as deploy tools do
    wait_for(lambda: set(workers_of(router)) == {a.url, b.url}, what="the new file to be applied")
    # A half-written file is refused and the running list stays.
    config.write_text("workers:\n  - url: [unclosed\n")
    wait_for(lambda: "reload refused" in router.stderr_text(), what="the refused reload")
    assert set(workers_of(router)) == {a.url, b.url}


# -- pure parts --------------------------------------------------------------------------------


def test_registry_grace_logic_with_a_fake_clock() -> None:
    source = RegistrySource(Settings(registry_url="http://r:1", registry_grace=60), UrlChecker(),
                            lambda: None)
    a, b = WorkerSpec(url="http://a:1"), WorkerSpec(url="http://b:1")
    key = lambda s: (s.url, s.model, s.type)  # noqa: E731
    assert source.sync({key(a): a, key(b): b}, [], now=0.0)
    assert not source.sync({key(a): a}, [], now=30.0)       # B missing, within grace
    assert key(b) in source.specs
    assert not source.sync({key(a): a}, [], now=59.0)
    assert source.sync({key(a): a}, [], now=61.0)           # grace passed: B removed
    assert list(source.specs) == [key(a)]
    source.failed("down")                                   # an outage moves nothing
    assert list(source.specs) == [key(a)] and source.error == "down"


def test_entries_from_the_network_are_converted_and_checked() -> None:
    spec = spec_from_entry({"host": "10.0.0.5", "port": 8000, "models": ["m"], "metadata": {"zone": "a"},
                            "name": "x", "babysitter_url": "http://10.0.0.5:8001"}, strict=False)
    assert (spec.url, spec.model, spec.labels) == ("http://10.0.0.5:8000", "m", {"zone": "a"})
    with pytest.raises(ValueError, match="colour"):
        spec_from_entry({"url": "http://a:1", "colour": "red"}, strict=True)
    with pytest.raises(ValueError, match="not allowed"):
        spec_from_entry({"url": "file:///etc/passwd"}, strict=True)
    with pytest.raises(ValueError, match="JSON object"):
        spec_from_entry(["http://a:1"], strict=False)


def test_merge_precedence_and_admin_overrides() -> None:
    file, etcd_src, reg = Source("file"), Source("etcd"), Source("registry")
    w = WorkerSpec(url="http://w:1", model="m", weight=1)
    file.succeeded({("http://w:1", "m", "regular"): w})
    etcd_src.succeeded({("http://w:1", "m", "regular"): WorkerSpec(url="http://w:1", model="m", weight=5),
                        ("http://e:1", "m", "regular"): WorkerSpec(url="http://e:1", model="m")})
    reg.succeeded({("http://r:1", "m", "regular"): WorkerSpec(url="http://r:1", model="m")})
    overrides = Overrides()
    specs, origin = merge([reg, etcd_src, file], overrides)
    assert {s.url: s.weight for s in specs} == {"http://w:1": 1, "http://e:1": 1, "http://r:1": 1}
    assert origin[("http://w:1", "m", "regular")] == "file"  # the file beats etcd
    overrides.add(WorkerSpec(url="http://w:1", model="m", weight=7))
    overrides.remove(("http://r:1", "m", "regular"))
    overrides.patch(("http://e:1", "m", "regular"), weight=4, shard="s1")
    specs, origin = merge([reg, etcd_src, file], overrides)
    assert {s.url: (s.weight, s.shard) for s in specs} == {"http://w:1": (7, None), "http://e:1": (4, "s1")}
    assert origin[("http://w:1", "m", "regular")] == "admin"


def test_prefix_end() -> None:
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff") == b"\0"
