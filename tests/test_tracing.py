"""W3C trace context through the router, on every data path, and the span it exports.

One router (started through the CLI) in front of mock workers on all four data paths: HTTP
regular (model ``m1``), HTTP PD two-phase (``pd``), gRPC regular (``g1``) and gRPC PD (``gpd``).
Each mock reports the fields (or gRPC metadata) of the last request it got, so a case sends a
request and reads what the worker saw. Rules: W3C Trace Context Level 1 (docs/tracing.md).
The in-process cases check the parsing and bounds, the fresh ids, and the span a
:class:`proxy_workers.serving.tracing.Tracer` makes (with the SDK's in-memory exporter; skipped
when the ``otel`` extra is not installed).
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DEADLINE, free_port, get_json, http, wait_for, worker_stats
from grpc_support import stats as grpc_stats

from proxy_workers.forwarding.request import Request
from proxy_workers.forwarding.tracecontext import (
    BATCH,
    bounded_tracestate,
    fresh_traceparent,
    parse_traceparent,
)
from shardgate import launch

TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01\Z")
CLIENT_TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
CLIENT_STATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


class Fleet:
    def __init__(self, tmp: Path) -> None:
        self.procs: list[launch.Launched] = []
        w = self._worker
        self.http = w("m1")
        self.prefill, self.decode = w("pd", "--role", "prefill"), w("pd", "--role", "decode")
        self.grpc = w("g1", "--grpc")
        self.gprefill = w("gpd", "--grpc", "--role", "prefill")
        self.gdecode = w("gpd", "--grpc", "--role", "decode")
        rows = [(self.http, "m1", "regular", "http"), (self.prefill, "pd", "prefill", "http"),
                (self.decode, "pd", "decode", "http"), (self.grpc, "g1", "regular", "grpc"),
                (self.gprefill, "gpd", "prefill", "grpc"), (self.gdecode, "gpd", "decode", "grpc")]
        config = tmp / "tracing.yaml"
        config.write_text(json.dumps({"workers": [{"url": p.url, "model": m, "type": t, "connection": c}
                                                  for p, m, t, c in rows]}))
        self.router = launch.router([], "--port", str(free_port()), "--proxies", "1", config=str(config))
        self.procs.append(self.router)
        wait_for(lambda: all(r["healthy"] for r in get_json(self.router.url + "/workers")["workers"]),
                 what="every worker healthy")

    def _worker(self, model: str, *extra: str) -> launch.Launched:
        proc = launch.mock_worker([model], *extra)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def chat(self, model: str, headers: dict[str, str] | None = None) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        status, _, data = http("POST", self.router.url + "/v1/chat/completions", body, headers=headers)
        assert status == 200, data

    def seen(self, model: str, headers: dict[str, str] | None = None) -> dict[str, str]:
        """The fields the HTTP worker of ``model`` got for one request sent with ``headers``."""
        self.chat(model, headers)
        return worker_stats(self.http)["last_headers"]

    def raw(self, fields: bytes) -> dict[str, str]:
        """Like :meth:`seen`, with the request's fields as raw bytes (repeats, Connection)."""
        body = json.dumps({"model": "m1", "messages": [{"role": "user", "content": "hi"}]}).encode()
        host, port = self.router.url.split("//")[1].split(":")
        with socket.create_connection((host, int(port)), timeout=DEADLINE) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
                         b"\r\n%sContent-Length: %d\r\n\r\n%s" % (fields, len(body), body))
            got = b""
            while b"\r\n\r\n" not in got:
                chunk = sock.recv(65536)
                assert chunk, got
                got += chunk
        assert got.startswith(b"HTTP/1.1 200"), got
        wait_for(lambda: worker_stats(self.http)["in_flight"] == 0, what="the worker done")
        return worker_stats(self.http)["last_headers"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("tracing"))
    try:
        yield f
    finally:
        f.stop()


# -- HTTP regular ----------------------------------------------------------------------------------


def test_without_a_traceparent_the_worker_gets_a_fresh_valid_one(fleet: Fleet) -> None:
    first = fleet.seen("m1")
    second = fleet.seen("m1")
    ids = []
    for seen in (first, second):
        match = TRACEPARENT.match(seen["traceparent"])
        assert match, seen
        assert match.group(1) != "0" * 32 and match.group(2) != "0" * 16
        assert "tracestate" not in seen
        ids.append(match.groups())
    assert ids[0][0] != ids[1][0] and ids[0][1] != ids[1][1]  # a new trace per request


