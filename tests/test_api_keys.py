"""Client API keys and workers' upstream keys (issue 11 item 5; docs/api-keys.md).

One router (``shardgate serve``, two proxies) in front of three workers, all real processes over
real sockets: a mock worker (``m1``, no key of its own), a recording backend (``m2``, upstream key
from an environment variable) that keeps every request's raw head, and a gRPC mock (``m3``,
upstream key from a file). Client keys come from ``SHARDGATE_API_KEY`` and from a key file with a
named key, a hashed one and a bare one. Clients are the official ``openai`` package where a client
would use it, and plain HTTP where the test needs the raw answer.

The last tests of the module read what the router leaves behind: its logs (every line the
coordinator and the proxies wrote), ``/workers``, ``/stats``, ``/metrics`` and the bytes of its
shared-memory segments; no key may appear in any of them.
"""

from __future__ import annotations

import hashlib
import json
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import openai
import psutil
import pytest
from conftest import assert_openai_error, chat, free_port, http, wait_for, worker_stats
from grpc_support import stats as grpc_stats

from coordinator.config import ConfigError, check_worker
from coordinator.discovery.sources import spec_from_entry
from shardgate import launch
from shm.keys import KeySourceError, client_keys, parse_key_lines
from shm.schema import Snapshot, WorkerSpec
from shm.segment import SHM_DIR, segment_name
from shm.settings import Settings

ENV_KEY = "sk-env-7f3a9c1e5b2d4f60"  # SHARDGATE_API_KEY
NAMED_KEY = "sk-team-a-91b2c3d4e5f6a7b8"  # team-a:KEY in the key file
HASHED_KEY = "sk-team-b-0a1b2c3d4e5f6071"  # team-b:sha256:HEX in the key file (the key is not)
BARE_KEY = "sk-bare-5566778899aabbcc"  # a bare line
WRONG_KEY = "sk-wrong-ffeeddccbbaa9988"
UPSTREAM_KEY = "up-http-1234abcd5678ef90"  # the recording backend's own key (environment)
GRPC_KEY = "up-grpc-a1b2c3d4e5f60718"  # the gRPC worker's own key (file)
CLIENT_KEYS = (ENV_KEY, NAMED_KEY, HASHED_KEY, BARE_KEY)
SECRETS = (*CLIENT_KEYS, WRONG_KEY, UPSTREAM_KEY, GRPC_KEY)


# -- a backend that records exactly what the router sends -----------------------------------------


