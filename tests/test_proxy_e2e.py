"""End-to-end tests of the data plane: real ``shardgate serve`` and real mock workers over real sockets.

Every router and worker is a subprocess started through the CLI (``shardgate.launch``). Where a test
must control bytes on the wire (hop-by-hop headers, malformed framing, pipelining, disconnects) it
talks through :class:`Raw`, a plain socket with a small HTTP/1.1 response reader. Waits poll a
condition against a deadline (``wait_for``); nothing asserts on elapsed time.

Routers and workers that no test reconfigures are module-scoped; tests that inject faults use
module-scoped fleets reset before each test, or their own processes when they stop a worker.
"""

from __future__ import annotations

import json
import re
import socket
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import (
    DEADLINE,
    assert_openai_error,
    chat,
    free_port,
    get_json,
    http,
    set_worker,
    wait_for,
    worker_stats,
)

from shardgate import launch
from shardgate.mocks.payloads import expected_text, usage

CHAT = "/v1/chat/completions"
DEFAULTS = {"ttft": 0.0, "tps": 0.0, "output_tokens": 16, "fail_status": 0, "stall": False,
            "drop_after": -1, "fail_health": False}


# -- a raw HTTP/1.1 client ------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names; a repeated header keeps its last value
    body: bytes  # de-chunked
    chunks: list[bytes]  # the chunk payloads as framed by the sender (empty when not chunked)
    complete: bool  # False when the connection ended before the body did


