"""The gRPC routers (grpc_regular, grpc_pd) end to end, the gRPC mock worker, and the translation.

Every router and mock worker is a real process (``shardgate.launch``; the mock is
``shardgate mock-worker --grpc``). Clients speak OpenAI HTTP to the router, as they would to the
HTTP routers; the answers must carry exactly the HTTP mock's text for the same prompt
(``expected_text``). The mocks are observed through their test-only ``MockControl`` service
(stats, runtime config) over a plain synchronous gRPC channel. A PD answer that arrives at all
proves the handoff: a decode mock refuses any request without a KV handle a prefill mock signed
for that very prompt.

Passive health is off in these fleets, so a test's injected failures never eject a worker for the
next test. Waits poll with deadlines (``wait_for``); nothing sleeps and nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import DEADLINE, chat, free_port, get_json, http, wait_for, worker_row
from grpc_support import GrpcFleet, control, fresh_mocks, settled, stats, target

from proxy_workers.errors import BadRequest, NotFound
from proxy_workers.forwarding.handoff import PREFILL_KV
from proxy_workers.grpc.translate import (
    Plan,
    Renderer,
    decode_request,
    prefill_request,
    to_request,
    worker_error,
)
from shardgate import launch
from shardgate.mocks import grpc_worker as mock_grpc
from shardgate.mocks.payloads import expected_text, prompt_text_of
from shm.proto import worker_pb2 as pb
from shm.proto import worker_pb2_grpc as pbg

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
NO_PASSIVE = ("--passive-consecutive-failures", "0", "--passive-failure-rate", "0")
SLOW = ("--tps", "20", "--output-tokens", "2000")  # a stream on this worker lasts minutes


# -- talking to the mocks directly -----------------------------------------------------------------


def generate(worker: launch.Launched, req: pb.GenerateRequest) -> tuple[str, pb.Complete]:
    """Call Generate directly; (text, Complete) or the RpcError raised."""
    with grpc.insecure_channel(target(worker)) as channel:
        text, done = [], pb.Complete()
        for msg in pbg.WorkerStub(channel).Generate(req, timeout=DEADLINE):
            if msg.HasField("chunk"):
                text.append(msg.chunk.text)
            else:
                done = msg.complete
    return "".join(text), done


def chat_request(content: str = "hello", model: str = "gpd", kv: bytes = b"") -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id="direct", model=model, kind=pb.KIND_CHAT, kv_transfer_params=kv,
                              messages=[pb.ChatMessage(role="user", content=content)])


# -- talking to the router -------------------------------------------------------------------------


def sse_events(body: bytes) -> list[bytes]:
    return [e[6:] for e in body.split(b"\n\n") if e.startswith(b"data: ")]


def stream_text(body: bytes) -> str:
    out = []
    for event in sse_events(body):
        if event != b"[DONE]":
            for choice in json.loads(event)["choices"]:
                out.append(choice.get("delta", {}).get("content") or choice.get("text") or "")
    return "".join(out)


def post(router: launch.Launched, body: dict[str, Any], headers: dict[str, str] | None = None,
         path: str = CHAT) -> tuple[int, dict[str, str], bytes]:
    return http("POST", router.url + path, body, headers)


class Raw:
    """One raw HTTP/1.1 connection: send a request, read the head and the first bytes, hang up."""

    def __init__(self, router: launch.Launched, body: dict[str, Any]) -> None:
        host, port = target(router).rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=DEADLINE)
        data = json.dumps(body).encode()
        self.sock.sendall(b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (CHAT.encode(), len(data), data))
        self.buf = b""

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            data = self.sock.recv(65536)
            assert data, f"connection closed before {marker!r}: {self.buf!r}"
            self.buf += data
        return self.buf

    def close(self) -> None:
        self.sock.close()


# -- the fleet -------------------------------------------------------------------------------------


class Fleet(GrpcFleet):
    def __init__(self, tmp: Path) -> None:
        super().__init__()
        w = self.worker
        self.r1, self.r2 = w("g1"), w("g1")                                  # content, truncation
        self.r3 = w("gfail")                                                # + a dead worker
        self.slow = w("gslow", *SLOW)                                       # client disconnects
        self.p1, self.d1 = w("gpd", "--role", "prefill"), w("gpd", "--role", "decode")
        self.p2, self.d2 = w("gpdfail", "--role", "prefill"), w("gpdfail", "--role", "decode")
        self.p3, self.d3 = w("gpdslow", "--role", "prefill"), w("gpdslow", "--role", "decode", *SLOW)
        self.dead = f"grpc://127.0.0.1:{free_port()}"
        self.dead_prefill = f"grpc://127.0.0.1:{free_port()}"
        rows = [(self.r1, "g1", "regular"), (self.r2, "g1", "regular"), (self.r3, "gfail", "regular"),
                (self.dead, "gfail", "regular"), (self.slow, "gslow", "regular"),
                (self.p1, "gpd", "prefill"), (self.d1, "gpd", "decode"),
                (self.p2, "gpdfail", "prefill"), (self.dead_prefill, "gpdfail", "prefill"),
                (self.d2, "gpdfail", "decode"), (self.p3, "gpdslow", "prefill"),
                (self.d3, "gpdslow", "decode")]
        lines = "".join(f'  - {{url: "{u if isinstance(u, str) else u.url}", model: {m}, type: {t}, '
                        f'connection: grpc}}\n' for u, m, t in rows)
        config = tmp / "grpc.yaml"
        config.write_text("policy: round_robin\nworkers:\n" + lines)
        self.router = launch.router([], "--port", str(free_port()), "--proxies", "2", *NO_PASSIVE,
                                    config=str(config))
        self.started.append(self.router)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("grpc"))
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture
def fresh(fleet: Fleet) -> Iterator[Fleet]:
    """The fleet with every mock's counters zeroed and its config restored afterwards."""
    with fresh_mocks(fleet):
        yield fleet


