"""End-to-end tests of routing: policies, shards, aliases and router selection through the real CLI.

Every router and mock worker is a real process started by ``shardgate.launch``; requests go over
real sockets, each on a new connection (``conftest.http``), so with ``--proxies 2`` the kernel
spreads them over both proxy processes. Where a test claims something holds *across* proxies it
checks, from ``GET /stats``, that both proxies answered some of the requests in question.

Load is put on a worker by holding SSE streams open on it: either through the router with a
model only that worker serves (the router's load board then counts them on that worker's slot,
whatever model the next request asks for), or directly on the worker (only the engine's own
``/metrics`` can see those). The worker that served a request is named by the mock's
``X-Mock-Worker`` response header; the decision by ``x-shardgate-decision`` (``X-Shardgate-Debug: 1``)
or by ``POST /route/explain``.

Waits poll with deadlines (``wait_for``); nothing sleeps and nothing asserts on elapsed time.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Stream, chat, free_port, get_json, http, wait_for, worker_row, worker_stats

from proxy_workers.routing import selection
from shardgate import launch
from shm.hashing import RingView, build_ring, key_hash
from shm.settings import POLICY_NAMES

CHAT = "/v1/chat/completions"
SLOW = ("--tps", "2", "--output-tokens", "400")  # a stream on this worker lasts minutes


# -- helpers --------------------------------------------------------------------------------------


def name_of(worker: launch.Launched) -> str:
    """What the mock puts in X-Mock-Worker: its host:port."""
    return worker.url.split("//", 1)[1]


def send(router: launch.Launched, model: str, session: str | None = None, debug: bool = False,
         body: dict[str, Any] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One chat request on a new connection (max_tokens 1: quick even on a slow worker)."""
    headers = {}
    if session is not None:
        headers["X-Session-ID"] = session
    if debug:
        headers["X-Shardgate-Debug"] = "1"
    return http("POST", router.url + CHAT, body or chat(model, max_tokens=1), headers)


