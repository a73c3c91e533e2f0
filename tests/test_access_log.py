"""The access log: one JSON line per request, with the record's fields, and no secret in it.

The router runs with ``--access-log FILE --log-format json`` and two proxies (both append to the
file); a known mix of requests (whole answer, stream, unknown model, worker 500) must leave
exactly one line each, matched by request id, carrying what the client saw; the prompt and the
Authorization value sent with the requests appear nowhere in the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import chat, http, wait_for

FIELDS = {"time", "request_id", "peer", "method", "path", "model", "router", "policy", "worker", "status",
          "bytes", "duration", "ttft", "tokens_in", "tokens_out", "retries", "outcome", "proxy"}
PROMPT = "the-secret-prompt-text"
TOKEN = "Bearer sk-never-logged-123"


def test_json_access_log_one_line_per_request(start_worker, start_router, tmp_path: Path) -> None:
    good = start_worker(["m1"], "--output-tokens", "3")
    bad = start_worker(["m2"], "--fail-status", "500")
    log = tmp_path / "access.log"
    router = start_router([good.url, bad.url], "--proxies", "2", "--access-log", str(log),
                          "--log-format", "json")
    url = router.url + "/v1/chat/completions"
    headers = {"authorization": TOKEN}
    sent = [
        (chat("m1", PROMPT), 200, "m1", "success"),
        (chat("m1", PROMPT, stream=True), 200, "m1", "success"),
        # Refused while being routed: the record has no model (the body is never re-read for it).
        (chat("no-such-model", PROMPT), 404, "", "rejected"),
        (chat("m2", PROMPT), 500, "m2", "error"),
    ]
    expected = {}
    for body, status, model, outcome in sent:
        got, head, answer = http("POST", url, body, headers)
        assert got == status, answer
        expected[head["x-request-id"]] = (status, model, outcome, len(answer))

    def lines() -> list[dict] | None:
        if not log.exists():
            return None
        found = [json.loads(line) for line in log.read_text().splitlines() if line]
        return found if len(found) >= len(expected) else None

    records = wait_for(lines, what="one access-log line per request")
    assert len(records) == len(expected)  # exactly one each: no duplicates
    by_id = {r["request_id"]: r for r in records}
    assert set(by_id) == set(expected)
    for rid, (status, model, outcome, size) in expected.items():
        r = by_id[rid]
        assert set(r) == FIELDS, r
        assert (r["status"], r["model"], r["outcome"], r["method"], r["path"]) == \
            (status, model, outcome, "POST", "/v1/chat/completions"), r
        assert r["peer"] == "127.0.0.1"
        assert r["bytes"] >= size > 0  # the body, plus the head
        assert r["duration"] >= 0
        if outcome == "rejected":
            assert (r["router"], r["worker"], r["ttft"]) == ("none", "", r["duration"])
        else:
            assert r["router"] == "http_regular" and r["policy"]
            assert r["worker"] == (good.url if model == "m1" else bad.url)
            assert 0 <= r["ttft"] <= r["duration"]
            assert r["retries"] == 0
    whole = by_id[next(rid for rid, e in expected.items() if e[1] == "m1")]
    assert whole["tokens_out"] == 3 and whole["tokens_in"] > 0
    text = log.read_text()
    assert PROMPT not in text and "sk-never-logged" not in text
