"""What a worker may send, and what it can make a proxy hold: the worker side of the HTTP paths.

Each test drives the real ``ClientProtocol`` / ``Exchange`` / ``PDExchange`` /
``UpstreamConnection`` through :mod:`protocol_harness` (fake transports, a real snapshot and load
board). Grouped by rule: interim responses, one request -> one response, transfer codings, the
response head budget, back-pressure from the client to the worker (regular and PD paths).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import protocol_harness
import pytest
from protocol_harness import (
    Client,
    Harness,
    Upstream,
    chat_body,
    chunked,
    harness,
    request,
    sse_chunk,
    sse_head,
    worker_response,
)

from proxy_workers.http.framing import MAX_RESPONSE_HEAD
from shm.schema import WorkerSpec

BODY = b'{"id":"cmpl-1","choices":[{"message":{"content":"hello"}}]}'
STREAM = chat_body(stream=True)


@pytest.fixture
def h() -> Iterator[Harness]:
    """Three HTTP workers: a failed attempt is retried on another one."""
    with harness(workers=3) as made:
        yield made


@pytest.fixture
def solo() -> Iterator[Harness]:
    """One worker: a failed attempt is the client's 502, and connection reuse is visible."""
    with harness(workers=1) as made:
        yield made


def served(h: Harness, c: Client) -> None:
    """The request ended: answered once, nothing left in flight, nothing written after a close."""
    assert h.in_flight() == 0
    assert len(c.final_responses()) == 1


def bad_gateway(c: Client) -> dict[str, Any]:
    resp = c.response
    assert resp.status == 502, (resp.status, resp.body)
    return dict(resp.json()["error"])


# -- interim (1xx) responses: read and dropped, never relayed (RFC 9110 15.2) ---------------------


@pytest.mark.parametrize("interims", [
    [b"HTTP/1.1 100 Continue\r\n\r\n"],
    [b"HTTP/1.1 102 Processing\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"],
    [b"HTTP/1.1 199 Whatever\r\nX-Interim: 1\r\n\r\n"] * 5,
], ids=["100", "102-then-103", "five-unknown-1xx"])
@pytest.mark.parametrize("same_read", [True, False], ids=["same-read", "own-reads"])
def test_interim_responses_are_dropped_and_the_final_one_relayed(
        solo: Harness, interims: list[bytes], same_read: bool) -> None:
    c = solo.client()
    c.send(request())
    up = solo.accept()
    final = worker_response(body=BODY, headers=[("Content-Type", "application/json"), ("X-Final", "1")])
    if same_read:
        up.respond(b"".join(interims) + final)
    else:
        for interim in interims:
            up.respond(interim)
        up.respond(final)
    assert [r.status for r in c.responses()] == [200], "an interim response reached the client"
    resp = c.response
    assert (resp.body, resp.framing, resp.complete) == (BODY, "length", True)
    assert "link" not in resp.names and "x-interim" not in resp.names
    assert resp.header("x-final") == "1"
    assert not up.closed, "interim responses are legal: the connection stays usable"
    c.send(request())
    assert solo.pending_dials() == [] and len(up.requests) == 2, "the connection was pooled"


def test_an_interim_response_cut_anywhere_still_yields_the_final_one(solo: Harness) -> None:
    wire = b"HTTP/1.1 100 Continue\r\n\r\n" + worker_response(body=BODY, framing="chunked")
    up: Upstream | None = None
    for cut in range(1, len(wire)):
        c = solo.client()
        c.send(request())
        if up is None:
            up = solo.accept()
        assert solo.pending_dials() == [], "the connection is reused after each answer"
        up.respond(wire, [cut])
        assert c.response.body == BODY, cut


