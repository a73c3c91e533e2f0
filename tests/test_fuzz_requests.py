"""Fuzz targets (hypothesis): the request-head path and the routing-field decoder.

Properties, for any input: the router never answers 500 and never raises out of its protocol;
what it writes is well-framed HTTP/1.1; what reaches a worker carries exactly one Host, one
X-Request-ID, one X-Forwarded-For, no hop-by-hop field and no trailer field; the decoder turns
any body into a route or a RouterError (400/404/503), nothing else.

CI runs a few examples per target (``SHARDGATE_FUZZ_EXAMPLES``, default 40). By hand, longer::

    SHARDGATE_FUZZ_EXAMPLES=20000 python3 -m pytest -q tests/test_fuzz_requests.py

Whatever a long run finds becomes a regular test (test_client_limits_unit.py or
test_hostile_clients.py), with the example hypothesis prints.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_harness import Harness, harness, parse_requests, split, worker_response

from proxy_workers.errors import RouterError
from proxy_workers.forwarding.request import Request
from proxy_workers.routing.decision import prepare

EXAMPLES = int(os.environ.get("SHARDGATE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="SHARDGATE_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
NEVER_FORWARDED = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                   "upgrade", "expect", "proxy-authorization"}


@pytest.fixture(scope="module")
def h() -> Iterator[Harness]:
    with harness(workers=1, max_body_size=2048, max_head_size=4096, max_header_count=16,
                 max_pipelined=2, max_json_depth=8) as made:
        yield made


# -- request heads ---------------------------------------------------------------------------------

_TCHAR = "abcdefghijklmnopqrstuvwxyz-ABCXYZ0123456789!#$%&'*+.^_`|~"
_token = st.text(alphabet=_TCHAR, min_size=1, max_size=12)
_names = st.one_of(st.sampled_from(
    ["Host", "Content-Length", "Transfer-Encoding", "Connection", "Expect", "Upgrade", "TE", "Trailer",
     "X-Request-ID", "X-Forwarded-For", "X-Shardgate-Connection", "X-Shardgate-Debug", "Keep-Alive",
     "Authorization", "Proxy-Authorization", "X-Shardgate-Priority"]), _token)
_values = st.one_of(
    st.sampled_from(["chunked", "close", "keep-alive", "100-continue", "0", "5", "-1", "99999", "http",
                     "grpc", "h2c", "websocket", "upgrade", "x, chunked", "1"]),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=40))
_targets = st.one_of(
    st.sampled_from(["/v1/chat/completions", "/v1/models", "/health", "/v1/../stats", "/v1/%2e%2e/x",
                     "/route/explain", "*", "http://169.254.169.254/", "/v1/completions?a=../b"]),
    st.text(alphabet="/v1abc.%2eEfF5c0?=&", min_size=1, max_size=30).map(lambda t: "/" + t))
_bodies = st.one_of(st.just(b""), st.sampled_from([b'{"model":"m1"}', b'{"model":5}', b"[[[[[[[[[[]]]]]]]]]]",
                                                   b"{", b'{"model":"m1","x":"\\"[[[[["}']),
                    st.binary(max_size=64))


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "HEAD", "PUT", "OPTIONS", "CONNECT", "TRACE", "PRI",
                                   "G3T"]))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/0.9",
                                    "HTTP/1.2"]))
    lines = [f"{method} {draw(_targets)} {version}"]
    if draw(st.booleans()):
        lines.append("Host: router.test")
    lines += [f"{n}: {v}" for n, v in draw(st.lists(st.tuples(_names, _values), max_size=6))]
    body = draw(_bodies)
    framing = draw(st.sampled_from(["length", "chunked", "none"]))
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}")
    elif framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if framing == "chunked":
        size = draw(st.integers(1, 8))
        trailer = "".join(f"X-Trailer-{i}: {v}\r\n" for i, v in enumerate(draw(st.lists(_token, max_size=3))))
        body = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                        for i in range(0, len(body), size)) + b"0\r\n" + trailer.encode() + b"\r\n"
    raw = head + (body if framing != "none" else b"")
    if draw(st.booleans()):  # a mutation: a byte replaced, inserted or removed
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(max_size=2)) + raw[at + draw(st.integers(0, 2)):]
    return raw


@FUZZ
@given(requests=st.lists(raw_requests(), min_size=1, max_size=3), pieces=st.integers(1, 7))
def test_any_request_head_gets_a_well_framed_answer_and_a_clean_forward(
        h: Harness, requests: list[bytes], pieces: int) -> None:
    c = h.client()
    c.send(b"".join(requests), pieces=pieces)
    for _ in range(8):  # each forwarded request is answered; pipelined ones follow
        pending = h.pending_dials()
        if not pending:
            break
        for dial in pending:
            up = dial.accept()
            for sent in parse_requests(up.transport.data):
                assert len(sent.all("host")) == 1 and len(sent.all("x-request-id")) == 1, sent
                assert len(sent.all("x-forwarded-for")) == 1, sent
                assert not sent.names & NEVER_FORWARDED, sent.names
                assert not any(n.startswith("x-trailer-") for n in sent.names), sent.names
            up.respond(worker_response(body=b"{}", headers=[("Connection", "close")]))
    for response in c.responses():
        assert response.status != 500, c.received
    c.disconnect()
    h.check_no_writes_after_close()


# -- the routing-field decoder ------------------------------------------------------------------------

_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(
        st.sampled_from(["model", "user", "max_tokens", "max_completion_tokens", "messages", "x"]),
        inner, max_size=4)),
    max_leaves=30)


@FUZZ
@given(body=st.one_of(_json.map(lambda v: __import__("json").dumps(v).encode()), st.binary(max_size=200),
                      st.integers(1, 3000).map(lambda d: b"[" * d + b"]" * d)))
def test_the_routing_decoder_turns_any_body_into_a_route_or_a_router_error(h: Harness, body: bytes) -> None:
    request = Request(b"POST", b"/v1/chat/completions", True, True)
    request.body = body
    try:
        prepare(h.proc, request, dry_run=True)
    except RouterError as err:
        assert err.status in (400, 404, 503), err
        assert err.param is None or " " not in err.param, err.param  # a JSON path, not a message


def test_split_helper_keeps_bytes() -> None:
    assert b"".join(split(b"abcdefg", 3)) == b"abcdefg"
