"""Issue 11's client-side rules, in process: limits whatever the reads, backpressure, refusals by reason.

Each test drives the real ``ClientProtocol`` through :mod:`protocol_harness` (fake transports, a
real snapshot and load board); the raw-socket battery against a real router is
``test_hostile_clients.py``. Here the harness shows what a socket cannot: when reading pauses and
resumes, what is held, what each refusal moved on the load board.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from protocol_harness import Harness, chat_body, chunked, harness, request, worker_response

from proxy_workers.errors import ECHO_LIMIT
from proxy_workers.routing.context import COUNT_BELOW, brackets_over, json_too_deep
from proxy_workers.serving import refusals
from proxy_workers.serving.protocol import FEED_SLICE

BODY = b'{"ok":true}'
TE = [("Transfer-Encoding", "chunked")]


@pytest.fixture
def h() -> Iterator[Harness]:
    with harness(workers=1, max_pipelined=3, max_body_size=4096, max_json_depth=8) as made:
        yield made


def refused_by(h: Harness, reason: str) -> int:
    return int(h.proxy_row()[f"refused_{reason}"])


# -- the head budget ----------------------------------------------------------------------------------


def test_the_budget_is_per_request_not_per_read(h: Harness) -> None:
    # Three requests of 40 KB of fields each in one read: each is under 64 KiB, together they are not.
    c = h.client()
    one = request(headers=[(f"X-F{i}", "a" * 1000) for i in range(40)])
    c.send(one + one + one)
    up = h.accept()
    assert len(up.requests) == 1
    assert not c.closed


def test_a_target_over_the_budget_in_one_read_gets_414_and_is_counted(h: Harness) -> None:
    c = h.client()
    c.send(request(target="/v1/chat/completions?q=" + "a" * 70_000))
    assert c.response.status == 414 and c.closed
    assert h.dials == []
    assert refused_by(h, "uri_too_long") == 1


def test_the_field_count_counts_trailer_fields(h: Harness) -> None:
    c = h.client()
    trailer = b"".join(b"X-T%d: 1\r\n" % i for i in range(97))  # + Host + Transfer-Encoding + 1 = 100
    raw = request(headers=TE, body=b"", content_length=False)
    c.send(raw + chunked(chat_body())[:-2] + trailer + b"X-Last: 1\r\n\r\n")
    assert c.response.status == 431
    assert refused_by(h, "too_many_fields") == 1


def test_trailer_fields_are_dropped_but_the_request_goes_on(h: Harness) -> None:
    c = h.client()
    raw = request(headers=TE, body=b"", content_length=False)
    c.send(raw + chunked(chat_body())[:-2] + b"X-Request-ID: evil\r\nAuthorization: evil\r\n\r\n")
    sent = h.accept().request
    assert sent.body == chat_body()
    assert "authorization" not in sent.names and sent.header("x-request-id") != "evil"


# -- the body ----------------------------------------------------------------------------------------------


def test_a_body_in_one_byte_chunks_is_kept_in_one_buffer(h: Harness) -> None:
    c = h.client()
    body = chat_body(content="x" * 2000)
    pieces = [body[i:i + 1] for i in range(len(body))]
    c.send(request(headers=TE, body=b"", content_length=False) + chunked(*pieces))
    assert h.accept().request.body == body


def test_a_chunked_body_over_the_limit_gets_413_before_the_rest_is_read(h: Harness) -> None:
    c = h.client()
    c.send(request(headers=TE, body=b"", content_length=False) + chunked(*[b"ab"] * 3000))
    assert c.response.status == 413 and c.closed
    assert refused_by(h, "body_too_large") == 1


# -- backpressure: pipelining and a client that does not read ------------------------------------------


def test_reading_pauses_at_max_pipelined_and_resumes_as_the_queue_drains(h: Harness) -> None:
    c = h.client()
    c.send(b"".join(request(body=chat_body(content=str(i))) for i in range(5)))
    assert not c.transport.reading, "4 requests wait behind the first: over max_pipelined=3"
    up = h.accept()
    for i in range(5):
        assert up.request.body == chat_body(content=str(i))
        up.respond(worker_response(body=b"%d" % i))
    assert [r.body for r in c.final_responses()] == [b"%d" % i for i in range(5)]
    assert c.transport.reading


def test_a_large_read_of_pipelined_requests_is_parsed_only_up_to_the_cap(h: Harness) -> None:
    # One read of many small requests: parsing stops within a slice of the cap; the rest is held.
    c = h.client()
    n = 2 * FEED_SLICE // len(request("GET", "/health")) + 10
    c.send(request() + b"".join(request("GET", "/health") for _ in range(n)))
    assert len(c.protocol.queue) < 3 + FEED_SLICE // len(request("GET", "/health")) + 1
    assert c.protocol._held, "the rest of the read waits unparsed"
    h.accept().respond(worker_response(body=BODY))
    h.pump()
    assert [r.status for r in c.final_responses()] == [200] * (n + 1)
    assert c.transport.reading and not c.protocol._held


def test_a_client_that_does_not_read_is_not_read_from(h: Harness) -> None:
    c = h.client()
    c.send(request("GET", "/health"))
    c.pause_writing()  # its socket buffer is full
    assert not c.transport.reading
    c.send(request("GET", "/health"))  # already in flight when reading stopped: held, not answered
    assert len(c.final_responses()) == 1
    c.resume_writing()
    h.pump()
    assert c.transport.reading
    assert len(c.final_responses()) == 2


def test_a_queued_request_waits_while_the_client_is_not_reading(h: Harness) -> None:
    c = h.client()
    c.send(request() + request("GET", "/health"))
    up = h.accept()
    c.pause_writing()
    up.respond(worker_response(body=BODY))
    assert len(c.final_responses()) == 1, "the next answer waits until the client reads"
    c.resume_writing()
    assert len(c.final_responses()) == 2


# -- RFC 9112 request rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b"GET /health HTTP/1.1\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
    b"GET /health HTTP/1.0\r\nHost: a\r\nhost: b\r\n\r\n",
], ids=["none-in-1.1", "two", "two-in-1.0"])
def test_host_must_appear_exactly_once(h: Harness, raw: bytes) -> None:
    c = h.client()
    c.send(raw)
    assert c.response.status == 400 and c.closed
    assert refused_by(h, "bad_host") == 1


def test_http10_may_omit_host(h: Harness) -> None:
    c = h.client()
    c.send(b"GET /health HTTP/1.0\r\n\r\n")
    assert c.response.status == 200


@pytest.mark.parametrize("target", ["/v1/../stats", "/v1/%2e%2E/stats", "/v1/a%2Fb", "/v1/a%5cb", "/."])
def test_dot_segments_and_encoded_separators_are_refused_before_any_prefix_check(h: Harness,
                                                                                 target: str) -> None:
    c = h.client()
    c.send(request("GET", target))
    assert c.response.status == 400
    assert not c.closed, "the request was read whole: the connection goes on"
    assert refused_by(h, "bad_path") == 1


def test_json_deeper_than_max_json_depth_gets_400_naming_it(h: Harness) -> None:
    c = h.client()
    c.send(request(body=b'{"model":"m1","x":' + b"[" * 9 + b"]" * 9 + b"}"))
    err = c.response.json()["error"]
    assert c.response.status == 400 and "max_json_depth=8" in err["message"] and err["param"] is None
    assert refused_by(h, "json_too_deep") == 1


def test_json_deeper_than_msgspec_can_decode_is_still_400(h: Harness) -> None:
    c = h.client()
    c.send(request(body=b"[" * 2000 + b"]" * 2000))
    assert c.response.status == 400


@pytest.mark.parametrize("body,param", [(b'{"model": 1}', "model"), (b"[]", None), (b"{", None)])
def test_error_param_is_a_json_path_or_null(h: Harness, body: bytes, param: str | None) -> None:
    c = h.client()
    c.send(request(body=body))
    assert c.response.json()["error"]["param"] == param


def test_an_echoed_model_name_is_clipped(h: Harness) -> None:
    c = h.client()
    c.send(request(body=json.dumps({"model": "x" * 3000}).encode()))
    message = c.response.json()["error"]["message"]
    assert c.response.status == 404 and "x" * (ECHO_LIMIT + 1) not in message and "3000 characters" in message


# -- refusals: counted once, by reason, logged rate-limited --------------------------------------------


def test_every_refusal_counts_once_in_the_total_and_once_by_reason(h: Harness) -> None:
    c = h.client()
    c.send(request("GET", "/v1/%2e%2e/x") + request(body=b"{") + request("GET", "/nope"))
    row = h.proxy_row()
    assert row["rejected"] == 3
    assert (row["refused_bad_path"], row["refused_bad_json"], row["refused_not_found"]) == (1, 1, 1)


def test_refusals_are_logged_once_per_reason_per_interval(h: Harness, caplog: pytest.LogCaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(refusals, "_logged", {})
    caplog.set_level(logging.INFO, logger="shardgate.refused")
    c = h.client()
    for _ in range(5):
        c.send(request("GET", "/v1/%2e%2e/secret", headers=[("Authorization", "Bearer sk-secret")]))
    lines = [r.getMessage() for r in caplog.records if r.name == "shardgate.refused"]
    assert len(lines) == 1 and "reason=bad_path" in lines[0] and "peer=10.1.2.3" in lines[0]
    assert "secret" not in lines[0]


# -- the depth check itself -----------------------------------------------------------------------------


@pytest.mark.parametrize("body,deep", [
    (b'{"a":' + b"[" * 8 + b"]" * 8 + b"}", True),
    (b'{"a":' + b"[" * 7 + b"]" * 7 + b"}", False),
    (b'{"a":"' + b"[" * 50 + b'"}', False),
    (b'{"a":"\\"' + b"[" * 50 + b'"}', False),
    (b'{"a":"\\\\"' + b",[" * 9 + b"]" * 9 + b"}", True),
    (b"[]" * 100, False),
])
def test_json_too_deep_counts_brackets_outside_strings(body: bytes, deep: bool) -> None:
    assert json_too_deep(body, 8) is deep


PROSE = b"x" * 3000  # past COUNT_BELOW: the brackets are found one at a time, not counted


@pytest.mark.parametrize("body,limit", [
    (b'{"a":"' + b"[" * 9 + b'"}', 8), (b'{"a":"' + b"[" * 8 + b'"}', 8),  # counted
    (PROSE + b"[" * 5 + b"{" * 4, 8), (PROSE + b"[" * 4 + b"{" * 4, 8),  # found, both kinds
    (b"{" * 9 + PROSE, 8), (PROSE, 0), (b"[" + PROSE, 0),
])
def test_brackets_over_counts_opening_brackets_in_short_and_long_bodies(body: bytes, limit: int) -> None:
    assert len(body) <= COUNT_BELOW or b"x" * 2049 in body
    assert brackets_over(body, limit) is (body.count(b"[") + body.count(b"{") > limit)


# -- found by the fuzz target (tests/test_fuzz_requests.py) ---------------------------------------------


@pytest.mark.parametrize("first", [request("GET", "/health", headers=[("Connection", "close")]),
                                   request("GET", "/health", version="HTTP/1.0")],
                         ids=["close", "http10"])
def test_bytes_after_a_closing_request_in_the_same_read_are_not_answered_after_the_close(
        h: Harness, first: bytes) -> None:
    c = h.client()
    c.send(first + b"GET / HTTP/1.1\r\n\r\n")
    assert [r.status for r in c.final_responses()] == [200] and c.closed
    assert c.transport.writes_after_close == []