# -- grpc_regular ----------------------------------------------------------------------------------


def test_routers_and_non_streamed_answers(fresh: Fleet) -> None:
    routers = {k: v for r in get_json(fresh.router.url + "/routers")["routers"] for k, v in r.items()}
    assert routers == {"grpc_regular": ["g1", "gfail", "gslow"], "grpc_pd": ["gpd", "gpdfail", "gpdslow"]}
    seen = set()
    for i in range(4):
        status, headers, raw = post(fresh.router, chat("g1", content=f"q{i}", max_tokens=5),
                                    {"X-Request-ID": f"rid-{i}", "X-Shardgate-Debug": "1"})
        assert status == 200, raw
        body = json.loads(raw)
        assert body["object"] == "chat.completion" and body["model"] == "g1"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": expected_text(f"q{i}", 5)}
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6}
        assert headers["x-request-id"] == f"rid-{i}" == headers["x-mock-request-id"]
        assert headers["content-length"] == str(len(raw))
        decision = json.loads(headers["x-shardgate-decision"])
        assert decision["router"] == "grpc_regular" and decision["worker"] in (fresh.r1.url, fresh.r2.url)
        seen.add(headers["x-mock-worker"])
    assert seen == {target(fresh.r1), target(fresh.r2)}  # round robin over both workers
    status, _, raw = post(fresh.router, {"model": "g1", "prompt": ["a b", "c"]}, path=COMPLETIONS)
    body = json.loads(raw)
    assert status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected_text("a b\nc", 16)
    assert body["usage"]["prompt_tokens"] == 3
    assert wait_for(lambda: settled(fresh.router, fresh.r1, fresh.r2), what="in-flight back to 0")


def test_streamed_answers_are_openai_sse(fresh: Fleet) -> None:
    body = chat("g1", content="stream me", stream=True, stream_options={"include_usage": True})
    status, headers, raw = post(fresh.router, body)
    assert status == 200 and headers["content-type"] == "text/event-stream"
    assert headers["transfer-encoding"] == "chunked" and "x-request-id" in headers
    events = sse_events(raw)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "g1" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert stream_text(raw) == expected_text("stream me", 16)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 16
    status, _, raw = post(fresh.router, {"model": "g1", "prompt": "p", "stream": True}, path=COMPLETIONS)
    assert status == 200 and stream_text(raw) == expected_text("p", 16)
    assert json.loads(sse_events(raw)[0])["object"] == "text_completion"
    assert "usage" not in json.loads(sse_events(raw)[-2])  # no usage chunk unless asked for


