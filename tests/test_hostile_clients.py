"""A hostile client's battery: raw bytes against a real router, grouped by the rule each case checks.

One ``shardgate serve`` (started through the CLI, as every e2e test does) serves the whole module,
in front of :class:`Recorder`: a small real HTTP server that keeps exactly the bytes the router
forwards. Each case sends raw bytes on its own connection and asserts both sides: what the client
got (a status, or a clean close) and what reached the worker (nothing, or a request with exactly
the expected fields). Rules: RFC 9110/9112 and ../shared/reference/proxy-reliability.md §2;
limits: docs/security.md. The router runs with small limits so the cases stay small and fast:
max_body_size 8192, max_pipelined 4, max_json_depth 32 (the head limits keep their defaults,
64 KiB and 100 fields).
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import DEADLINE, free_port, get_json, wait_for

from shardgate import launch

MAX_BODY = 8192
MAX_PIPELINED = 4
MAX_DEPTH = 32
CHAT = "/v1/chat/completions"
OK_BODY = b'{"id":"rec","choices":[{"message":{"content":"ok"}}]}'


# -- the recording worker ------------------------------------------------------------------------


@dataclass
class Seen:
    """One request as the worker received it: the raw head, parsed fields, the body."""

    head: bytes
    method: str
    target: str
    fields: list[tuple[str, str]]
    body: bytes

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.fields if n == name]

    @property
    def names(self) -> set[str]:
        return {n for n, _ in self.fields}


class Recorder:
    """A real HTTP/1.1 server on a thread; records every request but the health checks, answers 200."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                pairs = (ln.partition(":") for ln in lines[1:])
                fields = [(n.strip().lower(), v.strip()) for n, _, v in pairs]
                size = sum(int(v) for n, v in fields if n == "content-length")
                while len(buf) < size:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                body, buf = buf[:size], buf[size:]
                if target != "/health":
                    with self.lock:
                        self.seen.append(Seen(head, method, target, fields, body))
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(OK_BODY), OK_BODY))

    def take(self) -> list[Seen]:
        with self.lock:
            out, self.seen = self.seen, []
        return out


# -- the client ------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    fields: dict[str, str]
    body: bytes

    def error(self) -> dict[str, Any]:
        doc = json.loads(self.body)
        assert set(doc["error"]) == {"message", "type", "param", "code"}, doc
        return dict(doc["error"])


def exchange(url: str, data: bytes | list[bytes], expect: int = 1) -> tuple[list[Reply], bool]:
    """Send ``data`` (pieces sent one by one) on a new connection; read ``expect`` responses (1xx
    included), then whether the router closed the connection after them."""
    host, port = url.split("//")[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=DEADLINE) as sock:
        for piece in data if isinstance(data, list) else [data]:
            try:
                sock.sendall(piece)
            except OSError:
                break  # the router answered and closed before all was sent
        buf = b""
        replies: list[Reply] = []
        closed = False

        def fill() -> bool:
            nonlocal buf, closed
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                closed = True
            buf += chunk
            return bool(chunk)

        while len(replies) < expect:
            while b"\r\n\r\n" not in buf:
                if not fill():
                    return replies, True
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            fields = {n.strip().lower(): v.strip() for n, _, v in (ln.partition(":") for ln in lines[1:])}
            size = int(fields.get("content-length", "0")) if status >= 200 else 0
            while len(buf) < size:
                if not fill():
                    break
            replies.append(Reply(status, fields, buf[:size]))
            buf = buf[size:]
        # The router says when it closes (Connection: close); then the end of the stream must follow.
        if replies and replies[-1].fields.get("connection") == "close":
            while fill():
                pass
            assert buf == b"", f"bytes after a closing response: {buf[:200]!r}"
        return replies, closed


