"""The router's timeouts for gRPC workers, end to end: connect, first message, idle stream, total.

The HTTP path's timeouts are tested in ``test_proxy_e2e``; these tests hold the gRPC path
(``proxy_workers/grpc/exchange.py``, its deadlines in ``proxy_workers/grpc/recovery.py``) to the
same contract: a timeout before anything reached the client is a 504 in OpenAI's error shape
and is not retried; after the head it truncates the SSE stream with an ``event: error``; either
way the worker is told to stop (the mock counts the call ``aborted``; the router also sends an
``Abort`` RPC, which a real engine needs to free the KV). Only a connect timeout is retried, on
another worker; with none left the answer is a 502 naming the reason.

A connect that never completes is produced on loopback by :class:`Blackhole`: a listener whose
accept queue is full, so the kernel drops every SYN as a dead host would; with the tests' 1 s
``connect_timeout`` the router's own timeout ends the attempt before gRPC's per-attempt connect
deadline (2 s, see ``proxy_workers/grpc/channels.py``).

Every router and mock worker is a real process (``shardgate.launch``); the mocks are
``shardgate mock-worker --grpc`` observed and reconfigured through their ``MockControl`` service.
Timeouts are short (1 s) so the tests run fast; waits poll with deadlines (``wait_for``) and no
assertion is about elapsed time.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    DEADLINE,
    Stream,
    assert_openai_error,
    chat,
    free_port,
    get_json,
    http,
    wait_for,
    worker_row,
)
from grpc_support import GrpcFleet, control, fresh_mocks, settled, stats

from shardgate import launch
from shardgate.mocks.payloads import expected_text

CHAT = "/v1/chat/completions"
# Passive health off (a test's injected failures must not eject a worker for the next test) and
# active checks rare (a probe of a blackholed worker must not mark it down mid-module).
QUIET = ("--passive-consecutive-failures", "0", "--passive-failure-rate", "0",
         "--health-interval", "600")
FAST = ("--connect-timeout", "1", "--first-byte-timeout", "1", "--idle-timeout", "1")
SILENT_AFTER_ONE = {"tps": 0.1}  # the first token at once, then 10 s of silence before the next


# -- the mocks, through MockControl ----------------------------------------------------------------


def total(workers: list[launch.Launched], key: str) -> int:
    return sum(stats(w)[key] for w in workers)


def saw_abort(worker: launch.Launched, rpc: bool = True) -> dict[str, Any] | None:
    """The mock's stats once its one call ended as aborted (and an Abort RPC arrived), else None."""
    s = stats(worker)
    done = s["aborted"] == 1 and s["in_flight"] == 0 and (s["abort_rpcs"] >= 1 or not rpc)
    return s if done else None


# -- the router's answers ----------------------------------------------------------------------


def streamed(router: launch.Launched, model: str) -> tuple[bytes, bytes]:
    """A streamed chat read until the router closes the connection: (head, de-chunked body)."""
    client = Stream(router.url, model)
    client.start()
    client.finish(DEADLINE)
    head, _, rest = client.data.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower(), head
    body = b""
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        body, rest = body + rest[:size], rest[size + 2:]
    return head, body


def events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e]


def deltas(body: bytes) -> list[str]:
    out = []
    for event in events(body):
        if event.startswith(b"data: {"):
            choices = json.loads(event[6:])["choices"]
            out += [c["delta"]["content"] for c in choices if "content" in c["delta"]]
    return out


def assert_truncated(head: bytes, body: bytes, setting: str) -> None:
    """A 200 stream cut short: no [DONE], and a last ``event: error`` naming ``setting``."""
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert b"data: [DONE]" not in body, body
    last = events(body)[-1]
    assert last.startswith(b"event: error\ndata: "), body
    err = assert_openai_error(last.split(b"data: ", 1)[1], "bad_gateway")
    assert "stream interrupted" in err["message"] and setting in err["message"], err