def test_requests_the_contract_cannot_carry_are_refused(fresh: Fleet) -> None:
    status, _, raw = post(fresh.router, chat("g1", n=2))
    assert status == 400 and json.loads(raw)["error"]["param"] == "n"
    status, _, raw = post(fresh.router, {"model": "g1", "input": "x"}, path="/v1/embeddings")
    assert status == 404 and "not served by gRPC workers" in json.loads(raw)["error"]["message"]
    control(fresh.r1, "Configure", {"fail_status": 400})
    control(fresh.r2, "Configure", {"fail_status": 400})
    status, _, raw = post(fresh.router, chat("g1"))  # a worker's refusal is relayed, not retried
    assert status == 400 and "INVALID_ARGUMENT" in json.loads(raw)["error"]["message"]
    assert stats(fresh.r1)["requests"] + stats(fresh.r2)["requests"] == 1


def test_failover_when_a_worker_is_down(fresh: Fleet) -> None:
    for i in range(4):
        stream = i % 2 == 1
        status, headers, raw = post(fresh.router, chat("gfail", content=f"f{i}", stream=stream))
        assert status == 200, raw
        assert headers["x-mock-worker"] == target(fresh.r3)
        text = stream_text(raw) if stream else json.loads(raw)["choices"][0]["message"]["content"]
        assert text == expected_text(f"f{i}", 16)
    dead = worker_row(fresh.router, fresh.dead)
    assert dead["errors"] >= 1 and dead["connect_errors"] >= 1 and dead["in_flight"] == 0
    assert sum(p["retries"] for p in get_json(fresh.router.url + "/stats")["proxies"]) >= 1


def test_worker_failure_before_any_byte_is_retried_after_it_truncates(fresh: Fleet) -> None:
    control(fresh.r1, "Configure", {"fail_status": 503})
    for _ in range(4):  # whichever worker round robin starts with, r2 answers
        status, headers, _ = post(fresh.router, chat("g1"))
        assert status == 200 and headers["x-mock-worker"] == target(fresh.r2)
    control(fresh.r1, "Configure", {"fail_status": 0, "drop_after": 3})
    control(fresh.r2, "Configure", {"drop_after": 3})
    status, _, raw = post(fresh.router, chat("g1"))  # non-streamed: nothing was sent yet
    assert status == 502 and "failed this request" in json.loads(raw)["error"]["message"]
    raw_client = Raw(fresh.router, chat("g1", stream=True))
    try:
        got = raw_client.read_until(b"event: error")
        assert got.startswith(b"HTTP/1.1 200 ") and got.count(b"data: {") >= 3
        assert b"[DONE]" not in got
        raw_client.read_until(b"stream interrupted")
    finally:
        raw_client.close()
    assert wait_for(lambda: settled(fresh.router, fresh.r1, fresh.r2), what="in-flight back to 0")


def test_client_disconnect_aborts_the_generation(fresh: Fleet) -> None:
    client = Raw(fresh.router, chat("gslow", stream=True))
    try:
        client.read_until(b"data: {")
        assert stats(fresh.slow)["in_flight"] == 1
        assert worker_row(fresh.router, fresh.slow.url)["in_flight"] == 1
    finally:
        client.close()
    s = wait_for(lambda: (st := stats(fresh.slow))["aborted"] == 1 and st["abort_rpcs"] >= 1 and st,
                 what="the mock to see the abort")
    assert s["completed"] == 0 and s["in_flight"] == 0
    assert wait_for(lambda: settled(fresh.router, fresh.slow), what="router in-flight back to 0")