class Raw:
    """One client connection on a plain socket; reads responses byte-exactly."""

    def __init__(self, url: str) -> None:
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=DEADLINE)
        self.buf = b""
        self.eof = False

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_until(self, marker: bytes) -> bytes | None:
        """Bytes up to and including ``marker``; None if the connection ends first."""
        while (i := self.buf.find(marker)) < 0:
            if not self._fill():
                return None
        out, self.buf = self.buf[:i + len(marker)], self.buf[i + len(marker):]
        return out

    def read_exact(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not self._fill():
                return None
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_head(self) -> tuple[int, dict[str, str], list[tuple[str, str]]]:
        head = self.read_until(b"\r\n\r\n")
        assert head is not None, f"connection closed before a response head (got {self.buf!r})"
        lines = head.decode("latin-1").split("\r\n")[:-2]
        status = int(lines[0].split(" ", 2)[1])
        pairs = [(k.strip().lower(), v.strip()) for k, v in (ln.split(":", 1) for ln in lines[1:])]
        return status, dict(pairs), pairs

    def read_chunk(self) -> bytes | None:
        """The next chunk's payload; b"" for the last chunk; None if the connection ended."""
        line = self.read_until(b"\r\n")
        if line is None:
            return None
        size = int(line.split(b";")[0], 16)
        data = self.read_exact(size + 2)
        if data is None:
            return None
        assert data.endswith(b"\r\n"), data
        return data[:-2]

    def read_response(self, head: tuple[int, dict[str, str], list[tuple[str, str]]] | None = None,
                      ) -> Response:
        status, headers, _ = head or self.read_head()
        while 100 <= status < 200:
            status, headers, _ = self.read_head()
        if "content-length" in headers:
            body = self.read_exact(int(headers["content-length"]))
            return Response(status, headers, body or b"", [], body is not None)
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while (chunk := self.read_chunk()) is not None and chunk:
                chunks.append(chunk)
            return Response(status, headers, b"".join(chunks), chunks, chunk == b"")
        while self._fill():
            pass
        body, self.buf = self.buf, b""
        return Response(status, headers, body, [], True)

    def closed(self) -> bool:
        """True once the peer has closed the connection; a connection left open times out (DEADLINE)."""
        while self._fill():
            pass
        return True


def request(method: str, path: str, body: Any = None, headers: list[tuple[str, str]] | tuple = (),
            version: str = "1.1") -> bytes:
    """A request's bytes; a dict body is JSON; Host and Content-Length are added unless given."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    names = {k.lower() for k, _ in headers}
    lines = [f"{method} {path} HTTP/{version}"]
    if "host" not in names:
        lines.append("Host: shardgate.test")
    lines += [f"{k}: {v}" for k, v in headers]
    if data is not None and "content-length" not in names:
        if "content-type" not in names:
            lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(data)}")
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + (data or b"")


def sse_events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e]


def data_events(body: bytes) -> list[bytes]:
    return [e for e in sse_events(body) if e.startswith(b"data: ")]


def deltas(body: bytes) -> list[str]:
    out = []
    for event in data_events(body):
        if event != b"data: [DONE]":
            for choice in json.loads(event[6:])["choices"]:
                if "content" in choice.get("delta", {}):
                    out.append(choice["delta"]["content"])
    return out


def normalized(body: bytes) -> bytes:
    """A stream with its per-response fields (id, created) blanked; everything else byte-exact."""
    body = re.sub(rb'"id":"chatcmpl-[0-9a-f]+"', b'"id":"X"', body)
    return re.sub(rb'"created":\d+', b'"created":0', body)


def chat_text(body: bytes) -> str:
    return json.loads(body)["choices"][0]["message"]["content"]


def router_stats(router: launch.Launched) -> dict:
    return get_json(router.url + "/stats")


# -- fleets --------------------------------------------------------------------------------------


class Fleet(SimpleNamespace):
    """A router in front of mock workers (named as attributes); stops them all, even after a failed start."""

    def __init__(self) -> None:
        super().__init__()
        self.workers: list[launch.Launched] = []
        self.routers: list[launch.Launched] = []

    def worker(self, models: tuple[str, ...] = ("m1",), *extra: str) -> launch.Launched:
        self.workers.append(launch.mock_worker(models, *extra))
        return self.workers[-1]

    def router(self, workers: list[launch.Launched], *extra: str) -> launch.Launched:
        args = ["--port", str(free_port()), "--proxies", "1", *extra]
        self.routers.append(launch.router([w.url for w in workers], *args))
        return self.routers[-1]

    def reset(self) -> None:
        """Default config, zero counters; first let aborted requests of the last test settle."""
        for w in self.workers:
            set_worker(w, **DEFAULTS)
            wait_for(lambda w=w: worker_stats(w)["in_flight"] == 0, what=f"{w.url} idle")
            status, _, body = http("POST", w.url + "/mock/reset", {})
            assert status == 200, body

    def stop(self) -> None:
        for proc in self.routers + self.workers:
            proc.stop()


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    """w1 serves m1, w2 serves m1 and m2; one router, body limit 2048. No test reconfigures these."""
    f = Fleet()
    try:
        f.w1 = f.worker(("m1",))
        f.w2 = f.worker(("m1", "m2"))
        f.r = f.router([f.w1, f.w2], "--max-body-size", "2048")
        yield f
    finally:
        f.stop()


@pytest.fixture(scope="module")
def _solo() -> Iterator[Fleet]:
    """One worker behind two routers: ``r`` with default timeouts, ``fast`` with 1-2 s timeouts."""
    f = Fleet()
    try:
        f.w = f.worker(("m1",))
        f.r = f.router([f.w])
        f.fast = f.router([f.w], "--first-byte-timeout", "1", "--idle-timeout", "1",
                          "--keepalive-timeout", "1", "--header-timeout", "2")
        yield f
    finally:
        f.stop()


@pytest.fixture
def solo(_solo: Fleet) -> Fleet:
    _solo.reset()
    return _solo


@pytest.fixture(scope="module")
def _duo() -> Iterator[Fleet]:
    """Two workers both serving m1 behind one router, for fault injection."""
    f = Fleet()
    try:
        f.a = f.worker(("m1",))
        f.b = f.worker(("m1",))
        f.r = f.router([f.a, f.b])
        yield f
    finally:
        f.stop()


@pytest.fixture
def duo(_duo: Fleet) -> Fleet:
    _duo.reset()
    return _duo


class RawWorker:
    """A hand-written HTTP worker for framings the mock cannot produce.

    It answers the router's discovery (model ``raw``) and health checks, and answers every other
    request with exactly the bytes of ``reply``, then closes the connection.
    """

    def __init__(self) -> None:
        self.reply = b""
        owner = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while line := self.rfile.readline():
                    path = line.split(b" ")[1]
                    length = 0
                    while (header := self.rfile.readline()) not in (b"\r\n", b""):
                        name, _, value = header.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    self.rfile.read(length)  # all of it: closing with unread bytes would send RST
                    if path == b"/v1/models":
                        body = b'{"object": "list", "data": [{"id": "raw", "object": "model"}]}'
                    elif path == b"/health":
                        body = b"{}"
                    else:
                        self.wfile.write(owner.reply)
                        return
                    self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def raw_fleet() -> Iterator[Any]:
    worker = RawWorker()
    router = None
    try:
        router = launch.router([worker.url], "--port", str(free_port()), "--proxies", "1")
        yield worker, router
    finally:
        if router is not None:
            router.stop()
        worker.close()


# -- 1. non-streaming ------------------------------------------------------------------------------


def test_non_streaming_chat_returns_the_workers_answer(fleet: Any) -> None:
    prompt = "non-streaming e2e"
    status, headers, body = http("POST", fleet.r.url + CHAT, chat("m2", content=prompt))
    assert status == 200, body
    doc = json.loads(body)
    assert doc["object"] == "chat.completion"
    assert doc["model"] == "m2"
    assert chat_text(body) == expected_text(prompt, 16)
    assert doc["usage"] == usage(prompt, 16)
    assert headers["x-request-id"]
    # The worker saw the very id the client got back (the mock echoes it as X-Mock-Request-ID).
    assert headers["x-mock-request-id"] == headers["x-request-id"]


# -- 2. streaming ----------------------------------------------------------------------------------


def test_streaming_is_relayed_verbatim_and_incrementally(solo: Any) -> None:
    tokens = 30
    set_worker(solo.w, tps=20, output_tokens=tokens)
    req = request("POST", CHAT, chat("m1", content="stream me", stream=True))
    with Raw(solo.r.url) as c:
        c.send(req)
        status, headers, _ = c.read_head()
        assert status == 200
        assert headers["content-type"].startswith("text/event-stream")
        assert headers["transfer-encoding"] == "chunked"
        assert headers["x-request-id"]
        first = b""
        while not data_events(first):
            chunk = c.read_chunk()
            assert chunk, "stream ended before its first event"
            first += chunk
        # The first event is here while the worker is still generating: nothing was buffered.
        stats = worker_stats(solo.w)
        assert stats["in_flight"] == 1 and stats["completed"] == 0, stats
        rest = c.read_response((status, headers, []))
        assert rest.complete
        via_router = first + rest.body
    # The same request straight to the worker (pacing does not change the content).
    set_worker(solo.w, tps=0)
    with Raw(solo.w.url) as c:
        c.send(req)
        direct = c.read_response()
    assert direct.status == 200 and direct.complete
    assert normalized(via_router) == normalized(direct.body)
    events = data_events(via_router)
    assert len(events) == tokens + 2  # one per token, the finish chunk, [DONE]
    assert events[-1] == b"data: [DONE]"
    assert "".join(deltas(via_router)) == expected_text("stream me", tokens)


# -- 3. client disconnects ---------------------------------------------------------------------------


def test_client_disconnect_mid_stream_stops_generation(solo: Any) -> None:
    set_worker(solo.w, tps=20, output_tokens=200)
    before = router_stats(solo.r)["totals"]["client_disconnects"]
    with Raw(solo.r.url) as c:
        c.send(request("POST", CHAT, chat("m1", stream=True)))
        status, _, _ = c.read_head()
        assert status == 200
        got = b""
        while not data_events(got):
            chunk = c.read_chunk()
            assert chunk
            got += chunk
        assert worker_stats(solo.w)["in_flight"] == 1
    wait_for(lambda: (s := worker_stats(solo.w))["aborted"] == 1 and s["in_flight"] == 0 and s,
             what="the worker to abort the stream")
    assert worker_stats(solo.w)["completed"] == 0
    wait_for(lambda: router_stats(solo.r)["totals"]["client_disconnects"] == before + 1,
             what="the router to count the disconnect")


def test_client_disconnect_before_first_token_aborts_worker_request(solo: Any) -> None:
    set_worker(solo.w, ttft=30)
    with Raw(solo.r.url) as c:
        c.send(request("POST", CHAT, chat("m1")))
        wait_for(lambda: worker_stats(solo.w)["in_flight"] == 1, what="the request to reach the worker")
    wait_for(lambda: (s := worker_stats(solo.w))["aborted"] == 1 and s["in_flight"] == 0 and s,
             what="the worker to abort the request")
    assert worker_stats(solo.w)["completed"] == 0


# -- 4. failover ------------------------------------------------------------------------------------


def test_failover_to_a_live_worker_then_502_when_all_are_down(start_worker: Any, start_router: Any) -> None:
    a = start_worker(["m1"])
    b = start_worker(["m1"])
    router = start_router([a.url, b.url])
    a.stop()
    for i in range(10):
        prompt = f"failover {i}"
        status, headers, body = http("POST", router.url + CHAT, chat("m1", content=prompt))
        assert status == 200, body
        assert chat_text(body) == expected_text(prompt, 16)
    assert worker_stats(b)["completed"] == 10
    assert router_stats(router)["totals"]["retries"] >= 1  # until passive health ejects the dead one
    b.stop()
    status, headers, body = http("POST", router.url + CHAT, chat("m1"))
    assert status == 502, body
    assert_openai_error(body, "bad_gateway")
    assert headers["content-type"] == "application/json"
    assert headers["x-request-id"]


# -- 5. drop before the response: retried ------------------------------------------------------------


def test_worker_dropping_before_any_byte_is_retried_on_another(duo: Any) -> None:
    set_worker(duo.a, drop_after=0)
    retries = router_stats(duo.r)["totals"]["retries"]
    for i in range(4):  # round-robin: at least one of these is sent to the dropping worker first
        prompt = f"drop {i}"
        status, _, body = http("POST", duo.r.url + CHAT, chat("m1", content=prompt))
        assert status == 200, body
        assert chat_text(body) == expected_text(prompt, 16)
    assert worker_stats(duo.a)["dropped"] >= 1
    assert worker_stats(duo.a)["completed"] == 0
    assert worker_stats(duo.b)["completed"] == 4
    assert router_stats(duo.r)["totals"]["retries"] >= retries + 1


# -- 6. drop mid-stream: truncated, not retried -------------------------------------------------------


def test_mid_stream_drop_truncates_with_error_event_and_is_not_retried(duo: Any) -> None:
    # Both workers drop after 3 events, so whichever is picked drops; a retry would show up as a
    # second request on the fleet.
    for w in (duo.a, duo.b):
        set_worker(w, drop_after=3, tps=20)
    prompt = "mid-stream drop"
    with Raw(duo.r.url) as c:
        c.send(request("POST", CHAT, chat("m1", content=prompt, stream=True)))
        resp = c.read_response()
        assert c.closed()
    assert resp.status == 200
    assert not resp.complete  # no terminating chunk: the client can tell the body is cut
    events = sse_events(resp.body)
    assert b"data: [DONE]" not in events
    data = [e for e in events if e.startswith(b"data: ")]
    assert len(data) == 3, events
    assert "".join(deltas(resp.body)) == expected_text(prompt, 3)
    assert events[-1].startswith(b"event: error\ndata: ")
    assert_openai_error(events[-1].split(b"data: ", 1)[1], "bad_gateway")
    stats = [worker_stats(w) for w in (duo.a, duo.b)]
    assert sum(s["requests"] for s in stats) == 1, stats
    assert sum(s["dropped"] for s in stats) == 1, stats


def test_a_worker_error_status_is_retried_on_the_other_worker(duo: Any) -> None:
    set_worker(duo.a, fail_status=503)
    retries = router_stats(duo.r)["totals"]["retries"]
    for i in range(4):  # round robin: some of these go to the failing worker first
        status, _, body = http("POST", duo.r.url + CHAT, chat("m1", content=f"retry {i}"))
        assert status == 200, body
    failed = worker_stats(duo.a)["requests"]
    assert failed >= 1
    assert router_stats(duo.r)["totals"]["retries"] == retries + failed


def test_a_worker_error_status_is_passed_through_when_every_worker_gave_it(duo: Any) -> None:
    for w in (duo.a, duo.b):
        set_worker(w, fail_status=503)
    retries = router_stats(duo.r)["totals"]["retries"]
    status, headers, body = http("POST", duo.r.url + CHAT, chat("m1"))
    assert status == 503
    assert assert_openai_error(body)["message"] == "injected failure"  # the worker's own body
    assert headers["x-mock-worker"]
    # Each usable worker tried once, never twice (passive health may already have taken one out
    # after the earlier tests' failures: then the other's answer is relayed at once).
    tried = [worker_stats(w)["requests"] for w in (duo.a, duo.b)]
    assert max(tried) == 1
    assert router_stats(duo.r)["totals"]["retries"] == retries + sum(tried) - 1


def test_a_client_error_from_a_worker_is_never_retried(duo: Any) -> None:
    for w in (duo.a, duo.b):
        set_worker(w, fail_status=400)
    status, _, body = http("POST", duo.r.url + CHAT, chat("m1"))
    assert status == 400, body
    assert sum(worker_stats(w)["requests"] for w in (duo.a, duo.b)) == 1


# -- 7. model routing and body validation -------------------------------------------------------------


def _requests(fleet: Any) -> tuple[int, int]:
    return worker_stats(fleet.w1)["requests"], worker_stats(fleet.w2)["requests"]


def test_unknown_model_is_404_and_never_reaches_a_worker(fleet: Any) -> None:
    before = _requests(fleet)
    status, _, body = http("POST", fleet.r.url + CHAT, chat("no-such-model"))
    assert status == 404, body
    err = assert_openai_error(body, "model_not_found")
    assert err["param"] == "model"
    assert _requests(fleet) == before


def test_malformed_json_is_400(fleet: Any) -> None:
    before = _requests(fleet)
    status, _, body = http("POST", fleet.r.url + CHAT, b'{"model": "m1", "messages": [')
    assert status == 400, body
    assert_openai_error(body, "invalid_request")
    assert _requests(fleet) == before


def test_non_string_model_is_400_naming_model(fleet: Any) -> None:
    before = _requests(fleet)
    status, _, body = http("POST", fleet.r.url + CHAT, {"model": 7, "messages": []})
    assert status == 400, body
    err = assert_openai_error(body)
    assert err["param"] == "model"
    assert "model" in err["message"]
    assert _requests(fleet) == before


def test_request_without_model_is_round_robined_over_all_workers(fleet: Any) -> None:
    w1, w2 = _requests(fleet)
    for _ in range(4):
        status, _, body = http("POST", fleet.r.url + CHAT, chat(None))
        assert status == 200, body
    n1, n2 = _requests(fleet)
    assert (n1 - w1, n2 - w2) == (2, 2)


# -- 8. body size limit -------------------------------------------------------------------------------


def test_body_over_limit_with_content_length_is_413_and_closes(fleet: Any) -> None:
    before = _requests(fleet)
    body = json.dumps(chat("m1", content="x" * 4096)).encode()
    with Raw(fleet.r.url) as c:
        c.send(request("POST", CHAT, body))
        resp = c.read_response()
        assert resp.status == 413
        assert_openai_error(resp.body, "body_too_large")
        assert resp.headers.get("connection") == "close"
        assert c.closed()
    assert _requests(fleet) == before


def test_chunked_body_over_limit_is_413(fleet: Any) -> None:
    chunk = b"x" * 1000
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3)) + b"0\r\n\r\n"
    with Raw(fleet.r.url) as c:
        c.send(request("POST", CHAT, headers=[("Transfer-Encoding", "chunked")]) + body)
        resp = c.read_response()
        assert resp.status == 413
        assert_openai_error(resp.body, "body_too_large")
        assert c.closed()


def test_chunked_body_within_limit_is_forwarded_with_content_length(fleet: Any) -> None:
    doc = json.dumps(chat("m2", content="chunked upload")).encode()
    half = len(doc) // 2
    body = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, doc[:half], len(doc) - half, doc[half:])
    with Raw(fleet.r.url) as c:
        c.send(request("POST", CHAT, headers=[("Transfer-Encoding", "chunked"),
                                              ("Content-Type", "application/json")]) + body)
        resp = c.read_response()
    assert resp.status == 200, resp.body
    assert chat_text(resp.body) == expected_text("chunked upload", 16)
    seen = worker_stats(fleet.w2)["last_headers"]
    assert "transfer-encoding" not in seen
    assert seen["content-length"] == str(len(doc))


# -- 9. proxy hygiene ---------------------------------------------------------------------------------


def _via_m2(fleet: Any, headers: list[tuple[str, str]]) -> tuple[Response, dict[str, str]]:
    """Send a chat for m2 (served by w2 only) with ``headers``; returns the answer and what w2 saw."""
    with Raw(fleet.r.url) as c:
        c.send(request("POST", CHAT, chat("m2", content="hygiene"), headers=headers))
        resp = c.read_response()
    assert resp.status == 200, resp.body
    return resp, worker_stats(fleet.w2)["last_headers"]


def test_hop_by_hop_headers_are_stripped_and_forwarding_headers_added(fleet: Any) -> None:
    resp, seen = _via_m2(fleet, [
        ("Connection", "keep-alive, X-Secret"),
        ("X-Secret", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authorization", "Basic eDp5"),
        ("TE", "trailers"),
        ("X-Forwarded-For", "1.2.3.4"),
        ("X-Request-ID", "client-id-42"),
        ("X-Custom", "kept"),
    ])
    for name in ("x-secret", "keep-alive", "proxy-authorization", "te"):
        assert name not in seen, (name, seen)
    assert "x-secret" not in seen.get("connection", "").lower()
    assert seen["x-forwarded-for"] == "1.2.3.4, 127.0.0.1"
    assert seen["x-request-id"] == "client-id-42"
    assert seen["x-custom"] == "kept"
    assert seen["host"] == fleet.w2.url.split("//", 1)[1]
    assert resp.headers["x-request-id"] == "client-id-42"


def test_router_generates_a_request_id_the_worker_and_client_share(fleet: Any) -> None:
    resp, seen = _via_m2(fleet, [])
    rid = resp.headers["x-request-id"]
    assert rid and seen["x-request-id"] == rid
    assert seen["x-forwarded-for"] == "127.0.0.1"
    # A second request gets a different id.
    resp2, seen2 = _via_m2(fleet, [])
    assert resp2.headers["x-request-id"] != rid and seen2["x-request-id"] == resp2.headers["x-request-id"]


def test_invalid_client_request_id_is_replaced(fleet: Any) -> None:
    resp, seen = _via_m2(fleet, [("X-Request-ID", "has spaces and ;semicolons")])
    rid = resp.headers["x-request-id"]
    assert rid != "has spaces and ;semicolons"
    assert seen["x-request-id"] == rid


def test_client_cannot_strip_forwarding_headers_through_connection(fleet: Any) -> None:
    _, seen = _via_m2(fleet, [("Connection", "close, X-Forwarded-For, X-Request-ID"),
                              ("X-Forwarded-For", "9.9.9.9")])
    assert seen["x-forwarded-for"].split(", ")[-1] == "127.0.0.1", seen
    assert seen["x-request-id"]
    assert "connection" not in seen or "x-forwarded-for" not in seen["connection"].lower()


def test_every_connection_field_names_hop_by_hop_headers(fleet: Any) -> None:
    # Two Connection fields form one list: a header named in the first is still hop-by-hop.
    _, seen = _via_m2(fleet, [("Connection", "X-Secret"), ("Connection", "keep-alive"),
                              ("X-Secret", "1")])
    assert "x-secret" not in seen, seen


def test_repeated_x_forwarded_for_headers_are_all_kept(fleet: Any) -> None:
    # Several X-Forwarded-For fields form one list (RFC 9110 5.3); none of the hops may be lost.
    _, seen = _via_m2(fleet, [("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "2.2.2.2")])
    assert seen["x-forwarded-for"] == "1.1.1.1, 2.2.2.2, 127.0.0.1"


# -- 10. the router's own endpoints ---------------------------------------------------------------------


def test_models_endpoint_lists_the_union_of_healthy_workers_models(fleet: Any) -> None:
    doc = get_json(fleet.r.url + "/v1/models")
    assert doc["object"] == "list"
    assert [m["id"] for m in doc["data"]] == ["m1", "m2"]
    assert all(m["object"] == "model" and isinstance(m["owned_by"], str) for m in doc["data"])
    assert get_json(fleet.r.url + "/v1/models/m2")["id"] == "m2"
    status, _, body = http("GET", fleet.r.url + "/v1/models/nope")
    assert status == 404
    assert_openai_error(body)


def test_health_workers_and_metrics_endpoints(fleet: Any) -> None:
    status, _, body = http("GET", fleet.r.url + "/health")
    assert status == 200
    assert json.loads(body)["status"] == "ok"
    workers = get_json(fleet.r.url + "/workers")["workers"]
    assert sorted(w["url"] for w in workers) == sorted([fleet.w1.url, fleet.w2.url])
    for w in workers:
        assert w["healthy"] is True
        assert {"requests", "errors", "in_flight"} <= set(w)
    # Make sure both workers have counted something, then look at the metrics.
    for model in ("m1", "m1", "m2"):
        assert http("POST", fleet.r.url + CHAT, chat(model))[0] == 200
    status, headers, body = http("GET", fleet.r.url + "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    text = body.decode()
    total = re.search(r"^shardgate_requests_total (\d+)$", text, re.M)
    assert total and int(total.group(1)) >= 3, text
    for w in (fleet.w1, fleet.w2):
        line = re.search(rf'^shardgate_worker_requests_total\{{worker="{re.escape(w.url)}"\}} (\d+)$',
                         text, re.M)
        assert line and int(line.group(1)) >= 1, text


def test_unknown_path_is_404_and_wrong_method_is_405(fleet: Any) -> None:
    status, _, body = http("GET", fleet.r.url + "/no/such/path")
    assert status == 404
    assert_openai_error(body, "not_found")
    status, _, body = http("POST", fleet.r.url + "/stats", {})
    assert status == 405
    assert_openai_error(body, "method_not_allowed")


# -- 11. timeouts -------------------------------------------------------------------------------------


def test_first_byte_timeout_is_504_and_aborts_the_worker(solo: Any) -> None:
    set_worker(solo.w, ttft=30)
    status, headers, body = http("POST", solo.fast.url + CHAT, chat("m1"))
    assert status == 504, body
    assert_openai_error(body, "upstream_timeout")
    assert headers["x-request-id"]
    wait_for(lambda: (s := worker_stats(solo.w))["aborted"] == 1 and s["in_flight"] == 0 and s,
             what="the worker to see the abort")
    assert worker_stats(solo.w)["requests"] == 1  # a timeout is not retried


def test_idle_timeout_truncates_a_silent_stream_with_an_error_event(solo: Any) -> None:
    set_worker(solo.w, tps=0.2, output_tokens=5)  # 5 s between tokens after the first
    prompt = "idle stream"
    with Raw(solo.fast.url) as c:
        c.send(request("POST", CHAT, chat("m1", content=prompt, stream=True)))
        resp = c.read_response()
        assert c.closed()
    assert resp.status == 200
    assert not resp.complete
    events = sse_events(resp.body)
    assert deltas(resp.body) == [expected_text(prompt, 1)]
    assert b"data: [DONE]" not in events
    assert events[-1].startswith(b"event: error\ndata: ")
    err = assert_openai_error(events[-1].split(b"data: ", 1)[1])
    assert "idle_timeout" in err["message"]
    wait_for(lambda: (s := worker_stats(solo.w))["aborted"] == 1 and s["in_flight"] == 0 and s,
             what="the worker to see the abort")


def test_header_timeout_answers_a_slow_request_with_408(solo: Any) -> None:
    # The keep-alive timer (1 s) must not cut a request that is arriving: the header timeout
    # (2 s) governs it, and it ends with an answer, not a silent close.
    with Raw(solo.fast.url) as c:
        c.send(request("POST", CHAT, headers=[("Content-Length", "100")]) + b'{"model": "m1"')
        resp = c.read_response()
        assert resp.status == 408
        assert_openai_error(resp.body, "request_timeout")
        assert c.closed()
    assert worker_stats(solo.w)["requests"] == 0


def test_a_head_that_keeps_growing_is_refused_with_431(solo: Any) -> None:
    # 80 KiB of header lines and no end of head: refused once 64 KiB arrived, whatever the
    # socket reads were; nothing reaches a worker.
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + b"X-Filler: %s\r\n" % (b"a" * 1000) * 80
    with Raw(solo.fast.url) as c:
        c.send(head)
        resp = c.read_response()
        assert resp.status == 431
        assert_openai_error(resp.body, "headers_too_large")
        assert c.closed()
    assert worker_stats(solo.w)["requests"] == 0


def test_idle_keep_alive_connection_is_closed(solo: Any) -> None:
    with Raw(solo.fast.url) as c:
        c.send(request("POST", CHAT, chat("m1")))
        assert c.read_response().status == 200
        assert c.closed()  # keepalive_timeout=1 s


# -- 12. malformed HTTP -------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    request("POST", CHAT, headers=[("Content-Length", "5"), ("Transfer-Encoding", "chunked")])
    + b"0\r\n\r\n",
    request("POST", CHAT, headers=[("Transfer-Encoding", "chunked")]) + b"zz\r\nabc\r\n0\r\n\r\n",
    b"GARBAGE\r\n\r\n",
], ids=["cl-and-te", "bad-chunk-size", "garbage"])
def test_malformed_request_is_400_and_closed_and_router_keeps_serving(fleet: Any, raw: bytes) -> None:
    before = _requests(fleet)
    with Raw(fleet.r.url) as c:
        c.send(raw)
        resp = c.read_response()
        assert resp.status == 400
        assert_openai_error(resp.body, "invalid_request")
        assert c.closed()
    assert _requests(fleet) == before
    status, _, body = http("POST", fleet.r.url + CHAT, chat("m1", content="after garbage"))
    assert status == 200
    assert chat_text(body) == expected_text("after garbage", 16)


def test_upgrade_request_is_answered_over_http11_once_then_closed(fleet: Any) -> None:
    # The router does not switch protocols: it ignores Upgrade (RFC 9110 7.8), answers the
    # request, and closes, since what the client sends next would not be HTTP/1.1.
    with Raw(fleet.r.url) as c:
        c.send(request("GET", "/health", headers=[("Connection", "Upgrade"), ("Upgrade", "websocket")])
               + b"\x81\x05hello")
        resp = c.read_response()
        assert resp.status == 200, resp.body
        assert json.loads(resp.body)["status"] == "ok"
        assert resp.headers.get("connection") == "close"
        assert c.closed()
        assert c.buf == b""  # one request, one response
    # With a body llhttp cannot tell body from new protocol: refused, never forwarded bodiless.
    before = _requests(fleet)
    with Raw(fleet.r.url) as c:
        c.send(request("POST", CHAT, chat("m2", content="h2c please"),
                       headers=[("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"),
                                ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA")]))
        resp = c.read_response()
        assert c.closed()
        assert c.buf == b""
    assert resp.status == 400, resp.body
    assert_openai_error(resp.body, "invalid_request")
    assert _requests(fleet) == before


def test_head_answers_have_no_body(fleet: Any) -> None:
    # A body after a HEAD answer would be read as the start of the next response.
    with Raw(fleet.r.url) as c:
        c.send(request("HEAD", CHAT) + request("HEAD", "/health") + request("GET", "/health"))
        for expected in (405, 200):  # HEAD is refused on /v1/*, served on the router's endpoints
            status, headers, _ = c.read_head()
            assert status == expected
            assert int(headers["content-length"]) > 0  # what a GET would carry, but no body
        resp = c.read_response()
    assert resp.status == 200
    assert json.loads(resp.body)["status"] == "ok"


# -- 13. keep-alive and pipelining --------------------------------------------------------------------


def test_keep_alive_serves_several_requests_on_one_connection(fleet: Any) -> None:
    with Raw(fleet.r.url) as c:
        for prompt in ("first", "second", "third"):
            c.send(request("POST", CHAT, chat("m1", content=prompt)))
            resp = c.read_response()
            assert resp.status == 200
            assert "close" not in resp.headers.get("connection", "")
            assert chat_text(resp.body) == expected_text(prompt, 16)


def test_pipelined_requests_are_answered_in_order(fleet: Any) -> None:
    batch = b"".join([
        request("POST", CHAT, chat("m1", content="pipe one")),
        request("GET", "/health"),
        request("POST", CHAT, chat("nope", content="pipe two")),
        request("POST", CHAT, chat("m2", content="pipe three", stream=True)),
        request("POST", CHAT, chat("m1", content="pipe four"), headers=[("Connection", "close")]),
    ])
    with Raw(fleet.r.url) as c:
        c.send(batch)
        answers = [c.read_response() for _ in range(5)]
        assert c.closed()
    assert [a.status for a in answers] == [200, 200, 404, 200, 200]
    assert chat_text(answers[0].body) == expected_text("pipe one", 16)
    assert json.loads(answers[1].body)["status"] == "ok"
    assert_openai_error(answers[2].body, "model_not_found")
    assert "".join(deltas(answers[3].body)) == expected_text("pipe three", 16)
    assert chat_text(answers[4].body) == expected_text("pipe four", 16)
    ids = [a.headers["x-request-id"] for a in answers]
    assert len(set(ids)) == 5


def test_invalid_router_header_on_a_pipelined_request_is_answered_in_turn(solo: Any) -> None:
    # A well-formed request with a bad X-Shardgate-Connection value gets its own 400, in order;
    # it must not cut the response still streaming ahead of it on the same connection.
    set_worker(solo.w, tps=20, output_tokens=10)
    with Raw(solo.r.url) as c:
        c.send(request("POST", CHAT, chat("m1", content="ahead", stream=True)))
        status, headers, _ = c.read_head()
        assert status == 200
        started = c.read_chunk()
        assert started
        c.send(request("POST", CHAT, chat("m1"), headers=[("X-Shardgate-Connection", "carrier-pigeon")]))
        first = c.read_response((status, headers, []))
        assert first.complete
        assert "".join(deltas(started + first.body)) == expected_text("ahead", 10)
        second = c.read_response()
        assert second.status == 400
        assert assert_openai_error(second.body)["param"] == "X-Shardgate-Connection"
        c.send(request("GET", "/health"))  # and the connection is still usable
        assert c.read_response().status == 200


def test_http10_stream_is_delimited_by_close(fleet: Any) -> None:
    with Raw(fleet.r.url) as c:
        c.send(request("POST", CHAT, chat("m1", content="old client", stream=True), version="1.0"))
        resp = c.read_response()
    assert resp.status == 200
    assert "transfer-encoding" not in resp.headers
    assert resp.headers["connection"] == "close"
    assert data_events(resp.body)[-1] == b"data: [DONE]"
    assert "".join(deltas(resp.body)) == expected_text("old client", 16)


# -- 14. Expect: 100-continue -------------------------------------------------------------------------


def test_expect_100_continue_gets_interim_response_then_answer(fleet: Any) -> None:
    body = json.dumps(chat("m2", content="expecting")).encode()
    head, _, _ = request("POST", CHAT, body, headers=[("Expect", "100-continue")]).partition(b"\r\n\r\n")
    with Raw(fleet.r.url) as c:
        c.send(head + b"\r\n\r\n")
        interim = c.read_until(b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        c.send(body)
        resp = c.read_response()
    assert resp.status == 200
    assert chat_text(resp.body) == expected_text("expecting", 16)
    assert "expect" not in worker_stats(fleet.w2)["last_headers"]


def test_expect_100_continue_with_oversized_body_gets_413_without_continue(fleet: Any) -> None:
    with Raw(fleet.r.url) as c:
        c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
               b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        status, _, _ = c.read_head()
        assert status == 413


def test_expect_100_continue_on_a_pipelined_request_waits_its_turn(solo: Any) -> None:
    # Request 2 announces Expect while response 1 is still streaming: the interim "100 Continue"
    # must not land in the middle of response 1's chunked body.
    set_worker(solo.w, tps=20, output_tokens=20)
    body2 = json.dumps(chat("m1", content="second")).encode()
    head2 = request("POST", CHAT, body2, headers=[("Expect", "100-continue")])[:-len(body2)]
    with Raw(solo.r.url) as c:
        c.send(request("POST", CHAT, chat("m1", content="first", stream=True)))
        status, headers, _ = c.read_head()
        assert status == 200
        started = c.read_chunk()  # response 1 is under way
        assert started
        c.send(head2)
        first = c.read_response((status, headers, []))
        assert first.complete
        assert "".join(deltas(started + first.body)) == expected_text("first", 20)
        interim = c.read_until(b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        c.send(body2)
        second = c.read_response()
    assert second.status == 200
    assert chat_text(second.body) == expected_text("second", 20)


# -- worker framings the mock cannot produce ------------------------------------------------------


def test_worker_body_delimited_by_close_is_relayed_complete(raw_fleet: Any) -> None:
    worker, router = raw_fleet
    errors = router_stats(router)["totals"]["errors"]
    for status_line in (b"HTTP/1.1 200 OK\r\nConnection: close", b"HTTP/1.0 200 OK"):
        worker.reply = status_line + b'\r\nContent-Type: application/json\r\n\r\n{"answer": 42}'
        with Raw(router.url) as c:
            c.send(request("POST", CHAT, chat("raw")))
            resp = c.read_response()
        assert resp.status == 200
        assert resp.complete, status_line  # re-chunked, so it must end with the last chunk
        assert json.loads(resp.body) == {"answer": 42}
    assert router_stats(router)["totals"]["errors"] == errors  # not counted as truncations


def test_worker_hop_by_hop_response_headers_are_stripped(raw_fleet: Any) -> None:
    worker, router = raw_fleet
    worker.reply = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                    b"Connection: close, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\n"
                    b"Proxy-Authenticate: Basic\r\nX-Request-ID: worker-id\r\nX-Kept: yes\r\n\r\n{}")
    with Raw(router.url) as c:
        c.send(request("POST", CHAT, chat("raw"), headers=[("X-Request-ID", "client-id")]))
        resp = c.read_response()
        # The worker's "Connection: close" is about its own hop: the client's connection lives on.
        c.send(request("GET", "/health"))
        assert c.read_response().status == 200
    assert resp.status == 200 and resp.body == b"{}"
    names = [k for k, _ in resp.headers.items()]
    for name in ("x-hop", "keep-alive", "proxy-authenticate"):
        assert name not in names, resp.headers
    assert "connection" not in resp.headers
    assert resp.headers["x-request-id"] == "client-id"
    assert resp.headers["x-kept"] == "yes"


def test_malformed_worker_response_is_502(raw_fleet: Any) -> None:
    worker, router = raw_fleet
    worker.reply = b"HTTP/1.1 2OO NOT A STATUS\r\n\r\n"
    status, _, body = http("POST", router.url + CHAT, chat("raw"))
    assert status == 502
    assert_openai_error(body, "bad_gateway")


def test_malformed_worker_stream_after_head_is_truncated(raw_fleet: Any) -> None:
    worker, router = raw_fleet
    event = b"data: {}\n\n"
    worker.reply = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                    b"\r\n%x\r\n%s\r\nzz\r\n" % (len(event), event))
    with Raw(router.url) as c:
        c.send(request("POST", CHAT, chat("raw", stream=True)))
        resp = c.read_response()
        assert c.closed()
    assert resp.status == 200 and not resp.complete
    events = sse_events(resp.body)
    assert events[0] == b"data: {}"
    assert events[-1].startswith(b"event: error\ndata: ")