def retries(router: launch.Launched) -> int:
    return sum(p["retries"] for p in get_json(router.url + "/stats")["proxies"])


# -- a worker address whose connects time out ------------------------------------------------------


class Blackhole:
    """A loopback port that never completes a TCP handshake.

    Linux drops a SYN to a listener whose accept queue is full (unless ``tcp_abort_on_overflow``
    is set, when it resets instead): ``listen(0)`` holds one connection, the filler takes it and
    is never accepted, so every later connect hangs in SYN_SENT as it would to a dead host.
    """

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=0)
        self.address = self.listener.getsockname()
        self.filler = socket.create_connection(self.address, timeout=DEADLINE)
        self.url = f"grpc://127.0.0.1:{self.address[1]}"

    def drops_syns(self) -> bool:
        """True when a connect here hangs (checked once, before the router uses it)."""
        probe = socket.socket()
        probe.settimeout(0.2)
        try:
            probe.connect(self.address)
        except TimeoutError:
            return True
        except OSError:
            return False
        finally:
            probe.close()
        return False

    def close(self) -> None:
        self.filler.close()
        self.listener.close()


# -- the fleet -------------------------------------------------------------------------------------


class Fleet(GrpcFleet):
    """One router with 1 s connect/first-message/idle timeouts in front of gRPC mocks, one model per case."""

    def __init__(self, tmp: Path) -> None:
        super().__init__()
        self.holes: list[Blackhole] = []
        w = self.worker
        self.stalled = [w("gfirst", "--stall"), w("gfirst", "--stall")]  # two: a timeout is not retried
        self.idle = w("gidle")
        self.prefill, self.decode = w("gpd", "--role", "prefill"), w("gpd", "--role", "decode")
        self.live = w("gconn")
        self.hole, self.lone_hole = self.blackhole(), self.blackhole()
        self.refused = f"grpc://127.0.0.1:{free_port()}"
        rows = [(self.stalled[0].url, "gfirst", "regular"), (self.stalled[1].url, "gfirst", "regular"),
                (self.idle.url, "gidle", "regular"), (self.prefill.url, "gpd", "prefill"),
                (self.decode.url, "gpd", "decode"), (self.hole.url, "gconn", "regular"),
                (self.live.url, "gconn", "regular"), (self.lone_hole.url, "gblack", "regular"),
                (self.refused, "grefused", "regular")]
        lines = "".join(f'  - {{url: "{u}", model: {m}, type: {t}, connection: grpc}}\n' for u, m, t in rows)
        config = tmp / "grpc-timeouts.yaml"
        config.write_text("policy: round_robin\nworkers:\n" + lines)
        self.router = launch.router([], "--port", str(free_port()), "--proxies", "1", *FAST, *QUIET,
                                    config=str(config))
        self.started.append(self.router)

    def blackhole(self) -> Blackhole:
        hole = Blackhole()
        self.holes.append(hole)
        return hole

    def stop(self) -> None:
        super().stop()
        for hole in self.holes:
            hole.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("grpc-timeouts"))
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture
def fresh(fleet: Fleet) -> Iterator[Fleet]:
    """The fleet with every mock's counters zeroed and its config restored afterwards."""
    with fresh_mocks(fleet):
        yield fleet


# -- first message ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_first_byte_timeout_is_504_aborts_the_worker_and_is_not_retried(fresh: Fleet, stream: bool) -> None:
    # A stream's head waits for the first message too, so both get the JSON error, not an SSE one.
    status, headers, body = http("POST", fresh.router.url + CHAT, chat("gfirst", stream=stream))
    assert status == 504, body
    assert headers["content-type"] == "application/json" and headers["x-request-id"]
    err = assert_openai_error(body, "upstream_timeout")
    assert "first_byte_timeout" in err["message"], err
    (worker,) = [w for w in fresh.stalled if stats(w)["requests"]]  # exactly one was asked
    s = wait_for(lambda: saw_abort(worker), what="the stalled call aborted and an Abort RPC sent")
    assert s["completed"] == 0
    assert total(fresh.stalled, "requests") == 1  # the worker may still be generating: no retry
    assert wait_for(lambda: settled(fresh.router, *fresh.stalled), what="in-flight back to 0")