# -- grpc_pd ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_pd_end_to_end(fresh: Fleet, stream: bool) -> None:
    content = f"pd question {stream}"
    status, headers, raw = post(fresh.router, chat("gpd", content=content, stream=stream),
                                {"X-Shardgate-Debug": "1"})
    assert status == 200, raw
    text = stream_text(raw) if stream else json.loads(raw)["choices"][0]["message"]["content"]
    assert text == expected_text(content, 16)
    decision = json.loads(headers["x-shardgate-decision"])
    assert decision["router"] == "grpc_pd" and decision["worker"] == fresh.d1.url
    assert decision["scores"]["prefill_worker"] == fresh.p1.url
    # The answer's last bytes leave the router when the Complete message arrives, which may be
    # before the mock's generator returns and counts the request: poll.
    wait_for(lambda: stats(fresh.p1)["completed"] == stats(fresh.d1)["completed"] == 1, what="both counted")
    prefill, decode = stats(fresh.p1), stats(fresh.d1)
    assert decode["refused"] == 0
    assert prefill["last_request"]["sampling"]["max_tokens"] == 1
    asked = json.loads(_b64(prefill["last_request"]["kv_transfer_params"]))
    assert asked == PREFILL_KV  # the same ask as HTTP PD's two-phase prefill
    handle = json.loads(_b64(decode["last_request"]["kv_transfer_params"]))
    assert handle["do_remote_prefill"] is True and handle["remote_engine_id"] == target(fresh.p1)
    assert wait_for(lambda: settled(fresh.router, fresh.p1, fresh.d1), what="both legs settled")


def _b64(value: str) -> str:
    """A bytes field of a request as the mock reports it (protobuf's JSON form: base64)."""
    return base64.b64decode(value).decode()


def test_decode_refuses_requests_without_a_prefill_handle(fresh: Fleet) -> None:
    with pytest.raises(grpc.RpcError) as missing:
        generate(fresh.d1, chat_request())
    assert missing.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    forged = json.dumps({"do_remote_prefill": True, "handle": "0" * 32}).encode()
    with pytest.raises(grpc.RpcError) as bad:
        generate(fresh.d1, chat_request(kv=forged))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    ask = b'{"do_remote_decode": true, "do_remote_prefill": false}'
    first, done = generate(fresh.p1, chat_request("other prompt", kv=ask))
    assert first == expected_text("other prompt", 1) and done.kv_transfer_params
    with pytest.raises(grpc.RpcError) as wrong_prompt:  # a real handle, for another prompt
        generate(fresh.d1, chat_request("hello", kv=done.kv_transfer_params))
    assert wrong_prompt.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    text, _ = generate(fresh.d1, chat_request("other prompt", kv=done.kv_transfer_params))
    assert text == expected_text("other prompt", 16)
    assert stats(fresh.d1)["refused"] == 3


def test_pd_prefill_down_uses_another_prefill(fresh: Fleet) -> None:
    for i in range(4):
        status, headers, raw = post(fresh.router, chat("gpdfail", content=f"x{i}", stream=i % 2 == 0),
                                    {"X-Shardgate-Debug": "1"})
        assert status == 200, raw
        assert json.loads(headers["x-shardgate-decision"])["scores"]["prefill_worker"] == fresh.p2.url
    wait_for(lambda: stats(fresh.p2)["completed"] == stats(fresh.d2)["completed"] == 4, what="4 pairs")
    assert worker_row(fresh.router, fresh.dead_prefill)["connect_errors"] >= 1


def test_pd_decode_failure_before_the_first_byte_gets_a_new_pair(fresh: Fleet) -> None:
    control(fresh.d2, "Configure", {"fail_status": 503})
    status, _, raw = post(fresh.router, chat("gpdfail"))
    assert status == 502, raw  # the only decode worker failed: no pair is left
    assert stats(fresh.d2)["refused"] == 1
    assert wait_for(lambda: settled(fresh.router, fresh.p2, fresh.d2), what="both legs settled")
    wait_for(lambda: stats(fresh.p2)["abort_rpcs"] >= 1, what="the failed pair's prefill told to drop its KV")