class Recorder(socketserver.ThreadingTCPServer):
    """An HTTP/1.1 worker for model ``m2`` that keeps every request's raw head (keep-alive)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _RecorderHandler)
        self.heads: list[bytes] = []
        self.lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def chat_heads(self) -> list[bytes]:
        with self.lock:
            return [h for h in self.heads if h.startswith(b"POST /v1/chat/completions ")]


class _RecorderHandler(socketserver.StreamRequestHandler):
    server: Recorder

    def handle(self) -> None:
        while True:
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                line = self.rfile.readline(65537)
                if not line:
                    return
                head += line
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            self.rfile.read(length)
            with self.server.lock:
                self.server.heads.append(head)
            if head.startswith(b"GET /v1/models"):
                body = json.dumps({"object": "list", "data": [{"id": "m2", "object": "model"}]})
            else:
                body = json.dumps({"id": "rec", "object": "chat.completion", "created": 0, "model": "m2",
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": "ok"}}]})
            data = body.encode()
            self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(data), data))


# -- the fleet -------------------------------------------------------------------------------------


class Fleet:
    def __init__(self, tmp: Path) -> None:
        self.started: list[launch.Launched] = []
        self.recorder = Recorder()
        self.mock = self._start(launch.mock_worker(["m1"]))
        self.grpc = self._start(launch.mock_worker(["m3"], "--grpc"))
        hashed = hashlib.sha256(HASHED_KEY.encode()).hexdigest()
        keys = tmp / "keys.txt"
        keys.write_text(f"# client keys\nteam-a:{NAMED_KEY}\nteam-b:sha256:{hashed}\n\n{BARE_KEY}\n")
        grpc_key = tmp / "grpc.key"
        grpc_key.write_text(GRPC_KEY + "\n")
        config = tmp / "deploy.yaml"
        config.write_text(
            f"api_key_file: {keys}\nlog_level: debug\nworkers:\n"
            f"  - url: {self.mock.url}\n"
            f"  - {{url: {self.recorder.url}, model: m2, api_key_env: SG_TEST_UPSTREAM_KEY}}\n"
            f"  - {{url: {self.grpc.url}, model: m3, connection: grpc, api_key_file: {grpc_key}}}\n")
        self.ops_port = free_port()
        self.router = self._start(launch.router(
            [], "--config", str(config), "--port", str(free_port()), "--proxies", "2",
            env={"SHARDGATE_API_KEY": ENV_KEY, "SG_TEST_UPSTREAM_KEY": UPSTREAM_KEY}))
        self.url = self.router.url

    def _start(self, process: launch.Launched) -> launch.Launched:
        self.started.append(process)
        return process

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=15)

    def stop(self) -> None:
        for process in reversed(self.started):
            process.stop()
        self.recorder.shutdown()
        self.recorder.server_close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("keys"))
    try:
        yield fleet
    finally:
        fleet.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- clients ---------------------------------------------------------------------------------------


def test_openai_client_with_a_valid_key_chats_and_streams(fleet: Fleet) -> None:
    client = fleet.client(ENV_KEY)
    reply = client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    stream = client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}],
                                            stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text


@pytest.mark.parametrize("key", [NAMED_KEY, HASHED_KEY, BARE_KEY])
def test_every_key_of_the_key_file_is_accepted(fleet: Fleet, key: str) -> None:
    reply = fleet.client(key).chat.completions.create(model="m1", messages=[{"role": "user", "content": "x"}])
    assert reply.choices[0].message.content


def test_x_api_key_header_is_accepted(fleet: Fleet) -> None:
    status, _, body = http("POST", fleet.url + "/v1/chat/completions", chat("m1"),
                           headers={"X-API-Key": NAMED_KEY})
    assert status == 200, body


def test_wrong_key_is_an_authentication_error(fleet: Fleet) -> None:
    messages: Any = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.AuthenticationError) as caught:
        fleet.client(WRONG_KEY).chat.completions.create(model="m1", messages=messages)
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        list(fleet.client(WRONG_KEY).chat.completions.create(model="m1", messages=messages, stream=True))
    # The hashed entry's digest is not a key: sending it is refused like any wrong key.
    digest = hashlib.sha256(HASHED_KEY.encode()).hexdigest()
    with pytest.raises(openai.AuthenticationError):
        fleet.client(digest).models.list()


def test_missing_key_gets_401_in_openai_shape(fleet: Fleet) -> None:
    for headers in ({}, {"Authorization": f"Basic {NAMED_KEY}"}, {"Authorization": "Bearer "}):
        status, head, body = http("POST", fleet.url + "/v1/chat/completions", chat("m1"), headers=headers)
        assert status == 401, (headers, body)
        err = assert_openai_error(body, "invalid_api_key")
        assert err["type"] == "invalid_request_error"
        assert head["www-authenticate"].startswith("Bearer")


def test_probes_stay_open_and_the_back_office_needs_the_key(fleet: Fleet) -> None:
    for path in ("/health", "/readiness"):
        assert http("GET", fleet.url + path)[0] == 200, path
    for path in ("/workers", "/stats", "/metrics", "/routers", "/v1/models"):
        status, _, body = http("GET", fleet.url + path)
        assert status == 401, (path, body)
        assert http("GET", fleet.url + path, headers=bearer(NAMED_KEY))[0] == 200, path
    assert http("POST", fleet.url + "/route/explain", chat("m1"))[0] == 401
    assert http("POST", fleet.url + "/route/explain", chat("m1"), headers=bearer(ENV_KEY))[0] == 200


def test_a_refused_request_never_reaches_a_worker(fleet: Fleet) -> None:
    before = worker_stats(fleet.mock)["requests"]
    assert http("POST", fleet.url + "/v1/chat/completions", chat("m1"), headers=bearer(WRONG_KEY))[0] == 401
    assert worker_stats(fleet.mock)["requests"] == before


# -- what workers get ------------------------------------------------------------------------------


def test_worker_gets_its_upstream_key_not_the_clients(fleet: Fleet) -> None:
    seen = len(fleet.recorder.chat_heads())
    status, _, body = http("POST", fleet.url + "/v1/chat/completions", chat("m2"),
                           headers={**bearer(NAMED_KEY), "X-API-Key": NAMED_KEY})
    assert status == 200, body
    head = wait_for(lambda: fleet.recorder.chat_heads()[seen:], what="the recorder's request")[0]
    fields = [line.split(b":", 1) for line in head.split(b"\r\n")[1:] if line]
    auth = [value.strip() for name, value in fields if name.strip().lower() == b"authorization"]
    assert auth == [f"Bearer {UPSTREAM_KEY}".encode()], head
    assert NAMED_KEY.encode() not in head
    assert not [n for n, _ in fields if n.strip().lower() == b"x-api-key"], head


def test_worker_without_a_key_of_its_own_gets_no_client_key(fleet: Fleet) -> None:
    status, _, body = http("POST", fleet.url + "/v1/chat/completions", chat("m1"),
                           headers={**bearer(NAMED_KEY), "X-API-Key": NAMED_KEY})
    assert status == 200, body
    headers = worker_stats(fleet.mock)["last_headers"]
    assert "authorization" not in headers and "x-api-key" not in headers, headers
    assert "x-shardgate-key-name" not in headers, headers


def test_grpc_worker_gets_its_upstream_key_as_metadata(fleet: Fleet) -> None:
    reply = fleet.client(ENV_KEY).chat.completions.create(model="m3",
                                                          messages=[{"role": "user", "content": "x"}])
    assert reply.choices[0].message.content
    metadata = grpc_stats(fleet.grpc)["last_metadata"]
    assert metadata.get("authorization") == f"Bearer {GRPC_KEY}", metadata


def test_forward_authorization_passes_the_clients_key_on(start_worker, start_router) -> None:  # type: ignore[no-untyped-def]
    worker = start_worker(["m1"])
    router = start_router([worker.url], "--forward-authorization", "true",
                          env={"SHARDGATE_API_KEY": ENV_KEY})
    status, _, body = http("POST", router.url + "/v1/chat/completions", chat("m1"), headers=bearer(ENV_KEY))
    assert status == 200, body
    assert worker_stats(worker)["last_headers"].get("authorization") == f"Bearer {ENV_KEY}"


# -- where keys must never be ----------------------------------------------------------------------


def _segments(router: launch.Launched) -> list[Path]:
    """The router's shared-memory segments (its proxies name its instance on their command line)."""
    instances = set()
    for child in psutil.Process(router.pid).children():
        args = child.cmdline()
        if "--instance" in args:
            instances.add(args[args.index("--instance") + 1])
    assert len(instances) == 1, instances
    instance = instances.pop()
    paths = [SHM_DIR / segment_name(instance, kind).lstrip("/") for kind in ("snap", "board", "affinity")]
    assert all(p.exists() for p in paths), paths
    return paths


