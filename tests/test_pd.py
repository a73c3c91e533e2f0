"""End-to-end tests of the HTTP prefill/decode (PD) router, both dialects, through the real CLI.

Every router and mock worker is a real process (``shardgate.launch``); the mocks play their PD
roles honestly (``shardgate.mocks.pd_worker``): in two-phase mode a decode worker refuses a KV handle no
prefill worker issued for that prompt (400), in bootstrap mode it waits for its room's prefill
(504 after a timeout). So a request that succeeds proves the handoff happened as the dialect says.

Which workers served a PD request is read from the decision (``X-Shardgate-Debug: 1``: ``worker`` is
the decode worker, ``scores.prefill_worker`` the prefill worker) and from the mocks' own counters
and last request bodies (``GET /mock/stats``). Passive health is off in the fault-injection
fleets, so a test's injected failures never eject a worker for the next test.

Waits poll with deadlines (``wait_for``); nothing sleeps and nothing asserts on elapsed time.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import DEADLINE, chat, free_port, get_json, http, set_worker, wait_for, worker_stats

from shardgate import launch
from shardgate.mocks import pd_worker as mock_pd
from shardgate.mocks.payloads import expected_text

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
DEFAULTS = {"ttft": 0.0, "tps": 0.0, "output_tokens": 16, "fail_status": 0, "stall": False,
            "drop_after": -1, "fail_health": False}
NO_PASSIVE = ("--passive-consecutive-failures", "0", "--passive-failure-rate", "0")
DEBUG = {"X-Shardgate-Debug": "1"}


# -- a raw HTTP/1.1 client for streams (cut streams and disconnects need the socket) ---------------


@dataclass
class Streamed:
    status: int
    headers: dict[str, str]
    body: bytes  # de-chunked
    complete: bool  # False when the connection ended before the terminating chunk


class Raw:
    def __init__(self, url: str) -> None:
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=DEADLINE)
        self.buf = b""

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def post(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        lines = [f"POST {path} HTTP/1.1", "Host: pd.test", "Content-Type: application/json",
                 f"Content-Length: {len(data)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
        self.sock.sendall("\r\n".join(lines).encode() + b"\r\n\r\n" + data)

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        self.buf += data
        return bool(data)

    def _until(self, marker: bytes) -> bytes | None:
        while (i := self.buf.find(marker)) < 0:
            if not self._fill():
                return None
        out, self.buf = self.buf[:i + len(marker)], self.buf[i + len(marker):]
        return out

    def head(self) -> tuple[int, dict[str, str]]:
        raw = self._until(b"\r\n\r\n")
        assert raw is not None, f"connection closed before a response head ({self.buf!r})"
        lines = raw.decode("latin-1").split("\r\n")[:-2]
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        return int(lines[0].split(" ", 2)[1]), headers

    def chunk(self) -> bytes | None:
        """The next chunk's payload; b"" for the terminating chunk; None if the connection ended."""
        line = self._until(b"\r\n")
        if line is None:
            return None
        size = int(line.split(b";")[0], 16)
        while len(self.buf) < size + 2:
            if not self._fill():
                return None
        data, self.buf = self.buf[:size], self.buf[size + 2:]
        return data

    def until_first_data_event(self) -> bytes:
        got = b""
        while not data_events(got):
            chunk = self.chunk()
            assert chunk, f"stream ended before its first event ({got!r})"
            got += chunk
        return got

    def rest(self, status: int, headers: dict[str, str], got: bytes = b"") -> Streamed:
        assert headers.get("transfer-encoding") == "chunked", headers
        while chunk := self.chunk():
            got += chunk
        return Streamed(status, headers, got, chunk == b"")


def data_events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e.startswith(b"data: ")]


def stream_text(body: bytes) -> str:
    out = []
    for event in data_events(body):
        if event != b"data: [DONE]":
            for choice in json.loads(event[6:])["choices"]:
                out.append(choice.get("delta", {}).get("content") or choice.get("text") or "")
    return "".join(out)


# -- fleets ----------------------------------------------------------------------------------------


def name_of(worker: launch.Launched) -> str:
    """What the mock calls itself (X-Mock-Worker, remote_engine_id): host:port."""
    return worker.url.split("//", 1)[1]


def port_of(worker: launch.Launched) -> int:
    return int(worker.url.rsplit(":", 1)[1])