def req(method: str = "POST", target: str = CHAT, body: bytes | None = None,
        fields: list[tuple[str, str]] | None = None, version: str = "HTTP/1.1", host: bool = True,
        length: bool = True) -> bytes:
    if body is None and method == "POST":
        body = json.dumps({"model": "m1", "messages": [{"role": "user", "content": "hi"}]}).encode()
    lines = [f"{method} {target} {version}"] + (["Host: router.test"] if host else [])
    lines += [f"{n}: {v}" for n, v in fields or []]
    if body is not None and length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def chunked(body: bytes, size: int = 2, trailer: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                    for i in range(0, len(body), size)) + b"0\r\n" + trailer + b"\r\n"


# -- the router --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    recorder = Recorder()
    config = tmp_path_factory.mktemp("hostile") / "deploy.yaml"
    config.write_text(f"workers:\n  - url: {recorder.url}\n    model: m1\n")
    router = launch.router([], "--config", str(config), "--port", str(free_port()), "--proxies", "1",
                           "--max-body-size", str(MAX_BODY), "--max-pipelined", str(MAX_PIPELINED),
                           "--max-json-depth", str(MAX_DEPTH), "--health-interval", "3600")
    try:
        wait_for(lambda: get_json(router.url + "/readiness") or True, what="the router")
        yield type("Fleet", (), {"url": router.url, "rec": recorder, "router": router})
    finally:
        router.stop()
        recorder.sock.close()


@pytest.fixture
def f(fleet: Any) -> Any:
    fleet.rec.take()
    return fleet


def refused(f: Any, data: bytes | list[bytes], status: int, code: str | None = None,
            close: bool = True) -> Reply:
    """``data`` gets ``status`` (an OpenAI-shaped error), no byte reaches the worker, and the
    connection closes (``close``: a request that could not be read to its end), or stays open (a
    complete request refused after it was read: the connection goes on)."""
    replies, closed = exchange(f.url, data)
    assert replies and replies[0].status == status, (replies, data[:200])
    err = replies[0].error()
    if code is not None:
        assert err["code"] == code, err
    assert closed == close, "a refused request that cannot be read on must close; others keep it"
    assert f.rec.take() == [], "a refused request reached the worker"
    return replies[0]


def forwarded(f: Any, data: bytes | list[bytes]) -> Seen:
    """``data`` is answered 200 by the worker, which got exactly one request."""
    replies, _ = exchange(f.url, data)
    assert [r.status for r in replies] == [200], replies
    seen = f.rec.take()
    assert len(seen) == 1, seen
    return seen[0]


# -- 1. framing and smuggling (RFC 9112 6): llhttp refuses, nothing is forwarded -----------------------

BODY = b'{"model":"m1","messages":[]}'
H = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"


@pytest.mark.parametrize("raw", [
    (H + "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").encode(),
    (H + "Content-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef").encode(),
    (H + "Content-Length: +5\r\n\r\nabcde").encode(),
    (H + "Content-Length: 0x5\r\n\r\nabcde").encode(),
    (H + "Content-Length: 5 5\r\n\r\nabcde").encode(),
    (H + "Content-Length: -1\r\n\r\n").encode(),
    (H + "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n").encode(),
    (H + "Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n").encode(),
    (H + "Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n").encode(),
    (H + "X-A: b\r\n c\r\nContent-Length: 0\r\n\r\n").encode(),
    (H + "X-A: b\rc\r\nContent-Length: 0\r\n\r\n").encode(),
    (H + "X-A: b\x00c\r\nContent-Length: 0\r\n\r\n").encode(),
    (H + "Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n").encode(),
    (H + "Transfer-Encoding: chunked\r\n\r\n2;a\nb\r\nab\r\n0\r\n\r\n").encode(),
    (H + "Transfer-Encoding: chunked\r\n\r\nzz\r\n").encode(),
    (H + "Transfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n").encode(),
    (H + "Bad Name: x\r\n\r\n").encode(),
    b"GARBAGE\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.x\r\nHost: x\r\n\r\n",
    b"P@ST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/chat/com pletions HTTP/1.1\r\nHost: x\r\n\r\n",
], ids=["cl-and-te", "two-cl", "cl-plus", "cl-hex", "cl-two-numbers", "cl-negative", "te-xchunked",
        "te-chunked-not-last", "te-space-before-colon", "obs-fold", "bare-cr", "nul-in-value",
        "huge-chunk-size", "lf-in-chunk-extension", "bad-chunk-size", "chunk-longer-than-size",
        "space-in-name", "garbage", "bad-version", "bad-method-char",
        "space-in-target"])