def test_pd_client_disconnect_cancels_both_legs(fresh: Fleet) -> None:
    client = Raw(fresh.router, chat("gpdslow", stream=True))  # decode streams for minutes
    try:
        client.read_until(b"data: {")
        assert worker_row(fresh.router, fresh.p3.url)["in_flight"] == 1  # prefill held until the end
        assert worker_row(fresh.router, fresh.d3.url)["in_flight"] == 1
    finally:
        client.close()
    wait_for(lambda: stats(fresh.d3)["aborted"] == 1, what="the decode leg aborted")
    wait_for(lambda: stats(fresh.p3)["abort_rpcs"] == 1, what="the prefill leg told to drop its KV")
    assert wait_for(lambda: settled(fresh.router, fresh.p3, fresh.d3), what="both legs settled")
    # A disconnect while the prefill runs: the prefill is cancelled and decode never starts.
    control(fresh.p3, "Configure", {"stall": True})
    client = Raw(fresh.router, chat("gpdslow", stream=True))
    try:
        wait_for(lambda: stats(fresh.p3)["in_flight"] == 1, what="the prefill to start")
    finally:
        client.close()
    wait_for(lambda: stats(fresh.p3)["aborted"] == 1, what="the prefill leg aborted")
    assert stats(fresh.d3)["requests"] == 1
    assert wait_for(lambda: settled(fresh.router, fresh.p3, fresh.d3), what="both legs settled")


# -- timeouts, health and discovery ----------------------------------------------------------------


def test_first_byte_timeout_answers_504_and_aborts(start_worker, start_router, tmp_path: Path) -> None:
    stalled = start_worker(["gt"], "--grpc", "--stall")
    config = tmp_path / "t.yaml"
    config.write_text(f'workers:\n  - {{url: "{stalled.url}", model: gt, connection: grpc}}\n')
    router = start_router([], "--first-byte-timeout", "0.5", *NO_PASSIVE, config=str(config))
    status, _, raw = post(router, chat("gt"))
    assert status == 504 and "first_byte_timeout" in json.loads(raw)["error"]["message"]
    wait_for(lambda: stats(stalled)["aborted"] == 1, what="the stalled call aborted")
    assert wait_for(lambda: settled(router, stalled), what="in-flight back to 0")


def test_grpc_probes(start_worker) -> None:
    from coordinator.health.grpc_probe import check_grpc_health, discover_grpc_models

    worker = start_worker(["a", "b"], "--grpc", "--role", "prefill")
    assert asyncio.run(check_grpc_health(worker.url, DEADLINE)) == ""
    assert asyncio.run(discover_grpc_models(worker.url, DEADLINE)) == ("a", "b")
    control(worker, "Configure", {"fail_health": True})
    assert "NOT_SERVING" in asyncio.run(check_grpc_health(worker.url, DEADLINE))
    dead = f"grpc://127.0.0.1:{free_port()}"
    assert "UNAVAILABLE" in asyncio.run(check_grpc_health(dead, DEADLINE))
    with pytest.raises(ValueError, match="GetModelInfo failed"):
        asyncio.run(discover_grpc_models(dead, DEADLINE))
    with grpc.insecure_channel(target(worker)) as channel:
        load = pbg.WorkerStub(channel).GetLoad(pb.LoadRequest(), timeout=DEADLINE)
    assert load.running == 0 and load.kv_usage == 0.0


def test_coordinator_checks_and_discovers_grpc_workers(start_worker, start_router, tmp_path: Path) -> None:
    worker = start_worker(["ga", "gb"], "--grpc")
    config = tmp_path / "h.yaml"
    config.write_text(f'workers:\n  - {{url: "{worker.url}", connection: grpc}}\n')  # models discovered
    router = start_router([], "--health-interval", "0.1", "--health-fall", "1", "--health-rise", "1",
                          *NO_PASSIVE, config=str(config))
    row = wait_for(lambda: (r := worker_row(router, worker.url))["models"] and r, what="discovery")
    assert row["models"] == ["ga", "gb"] and row["healthy"] and row["connection"] == "grpc"
    status, _, raw = post(router, chat("gb", content="d"))
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == expected_text("d", 16)
    control(worker, "Configure", {"fail_health": True})
    row = wait_for(lambda: not (r := worker_row(router, worker.url))["healthy"] and r, what="unhealthy")
    assert "NOT_SERVING" in row["health_reason"]
    assert post(router, chat("gb"))[0] == 503
    control(worker, "Configure", {"fail_health": False})
    wait_for(lambda: worker_row(router, worker.url)["healthy"], what="healthy again")
    assert post(router, chat("ga"))[0] == 200