def test_pd_prefill_first_byte_timeout_is_504_and_decode_never_starts(fresh: Fleet) -> None:
    control(fresh.prefill, "Configure", {"stall": True})
    status, _, body = http("POST", fresh.router.url + CHAT, chat("gpd"))
    assert status == 504, body
    assert "first_byte_timeout" in assert_openai_error(body, "upstream_timeout")["message"]
    wait_for(lambda: saw_abort(fresh.prefill), what="the prefill leg aborted")
    assert stats(fresh.decode)["requests"] == 0
    assert wait_for(lambda: settled(fresh.router, fresh.prefill, fresh.decode), what="both legs settled")


# -- idle stream -----------------------------------------------------------------------------------


def test_idle_timeout_truncates_a_silent_stream_with_an_error_event(fresh: Fleet) -> None:
    control(fresh.idle, "Configure", SILENT_AFTER_ONE)
    head, body = streamed(fresh.router, "gidle")
    assert deltas(body) == [expected_text("hello", 1)]
    assert_truncated(head, body, "idle_timeout")
    s = wait_for(lambda: saw_abort(fresh.idle), what="the silent call aborted and an Abort RPC sent")
    assert s["completed"] == 0 and s["requests"] == 1
    assert wait_for(lambda: settled(fresh.router, fresh.idle), what="in-flight back to 0")


def test_pd_decode_idle_timeout_truncates_and_releases_both_legs(fresh: Fleet) -> None:
    control(fresh.decode, "Configure", SILENT_AFTER_ONE)
    head, body = streamed(fresh.router, "gpd")
    assert deltas(body) == [expected_text("hello", 1)]
    assert_truncated(head, body, "idle_timeout")
    wait_for(lambda: saw_abort(fresh.decode), what="the decode leg aborted")
    # The prefill call had ended (it answered its one token); its KV is released by an Abort.
    wait_for(lambda: stats(fresh.prefill)["abort_rpcs"] == 1, what="the prefill leg told to drop its KV")
    assert stats(fresh.prefill)["completed"] == 1
    assert wait_for(lambda: settled(fresh.router, fresh.prefill, fresh.decode), what="both legs settled")


def test_a_slow_but_steady_stream_is_not_cut_by_the_idle_timeout(fresh: Fleet) -> None:
    # 20 tokens a second: every gap is far inside idle_timeout, though the stream outlasts it.
    control(fresh.idle, "Configure", {"tps": 20, "output_tokens": 30})
    head, body = streamed(fresh.router, "gidle")
    assert head.startswith(b"HTTP/1.1 200 ") and events(body)[-1] == b"data: [DONE]", body
    assert "".join(deltas(body)) == expected_text("hello", 30)
    wait_for(lambda: stats(fresh.idle)["completed"] == 1, what="the stream counted complete")
    assert stats(fresh.idle)["aborted"] == 0


def test_a_client_that_stops_reading_holds_the_worker_back_and_is_not_the_workers_fault(
        fresh: Fleet) -> None:
    """Back-pressure on the gRPC path: while the client's socket is full, the proxy stops reading
    the worker's stream (HTTP/2 flow control then holds the worker), so a 200,000-token answer
    never completes; after idle_timeout the stream ends as a stalled client: the worker is told
    to stop and is not counted as failing."""
    control(fresh.idle, "Configure", {"tps": 0, "output_tokens": 200_000})
    errors_before = worker_row(fresh.router, fresh.idle.url)["errors"]
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", int(fresh.router.url.rsplit(":", 1)[1])))
    try:
        body = json.dumps({"model": "gidle", "stream": True,
                           "messages": [{"role": "user", "content": "hello"}]}).encode()
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
                       b"\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        client.settimeout(DEADLINE)
        assert client.recv(1024).startswith(b"HTTP/1.1 200 ")  # then it reads nothing more
        s = wait_for(lambda: saw_abort(fresh.idle), what="the held-back call aborted")
        assert s["completed"] == 0, s  # the worker never got to write its whole answer
        assert worker_row(fresh.router, fresh.idle.url)["errors"] == errors_before
        assert wait_for(lambda: settled(fresh.router, fresh.idle), what="in-flight back to 0")
    finally:
        client.close()