def test_framing_attacks_are_400_closed_and_never_forwarded(f: Any, raw: bytes) -> None:
    refused(f, raw, 400, "invalid_request")


@pytest.mark.parametrize("version", ["HTTP/2.0", "HTTP/0.9"])
def test_versions_other_than_1x_get_505(f: Any, version: str) -> None:
    refused(f, req(version=version), 505, "http_version_not_supported")


def test_an_http10_request_with_transfer_encoding_is_read_once_then_closed(f: Any) -> None:
    raw = (b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           + chunked(BODY, 8) + req())
    replies, closed = exchange(f.url, raw, expect=1)
    assert replies[0].status in (200, 400)
    assert closed
    assert len(f.rec.take()) <= 1


def test_a_request_smuggled_inside_a_body_is_body(f: Any) -> None:
    inner = b"GET /workers HTTP/1.1\r\nHost: x\r\n\r\n"
    doc = json.dumps({"model": "m1", "messages": [], "x": inner.decode()}).encode()
    seen = forwarded(f, req(body=doc, fields=[("Connection", "close")]))
    assert seen.body == doc


# -- 2. head limits: one budget per request, whatever the reads (414 / 431) ---------------------------


def test_a_long_target_in_one_read_gets_414(f: Any) -> None:
    refused(f, req(target=CHAT + "?q=" + "a" * 70_000), 414, "uri_too_long")


def test_a_long_target_in_many_reads_gets_414(f: Any) -> None:
    raw = req(target=CHAT + "?q=" + "a" * 70_000)
    refused(f, [raw[i:i + 4096] for i in range(0, len(raw), 4096)], 414, "uri_too_long")


def test_one_huge_field_in_one_read_gets_431(f: Any) -> None:
    refused(f, req(fields=[("X-Big", "a" * 70_000)]), 431, "headers_too_large")


def test_one_huge_field_in_many_reads_gets_431(f: Any) -> None:
    raw = req(fields=[("X-Big", "a" * 70_000)])
    refused(f, [raw[i:i + 1000] for i in range(0, len(raw), 1000)], 431, "headers_too_large")


def test_many_fields_over_the_byte_budget_get_431(f: Any) -> None:
    refused(f, req(fields=[(f"X-F{i}", "a" * 1000) for i in range(70)]), 431, "headers_too_large")


def test_more_than_max_header_count_fields_get_431(f: Any) -> None:
    refused(f, req(fields=[(f"X-F{i}", "1") for i in range(100)]), 431, "headers_too_large")


def test_max_header_count_fields_are_forwarded(f: Any) -> None:
    seen = forwarded(f, req(fields=[(f"X-F{i}", "1") for i in range(98)]))  # + Host + Content-Length
    assert "x-f97" in seen.names


def test_a_head_just_under_the_budget_is_forwarded(f: Any) -> None:
    seen = forwarded(f, req(fields=[(f"X-F{i}", "a" * 1000) for i in range(60)]))
    assert seen.all("x-f59") == ["a" * 1000]


def test_an_unfinished_head_over_the_budget_is_refused_without_waiting(f: Any) -> None:
    refused(f, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000, 431)


# -- 3. trailer fields: counted, never forwarded ----------------------------------------------------

TE = [("Transfer-Encoding", "chunked")]


@pytest.mark.parametrize("name", ["X-Request-ID", "X-Forwarded-For", "Authorization", "Host",
                                  "X-Shardgate-Connection", "Cookie"])
def test_a_trailer_field_never_becomes_a_request_field(f: Any, name: str) -> None:
    raw = req(fields=TE, body=b"", length=False) + chunked(BODY, 5, f"{name}: evil\r\n".encode())
    seen = forwarded(f, raw)
    assert seen.body == BODY
    assert all("evil" not in v for _, v in seen.fields), seen.fields