def test_a_valid_traceparent_and_its_tracestate_reach_the_worker(fleet: Fleet) -> None:
    seen = fleet.seen("m1", {"traceparent": CLIENT_TP, "tracestate": CLIENT_STATE})
    # Not exporting spans, the router is not a participant: the client's context as it came.
    assert seen["traceparent"] == CLIENT_TP
    assert seen["tracestate"] == CLIENT_STATE


def test_a_not_sampled_traceparent_keeps_its_flags(fleet: Fleet) -> None:
    tp = CLIENT_TP[:-2] + "00"
    assert fleet.seen("m1", {"traceparent": tp})["traceparent"] == tp


def test_a_higher_version_is_read_as_version_00(fleet: Fleet) -> None:
    seen = fleet.seen("m1", {"traceparent": "cc" + CLIENT_TP[2:] + "-what-the-future-holds"})
    assert seen["traceparent"] == CLIENT_TP


@pytest.mark.parametrize("bad", [
    CLIENT_TP.upper(),                                          # hex must be lowercase
    "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # all-zero trace id
    "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # all-zero parent id
    "ff" + CLIENT_TP[2:],                                       # version ff is invalid
    CLIENT_TP + "-extra",                                       # version 00 has exactly 4 fields
    CLIENT_TP[:-1],                                             # too short
    "garbage",
])
def test_an_invalid_traceparent_is_replaced_and_its_tracestate_dropped(fleet: Fleet, bad: str) -> None:
    seen = fleet.seen("m1", {"traceparent": bad, "tracestate": CLIENT_STATE})
    match = TRACEPARENT.match(seen["traceparent"])
    assert match and match.group(1) != CLIENT_TP[3:35], seen
    assert "tracestate" not in seen


def test_two_traceparent_fields_are_invalid(fleet: Fleet) -> None:
    tp = CLIENT_TP.encode()
    seen = fleet.raw(b"traceparent: %s\r\ntraceparent: %s\r\n" % (tp, tp))
    assert TRACEPARENT.match(seen["traceparent"]) and seen["traceparent"][3:35] != CLIENT_TP[3:35]


def test_a_client_cannot_strip_the_routers_traceparent_through_connection(fleet: Fleet) -> None:
    # Named hop-by-hop, the client's traceparent is not forwarded; the router's own still is.
    seen = fleet.raw(b"traceparent: %s\r\nConnection: keep-alive, traceparent\r\n" % CLIENT_TP.encode())
    assert TRACEPARENT.match(seen["traceparent"]) and seen["traceparent"] != CLIENT_TP


def test_tracestate_is_bounded_and_checked(fleet: Fleet) -> None:
    many = ",".join(f"k{i}=v{i}" for i in range(40))
    seen = fleet.seen("m1", {"traceparent": CLIENT_TP, "tracestate": many})
    assert seen["tracestate"] == ",".join(f"k{i}=v{i}" for i in range(32))
    seen = fleet.seen("m1", {"traceparent": CLIENT_TP, "tracestate": "ok=1,Bad Key=2"})
    assert "tracestate" not in seen


def test_the_openai_client_carries_the_context_through(fleet: Fleet) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=fleet.router.url + "/v1", api_key="unused", max_retries=0)
    client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}],
                                   extra_headers={"traceparent": CLIENT_TP, "tracestate": CLIENT_STATE})
    seen = worker_stats(fleet.http)["last_headers"]
    assert seen["traceparent"] == CLIENT_TP and seen["tracestate"] == CLIENT_STATE
    client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}])
    assert TRACEPARENT.match(worker_stats(fleet.http)["last_headers"]["traceparent"])


# -- HTTP PD ---------------------------------------------------------------------------------------


def test_both_pd_legs_carry_the_same_context(fleet: Fleet) -> None:
    fleet.chat("pd", {"traceparent": CLIENT_TP, "tracestate": CLIENT_STATE})
    for leg in (fleet.prefill, fleet.decode):
        seen = worker_stats(leg)["last_headers"]
        assert seen["traceparent"] == CLIENT_TP and seen["tracestate"] == CLIENT_STATE, leg.url
    fleet.chat("pd")
    prefill, decode = (worker_stats(w)["last_headers"]["traceparent"] for w in (fleet.prefill, fleet.decode))
    assert TRACEPARENT.match(prefill) and prefill == decode  # one trace, one router span: both legs'


# -- gRPC ------------------------------------------------------------------------------------------


