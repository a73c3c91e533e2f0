"""Locust load test: chat, streaming and multi-turn session users against a shardgate router.

Role: drive OpenAI-style traffic at the router and report what users feel, each figure once:

- one request row per kind of request, named ``chat`` (non-streamed), ``stream`` (one-shot
  streams) and ``session`` (multi-turn streamed conversations), so the Aggregated row is exactly
  chat + stream + session;
- a stream's row is timed to its last byte (``data: [DONE]``), not to its response head: locust's
  ``HttpSession`` stops its clock when the call returns, which for ``stream=True`` is the head. The
  body is read inside a ``catch_response`` block and the request's ``response_time`` (and
  ``response_length``) set to the full figures before the block reports it, once;
- TTFT, inter-token latency (ITL), per-stream tokens/s and output tokens per answer go to
  :mod:`llm_metrics`, a store separate from locust's request statistics (its docstring says why):
  they never add to a request count.

Users: ``ChatUser``, ``StreamUser`` and ``SessionUser``, equal weights. A session sends
``--session-turns`` turns of one conversation that grows (every turn carries the whole history,
the assistant's earlier answers included), with an ``X-Session-ID`` header and the body's ``user``
field set to the session id, so ``session_affinity``, ``consistent_hash`` and ``cache_aware``
routing have keys and shared prefixes to work with. All users use locust's requests-based
``HttpUser``: its ``iter_lines`` yields each SSE line as it arrives, whereas ``FastHttpUser``'s
``iter_content`` waits for a full buffer (measured: a 5-token stream came back as one 1,500-byte
read at its end), which would put every token at the last byte.

Streams ask for ``stream_options.include_usage``; output tokens are the answer's
``usage.completion_tokens``, or the number of content chunks if the worker sends no usage.

Run it with everything started for you (mock fleet + router + report): ``loadtest/run``. Against
a running router (e.g. ``shardgate demo``)::

    locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8080 \
        -u 30 -r 10 -t 60s --csv results/locust --html results/report.html
    # step load: add loadtest/step_shape.py (-f loadtest/locustfile.py,loadtest/step_shape.py)

Options (locust flags; environment variables in brackets): ``--models`` (SHARDGATE_MODELS, comma
list, default the demo's two models), ``--max-tokens`` (SHARDGATE_MAX_TOKENS, 64),
``--session-turns`` (SHARDGATE_SESSION_TURNS, 4).
"""

from __future__ import annotations

import csv
import json
import random
import time
import uuid
from typing import Any

from llm_metrics import LLMMetrics  # locust puts the locustfile's directory on sys.path
from locust import HttpUser, between, events, task
from locust.env import Environment
from locust.runners import WorkerRunner
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

DEFAULT_MODELS = "llama-3.1-8b,qwen-2.5"
PROMPTS = ["Tell me a story about routers.", "What is a KV cache?", "Summarise consistent hashing.",
           "Write a haiku about GPUs.", "Why do streams need back-pressure?"]
FOLLOW_UPS = ["Go on.", "Shorter, please.", "Why?", "Give me an example.", "And then?"]
SESSION_HEADER = "X-Session-ID"

metrics = LLMMetrics()
events.init.add_listener(metrics.attach)
_environment: Environment | None = None


@events.init.add_listener
def _keep_environment(environment: Environment, **_: Any) -> None:
    global _environment
    _environment = environment


@events.quit.add_listener
def _final_csv(**_: Any) -> None:
    """Rewrite ``<prefix>_stats.csv`` and ``_failures.csv`` with the final figures, in locust's own
    format. Locust writes them once a second and never after the run: requests that end in the
    last second, or while in-flight users finish (``--stop-timeout``), are missing from them (a
    test run had 11 session requests in the CSV and 12 in locust's own console summary)."""
    env = _environment
    prefix = getattr(env.parsed_options, "csv_prefix", None) if env else None
    if env is None or not prefix or isinstance(env.runner, WorkerRunner):
        return
    writer = StatsCSV(env, PERCENTILES_TO_REPORT)
    with open(f"{prefix}_stats.csv", "w", newline="") as f:
        writer.requests_csv(csv.writer(f))
    with open(f"{prefix}_failures.csv", "w", newline="") as f:
        writer.failures_csv(csv.writer(f))


@events.init_command_line_parser.add_listener
def _options(parser: Any, **_: Any) -> None:
    parser.add_argument("--models", env_var="SHARDGATE_MODELS", default=DEFAULT_MODELS,
                        help="comma list of models to ask for, one picked at random per request "
                             "(per conversation for sessions)")
    parser.add_argument("--max-tokens", env_var="SHARDGATE_MAX_TOKENS", type=int, default=64,
                        help="max_tokens of every request")
    parser.add_argument("--session-turns", env_var="SHARDGATE_SESSION_TURNS", type=int, default=4,
                        help="turns per conversation of a SessionUser before it starts a new one")


def option(environment: Environment, name: str, default: Any) -> Any:
    """A custom option's value; the default when locust runs as a library without our parser."""
    value = getattr(environment.parsed_options, name, None)
    return default if value is None else value


