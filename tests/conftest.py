"""Shared fixtures: real mock workers and real routers, started through the real CLI.

Every process is started by :mod:`shardgate.launch` in its own process group and stopped (group
SIGTERM, then SIGKILL) when the test ends, so no test leaves a proxy behind.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shardgate import launch

DEADLINE = 15.0


class FakeClock:
    """A clock the test moves by hand (``advance``), injected where code takes ``clock=``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def raw_chat_request(url: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """A POST /v1/chat/completions for ``url``'s host with ``Connection: close``, as raw bytes."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}:{port}\r\n"
            f"content-type: application/json\r\n{extra}content-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
         timeout: float = DEADLINE) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request; returns (status, lower-cased headers, body) for any status."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and "content-type" not in {k.lower() for k in (headers or {})}:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def get_json(url: str) -> Any:
    status, _, body = http("GET", url)
    assert status == 200, (url, status, body)
    return json.loads(body)


def worker_row(router: launch.Launched, url: str) -> dict[str, Any]:
    """The router's ``/workers`` row of the worker at ``url``."""
    rows = [w for w in get_json(router.url + "/workers")["workers"] if w["url"] == url]
    assert rows, url
    return rows[0]


def assert_openai_error(body: bytes, code: str | None = None) -> dict:
    """``body`` is OpenAI's error shape (with ``code`` if given); returns the error object."""
    doc = json.loads(body)
    assert set(doc) == {"error"}, doc
    err = doc["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    if code is not None:
        assert err["code"] == code, err
    return err


def wait_for(predicate: Callable[[], Any], timeout: float = DEADLINE, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def chat(model: str | None = "m1", content: str = "hello", stream: bool = False, **extra: Any) -> dict:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": content}], "stream": stream, **extra}
    if model is not None:
        body["model"] = model
    return body



class Stream(threading.Thread):
    """A streamed chat completion on its own raw connection, read until the server closes it.

    ``first_event`` is set once the first SSE ``data:`` line arrived; ``data`` holds every byte
    received; ``error`` the exception that ended the read, if any.
    """

    def __init__(self, url: str, model: str = "m1", headers: dict[str, str] | None = None) -> None:
        super().__init__(daemon=True)
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        self.request = raw_chat_request(url, json.dumps(chat(model, stream=True)).encode(), headers)
        self.sock = socket.create_connection((host, int(port)), timeout=120)
        self.data = b""
        self.error: BaseException | None = None
        self.first_event = threading.Event()

    def run(self) -> None:
        try:
            self.sock.sendall(self.request)
            while chunk := self.sock.recv(65536):
                self.data += chunk
                if b"data: " in self.data:
                    self.first_event.set()
        except OSError as exc:
            self.error = exc
        finally:
            self.sock.close()

    def wait_first_event(self) -> None:
        wait_for(lambda: self.first_event.is_set() or not self.is_alive(), what="the first SSE event")
        assert self.first_event.is_set(), (self.data, self.error)

    def finish(self, timeout: float) -> None:
        self.join(timeout)
        assert not self.is_alive(), f"stream still open after {timeout}s: {self.data[-200:]!r}"

    @property
    def complete(self) -> bool:
        """The SSE stream ended with [DONE] and a proper end of the chunked body."""
        return b"data: [DONE]" in self.data and self.data.endswith(b"0\r\n\r\n")

    @property
    def worker(self) -> str:
        """The mock worker that answered (its X-Mock-Worker header)."""
        match = re.search(rb"(?im)^x-mock-worker: *(\S+)", self.data)
        assert match, self.data
        return match.group(1).decode()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


@pytest.fixture
def start_worker() -> Iterator[Callable[..., launch.Launched]]:
    """Start a mock worker: ``start_worker(["m1"], "--tps", "50")``; stopped after the test."""
    started: list[launch.Launched] = []

    def start(models: list[str] | tuple[str, ...] = ("m1",), *extra: str) -> launch.Launched:
        worker = launch.mock_worker(models, *extra)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def start_router() -> Iterator[Callable[..., launch.Launched]]:
    """Start ``shardgate serve`` on a free port: ``start_router([url, ...], "--proxies", "2")``."""
    started: list[launch.Launched] = []

    def start(workers: list[str], *extra: str, config: str | None = None,
              env: dict[str, str] | None = None) -> launch.Launched:
        args = list(extra)
        if "--port" not in args:
            args += ["--port", str(free_port())]
        if "--proxies" not in args:
            args += ["--proxies", "1"]
        router = launch.router(workers, *args, config=config, env=env)
        started.append(router)
        return router

    yield start
    for router in started:
        router.stop()


def worker_stats(worker: launch.Launched) -> dict:
    return get_json(worker.url + "/mock/stats")


def set_worker(worker: launch.Launched, **config: Any) -> None:
    status, _, body = http("POST", worker.url + "/mock/config", config)
    assert status == 200, body