def served(router: launch.Launched, model: str, session: str | None = None,
           body: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(worker name, decision) of one successful request."""
    status, headers, raw = send(router, model, session, debug=True, body=body)
    assert status == 200, (status, raw)
    return headers["x-mock-worker"], json.loads(headers["x-shardgate-decision"])


def explain(router: launch.Launched, model: str, session: str | None = None) -> dict[str, Any]:
    headers = {"X-Session-ID": session} if session is not None else {}
    status, _, raw = http("POST", router.url + "/route/explain", chat(model), headers)
    assert status == 200, (status, raw)
    return json.loads(raw)


def proxy_column(router: launch.Launched, key: str) -> list[int]:
    return [int(p[key]) for p in get_json(router.url + "/stats")["proxies"]]


def across_proxies(router: launch.Launched, one: Callable[[], Any], each: int = 3,
                   timeout: float = 30.0) -> list[Any]:
    """Call ``one`` (which sends one request) until every proxy has served at least ``each``."""
    base = proxy_column(router, "requests")
    results: list[Any] = []

    def enough() -> bool:
        results.append(one())
        now = proxy_column(router, "requests")
        return all(n - b >= each for n, b in zip(now, base, strict=True))

    wait_for(enough, timeout, what=f"both proxies to serve {each} requests")
    return results


def write_config(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture
def streams() -> Iterator[Callable[..., Stream]]:
    """``streams(url, model)`` opens a stream and waits for its first event; closed at teardown."""
    opened: list[Stream] = []

    def start(url: str, model: str, headers: dict[str, str] | None = None) -> Stream:
        stream = Stream(url, model, headers)
        opened.append(stream)
        stream.start()
        stream.wait_first_event()
        return stream

    yield start
    for stream in opened:
        stream.close()


def hold(router: launch.Launched, worker: launch.Launched, streams: Callable[..., Stream], model: str,
         n: int) -> None:
    """Hold ``n`` streams on ``worker`` through the router (``model`` is served by it alone)."""
    for _ in range(n):
        assert streams(router.url, model).worker == name_of(worker)
    wait_for(lambda: worker_row(router, worker.url)["in_flight"] == n, what=f"{n} in flight on {worker.url}")


def hold_in_one_proxy(router: launch.Launched, streams: Callable[..., Stream], model: str, n: int) -> int:
    """Hold ``n`` streams that all sit in one proxy process; returns that proxy's index.

    Each stream gets a new connection, so the kernel picks its proxy; one that lands in the other
    proxy is closed again (and its in-flight count is waited back to zero).
    """
    target, kept = None, 0
    for _ in range(60):
        before = proxy_column(router, "in_flight")

        def one_more(before: list[int] = before) -> list[int] | None:
            now = proxy_column(router, "in_flight")
            return now if sum(now) == sum(before) + 1 else None

        stream = streams(router.url, model)
        after = wait_for(one_more, what="the new stream in a proxy's in-flight gauge")
        landed = next(i for i, (a, b) in enumerate(zip(after, before, strict=True)) if a > b)
        if target is None:
            target = landed
        if landed == target:
            kept += 1
            if kept == n:
                return target
        else:
            stream.close()
            wait_for(lambda before=before: proxy_column(router, "in_flight") == before,
                     what="the closed stream to settle")
    raise AssertionError(f"could not place {n} streams in one proxy")


def metric(router: launch.Launched, name: str, policy: str) -> int:
    status, _, raw = http("GET", router.url + "/metrics")
    assert status == 200
    match = re.search(rf'^{name}{{policy="{policy}"}} (\d+)$', raw.decode(), re.M)
    assert match, (name, policy)
    return int(match.group(1))


def ring_order(shards: list[str], model: str, key: str) -> list[str]:
    """The shards a key visits, owner first, as the coordinator's ring and the proxies see them."""
    view = RingView(build_ring(sorted(shards)))
    return [view.members[o] for o in view.walk(key_hash(f"{model}\0{key}"))]


def assert_openai_error(raw: bytes, type_: str) -> dict[str, Any]:
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == type_ and error["message"], error
    return error


# -- least_connections ---------------------------------------------------------------------------


def test_least_connections_avoids_a_worker_whose_load_sits_in_the_other_proxy(
        start_worker, start_router, streams) -> None:
    a = start_worker(["m1", "hold-a"], *SLOW)
    b = start_worker(["m1"])
    router = start_router([a.url, b.url], "--proxies", "2", "--policy", "least_connections")
    holder = hold_in_one_proxy(router, streams, "hold-a", 3)
    wait_for(lambda: worker_row(router, a.url)["in_flight"] == 3, what="3 streams in flight on A")
    assert proxy_column(router, "in_flight")[1 - holder] == 0

    base, reached_a = proxy_column(router, "requests"), worker_stats(a)["requests"]
    names = across_proxies(router, lambda: served(router, "m1")[0], each=4)
    assert set(names) == {name_of(b)}, Counter(names)
    now = proxy_column(router, "requests")
    assert now[1 - holder] - base[1 - holder] >= 4  # decided by the proxy holding none of the load
    assert worker_stats(a)["requests"] == reached_a  # none of them reached A
    _, decision = served(router, "m1")
    assert decision["policy"] == "least_connections" and "all proxies" in decision["reason"]
    assert decision["scores"]["in_flight"][a.url] == 3


# -- session_affinity ----------------------------------------------------------------------------


def test_session_affinity_holds_across_proxies_until_the_ttl_expires(start_worker, start_router,
                                                                    streams) -> None:
    a, b = start_worker(["m1", "hold-a"], *SLOW), start_worker(["m1", "hold-b"], *SLOW)
    by_name = {name_of(a): (a, "hold-a"), name_of(b): (b, "hold-b")}
    ttl = 4.0
    router = start_router([a.url, b.url], "--proxies", "2", "--policy", "session_affinity",
                          "--session-ttl", str(ttl))
    home, decision = served(router, "m1", "sess-1")
    assert decision["reason"] == "new session: least loaded worker"
    other = next(n for n in by_name if n != home)
    # Make the session's worker the busier one, then keep the session going, from both proxies:
    # it stays, because it has not been idle for the TTL (each request is well inside it).
    worker, hold_model = by_name[home]
    hold(router, worker, streams, hold_model, 1)
    results = across_proxies(router, lambda: served(router, "m1", "sess-1"), each=3)
    assert {n for n, _ in results} == {home}
    assert {d["reason"] for _, d in results} == {"session's worker"}
    # A session without traffic expires; explain (a dry run) watches without refreshing it.
    moved = wait_for(lambda: explain(router, "m1", "sess-1")["worker"] == f"http://{other}",
                     ttl + 10, what="the idle session to expire")
    assert moved
    first_after, decision = served(router, "m1", "sess-1")
    assert first_after == other and decision["reason"] == "new session: least loaded worker"
    after = across_proxies(router, lambda: served(router, "m1", "sess-1")[0], each=2)
    assert set(after) == {other}


def test_session_affinity_moves_a_session_off_a_failed_worker(start_worker, start_router) -> None:
    a, b = start_worker(["m1"]), start_worker(["m1"])
    by_name = {name_of(a): a, name_of(b): b}
    router = start_router([a.url, b.url], "--proxies", "2", "--policy", "session_affinity")
    before = across_proxies(router, lambda: served(router, "m1", "sess-2")[0], each=2)
    home = before[0]
    assert set(before) == {home}
    other = next(n for n in by_name if n != home)
    by_name[home].stop()

    moved, decision = served(router, "m1", "sess-2")
    assert moved == other
    assert decision["fallback"] and "moved" in decision["reason"]
    after = across_proxies(router, lambda: served(router, "m1", "sess-2"), each=3)
    assert {n for n, _ in after} == {other}
    assert {d["reason"] for _, d in after} == {"session's worker"}


# -- consistent hashing over shards ---------------------------------------------------------------


def shard_config(workers: dict[str, launch.Launched], **settings: Any) -> str:
    lines = [f"{k}: {v}" for k, v in settings.items()] + ["workers:"]
    lines += [f"  - {{url: '{w.url}', model: m1, shard: {s}}}" for s, w in workers.items()]
    return "\n".join(lines) + "\n"


def test_a_key_stays_on_its_shard_and_fails_over_to_the_backup_shard(start_worker, start_router,
                                                                     tmp_path: Path) -> None:
    shards = {s: start_worker(["m1"]) for s in "abc"}
    config = write_config(tmp_path / "shards.yaml", shard_config(
        shards, policy="round_robin", health_interval=0.3, health_fall=1))
    router = start_router([], "--proxies", "2", config=config)
    key = "user-7"
    owner, backup, _ = ring_order(list(shards), "m1", key)
    picks = across_proxies(router, lambda: served(router, "m1", key), each=2)
    assert {n for n, _ in picks} == {name_of(shards[owner])}
    assert {d["shard"] for _, d in picks} == {owner} and not any(d["fallback"] for _, d in picks)
    others = [k for k in (f"key-{i}" for i in range(60)) if ring_order(list(shards), "m1", k)[0] != owner]
    before = {k: explain(router, "m1", k)["shard"] for k in others}
    assert before == {k: ring_order(list(shards), "m1", k)[0] for k in others}

    shards[owner].stop()
    # At once (the retry skips the dead worker) and after the health check marks it down.
    name, decision = served(router, "m1", key)
    assert name == name_of(shards[backup]) and decision["shard"] == backup
    wait_for(lambda: not worker_row(router, shards[owner].url)["healthy"], what="the owner marked down")
    shown = explain(router, "m1", key)
    assert shown["shard"] == backup and shown["fallback"] and "backup shard" in shown["reason"]
    assert {served(router, "m1", key)[0] for _ in range(6)} == {name_of(shards[backup])}
    # Keys owned by the healthy shards did not move.
    assert {k: explain(router, "m1", k)["shard"] for k in others} == before


def test_adding_a_shard_at_runtime_moves_only_the_keys_it_now_owns(start_worker, start_router,
                                                                  tmp_path: Path) -> None:
    shards = {s: start_worker(["m1"]) for s in "abc"}
    path = tmp_path / "shards.yaml"
    config = write_config(path, shard_config(shards, policy="round_robin", config_watch_interval=0))
    router = start_router([], "--proxies", "2", config=config)
    keys = [f"user-{i}" for i in range(80)]
    old = {k: ring_order(list(shards), "m1", k)[0] for k in keys}
    assert {k: explain(router, "m1", k)["shard"] for k in keys} == old
    generation = get_json(router.url + "/stats")["snapshot"]["generation"]

    shards["d"] = start_worker(["m1"])
    new = {k: ring_order(list(shards), "m1", k)[0] for k in keys}
    to_d = [k for k in keys if new[k] == "d"]
    assert to_d and all(new[k] == old[k] for k in keys if k not in to_d)
    write_config(path, shard_config(shards, policy="round_robin", config_watch_interval=0))
    os.kill(router.pid, signal.SIGHUP)
    wait_for(lambda: get_json(router.url + "/stats")["snapshot"]["generation"] > generation
             and all(explain(router, "m1", k)["shard"] == "d" for k in to_d[:3]), what="shard d published")

    assert {k: explain(router, "m1", k)["shard"] for k in keys} == new
    for key in (to_d[0], next(k for k in keys if k not in to_d)):
        name, decision = served(router, "m1", key)
        assert name == name_of(shards[new[key]]) and decision["shard"] == new[key]


# -- cache_aware ---------------------------------------------------------------------------------


SYSTEM = "You are a meticulous assistant who answers with care and cites sources. " * 12


def turn(topic: str, n: int) -> dict[str, Any]:
    """Turn ``n`` of a conversation: every earlier message, then one more question."""
    messages = [{"role": "system", "content": f"{topic}. {SYSTEM}"}]
    for t in range(n):
        messages.append({"role": "user", "content": f"Question {t} about {topic}: what happens next?"})
        if t < n - 1:
            messages.append({"role": "assistant", "content": f"Answer {t} about {topic}. " * 4})
    return {"model": "m1", "messages": messages, "max_tokens": 1}


def test_cache_aware_keeps_a_conversation_together_yet_balances(start_worker, start_router,
                                                                streams) -> None:
    workers = [start_worker(["m1", f"hold-{i}"], *SLOW) for i in range(3)]
    router = start_router([w.url for w in workers], "--proxies", "2", "--policy", "cache_aware",
                          "--balance-abs-threshold", "2")
    home, decision = served(router, "m1", body=turn("tides", 1))
    turns = iter(range(2, 200))
    later = across_proxies(router, lambda: served(router, "m1", body=turn("tides", next(turns))), each=3)
    assert {n for n, _ in later} == {home}, Counter(n for n, _ in later)
    assert {d["reason"] for _, d in later} == {"prefix cached on this worker"}

    # Different conversations are not piled onto one worker.
    spread = Counter(served(router, "m1", body=turn(f"topic {i}", 1))[0] for i in range(12))
    assert len(spread) > 1, spread

    # Load imbalanced against the conversation's worker: the next turn goes to the least loaded.
    index = next(i for i, w in enumerate(workers) if name_of(w) == home)
    hold(router, workers[index], streams, f"hold-{index}", 3)
    moved, decision = served(router, "m1", body=turn("tides", next(turns)))
    assert moved != home
    assert decision["fallback"] and "imbalanced" in decision["reason"]
    assert decision["scores"]["max_load"] == 3 and decision["scores"]["min_load"] == 0


# -- quota_aware ---------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2])
def test_quota_aware_answers_429_once_every_worker_is_at_its_limit(start_worker, start_router,
                                                                   tmp_path: Path, count: int) -> None:
    workers = [start_worker(["m1"]) for _ in range(count)]
    entries = "".join(f"  - {{url: '{w.url}', model: m1, quota: {{requests_per_minute: 3}}}}\n"
                      for w in workers)
    config = write_config(tmp_path / "quota.yaml",
                          f"policy: quota_aware\nquota_headroom: 1.0\nworkers:\n{entries}")
    router = start_router([], "--proxies", "2", config=config)
    names = []
    for _ in range(3 * count):
        status, headers, raw = send(router, "m1")
        assert status == 200, raw
        names.append(headers["x-mock-worker"])
    assert Counter(names) == {name_of(w): 3 for w in workers}
    status, headers, raw = send(router, "m1")
    assert status == 429
    assert 1 <= int(headers["retry-after"]) <= 121
    error = assert_openai_error(raw, "rate_limit_error")
    assert error["code"] == "quota_exceeded" and "quota" in error["message"]
    assert sum(worker_stats(w)["requests"] for w in workers) == 3 * count


# -- aliases -------------------------------------------------------------------------------------


def test_alias_split_converges_to_its_weights(start_worker, start_router, tmp_path: Path) -> None:
    w1, w2 = start_worker(["m1"]), start_worker(["m2"])
    config = write_config(tmp_path / "alias.yaml", (
        f"workers:\n  - {{url: '{w1.url}'}}\n  - {{url: '{w2.url}'}}\n"
        "aliases:\n  chat: {m1: 0.7, m2: 0.3}\n"))
    router = start_router([], "--proxies", "2", config=config)
    models = {m["id"]: m for m in get_json(router.url + "/v1/models")["data"]}
    assert set(models) == {"m1", "m2", "chat"} and models["chat"]["alias_of"] == {"m1": 0.7, "m2": 0.3}
    counts: Counter[str] = Counter()
    for _ in range(400):
        status, headers, raw = send(router, "chat")
        assert status == 200, raw
        target = "m1" if headers["x-mock-worker"] == name_of(w1) else "m2"
        assert json.loads(raw)["model"] == target  # the worker was asked for the target model
        counts[target] += 1
    assert 0.62 <= counts["m1"] / 400 <= 0.78, counts
    decision = served(router, "chat")[1]
    assert decision["alias"] == "chat" and decision["model"] in ("m1", "m2")


# -- router selection for the seed's deployment ---------------------------------------------------


def test_routers_for_the_seed_deployment(start_worker, start_router, tmp_path: Path) -> None:
    regular = start_worker(["llama-3.1-8b"])
    prefill = start_worker(["llama-3.1-8b"], "--role", "prefill")
    decode = start_worker(["llama-3.1-8b"], "--role", "decode")
    qwen = start_worker(["qwen-2.5"])
    config = write_config(tmp_path / "seed.yaml", f"""
workers:
  - {{url: "{regular.url}", model: "llama-3.1-8b", type: "regular", connection: "http"}}
  - {{url: "{prefill.url}", model: "llama-3.1-8b", type: "prefill", connection: "http"}}
  - {{url: "{decode.url}", model: "llama-3.1-8b", type: "decode", connection: "http"}}
  - {{url: "grpc://127.0.0.1:{free_port()}", model: "mistral-7b", type: "regular", connection: "grpc"}}
  - {{url: "{qwen.url}", model: "qwen-2.5", type: "regular", connection: "http"}}
""")
    router = start_router([], "--proxies", "2", config=config)
    assert get_json(router.url + "/routers") == {"routers": [
        {"http_regular": ["llama-3.1-8b", "qwen-2.5"]},
        {"http_pd": ["llama-3.1-8b"]},
        {"grpc_regular": ["mistral-7b"]},
    ]}
    # PD is preferred when this build has its data path; otherwise the regular router serves and
    # the decision says why.
    pd_built = "http_pd" in selection.IMPLEMENTED
    for _ in range(4):
        name, decision = served(router, "llama-3.1-8b")
        if pd_built:
            assert decision["router"] == "http_pd" and decision["router_reason"] == "preferred router"
        else:
            assert name == name_of(regular)
            assert decision["router"] == "http_regular"
            assert decision["router_reason"] == ("http_pd not available in this build: "
                                                 "fell back to http_regular")
    if not pd_built:
        assert worker_stats(prefill)["requests"] == worker_stats(decode)["requests"] == 0
    assert served(router, "qwen-2.5")[0] == name_of(qwen)
    status, _, raw = send(router, "mistral-7b")
    if "grpc_regular" in selection.IMPLEMENTED:
        # Routed to the gRPC router, whose only worker listens nowhere.
        assert explain(router, "mistral-7b")["router"] == "grpc_regular"
        assert status == 502
        assert "mistral-7b" in assert_openai_error(raw, "upstream_error")["message"]
    else:
        assert status == 503
        error = assert_openai_error(raw, "service_unavailable")
        assert "grpc_regular" in error["message"] and "not available" in error["message"]
    # Asking for a connection nobody serves the model over says so.
    status, _, raw = http("POST", router.url + CHAT, chat("qwen-2.5"), {"X-Shardgate-Connection": "grpc"})
    assert status == 503 and "no grpc router" in assert_openai_error(raw, "service_unavailable")["message"]


# -- every policy by name, and explanations --------------------------------------------------------


@pytest.fixture(scope="module")
def every_policy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[launch.Launched, list]]:
    """One router whose 13 models each use a different policy (per-model override), two workers."""
    models = [f"m-{p}" for p in POLICY_NAMES]
    workers = [launch.mock_worker(models) for _ in range(2)]
    started = list(workers)
    try:
        overrides = "".join(f"  m-{p}: {{policy: {p}}}\n" for p in POLICY_NAMES)
        path = tmp_path_factory.mktemp("policies") / "policies.yaml"
        path.write_text(f"workers:\n  - {{url: '{workers[0].url}'}}\n  - {{url: '{workers[1].url}'}}\n"
                        f"models:\n{overrides}")
        router = launch.router([], "--port", str(free_port()), "--proxies", "2", config=str(path))
        started.append(router)
        wait_for(lambda: len(get_json(router.url + "/v1/models")["data"]) == len(models),
                 what="every model discovered")
        yield router, workers
    finally:
        for process in reversed(started):
            process.stop()


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_each_policy_is_accepted_per_model_and_routes(every_policy, policy: str) -> None:
    router, workers = every_policy

    def counted() -> int:  # every decision, fallback or not, is counted once here
        return metric(router, "shardgate_policy_decisions_total", policy)

    before = counted()
    name, decision = served(router, f"m-{policy}", "sess-9")
    assert name in {name_of(w) for w in workers}
    assert decision["policy"] == policy and decision["model"] == f"m-{policy}"
    assert decision["worker"] == f"http://{name}" and decision["reason"]
    assert counted() == before + 1