def test_keys_are_nowhere_in_shared_memory(fleet: Fleet) -> None:
    data = b"".join(p.read_bytes() for p in _segments(fleet.router))
    for key in SECRETS:
        assert key.encode() not in data, key
    # What is there instead: the digest of the environment's key, and the upstream key's reference.
    assert hashlib.sha256(ENV_KEY.encode()).hexdigest().encode() in data
    assert b"env:SG_TEST_UPSTREAM_KEY" in data


def test_keys_are_nowhere_in_the_back_office(fleet: Fleet) -> None:
    for path in ("/workers", "/stats", "/metrics", "/routers"):
        status, _, body = http("GET", fleet.url + path, headers=bearer(ENV_KEY))
        assert status == 200, path
        for key in SECRETS:
            assert key.encode() not in body, (path, key)


def test_keys_are_nowhere_in_the_logs(fleet: Fleet) -> None:
    # Traffic of every kind first: accepted, refused (a wrong key at debug level), proxied with
    # upstream keys over HTTP and gRPC.
    for key in (*CLIENT_KEYS, WRONG_KEY):
        http("POST", fleet.url + "/v1/chat/completions", chat("m2"), headers=bearer(key))
        http("POST", fleet.url + "/v1/chat/completions", chat("m3"), headers={"X-API-Key": key})
    logs = fleet.router.stderr_text() + "".join(fleet.router.stdout_lines)
    assert "client API keys on: 4 key(s)" in logs  # the logs are the router's, at debug level
    assert "401 for request" in logs
    for key in SECRETS:
        assert key not in logs, key
    assert "team-a" in logs  # keys go by their names


