"""A fake OpenAI-compatible inference server for tests, load tests and the demo.

Role: a real aiohttp HTTP server that answers ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/embeddings`` with deterministic output (see ``shardgate.mocks.payloads``), streams SSE chunk by
chunk, and lets a test inject faults at runtime (``POST /mock/config``) and observe what it saw
(``GET /mock/stats``). Run it with ``python -m shardgate.mocks.worker --port P`` or embed it with
:func:`build_app` / :func:`start`.

Invariants:
- Each request reads the config once, on arrival: ``/mock/config`` swaps in a new validated
  :class:`MockConfig`, so a request in progress never sees half of a change.
- ``in_flight`` covers a request from validation to the end of generation (stall and TTFT
  included) and is decremented in ``finally``; every such request ends as exactly one of
  ``completed``, ``aborted`` (the client went away) or ``dropped`` (``drop_after`` cut it).
- Client disconnects are detected for real: the runner uses ``handler_cancellation=True``, so a
  vanished client cancels the handler even while it sleeps; embedders must do the same.
- Every response carries ``X-Mock-Worker`` and echoes ``X-Request-ID`` as ``X-Mock-Request-ID``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

from shardgate.mocks import native
from shardgate.mocks import payloads as mp
from shardgate.mocks import pd_worker as mock_pd

Role = Literal["regular", "prefill", "decode"]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
RUNTIME_KEYS = frozenset(
    {"ttft", "tps", "output_tokens", "fail_status", "stall", "drop_after", "fail_health"}
)
# A stalled or slow request must not hold up SIGTERM: the mock exits promptly, cancelling them.
SHUTDOWN_TIMEOUT = 0.5

Outcome = Literal["completed", "dropped"]
NOT_JSON = object()  # _record's answer for a body that does not parse, distinct from JSON null
Producer = Callable[[], Awaitable[tuple[web.StreamResponse, Outcome]]]


class ClientGone(Exception):
    """A write found the client gone; carries the already-prepared response back to aiohttp."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("client disconnected")
        self.response = response


class MockConfig(msgspec.Struct, kw_only=True):
    """Everything that shapes a mock worker's behaviour; the fields in RUNTIME_KEYS may change live."""

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    models: list[str] = msgspec.field(default_factory=lambda: ["mock-model"])
    role: Role = "regular"
    name: str = ""  # empty: "HOST:PORT" with the port actually bound
    ttft: NonNegFloat = 0.0
    tps: NonNegFloat = 0.0
    output_tokens: Annotated[int, msgspec.Meta(ge=0)] = 16
    fail_status: Annotated[int, msgspec.Meta(ge=0, le=599)] = 0
    stall: bool = False
    drop_after: Annotated[int, msgspec.Meta(ge=-1)] = -1
    fail_health: bool = False


