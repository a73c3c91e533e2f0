"""The mock worker over gRPC: ``shardgate mock-worker --grpc`` (grpc.aio on uvloop).

Role: serves ``shm/proto/worker.proto`` (``Worker``: Generate, Abort, GetModelInfo, GetLoad),
the standard ``grpc.health.v1`` health service and the test-only ``MockControl`` (stats, runtime
config, reset), with the same behaviour knobs as the HTTP mock (:class:`MockConfig`: ttft, tps,
output_tokens, fail_status, stall, drop_after, fail_health).

Invariants:
- Output is the HTTP mock's: the same prompt text and token count give the same text
  (``mock_payloads.expected_text``), the same usage and the same finish reason, so a test can
  compare an answer through either router with one expectation.
- Each Generate reads the config once, on arrival. ``in_flight`` covers it from validation to the
  end of generation; every counted request ends as exactly one of ``completed``, ``aborted``
  (client cancelled the call, or an Abort RPC named it), ``dropped`` (``drop_after``) or
  ``refused`` (an error status before any message).
- Prefill/decode, vLLM's two-phase handoff: a prefill worker asked with
  ``{"do_remote_decode": true}`` answers one token and a KV handle in its Complete message; the
  handle is the HTTP mock's (``shardgate.mocks.pd_worker``: an HMAC of the prompt under a secret all mocks
  share). A decode worker refuses a request without a handle (FAILED_PRECONDITION) or with one
  that no prefill worker issued for this prompt (INVALID_ARGUMENT): it has no KV to decode from.
- GetLoad reports what the HTTP mock's ``/metrics`` does: running = ``in_flight``, waiting 0 (the
  mock never queues), KV usage ``in_flight / KV_CAPACITY`` (capped at 1).
- Health is NOT_SERVING exactly while ``fail_health`` is set (flag or ``Configure``).
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

import grpc
import msgspec
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shardgate.mocks import payloads as mp
from shardgate.mocks import pd_worker as mock_pd
from shardgate.mocks.worker import (
    SHUTDOWN_TIMEOUT,
    MockConfig,
    cannot_listen,
    parse_args,
    patched,
    run,
    run_until_signalled,
    token_gap,
)
from shm.proto import worker_pb2 as pb
from shm.proto import worker_pb2_grpc as pbg

SERVICE = "shardgate.worker.v1.Worker"
# An HTTP status from --fail-status, as the gRPC status a real worker would answer.
FAIL_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
              429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE,
              504: grpc.StatusCode.DEADLINE_EXCEEDED}


class Refused(Exception):
    """A request the mock answers with an error status before any message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def prompt_text(req: pb.GenerateRequest) -> str:
    """The prompt as the HTTP mock sees it: message contents (or prompts) joined by newlines."""
    if req.kind == pb.KIND_CHAT:
        return "\n".join(m.content for m in req.messages)
    if req.kind == pb.KIND_COMPLETION:
        if not req.prompt:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "'prompt' is required")
        return "\n".join(req.prompt)
    raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "kind must be KIND_CHAT or KIND_COMPLETION")


def _kv_params(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        doc = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "kv_transfer_params is not JSON") from None
    if not isinstance(doc, dict):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "kv_transfer_params must be a JSON object")
    return doc


class Job(msgspec.Struct):
    model: str
    prompt: str
    n_tokens: int
    finish: str
    handle: bytes  # the KV handle a prefill returns in its Complete (empty otherwise)