@pytest.mark.parametrize("name", ["Content-Length", "Transfer-Encoding"])
def test_a_framing_field_in_a_trailer_gets_400(f: Any, name: str) -> None:
    refused(f, req(fields=TE, body=b"", length=False) + chunked(BODY, 5, f"{name}: 5\r\n".encode()), 400)


def test_trailer_fields_over_the_field_count_get_431(f: Any) -> None:
    trailer = b"".join(b"X-T%d: 1\r\n" % i for i in range(100))
    refused(f, req(fields=TE, body=b"", length=False) + chunked(BODY, 5, trailer), 431)


def test_trailer_fields_over_the_byte_budget_get_431(f: Any) -> None:
    trailer = b"".join(b"X-T%d: %s\r\n" % (i, b"a" * 1000) for i in range(70))
    refused(f, req(fields=TE, body=b"", length=False) + chunked(BODY, 5, trailer), 431)


# -- 4. body limits (413 before buffering) and chunking --------------------------------------------------


def test_a_declared_length_over_the_limit_gets_413_before_the_body(f: Any) -> None:
    refused(f, req(fields=[("Content-Length", str(MAX_BODY + 1))], body=b"", length=False), 413,
            "body_too_large")


def test_a_chunked_body_over_the_limit_gets_413(f: Any) -> None:
    refused(f, req(fields=TE, body=b"", length=False) + chunked(b"a" * (MAX_BODY + 10), 1000), 413)


def test_a_body_in_two_byte_chunks_over_the_limit_gets_413(f: Any) -> None:
    refused(f, req(fields=TE, body=b"", length=False) + chunked(b"a" * (MAX_BODY + 2), 2), 413)


def test_a_body_in_two_byte_chunks_under_the_limit_is_forwarded_whole(f: Any) -> None:
    doc = json.dumps({"model": "m1", "messages": [{"role": "user", "content": "x" * 3000}]}).encode()
    seen = forwarded(f, req(fields=TE, body=b"", length=False) + chunked(doc, 2))
    assert seen.body == doc
    assert seen.all("content-length") == [str(len(doc))] and "transfer-encoding" not in seen.names


def test_a_body_sent_in_many_writes_is_forwarded_whole(f: Any) -> None:
    raw = req(fields=TE, body=b"", length=False) + chunked(BODY, 3)
    seen = forwarded(f, [raw[i:i + 7] for i in range(0, len(raw), 7)])
    assert seen.body == BODY


def test_expect_100_with_an_oversized_length_gets_413_and_no_100(f: Any) -> None:
    raw = req(fields=[("Expect", "100-continue"), ("Content-Length", "99999")], body=b"", length=False)
    replies, closed = exchange(f.url, raw)
    assert [r.status for r in replies] == [413] and closed
    assert f.rec.take() == []


# -- 5. Host (RFC 9112 3.2) ------------------------------------------------------------------------------


def test_an_http11_request_without_host_gets_400(f: Any) -> None:
    refused(f, req(host=False), 400)


def test_two_host_fields_get_400(f: Any) -> None:
    refused(f, req(fields=[("Host", "other.test")]), 400)


def test_two_host_fields_of_different_case_get_400(f: Any) -> None:
    refused(f, req(fields=[("hOsT", "router.test")]), 400)


def test_two_host_fields_in_http10_get_400(f: Any) -> None:
    refused(f, req(version="HTTP/1.0", fields=[("Host", "b")]), 400)


def test_an_http10_request_without_host_is_served(f: Any) -> None:
    seen = forwarded(f, req(version="HTTP/1.0", host=False))
    assert seen.all("host") == [f.rec.url.split("//")[1]]


def test_the_client_host_is_never_forwarded(f: Any) -> None:
    seen = forwarded(f, req(fields=[("Connection", "close")]))
    assert seen.all("host") == [f.rec.url.split("//")[1]]


# -- 6. paths: dot segments and encoded forms refused before any prefix check --------------------------