def test_grpc_workers_get_the_context_as_metadata(fleet: Fleet) -> None:
    fleet.chat("g1", {"traceparent": CLIENT_TP, "tracestate": CLIENT_STATE})
    seen = grpc_stats(fleet.grpc)["last_metadata"]
    assert seen["traceparent"] == CLIENT_TP and seen["tracestate"] == CLIENT_STATE
    fleet.chat("g1")
    seen = grpc_stats(fleet.grpc)["last_metadata"]
    assert TRACEPARENT.match(seen["traceparent"]) and "tracestate" not in seen


def test_both_grpc_pd_legs_carry_the_same_context(fleet: Fleet) -> None:
    fleet.chat("gpd", {"traceparent": CLIENT_TP})
    for leg in (fleet.gprefill, fleet.gdecode):
        assert grpc_stats(leg)["last_metadata"]["traceparent"] == CLIENT_TP, leg.url


# -- in process: the rules -------------------------------------------------------------------------


def test_fresh_traceparents_are_valid_and_distinct() -> None:
    values = [fresh_traceparent() for _ in range(3 * BATCH + 1)]  # across refills
    assert len(set(values)) == len(values)
    for value in values:
        assert TRACEPARENT.match(value.decode()), value
    # Every hex digit is used in the random positions (a translation-table slip would show here).
    assert set(b"".join(v[3:35] + v[36:52] for v in values)) == set(b"0123456789abcdef")


def test_parse_traceparent() -> None:
    tp = CLIENT_TP.encode()
    assert parse_traceparent([tp]) == (tp[3:35], tp[36:52], b"01")
    assert parse_traceparent([b"01" + tp[2:] + b"-x"]) == (tp[3:35], tp[36:52], b"01")
    assert parse_traceparent([tp, tp]) is None
    assert parse_traceparent([tp + b"-x"]) is None


def test_bounded_tracestate() -> None:
    assert bounded_tracestate([b"a=1 , b=2", b"c=3"]) == b"a=1,b=2,c=3"   # fields form one list
    assert bounded_tracestate([b"a=1,a=2"]) == b""                      # a repeated key
    assert bounded_tracestate([b"a=1,=2"]) == b""                       # a malformed member
    assert bounded_tracestate([b"t@sys=x,a=1,,"]) == b"t@sys=x,a=1"     # multi-tenant key, empties
    long = b"big=" + b"x" * 200
    members = [b"m%d=%s" % (i, b"v" * 20) for i in range(20)]
    out = bounded_tracestate([b",".join([long, *members])])
    assert long not in out and len(out) <= 512 and out.startswith(b"m0=")  # the long one goes first
    assert len(bounded_tracestate([b",".join([b"m%d=%s" % (i, b"v" * 60) for i in range(20)])])) <= 512


def test_request_reads_its_context_back_from_the_head() -> None:
    request = Request(b"POST", b"/v1/chat/completions", True, True)
    assert request.traceparent == b"" and request.tracestate == b""
    request.upstream_head = (b"a: b\r\ntracestate: k=v\r\nx-forwarded-for: 1.2.3.4\r\nx-request-id: r\r\n"
                             b"traceparent: " + CLIENT_TP.encode() + b"\r\n")
    assert request.traceparent == CLIENT_TP.encode() and request.tracestate == b"k=v"
    leg = request.with_body(b"{}")
    assert leg.traceparent == request.traceparent and leg.tracestate == b"k=v"


# -- in process: the span --------------------------------------------------------------------------


def _tracer() -> tuple[Any, Any]:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from proxy_workers.serving.tracing import Tracer

    exporter = InMemorySpanExporter()
    return Tracer(SimpleSpanProcessor(exporter)), exporter


def _request(traceparent: bytes, client: bytes | None = None) -> Request:
    request = Request(b"POST", b"/v1/chat/completions", True, True)
    request.upstream_head = b"tracestate: k=v\r\ntraceparent: " + traceparent + b"\r\n"
    request.headers = [(b"traceparent", client)] if client else []
    request.request_id = b"rid-7"
    return request


def test_the_span_is_the_workers_parent_and_the_clients_child() -> None:
    tracer, exporter = _tracer()
    ours = b"00-0af7651916cd43dd8448eb211c80319c-1111111111111111-01"
    now = time.monotonic()
    tracer.end(_request(ours, CLIENT_TP.encode()), model="m1", router="http_regular", policy="round_robin",
               worker="http://w:1", status=200, retries=1, started=now - 0.25, ended=now)
    (span,) = exporter.get_finished_spans()
    assert span.name == "POST /v1/chat/completions"
    assert span.context.trace_id == int(CLIENT_TP[3:35], 16) and span.context.span_id == 0x1111111111111111
    assert span.parent is not None and span.parent.span_id == int(CLIENT_TP[36:52], 16)
    assert span.context.trace_state.get("k") == "v"
    assert dict(span.attributes or {}) == {
        "http.request.method": "POST", "url.path": "/v1/chat/completions", "http.response.status_code": 200,
        "shardgate.request_id": "rid-7", "shardgate.retries": 1, "gen_ai.request.model": "m1",
        "shardgate.router": "http_regular", "shardgate.policy": "round_robin", "shardgate.worker": "http://w:1"}
    assert span.end_time is not None and span.start_time is not None
    assert abs((span.end_time - span.start_time) / 1e9 - 0.25) < 1e-3
    assert abs(span.end_time / 1e9 - time.time()) < 5