class Fleet:
    """Mock workers (by name) and one router built from a YAML deployment file."""

    def __init__(self, tmp: Path, dialect: str = "two_phase") -> None:
        self.tmp = tmp
        self.dialect = dialect
        self.procs: list[launch.Launched] = []
        self.w: dict[str, launch.Launched] = {}
        self.entries: list[dict[str, Any]] = []
        self.router: launch.Launched | None = None

    def worker(self, name: str, role: str, model: str = "llama", *extra: str, bootstrap: bool = False,
               ) -> launch.Launched:
        w = launch.mock_worker([model], "--role", role, *extra)
        self.procs.append(w)
        self.w[name] = w
        entry: dict[str, Any] = {"url": w.url, "model": model, "type": role}
        if bootstrap:  # the mock's bootstrap server is its own port (GET /mock/bootstrap/{room})
            entry["bootstrap_port"] = port_of(w)
        self.entries.append(entry)
        return w

    def start(self, *flags: str, models: dict[str, Any] | None = None,
              extra_entries: tuple[dict[str, Any], ...] = ()) -> launch.Launched:
        path = self.tmp / "deploy.yaml"
        doc = {"workers": self.entries + list(extra_entries), "models": models or {}}
        path.write_text(json.dumps(doc, indent=1))  # JSON is YAML
        self.router = launch.router([], "--port", str(free_port()), "--proxies", "1", *flags,
                                    config=str(path))
        self.procs.append(self.router)
        return self.router

    @property
    def url(self) -> str:
        assert self.router is not None
        return self.router.url

    def worker_rows(self) -> dict[str, dict[str, Any]]:
        return {row["url"]: row for row in get_json(self.url + "/workers")["workers"]}

    def reset(self) -> None:
        """Default config and zero counters on every mock; the router idle, every worker healthy."""
        for w in self.w.values():
            if w.popen.poll() is not None:
                continue
            set_worker(w, **DEFAULTS)
            wait_for(lambda w=w: worker_stats(w)["in_flight"] == 0, what=f"{w.url} idle")
            status, _, body = http("POST", w.url + "/mock/reset", {})
            assert status == 200, body
        wait_for(lambda: all(r["in_flight"] == 0 and r["healthy"] for r in self.worker_rows().values()),
                 what="the router's workers idle and healthy")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def pd_fleet(tmp: Path, dialect: str) -> Fleet:
    """Two prefill (p1, p2) and two decode (d1, d2) workers of model llama, in ``dialect``."""
    f = Fleet(tmp, dialect)
    try:
        for name in ("p1", "p2"):
            f.worker(name, "prefill", bootstrap=dialect == "bootstrap")
        for name in ("d1", "d2"):
            f.worker(name, "decode")
        f.start(*NO_PASSIVE, models={"llama": {"pd_dialect": dialect}})
    except BaseException:
        f.stop()
        raise
    return f


