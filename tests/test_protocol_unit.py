"""The proxy's HTTP/1.1 rules, one behaviour per test, in milliseconds (no sockets, no processes).

Each test drives the real ``ClientProtocol`` / ``Exchange`` / ``UpstreamConnection`` through
:mod:`protocol_harness`: a fake client transport, fake worker connections the test accepts,
refuses and answers byte by byte, and a real shared-memory snapshot and load board. Load-board
counters are checked where a behaviour moves them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from protocol_harness import (
    CLIENT_PEER,
    CONTINUE,
    Client,
    Harness,
    Response,
    chat_body,
    chunked,
    harness,
    request,
    sse_chunk,
    sse_head,
    worker_response,
)

BODY = b'{"id":"cmpl-1","choices":[{"message":{"content":"hello"}}]}'


@pytest.fixture
def h() -> Iterator[Harness]:
    """Three HTTP workers serving m1, default settings."""
    with harness(workers=3) as made:
        yield made


@pytest.fixture
def solo() -> Iterator[Harness]:
    """One worker: every request goes to it, so connection reuse is visible."""
    with harness(workers=1) as made:
        yield made


@pytest.fixture
def small() -> Iterator[Harness]:
    """max_body_size at its minimum (1024 bytes)."""
    with harness(workers=2, max_body_size=1024) as made:
        yield made


def openai_error(resp: Response, status: int, code: str | None = None) -> dict[str, Any]:
    """``resp`` is a router error in OpenAI's shape; returns the error object."""
    assert resp.status == status, (resp.status, resp.body)
    assert resp.header("content-type") == "application/json"
    doc = resp.json()
    assert set(doc) == {"error"}, doc
    err = doc["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if code is not None:
        assert err["code"] == code, err
    return dict(err)


def body_of(name: str) -> bytes:
    return chat_body(content=name)


# -- ordering and pipelining --------------------------------------------------------------------


def test_a_pipelined_request_waits_until_the_previous_response_is_complete(solo: Harness) -> None:
    c = solo.client()
    c.send(request(body=body_of("first")) + request(body=body_of("second")))
    up = solo.accept()
    assert [r.body for r in up.requests] == [body_of("first")]
    up.respond(worker_response(body=b"answer-1", framing="chunked")[:-5])  # all but the last chunk
    assert [r.body for r in up.requests] == [body_of("first")], "second request sent too early"
    up.respond(b"0\r\n\r\n")
    assert [r.body for r in up.requests] == [body_of("first"), body_of("second")]


def test_responses_to_pipelined_requests_go_out_in_request_order(solo: Harness) -> None:
    c = solo.client()
    c.send(request(body=body_of("first")) + request(body=body_of("second")))
    up = solo.accept()
    up.respond(worker_response(body=b"answer-1"))
    up.respond(worker_response(body=b"answer-2"))
    assert [r.body for r in c.final_responses()] == [b"answer-1", b"answer-2"]
    assert not c.closed


def test_a_local_endpoint_pipelined_behind_a_proxied_request_is_answered_after_it(h: Harness) -> None:
    c = h.client()
    c.send(request() + request("GET", "/health"))
    up = h.accept()
    assert c.received == b"", "/health answered before the earlier request"
    up.respond(worker_response(body=BODY))
    first, second = c.final_responses()
    assert first.body == BODY
    assert second.status == 200 and second.body != BODY


# -- Expect: 100-continue -----------------------------------------------------------------------


def test_expect_100_continue_gets_an_interim_100_before_the_body_is_sent(h: Harness) -> None:
    c = h.client()
    raw = request(headers=[("Expect", "100-continue")])
    head, body = raw.split(b"\r\n\r\n", 1)
    c.send(head + b"\r\n\r\n")
    assert c.received == CONTINUE
    assert h.dials == []
    c.send(body)
    up = h.accept()
    assert up.request.body == body
    assert "expect" not in up.request.names
    up.respond(worker_response(body=BODY))
    assert [r.status for r in c.responses()] == [100, 200]


def test_expect_100_continue_of_a_pipelined_request_waits_for_its_turn(solo: Harness) -> None:
    c = solo.client()
    second = request(body=body_of("second"), headers=[("Expect", "100-continue")])
    head, body = second.split(b"\r\n\r\n", 1)
    c.send(request(body=body_of("first")) + head + b"\r\n\r\n")
    up = solo.accept()
    assert CONTINUE not in c.received, "a 100 for the second request before the first was answered"
    up.respond(worker_response(body=b"answer-1"))
    assert c.received.endswith(b"answer-1" + CONTINUE)
    c.send(body)
    up.respond(worker_response(body=b"answer-2"))
    assert [r.status for r in c.responses()] == [200, 100, 200]
    assert c.final_responses()[1].body == b"answer-2"


def test_a_declared_body_too_large_with_expect_gets_413_and_no_interim_100(small: Harness) -> None:
    c = small.client()
    c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
           b"Content-Length: 5000\r\n\r\n")
    assert [r.status for r in c.responses()] == [413]
    assert c.closed


# -- request fields -----------------------------------------------------------------------------