# -- total -----------------------------------------------------------------------------------------


def test_total_timeout_ends_busy_answers_and_stops_the_worker(start_worker, start_router,
                                                              tmp_path: Path) -> None:
    # A worker that never goes silent (10 tokens a second for minutes): only total_timeout ends it.
    busy = start_worker(["gtotal"], "--grpc", "--tps", "10", "--output-tokens", "5000")
    config = tmp_path / "total.yaml"
    config.write_text(f'workers:\n  - {{url: "{busy.url}", model: gtotal, connection: grpc}}\n')
    router = start_router([], "--total-timeout", "1.5", *QUIET, config=str(config))
    status, _, body = http("POST", router.url + CHAT, chat("gtotal"))
    assert status == 504, body
    assert "total_timeout" in assert_openai_error(body, "upstream_timeout")["message"]
    wait_for(lambda: saw_abort(busy, rpc=False), what="the worker to stop the first call")
    head, body = streamed(router, "gtotal")
    assert deltas(body), body  # tokens were flowing when the deadline cut the stream
    assert_truncated(head, body, "total_timeout")
    wait_for(lambda: (s := stats(busy))["aborted"] == 2 and s["in_flight"] == 0, what="the stream stopped")
    assert stats(busy)["completed"] == 0
    assert wait_for(lambda: settled(router, busy), what="in-flight back to 0")


# -- connect ---------------------------------------------------------------------------------------


def test_a_worker_whose_connect_hangs_is_skipped_for_another(fresh: Fleet) -> None:
    assert fresh.hole.drops_syns(), "this kernel answers SYNs to a full accept queue"
    before = retries(fresh.router)
    for i in range(4):  # round robin: some of these try the blackholed worker first
        status, headers, body = http("POST", fresh.router.url + CHAT, chat("gconn", content=f"c{i}"))
        assert status == 200, body
        assert json.loads(body)["choices"][0]["message"]["content"] == expected_text(f"c{i}", 16)
        assert headers["x-mock-worker"] == fresh.live.url.split("//", 1)[1]
    row = worker_row(fresh.router, fresh.hole.url)
    assert row["connect_errors"] >= 1 and row["in_flight"] == 0, row
    assert retries(fresh.router) > before
    assert stats(fresh.live)["completed"] == 4


@pytest.mark.parametrize("case", ["blackholed", "refused"])
def test_an_unreachable_worker_with_none_left_is_502_with_the_reason(fresh: Fleet, case: str) -> None:
    model, url = ("gblack", fresh.lone_hole.url) if case == "blackholed" else ("grefused", fresh.refused)
    if case == "blackholed":
        assert fresh.lone_hole.drops_syns(), "this kernel answers SYNs to a full accept queue"
    status, headers, body = http("POST", fresh.router.url + CHAT, chat(model, stream=True))
    assert status == 502, body
    assert headers["content-type"] == "application/json"
    err = assert_openai_error(body, "bad_gateway")
    # The reason names the worker and the connect failure: for the blackhole, the router's own
    # connect_timeout ("connect to URL timed out"), not an earlier give-up inside gRPC.
    assert url in err["message"] and "connect" in err["message"].lower(), err
    if case == "blackholed":
        assert "timed out" in err["message"], err
    row = worker_row(fresh.router, url)
    assert row["connect_errors"] >= 1 and row["in_flight"] == 0, row
