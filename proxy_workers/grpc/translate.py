"""OpenAI HTTP <-> the gRPC worker contract (``shm/proto/worker.proto``), both ways. Pure: no I/O.

Role: :func:`to_request` turns an OpenAI chat or completions body into a ``GenerateRequest``;
:class:`Renderer` turns the worker's stream back into what the HTTP routers return: an SSE stream
of ``chat.completion.chunk`` / ``text_completion`` chunks ending in ``data: [DONE]``, or one
``chat.completion`` / ``text_completion`` JSON object with usage. Worker error statuses map to
OpenAI-shaped router errors (:func:`worker_error`).

Invariants:
- Text in, text out: chat messages travel as (role, text) pairs, so the router needs no
  tokenizer or chat template. Content parts keep their text parts only (as the mock does).
- Fields the contract cannot express are refused with 400 naming the field (``n`` > 1, token-id
  prompts), never silently dropped; fields without meaning to a text worker
  (``logit_bias``, ``tools``...) are not forwarded.
- One stream has one ``id`` and ``created``; the first chat chunk carries the assistant role,
  like OpenAI's and the mock's; the usage chunk (choices ``[]``) comes only with
  ``stream_options.include_usage``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

from proxy_workers.errors import BadRequest, NotFound, RouterError
from proxy_workers.forwarding.handoff import PREFILL_KV_JSON
from shm.proto import worker_pb2 as pb

CHAT_PATH = b"/v1/chat/completions"
COMPLETIONS_PATH = b"/v1/completions"
DONE_EVENT = b"data: [DONE]\n\n"
_encode = msgspec.json.Encoder().encode
_FLOATS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")

# Which worker statuses are retried is the retry rule's (proxy_workers.forwarding.retry).
# Non-retryable worker statuses as (HTTP status, OpenAI type, code); anything else is a 502.
STATUS_MAP = {
    "INVALID_ARGUMENT": (400, "invalid_request_error", "invalid_request"),
    "FAILED_PRECONDITION": (400, "invalid_request_error", "failed_precondition"),
    "OUT_OF_RANGE": (400, "invalid_request_error", "invalid_request"),
    "NOT_FOUND": (404, "invalid_request_error", "model_not_found"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error", "worker_overloaded"),
    "DEADLINE_EXCEEDED": (504, "upstream_error", "upstream_timeout"),
}


class Plan(msgspec.Struct, frozen=True):
    """What the client asked for, beyond the GenerateRequest: the response's shape."""

    kind: str  # "chat" | "completions"
    model: str
    stream: bool
    include_usage: bool


class WorkerError(RouterError):
    """A worker's refusal (a gRPC status), relayed in OpenAI's error shape."""

    def __init__(self, status: int, err_type: str, code: str, message: str) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.type = err_type


def worker_error(code_name: str, details: str) -> RouterError:
    status, err_type, code = STATUS_MAP.get(code_name, (502, "upstream_error", "bad_gateway"))
    return WorkerError(status, err_type, code, f"worker answered {code_name}: {details}")


# -- request ---------------------------------------------------------------------------------------


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content
                       if isinstance(p, dict) and p.get("type") == "text")
    raise BadRequest("message content must be a string or a list of content parts", param="messages")


def _number(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"'{key}' must be a number", param=key)
    return float(value)


def _sampling(body: dict[str, Any]) -> pb.SamplingParams:
    sampling = pb.SamplingParams()
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
            raise BadRequest(f"'{key}' must be a non-negative integer", param=key)
        sampling.max_tokens = value
        break
    for key in _FLOATS:
        value = _number(body, key)
        if value is not None:
            setattr(sampling, key, value)
    stop = body.get("stop")
    if isinstance(stop, str):
        sampling.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        sampling.stop.extend(stop)
    elif stop is not None:
        raise BadRequest("'stop' must be a string or a list of strings", param="stop")
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**63:
            raise BadRequest("'seed' must be an integer", param="seed")
        sampling.seed = seed
    return sampling