def test_a_101_from_a_worker_fails_the_attempt_and_another_worker_answers(h: Harness) -> None:
    c = h.client()
    c.send(request())
    first = h.accept()
    first.respond(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\nzz")
    assert first.closed
    h.accept().respond(worker_response(body=BODY))
    assert c.response.body == BODY
    assert h.cell(first.url)["errors"] == 1
    served(h, c)


def test_a_101_from_the_only_worker_is_a_502_naming_it(solo: Harness) -> None:
    c = solo.client()
    c.send(request())
    up = solo.accept()
    up.respond(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    assert "101" in bad_gateway(c)["message"]
    assert up.closed and solo.in_flight() == 0


# -- one request, one response -----------------------------------------------------------------------


@pytest.mark.parametrize("first", [
    worker_response(body=b"one"),
    worker_response(body=b"one", framing="chunked"),
    sse_head() + sse_chunk("one") + b"0\r\n\r\n",
], ids=["length", "chunked", "sse"])
@pytest.mark.parametrize("extra", [
    worker_response(body=b"two"),
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"\x00\xff",
], ids=["second-response", "late-interim", "late-101", "garbage", "binary"])
def test_what_follows_a_complete_response_in_its_read_is_not_relayed_and_drops_the_connection(
        solo: Harness, first: bytes, extra: bytes) -> None:
    c = solo.client()
    c.send(request())
    up = solo.accept()
    up.respond(first + extra)
    resp = c.response
    assert resp.complete and b"two" not in c.received
    assert up.closed, "an out-of-sync worker connection must not be reused"
    assert solo.in_flight() == 0 and solo.cell(up.url)["errors"] == 0, "the answer itself was fine"
    c.send(request())
    assert len(solo.pending_dials()) == 1, "the next request opens a new connection"


def test_blank_lines_after_a_response_are_tolerated(solo: Harness) -> None:
    c = solo.client()
    c.send(request())
    up = solo.accept()
    up.respond(worker_response(body=BODY) + b"\r\n\r\n")
    assert c.response.body == BODY
    assert not up.closed


def test_a_second_response_after_a_dropped_retryable_answer_drops_that_connection(h: Harness) -> None:
    c = h.client()
    c.send(request())
    first = h.accept()
    first.respond(worker_response(503, body=b"busy") + worker_response(body=b"sneaky"))
    assert first.closed
    h.advance(5.0)  # past the retry backoff
    h.accept().respond(worker_response(body=BODY))
    assert c.response.body == BODY and b"sneaky" not in c.received


# -- transfer codings (RFC 9112 6.1, 6.3, 7) -------------------------------------------------------------


CODED = b"\x1f\x8b\x08\x00 coded bytes \r\n0\r\n"  # not de-chunked by anyone: they are content


@pytest.mark.parametrize("fields,payload", [
    ([("Transfer-Encoding", "gzip, chunked")], chunked(CODED[:7], CODED[7:])),
    ([("Transfer-Encoding", "gzip"), ("Transfer-Encoding", "chunked")], chunked(CODED)),
    ([("Transfer-Encoding", "GZip ,, Chunked")], chunked(CODED)),
], ids=["one-field", "two-fields", "odd-spelling"])
def test_a_coding_before_chunked_is_relayed_with_the_dechunked_bytes(
        solo: Harness, fields: list[tuple[str, str]], payload: bytes) -> None:
    c = solo.client()
    c.send(request())
    up = solo.accept()
    head = "".join(f"{n}: {v}\r\n" for n, v in fields)
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + head.encode() + b"\r\n" + payload)
    resp = c.response
    assert [v for n, v in resp.headers if n == "transfer-encoding"] == ["gzip", "chunked"]
    assert (resp.body, resp.complete) == (CODED, True)
    assert not up.closed


def test_a_coding_without_chunked_is_read_until_the_worker_closes(solo: Harness) -> None:
    c = solo.client()
    c.send(request())
    up = solo.accept()
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip\r\n\r\n"
               + CODED)
    assert not c.final_responses()[0].complete, "a close-delimited body is not over before the close"
    up.close()
    resp = c.response
    assert [v for n, v in resp.headers if n == "transfer-encoding"] == ["gzip", "chunked"]
    assert (resp.body, resp.complete) == (CODED, True)
    assert solo.in_flight() == 0 and solo.cell(up.url)["errors"] == 0


@pytest.mark.parametrize("fields", [
    [("Transfer-Encoding", "chunked, gzip")],
    [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "gzip")],
    [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")],
], ids=["chunked-first", "chunked-first-two-fields", "chunked-twice"])
def test_chunked_anywhere_but_last_is_refused(solo: Harness, fields: list[tuple[str, str]]) -> None:
    c = solo.client()
    c.send(request())
    up = solo.accept()
    head = "".join(f"{n}: {v}\r\n" for n, v in fields)
    up.respond(b"HTTP/1.1 200 OK\r\n" + head.encode() + b"\r\n" + chunked(b"abc"))
    assert "chunked" in bad_gateway(c)["message"]
    assert up.closed and solo.in_flight() == 0


