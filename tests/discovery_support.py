"""Helpers for the discovery and health tests (issue 5): a real etcd, a real registry, streams.

Everything runs as real processes on loopback: ``etcd`` (Debian's etcd-server, which .ci/run
installs) on two free ports with a temporary data directory, and ``shardgate registry`` through
the CLI. Nothing here sleeps to synchronise; callers poll with ``conftest.wait_for``.
"""

from __future__ import annotations

import base64
import http.client as http_client
import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import free_port, http, wait_for

from shardgate import launch

ETCD = shutil.which("etcd")
needs_etcd = pytest.mark.skipif(ETCD is None, reason="etcd is not installed (apt-get install etcd-server; "
                                                     ".ci/run does it)")
READY_REGISTRY = re.compile(r"registry ready on (http://\S+)")
TOKEN = "test-admin-token-1234"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class Etcd:
    """One etcd member on loopback; ``kill`` and ``start`` again keep its ports and data."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.client_port, self.peer_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"etcd-{self.client_port}.log"
        self.start()

    def start(self) -> None:
        assert ETCD is not None
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [ETCD, "--name", "test", "--data-dir", str(self.data_dir),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"test={peer}", "--log-level", "error", "--logger", "zap"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        wait_for(self._ready, timeout=30, what="etcd to answer")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"etcd exited: {self.log.read_text()[-2000:]}")
        try:
            return http("POST", self.url + "/v3/kv/range", {"key": b64("x")}, timeout=2)[0] == 200
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        status, _, raw = http("POST", self.url + path, body)
        assert status == 200, (path, status, raw)
        return json.loads(raw)

    def put(self, key: str, value: Any) -> int:
        text = value if isinstance(value, str) else json.dumps(value)
        return int(self.call("/v3/kv/put", {"key": b64(key), "value": b64(text)})["header"]["revision"])

    def delete(self, key: str) -> None:
        self.call("/v3/kv/deleterange", {"key": b64(key)})

    def compact(self) -> int:
        revision = int(self.call("/v3/kv/range", {"key": b64("x")})["header"]["revision"])
        self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Etcd]:
    server = Etcd(tmp_path / "etcd-data")
    yield server
    server.kill()


def start_registry(ttl: float = 30.0) -> launch.Launched:
    argv = [sys.executable, "-m", "shardgate.cli", "registry", "--port", "0", "--ttl", str(ttl)]
    return launch.Launched(argv, READY_REGISTRY)


@pytest.fixture
def registry() -> Iterator[launch.Launched]:
    server = start_registry()
    yield server
    server.stop()


def workers_of(router: launch.Launched) -> dict[str, dict[str, Any]]:
    status, _, body = http("GET", router.url + "/workers")
    assert status == 200, body
    return {w["url"]: w for w in json.loads(body)["workers"]}


def notices_of(router: launch.Launched) -> list[str]:
    return json.loads(http("GET", router.url + "/workers")[2])["notices"]


def routable(row: dict[str, Any] | None) -> bool:
    return bool(row) and row["healthy"] and not row["draining"]  # type: ignore[index]


def send_chats(router: launch.Launched, n: int, model: str = "m1") -> list[int]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return [http("POST", router.url + "/v1/chat/completions", body)[0] for _ in range(n)]


class Stream(threading.Thread):
    """A streamed chat over http.client; ``first`` is set at the first chunk, ``body`` holds all."""

    def __init__(self, url: str, model: str = "m1") -> None:
        super().__init__(daemon=True)
        self.url = url
        self.model = model
        self.first = threading.Event()
        self.body = b""
        self.status = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        parts = urlsplit(self.url)
        conn = http_client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        try:
            payload = {"model": self.model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            conn.request("POST", "/v1/chat/completions", json.dumps(payload),
                         {"content-type": "application/json"})
            resp = conn.getresponse()
            self.status = resp.status
            while chunk := resp.read1(65536):
                self.body += chunk
                self.first.set()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.first.set()
            conn.close()

    @property
    def complete(self) -> bool:
        return b"data: [DONE]" in self.body


def wait_until(predicate: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    """``wait_for`` with a longer default, for multi-second intervals (grace periods, ejection)."""
    return wait_for(predicate, timeout=timeout, what=what)
