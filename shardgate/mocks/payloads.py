"""Pure payload builders for the mock worker: deterministic text, OpenAI JSON shapes, Prometheus text.

Role: everything in ``shardgate.mocks.worker`` that does not touch the network lives here, so tests
(and the router's own tests) can compute exactly what a mock worker will answer without starting one.

Invariants:
- Output is a pure function of the prompt text and the token count: the same prompt always yields
  the same completion, different prompts almost always differ (crc32 seeds the token sequence).
- ``"".join(token_list(p, n)) == expected_text(p, n)``, so a streamed answer concatenates to
  exactly the non-streamed one.
- ``sse_events`` of a :class:`Job` is the whole stream, [DONE] last; chunk i < n_tokens is token i.
- Every error body has the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import msgspec

Kind = Literal["chat", "completions"]

EMBEDDING_DIM = 8
# A worker's "KV cache" is deemed full at this many concurrent requests; only used for load gauges.
KV_CAPACITY = 64
OWNED_BY = "shardgate-mock"


class BadRequest(ValueError):
    """A request body the mock refuses, with the OpenAI error ``param`` it concerns."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _seed(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def token_list(prompt_text: str, n_tokens: int) -> list[str]:
    """The completion's tokens; each carries its trailing space so tokens concatenate verbatim."""
    return list(iter_tokens(prompt_text, n_tokens))


def iter_tokens(prompt_text: str, n_tokens: int) -> Iterator[str]:
    """:func:`token_list`, one at a time (a long stream holds none of them in memory)."""
    seed = _seed(prompt_text)
    return (f"w{(seed + i) % 1000} " for i in range(max(n_tokens, 0)))


def expected_text(prompt_text: str, n_tokens: int) -> str:
    """The completion text a mock worker produces for ``prompt_text`` when it emits ``n_tokens``."""
    return "".join(token_list(prompt_text, n_tokens))


def _content_text(content: Any) -> str:
    # Chat content may be a plain string or a list of typed parts (vision-style); only text counts.
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise BadRequest("message content must be a string or a list of content parts", "messages")