def test_hop_by_hop_request_fields_and_fields_named_in_connection_are_not_forwarded(h: Harness) -> None:
    c = h.client()
    c.send(request(headers=[
        ("Connection", "keep-alive, X-Private"), ("Connection", "X-Also-Private"),
        ("Keep-Alive", "timeout=5"), ("TE", "trailers"), ("Trailer", "X-Checksum"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="), ("Proxy-Connection", "keep-alive"),
        ("X-Private", "secret"), ("X-Also-Private", "secret too"), ("X-Kept", "yes"),
        ("Authorization", "Bearer sk-test"),
    ]))
    sent = h.accept().request
    dropped = {"connection", "keep-alive", "te", "trailer", "proxy-authorization", "proxy-connection",
               "x-private", "x-also-private", "transfer-encoding", "upgrade", "expect"}
    assert not sent.names & dropped, sent.headers
    assert sent.header("x-kept") == "yes"
    assert sent.header("authorization") == "Bearer sk-test"
    assert sent.all("host") == [sent.header("host")] and sent.header("host") != "router.test"


def test_the_router_sets_x_forwarded_for_to_the_client_address(h: Harness) -> None:
    c = h.client()
    c.send(request())
    assert h.accept().request.all("x-forwarded-for") == [CLIENT_PEER[0]]


def test_x_forwarded_for_from_the_client_is_kept_and_the_client_address_appended(h: Harness) -> None:
    c = h.client()
    c.send(request(headers=[("X-Forwarded-For", "192.0.2.1"), ("X-Forwarded-For", "198.51.100.2")]))
    assert h.accept().request.all("x-forwarded-for") == [f"192.0.2.1, 198.51.100.2, {CLIENT_PEER[0]}"]


def test_a_client_cannot_strip_router_fields_by_naming_them_in_connection(h: Harness) -> None:
    c = h.client()
    c.send(request(headers=[("Connection", "X-Forwarded-For, X-Request-ID")]))
    sent = h.accept().request
    assert sent.all("x-forwarded-for") == [CLIENT_PEER[0]]
    assert len(sent.all("x-request-id")) == 1


def test_the_router_generates_an_x_request_id_and_returns_it(h: Harness) -> None:
    c = h.client()
    c.send(request())
    up = h.accept()
    (rid,) = up.request.all("x-request-id")
    assert rid
    up.respond(worker_response(body=BODY))
    assert c.response.header("x-request-id") == rid


def test_request_ids_differ_between_requests(solo: Harness) -> None:
    c = solo.client()
    c.send(request() + request())
    up = solo.accept()
    up.respond(worker_response())
    up.respond(worker_response())
    first, second = (r.header("x-request-id") for r in up.requests)
    assert first and second and first != second


def test_a_valid_client_x_request_id_is_kept_and_replaces_the_workers(h: Harness) -> None:
    c = h.client()
    c.send(request(headers=[("X-Request-ID", "client-id.42")]))
    up = h.accept()
    assert up.request.all("x-request-id") == ["client-id.42"]
    up.respond(worker_response(body=BODY, headers=[("X-Request-ID", "worker-own-id")]))
    assert [v for n, v in c.response.headers if n == "x-request-id"] == ["client-id.42"]


@pytest.mark.parametrize("bad", ["has spaces in it", "x" * 129, "semi;colon"])
def test_an_invalid_client_x_request_id_is_replaced(h: Harness, bad: str) -> None:
    c = h.client()
    c.send(request(headers=[("X-Request-ID", bad)]))
    ids = h.accept().request.all("x-request-id")
    assert len(ids) == 1 and ids[0] != bad and ids[0]


def test_a_chunked_upload_reaches_the_worker_with_content_length(h: Harness) -> None:
    body = chat_body(content="chunked upload")
    c = h.client()
    c.send(request(body=chunked(body[:10], body[10:]), content_length=False,
                   headers=[("Transfer-Encoding", "chunked")]), pieces=7)
    sent = h.accept().request
    assert sent.body == body
    assert sent.header("content-length") == str(len(body))
    assert "transfer-encoding" not in sent.names


def test_a_request_arriving_byte_by_byte_is_forwarded_whole(h: Harness) -> None:
    raw = request(body=body_of("slow client"))
    c = h.client()
    c.send(raw, pieces=len(raw))
    assert h.accept().request.body == body_of("slow client")


# -- limits and refusals ------------------------------------------------------------------------


def test_a_declared_body_above_max_body_size_gets_413_and_the_connection_closes(small: Harness) -> None:
    c = small.client()
    c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
    openai_error(c.response, 413, "body_too_large")
    assert c.response.header("connection") == "close"
    assert c.closed
    assert small.dials == []


def test_a_chunked_body_growing_above_max_body_size_gets_413(small: Harness) -> None:
    c = small.client()
    c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(3):
        c.send(b"200\r\n" + b"x" * 0x200 + b"\r\n")
    openai_error(c.response, 413, "body_too_large")
    assert c.closed
    assert small.dials == []


def test_a_body_of_exactly_max_body_size_is_forwarded(small: Harness) -> None:
    body = b'{"model":"m1","pad":"' + b"x" * (1024 - 23) + b'"}'
    assert len(body) == 1024
    c = small.client()
    c.send(request(body=body))
    assert small.accept().request.body == body


def test_a_head_over_64_kib_gets_431_and_the_connection_closes(h: Harness) -> None:
    c = h.client()
    c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    for i in range(80):
        if c.closed:
            break
        c.send(b"X-Filler-%d: %s\r\n" % (i, b"a" * 1000))
    openai_error(c.response, 431, "headers_too_large")
    assert c.closed
    assert h.dials == []


def test_a_head_just_under_64_kib_arriving_in_pieces_is_accepted(h: Harness) -> None:
    raw = request(headers=[(f"X-Filler-{i}", "a" * 1000) for i in range(60)])
    assert 60_000 < len(raw) < 64 * 1024
    c = h.client()
    c.send(raw, pieces=30)
    assert h.accept().request.header("x-filler-59") == "a" * 1000


def test_a_complete_head_over_64_kib_in_one_read_gets_431(h: Harness) -> None:
    c = h.client()
    c.send(request(headers=[(f"X-Filler-{i}", "a" * 1000) for i in range(80)]))
    assert h.dials == []
    openai_error(c.response, 431, "headers_too_large")


@pytest.mark.parametrize("raw", [
    b"NOT AN HTTP REQUEST\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 12x\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /v1/models HTTP/1.1\r\nBad Header Name: x\r\n\r\n",
], ids=["not-http", "cl-and-te", "bad-content-length", "two-content-lengths", "bad-chunk-size",
        "space-in-field-name"])
def test_malformed_http_gets_400_in_openai_error_shape_and_the_connection_closes(
        h: Harness, raw: bytes) -> None:
    c = h.client()
    c.send(raw)
    openai_error(c.response, 400, "invalid_request")
    assert c.response.header("connection") == "close"
    assert c.closed
    assert h.dials == []


def test_an_upgrade_request_with_a_body_gets_400(h: Harness) -> None:
    c = h.client()
    c.send(request(headers=[("Connection", "Upgrade"), ("Upgrade", "websocket")]))
    openai_error(c.response, 400, "invalid_request")
    assert c.closed
    assert h.dials == []


def test_an_upgrade_request_without_a_body_is_answered_over_http11_then_closed(h: Harness) -> None:
    c = h.client()
    c.send(request("GET", "/v1/files", headers=[("Connection", "Upgrade"), ("Upgrade", "websocket")]))
    up = h.accept()
    assert not up.request.names & {"upgrade", "connection"}
    up.respond(worker_response(body=b"[]"))
    assert c.response.status == 200 and c.response.body == b"[]"
    assert c.response.header("connection") == "close"
    assert c.closed


def test_bytes_after_an_upgrade_request_are_not_parsed_as_http(h: Harness) -> None:
    c = h.client()
    c.send(request("GET", "/health", headers=[("Connection", "Upgrade"), ("Upgrade", "h2c")])
           + b"\x00\x01 not http at all")
    assert [r.status for r in c.responses()] == [200]
    assert c.closed


def test_head_on_a_proxied_path_gets_405_and_reaches_no_worker(h: Harness) -> None:
    c = h.client()
    c.send(request("HEAD", "/v1/chat/completions", body=b""))
    (resp,) = c.responses(head_only=True)
    assert resp.status == 405
    assert h.dials == []
    assert h.proxy_row()["errors"] == 1


def test_an_unknown_model_gets_404_and_the_connection_stays_open(h: Harness) -> None:
    c = h.client()
    c.send(request(body=chat_body(model="no-such-model")))
    openai_error(c.response, 404, "model_not_found")
    assert not c.closed
    assert h.dials == []
    row = h.proxy_row()
    assert (row["requests"], row["errors"]) == (1, 1)


def test_a_body_that_is_not_json_gets_400(h: Harness) -> None:
    c = h.client()
    c.send(request(body=b"{not json"))
    openai_error(c.response, 400, "invalid_request")
    assert h.dials == []


# -- response framing ---------------------------------------------------------------------------


def test_an_http11_client_gets_rechunked_output_for_a_chunked_worker_response(h: Harness) -> None:
    c = h.client()
    c.send(request())
    up = h.accept()
    raw = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
           + chunked(BODY[:7], BODY[7:30], BODY[30:]))
    up.respond(raw, pieces=9)
    resp = c.response
    assert resp.framing == "chunked" and resp.complete
    assert resp.body == BODY
    assert not c.closed