class MockWorker:
    """Config, counters and request handlers of one mock worker."""

    def __init__(self, cfg: MockConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name or f"{cfg.host}:{cfg.port}"
        self.in_flight: defaultdict[str, int] = defaultdict(int)
        self.rooms = mock_pd.Rooms()
        self.reset()

    def reset(self) -> None:
        self.requests = self.completed = self.aborted = self.dropped = self.errors = 0
        self.last_headers: dict[str, str] = {}
        self.last_body: Any = None
        self.last_path = ""
        self.last_raw: tuple[int, str] = (0, "")  # native endpoints: raw body's length, sha256

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name, "role": self.cfg.role, "models": list(self.cfg.models),
            "requests": self.requests, "completed": self.completed, "aborted": self.aborted,
            "dropped": self.dropped, "errors": self.errors, "in_flight": sum(self.in_flight.values()),
            "last_headers": self.last_headers, "last_body": self.last_body, "last_path": self.last_path,
            "last_body_len": self.last_raw[0], "last_body_sha256": self.last_raw[1],
        }

    # --- plumbing -----------------------------------------------------------------------------

    def _error(self, status: int, message: str, err_type: str = "invalid_request_error", *,
               param: str | None = None, code: str | int | None = None) -> web.Response:
        self.errors += 1
        return json_response(mp.error_body(message, err_type, param=param, code=code), status=status)

    async def _record(self, request: web.Request) -> Any:
        """Count the request, remember what it looked like, and decode its body (NOT_JSON if invalid)."""
        self.requests += 1
        self.last_path = request.path
        self.last_headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            self.last_body = msgspec.json.decode(await request.read())
        except msgspec.DecodeError:
            self.last_body = None
            return NOT_JSON
        return self.last_body

    def _check_common(self, body: Any, cfg: MockConfig) -> tuple[web.Response | None, str]:
        """The gate every inference request passes: injected failure, JSON object, served model."""
        if cfg.fail_status:
            err_type = "server_error" if cfg.fail_status >= 500 else "invalid_request_error"
            return self._error(cfg.fail_status, "injected failure", err_type, code=cfg.fail_status), ""
        if body is NOT_JSON:
            return self._error(400, "request body is not valid JSON"), ""
        if not isinstance(body, dict):
            return self._error(400, "request body must be a JSON object"), ""
        # A missing model means "whatever you serve", which keeps hand-written curl demos short.
        model = body.get("model", cfg.models[0])
        if model not in cfg.models:
            msg = f"The model `{model}` does not exist."
            return self._error(404, msg, param="model", code="model_not_found"), ""
        return None, model

    async def _run(self, model: str, cfg: MockConfig, produce: Producer) -> web.StreamResponse:
        self.in_flight[model] += 1
        try:
            if cfg.stall:
                await asyncio.Event().wait()  # only cancellation (client gone, shutdown) ends this
            resp, outcome = await produce()
        except ClientGone as gone:
            self.aborted += 1
            return gone.response
        except asyncio.CancelledError:
            self.aborted += 1
            raise
        finally:
            self.in_flight[model] -= 1
        if outcome == "dropped":
            self.dropped += 1
        else:
            self.completed += 1
        return resp

    # --- inference ----------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completions")

    async def _generate(self, request: web.Request, kind: mp.Kind) -> web.StreamResponse:
        body = await self._record(request)
        cfg = self.cfg
        failure, model = self._check_common(body, cfg)
        if failure is not None:
            return failure
        try:
            job = mp.make_job(kind, model, body, cfg.output_tokens)
        except mp.BadRequest as exc:
            return self._error(400, str(exc), param=exc.param)
        request["kv_prefill"] = mock_pd.wants_prefill(body)  # this request's, not the last one's
        refusal = await self._pd_gate(body, job.prompt)
        if refusal is not None:
            return refusal
        if job.stream:
            return await self._run(model, cfg, lambda: self._stream(request, cfg, job))
        return await self._run(model, cfg, lambda: self._unary(request, cfg, job))

    async def _unary(self, request: web.Request, cfg: MockConfig, job: mp.Job,
                     ) -> tuple[web.Response, Outcome]:
        produced = job.n_tokens if cfg.drop_after < 0 else min(cfg.drop_after, job.n_tokens)
        await pace(cfg.ttft + token_gap(cfg) * max(produced - 1, 0))
        if cfg.drop_after >= 0:
            abort(request)
            # aiohttp swallows the ConnectionError of writing this to the aborted transport.
            return web.Response(status=500), "dropped"
        text = mp.expected_text(job.prompt, job.n_tokens)
        payload = mp.completion(job.kind, job.model, text, job.finish, mp.usage(job.prompt, job.n_tokens))
        if cfg.role == "prefill" and request.get("kv_prefill"):
            payload["kv_transfer_params"] = mock_pd.issue(self.name, job.prompt)
        return json_response(payload), "completed"

    async def _stream(self, request: web.Request, cfg: MockConfig, job: mp.Job,
                      ) -> tuple[web.StreamResponse, Outcome]:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        # Headers go out before the TTFT wait, as real engines do, so a router sees TTFB < TTFT.
        await resp.prepare(request)
        events = mp.sse_events(job)
        gap = token_gap(cfg)
        await pace(cfg.ttft)
        try:
            for index, event in enumerate(events):
                if 0 < index < job.n_tokens:
                    await pace(gap)
                if index == cfg.drop_after:
                    abort(request)
                    return resp, "dropped"
                await resp.write(event)
            await resp.write_eof()
        except ConnectionResetError as exc:
            # The peer vanished before aiohttp noticed (no cancellation yet): still an abort.
            raise ClientGone(resp) from exc
        return resp, "completed"

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        cfg = self.cfg
        failure, model = self._check_common(body, cfg)
        if failure is not None:
            return failure
        try:
            inputs = mp.embedding_inputs(body)
        except mp.BadRequest as exc:
            return self._error(400, str(exc), param=exc.param)

        async def produce() -> tuple[web.StreamResponse, Outcome]:
            await pace(cfg.ttft)
            return json_response(mp.embeddings(model, inputs)), "completed"

        return await self._run(model, cfg, produce)

    async def _pd_gate(self, body: dict[str, Any], prompt: str) -> web.Response | None:
        """Prefill/decode roles (shardgate.mocks.pd_worker): mark bootstrap rooms, check KV handoffs."""
        role = self.cfg.role
        if role == "prefill":
            self.rooms.mark(body)
            return None
        if role != "decode":
            return None
        why = mock_pd.check_decode(body, prompt)
        if not why and "bootstrap_room" in body:
            why = await mock_pd.wait_for_prefill(body)
            if why:
                return self._error(504, why, "server_error", code="bootstrap_timeout")
        return self._error(400, why, param="kv_transfer_params") if why else None

    async def bootstrap_room(self, request: web.Request) -> web.Response:
        """Stands in for a prefill engine's bootstrap server: is this room's prefill here?"""
        try:
            room = int(request.match_info["room"])
        except ValueError:
            return json_response(mp.error_body("room must be an integer"), status=400)
        ready = room in self.rooms.ready
        return json_response({"room": room, "ready": ready}, status=200 if ready else 404)

    # --- control and observability ------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        if self.cfg.fail_health:
            return json_response({"status": "unhealthy"}, status=503)
        return json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        return json_response(mp.model_list(self.cfg.models, self.cfg.role, self.name))

    async def get_stats(self, request: web.Request) -> web.Response:
        return json_response(self.stats())

    async def post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return json_response(self.stats())

    async def post_config(self, request: web.Request) -> web.Response:
        try:
            self.cfg = patched(self.cfg, msgspec.json.decode(await request.read()))
        except (msgspec.DecodeError, msgspec.ValidationError, mp.BadRequest) as exc:
            return json_response(mp.error_body(str(exc)), status=400)
        return json_response(msgspec.to_builtins(self.cfg))

    async def metrics(self, request: web.Request) -> web.Response:
        counts = {m: self.in_flight.get(m, 0) for m in self.cfg.models}
        return web.Response(text=mp.prometheus_text(counts), content_type="text/plain", charset="utf-8")

    async def stamp(self, request: web.Request, response: web.StreamResponse) -> None:
        """on_response_prepare hook: runs for every response, streamed or not, errors included."""
        response.headers["X-Mock-Worker"] = self.name
        request_id = request.headers.get("X-Request-ID")
        if request_id is not None:
            response.headers["X-Mock-Request-ID"] = request_id