class OpenAIUser(HttpUser):
    """Shared request code; not a user class itself."""

    abstract = True

    def models(self) -> list[str]:
        return [m for m in str(option(self.environment, "models", DEFAULT_MODELS)).split(",") if m]

    def body(self, model: str, messages: list[dict[str, str]], stream: bool,
             user: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "messages": messages, "stream": stream,
                                "max_tokens": int(option(self.environment, "max_tokens", 64))}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if user is not None:
            body["user"] = user
        return body

    def chat(self, name: str, body: dict[str, Any]) -> str | None:
        """One non-streamed completion; returns the assistant's text, None on failure. Its row is
        locust's own timing, which for a non-streamed request already includes the whole body."""
        with self.client.post("/v1/chat/completions", json=body, name=name, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}: {resp.text[:200]}")
                return None
            try:
                answer = resp.json()
                text = answer["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                resp.failure(f"malformed answer: {exc!r}")
                return None
            usage = answer.get("usage") or {}
            metrics.output_tokens(name, int(usage.get("completion_tokens") or 0))
            return str(text)

    def stream(self, name: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> str | None:
        """One streamed completion read to its end; returns the assistant's text, None on failure.

        The row's time runs from just before the request to the last line read, and only
        complete streams (``data: [DONE]``, no ``event: error``) feed the token metrics."""
        start = time.perf_counter()
        first: float | None = None
        last: float | None = None
        gaps: list[float] = []
        chunks = 0
        usage_tokens = None
        received = 0
        text: list[str] = []
        with self.client.post("/v1/chat/completions", json=body, name=name, headers=headers,
                              stream=True, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.request_meta["response_time"] = (time.perf_counter() - start) * 1000
                resp.failure(f"status {resp.status_code}: {resp.text[:200]}")
                return None
            problem = "stream ended without data: [DONE]"
            try:
                for line in resp.iter_lines():
                    received += len(line) + 1
                    if line.startswith(b"event:") and b"error" in line:
                        problem = f"the stream carried an error event: {line[:200]!r}"
                        break
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        problem = ""
                        break
                    chunk = json.loads(payload)
                    if chunk.get("usage"):
                        usage_tokens = chunk["usage"].get("completion_tokens")
                    for choice in chunk.get("choices") or ():
                        content = (choice.get("delta") or {}).get("content")
                        if not content:
                            continue
                        now = time.perf_counter()
                        if last is None:
                            first = now
                        else:
                            gaps.append(now - last)
                        last = now
                        chunks += 1
                        text.append(content)
            except Exception as exc:  # a broken connection or a malformed chunk fails the request
                problem = f"reading the stream: {exc!r}"
            end = time.perf_counter()
            resp.request_meta["response_time"] = (end - start) * 1000
            resp.request_meta["response_length"] = received
            if problem:
                resp.failure(problem)
                return None
        tokens = int(usage_tokens) if usage_tokens is not None else chunks
        metrics.output_tokens(name, tokens)
        if first is not None and last is not None:
            metrics.first_token(name, first - start)
            for gap in gaps:
                metrics.inter_token(name, gap)
            if tokens > 1 and last > first:
                metrics.decode_rate(name, (tokens - 1) / (last - first))
        return "".join(text)


class ChatUser(OpenAIUser):
    """Non-streamed chat completions, one-shot prompts."""

    wait_time = between(0.05, 0.2)

    @task
    def ask(self) -> None:
        prompt = [{"role": "user", "content": random.choice(PROMPTS)}]
        self.chat("chat", self.body(random.choice(self.models()), prompt, stream=False))


class StreamUser(OpenAIUser):
    """Streamed chat completions, one-shot prompts."""

    wait_time = between(0.05, 0.2)

    @task
    def ask(self) -> None:
        prompt = [{"role": "user", "content": random.choice(PROMPTS)}]
        self.stream("stream", self.body(random.choice(self.models()), prompt, stream=True))


class SessionUser(OpenAIUser):
    """A streamed conversation of ``--session-turns`` turns that grows, then a new one. The think
    time between turns is a person reading the answer."""

    wait_time = between(0.3, 1.0)

    def on_start(self) -> None:
        self.new_session()

    def new_session(self) -> None:
        self.session_id = uuid.uuid4().hex
        self.model = random.choice(self.models())
        self.messages: list[dict[str, str]] = [
            {"role": "system", "content": "You are a concise assistant for people who run GPU fleets."}]

    @task
    def turn(self) -> None:
        turns = int(option(self.environment, "session_turns", 4))
        if len(self.messages) >= 1 + 2 * turns:
            self.new_session()
        first = len(self.messages) == 1
        self.messages.append({"role": "user",
                              "content": random.choice(PROMPTS if first else FOLLOW_UPS)})
        body = self.body(self.model, self.messages, stream=True, user=self.session_id)
        answer = self.stream("session", body, headers={SESSION_HEADER: self.session_id})
        if answer is None:
            self.new_session()  # a failed turn ends the conversation, as a person would start over
            return
        self.messages.append({"role": "assistant", "content": answer})