# -- translation (pure) ----------------------------------------------------------------------------


def _req(body: dict[str, Any], path: bytes = CHAT.encode()) -> tuple[pb.GenerateRequest, Plan]:
    return to_request(path, json.dumps(body).encode(), body.get("model", "m"), "rid-1")


def test_chat_translation() -> None:
    body = {"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                    {"type": "image_url"},
                                                                    {"type": "text", "text": "b"}]}],
            "max_tokens": 9, "max_completion_tokens": 7, "temperature": 0.5, "top_p": 1,
            "stop": "END", "seed": 3, "user": "u", "stream": True, "stream_options": {"include_usage": True},
            "kv_transfer_params": {"x": 1}}
    req, plan = _req(body)
    assert plan == Plan("chat", "m", True, True)
    assert req.kind == pb.KIND_CHAT and req.request_id == "rid-1" and req.user == "u"
    assert [(m.role, m.content) for m in req.messages] == [("system", "be brief"), ("user", "ab")]
    assert req.sampling.max_tokens == 7 and req.sampling.temperature == 0.5 and req.sampling.top_p == 1
    assert list(req.sampling.stop) == ["END"] and req.sampling.seed == 3
    assert json.loads(req.kv_transfer_params) == {"x": 1}
    # The gRPC mock reads the same prompt text out of the message as the HTTP mock out of the JSON.
    assert mock_grpc.prompt_text(req) == prompt_text_of(body)
    bare, plan = _req({"model": "m", "messages": []})
    assert not bare.sampling.HasField("max_tokens") and plan == Plan("chat", "m", False, False)


def test_completion_translation_and_refusals() -> None:
    req, plan = _req({"model": "m", "prompt": ["x", "y"], "stop": ["a", "b"]}, COMPLETIONS.encode())
    assert req.kind == pb.KIND_COMPLETION and list(req.prompt) == ["x", "y"] and plan.kind == "completions"
    assert mock_grpc.prompt_text(req) == prompt_text_of({"prompt": ["x", "y"]})
    assert list(req.sampling.stop) == ["a", "b"]
    for path, body, param in [
        (COMPLETIONS, {"prompt": [1, 2]}, "prompt"),
        (COMPLETIONS, {"prompt": []}, "prompt"),
        (CHAT, {"messages": "hi"}, "messages"),
        (CHAT, {"messages": [], "n": 3}, "n"),
        (CHAT, {"messages": [], "max_tokens": -1}, "max_tokens"),
        (CHAT, {"messages": [], "temperature": "hot"}, "temperature"),
        (CHAT, {"messages": [], "stop": 5}, "stop"),
    ]:
        with pytest.raises(BadRequest) as err:
            _req(body, path.encode())
        assert err.value.param == param, body
    with pytest.raises(BadRequest):
        to_request(CHAT.encode(), b"{not json", "m", "r")
    with pytest.raises(NotFound):
        _req({"input": "x"}, b"/v1/embeddings")


def test_rendering_matches_the_http_shapes() -> None:
    usage = pb.Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5)
    render = Renderer(Plan("chat", "m", True, True))
    events = render.delta("a ") + render.delta("b ") + render.end("stop", usage)
    chunks = [json.loads(e) for e in sse_events(events)[:-1]]
    assert sse_events(events)[-1] == b"[DONE]" and stream_text(events) == "a b "
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "a "}
    assert chunks[1]["choices"][0]["delta"] == {"content": "b "}
    assert chunks[2]["choices"][0] == {"index": 0, "finish_reason": "stop", "logprobs": None, "delta": {}}
    assert chunks[3] == {"id": render.id, "object": "chat.completion.chunk", "created": render.created,
                         "model": "m", "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3,
                                                                "total_tokens": 5}}
    whole = json.loads(Renderer(Plan("completions", "m", False, False)).whole("t", "length", usage))
    assert whole["object"] == "text_completion" and whole["choices"][0]["text"] == "t"
    assert whole["usage"]["total_tokens"] == 5 and whole["id"].startswith("cmpl-")
    chat_whole = json.loads(Renderer(Plan("chat", "m", False, False)).whole("t", "stop", usage))
    assert chat_whole["object"] == "chat.completion"
    assert chat_whole["choices"][0]["message"] == {"role": "assistant", "content": "t"}