WORKER_KEY = web.AppKey("mock_worker", MockWorker)


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(payload), status=status, content_type="application/json")


def token_gap(cfg: MockConfig) -> float:
    return 1.0 / cfg.tps if cfg.tps > 0 else 0.0


async def pace(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)


def abort(request: web.Request) -> None:
    # abort(), not close(): the peer must see a reset mid-body, like a crashed engine.
    if request.transport is not None:
        request.transport.abort()


def patched(cfg: MockConfig, patch: Any) -> MockConfig:
    """A new config with ``patch`` applied; validation is msgspec's, so bad values never go live."""
    if not isinstance(patch, dict):
        raise mp.BadRequest("config patch must be a JSON object")
    unknown = sorted(set(patch) - RUNTIME_KEYS)
    if unknown:
        raise mp.BadRequest(f"not runtime-configurable: {', '.join(unknown)}")
    return msgspec.convert(msgspec.structs.asdict(cfg) | patch, MockConfig)


def build_app(cfg: MockConfig) -> web.Application:
    """The mock's aiohttp app; run it with ``web.AppRunner(app, handler_cancellation=True)``."""
    worker = MockWorker(cfg)
    app = web.Application()
    app[WORKER_KEY] = worker
    app.on_response_prepare.append(worker.stamp)
    app.router.add_get("/health", worker.health)
    app.router.add_get("/v1/models", worker.models)
    app.router.add_post("/v1/chat/completions", worker.chat)
    app.router.add_post("/v1/completions", worker.completions)
    app.router.add_post("/v1/embeddings", worker.embeddings)
    app.router.add_get("/mock/stats", worker.get_stats)
    app.router.add_post("/mock/config", worker.post_config)
    app.router.add_post("/mock/reset", worker.post_reset)
    app.router.add_get("/metrics", worker.metrics)
    app.router.add_get("/mock/bootstrap/{room}", worker.bootstrap_room)
    native.add_routes(app, worker)
    return app