def test_a_fresh_trace_is_a_root_span_and_errors_are_marked() -> None:
    tracer, exporter = _tracer()
    fresh = fresh_traceparent()
    tracer.end(_request(fresh), model=None, router="", policy="", worker="", status=503, retries=0,
               started=1.0, ended=2.0)
    (span,) = exporter.get_finished_spans()
    assert span.parent is None and span.context.span_id == int(fresh[36:52], 16)
    assert span.status.status_code.name == "ERROR" and "shardgate.worker" not in (span.attributes or {})


def test_a_not_sampled_request_exports_nothing() -> None:
    tracer, exporter = _tracer()
    tracer.end(_request(CLIENT_TP[:-2].encode() + b"00"), model="m1", router="r", policy="p", worker="w",
               status=200, retries=0, started=1.0, ended=2.0)
    tracer.end(Request(b"GET", b"/", True, True), model="m1", router="r", policy="p", worker="w",
               status=400, retries=0, started=1.0, ended=2.0)
    assert exporter.get_finished_spans() == ()


def test_make_tracer_is_off_without_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy_workers.serving.tracing import make_tracer

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert make_tracer() is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert make_tracer() is None


# -- a router that exports spans -------------------------------------------------------------------


class Collector:
    """A real OTLP/HTTP endpoint on a thread: keeps each POST /v1/traces body, answers 200."""

    def __init__(self) -> None:
        import http.server
        import threading

        bodies = self.bodies = []  # type: list[bytes]

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # the stdlib's name
                bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list[Any]:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        out = []
        for body in list(self.bodies):
            msg = ExportTraceServiceRequest()
            msg.ParseFromString(body)
            out += [s for rs in msg.resource_spans for ss in rs.scope_spans for s in ss.spans]
        return out


@pytest.fixture(scope="module")
def exporting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, Collector]]:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    collector = Collector()
    worker = launch.mock_worker(["m1"])
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    router = launch.router([worker.url], "--port", str(free_port()), "--proxies", "1", env=env)
    try:
        wait_for(lambda: all(r["healthy"] for r in get_json(router.url + "/workers")["workers"]),
                 what="the worker healthy")
        yield router, worker, collector
    finally:
        router.stop()
        worker.stop()
        collector.server.shutdown()


def _chat(router: Any, headers: dict[str, str] | None = None) -> None:
    body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    status, _, data = http("POST", router.url + "/v1/chat/completions", body, headers=headers)
    assert status == 200, data


def test_an_exporting_router_makes_its_span_the_workers_parent(exporting: tuple[Any, Any, Collector]) -> None:
    router, worker, _ = exporting
    _chat(router, {"traceparent": CLIENT_TP, "tracestate": CLIENT_STATE})
    seen = worker_stats(worker)["last_headers"]
    match = TRACEPARENT.match(seen["traceparent"])
    assert match and match.group(1) == CLIENT_TP[3:35] and match.group(2) != CLIENT_TP[36:52]
    assert seen["tracestate"] == CLIENT_STATE


def test_an_exporting_router_sends_one_span_per_request(exporting: tuple[Any, Any, Collector]) -> None:
    router, worker, collector = exporting
    _chat(router, {"traceparent": CLIENT_TP})
    seen = TRACEPARENT.match(worker_stats(worker)["last_headers"]["traceparent"])
    assert seen
    span = wait_for(lambda: next((s for s in collector.spans() if s.span_id.hex() == seen.group(2)), None),
                    what="the router's span at the collector")
    assert span.trace_id.hex() == CLIENT_TP[3:35] and span.parent_span_id.hex() == CLIENT_TP[36:52]
    attributes = {a.key: a.value for a in span.attributes}
    assert attributes["gen_ai.request.model"].string_value == "m1"
    assert attributes["shardgate.worker"].string_value == worker.url
    assert attributes["http.response.status_code"].int_value == 200
