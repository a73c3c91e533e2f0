"""End-to-end tests of the mock worker: a real subprocess, real sockets, no sleeps-as-synchronisation.

Every test gets its own ``python -m shardgate.mocks.worker`` on a free port; waits poll a condition
against a deadline, and nothing asserts on elapsed time.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shardgate.mocks.payloads import expected_text, prompt_text_of

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"^mock-worker ready on http://(?P<host>[\d.]+):(?P<port>\d+) model=(\S+) role=(\w+)$")
DEADLINE = 15.0
CHAT = "/v1/chat/completions"


class Worker:
    """A running mock worker subprocess and a tiny HTTP client for it."""

    def __init__(self, proc: subprocess.Popen[str], port: int, ready_line: str, stderr: Any) -> None:
        self.proc = proc
        self.port = port
        self.ready_line = ready_line
        self.stderr = stderr

    def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=DEADLINE)
        try:
            data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: Any = None) -> Any:
        status, _, data = self.call(method, path, body)
        assert status == 200, data
        return json.loads(data)

    def stats(self) -> dict[str, Any]:
        return self.json("GET", "/mock/stats")

    def configure(self, **patch: Any) -> dict[str, Any]:
        return self.json("POST", "/mock/config", patch)


def _read_ready_line(proc: subprocess.Popen[str]) -> str:
    # readline() blocks, so it runs in a thread and the deadline is the queue's timeout.
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=DEADLINE).rstrip("\n")
    except queue.Empty:
        pytest.fail("mock worker printed no ready line before the deadline")


def _launch(*args: str) -> Worker:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    stderr = tempfile.TemporaryFile(mode="w+")
    cmd = [sys.executable, "-m", "shardgate.mocks.worker", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=ROOT)
    line = _read_ready_line(proc)
    match = READY.match(line)
    if match is None:
        proc.kill()
        stderr.seek(0)
        pytest.fail(f"bad ready line {line!r}; stderr: {stderr.read()}")
    return Worker(proc, int(match["port"]), line, stderr)


def _stop(worker: Worker) -> None:
    if worker.proc.poll() is None:
        worker.proc.terminate()
        try:
            worker.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            worker.proc.wait()
    worker.stderr.seek(0)
    log = worker.stderr.read()
    worker.stderr.close()
    # aiohttp logs handler crashes instead of failing the request visibly; surface them here.
    assert "Traceback" not in log, log


@pytest.fixture
def spawn() -> Iterator[Callable[..., Worker]]:
    """Start a worker with extra flags (``--port 0`` unless given); all are stopped at teardown."""
    started: list[Worker] = []

    def _spawn(*args: str) -> Worker:
        worker = _launch(*(args if "--port" in args else ("--port", "0", *args)))
        started.append(worker)
        return worker

    yield _spawn
    for worker in started:
        _stop(worker)


@pytest.fixture
def worker(spawn: Callable[..., Worker]) -> Worker:
    return spawn()


def wait_for(probe: Callable[[], Any], ok: Callable[[Any], bool], what: str) -> Any:
    deadline = time.monotonic() + DEADLINE
    while True:
        value = probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; last value: {value!r}")
        time.sleep(0.02)


def sse_payloads(data: bytes) -> list[str]:
    return [ev[len("data: "):] for ev in data.decode().split("\n\n") if ev.startswith("data: ")]


def chat_body(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "mock-model", "messages": [{"role": "user", "content": content}], **extra}


def raw_post(port: int, path: str, body: dict[str, Any]) -> socket.socket:
    """Send a request on a bare socket, so a test decides exactly when the client vanishes."""
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    sock.sendall(head + payload)
    return sock


def read_until(sock: socket.socket, done: Callable[[bytes], bool]) -> bytes:
    buf = b""
    while not done(buf):
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


def running_gauge(worker: Worker) -> float:
    _, _, text = worker.call("GET", "/metrics")
    match = re.search(r'^vllm:num_requests_running\{model_name="mock-model"\} (\S+)$', text.decode(), re.M)
    assert match is not None, text
    return float(match[1])


# --- pure helpers ----------------------------------------------------------------------------------


def test_expected_text_is_deterministic_and_prompt_dependent() -> None:
    assert expected_text("hello", 4) == expected_text("hello", 4)
    assert expected_text("hello", 4) != expected_text("goodbye", 4)
    assert len(expected_text("hello", 5).split()) == 5
    assert prompt_text_of({"messages": [{"content": "a"}, {"content": "b"}]}) == "a\nb"
    assert prompt_text_of({"prompt": "p q"}) == "p q"


# --- server ----------------------------------------------------------------------------------------


def test_ready_line_reports_explicit_port_model_and_role(spawn: Callable[..., Worker]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    worker = spawn("--port", str(port), "--model", "m1", "--model", "m2", "--role", "prefill")
    assert worker.ready_line == f"mock-worker ready on http://127.0.0.1:{port} model=m1,m2 role=prefill"
    models = worker.json("GET", "/v1/models")
    assert [m["id"] for m in models["data"]] == ["m1", "m2"]
    assert models["data"][0]["owned_by"] == "shardgate-mock"
    assert worker.stats()["role"] == "prefill"


def test_health_and_fail_health(worker: Worker) -> None:
    assert worker.call("GET", "/health")[0] == 200
    worker.configure(fail_health=True)
    assert worker.call("GET", "/health")[0] == 503


def test_non_streaming_chat_matches_expected_text(worker: Worker) -> None:
    body = chat_body("tell me a story")
    status, headers, data = worker.call("POST", CHAT, body, headers={"X-Request-ID": "req-42"})
    assert status == 200
    reply = json.loads(data)
    assert reply["object"] == "chat.completion"
    message = {"role": "assistant", "content": expected_text("tell me a story", 16)}
    assert reply["choices"][0]["message"] == message
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"] == {"prompt_tokens": 4, "completion_tokens": 16, "total_tokens": 20}
    assert headers["x-mock-worker"] == f"127.0.0.1:{worker.port}"
    assert headers["x-mock-request-id"] == "req-42"
    stats = worker.stats()
    assert (stats["requests"], stats["completed"], stats["in_flight"]) == (1, 1, 0)
    assert stats["last_headers"]["x-request-id"] == "req-42"
    assert stats["last_body"] == body and stats["last_path"] == CHAT


def test_streaming_chat_yields_one_event_per_token(worker: Worker) -> None:
    body = chat_body("stream please", stream=True, stream_options={"include_usage": True})
    status, headers, data = worker.call("POST", CHAT, body)
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache"
    payloads = sse_payloads(data)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    tokens, finish, usage = chunks[:16], chunks[16], chunks[17]
    assert len(chunks) == 18
    assert tokens[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in tokens) == expected_text("stream please", 16)
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert usage["usage"]["completion_tokens"] == 16


def test_max_tokens_limits_output(worker: Worker) -> None:
    reply = worker.json("POST", CHAT, chat_body("short", max_tokens=3))
    assert reply["choices"][0]["message"]["content"] == expected_text("short", 3)
    assert reply["choices"][0]["finish_reason"] == "length"
    _, _, data = worker.call("POST", "/v1/completions",
                             {"model": "mock-model", "prompt": "p", "max_tokens": 2, "stream": True})
    texts = [json.loads(p)["choices"][0]["text"] for p in sse_payloads(data)[:-1]]
    assert "".join(texts) == expected_text("p", 2)


def test_fail_status_injected_at_runtime(worker: Worker) -> None:
    assert worker.configure(fail_status=503)["fail_status"] == 503
    status, headers, data = worker.call("POST", CHAT, chat_body("x"))
    assert status == 503
    assert set(json.loads(data)["error"]) == {"message", "type", "param", "code"}
    assert headers["x-mock-worker"]
    worker.configure(fail_status=0)
    assert worker.call("POST", CHAT, chat_body("x"))[0] == 200


def test_unknown_model_is_404(worker: Worker) -> None:
    status, _, data = worker.call("POST", CHAT, {**chat_body("x"), "model": "nope"})
    assert status == 404
    assert json.loads(data)["error"]["type"] == "invalid_request_error"


def test_bad_json_is_400(worker: Worker) -> None:
    status, _, data = worker.call("POST", CHAT, raw=b"{not json")
    assert status == 400
    assert json.loads(data) == {"error": {"message": "request body is not valid JSON",
                                          "type": "invalid_request_error", "param": None, "code": None}}


def test_client_disconnect_mid_stream_counts_as_aborted(spawn: Callable[..., Worker]) -> None:
    worker = spawn("--tps", "20")
    sock = raw_post(worker.port, CHAT, chat_body("bye", stream=True))
    received = read_until(sock, lambda buf: buf.count(b"data: ") >= 2)
    assert received.count(b"data: ") >= 2
    sock.close()
    stats = wait_for(worker.stats, lambda s: s["aborted"] == 1 and s["in_flight"] == 0, "abort")
    assert stats["completed"] == 0


def test_client_disconnect_during_ttft_cancels_handler(spawn: Callable[..., Worker]) -> None:
    worker = spawn("--ttft", "60")
    sock = raw_post(worker.port, CHAT, chat_body("slow"))
    wait_for(worker.stats, lambda s: s["in_flight"] == 1, "request in flight")
    sock.close()
    wait_for(worker.stats, lambda s: s["aborted"] == 1 and s["in_flight"] == 0, "abort")


def test_drop_after_cuts_the_stream(worker: Worker) -> None:
    worker.configure(drop_after=2)
    sock = raw_post(worker.port, CHAT, chat_body("drop me", stream=True))
    received = read_until(sock, lambda buf: False)  # until the server closes
    sock.close()
    assert received.count(b"data: ") == 2 and b"[DONE]" not in received
    stats = wait_for(worker.stats, lambda s: s["in_flight"] == 0, "drop")
    assert (stats["dropped"], stats["aborted"], stats["completed"]) == (1, 0, 0)


def test_metrics_show_running_requests(worker: Worker) -> None:
    worker.configure(stall=True)
    assert running_gauge(worker) == 0
    sock = raw_post(worker.port, CHAT, chat_body("hang"))
    wait_for(lambda: running_gauge(worker), lambda v: v == 1, "running gauge at 1")
    sock.close()
    wait_for(lambda: running_gauge(worker), lambda v: v == 0, "running gauge back to 0")


def test_embeddings_are_deterministic(worker: Worker) -> None:
    body = {"model": "mock-model", "input": ["a b", "c"]}
    first, second = worker.json("POST", "/v1/embeddings", body), worker.json("POST", "/v1/embeddings", body)
    assert first["data"] == second["data"]
    assert [len(d["embedding"]) for d in first["data"]] == [8, 8]
    assert first["usage"]["prompt_tokens"] == 3


def test_reset_zeroes_counters(worker: Worker) -> None:
    worker.call("POST", CHAT, chat_body("x"))
    worker.json("POST", "/mock/reset")
    stats = worker.stats()
    assert (stats["requests"], stats["completed"], stats["aborted"]) == (0, 0, 0)


def test_sigterm_exits_zero_even_with_a_stalled_request(worker: Worker) -> None:
    worker.configure(stall=True)
    sock = raw_post(worker.port, CHAT, chat_body("hang"))
    wait_for(worker.stats, lambda s: s["in_flight"] == 1, "request in flight")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(timeout=DEADLINE) == 0
    sock.close()