def test_pd_legs_and_error_mapping() -> None:
    req, _ = _req({"model": "m", "messages": [{"role": "user", "content": "q"}], "max_tokens": 50})
    ask = prefill_request(req)
    assert ask.sampling.max_tokens == 1 and req.sampling.max_tokens == 50
    assert json.loads(ask.kv_transfer_params) == PREFILL_KV
    handle = b'{"opaque": [1, 2], "remote_engine_id": "p"}'
    leg = decode_request(req, handle)
    assert leg.kv_transfer_params == handle and leg.sampling.max_tokens == 50 and leg.messages == req.messages
    assert worker_error("NOT_FOUND", "x").status == 404
    assert worker_error("RESOURCE_EXHAUSTED", "x").status == 429
    assert worker_error("PERMISSION_DENIED", "x").status == 502


# -- least_loaded on gRPC workers' own figures (GetLoad) -------------------------------------------


def engine_rows(router: launch.Launched, *workers: launch.Launched) -> list[dict[str, float]]:
    """The engine figures ``/workers`` shows for these workers (what least_loaded reads)."""
    keys = ("engine_running", "engine_waiting", "engine_kv_usage", "engine_scraped_at")
    return [{k: worker_row(router, w.url)[k] for k in keys} for w in workers]


def test_least_loaded_follows_grpc_workers_getload(start_worker, start_router, tmp_path: Path) -> None:
    busy = start_worker(["gl"], "--grpc", *SLOW)
    idle = start_worker(["gl"], "--grpc", *SLOW)
    config = tmp_path / "ll.yaml"
    rows = "".join(f'  - {{url: "{w.url}", model: gl, connection: grpc}}\n' for w in (busy, idle))
    config.write_text("models:\n  gl: {policy: least_loaded}\nworkers:\n" + rows)
    router = start_router([], "--metrics-interval", "0.2", *NO_PASSIVE, config=str(config))
    # A stream sent to the busy worker directly: the router's own counters know nothing of it, so
    # only the worker's GetLoad can tell the two apart.
    with grpc.insecure_channel(target(busy)) as channel:
        held = pbg.WorkerStub(channel).Generate(chat_request("hold", model="gl"), timeout=120)
        try:
            assert next(held).HasField("chunk")
            with grpc.insecure_channel(target(busy)) as direct:
                load = pbg.WorkerStub(direct).GetLoad(pb.LoadRequest(), timeout=DEADLINE)
            assert (load.running, load.waiting) == (1, 0) and load.kv_usage > 0.0
            assert worker_row(router, busy.url)["in_flight"] == 0

            def scraped() -> list[dict[str, float]] | None:
                rows = engine_rows(router, busy, idle)
                fresh = all(r["engine_scraped_at"] > 0 for r in rows) and rows[0]["engine_running"] == 1
                return rows if fresh else None

            hot, cold = wait_for(scraped, what="the coordinator to fetch both workers' GetLoad")
            assert (hot["engine_waiting"], hot["engine_kv_usage"]) == (0, pytest.approx(load.kv_usage))
            assert (cold["engine_running"], cold["engine_waiting"], cold["engine_kv_usage"]) == (0, 0, 0.0)
            for i in range(4):
                status, headers, raw = post(router, chat("gl", content=f"l{i}", max_tokens=1),
                                            {"X-Shardgate-Debug": "1"})
                assert status == 200, raw
                decision = json.loads(headers["x-shardgate-decision"])
                assert headers["x-mock-worker"] == target(idle), decision
                assert decision["reason"] == "fewest running + waiting requests (engine metrics)"
                assert not decision["fallback"]
        finally:
            held.cancel()
    wait_for(lambda: stats(busy)["aborted"] == 1, what="the held stream cancelled")
    assert stats(busy)["requests"] == 1 and stats(idle)["completed"] == 4


