"""The admin API: list, add, remove, drain and re-weight workers; add and remove shards.

Role: an aiohttp server inside the coordinator, on its own listener (``admin_host``, default
127.0.0.1, and ``admin_port``; 0, the default, turns it off), for operators and the
``shardgate workers ...`` commands. Every change is one merge and one publish, so all proxies
switch together; the answer carries the snapshot generation that holds it.

Endpoints (JSON bodies; a worker is picked by ``url`` and optionally ``model`` / ``type``):

    GET  /health                  liveness, no token needed
    GET  /admin/workers           every worker: source, health, ejection, drain, in flight
    POST /admin/workers           add {url, model?, type?, weight?, labels?, shard?, ...}   201
    POST /admin/workers/remove    {url, ...}: leaves now (in-flight requests still finish)
    POST /admin/workers/drain     {url, ..., cancel?}: no new requests; leaves once idle      202
    POST /admin/workers/weight    {url, ..., weight}
    GET  /admin/shards            model -> shard -> worker URLs
    POST /admin/shards            {model, shard, workers: [url, ...]}: put workers in a shard
    POST /admin/shards/remove     {model, shard}: the shard's workers leave

Invariants:
- Auth: ``Authorization: Bearer <token>``, compared with :func:`hmac.compare_digest`. The token
  comes from ``admin_token_file`` or ``SHARDGATE_ADMIN_TOKEN``, never from argv. Without a token
  configured every request is refused (403) with the reason; a missing or wrong token is 401.
- URLs are validated against SSRF (:mod:`coordinator.discovery.urlcheck`) before anything changes.
- Errors use the router's shape ``{"error": {"message", "type", "code"}}`` with an HTTP status:
  400 bad input, 401/403 auth, 404 no such worker, 507 fleet full (``max_workers``).
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from coordinator.config import ConfigError, check_worker
from coordinator.discovery.core import Discovery
from coordinator.discovery.urlcheck import shape_problem
from coordinator.fleet import topology
from coordinator.fleet.membership import Key, WorkerState
from shm.schema import WorkerSpec
from shm.settings import Settings

TOKEN_ENV = "SHARDGATE_ADMIN_TOKEN"
MAX_BODY = 1024 * 1024
log = logging.getLogger("shardgate.coordinator")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminError(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def load_token(settings: Settings, environ: dict[str, str] | None = None) -> bytes | None:
    """The admin token, or None when none is configured; ConfigError if the file is unreadable."""
    environ = dict(os.environ) if environ is None else environ
    if settings.admin_token_file:
        path = Path(settings.admin_token_file)
        try:
            token = path.read_text().strip()
            mode = path.stat().st_mode
        except OSError as exc:
            raise ConfigError(f"admin_token_file {path}: cannot read: {exc.strerror}") from None
        if mode & 0o077:
            log.warning("admin_token_file %s is readable by other users; chmod 600 it", path)
    else:
        token = environ.get(TOKEN_ENV, "").strip()
    return token.encode() if token else None


def _error(status: int, message: str, code: str) -> web.Response:
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    headers = {"WWW-Authenticate": 'Bearer realm="shardgate-admin"'} if status == 401 else None
    return web.json_response({"error": {"message": message, "type": kind, "code": code}}, status=status,
                             headers=headers)


class AdminAPI:
    def __init__(self, discovery: Discovery, commit: Callable[[], int], settings: Settings) -> None:
        self.discovery = discovery
        self.commit = commit  # merge + publish; returns the snapshot generation
        self.settings = settings
        self.token = load_token(settings)
        self.runner: web.AppRunner | None = None

    def reload_token(self, settings: Settings) -> None:
        self.settings = settings
        self.token = load_token(settings)

    async def start(self) -> None:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY)
        app.add_routes([
            web.get("/health", self.health),
            web.get("/admin/workers", self.list_workers),
            web.post("/admin/workers", self.add_worker),
            web.post("/admin/workers/remove", self.remove_worker),
            web.post("/admin/workers/drain", self.drain_worker),
            web.post("/admin/workers/weight", self.weight_worker),
            web.get("/admin/shards", self.list_shards),
            web.post("/admin/shards", self.add_shard),
            web.post("/admin/shards/remove", self.remove_shard),
        ])
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        host, port = self.settings.admin_host, self.settings.admin_port
        try:
            await web.TCPSite(self.runner, host, port, reuse_address=True).start()
        except OSError as exc:
            await self.runner.cleanup()
            raise ConfigError(f"admin API: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        if self.token is None:
            log.warning("admin API on %s:%d refuses every request: no token configured "
                        "(admin_token_file or %s)", host, port, TOKEN_ENV)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    # -- plumbing ----------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if request.path != "/health":
                self._authorize(request)
            return await handler(request)
        except AdminError as exc:
            return _error(exc.status, exc.message, exc.code)
        except web.HTTPException as exc:
            if exc.status == 413:
                return _error(413, f"request body larger than {MAX_BODY} bytes", "body_too_large")
            return _error(exc.status, exc.reason, "http_error")

    def _authorize(self, request: web.Request) -> None:
        if self.token is None:
            raise AdminError(403, "the admin API is disabled: no token is configured (set "
                             f"admin_token_file or {TOKEN_ENV} and restart or reload)", "admin_disabled")
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise AdminError(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                             "missing_token")
        if not hmac.compare_digest(given.strip().encode(), self.token):
            raise AdminError(401, "invalid bearer token", "invalid_token")

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = msgspec.json.decode(await request.read())
        except msgspec.DecodeError as exc:
            raise AdminError(400, f"request body is not valid JSON: {exc}", "invalid_json") from None
        if not isinstance(body, dict):
            raise AdminError(400, "request body must be a JSON object", "invalid_body")
        return body

    def _select(self, body: dict[str, Any], *, serving: str | None = None) -> list[Key]:
        """Fleet keys named by {url, model?, type?} (404 if none)."""
        url = body.get("url")
        if not isinstance(url, str) or not url:
            raise AdminError(400, "'url' (a string) is required", "missing_url")
        url = _normalise(url)
        model, kind = body.get("model", serving), body.get("type")
        keys = [k for k, st in self.discovery.fleet.states.items()
                if k[0] == url and (model is None or k[1] == model or model in st.models)
                and (kind is None or k[2] == kind)]
        if not keys:
            what = url + (f" (model {model})" if model else "") + (f" (type {kind})" if kind else "")
            raise AdminError(404, f"no worker {what} in the fleet", "worker_not_found")
        return keys

    def _done(self, status: int, **payload: Any) -> web.Response:
        generation = self.commit()
        return web.json_response({**payload, "generation": generation}, status=status)

    def _view(self, key: Key, st: WorkerState) -> dict[str, Any]:
        board, proxies = self.discovery.board, self.discovery.proxies
        return {"url": st.spec.url, "model": st.spec.model, "models": list(st.models), "type": st.spec.type,
                "connection": st.spec.connection, "weight": st.spec.weight, "labels": st.spec.labels,
                "shard": st.spec.shard, "source": st.source, "healthy": st.healthy and st.discovered,
                "health_reason": st.reason, "ejected": st.ejected, "eject_reason": st.eject_reason,
                "draining": st.draining, "in_flight": board.worker_in_flight(st.slot, proxies),
                "slot": st.slot}

    # -- handlers ----------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def list_workers(self, request: web.Request) -> web.Response:
        fleet = self.discovery.fleet
        workers = [self._view(k, st) for k, st in sorted(fleet.states.items(), key=lambda i: i[1].slot)]
        return web.json_response({"workers": workers, "notices": fleet.notices, "sources": fleet.sources})

    async def add_worker(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        raw_problem, _ = shape_problem(str(body.get("url", "")))
        if raw_problem:  # before normalising, which would drop credentials and hide them
            raise AdminError(400, f"refused: {raw_problem}", "url_not_allowed")
        try:
            spec = check_worker(msgspec.convert(body, WorkerSpec), "worker")
        except msgspec.ValidationError as exc:
            raise AdminError(400, f"invalid worker: {exc}", "invalid_worker") from None
        except ConfigError as exc:
            raise AdminError(400, str(exc), "invalid_worker") from None
        problem = await self.discovery.checker.check_url(spec.url)
        if problem:
            log.warning("admin API: refused worker %s: %s", spec.url, problem)
            raise AdminError(400, f"refused: {problem}", "url_not_allowed")
        overrides = self.discovery.overrides
        before = (dict(overrides.source.specs), set(overrides.excluded))
        overrides.add(spec)
        self.discovery.apply()
        if self.discovery.fleet_notice:
            overrides.source.specs, overrides.excluded = before
            self.discovery.apply()
            raise AdminError(507, self.discovery.fleet_notice, "fleet_full")
        log.info("admin API: added %s (model %s)", spec.url, spec.model or "discovered")
        key = (spec.url, spec.model, spec.type)
        return self._done(201, worker=self._view(key, self.discovery.fleet.states[key]))

    async def remove_worker(self, request: web.Request) -> web.Response:
        keys = self._select(await self._body(request))
        for key in keys:
            self.discovery.undrain(key)
            self.discovery.overrides.remove(key)
        log.info("admin API: removed %s", ", ".join(sorted({k[0] for k in keys})))
        return self._done(200, removed=[_key_view(k) for k in keys])

    async def drain_worker(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        keys = self._select(body)
        if body.get("cancel"):
            cancelled = [k for k in keys if self.discovery.undrain(k)]
            log.info("admin API: drain cancelled for %s", ", ".join(sorted({k[0] for k in cancelled})) or "-")
            return self._done(200, cancelled=[_key_view(k) for k in cancelled])
        for key in keys:
            self.discovery.drain(key)
        log.info("admin API: draining %s", ", ".join(sorted({k[0] for k in keys})))
        return self._done(202, draining=[_key_view(k) for k in keys])

    async def weight_worker(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        weight = body.get("weight")
        if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= 1_000_000:
            raise AdminError(400, "'weight' must be an integer from 1 to 1000000", "invalid_weight")
        keys = self._select(body)
        for key in keys:
            self.discovery.overrides.patch(key, weight=weight)
        log.info("admin API: weight %d for %s", weight, ", ".join(sorted({k[0] for k in keys})))
        return self._done(200, weighted=[_key_view(k) for k in keys], weight=weight)

    async def list_shards(self, request: web.Request) -> web.Response:
        return web.json_response({"shards": self._shards()})

    def _shards(self) -> dict[str, dict[str, list[str]]]:
        workers = [st.to_worker() for st in self.discovery.fleet.states.values()]
        urls = {w.slot: w.url for w in workers}
        return {model: {shard: sorted(urls[s] for s in slots) for shard, slots in by.items()}
                for model, by in topology.model_shards(workers).items()}

    async def add_shard(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        model, shard, urls = body.get("model"), body.get("shard"), body.get("workers")
        if not isinstance(model, str) or not model or not isinstance(shard, str) or not shard:
            raise AdminError(400, "'model' and 'shard' (non-empty strings) are required", "invalid_shard")
        if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
            raise AdminError(400, "'workers' must be a non-empty list of worker URLs", "invalid_shard")
        keys = [k for url in urls for k in self._select({"url": url}, serving=model)]
        for key in keys:
            self.discovery.overrides.patch(key, shard=shard)
        log.info("admin API: shard %s of model %s: %s", shard, model, ", ".join(sorted({k[0] for k in keys})))
        return self._done(200, model=model, shard=shard, workers=sorted({k[0] for k in keys}))

    async def remove_shard(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        model, shard = body.get("model"), body.get("shard")
        keys = [k for k, st in self.discovery.fleet.states.items()
                if st.spec.shard == shard and (model in st.models or k[1] == model)]
        if not keys:
            raise AdminError(404, f"model {model} has no shard {shard!r}", "shard_not_found")
        for key in keys:
            self.discovery.undrain(key)
            self.discovery.overrides.remove(key)
        log.info("admin API: removed shard %s of model %s", shard, model)
        return self._done(200, model=model, shard=shard, removed=sorted({k[0] for k in keys}))


def _normalise(url: str) -> str:
    try:
        return check_worker(WorkerSpec(url=url), "url").url
    except ConfigError as exc:
        raise AdminError(400, str(exc), "invalid_url") from None


def _key_view(key: Key) -> dict[str, Any]:
    return {"url": key[0], "model": key[1], "type": key[2]}