@pytest.mark.parametrize("target", [
    "/v1/../workers", "/v1/./chat/completions", "/v1/chat/completions/..", "/v1/chat/.",
    "/v1/%2e%2e/workers", "/v1/%2E%2E/stats", "/v1/.%2e/metrics", "/v1/chat%2fcompletions",
    "/v1/chat%2Fcompletions", "/v1/..%2fworkers", "/v1/%5c..%5cworkers", "/v1/chat%00",
    "/./v1/models", "/v1/models/%2e%2e",
], ids=lambda t: t)
def test_dot_segments_and_encoded_separators_get_400(f: Any, target: str) -> None:
    reply = refused(f, req(target=target), 400, close=False)
    assert reply.error()["code"] == "invalid_request"


def test_a_dot_inside_a_segment_is_fine(f: Any) -> None:
    replies, _ = exchange(f.url, req("GET", "/v1/models/llama-3.1.x", fields=[("Connection", "close")]))
    assert replies[0].status == 404  # an unknown model, not a bad path


def test_dots_in_the_query_are_not_a_path(f: Any) -> None:
    seen = forwarded(f, req(target=CHAT + "?next=../../etc", fields=[("Connection", "close")]))
    assert seen.target == CHAT + "?next=../../etc"


@pytest.mark.parametrize("target", ["http://169.254.169.254/latest/meta-data/",
                                    "http://127.0.0.1:1/v1/chat/completions", "*"])
def test_absolute_and_asterisk_forms_are_never_proxied(f: Any, target: str) -> None:
    replies, _ = exchange(f.url, req(target=target, fields=[("Connection", "close")]))
    assert replies and replies[0].status in (400, 404)
    assert f.rec.take() == []


# -- 7. hop-by-hop fields and the router's own -------------------------------------------------------


@pytest.mark.parametrize("name", ["Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Upgrade",
                                  "Proxy-Authorization"])
def test_hop_by_hop_fields_are_not_forwarded(f: Any, name: str) -> None:
    seen = forwarded(f, req(fields=[(name, "x"), ("Connection", "close")]))
    assert name.lower() not in seen.names


def test_fields_named_in_connection_are_dropped_but_the_routers_own_are_set(f: Any) -> None:
    seen = forwarded(f, req(fields=[("Connection", "close, X-Forwarded-For, X-Secret, X-Request-ID"),
                                    ("X-Secret", "s"), ("X-Forwarded-For", "6.6.6.6")]))
    assert "x-secret" not in seen.names
    assert seen.all("x-forwarded-for") == ["127.0.0.1"]
    assert len(seen.all("x-request-id")) == 1


def test_x_forwarded_for_is_appended_and_a_bad_request_id_replaced(f: Any) -> None:
    seen = forwarded(f, req(fields=[("X-Forwarded-For", "1.2.3.4"), ("X-Request-ID", "bad id;"),
                                    ("Connection", "close")]))
    assert seen.all("x-forwarded-for") == ["1.2.3.4, 127.0.0.1"]
    assert seen.all("x-request-id") != ["bad id;"]


def test_a_bad_shardgate_connection_value_gets_400(f: Any) -> None:
    replies, _ = exchange(f.url, req(fields=[("X-Shardgate-Connection", "carrier-pigeon"),
                                             ("Connection", "close")]))
    assert replies[0].status == 400 and replies[0].error()["param"] == "X-Shardgate-Connection"
    assert f.rec.take() == []


# -- 8. upgrades: never tunnelled ------------------------------------------------------------------------


def test_an_upgrade_with_a_body_gets_400(f: Any) -> None:
    refused(f, req(fields=[("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"),
                           ("HTTP2-Settings", "AAMAAABkAAQAoAAAAAIAAAAA")]), 400)


def test_a_websocket_upgrade_is_answered_over_http11_then_closed(f: Any) -> None:
    raw = req("GET", "/health", fields=[("Connection", "Upgrade"), ("Upgrade", "websocket")])
    raw += b"\x81\x05hello"
    replies, closed = exchange(f.url, raw)
    assert [r.status for r in replies] == [200] and closed


def test_a_bodiless_upgrade_on_v1_is_forwarded_without_upgrade(f: Any) -> None:
    raw = req("GET", "/v1/files", fields=[("Connection", "Upgrade"), ("Upgrade", "websocket")])
    seen = forwarded(f, raw)
    assert "upgrade" not in seen.names and "connection" not in seen.names