@pytest.fixture(scope="module")
def _two_phase(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = pd_fleet(tmp_path_factory.mktemp("two_phase"), "two_phase")
    yield f
    f.stop()


@pytest.fixture(scope="module")
def _bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = pd_fleet(tmp_path_factory.mktemp("bootstrap"), "bootstrap")
    yield f
    f.stop()


@pytest.fixture
def two_phase(_two_phase: Fleet) -> Fleet:
    _two_phase.reset()
    return _two_phase


@pytest.fixture
def bootstrap(_bootstrap: Fleet) -> Fleet:
    _bootstrap.reset()
    return _bootstrap


@pytest.fixture(params=["two_phase", "bootstrap"])
def pd(request: pytest.FixtureRequest) -> Fleet:
    """The two-phase fleet, then the bootstrap fleet."""
    f = request.getfixturevalue("_" + request.param)
    f.reset()
    return f


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """An empty fleet for a test that builds (and may break) its own deployment."""
    f = Fleet(tmp_path)
    yield f
    f.stop()


def by_url(f: Fleet, url: str) -> launch.Launched:
    return next(w for w in f.w.values() if w.url == url)


def send(f: Fleet, body: dict[str, Any], path: str = CHAT) -> tuple[int, dict[str, str], bytes, dict]:
    """One request with the decision header on; (status, headers, body, decision or {})."""
    status, headers, raw = http("POST", f.url + path, body, DEBUG)
    decision = json.loads(headers["x-shardgate-decision"]) if "x-shardgate-decision" in headers else {}
    return status, headers, raw, decision


def pair_of(f: Fleet, decision: dict) -> tuple[launch.Launched, launch.Launched]:
    """(prefill, decode) workers named by a PD decision."""
    assert decision["router"] == "http_pd", decision
    return by_url(f, decision["scores"]["prefill_worker"]), by_url(f, decision["worker"])


def answer_text(raw: bytes) -> str:
    choice = json.loads(raw)["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def bootstrap_triple(body: dict[str, Any]) -> tuple[Any, Any, Any]:
    return body["bootstrap_host"], body["bootstrap_port"], body["bootstrap_room"]


def requests_of(*workers: launch.Launched) -> list[int]:
    return [worker_stats(w)["requests"] for w in workers]


def retries(f: Fleet) -> int:
    """The router's count of retries (for PD: replacement prefill workers and new pairs)."""
    return get_json(f.url + "/stats")["totals"]["retries"]


def all_settled(f: Fleet) -> None:
    """Wait until the router's load board shows nothing in flight on any worker."""
    wait_for(lambda: all(r["in_flight"] == 0 for r in f.worker_rows().values()),
             what="every leg settled on the load board")


# -- 1 + 8. the seed's example deployment -----------------------------------------------------------


def test_seed_deployment_routers_and_each_model_takes_its_preferred_router(fleet: Fleet) -> None:
    fleet.worker("llama_regular", "regular", "llama-3.1-8b")
    fleet.worker("llama_prefill", "prefill", "llama-3.1-8b")
    fleet.worker("llama_decode", "decode", "llama-3.1-8b")
    fleet.worker("qwen", "regular", "qwen-2.5")
    mistral = launch.mock_worker(["mistral-7b"], "--grpc")  # a real gRPC worker, as in the seed
    try:
        grpc = {"url": mistral.url, "model": "mistral-7b", "type": "regular", "connection": "grpc"}
        fleet.start(extra_entries=(grpc,))
        _check_seed_deployment(fleet)
    finally:
        mistral.stop()


def _check_seed_deployment(fleet: Fleet) -> None:

    routers: dict[str, list[str]] = {}
    for entry in get_json(fleet.url + "/routers")["routers"]:
        routers.update(entry)
    assert routers == {"http_regular": ["llama-3.1-8b", "qwen-2.5"], "http_pd": ["llama-3.1-8b"],
                       "grpc_regular": ["mistral-7b"]}

    # llama-3.1-8b: PD is preferred; the decode worker answers, the regular llama worker is idle.
    prompt = "seed llama"
    status, headers, raw, decision = send(fleet, chat("llama-3.1-8b", content=prompt, max_tokens=6))
    assert status == 200, raw
    assert decision["router"] == "http_pd"
    assert decision["worker"] == fleet.w["llama_decode"].url
    assert decision["scores"]["prefill_worker"] == fleet.w["llama_prefill"].url
    assert headers["x-mock-worker"] == name_of(fleet.w["llama_decode"])
    assert answer_text(raw) == expected_text(prompt, 6)
    assert worker_stats(fleet.w["llama_prefill"])["completed"] == 1
    assert worker_stats(fleet.w["llama_decode"])["completed"] == 1
    assert worker_stats(fleet.w["llama_regular"])["requests"] == 0

    # qwen-2.5: only a regular HTTP worker, next to the PD model (backward compatible).
    prompt = "seed qwen"
    status, headers, raw, decision = send(fleet, chat("qwen-2.5", content=prompt, max_tokens=4))
    assert status == 200, raw
    assert decision["router"] == "http_regular"
    assert headers["x-mock-worker"] == name_of(fleet.w["qwen"])
    assert answer_text(raw) == expected_text(prompt, 4)
    assert worker_stats(fleet.w["qwen"])["completed"] == 1
    assert worker_stats(fleet.w["llama_regular"])["requests"] == 0
    assert [worker_stats(fleet.w[n])["requests"] for n in ("llama_prefill", "llama_decode")] == [1, 1]

    # mistral-7b: its only worker speaks gRPC; the answer comes back as the same OpenAI JSON.
    prompt = "seed mistral"
    status, headers, raw, decision = send(fleet, chat("mistral-7b", content=prompt, max_tokens=5))
    assert status == 200, raw
    assert decision["router"] == "grpc_regular"
    assert answer_text(raw) == expected_text(prompt, 5)


# -- 2. two-phase (vLLM) end to end -----------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_two_phase_end_to_end(two_phase: Fleet, stream: bool) -> None:
    prompt = f"two-phase {stream}"
    body = chat("llama", content=prompt, stream=stream, max_tokens=5, temperature=0.25)
    if stream:
        body["stream_options"] = {"include_usage": True}
    status, headers, raw, decision = send(two_phase, body)
    assert status == 200, raw
    prefill, decode = pair_of(two_phase, decision)
    assert headers["x-mock-worker"] == name_of(decode)
    if stream:
        assert headers["content-type"].startswith("text/event-stream")
        assert stream_text(raw) == expected_text(prompt, 5)
        assert data_events(raw)[-1] == b"data: [DONE]"
        usage = json.loads(data_events(raw)[-2][6:])["usage"]  # include_usage reached the decode
        assert usage["completion_tokens"] == 5
    else:
        assert answer_text(raw) == expected_text(prompt, 5)

    sent_prefill = worker_stats(prefill)["last_body"]
    assert sent_prefill["messages"] == body["messages"] and sent_prefill["temperature"] == 0.25
    assert sent_prefill["max_tokens"] == 1 and sent_prefill["max_completion_tokens"] == 1
    assert sent_prefill["stream"] is False
    assert "stream_options" not in sent_prefill
    assert sent_prefill["kv_transfer_params"]["do_remote_decode"] is True
    assert sent_prefill["kv_transfer_params"]["do_remote_prefill"] is False
    assert not any(k.startswith("bootstrap_") for k in sent_prefill)

    sent_decode = worker_stats(decode)["last_body"]
    # The prefill's handle, verbatim (the mock issues it deterministically for this prompt).
    assert sent_decode["kv_transfer_params"] == mock_pd.issue(name_of(prefill), prompt)
    assert sent_decode["kv_transfer_params"]["handle"]
    # Everything else is the client's original request.
    original = {k: v for k, v in sent_decode.items() if k != "kv_transfer_params"}
    assert original == body
    assert [worker_stats(w)["completed"] for w in (prefill, decode)] == [1, 1]
    others = [w for w in two_phase.w.values() if w not in (prefill, decode)]
    assert requests_of(*others) == [0, 0]


def test_two_phase_batched_completions(two_phase: Fleet) -> None:
    body = {"model": "llama", "prompt": ["a", "b"], "max_tokens": 3}
    status, _, raw, decision = send(two_phase, body, COMPLETIONS)
    assert status == 200, raw
    prefill, decode = pair_of(two_phase, decision)
    assert answer_text(raw) == expected_text("a\nb", 3)
    assert worker_stats(prefill)["last_body"]["prompt"] == ["a", "b"]
    assert worker_stats(decode)["last_body"]["kv_transfer_params"] == mock_pd.issue(name_of(prefill), "a\nb")


# -- 3. bootstrap (SGLang) end to end ---------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_bootstrap_end_to_end(bootstrap: Fleet, stream: bool) -> None:
    rooms = set()
    for i in range(2):  # two requests: a fresh room each
        prompt = f"bootstrap {stream} {i}"
        body = chat("llama", content=prompt, stream=stream, max_tokens=4)
        status, headers, raw, decision = send(bootstrap, body)
        assert status == 200, raw
        prefill, decode = pair_of(bootstrap, decision)
        assert headers["x-mock-worker"] == name_of(decode)
        if stream:
            assert stream_text(raw) == expected_text(prompt, 4)
            assert data_events(raw)[-1] == b"data: [DONE]"
        else:
            assert answer_text(raw) == expected_text(prompt, 4)
        sent_prefill, sent_decode = (worker_stats(w)["last_body"] for w in (prefill, decode))
        host, port, room = bootstrap_triple(sent_decode)
        assert bootstrap_triple(sent_prefill) == (host, port, room)
        assert host == "127.0.0.1"
        assert port == port_of(prefill)  # the prefill worker's configured bootstrap_port
        assert isinstance(room, int) and 0 <= room < 2**63
        rooms.add(room)
        # Both legs got the client's request otherwise unchanged (no two-phase rewriting).
        for sent in (sent_prefill, sent_decode):
            assert {k: v for k, v in sent.items() if not k.startswith("bootstrap_")} == body
        status, _, _ = http("GET", f"{prefill.url}/mock/bootstrap/{room}")
        assert status == 200  # the prefill really arrived for this room
    assert len(rooms) == 2


def test_bootstrap_batched_completions_get_one_room_per_item(bootstrap: Fleet) -> None:
    body = {"model": "llama", "prompt": ["a", "b"], "max_tokens": 3}
    status, _, raw, decision = send(bootstrap, body, COMPLETIONS)
    assert status == 200, raw
    prefill, decode = pair_of(bootstrap, decision)
    assert answer_text(raw) == expected_text("a\nb", 3)
    sent_prefill, sent_decode = (worker_stats(w)["last_body"] for w in (prefill, decode))
    hosts, ports, rooms = bootstrap_triple(sent_decode)
    assert bootstrap_triple(sent_prefill) == (hosts, ports, rooms)
    assert hosts == ["127.0.0.1", "127.0.0.1"]
    assert ports == [port_of(prefill)] * 2
    assert len(rooms) == 2 and len(set(rooms)) == 2
    assert all(isinstance(r, int) and 0 <= r < 2**63 for r in rooms)


def test_global_pd_dialect_applies_to_models_that_set_none(fleet: Fleet) -> None:
    """``--pd-dialect bootstrap`` (what ``--pd-disaggregation`` sets) reaches a model without its own
    ``pd_dialect``; a model that says ``two_phase`` outright keeps it."""
    for model in ("llama", "qwen"):
        fleet.worker(f"p-{model}", "prefill", model, bootstrap=True)
        fleet.worker(f"d-{model}", "decode", model)
    fleet.start(*NO_PASSIVE, "--pd-dialect", "bootstrap", models={"llama": {"pd_dialect": "two_phase"}})
    for model, dialect in (("llama", "two_phase"), ("qwen", "bootstrap")):
        prompt = f"global dialect {model}"
        status, _, raw, decision = send(fleet, chat(model, content=prompt, max_tokens=3))
        assert status == 200, raw
        prefill, decode = pair_of(fleet, decision)
        assert (prefill, decode) == (fleet.w[f"p-{model}"], fleet.w[f"d-{model}"])
        sent_prefill, sent_decode = (worker_stats(w)["last_body"] for w in (prefill, decode))
        if dialect == "bootstrap":
            assert bootstrap_triple(sent_prefill) == bootstrap_triple(sent_decode)
            assert "kv_transfer_params" not in sent_prefill
        else:
            assert sent_decode["kv_transfer_params"] == mock_pd.issue(name_of(prefill), prompt)
            assert not any(k.startswith("bootstrap_") for k in (*sent_prefill, *sent_decode))


# -- 4. failures ------------------------------------------------------------------------------------


def test_two_phase_failed_prefill_is_replaced_by_another_prefill(two_phase: Fleet) -> None:
    p1, p2 = two_phase.w["p1"], two_phase.w["p2"]
    set_worker(p1, fail_status=500)
    retried = retries(two_phase)
    for i in range(4):  # round-robin: p1 is some request's first pick
        prompt = f"prefill fails {i}"
        status, _, raw, decision = send(two_phase, chat("llama", content=prompt, max_tokens=3))
        assert status == 200, raw
        assert answer_text(raw) == expected_text(prompt, 3)
        assert decision["scores"]["prefill_worker"] == p2.url
        assert worker_stats(by_url(two_phase, decision["worker"]))["last_body"]["kv_transfer_params"] \
            == mock_pd.issue(name_of(p2), prompt)
    failed = worker_stats(p1)
    assert failed["requests"] >= 1 and failed["completed"] == 0
    assert worker_stats(p2)["completed"] == 4
    decodes = [worker_stats(two_phase.w[n]) for n in ("d1", "d2")]
    assert sum(d["requests"] for d in decodes) == 4  # decode started only after a good prefill
    assert retries(two_phase) >= retried + 1


def test_two_phase_stopped_prefill_is_replaced_by_another_prefill(fleet: Fleet) -> None:
    p1 = fleet.worker("p1", "prefill")
    p2 = fleet.worker("p2", "prefill")
    d = fleet.worker("d", "decode")
    fleet.start("--health-interval", "60", *NO_PASSIVE)  # the router still believes p1 is up
    p1.stop()
    for i in range(4):
        prompt = f"prefill stopped {i}"
        status, _, raw, decision = send(fleet, chat("llama", content=prompt, max_tokens=3))
        assert status == 200, raw
        assert answer_text(raw) == expected_text(prompt, 3)
        assert decision["scores"]["prefill_worker"] == p2.url
    assert worker_stats(p2)["completed"] == 4 and worker_stats(d)["completed"] == 4
    row = fleet.worker_rows()[p1.url]
    assert row["connect_errors"] >= 1 and row["in_flight"] == 0


def test_bootstrap_failed_prefill_cancels_decode_and_uses_a_new_pair(bootstrap: Fleet) -> None:
    p1, p2 = bootstrap.w["p1"], bootstrap.w["p2"]
    set_worker(p1, fail_status=500)  # refuses before marking its room: the decode would wait
    for i in range(4):
        prompt = f"bootstrap prefill fails {i}"
        status, _, raw, decision = send(bootstrap, chat("llama", content=prompt, max_tokens=3))
        assert status == 200, raw
        assert answer_text(raw) == expected_text(prompt, 3)
        assert decision["scores"]["prefill_worker"] == p2.url
        room = worker_stats(by_url(bootstrap, decision["worker"]))["last_body"]["bootstrap_room"]
        assert worker_stats(p2)["last_body"]["bootstrap_room"] == room
    assert worker_stats(p1)["requests"] >= 1 and worker_stats(p1)["completed"] == 0
    assert worker_stats(p2)["completed"] == 4
    all_settled(bootstrap)


def test_decode_failing_before_first_byte_gets_a_new_pair(pd: Fleet) -> None:
    f, dialect = pd, pd.dialect
    d1, d2 = f.w["d1"], f.w["d2"]
    set_worker(d1, drop_after=0)  # non-streaming: the connection drops before any response byte
    hits = 0
    for i in range(4):  # round-robin: d1 is some request's first pick
        prompt = f"decode drops {dialect} {i}"
        before, retried = worker_stats(d1)["requests"], retries(f)
        status, headers, raw, decision = send(f, chat("llama", content=prompt, max_tokens=3))
        assert status == 200, raw
        assert answer_text(raw) == expected_text(prompt, 3)
        assert headers["x-mock-worker"] == name_of(d2)
        sent_to_d1 = worker_stats(d1)["requests"] - before
        # At most one resend on a fresh socket (the proxy-wide keep-alive rule: a pooled socket
        # that dies without a byte may have been closed while idle), then exactly one new pair,
        # on d2: d1 is never part of a new pair.
        assert sent_to_d1 <= 2
        assert retries(f) - retried == (1 if sent_to_d1 else 0)
        hits += bool(sent_to_d1)
        if dialect == "two_phase":
            prefill = name_of(by_url(f, decision["scores"]["prefill_worker"]))
            assert worker_stats(d2)["last_body"]["kv_transfer_params"] == mock_pd.issue(prefill, prompt)
    assert hits >= 1
    assert worker_stats(d1)["completed"] == 0
    assert worker_stats(d2)["completed"] == 4
    # Each new pair starts with a new prefill (the KV must go to the new decode worker).
    assert sum(requests_of(f.w["p1"], f.w["p2"])) == 4 + hits
    all_settled(f)


def test_decode_failure_with_a_single_prefill_reuses_it_for_the_new_pair(fleet: Fleet) -> None:
    p = fleet.worker("p", "prefill")
    d1 = fleet.worker("d1", "decode")
    d2 = fleet.worker("d2", "decode")
    fleet.start(*NO_PASSIVE)
    set_worker(d1, drop_after=0)
    for i in range(4):
        prompt = f"single prefill {i}"
        status, headers, raw, _ = send(fleet, chat("llama", content=prompt, max_tokens=3))
        assert status == 200, raw
        assert answer_text(raw) == expected_text(prompt, 3)
        assert headers["x-mock-worker"] == name_of(d2)
    new_pairs = retries(fleet)
    assert new_pairs >= 1 and worker_stats(d1)["dropped"] >= 1
    assert worker_stats(p)["completed"] == 4 + new_pairs


def test_bootstrap_failed_prefill_with_a_single_decode_uses_it_again(fleet: Fleet) -> None:
    p1 = fleet.worker("p1", "prefill", bootstrap=True)
    p2 = fleet.worker("p2", "prefill", bootstrap=True)
    d = fleet.worker("d", "decode")
    fleet.start(*NO_PASSIVE, models={"llama": {"pd_dialect": "bootstrap"}})
    set_worker(p1, fail_status=500)
    for i in range(4):
        prompt = f"single decode {i}"
        status, _, raw, decision = send(fleet, chat("llama", content=prompt, max_tokens=3))
        assert status == 200, raw
        assert answer_text(raw) == expected_text(prompt, 3)
        assert decision["scores"]["prefill_worker"] == p2.url
        room = worker_stats(d)["last_body"]["bootstrap_room"]
        assert worker_stats(p2)["last_body"]["bootstrap_room"] == room
    assert worker_stats(p1)["requests"] >= 1
    assert worker_stats(p2)["completed"] == 4 and worker_stats(d)["completed"] == 4


@pytest.mark.parametrize("dialect", ["two_phase", "bootstrap"])
def test_decode_failing_with_no_other_decode_is_502_and_settles_both_legs(fleet: Fleet, dialect: str) -> None:
    p = fleet.worker("p", "prefill", bootstrap=dialect == "bootstrap")
    d = fleet.worker("d", "decode")
    fleet.start(*NO_PASSIVE, models={"llama": {"pd_dialect": dialect}})
    set_worker(d, drop_after=0)
    status, headers, raw, _ = send(fleet, chat("llama", content="no decode left", max_tokens=3))
    assert status == 502, raw
    assert json.loads(raw)["error"]["code"] == "bad_gateway"
    assert headers["x-request-id"]
    assert worker_stats(d)["completed"] == 0 and worker_stats(d)["dropped"] >= 1
    all_settled(fleet)
    wait_for(lambda: worker_stats(p)["in_flight"] == 0, what="no prefill left running")
    set_worker(d, drop_after=-1)  # the router still serves the model afterwards
    status, _, raw, _ = send(fleet, chat("llama", content="recovered", max_tokens=2))
    assert status == 200, raw
    assert answer_text(raw) == expected_text("recovered", 2)


def test_decode_failing_after_first_byte_truncates_without_retry(pd: Fleet) -> None:
    f, dialect = pd, pd.dialect
    for name in ("d1", "d2"):  # whichever decode is picked drops after 3 events
        set_worker(f.w[name], drop_after=3, tps=50)
    prompt = f"decode drops mid-stream {dialect}"
    with Raw(f.url) as c:
        c.post(CHAT, chat("llama", content=prompt, stream=True, max_tokens=8))
        status, headers = c.head()
        resp = c.rest(status, headers)
    assert resp.status == 200
    assert not resp.complete  # no terminating chunk
    events = [e for e in resp.body.split(b"\n\n") if e]
    assert b"data: [DONE]" not in events
    assert len(data_events(resp.body)) == 3
    assert stream_text(resp.body) == expected_text(prompt, 3)
    assert events[-1].startswith(b"event: error\ndata: ")
    assert json.loads(events[-1].split(b"data: ", 1)[1])["error"]["code"] == "bad_gateway"
    assert sum(requests_of(f.w["d1"], f.w["d2"])) == 1  # no retry on the other decode worker
    assert sum(requests_of(f.w["p1"], f.w["p2"])) == 1  # nor a new pair
    all_settled(f)


def test_client_error_from_prefill_is_passed_through_not_retried(pd: Fleet) -> None:
    f, dialect = pd, pd.dialect
    bad = {"model": "llama", "messages": "not a list", "max_tokens": 3}
    errors = {url: r["errors"] for url, r in f.worker_rows().items()}
    status, headers, raw = http("POST", f.url + CHAT, bad)
    assert status == 400, raw  # the engine's verdict, not a 502: the client must fix its request
    err = json.loads(raw)["error"]
    assert err["param"] == "messages" and err["type"] == "invalid_request_error"
    assert headers["content-type"] == "application/json" and headers["x-request-id"]
    prefills = [worker_stats(f.w[n]) for n in ("p1", "p2")]
    assert sum(s["requests"] for s in prefills) == 1  # not retried on the other prefill worker
    if dialect == "two_phase":
        assert requests_of(f.w["d1"], f.w["d2"]) == [0, 0]
    # A client's mistake is not the workers' failure (passive health must not eject them).
    assert {url: r["errors"] for url, r in f.worker_rows().items()} == errors
    all_settled(f)


# -- 4. client disconnects --------------------------------------------------------------------------


def test_client_disconnect_mid_stream_aborts_the_decode(pd: Fleet) -> None:
    f, dialect = pd, pd.dialect
    for name in ("d1", "d2"):
        set_worker(f.w[name], tps=10, output_tokens=200)
    if dialect == "bootstrap":
        for name in ("p1", "p2"):  # marks its room on arrival, then never answers
            set_worker(f.w[name], stall=True)
    disconnects = get_json(f.url + "/stats")["totals"]["client_disconnects"]
    with Raw(f.url) as c:
        c.post(CHAT, chat("llama", content="disconnect", stream=True), DEBUG)
        status, headers = c.head()
        assert status == 200
        c.until_first_data_event()
        prefill, decode = pair_of(f, json.loads(headers["x-shardgate-decision"]))
        assert worker_stats(decode)["in_flight"] == 1
    wait_for(lambda: (s := worker_stats(decode))["aborted"] == 1 and s["in_flight"] == 0,
             what="the decode worker to abort the stream")
    assert worker_stats(decode)["completed"] == 0
    if dialect == "bootstrap":
        wait_for(lambda: (s := worker_stats(prefill))["aborted"] == 1 and s["in_flight"] == 0,
                 what="the stalled prefill to be aborted too")
        assert worker_stats(prefill)["completed"] == 0
    else:
        assert worker_stats(prefill)["completed"] == 1  # two-phase: it was done before decode began
    wait_for(lambda: get_json(f.url + "/stats")["totals"]["client_disconnects"] == disconnects + 1,
             what="the router to count the disconnect")
    all_settled(f)


def test_two_phase_client_disconnect_during_prefill_aborts_it_and_never_decodes(two_phase: Fleet) -> None:
    for name in ("p1", "p2"):
        set_worker(two_phase.w[name], stall=True)
    with Raw(two_phase.url) as c:
        c.post(CHAT, chat("llama", content="gone during prefill", stream=True))
        wait_for(lambda: sum(worker_stats(two_phase.w[n])["in_flight"] for n in ("p1", "p2")) == 1,
                 what="the prefill to reach a worker")
    wait_for(lambda: sum(worker_stats(two_phase.w[n])["aborted"] for n in ("p1", "p2")) == 1,
             what="the prefill to be aborted")
    all_settled(two_phase)
    assert requests_of(two_phase.w["d1"], two_phase.w["d2"]) == [0, 0]


# -- 5. the mock is honest --------------------------------------------------------------------------


def test_mock_decode_refuses_handoffs_no_prefill_made(two_phase: Fleet) -> None:
    p, d = two_phase.w["p1"], two_phase.w["d1"]
    prompt = "honest mock"
    # bootstrap: a room nobody prefilled times out (the mock waits BOOTSTRAP_TIMEOUT, 5 s), so it
    # runs in the background while the other cases are checked.
    orphan: list[tuple[int, dict[str, str], bytes]] = []
    room_body = chat("llama", content=prompt, bootstrap_host="127.0.0.1", bootstrap_port=port_of(p),
                     bootstrap_room=12345)
    thread = threading.Thread(target=lambda: orphan.append(http("POST", d.url + CHAT, room_body, timeout=30)))
    thread.start()
    try:
        status, _, raw = http("POST", d.url + CHAT, chat("llama", content=prompt))
        assert status == 400, raw
        assert json.loads(raw)["error"]["param"] == "kv_transfer_params"
        forged = {"do_remote_decode": False, "do_remote_prefill": True, "handle": "0" * 32}
        status, _, raw = http("POST", d.url + CHAT, chat("llama", content=prompt, kv_transfer_params=forged))
        assert status == 400, raw
        # A real handle, straight from a prefill worker: accepted for its prompt, not for another.
        status, _, raw = http("POST", p.url + CHAT, chat("llama", content=prompt, max_tokens=1,
                                                         kv_transfer_params={"do_remote_decode": True}))
        assert status == 200, raw
        handle = json.loads(raw)["kv_transfer_params"]
        status, _, raw = http("POST", d.url + CHAT, chat("llama", content="another prompt",
                                                         kv_transfer_params=handle))
        assert status == 400, raw
        status, _, raw = http("POST", d.url + CHAT, chat("llama", content=prompt, max_tokens=2,
                                                         kv_transfer_params=handle))
        assert status == 200, raw
        assert answer_text(raw) == expected_text(prompt, 2)
    finally:
        thread.join(30)
    status, _, raw = orphan[0]
    assert status == 504, raw
    assert json.loads(raw)["error"]["code"] == "bootstrap_timeout"


# -- 6. readiness -----------------------------------------------------------------------------------


def test_pd_model_is_ready_only_with_a_healthy_prefill_and_decode(fleet: Fleet) -> None:
    fleet.worker("p", "prefill")
    d = fleet.worker("d", "decode")
    fleet.worker("other", "regular", "other-model")
    fleet.start("--health-interval", "0.2", "--health-fall", "1", *NO_PASSIVE)

    status, _, raw = http("GET", fleet.url + "/readiness")
    assert status == 200, raw
    models = {m["id"]: m for m in get_json(fleet.url + "/v1/models")["data"]}
    assert models["llama"]["healthy_workers"] >= 1

    d.stop()
    wait_for(lambda: http("GET", fleet.url + "/readiness")[0] == 503, what="readiness to turn 503")
    status, _, raw = http("GET", fleet.url + "/readiness")
    assert json.loads(raw)["unready_models"] == ["llama"]
    models = {m["id"]: m for m in get_json(fleet.url + "/v1/models")["data"]}
    assert "llama" not in models or models["llama"]["healthy_workers"] == 0
    assert "other-model" in models
    status, _, raw = http("POST", fleet.url + CHAT, chat("llama"))
    assert status == 503, raw  # a prefill alone cannot serve the model
    assert json.loads(raw)["error"]["code"] == "no_healthy_worker"
    assert worker_stats(fleet.w["p"])["requests"] == 0  # and is not asked to prefill for nobody


# -- 7. load accounting -----------------------------------------------------------------------------


def test_both_legs_count_as_in_flight_until_the_decode_stream_ends(pd: Fleet) -> None:
    f, dialect = pd, pd.dialect
    for name in ("d1", "d2"):  # a stream of about 1.5 s: /workers is read while it runs
        set_worker(f.w[name], tps=10, output_tokens=15)
    prompt = f"in flight {dialect}"
    with Raw(f.url) as c:
        c.post(CHAT, chat("llama", content=prompt, stream=True), DEBUG)
        status, headers = c.head()
        assert status == 200
        got = c.until_first_data_event()
        prefill, decode = pair_of(f, json.loads(headers["x-shardgate-decision"]))
        rows = f.worker_rows()
        assert {url: r["in_flight"] for url, r in rows.items()} == {
            w.url: int(w in (prefill, decode)) for w in f.w.values()}
        resp = c.rest(status, headers, got)
    assert resp.complete
    assert stream_text(resp.body) == expected_text(prompt, 15)
    all_settled(f)


# -- fallbacks and explanations around PD routes ------------------------------------------------


def test_model_falls_back_to_its_regular_worker_when_no_pd_pair_is_healthy(fleet: Fleet) -> None:
    regular = fleet.worker("regular", "regular")
    fleet.worker("p", "prefill")
    d = fleet.worker("d", "decode")
    fleet.start("--health-interval", "0.2", "--health-fall", "1", *NO_PASSIVE)
    d.stop()
    wait_for(lambda: not fleet.worker_rows()[d.url]["healthy"], what="the decode worker marked down")
    status, _, raw = http("GET", fleet.url + "/readiness")
    assert status == 200, raw  # the model is ready: its regular worker is healthy
    status, headers, raw, decision = send(fleet, chat("llama", content="fallback", max_tokens=2))
    assert status == 200, raw
    assert decision["router"] == "http_regular"
    assert headers["x-mock-worker"] == name_of(regular)


def test_route_explain_describes_a_pd_decision_without_sending(two_phase: Fleet) -> None:
    status, _, raw = http("POST", two_phase.url + "/route/explain", chat("llama"))
    assert status == 200, raw
    decision = json.loads(raw)
    assert decision["router"] == "http_pd"
    assert decision["worker"] in (two_phase.w["d1"].url, two_phase.w["d2"].url)
    assert requests_of(*two_phase.w.values()) == [0, 0, 0, 0]