# -- configuration (no processes) ------------------------------------------------------------------


def test_key_file_formats(tmp_path: Path) -> None:
    hexdigest = hashlib.sha256(b"k2").hexdigest()
    keys = parse_key_lines(f"# c\n\nk0\nalice:k1\nbob:sha256:{hexdigest.upper()}\ncarol:a:b\n", "f")
    assert [k.name for k in keys] == [f"key-{hashlib.sha256(b'k0').hexdigest()[:8]}", "alice", "bob", "carol"]
    assert keys[1].sha256 == hashlib.sha256(b"k1").hexdigest()
    assert keys[2].sha256 == hexdigest
    assert keys[3].sha256 == hashlib.sha256(b"a:b").hexdigest()  # a key may hold a colon


@pytest.mark.parametrize("text", ["bob:sha256:sk-abc\n", "sk-has space\n", "na me:sk-x1\n", ":sk-x2\n"])
def test_malformed_key_lines_name_the_line_not_the_key(text: str) -> None:
    with pytest.raises(KeySourceError) as caught:
        parse_key_lines("ok-key\n" + text, "keys.txt")
    assert "keys.txt line 2" in str(caught.value)
    assert "sk-" not in str(caught.value)


def test_key_sources_that_would_open_or_confuse_the_router_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    with pytest.raises(KeySourceError, match="holds no key"):
        client_keys("", str(empty))
    with pytest.raises(KeySourceError, match="cannot read"):
        client_keys("", str(tmp_path / "missing"))
    twice = tmp_path / "twice"
    twice.write_text("a:same-key\nb:same-key\n")
    with pytest.raises(KeySourceError, match="same key"):
        client_keys("", str(twice))
    assert client_keys("", "") == ()


def test_published_snapshot_never_carries_the_key_in_clear() -> None:
    from shm.snapshot import SnapshotWriter

    writer = SnapshotWriter.__new__(SnapshotWriter)  # publish checks before it touches memory
    with pytest.raises(ValueError, match="in clear"):
        writer.publish(Snapshot(settings=Settings(api_key=ENV_KEY)))


def test_a_worker_key_is_never_written_in_the_config(tmp_path: Path) -> None:
    config = tmp_path / "deploy.yaml"
    config.write_text("workers:\n  - {url: http://127.0.0.1:9, model: m, api_key: sk-literal}\n")
    from coordinator.config import load_config
    from shardgate.cli import build_parser

    args = build_parser().parse_args(["check-config", str(config)])
    args.config = str(config)
    with pytest.raises(ConfigError, match="api_key_env") as caught:
        load_config(args, environ={})
    assert "sk-literal" not in str(caught.value)


def test_only_the_operators_sources_may_name_an_upstream_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SG_TEST_SOME_SECRET", "s3cret-value")
    spec = WorkerSpec(url="http://127.0.0.1:9", api_key_env="SG_TEST_SOME_SECRET")
    assert check_worker(spec, "file", upstream_keys=True).api_key_env == "SG_TEST_SOME_SECRET"
    with pytest.raises(ConfigError, match="only be set in the config file"):
        check_worker(spec, "admin")  # the admin API's path
    for strict in (True, False):  # etcd, registry
        with pytest.raises(ValueError, match="only be set in the config file"):
            spec_from_entry({"url": "http://127.0.0.1:9", "api_key_file": "/etc/hostname"}, strict)
    missing = WorkerSpec(url="http://127.0.0.1:9", api_key_env="SG_TEST_NOT_SET")
    with pytest.raises(ConfigError, match="SG_TEST_NOT_SET is empty or not set"):
        check_worker(missing, "file", upstream_keys=True)


def test_snapshot_key_fields_round_trip() -> None:
    from shm.schema import ClientKey, encode_snapshot, snapshot_decoder

    snap = Snapshot(client_keys=(ClientKey(name="a", sha256="00" * 32),))
    assert snapshot_decoder().decode(encode_snapshot(snap)).client_keys == snap.client_keys
    assert msgspec.msgpack.decode(encode_snapshot(Snapshot()), type=dict).get("client_keys") == []
