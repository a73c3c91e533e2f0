"""/metrics after a known mix of traffic: exact counts per label, histogram consistency, tokens.

Two proxies (the figures are summed from the shared load board at scrape time, so any proxy
answers with the totals), two models: m1 on a healthy mock (whole answers, streams with and
without ``include_usage``), m2 on a mock that answers 500 (``--fail-status``); plus one request
for a model nobody serves. Every expectation is exact.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import parser

from shm.histograms import LATENCY_BUCKETS, TPOT_BUCKETS
from shm.metricdefs import exported_names
from tests.conftest import chat, http, wait_for

OUTPUT_TOKENS = 4


def scrape(url: str) -> dict[str, Any]:
    status, _, body = http("GET", url + "/metrics")
    assert status == 200
    return {f.name: f for f in parser.text_string_to_metric_families(body.decode())}


def samples(families: dict[str, Any], family: str, name: str | None = None) -> list[Any]:
    """The samples named ``name`` (default: ``family``) of a family (the parser names a counter's
    family without its ``_total``)."""
    found = families.get(family) or families[family.removesuffix("_total")]
    return [s for s in found.samples if s.name == (name or family)]


def value(families: dict[str, Any], family: str, name: str | None = None, **labels: str) -> float:
    found = [s.value for s in samples(families, family, name) if s.labels == labels]
    assert len(found) == 1, (family, labels, samples(families, family, name))
    return found[0]


def check_histogram(families: dict[str, Any], family: str, bounds: tuple[float, ...], **labels: str) -> int:
    """Buckets cumulative and complete, +Inf = _count; returns _count."""
    buckets = [s for s in samples(families, family, family + "_bucket")
               if {k: v for k, v in s.labels.items() if k != "le"} == labels]
    assert [float(s.labels["le"]) for s in buckets] == [*bounds, float("inf")]
    counts = [s.value for s in buckets]
    assert counts == sorted(counts), counts
    count = value(families, family, family + "_count", **labels)
    assert counts[-1] == count
    assert value(families, family, family + "_sum", **labels) >= 0
    return int(count)


def test_metrics_after_a_known_mix(start_worker, start_router) -> None:
    good = start_worker(["m1"], "--output-tokens", str(OUTPUT_TOKENS))
    bad = start_worker(["m2"], "--fail-status", "500")
    router = start_router([good.url, bad.url], "--proxies", "2")
    url = router.url + "/v1/chat/completions"
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    for _ in range(3):
        status, _, body = http("POST", url, chat("m1"))
        assert status == 200
        got = json.loads(body)["usage"]
        usage["prompt_tokens"] += got["prompt_tokens"]
        usage["completion_tokens"] += got["completion_tokens"]
    for _ in range(2):  # streams with a usage chunk
        status, _, body = http("POST", url, chat("m1", stream=True, stream_options={"include_usage": True}))
        assert status == 200
        events = [json.loads(line[6:]) for line in body.decode().split("\n")
                  if line.startswith("data: {")]
        got = next(e["usage"] for e in events if e.get("usage"))
        usage["prompt_tokens"] += got["prompt_tokens"]
        usage["completion_tokens"] += got["completion_tokens"]
    status, _, body = http("POST", url, chat("m1", stream=True))  # no usage: its content events count
    assert status == 200 and body.count(b'"content"') == OUTPUT_TOKENS
    usage["completion_tokens"] += OUTPUT_TOKENS
    for _ in range(2):
        assert http("POST", url, chat("m2"))[0] == 500
    assert http("POST", url, chat("nobody-serves-this"))[0] == 404

    def settled() -> dict[str, Any] | None:
        families = scrape(router.url)
        done = sum(s.value for s in samples(families, "shardgate_model_requests_total"))
        timed = sum(s.value for s in samples(families, "shardgate_request_duration_seconds",
                                             "shardgate_request_duration_seconds_count"))
        return families if done == 9 and timed == 8 else None

    families = wait_for(settled, what="9 requests recorded")
    requests = {tuple(sorted(s.labels.items())): s.value
                for s in samples(families, "shardgate_model_requests_total")}
    assert requests == {
        (("model", "m1"), ("outcome", "success"), ("router", "http_regular"), ("status", "2xx")): 6,
        (("model", "m2"), ("outcome", "error"), ("router", "http_regular"), ("status", "5xx")): 2,
        (("model", "other"), ("outcome", "rejected"), ("router", "none"), ("status", "4xx")): 1,
    }
    duration, ttft = "shardgate_request_duration_seconds", "shardgate_time_to_first_token_seconds"
    assert check_histogram(families, duration, LATENCY_BUCKETS, model="m1") == 6
    assert check_histogram(families, duration, LATENCY_BUCKETS, model="m2") == 2
    assert check_histogram(families, duration, LATENCY_BUCKETS, model="other") == 0
    assert check_histogram(families, ttft, LATENCY_BUCKETS, model="m1") == 6
    tpot = "shardgate_time_per_output_token_seconds"
    assert check_histogram(families, tpot, TPOT_BUCKETS, model="m1") == 3
    assert value(families, "shardgate_input_tokens_total", model="m1") == usage["prompt_tokens"] > 0
    assert value(families, "shardgate_output_tokens_total", model="m1") == usage["completion_tokens"] == 6 * 4
    assert value(families, "shardgate_output_tokens_total", model="m2") == 0
    # Per worker: first-byte histogram, errors by kind, the type of each.
    first_byte = "shardgate_worker_first_byte_seconds"
    assert check_histogram(families, first_byte, LATENCY_BUCKETS, worker=good.url) == 6
    assert check_histogram(families, first_byte, LATENCY_BUCKETS, worker=bad.url) == 2
    assert value(families, "shardgate_worker_errors_by_kind_total", worker=bad.url, kind="status") == 2
    assert value(families, "shardgate_worker_errors_by_kind_total", worker=good.url, kind="status") == 0
    assert value(families, "shardgate_worker_info", worker=good.url, type="regular", connection="http") == 1
    # The existing totals agree with the per-model ones; refusals keep their reason.
    assert value(families, "shardgate_requests_total") == 9
    assert value(families, "shardgate_requests_rejected_total", reason="model_not_found") == 1
    assert value(families, "shardgate_retries_by_reason_total", reason="status") == 0
    assert value(families, "shardgate_proxies") == 2
    assert sum(s.value for s in samples(families, "shardgate_proxy_up")) == 2
    # Every family exported is declared (the one declaration docs/metrics.md is generated from).
    exported = {s.name for f in families.values() for s in f.samples}
    assert exported <= exported_names(), exported - exported_names()


def test_metrics_reference_is_generated() -> None:
    """docs/metrics.md is what ``shardgate metrics-doc`` writes from the one declaration."""
    from pathlib import Path

    from coordinator.docs import metrics_markdown

    committed = (Path(__file__).parent.parent / "docs" / "metrics.md").read_text()
    assert committed == metrics_markdown(), "run: shardgate metrics-doc -o docs/metrics.md"