def test_an_http11_client_gets_chunked_output_for_a_close_delimited_worker_response(h: Harness) -> None:
    c = h.client()
    c.send(request())
    up = h.accept()
    up.respond(worker_response(body=BODY, framing="close"), pieces=4)
    assert not c.response.complete
    up.close()
    resp = c.response
    assert resp.framing == "chunked" and resp.complete
    assert resp.body == BODY
    assert not c.closed
    assert h.proxy_row()["errors"] == 0


def test_an_http10_client_gets_a_close_delimited_body_when_the_length_is_unknown(h: Harness) -> None:
    c = h.client()
    c.send(request(version="HTTP/1.0"))
    up = h.accept()
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
               + chunked(b"hello ", b"world"))
    resp = c.response
    assert resp.framing == "close"
    assert resp.header("connection") == "close"
    assert resp.body == b"hello world"
    assert c.closed


def test_an_http10_keep_alive_client_also_gets_close_delimited_output(h: Harness) -> None:
    c = h.client()
    c.send(request(version="HTTP/1.0", headers=[("Connection", "keep-alive")]))
    h.accept().respond(worker_response(body=b"data", framing="chunked"))
    resp = c.response
    assert resp.framing == "close" and resp.body == b"data"
    assert c.closed


def test_a_content_length_from_the_worker_is_kept(h: Harness) -> None:
    c = h.client()
    c.send(request())
    h.accept().respond(worker_response(body=BODY), pieces=5)
    resp = c.response
    assert resp.framing == "length" and resp.header("content-length") == str(len(BODY))
    assert resp.body == BODY


