"""Admission control end to end: real routers (the CLI) and real mock workers over real sockets.

Capacity is held deterministically with stalled workers (``stall``: a request is accepted and
never answered until its client goes away), and every wait is a poll of ``/stats`` or the mock's
``/mock/stats`` with a deadline; nothing asserts on timings.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Stream,
    assert_openai_error,
    chat,
    get_json,
    http,
    raw_chat_request,
    set_worker,
    wait_for,
    worker_stats,
)

from shardgate import launch


class Held(threading.Thread):
    """One chat completion on its own connection, answered whenever; ``close()`` abandons it."""

    def __init__(self, url: str, content: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(daemon=True)
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        self.request = raw_chat_request(url, json.dumps(chat("m1", content=content)).encode(), headers)
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        self.data = b""
        self.start()

    def run(self) -> None:
        try:
            self.sock.sendall(self.request)
            while chunk := self.sock.recv(65536):
                self.data += chunk
        except OSError:
            pass

    @property
    def status(self) -> int:
        return int(self.data.split(b" ", 2)[1]) if self.data.startswith(b"HTTP/1.1 ") else 0

    def header(self, name: str) -> str | None:
        head = self.data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        for line in head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name:
                return value.strip()
        return None

    @property
    def body(self) -> bytes:
        return self.data.split(b"\r\n\r\n", 1)[1]

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def answered(self) -> None:
        self.join(30)
        assert not self.is_alive() and self.status, self.data


def admission(router: launch.Launched) -> dict[str, Any]:
    return get_json(router.url + "/stats")["admission"]


def wait_queued(router: launch.Launched, n: int) -> None:
    wait_for(lambda: admission(router)["queued"] == n, what=f"{n} queued")


def wait_worker(worker: launch.Launched, **want: int) -> None:
    def ok() -> bool:
        stats = worker_stats(worker)
        return all(stats[k] == v for k, v in want.items())
    wait_for(ok, what=f"worker {want}")


def test_over_the_cap_requests_queue_and_start_in_priority_order(
        start_worker: Callable[..., launch.Launched], start_router: Callable[..., launch.Launched]) -> None:
    worker = start_worker(["m1"], "--stall")
    router = start_router([worker.url], "--max-concurrent-requests", "1", "--queue-size", "10")
    first = Held(router.url, "first")
    wait_worker(worker, in_flight=1)
    queued = []
    for n, (content, priority) in enumerate([("low", "low"), ("high", "high"), ("normal", None),
                                             ("nine", "9")], start=1):
        queued.append(Held(router.url, content, {"X-Shardgate-Priority": priority} if priority else None))
        wait_queued(router, n)
    # Each freed place admits the best waiting request; a stalled worker holds it there.
    holder = first
    for expected, n in (("nine", 2), ("high", 3), ("normal", 4), ("low", 5)):
        holder.close()
        wait_worker(worker, requests=n, in_flight=1)
        assert worker_stats(worker)["last_body"]["messages"][0]["content"] == expected
        holder = next(h for h in queued if json.loads(h.request.split(b"\r\n\r\n", 1)[1])
                      ["messages"][0]["content"] == expected)
    holder.close()
    stats = admission(router)
    assert stats["queued"] == 0 and stats["queue_waits"] == 4 and stats["admitted"] == 5
    assert stats["rejected"] == {"queue_full": 0, "queue_timeout": 0, "rate_limited": 0, "shutdown": 0}


def test_queue_full_and_queue_timeout_answer_503_with_retry_after(
        start_worker: Callable[..., launch.Launched], start_router: Callable[..., launch.Launched]) -> None:
    worker = start_worker(["m1"], "--stall")
    router = start_router([worker.url], "--max-concurrent-requests", "1", "--queue-size", "1",
                          "--queue-timeout", "0.5")
    holder = Held(router.url, "holder")
    wait_worker(worker, in_flight=1)
    waiting = Held(router.url, "waits")
    wait_queued(router, 1)
    status, headers, body = http("POST", router.url + "/v1/chat/completions", chat("m1"))
    assert status == 503 and int(headers["retry-after"]) >= 1
    assert_openai_error(body, "queue_full")
    waiting.answered()  # the queue timeout ends its wait
    assert waiting.status == 503 and int(waiting.header("retry-after") or 0) >= 1
    assert_openai_error(waiting.body, "queue_timeout")
    assert holder.status == 0  # the admitted request is untouched
    stats = admission(router)
    assert stats["rejected"]["queue_full"] == 1 and stats["rejected"]["queue_timeout"] == 1
    assert stats["queued"] == 0
    holder.close()


def test_without_a_queue_a_request_over_the_cap_gets_503_at_once(
        start_worker: Callable[..., launch.Launched], start_router: Callable[..., launch.Launched]) -> None:
    worker = start_worker(["m1"], "--stall")
    router = start_router([worker.url], "--max-concurrent-requests", "1", "--queue-size", "0")
    holder = Held(router.url, "holder")
    wait_worker(worker, in_flight=1)
    status, headers, body = http("POST", router.url + "/v1/chat/completions", chat("m1"))
    assert status == 503 and "retry-after" in headers
    assert_openai_error(body, "queue_full")
    holder.close()


def test_a_client_that_disconnects_while_queued_leaves_the_queue(
        start_worker: Callable[..., launch.Launched], start_router: Callable[..., launch.Launched]) -> None:
    worker = start_worker(["m1"], "--stall")
    router = start_router([worker.url], "--max-concurrent-requests", "1", "--queue-size", "5")
    holder = Held(router.url, "holder")
    wait_worker(worker, in_flight=1)
    gone = Held(router.url, "gone")
    stays = Held(router.url, "stays")
    wait_queued(router, 2)
    gone.close()
    wait_for(lambda: admission(router)["abandoned"] == 1, what="the abandoned request counted")
    assert admission(router)["queued"] == 1
    holder.close()
    wait_worker(worker, requests=2, in_flight=1)  # the next one in line, not the one that left
    assert worker_stats(worker)["last_body"]["messages"][0]["content"] == "stays"
    stays.close()


def test_rate_limits_answer_429_with_retry_after_per_client(
        start_worker: Callable[..., launch.Launched], start_router: Callable[..., launch.Launched]) -> None:
    worker = start_worker(["m1"])
    router = start_router([worker.url], "--rate-limit-rpm", "2", "--rate-limit-tpm", "2000")
    url = router.url + "/v1/chat/completions"

    def ask(key: str, **extra: Any) -> tuple[int, dict[str, str], bytes]:
        return http("POST", url, chat("m1", **extra), {"Authorization": f"Bearer {key}"})

    assert ask("alpha-secret")[0] == 200
    assert ask("alpha-secret")[0] == 200
    status, headers, body = ask("alpha-secret")
    assert status == 429 and 1 <= int(headers["retry-after"]) <= 60
    err = assert_openai_error(body, "rate_limit_exceeded")
    assert err["type"] == "rate_limit_error" and "alpha-secret" not in body.decode()
    assert ask("beta-secret")[0] == 200  # another client has its own budget
    # Tokens per minute: an estimate of prompt bytes / 4 + max_tokens.
    assert ask("gamma", max_tokens=1500)[0] == 200
    status, headers, body = ask("gamma", max_tokens=1500)
    assert status == 429 and int(headers["retry-after"]) >= 1
    stats = get_json(router.url + "/stats")
    assert stats["admission"]["rejected"]["rate_limited"] == 2
    assert "alpha-secret" not in json.dumps(stats)
    # A configurable header keys clients instead of Authorization.


def test_rate_limit_key_can_be_another_header(
        start_worker: Callable[..., launch.Launched], start_router: Callable[..., launch.Launched]) -> None:
    worker = start_worker(["m1"])
    router = start_router([worker.url], "--rate-limit-rpm", "1", "--rate-limit-key", "x-tenant")
    url = router.url + "/v1/chat/completions"
    assert http("POST", url, chat("m1"), {"X-Tenant": "a"})[0] == 200
    assert http("POST", url, chat("m1"), {"X-Tenant": "a", "Authorization": "Bearer other"})[0] == 429
    assert http("POST", url, chat("m1"), {"X-Tenant": "b"})[0] == 200


def test_a_worker_at_its_max_concurrency_is_passed_over_and_a_full_fleet_queues(
        tmp_path: Path, start_worker: Callable[..., launch.Launched],
        start_router: Callable[..., launch.Launched]) -> None:
    w1 = start_worker(["m1"], "--stall")
    w2 = start_worker(["m1"], "--stall")
    config = tmp_path / "caps.yaml"
    config.write_text("policy: round_robin\nworkers:\n"
                      f"  - {{url: \"{w1.url}\", model: m1, max_concurrency: 1}}\n"
                      f"  - {{url: \"{w2.url}\", model: m1, max_concurrency: 3}}\n")
    router = start_router([], "--proxies", "2", "--queue-size", "10", config=str(config))
    held = []
    for n in range(1, 5):
        held.append(Held(router.url, f"r{n}"))
        wait_for(lambda n=n: worker_stats(w1)["in_flight"] + worker_stats(w2)["in_flight"] == n,
                 what=f"{n} requests on the workers")
    # Round-robin alone would have put two of the four on w1: its cap passed it over.
    assert worker_stats(w1)["in_flight"] == 1 and worker_stats(w2)["in_flight"] == 3
    last = Held(router.url, "waits")  # every worker at its cap: it waits
    wait_queued(router, 1)
    assert get_json(router.url + "/stats")["admission"]["limits"]["capped_workers"] == 2
    set_worker(w1, stall=False)
    set_worker(w2, stall=False)
    for h in held:
        h.close()
    last.answered()
    assert last.status == 200, last.data
    assert admission(router)["queue_waits"] == 1


def test_admitted_requests_are_served_while_others_are_rejected(
        start_worker: Callable[..., launch.Launched], start_router: Callable[..., launch.Launched]) -> None:
    worker = start_worker(["m1"], "--tps", "100")
    set_worker(worker, output_tokens=150)  # each stream lasts about 1.5 s
    router = start_router([worker.url], "--max-concurrent-requests", "2", "--queue-size", "1")
    streams = [Stream(router.url) for _ in range(2)]
    for s in streams:
        s.start()
        s.wait_first_event()
    waiting = Held(router.url, "waits")
    wait_queued(router, 1)
    refused = [http("POST", router.url + "/v1/chat/completions", chat("m1"))[0] for _ in range(3)]
    assert refused == [503, 503, 503]
    for s in streams:
        s.finish(30)
        assert s.complete, s.data[-200:]
    waiting.answered()
    assert waiting.status == 200
    totals = get_json(router.url + "/stats")["totals"]
    assert totals["rejected"] == 3


def test_metrics_expose_admission_figures_and_parse(
        start_worker: Callable[..., launch.Launched], start_router: Callable[..., launch.Launched]) -> None:
    worker = start_worker(["m1"])
    router = start_router([worker.url], "--proxies", "2", "--rate-limit-rpm", "2")
    for _ in range(4):
        http("POST", router.url + "/v1/chat/completions", chat("m1"), {"Authorization": "Bearer k"})
    status, _, body = http("GET", router.url + "/metrics")
    assert status == 200
    text = body.decode()
    parser = pytest.importorskip("prometheus_client.parser")
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    rejected = {s.labels["reason"]: s.value for s in families["shardgate_admission_rejected"].samples}
    # Each of the 2 proxies allows 1 per minute per client: at least 2 of 4 were refused.
    assert rejected["rate_limited"] >= 2 and rejected["queue_full"] == 0
    admitted = families["shardgate_admission_admitted"].samples[0].value
    assert admitted + rejected["rate_limited"] == 4
    assert families["shardgate_admission_queue_depth"].samples[0].value == 0
    names = {s.name for s in families["shardgate_admission_queue_wait_seconds"].samples}
    assert names == {"shardgate_admission_queue_wait_seconds_sum",
                     "shardgate_admission_queue_wait_seconds_count"}


def test_with_every_limit_off_admission_stays_out_of_the_way(
        start_worker: Callable[..., launch.Launched], start_router: Callable[..., launch.Launched]) -> None:
    worker = start_worker(["m1"])
    router = start_router([worker.url])
    assert http("POST", router.url + "/v1/chat/completions", chat("m1"),
                {"X-Shardgate-Priority": "bogus"})[0] == 200  # not read when admission is off
    stats = admission(router)
    assert stats["enabled"] is False and stats["admitted"] == 0


def test_a_bad_priority_is_a_400_when_admission_is_on(
        start_worker: Callable[..., launch.Launched], start_router: Callable[..., launch.Launched]) -> None:
    worker = start_worker(["m1"])
    router = start_router([worker.url], "--max-concurrent-requests", "4")
    status, _, body = http("POST", router.url + "/v1/chat/completions", chat("m1"),
                           {"X-Shardgate-Priority": "urgent"})
    assert status == 400
    assert assert_openai_error(body)["param"] == "X-Shardgate-Priority"