# -- 9. 100-continue ------------------------------------------------------------------------------------


def test_http11_expect_gets_100_then_the_answer(f: Any) -> None:
    raw = req(fields=[("Expect", "100-continue"), ("Connection", "close")])
    head, _, body = raw.partition(b"\r\n\r\n")
    replies, _ = exchange(f.url, [head + b"\r\n\r\n", body], expect=2)
    assert [r.status for r in replies] == [100, 200]
    assert "expect" not in f.rec.take()[0].names


def test_http10_expect_gets_no_100(f: Any) -> None:
    raw = req(version="HTTP/1.0", fields=[("Expect", "100-continue")])
    replies, _ = exchange(f.url, raw)
    assert [r.status for r in replies] == [200]
    assert len(f.rec.take()) == 1


# -- 10. JSON bodies: 400 in OpenAI's shape, never 500 -----------------------------------------------


def _deep(depth: int) -> bytes:
    return b'{"model":"m1","x":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 200, 5000, 100_000 // 2])
def test_json_deeper_than_the_limit_gets_400_naming_it(f: Any, depth: int) -> None:
    body = _deep(depth)
    if len(body) > MAX_BODY:
        body = b"[" * (MAX_BODY // 2) + b"]" * (MAX_BODY // 2)
    reply = refused(f, req(body=body, fields=[("Connection", "close")]), 400)
    assert "max_json_depth=32" in reply.error()["message"]


def test_json_at_the_limit_is_forwarded(f: Any) -> None:
    body = _deep(MAX_DEPTH)
    assert forwarded(f, req(body=body, fields=[("Connection", "close")])).body == body


def test_brackets_inside_strings_do_not_count(f: Any) -> None:
    body = json.dumps({"model": "m1", "messages": [{"role": "user", "content": "[{" * 500}]}).encode()
    assert forwarded(f, req(body=body, fields=[("Connection", "close")])).body == body


@pytest.mark.parametrize("body,param", [
    (b'{"model": 5}', "model"),
    (b'{"model": "m1", "max_tokens": "x"}', "max_tokens"),
    (b"[1, 2]", None),
    (b"{not json", None),
    (b'"just a string"', None),
    (b"\xff\xfe", None),
])
def test_bad_json_gets_400_with_a_json_path_as_param_or_none(f: Any, body: bytes, param: str | None) -> None:
    reply = refused(f, req(body=body, fields=[("Connection", "close")]), 400)
    assert reply.error()["param"] == param


def test_route_explain_refuses_deep_json_with_400(f: Any) -> None:
    raw = req(target="/route/explain", body=_deep(200), fields=[("Connection", "close")])
    replies, _ = exchange(f.url, raw)
    assert replies[0].status == 400 and "max_json_depth" in replies[0].error()["message"]


def test_a_huge_model_name_is_not_echoed_whole(f: Any) -> None:
    name = "m" * 6000
    body = json.dumps({"model": name, "messages": []}).encode()
    replies, _ = exchange(f.url, req(body=body, fields=[("Connection", "close")]))
    assert replies[0].status == 404
    assert len(replies[0].body) < 1024 and name not in replies[0].body.decode()
    assert f.rec.take() == []


def test_a_huge_unknown_path_is_not_echoed_whole(f: Any) -> None:
    replies, _ = exchange(f.url, req("GET", "/x" * 20_000, fields=[("Connection", "close")]))
    assert replies[0].status == 404 and len(replies[0].body) < 2048


# -- 11. methods -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["HEAD", "TRACE"])
def test_refused_methods_on_v1(f: Any, method: str) -> None:
    replies, _ = exchange(f.url, req(method, CHAT, fields=[("Connection", "close")]))
    assert replies[0].status == 405
    assert f.rec.take() == []


def test_connect_is_never_tunnelled(f: Any) -> None:
    replies, _ = exchange(f.url, b"CONNECT 169.254.169.254:80 HTTP/1.1\r\nHost: 169.254.169.254:80\r\n\r\n")
    assert replies and replies[0].status in (400, 404, 405)
    assert f.rec.take() == []


# -- 12. pipelining: answers in order, refusals in their turn, bounded queue ------------------------------


def test_pipelined_requests_are_answered_in_order(f: Any) -> None:
    replies, _ = exchange(f.url, req() + req("GET", "/health") + req(), expect=3)
    assert [r.status for r in replies] == [200, 200, 200]
    assert len(f.rec.take()) == 2


def test_garbage_after_a_valid_request_is_refused_after_its_answer(f: Any) -> None:
    replies, closed = exchange(f.url, req() + b"GARBAGE\r\n\r\n", expect=2)
    assert [r.status for r in replies] == [200, 400] and closed
    assert len(f.rec.take()) == 1


def test_an_oversized_request_after_a_valid_one_is_refused_in_its_turn(f: Any) -> None:
    big = req(fields=[("Content-Length", str(MAX_BODY + 1))], body=b"", length=False)
    replies, closed = exchange(f.url, req() + big, expect=2)
    assert [r.status for r in replies] == [200, 413] and closed
    assert len(f.rec.take()) == 1


def test_bytes_after_a_close_request_are_ignored(f: Any) -> None:
    replies, closed = exchange(f.url, req(fields=[("Connection", "close")]) + req(), expect=2)
    assert [r.status for r in replies] == [200] and closed
    assert len(f.rec.take()) == 1


def test_a_smuggling_attempt_after_a_valid_request_does_not_reach_the_worker(f: Any) -> None:
    smuggle = (H + "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
               "GET /workers HTTP/1.1\r\n\r\n").encode()
    replies, closed = exchange(f.url, req() + smuggle, expect=2)
    assert [r.status for r in replies] == [200, 400] and closed
    assert len(f.rec.take()) == 1


def test_many_pipelined_requests_beyond_the_cap_are_all_answered_in_order(f: Any) -> None:
    n = MAX_PIPELINED * 5
    replies, _ = exchange(f.url, b"".join(req(fields=[("X-N", str(i))]) for i in range(n)), expect=n)
    assert [r.status for r in replies] == [200] * n
    seen = f.rec.take()
    assert [s.all("x-n") for s in seen] == [[str(i)] for i in range(n)]


# -- 13. refusals are counted by reason and logged without the request's content ------------------------


def test_refusals_are_counted_by_reason_in_metrics_and_stats(f: Any) -> None:
    def reasons() -> dict[str, int]:
        text = urlget(f.url + "/metrics")
        found = re.findall(r'shardgate_requests_rejected_total\{reason="(\w+)"\} (\d+)', text)
        return {why: int(n) for why, n in found}

    before = reasons()
    refused(f, req(host=False), 400)
    refused(f, req(target="/v1/%2e%2e/x"), 400, close=False)
    after = wait_for(lambda: (r := reasons())["bad_path"] > before["bad_path"] and r, what="the counters")
    assert after["bad_host"] == before["bad_host"] + 1
    assert after["bad_path"] == before["bad_path"] + 1
    stats = get_json(f.url + "/stats")
    assert sum(after.values()) == stats["totals"]["rejected"]
    assert stats["rejected_by_reason"] == after  # the same figures, by the same reasons


def test_refusal_log_lines_name_the_reason_never_the_content(f: Any) -> None:
    for _ in range(5):
        refused(f, req(target="/v1/%2e%2e/SECRET-PATH", fields=[("Authorization", "Bearer SECRET-KEY")]), 400,
                close=False)
    log = wait_for(lambda: [ln for ln in f.router.stderr_text().splitlines() if "reason=bad_path" in ln],
                   what="a refusal log line")
    assert len(log) <= 2, "one line per reason per interval"
    assert "request_id=" in log[0] and "peer=127.0.0.1" in log[0]
    text = f.router.stderr_text()
    assert "SECRET" not in text


def urlget(url: str) -> str:
    from conftest import http

    status, _, body = http("GET", url)
    assert status == 200
    return body.decode()