class GrpcMock(pbg.WorkerServicer, pbg.MockControlServicer):
    """Config, counters and handlers of one gRPC mock worker."""

    def __init__(self, cfg: MockConfig, health_servicer: health.aio.HealthServicer) -> None:
        self.cfg = cfg
        self.health = health_servicer
        self.name = cfg.name or f"{cfg.host}:{cfg.port}"
        self.running: dict[str, asyncio.Event] = {}  # request_id -> set to stop it (Abort)
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        self.requests = self.completed = self.aborted = self.dropped = self.refused = 0
        self.abort_rpcs = 0
        self.last_request: dict[str, Any] = {}
        self.last_metadata: dict[str, str] = {}

    def stats(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.cfg.role, "models": list(self.cfg.models),
                "requests": self.requests, "completed": self.completed, "aborted": self.aborted,
                "dropped": self.dropped, "refused": self.refused, "errors": self.refused,
                "abort_rpcs": self.abort_rpcs, "in_flight": self.in_flight,
                "last_request": self.last_request, "last_metadata": self.last_metadata}

    async def set_health(self) -> None:
        status = (health_pb2.HealthCheckResponse.NOT_SERVING if self.cfg.fail_health
                  else health_pb2.HealthCheckResponse.SERVING)
        for service in ("", SERVICE):
            await self.health.set(service, status)

    # -- Worker ----------------------------------------------------------------------------

    def _job(self, req: pb.GenerateRequest, cfg: MockConfig) -> Job:
        if cfg.fail_status:
            code = FAIL_CODES.get(cfg.fail_status, grpc.StatusCode.INTERNAL if cfg.fail_status >= 500
                                  else grpc.StatusCode.FAILED_PRECONDITION)
            raise Refused(code, f"injected failure ({cfg.fail_status})")
        model = req.model or cfg.models[0]
        if model not in cfg.models:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"The model `{model}` does not exist.")
        prompt = prompt_text(req)
        cap = req.sampling.max_tokens if req.sampling.HasField("max_tokens") else None
        n_tokens, finish = (cap, "length") if cap is not None and cap < cfg.output_tokens \
            else (cfg.output_tokens, "stop")
        kv = _kv_params(req.kv_transfer_params)
        handle = b""
        if cfg.role == "prefill" and kv.get("do_remote_decode"):
            n_tokens, finish = min(n_tokens, 1), "length"
            handle = msgspec.json.encode(mock_pd.issue(self.name, prompt))
        elif cfg.role == "decode":
            if not kv.get("do_remote_prefill"):
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              "decode worker needs kv_transfer_params from a prefill worker")
            if not hmac.compare_digest(str(kv.get("handle", "")), mock_pd.handle_for(prompt)):
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                              "kv_transfer_params were not issued by a prefill worker for this prompt")
        return Job(model, prompt, n_tokens, finish, handle)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> Any:
        cfg = self.cfg
        self.requests += 1
        self.last_request = json_format.MessageToDict(request, preserving_proto_field_name=True)
        metadata = dict(context.invocation_metadata() or ())
        self.last_metadata = {k: v for k, v in metadata.items() if isinstance(v, str)}
        try:
            job = self._job(request, cfg)
        except Refused as exc:
            self.refused += 1
            await context.abort(exc.code, exc.message)
        stamp = [("x-mock-worker", self.name)]
        if "x-request-id" in metadata:
            stamp.append(("x-mock-request-id", metadata["x-request-id"]))
        # Headers go out before the TTFT wait, as a real engine's do.
        await context.send_initial_metadata(stamp)
        stop = asyncio.Event()
        rid = request.request_id
        if rid:
            self.running[rid] = stop
        self.in_flight += 1
        outcome = "aborted"
        try:
            async for message in self._produce(job, cfg, stop):
                yield message
            outcome = "completed" if not stop.is_set() else "aborted"
        except _Dropped:
            outcome = "dropped"
        finally:
            self.in_flight -= 1
            if rid and self.running.get(rid) is stop:
                del self.running[rid]
            setattr(self, outcome, getattr(self, outcome) + 1)
        if outcome == "dropped":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker dropped the stream")
        elif outcome == "aborted":
            await context.abort(grpc.StatusCode.CANCELLED, "request aborted")

    async def _produce(self, job: Job, cfg: MockConfig, stop: asyncio.Event) -> Any:
        if cfg.stall:
            await stop.wait()
            return
        gap = token_gap(cfg)
        if await _pace(cfg.ttft, stop):
            return
        for index, token in enumerate(mp.token_list(job.prompt, job.n_tokens)):
            if index and await _pace(gap, stop):
                return
            if index == cfg.drop_after:
                raise _Dropped
            yield pb.GenerateResponse(chunk=pb.Chunk(text=token))
        if job.n_tokens == cfg.drop_after:
            raise _Dropped
        use = mp.usage(job.prompt, job.n_tokens)
        yield pb.GenerateResponse(complete=pb.Complete(
            finish_reason=job.finish, usage=pb.Usage(**use), kv_transfer_params=job.handle))

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        self.abort_rpcs += 1
        stop = self.running.get(request.request_id)
        if stop is not None:
            stop.set()
        return pb.AbortResponse(found=stop is not None)

    async def GetModelInfo(self, request: pb.ModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return pb.ModelInfo(models=self.cfg.models, role=self.cfg.role, name=self.name)

    async def GetLoad(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext) -> pb.Load:
        return pb.Load(running=self.in_flight, waiting=0,
                       kv_usage=min(self.in_flight / mp.KV_CAPACITY, 1.0))

    # -- MockControl -------------------------------------------------------------------------

    async def GetStats(self, request: pb.Json, context: grpc.aio.ServicerContext) -> pb.Json:
        return pb.Json(json=msgspec.json.encode(self.stats()).decode())

    async def Configure(self, request: pb.Json, context: grpc.aio.ServicerContext) -> pb.Json:
        try:
            self.cfg = patched(self.cfg, msgspec.json.decode(request.json or "{}"))
        except (msgspec.DecodeError, msgspec.ValidationError, mp.BadRequest) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        await self.set_health()
        return pb.Json(json=msgspec.json.encode(self.cfg).decode())

    async def Reset(self, request: pb.Json, context: grpc.aio.ServicerContext) -> pb.Json:
        self.reset()
        return pb.Json(json=msgspec.json.encode(self.stats()).decode())


class _Dropped(Exception):
    """drop_after cut the stream (a crashed engine, as the router sees it)."""


async def _pace(seconds: float, stop: asyncio.Event) -> bool:
    """Wait ``seconds`` unless stopped first; True when stopped (an Abort RPC arrived)."""
    if stop.is_set():
        return True
    if seconds > 0:
        try:
            await asyncio.wait_for(stop.wait(), seconds)
        except TimeoutError:
            return False
    return stop.is_set()


async def start(cfg: MockConfig) -> tuple[grpc.aio.Server, GrpcMock, int]:
    """Serve ``cfg`` until the server is stopped; returns the server, the mock and the bound port."""
    server = grpc.aio.server()
    health_servicer = health.aio.HealthServicer()
    mock = GrpcMock(cfg, health_servicer)
    pbg.add_WorkerServicer_to_server(mock, server)
    pbg.add_MockControlServicer_to_server(mock, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    except RuntimeError as exc:
        raise OSError(str(exc)) from None
    if not port:
        raise OSError("address unavailable")
    await server.start()
    mock.name = cfg.name or f"{cfg.host}:{port}"
    mock.cfg = msgspec.structs.replace(cfg, port=port, name=mock.name)
    await mock.set_health()
    return server, mock, port


async def serve(cfg: MockConfig) -> int:
    try:
        server, _, port = await start(cfg)
    except OSError as exc:
        return cannot_listen(cfg, exc)
    return await run_until_signalled(cfg, "grpc", port, lambda: server.stop(SHUTDOWN_TIMEOUT))


def main(argv: list[str]) -> int:
    """``argv``: the HTTP mock's flags, ``--grpc`` among them."""
    return run(serve(parse_args(argv)))
