"""Locust load test: chat and streaming users against a running shardgate router.

Role: drive OpenAI-style traffic at the router and record what users feel: request latency for
plain chat, and time to first token (TTFT) plus full-stream time for streams. TTFT is reported as
its own entry (``POST /v1/chat/completions [ttft]``) so its percentiles show up next to the rest.

Run headless against the demo (``shardgate demo`` in another terminal), bounded in users and time::

    pip install -e '.[load]'
    locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8080 \
        -u 50 -r 10 -t 60s --only-summary

Environment: ``SHARDGATE_MODELS`` (comma list; default the demo's two models),
``SHARDGATE_MAX_TOKENS`` (default 16).
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import FastHttpUser, HttpUser, between, events, task

MODELS = os.environ.get("SHARDGATE_MODELS", "llama-3.1-8b,qwen-2.5").split(",")
MAX_TOKENS = int(os.environ.get("SHARDGATE_MAX_TOKENS", "16"))
PROMPTS = ["Tell me a story about routers.", "What is a KV cache?", "Summarise consistent hashing.",
           "Write a haiku about GPUs."]


def body(stream: bool) -> dict:
    return {"model": random.choice(MODELS), "stream": stream, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": random.choice(PROMPTS)}]}


class ChatUser(FastHttpUser):
    """Non-streaming chat completions."""

    weight = 1
    wait_time = between(0.05, 0.2)

    @task
    def chat(self) -> None:
        with self.client.post("/v1/chat/completions", json=body(False), catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}: {resp.text[:200]}")
            elif not resp.json().get("choices"):
                resp.failure("no choices in the answer")


class StreamUser(HttpUser):
    """Streaming chat completions; records time to first token separately (requests-based client,
    whose ``iter_lines`` yields each SSE line as it arrives)."""

    weight = 1
    wait_time = between(0.05, 0.2)

    @task
    def stream(self) -> None:
        start = time.perf_counter()
        first = None
        events_seen = 0
        with self.client.post("/v1/chat/completions", json=body(True), stream=True,
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
                return
            for line in resp.iter_lines():
                if not line.startswith(b"data:"):
                    continue
                if first is None:
                    first = time.perf_counter()
                events_seen += 1
                if line.strip() == b"data: [DONE]":
                    break
                json.loads(line[5:])
            else:
                resp.failure("stream ended without [DONE]")
                return
        if first is not None:
            events.request.fire(request_type="POST", name="/v1/chat/completions [ttft]",
                                response_time=(first - start) * 1000, response_length=0,
                                exception=None, context={})