@contextlib.contextmanager
def scrape_rounds(specs: list[Any]) -> Iterator[tuple[Any, Any, Any, Callable[[], int]]]:
    """(fleet, board, channels, round): scrape rounds run as the coordinator runs them, in one loop
    with one :class:`LoadChannels`, over a fleet and a board of their own; closed after."""
    import aiohttp

    from coordinator.fleet import membership
    from coordinator.health import engine_metrics
    from coordinator.health.grpc_probe import LoadChannels
    from shm.loadboard import LoadBoard, board_size
    from shm.segment import Segment, new_instance_id, segment_name
    from shm.settings import Settings

    fleet = membership.Fleet(4)
    fleet.apply(specs)
    seg = Segment.create(segment_name(new_instance_id(), "board"), board_size(1, 4))
    board = LoadBoard.create(seg, 1, 4)
    channels = LoadChannels()

    async def round_() -> int:
        async with aiohttp.ClientSession() as session:
            return await engine_metrics.scrape_all(session, channels, fleet, board,
                                                   Settings(health_timeout=DEADLINE))

    try:
        with asyncio.Runner() as runner:  # grpc.aio channels belong to the loop that made them
            try:
                yield fleet, board, channels, lambda: runner.run(round_())
            finally:
                runner.run(channels.aclose())
    finally:
        board.close()
        seg.unlink()


def test_a_failed_getload_keeps_the_previous_figures(start_worker) -> None:
    """One scrape round over a live and a dead gRPC worker, then another after the live one died."""
    from shm.schema import WorkerSpec

    worker = start_worker(["gl"], "--grpc", *SLOW)
    dead = f"grpc://127.0.0.1:{free_port()}"
    specs = [WorkerSpec(url=u, model="gl", connection="grpc") for u in (worker.url, dead)]
    with scrape_rounds(specs) as (fleet, board, _, round_):
        slots = {s.spec.url: s.slot for s in fleet.states.values()}
        with grpc.insecure_channel(target(worker)) as channel:
            held = pbg.WorkerStub(channel).Generate(chat_request("hold", model="gl"), timeout=120)
            try:
                assert next(held).HasField("chunk")
                assert round_() == 1
            finally:
                held.cancel()
        first = board.engine(slots[worker.url])
        assert first["engine_running"] == 1 and first["engine_waiting"] == 0
        assert first["engine_kv_usage"] > 0 and first["engine_scraped_at"] > 0
        assert board.engine(slots[dead])["engine_scraped_at"] == 0.0
        worker.stop()
        assert round_() == 0  # over the channel kept from the first round, now broken
        assert board.engine(slots[worker.url]) == first


def test_getload_channels_are_kept_across_rounds_and_closed_when_a_worker_leaves(start_worker) -> None:
    """One channel per gRPC worker URL, the same one round after round; a worker that left the
    fleet has its channel closed at the next round (though it still runs); all close at the end."""
    from shm.schema import WorkerSpec

    shut = grpc.ChannelConnectivity.SHUTDOWN
    stays, leaves = start_worker(["gc"], "--grpc"), start_worker(["gc"], "--grpc")
    specs = [WorkerSpec(url=w.url, model="gc", connection="grpc") for w in (stays, leaves)]
    with scrape_rounds(specs) as (fleet, _, channels, round_):
        assert round_() == 2
        first = dict(channels.channels)
        assert set(first) == {stays.url, leaves.url}
        assert round_() == 2
        assert channels.channels == first and all(channels.channels[u] is c for u, c in first.items())
        fleet.apply(specs[:1])
        assert round_() == 1
        assert list(channels.channels) == [stays.url] and channels.channels[stays.url] is first[stays.url]
        assert list(channels.stubs) == [stays.url]
        assert first[leaves.url].get_state() == shut  # closed, not merely idle
        assert first[stays.url].get_state() != shut
    assert first[stays.url].get_state() == shut  # and all of them when the coordinator stops
    assert not channels.channels and not channels.stubs