def test_fallback_decisions_count_as_decisions(every_policy) -> None:
    router, _ = every_policy
    made = metric(router, "shardgate_policy_decisions_total", "consistent_hash")
    fell = metric(router, "shardgate_policy_fallbacks_total", "consistent_hash")
    assert served(router, "m-consistent_hash")[1]["fallback"]  # no key: a fallback decision
    assert metric(router, "shardgate_policy_fallbacks_total", "consistent_hash") == fell + 1
    assert metric(router, "shardgate_policy_decisions_total", "consistent_hash") == made + 1


def test_explain_decides_without_sending_anything(every_policy) -> None:
    router, workers = every_policy
    before = [worker_stats(w)["requests"] for w in workers]
    fallbacks = metric(router, "shardgate_policy_fallbacks_total", "consistent_hash")
    for policy in POLICY_NAMES:
        shown = explain(router, f"m-{policy}", "sess-9")
        assert shown["router"] == "http_regular" and shown["policy"] == policy
        assert shown["worker"] in {w.url for w in workers} and shown["reason"]
    keyless = explain(router, "m-consistent_hash")
    assert keyless["fallback"] and "no routing key" in keyless["reason"]
    assert [worker_stats(w)["requests"] for w in workers] == before
    assert metric(router, "shardgate_policy_fallbacks_total", "consistent_hash") == fallbacks
    status, _, _ = http("GET", router.url + "/route/explain")
    assert status == 405
    # A keyless request that is really routed counts as a fallback.
    served(router, "m-consistent_hash")
    assert metric(router, "shardgate_policy_fallbacks_total", "consistent_hash") == fallbacks + 1


# -- least_loaded on the engines' own figures ----------------------------------------------------


def test_least_loaded_follows_the_engines_metrics(start_worker, start_router, streams) -> None:
    a = start_worker(["m1"], *SLOW)
    b = start_worker(["m1"])
    router = start_router([a.url, b.url], "--proxies", "2", "--policy", "least_loaded",
                          "--metrics-interval", "0.5")
    # Streams sent to A directly: the router's own counters know nothing of them.
    for _ in range(2):
        streams(a.url, "m1")
    assert "vllm:num_requests_running" in http("GET", a.url + "/metrics")[2].decode()

    def scraped() -> bool:
        shown = explain(router, "m1")
        return shown["worker"] == b.url and not shown["fallback"]  # not "no fresh engine metrics"

    wait_for(scraped, what="a scrape showing A busy")
    assert worker_row(router, a.url)["in_flight"] == 0
    names = across_proxies(router, lambda: served(router, "m1"), each=3)
    assert {n for n, _ in names} == {name_of(b)}, [(n, d["reason"], d["scores"]) for n, d in names]
    assert {d["reason"] for _, d in names} == {"fewest running + waiting requests (engine metrics)"}
    assert worker_stats(a)["requests"] == 2