def test_an_http10_client_never_gets_a_transfer_coding(h: Harness) -> None:
    c = h.client()
    c.send(request(version="HTTP/1.0"))
    first = h.accept()
    first.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + chunked(CODED))
    assert first.closed and c.received == b"", "nothing of the coded answer reached the client"
    h.accept().respond(worker_response(body=BODY))
    resp = c.response
    assert (resp.body, resp.header("transfer-encoding")) == (BODY, None)


def test_trailer_fields_are_neither_relayed_nor_kept(solo: Harness) -> None:
    c = solo.client()
    c.send(request(body=STREAM))
    up = solo.accept()
    trailer = b"".join(b"X-Trailer-%d: %s\r\n" % (i, b"v" * 100) for i in range(2000))
    up.respond(sse_head() + sse_chunk("a") + b"0\r\n" + trailer + b"\r\n", pieces=50)
    resp = c.response
    assert resp.complete and not any(n.startswith("x-trailer") for n in resp.names)
    conn = up.protocol
    assert not [line for line in getattr(conn, "lines", []) if line.startswith(b"x-trailer")]


# -- the response head budget ----------------------------------------------------------------------------


def big_head(size: int) -> bytes:
    """A 200 head (with Content-Length 2) of about ``size`` bytes."""
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 90) for i in range(size // 100 + 1))
    return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + filler + b"\r\n"


@pytest.mark.parametrize("pieces", [1, 64], ids=["one-read", "many-reads"])
def test_a_head_beyond_the_budget_fails_the_attempt(solo: Harness, pieces: int) -> None:
    c = solo.client()
    c.send(request())
    up = solo.accept()
    up.respond(big_head(MAX_RESPONSE_HEAD + 1000) + b"ok", pieces=pieces)
    assert str(MAX_RESPONSE_HEAD) in bad_gateway(c)["message"]
    assert up.closed and solo.in_flight() == 0


def test_a_header_that_never_ends_fails_once_the_budget_is_spent(solo: Harness) -> None:
    c = solo.client()
    c.send(request())
    up = solo.accept()
    up.respond(b"HTTP/1.1 200 OK\r\nX-Endless: ")
    for _ in range(MAX_RESPONSE_HEAD // 4096 + 1):
        up.respond(b"v" * 4096)
    assert c.response.status == 502 and up.closed


@pytest.mark.parametrize("extra", [0, 1, 5], ids=["exact", "one-more", "some-more"])
def test_a_head_within_the_budget_in_a_large_read_is_served(solo: Harness, extra: int) -> None:
    start = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pad: "
    head = start + b"p" * (MAX_RESPONSE_HEAD - extra - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == MAX_RESPONSE_HEAD - extra
    body = b"ok"
    c = solo.client()
    c.send(request())
    up = solo.accept()
    up.respond(head + body)
    assert (c.response.status, c.response.body) == (200, body)


def test_a_large_body_in_the_read_with_the_head_is_relayed_whole(solo: Harness) -> None:
    body = b"x" * (3 * MAX_RESPONSE_HEAD)
    c = solo.client()
    c.send(request())
    solo.accept().respond(worker_response(body=body))
    assert c.response.body == body


def test_each_interim_response_has_its_own_budget_but_is_not_kept(solo: Harness) -> None:
    interim = b"HTTP/1.1 103 Early Hints\r\n" + big_head(MAX_RESPONSE_HEAD // 2).split(b"\r\n", 2)[2]
    c = solo.client()
    c.send(request())
    up = solo.accept()
    up.respond(interim * 4 + worker_response(body=BODY))
    assert c.response.body == BODY and "x-filler-0" not in c.response.names


# -- back-pressure: a client that does not read stops the worker being read --------------------------------


def streaming(h: Harness) -> tuple[Client, Upstream]:
    c = h.client()
    c.send(request(body=STREAM))
    up = h.accept()
    up.respond(sse_head() + sse_chunk("a"))
    return c, up


def test_a_paused_stream_reads_nothing_more_until_the_client_drains() -> None:
    with harness(workers=1, idle_timeout=30.0) as h:
        c, up = streaming(h)
        c.pause_writing()
        assert not up.transport.is_reading()
        h.advance(20.0)
        c.resume_writing()
        assert up.transport.is_reading()
        h.advance(20.0)  # 40 s since the last chunk, 20 s since the client drained: not idle
        up.respond(sse_chunk("b") + b"0\r\n\r\n")
        assert c.response.complete and b"data: " in c.response.body


def test_a_client_that_never_drains_ends_its_stream_without_blaming_the_worker() -> None:
    with harness(workers=1, idle_timeout=30.0) as h:
        c, up = streaming(h)
        c.pause_writing()
        h.advance(31.0)
        assert up.aborted, "the worker stops generating for a reader that is not there"
        assert c.closed and h.in_flight() == 0
        cell = h.cell(up.url)
        assert (cell["errors"], cell["fails_in_row"]) == (0, 0)
        assert b"client read nothing" in c.received


def test_a_silent_worker_is_still_blamed_when_the_client_reads() -> None:
    with harness(workers=1, idle_timeout=30.0) as h:
        c, up = streaming(h)
        h.advance(31.0)
        assert b"worker was silent" in c.received and h.cell(up.url)["errors"] == 1


def test_a_pause_before_the_head_applies_once_the_head_is_relayed(solo: Harness) -> None:
    c = solo.client()
    c.send(request(body=STREAM))
    up = solo.accept()
    c.pause_writing()  # e.g. the client's buffer is still full of an earlier answer
    assert up.transport.is_reading(), "the head is still read: first-byte timers measure the worker"
    up.respond(sse_head() + sse_chunk("a"))
    assert c.response.status == 200 and not up.transport.is_reading()
    c.resume_writing()
    assert up.transport.is_reading()


# -- back-pressure on the PD path --------------------------------------------------------------------------


@pytest.fixture
def pd(monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    """Two HTTP workers for m1: a prefill (first URL) and a decode (second), two_phase dialect."""
    kinds = iter(["prefill", "decode"])

    def spec(url: str, model: str) -> WorkerSpec:
        return WorkerSpec(url=url, model=model, type=next(kinds))

    monkeypatch.setattr(protocol_harness, "WorkerSpec", spec)
    with harness(workers=2) as made:
        yield made


def prefill_answer() -> bytes:
    return worker_response(body=b'{"kv_transfer_params": {"remote_block_ids": [1, 2]}}')


def test_a_paused_client_pauses_the_pd_decode_stream(pd: Harness) -> None:
    c = pd.client()
    c.send(request(body=STREAM))
    pd.accept().respond(prefill_answer())
    decode = pd.accept()
    assert decode.url == pd.urls[1]
    decode.respond(sse_head() + sse_chunk("a"))
    c.pause_writing()
    assert not decode.transport.is_reading()
    c.resume_writing()
    assert decode.transport.is_reading()
    decode.respond(b"0\r\n\r\n")
    assert c.response.complete and pd.in_flight() == 0


def test_a_pd_decode_leg_started_while_paused_starts_paused(pd: Harness) -> None:
    c = pd.client()
    c.send(request(body=STREAM))
    prefill = pd.accept()
    c.pause_writing()  # during the prefill: no decode leg yet
    prefill.respond(prefill_answer())
    decode = pd.accept()
    decode.respond(sse_head() + sse_chunk("a"))
    assert not decode.transport.is_reading()
    c.resume_writing()
    assert decode.transport.is_reading()


def test_a_prefill_answer_in_tiny_reads_is_bounded_and_fails_cleanly(pd: Harness) -> None:
    from proxy_workers.forwarding.handoff import MAX_PREFILL_ANSWER

    c = pd.client()
    c.send(request())
    prefill = pd.accept()
    huge = b'{"pad": "' + b"p" * (MAX_PREFILL_ANSWER + 4096) + b'"}'
    prefill.respond(worker_response(body=huge), pieces=64)
    leg_kept = [sum(len(b) for b in leg.answer) for leg in getattr(c.protocol.exchange, "legs", [])]
    assert all(kept <= MAX_PREFILL_ANSWER + len(huge) // 64 + 1 for kept in leg_kept)
    assert c.response.status == 502 and pd.in_flight() == 0