def prompt_text_of(body: Mapping[str, Any]) -> str:
    """The prompt as text: chat message contents joined by newlines, or the completions prompt."""
    if "messages" in body:
        messages = body["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise BadRequest("'messages' must be a list of objects", "messages")
        return "\n".join(_content_text(m.get("content")) for m in messages)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    raise BadRequest("'prompt' must be a string or a list of strings", "prompt")


def requested_cap(body: Mapping[str, Any]) -> int | None:
    """The request's token limit (``max_completion_tokens`` wins over ``max_tokens``), if any."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        # bool is an int subclass; "max_tokens": true is a client bug, not a limit of 1.
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BadRequest(f"'{key}' must be a non-negative integer", key)
        return value
    return None


def plan_length(body: Mapping[str, Any], output_tokens: int) -> tuple[int, str]:
    """How many tokens to emit and the finish_reason: "length" only when the request's cap bit."""
    cap = requested_cap(body)
    if cap is not None and cap < output_tokens:
        return cap, "length"
    return output_tokens, "stop"


def usage(prompt_text: str, completion_tokens: int) -> dict[str, int]:
    prompt_tokens = len(prompt_text.split())
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def error_body(message: str, err_type: str = "invalid_request_error", *, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def new_id(kind: Kind) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def completion(kind: Kind, model: str, text: str, finish: str, use: dict[str, int]) -> dict[str, Any]:
    """A complete non-streamed ``chat.completion`` or ``text_completion`` object."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": new_id(kind),
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": use,
    }


class ChunkMaker:
    """Builds the SSE chunks of one stream; id and created stay fixed across chunks as OpenAI does."""

    def __init__(self, kind: Kind, model: str) -> None:
        self.kind = kind
        self.model = model
        self.id = new_id(kind)
        self.created = int(time.time())
        self._role_sent = False

    def _chunk(self, choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        chunk = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                 "choices": choices}
        if extra:
            chunk.update(extra)
        return chunk

    def _choice(self, text: str | None, finish: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.kind == "completions":
            choice["text"] = text or ""
            return choice
        delta: dict[str, Any] = {}
        # The first chunk of a chat stream announces the role, even when no token precedes the finish.
        if not self._role_sent:
            delta["role"] = "assistant"
            self._role_sent = True
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
        return choice

    def token(self, text: str) -> dict[str, Any]:
        return self._chunk([self._choice(text, None)])

    def finish(self, reason: str) -> dict[str, Any]:
        return self._chunk([self._choice(None, reason)])

    def usage(self, use: dict[str, int]) -> dict[str, Any]:
        return self._chunk([], {"usage": use})


def embedding_vector(text: str) -> list[float]:
    seed = _seed(text)
    # Spread the crc's bits over the dimensions; values land in [-1, 1) and are exact in JSON.
    return [((seed >> (i * 4)) & 0xFF) / 128.0 - 1.0 for i in range(EMBEDDING_DIM)]


def embedding_inputs(body: Mapping[str, Any]) -> list[str]:
    raw = body.get("input")
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        return list(raw)
    raise BadRequest("'input' must be a string or a non-empty list of strings", "input")


def embeddings(model: str, inputs: list[str]) -> dict[str, Any]:
    tokens = sum(len(t.split()) for t in inputs)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": embedding_vector(t)}
                 for i, t in enumerate(inputs)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def model_list(models: Iterable[str], role: str, name: str) -> dict[str, Any]:
    data = [{"id": m, "object": "model", "created": 0, "owned_by": OWNED_BY,
             "metadata": {"role": role, "worker": name}} for m in models]
    return {"object": "list", "data": data}


def _gauge(lines: list[str], metric: str, help_text: str, values: Mapping[str, float]) -> None:
    lines.append(f"# HELP {metric} {help_text}")
    lines.append(f"# TYPE {metric} gauge")
    lines.extend(f'{metric}{{model_name="{model}"}} {value}' for model, value in values.items())


def prometheus_text(in_flight_by_model: Mapping[str, int]) -> str:
    """vLLM- and SGLang-style load gauges; the KV usage reflects the whole worker, as in a real engine."""
    total = sum(in_flight_by_model.values())
    usage_frac = min(total / KV_CAPACITY, 1.0)
    running = {m: float(n) for m, n in in_flight_by_model.items()}
    zeros = dict.fromkeys(in_flight_by_model, 0.0)
    shared = dict.fromkeys(in_flight_by_model, usage_frac)
    lines: list[str] = []
    _gauge(lines, "vllm:num_requests_running", "Requests currently generating.", running)
    _gauge(lines, "vllm:num_requests_waiting", "Requests queued (the mock never queues).", zeros)
    _gauge(lines, "vllm:kv_cache_usage_perc", "Fraction of KV cache in use.", shared)
    _gauge(lines, "sglang:num_running_reqs", "Requests currently generating.", running)
    _gauge(lines, "sglang:num_queue_reqs", "Requests queued (the mock never queues).", zeros)
    _gauge(lines, "sglang:token_usage", "Fraction of KV cache tokens in use.", shared)
    return "\n".join(lines) + "\n"


class Job(msgspec.Struct, kw_only=True):
    """One validated generation request."""

    kind: Kind
    model: str
    prompt: str
    n_tokens: int
    finish: str
    stream: bool
    include_usage: bool


def make_job(kind: Kind, model: str, body: dict[str, Any], output_tokens: int) -> Job:
    """Validate an inference body for endpoint ``kind``; raises BadRequest with the offending param."""
    if kind == "chat" and not isinstance(body.get("messages"), list):
        raise BadRequest("'messages' is required and must be a list", "messages")
    if kind == "completions" and "prompt" not in body:
        raise BadRequest("'prompt' is required", "prompt")
    # Only the field the endpoint defines counts: a completions body with "messages" is still a prompt.
    field = "messages" if kind == "chat" else "prompt"
    prompt = prompt_text_of({field: body[field]})
    n_tokens, finish = plan_length(body, output_tokens)
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    return Job(kind=kind, model=model, prompt=prompt, n_tokens=n_tokens, finish=finish,
               stream=bool(body.get("stream")), include_usage=include_usage)


def sse_events(job: Job) -> Iterator[bytes]:
    """All SSE events of a stream, in order: one per token, the finish, optional usage, [DONE].
    Made as they are sent: a stream of a million tokens costs the mock one event at a time."""
    maker = ChunkMaker(job.kind, job.model)
    encode = msgspec.json.encode
    for tok in iter_tokens(job.prompt, job.n_tokens):
        yield b"data: " + encode(maker.token(tok)) + b"\n\n"
    yield b"data: " + encode(maker.finish(job.finish)) + b"\n\n"
    if job.include_usage:
        yield b"data: " + encode(maker.usage(usage(job.prompt, job.n_tokens))) + b"\n\n"
    yield b"data: [DONE]\n\n"
