"""The mock worker's SGLang/vLLM native endpoints and multipart audio endpoints.

Role: plausible answers for the paths the router passes through besides the OpenAI JSON ones
(:mod:`proxy_workers.routing.paths`), so tests can see each reach a worker: ``/generate``,
``/tokenize``, ``/detokenize``, ``/rerank`` (and ``/v1/rerank``), ``/health_generate``,
``/version``, ``/get_model_info``, ``/get_server_info``, and multipart
``/v1/audio/transcriptions``/``translations``.

Invariants:
- Every request is recorded as the OpenAI ones are (``/mock/stats``: last path, headers, JSON
  body) and the raw body's length and sha256 are kept too (``last_body_len``,
  ``last_body_sha256``), so a test can check a multipart body arrived byte for byte.
- Injected failures (``fail_status``) and the model check apply as for the OpenAI endpoints: a
  body ``model`` the worker does not serve is a 404 (a misrouted request shows).
- Answers are pure functions of the request (``payloads``): deterministic tokens and text.
"""

from __future__ import annotations

import hashlib
from email.parser import BytesParser
from email.policy import HTTP
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from shardgate.mocks import payloads as mp

if TYPE_CHECKING:
    from shardgate.mocks.worker import MockWorker

VERSION = "0.0.0-shardgate-mock"


def _tokens(text: str) -> list[int]:
    """One token id per whitespace-separated word (deterministic)."""
    return [mp._seed(word) % 32000 for word in text.split()]


class NativeEndpoints:
    """Handlers of one mock worker's native endpoints."""

    def __init__(self, worker: MockWorker) -> None:
        self.worker = worker

    async def _json(self, request: web.Request) -> tuple[web.Response | None, dict[str, Any], str]:
        """Record the request; (failure or None, JSON body, model) after the common checks."""
        raw = await request.read()
        self.worker.last_raw = (len(raw), hashlib.sha256(raw).hexdigest())
        body = await self.worker._record(request)
        failure, model = self.worker._check_common(body, self.worker.cfg)
        return failure, body if isinstance(body, dict) else {}, model

    async def generate(self, request: web.Request) -> web.Response:
        failure, body, model = await self._json(request)
        if failure is not None:
            return failure
        text = body.get("text") or ""
        prompt = text if isinstance(text, str) else " ".join(map(str, text))
        n = self.worker.cfg.output_tokens
        out = mp.expected_text(prompt, n)
        self.worker.completed += 1
        return _json({"text": out, "meta_info": {
            "id": mp.new_id("completions"), "model": model, "prompt_tokens": len(_tokens(prompt)),
            "completion_tokens": n, "finish_reason": {"type": "length", "length": n}}})

    async def tokenize(self, request: web.Request) -> web.Response:
        failure, body, model = await self._json(request)
        if failure is not None:
            return failure
        prompt = body.get("prompt", body.get("text", ""))
        tokens = _tokens(prompt if isinstance(prompt, str) else "")
        self.worker.completed += 1
        return _json({"tokens": tokens, "count": len(tokens), "max_model_len": 8192, "model": model})

    async def detokenize(self, request: web.Request) -> web.Response:
        failure, body, model = await self._json(request)
        if failure is not None:
            return failure
        tokens = body.get("tokens") or []
        self.worker.completed += 1
        return _json({"prompt": " ".join(f"t{t}" for t in tokens), "model": model})

    async def rerank(self, request: web.Request) -> web.Response:
        failure, body, model = await self._json(request)
        if failure is not None:
            return failure
        query = str(body.get("query", ""))
        documents = [str(d) for d in body.get("documents") or []]
        scored = sorted(((mp._seed(query + d) % 1000 / 1000, i) for i, d in enumerate(documents)),
                        reverse=True)
        self.worker.completed += 1
        return _json({"id": mp.new_id("completions"), "model": model, "results": [
            {"index": i, "relevance_score": s, "document": {"text": documents[i]}} for s, i in scored],
            "usage": {"total_tokens": len(_tokens(query + " " + " ".join(documents)))}})

    async def health_generate(self, request: web.Request) -> web.Response:
        await self.worker._record(request)
        if self.worker.cfg.fail_health or self.worker.cfg.fail_status:
            return _json({"status": "unhealthy"}, status=503)
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        await self.worker._record(request)
        return _json({"version": VERSION})

    async def model_info(self, request: web.Request) -> web.Response:
        await self.worker._record(request)
        cfg = self.worker.cfg
        return _json({"model_path": cfg.models[0], "tokenizer_path": cfg.models[0],
                      "is_generation": True, "served_models": list(cfg.models)})

    async def server_info(self, request: web.Request) -> web.Response:
        await self.worker._record(request)
        cfg = self.worker.cfg
        return _json({"version": VERSION, "model_path": cfg.models[0], "served_models": list(cfg.models),
                      "disaggregation_mode": "null" if cfg.role == "regular" else cfg.role,
                      "name": self.worker.name})

    async def transcription(self, request: web.Request) -> web.Response:
        """Multipart audio: the ``model`` form field names the model; the file is not decoded."""
        worker = self.worker
        raw = await request.read()
        await worker._record(request)  # JSON body: none (multipart)
        worker.last_raw = (len(raw), hashlib.sha256(raw).hexdigest())
        if worker.cfg.fail_status:
            return worker._error(worker.cfg.fail_status, "injected failure", "server_error",
                                 code=worker.cfg.fail_status)
        form = _form_fields(request.headers.get("Content-Type", ""), raw)
        if form is None:
            return worker._error(400, "malformed multipart body")
        model = form.get("model")
        if model is None:
            return worker._error(400, "multipart body has no 'model' field", param="model")
        served = model.decode(errors="replace")
        if served not in worker.cfg.models:
            return worker._error(404, f"The model `{served}` does not exist.", param="model",
                                 code="model_not_found")
        size = len(form.get("file", b""))
        worker.completed += 1
        return _json({"text": f"mock transcription of {size} bytes", "model": served})


def _form_fields(content_type: str, raw: bytes) -> dict[str, bytes] | None:
    """name -> content of a multipart/form-data body (the stdlib email parser; None: not multipart)."""
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw)
    if not message.is_multipart():
        return None
    out: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            payload = part.get_payload(decode=True)
            out[name] = payload if isinstance(payload, bytes) else b""
    return out


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(payload), status=status, content_type="application/json")


def add_routes(app: web.Application, worker: MockWorker) -> None:
    """Register the native endpoints of ``worker`` on ``app``."""
    native = NativeEndpoints(worker)
    for path, handler in (("/generate", native.generate), ("/tokenize", native.tokenize),
                          ("/detokenize", native.detokenize), ("/rerank", native.rerank),
                          ("/v1/rerank", native.rerank),
                          ("/v1/audio/transcriptions", native.transcription),
                          ("/v1/audio/translations", native.transcription)):
        app.router.add_post(path, handler)
    for path, get in (("/health_generate", native.health_generate), ("/version", native.version),
                      ("/get_model_info", native.model_info), ("/get_server_info", native.server_info)):
        app.router.add_get(path, get)