async def start(cfg: MockConfig) -> tuple[web.AppRunner, int]:
    """Serve ``cfg`` until the runner is cleaned up; returns the runner and the port actually bound."""
    app = build_app(cfg)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        await web.TCPSite(runner, cfg.host, cfg.port).start()
    except BaseException:
        await runner.cleanup()
        raise
    port = int(runner.addresses[0][1])
    worker = app[WORKER_KEY]
    worker.name = cfg.name or f"{cfg.host}:{port}"
    # Report what is really served, so /mock/config never shows port 0 or an empty name.
    worker.cfg = msgspec.structs.replace(worker.cfg, port=port, name=worker.name)
    return runner, port


async def run_until_signalled(cfg: MockConfig, scheme: str, port: int,
                              shutdown: Callable[[], Awaitable[Any]]) -> int:
    """Announce readiness (the line shardgate.launch waits for), serve until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"mock-worker ready on {scheme}://{cfg.host}:{port} model={','.join(cfg.models)} "
          f"role={cfg.role}", flush=True)
    try:
        await stop.wait()
    finally:
        await shutdown()
    return 0


def cannot_listen(cfg: MockConfig, exc: OSError) -> int:
    print(f"mock-worker: cannot listen on {cfg.host}:{cfg.port}: {exc}", file=sys.stderr, flush=True)
    return 1


async def serve(cfg: MockConfig) -> int:
    try:
        runner, port = await start(cfg)
    except OSError as exc:
        return cannot_listen(cfg, exc)
    return await run_until_signalled(cfg, "http", port, runner.cleanup)


def parse_args(argv: list[str] | None) -> MockConfig:
    p = argparse.ArgumentParser(
        prog="shardgate mock-worker", description="Fake OpenAI-compatible inference server."
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="0 picks a free port")
    p.add_argument("--model", action="append", dest="models", metavar="NAME",
                   help="model to serve; repeat for several (default: mock-model)")
    p.add_argument("--role", choices=["regular", "prefill", "decode"], default="regular")
    p.add_argument("--ttft", type=float, default=0.0, help="seconds before the first token")
    p.add_argument("--tps", type=float, default=0.0, help="tokens per second; 0 = as fast as possible")
    p.add_argument("--output-tokens", type=int, default=16)
    p.add_argument("--fail-status", type=int, default=0, help="answer inference with this status; 0 = off")
    p.add_argument("--stall", action="store_true", help="accept inference requests, never answer")
    p.add_argument("--drop-after", type=int, default=-1, help="abort the connection after N chunks")
    p.add_argument("--fail-health", action="store_true", help="GET /health answers 503")
    p.add_argument("--name", default="", help="identifier in responses (default HOST:PORT)")
    p.add_argument("--grpc", action="store_true",
                   help="serve shm/proto/worker.proto over gRPC instead (see shardgate.mocks.grpc_worker)")
    args = vars(p.parse_args(argv))
    args["models"] = args["models"] or ["mock-model"]
    try:
        return msgspec.convert(args, MockConfig)
    except msgspec.ValidationError as exc:
        p.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    if "--grpc" in (sys.argv[1:] if argv is None else argv):
        from shardgate.mocks import (
            grpc_worker as mock_grpc,  # the same mock over gRPC (shm/proto/worker.proto)
        )

        return mock_grpc.main(sys.argv[1:] if argv is None else list(argv))
    return run(serve(parse_args(argv)))


def run(main: Coroutine[Any, Any, int]) -> int:
    """Run a mock's main coroutine on uvloop (plain asyncio where uvloop is missing)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


if __name__ == "__main__":
    sys.exit(main())