def test_a_client_asking_to_close_gets_connection_close_and_is_closed(h: Harness) -> None:
    c = h.client()
    c.send(request(headers=[("Connection", "close")]))
    h.accept().respond(worker_response(body=BODY))
    assert c.response.header("connection") == "close"
    assert c.closed


# -- response fields ----------------------------------------------------------------------------


def test_hop_by_hop_response_fields_from_the_worker_are_dropped(h: Harness) -> None:
    c = h.client()
    c.send(request())
    up = h.accept()
    up.respond(worker_response(body=BODY, headers=[
        ("Content-Type", "application/json"), ("Connection", "keep-alive, X-Hop"),
        ("Keep-Alive", "timeout=5"), ("X-Hop", "1"), ("Proxy-Authenticate", "Basic"),
        ("Trailer", "X-Checksum"), ("Upgrade", "h2c"), ("Proxy-Connection", "keep-alive"),
        ("X-Kept", "kept"), ("Server", "worker/1.0"),
    ]))
    resp = c.response
    assert not resp.names & {"keep-alive", "x-hop", "proxy-authenticate", "trailer", "upgrade",
                             "proxy-connection"}, resp.headers
    assert resp.header("connection") is None
    assert resp.header("x-kept") == "kept" and resp.header("server") == "worker/1.0"
    assert resp.body == BODY


OVERLOADED = worker_response(503, b'{"error":"overloaded"}', reason="Service Unavailable",
                             headers=[("Content-Type", "application/json"), ("Retry-After", "1")])


def test_a_5xx_answer_is_retried_on_another_worker_after_a_backoff(h: Harness) -> None:
    c = h.client()
    c.send(request())
    first = h.accept()
    first.respond(OVERLOADED)
    assert c.received == b"" and h.pending_dials() == []  # nothing relayed; waiting out the backoff
    h.advance(1.5)  # Retry-After 1 (within retry_backoff_max) is waited out
    second = h.accept()
    assert second.url != first.url
    second.respond(worker_response(body=BODY))
    assert (c.response.status, c.response.body) == (200, BODY)
    assert h.proxy_row()["retries"] == 1
    assert (h.cell(first.url)["errors"], h.cell(first.url)["in_flight"]) == (1, 0)
    assert not first.aborted  # the answer was read to its end: the connection stays reusable
    assert h.proc.retrying == 0


def test_a_retryable_answer_is_relayed_as_is_when_no_other_worker_is_left(solo: Harness) -> None:
    c = solo.client()
    c.send(request())
    up = solo.accept()
    up.respond(OVERLOADED)
    resp = c.response
    assert (resp.status, resp.body, resp.header("retry-after")) == (503, b'{"error":"overloaded"}', "1")
    assert len(solo.dials) == 1
    assert solo.proxy_row()["retries"] == 0
    cell = solo.cell(up.url)
    assert (cell["errors"], cell["fails_in_row"], cell["in_flight"]) == (1, 1, 0)


def test_a_retry_after_longer_than_retry_backoff_max_is_relayed_not_waited_out(h: Harness) -> None:
    c = h.client()
    c.send(request())
    up = h.accept()
    up.respond(worker_response(429, b'{"error":"busy"}', reason="Too Many Requests",
                               headers=[("Content-Type", "application/json"), ("Retry-After", "30")]))
    assert (c.response.status, c.response.header("retry-after")) == (429, "30")
    assert len(h.dials) == 1 and h.proxy_row()["retries"] == 0
    assert h.cell(up.url)["errors"] == 0  # "not now" is not a broken worker


@pytest.mark.parametrize("settings", [{"retry_budget": 0.0, "retry_budget_min": 0}, {"retry_statuses": ""}],
                         ids=["budget spent", "answer retries off"])
def test_an_answer_retry_the_settings_do_not_allow_is_relayed(settings: dict[str, Any]) -> None:
    with harness(workers=3, **settings) as h:
        c = h.client()
        c.send(request())
        h.accept().respond(OVERLOADED)
        assert c.response.status == 503
        assert len(h.dials) == 1 and h.proxy_row()["retries"] == 0


def test_a_client_leaving_during_the_backoff_cancels_the_retry(h: Harness) -> None:
    c = h.client()
    c.send(request())
    h.accept().respond(OVERLOADED)
    c.disconnect()
    h.advance(1.5)
    assert h.pending_dials() == [] and len(h.dials) == 1
    assert h.proc.retrying == 0 and h.in_flight() == 0


def test_a_4xx_from_the_worker_is_relayed_and_is_not_a_worker_failure(h: Harness) -> None:
    c = h.client()
    c.send(request())
    up = h.accept()
    up.respond(worker_response(400, b'{"error":"bad"}', reason="Bad Request"))
    assert c.response.status == 400 and c.response.body == b'{"error":"bad"}'
    assert h.cell(up.url)["errors"] == 0


# -- failover before the response head ------------------------------------------------------------


def test_a_worker_closing_before_its_response_head_moves_the_request_to_another_worker(
        h: Harness) -> None:
    c = h.client()
    c.send(request(body=body_of("retry me")))
    first = h.accept()
    first.close()
    second = h.accept()
    assert second.url != first.url
    assert second.request.body == body_of("retry me")
    second.respond(worker_response(body=BODY))
    assert c.response.status == 200 and c.response.body == BODY
    row = h.proxy_row()
    assert (row["requests"], row["errors"], row["retries"]) == (1, 0, 1)
    assert h.cell(first.url)["errors"] == 1 and h.cell(first.url)["fails_in_row"] == 1
    assert h.cell(second.url)["errors"] == 0
    assert h.in_flight() == 0


