"""Shared fixtures: real mock workers and real routers, started through the real CLI.

Every process is started by :mod:`shardgate.launch` in its own process group and stopped (group
SIGTERM, then SIGKILL) when the test ends, so no test leaves a proxy behind.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shardgate import launch

DEADLINE = 15.0


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