def to_request(path: bytes, body: bytes, model: str, request_id: str) -> tuple[pb.GenerateRequest, Plan]:
    """The GenerateRequest for an OpenAI request, and the shape of the answer it wants."""
    if path == CHAT_PATH:
        kind = "chat"
    elif path == COMPLETIONS_PATH:
        kind = "completions"
    else:
        raise NotFound(f"{path.decode('latin-1')} is not served by gRPC workers "
                       "(they serve /v1/chat/completions and /v1/completions)")
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    n = doc.get("n")
    if n is not None and n != 1:
        raise BadRequest("gRPC workers generate one choice per request: 'n' must be 1", param="n")
    req = pb.GenerateRequest(request_id=request_id, model=model, sampling=_sampling(doc))
    if kind == "chat":
        messages = doc.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise BadRequest("'messages' is required and must be a list of objects", param="messages")
        req.kind = pb.KIND_CHAT
        for m in messages:
            role = m.get("role")
            req.messages.add(role=role if isinstance(role, str) else "", content=_text(m.get("content")))
    else:
        prompt = doc.get("prompt")
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt):
            raise BadRequest("'prompt' must be a string or a non-empty list of strings "
                             "(token ids need the worker's tokenizer)", param="prompt")
        req.kind = pb.KIND_COMPLETION
        req.prompt.extend(prompt)
    user = doc.get("user")
    if isinstance(user, str):
        req.user = user
    kv = doc.get("kv_transfer_params")
    if kv is not None:
        req.kv_transfer_params = _encode(kv)
    options = doc.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    return req, Plan(kind, model, bool(doc.get("stream")), include_usage)


# -- response --------------------------------------------------------------------------------------


def usage_dict(usage: pb.Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


class Renderer:
    """The OpenAI-shaped output of one request (SSE events or one JSON object)."""

    __slots__ = ("_role_sent", "created", "id", "obj", "plan")

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        chat = plan.kind == "chat"
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.obj = ("chat.completion.chunk" if chat else "text_completion") if plan.stream else \
            ("chat.completion" if chat else "text_completion")
        self._role_sent = False

    def _event(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        chunk: dict[str, Any] = {"id": self.id, "object": self.obj, "created": self.created,
                                 "model": self.plan.model, "choices": choices}
        if usage is not None:
            chunk["usage"] = usage
        return b"data: " + _encode(chunk) + b"\n\n"

    def _choice(self, text: str | None, finish: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.plan.kind != "chat":
            choice["text"] = text or ""
            return choice
        delta: dict[str, Any] = {}
        if not self._role_sent:
            delta["role"] = "assistant"
            self._role_sent = True
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
        return choice

    def delta(self, text: str) -> bytes:
        """One SSE event carrying a text delta."""
        return self._event([self._choice(text, None)])

    def end(self, finish: str, usage: pb.Usage) -> bytes:
        """The last SSE events: the finish chunk, the usage chunk if asked for, then [DONE]."""
        out = self._event([self._choice(None, finish)])
        if self.plan.include_usage:
            out += self._event([], usage_dict(usage))
        return out + DONE_EVENT

    def whole(self, text: str, finish: str, usage: pb.Usage) -> bytes:
        """The JSON body of a non-streamed answer."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.plan.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return _encode({"id": self.id, "object": self.obj, "created": self.created,
                        "model": self.plan.model, "choices": [choice], "usage": usage_dict(usage)})


def prefill_request(req: pb.GenerateRequest) -> pb.GenerateRequest:
    """The prefill leg of vLLM's two-phase handoff: one token, and a KV handle asked for."""
    leg = pb.GenerateRequest()
    leg.CopyFrom(req)
    leg.sampling.max_tokens = 1
    leg.kv_transfer_params = PREFILL_KV_JSON  # the same ask as HTTP PD's two-phase prefill
    return leg


def decode_request(req: pb.GenerateRequest, handle: bytes) -> pb.GenerateRequest:
    """The decode leg: the original request with the prefill's handle, relayed unread."""
    leg = pb.GenerateRequest()
    leg.CopyFrom(req)
    leg.kv_transfer_params = handle
    return leg