def test_a_worker_closing_after_part_of_its_head_is_retried_on_another_worker(h: Harness) -> None:
    c = h.client()
    c.send(request())
    first = h.accept()
    first.respond(b"HTTP/1.1 200 OK\r\nContent-Ty")
    assert c.received == b""
    first.close()
    second = h.accept()
    assert second.url != first.url
    second.respond(worker_response(body=BODY))
    assert c.response.body == BODY
    assert h.proxy_row()["retries"] == 1


def test_a_refused_connection_moves_the_request_to_another_worker(h: Harness) -> None:
    c = h.client()
    c.send(request())
    refused = h.refuse()
    up = h.accept()
    assert up.url != refused.url
    up.respond(worker_response(body=BODY))
    assert c.response.status == 200
    assert h.cell(refused.url)["connect_errors"] == 1
    assert h.proxy_row()["retries"] == 1


def test_a_malformed_worker_response_before_the_head_is_retried_elsewhere(h: Harness) -> None:
    c = h.client()
    c.send(request())
    first = h.accept()
    first.respond(b"THIS IS NOT HTTP\r\n\r\n")
    assert first.closed
    second = h.accept()
    assert second.url != first.url
    second.respond(worker_response(body=BODY))
    assert c.response.body == BODY


def test_no_worker_is_tried_twice_and_after_max_tries_the_client_gets_502(h: Harness) -> None:
    c = h.client()
    c.send(request())
    for _ in range(3):
        h.accept().close()
    assert len({d.url for d in h.dials}) == 3
    assert h.pending_dials() == []
    openai_error(c.response, 502, "bad_gateway")
    assert not c.closed
    row = h.proxy_row()
    assert (row["requests"], row["errors"], row["retries"]) == (1, 1, 2)
    assert h.in_flight() == 0


@pytest.mark.parametrize("policy", ["round_robin", "weighted_round_robin", "random", "least_connections",
                                    "least_latency", "power_of_two", "consistent_hash",
                                    "consistent_hash_bounded"])
def test_no_policy_retries_on_a_worker_already_tried(policy: str) -> None:
    # A fixed session key sends consistent_hash back to the same worker unless tried ones are excluded.
    with harness(workers=3, policy=policy) as h:
        c = h.client()
        c.send(request(headers=[("X-Session-ID", "user-7")]))
        h.refuse()
        h.accept().close()
        h.refuse()
        assert len({d.url for d in h.dials}) == 3
        openai_error(c.response, 502, "bad_gateway")
        assert h.proxy_row()["retries"] == 2


def test_max_tries_bounds_the_workers_tried() -> None:
    with harness(workers=3, max_tries=2) as h:
        c = h.client()
        c.send(request())
        h.refuse()
        h.refuse()
        assert h.pending_dials() == []
        openai_error(c.response, 502, "bad_gateway")
        assert len({d.url for d in h.dials}) == 2


def test_a_stale_pooled_connection_is_replaced_by_a_fresh_one_to_the_same_worker(solo: Harness) -> None:
    c = solo.client()
    c.send(request())
    pooled = solo.accept()
    pooled.respond(worker_response(body=b"one"))
    c.send(request())
    assert len(pooled.requests) == 2  # the keep-alive connection was reused
    pooled.close()  # the worker had closed it meanwhile: nothing received
    fresh = solo.accept()
    assert fresh.url == pooled.url
    fresh.respond(worker_response(body=b"two"))
    assert [r.body for r in c.final_responses()] == [b"one", b"two"]
    row = solo.proxy_row()
    assert (row["retries"], row["errors"]) == (0, 0)
    assert solo.cell(pooled.url)["errors"] == 0


# -- failures after the response head ---------------------------------------------------------------


@pytest.mark.parametrize("exc", [None, ConnectionResetError(104, "Connection reset by peer")],
                         ids=["worker-fin", "worker-reset"])
def test_a_broken_sse_stream_ends_with_an_error_event_then_the_connection_closes(
        h: Harness, exc: Exception | None) -> None:
    c = h.client()
    c.send(request(body=chat_body(stream=True)))
    up = h.accept()
    up.respond(sse_head() + sse_chunk("Hel") + sse_chunk("lo"))
    assert c.response.header("content-type") == "text/event-stream"
    up.close(exc)
    resp = c.response
    assert not resp.complete, "a broken stream must not look like a normal end"
    events = resp.body.split(b"\n\n")
    assert events[-1] == b""
    last = events[-2].split(b"\n")
    assert last[0] == b"event: error"
    assert last[1].startswith(b"data: ")
    assert json.loads(last[1][6:])["error"]["code"] == "bad_gateway"
    assert c.closed
    assert len(h.dials) == 1, "nothing is retried after the head reached the client"
    row = h.proxy_row()
    assert (row["errors"], row["retries"]) == (1, 0)
    assert h.cell(up.url)["streams"] == 1
    assert h.cell(up.url)["errors"] == 1
    assert h.in_flight() == 0


def test_a_broken_non_stream_response_is_truncated_and_the_connection_closes(h: Harness) -> None:
    c = h.client()
    c.send(request())
    up = h.accept()
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
               + BODY[:10])
    up.close()
    resp = c.response
    assert resp.header("content-length") == "100"
    assert resp.body == BODY[:10] and not resp.complete
    assert b"error" not in resp.body
    assert c.closed
    assert len(h.dials) == 1


def test_the_sse_stream_is_relayed_event_by_event(h: Harness) -> None:
    c = h.client()
    c.send(request(body=chat_body(stream=True)))
    up = h.accept()
    up.respond(sse_head())
    assert c.response.status == 200
    for word in ("a", "b", "c"):
        before = len(c.received)
        up.respond(sse_chunk(word))
        assert len(c.received) > before, "an event was held back"
    up.respond(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
    resp = c.response
    assert resp.complete and resp.body.endswith(b"data: [DONE]\n\n")
    assert h.cell(up.url)["streams"] == 1


# -- client disconnects and backpressure --------------------------------------------------------------


def test_a_client_disconnect_mid_stream_aborts_the_worker_connection(h: Harness) -> None:
    c = h.client()
    c.send(request(body=chat_body(stream=True)))
    up = h.accept()
    up.respond(sse_head() + sse_chunk("Hel"))
    c.disconnect()
    assert up.aborted
    row = h.proxy_row()
    assert (row["client_disconnects"], row["requests"]) == (1, 1)
    assert h.in_flight() == 0
    assert h.cell(up.url)["errors"] == 0


def test_a_client_disconnect_while_waiting_for_the_head_aborts_the_worker_connection(h: Harness) -> None:
    c = h.client()
    c.send(request())
    up = h.accept()
    c.disconnect()
    assert up.aborted
    assert h.proxy_row()["client_disconnects"] == 1
    assert h.in_flight() == 0


def test_a_client_disconnect_while_connecting_cancels_the_connection_attempt(h: Harness) -> None:
    c = h.client()
    c.send(request())
    dial = h.next_dial()
    c.disconnect()
    assert dial.cancelled
    assert h.in_flight() == 0
    assert h.proxy_row()["client_disconnects"] == 1


def test_requests_queued_behind_one_in_flight_are_dropped_when_the_client_goes(solo: Harness) -> None:
    c = solo.client()
    c.send(request(body=body_of("first")) + request(body=body_of("second")))
    up = solo.accept()
    c.disconnect()
    assert up.aborted
    assert solo.pending_dials() == [] and len(solo.dials) == 1
    assert [r.body for r in up.requests] == [body_of("first")]
    assert solo.proxy_row()["client_disconnects"] == 1


def test_an_aborted_worker_connection_is_not_reused(solo: Harness) -> None:
    first_client = solo.client()
    first_client.send(request())
    first = solo.accept()
    first_client.disconnect()
    c = solo.client()
    c.send(request())
    second = solo.accept()
    assert second is not first
    assert len(first.requests) == 1


def test_a_client_that_stops_reading_pauses_the_worker_connection(h: Harness) -> None:
    c = h.client()
    c.send(request(body=chat_body(stream=True)))
    up = h.accept()
    up.respond(sse_head() + sse_chunk("a"))
    c.pause_writing()
    assert not up.transport.is_reading()
    c.resume_writing()
    assert up.transport.is_reading()


def test_a_worker_connection_paused_for_a_slow_client_reads_again_once_pooled(solo: Harness) -> None:
    c = solo.client()
    c.send(request(body=chat_body(stream=True)))
    up = solo.accept()
    up.respond(sse_head() + sse_chunk("a"))
    c.pause_writing()
    up.respond(b"0\r\n\r\n")  # the stream ends while the client still is not reading
    assert c.response.complete
    assert up.transport.is_reading(), "a pooled connection left paused would never see the worker close"
    assert not c.transport.reading, "nothing is read from a client that does not read"
    c.resume_writing()
    assert c.transport.reading
    c.send(request())
    assert solo.pending_dials() == [] and len(up.requests) == 2


# -- timeouts (the loop's clock is moved forward; the proxy's periodic sweep enforces them) ---------------


def test_a_worker_silent_past_first_byte_timeout_gets_504_and_is_not_retried() -> None:
    with harness(workers=2, first_byte_timeout=10.0) as h:
        c = h.client()
        c.send(request())
        up = h.accept()
        h.advance(5.0)
        assert c.received == b"" and not up.aborted
        h.advance(6.0)
        openai_error(c.response, 504, "upstream_timeout")
        assert up.aborted
        assert h.pending_dials() == [] and len(h.dials) == 1
        assert h.cell(up.url)["errors"] == 1
        assert h.in_flight() == 0


def test_a_stream_whose_worker_sends_no_head_within_stall_timeout_moves_to_another_worker() -> None:
    with harness(workers=2, stall_timeout=3.0) as h:
        c = h.client()
        c.send(request(body=chat_body(stream=True)))
        stuck = h.accept()
        h.advance(2.0)
        assert h.pending_dials() == [] and not stuck.aborted
        h.advance(2.0)
        assert stuck.aborted  # a wedged worker's connection is not reused
        healthy = h.accept()
        assert healthy.url != stuck.url
        healthy.respond(sse_head() + sse_chunk("hi") + b"0\r\n\r\n")
        assert c.response.status == 200
        assert (h.cell(stuck.url)["errors"], h.proxy_row()["retries"]) == (1, 1)
        assert h.in_flight() == 0


def test_a_non_streamed_request_is_not_a_stall_while_its_worker_generates() -> None:
    with harness(workers=2, stall_timeout=3.0, first_byte_timeout=60.0) as h:
        c = h.client()
        c.send(request())
        up = h.accept()
        h.advance(10.0)
        assert h.pending_dials() == [] and not up.aborted  # its head comes when generation ends
        up.respond(worker_response(body=BODY))
        assert c.response.status == 200


@pytest.mark.parametrize(("stream", "errors"), [(True, 1), (False, 0)], ids=["stream", "not a stream"])
def test_a_client_giving_up_on_a_stalled_stream_leaves_a_failure_on_the_worker(stream: bool,
                                                                               errors: int) -> None:
    with harness(workers=2, stall_timeout=30.0) as h:
        c = h.client()
        c.send(request(body=chat_body(stream=stream)))
        up = h.accept()
        h.advance(31.0 if not stream else 20.0)
        if stream:
            h.loop.offset += 11.0  # past stall_timeout, without the sweep acting on it first
        c.disconnect()
        assert up.aborted
        assert (h.cell(up.url)["errors"], h.in_flight()) == (errors, 0)


def test_a_stream_that_ends_during_a_drain_leaves_its_connection_open_for_the_next_request(
        solo: Harness) -> None:
    c = solo.client()
    c.send(request(body=chat_body(stream=True)))
    up = solo.accept()
    up.respond(sse_head() + sse_chunk("hi"))  # the head went out promising keep-alive
    solo.proc.draining = True  # the stop begins mid-stream
    up.respond(b"0\r\n\r\n")
    assert not c.closed  # not closed under the client's next request
    c.send(request())
    up.respond(worker_response(body=BODY))
    last = c.final_responses()[-1]
    assert (last.status, last.header("connection")) == (200, "close")
    assert c.closed


def test_a_connect_that_takes_longer_than_connect_timeout_moves_to_another_worker() -> None:
    with harness(workers=2, connect_timeout=2.0) as h:
        c = h.client()
        c.send(request())
        slow = h.next_dial()
        h.advance(3.0)
        assert slow.cancelled
        up = h.accept()
        assert up.url != slow.url
        up.respond(worker_response(body=BODY))
        assert c.response.body == BODY
        assert h.cell(slow.url)["connect_errors"] == 1
        assert h.proxy_row()["retries"] == 1


def test_a_stream_silent_past_idle_timeout_ends_with_an_error_event() -> None:
    with harness(workers=1, idle_timeout=5.0) as h:
        c = h.client()
        c.send(request(body=chat_body(stream=True)))
        up = h.accept()
        up.respond(sse_head() + sse_chunk("a"))
        h.advance(6.0)
        assert up.aborted
        assert c.response.body.endswith(b"\n\n") and b"event: error" in c.response.body
        assert c.closed


def test_a_request_head_not_complete_within_header_timeout_gets_408() -> None:
    with harness(workers=1, header_timeout=3.0) as h:
        c = h.client()
        c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
        h.advance(4.0)
        openai_error(c.response, 408, "request_timeout")
        assert c.closed
        assert h.dials == []


def test_an_idle_keep_alive_client_is_closed_silently_after_keepalive_timeout() -> None:
    with harness(workers=1, keepalive_timeout=4.0) as h:
        c = h.client()
        h.exchange(c, request(), worker_response(body=BODY))
        h.advance(2.0)
        assert not c.closed
        h.advance(3.0)
        assert c.closed
        assert len(c.final_responses()) == 1  # nothing written at close


def test_a_client_waiting_on_a_slow_worker_is_not_closed_by_keepalive_timeout() -> None:
    with harness(workers=1, keepalive_timeout=4.0, first_byte_timeout=60.0) as h:
        c = h.client()
        c.send(request())
        up = h.accept()
        h.advance(10.0)
        assert not c.closed and not up.aborted
        up.respond(worker_response(body=BODY))
        assert c.response.body == BODY


# -- router fields in responses ------------------------------------------------------------------------


def test_x_shardgate_debug_adds_the_routing_decision_and_is_forwarded(h: Harness) -> None:
    c = h.client()
    c.send(request(headers=[("X-Shardgate-Debug", "1")]))
    up = h.accept()
    assert up.request.header("x-shardgate-debug") == "1"
    up.respond(worker_response(body=BODY))
    decision = c.response.header("x-shardgate-decision")
    assert decision is not None and up.url in decision


def test_an_invalid_x_shardgate_connection_gets_400_naming_the_field(h: Harness) -> None:
    c = h.client()
    c.send(request(headers=[("X-Shardgate-Connection", "carrier-pigeon")]))
    err = openai_error(c.response, 400, "invalid_request")
    assert err["param"] == "X-Shardgate-Connection"
    assert h.dials == []
    assert not c.closed


def test_a_204_from_the_worker_has_no_body_and_keeps_both_connections(solo: Harness) -> None:
    c = solo.client()
    c.send(request())
    up = solo.accept()
    up.respond(b"HTTP/1.1 204 No Content\r\nX-Kept: 1\r\n\r\n")
    resp = c.response
    assert resp.status == 204 and resp.header("x-kept") == "1"
    assert not resp.names & {"transfer-encoding", "content-length"}
    assert c.received.endswith(b"\r\n\r\n")
    c.send(request())
    assert solo.pending_dials() == [] and len(up.requests) == 2


def test_a_request_without_a_model_goes_to_some_worker(h: Harness) -> None:
    c = h.client()
    c.send(request(body=chat_body(model=None)))
    up = h.accept()
    assert up.url in h.urls
    up.respond(worker_response(body=BODY))
    assert c.response.body == BODY


# -- keep-alive to workers ---------------------------------------------------------------------------


def test_a_keep_alive_worker_connection_is_reused_for_the_next_request(solo: Harness) -> None:
    c = solo.client()
    c.send(request(body=body_of("one")))
    up = solo.accept()
    up.respond(worker_response(body=b"1"))
    c.send(request(body=body_of("two")))
    assert solo.pending_dials() == []
    assert [r.body for r in up.requests] == [body_of("one"), body_of("two")]


def test_a_worker_connection_the_worker_closes_is_not_reused(solo: Harness) -> None:
    c = solo.client()
    c.send(request())
    up = solo.accept()
    up.respond(worker_response(body=b"1", headers=[("Connection", "close")]))
    assert up.closed
    c.send(request())
    assert len(solo.pending_dials()) == 1


def test_a_connection_serves_many_requests_and_the_gauges_return_to_zero(h: Harness) -> None:
    c = h.client()
    for i in range(6):
        c.send(request(body=body_of(f"r{i}")))
        for dial in h.pending_dials():  # first request to a worker: a new connection
            dial.accept()
        h.upstream_with(body_of(f"r{i}")).respond(worker_response(body=b"%d" % i))
    assert len(h.dials) == 3, "each worker's keep-alive connection is reused"
    assert [r.body for r in c.final_responses()] == [b"%d" % i for i in range(6)]
    assert h.proxy_row()["requests"] == 6
    assert sum(h.cell(u)["requests"] for u in h.urls) == 6
    assert h.in_flight() == 0


# -- bugs found by this harness (fixed; kept as regression tests) ---------------------------------------


@pytest.mark.parametrize("later", [
    b"GARBAGE\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n",
], ids=["malformed", "too-large"])
def test_a_bad_pipelined_request_does_not_replace_the_answer_to_the_request_before_it(
        small: Harness, later: bytes) -> None:
    c = small.client()
    c.send(request(body=body_of("valid")))
    up = small.accept()
    c.send(later)
    assert not up.aborted, "the valid request's worker was aborted"
    up.respond(worker_response(body=BODY))
    assert c.final_responses()[0].body == BODY


def test_bytes_after_a_connection_close_request_do_not_replace_its_answer(h: Harness) -> None:
    c = h.client()
    c.send(request(headers=[("Connection", "close")]) + request())
    assert not h.dials[0].cancelled, "the close request's connection attempt was given up"
    up = h.accept()
    up.respond(worker_response(body=BODY))
    assert c.final_responses()[0].body == BODY


@pytest.mark.parametrize("interim,separate", [
    (b"HTTP/1.1 100 Continue\r\n\r\n", True),
    (b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n", False),
], ids=["100-separate-read", "103-same-read"])
def test_an_interim_response_from_the_worker_does_not_break_the_final_one(
        h: Harness, interim: bytes, separate: bool) -> None:
    c = h.client()
    c.send(request())
    up = h.accept()
    if separate:
        up.respond(interim)
        up.respond(worker_response(body=BODY))
    else:
        up.respond(interim + worker_response(body=BODY))
    assert not up.closed
    final = [r for r in _lenient_responses(c) if r.status >= 200]
    assert [(r.status, r.body, r.complete) for r in final] == [(200, BODY, True)]
    assert "link" not in final[0].names


def _lenient_responses(c: Client) -> list[Response]:
    try:
        return c.responses()
    except (AssertionError, ValueError) as exc:
        raise AssertionError(f"unparseable output: {c.received!r}") from exc


def test_bytes_after_a_complete_worker_response_in_the_same_read_are_not_relayed(solo: Harness) -> None:
    c = solo.client()
    c.send(request())
    up = solo.accept()
    up.respond(worker_response(body=b"one") + b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nBAD")
    assert [r.body for r in c.final_responses()] == [b"one"]
    assert up.closed, "an out-of-sync worker connection must not be reused"


def test_garbage_after_a_complete_worker_response_does_not_hold_the_response_back(solo: Harness) -> None:
    c = solo.client()
    c.send(request())
    up = solo.accept()
    up.respond(worker_response(body=BODY) + b"GARBAGE\r\n\r\n")
    assert c.received != b"", "the complete response was held back"
    assert c.response.body == BODY
    assert solo.in_flight() == 0


def test_an_http10_request_gets_no_interim_100(h: Harness) -> None:
    c = h.client()
    head = request(version="HTTP/1.0", headers=[("Expect", "100-continue")]).split(b"\r\n\r\n")[0]
    c.send(head + b"\r\n\r\n")
    assert CONTINUE not in c.received


def test_a_transfer_coding_the_router_does_not_decode_is_not_silently_dropped(h: Harness) -> None:
    coded = b"\x1f\x8b\x08\x00 gzip bytes"
    c = h.client()
    c.send(request())
    up = h.accept()
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip\r\n\r\n"
               + coded)
    up.close()
    resp = c.response
    codings = (resp.header("transfer-encoding") or "") + (resp.header("content-encoding") or "")
    assert resp.body != coded or "gzip" in codings
