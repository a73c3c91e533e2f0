"""Active health checks and model discovery, run by the coordinator with aiohttp.

Role: probe each worker (``GET /v1/models`` until its models are known, then ``health_path``)
and record the results in its :class:`coordinator.fleet.membership.WorkerState`; re-read the
models of workers configured without one, so a worker that changes what it serves is followed.

Invariants:
- A worker flips to unhealthy after ``health_fall`` consecutive failures and back after
  ``health_rise`` consecutive passes (defaults 3 and 2; the seed design checks every 30 s with 3
  errors, sglang-router every 60 s with 3 failures / 2 successes).
- A worker whose models are unknown is re-probed every ``DISCOVERY_RETRY`` seconds (or every
  ``discovery_interval`` if that is shorter), so a router started before its workers picks them
  up quickly; it routes nothing meanwhile.
- Once known, the models of a worker configured without ``model`` are read again every
  ``discovery_interval``; a change is published. A failed re-read keeps the models it had: being
  reachable is for the health checks to judge, not for discovery.
- gRPC workers (``connection: grpc``) are checked with ``grpc.health.v1`` and discovered with
  ``GetModelInfo`` (:mod:`coordinator.health.grpc_probe`), at the same times and with the same rules.
- ``health_target``: checks go to the worker's own URL, or to the seed's babysitter, which
  listens on the worker's port + 1 (same host and scheme); the path is ``health_path`` either way.
  Model discovery always asks the worker itself.
- Probes run concurrently, bounded by ``MAX_CONCURRENT_PROBES``, and never raise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import urlsplit

import aiohttp
import msgspec

from coordinator.fleet.membership import Fleet, WorkerState
from coordinator.health.grpc_probe import check_grpc_health, discover_grpc_models
from shm.keys import KeySourceError, resolve, upstream_ref
from shm.schema import WorkerSpec
from shm.settings import Settings

DISCOVERY_RETRY = 2.0  # the first discovery's retry, so a router started before its workers is quick
MAX_CONCURRENT_PROBES = 64
log = logging.getLogger("shardgate.coordinator")


class _ModelList(msgspec.Struct):
    class _Model(msgspec.Struct):
        id: str

    data: list[_Model]


_decode_models = msgspec.json.Decoder(_ModelList).decode


async def discover_models(session: aiohttp.ClientSession, url: str, timeout: float,
                          headers: dict[str, str] | None = None) -> tuple[str, ...]:
    """The model ids a worker lists at ``GET /v1/models``; raises ValueError with a reason."""
    try:
        async with session.get(url + "/v1/models", timeout=aiohttp.ClientTimeout(total=timeout),
                               headers=headers) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise ValueError(f"GET /v1/models answered {resp.status}")
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise ValueError(f"GET /v1/models failed: {exc.__class__.__name__} {exc}".strip()) from None
    try:
        models = tuple(dict.fromkeys(m.id for m in _decode_models(body).data))
    except msgspec.DecodeError as exc:
        raise ValueError(f"GET /v1/models returned an unexpected body: {exc}") from None
    if not models:
        raise ValueError("GET /v1/models lists no model")
    return models


async def check_health(session: aiohttp.ClientSession, url: str, path: str, timeout: float,
                       headers: dict[str, str] | None = None) -> str:
    """Empty string when healthy, else the reason."""
    try:
        # No redirects: a check must not be steered to another host (SSRF hygiene); 3xx fails it.
        async with session.get(url + path, timeout=aiohttp.ClientTimeout(total=timeout),
                               allow_redirects=False, headers=headers) as resp:
            await resp.read()
            return "" if 200 <= resp.status < 300 else f"GET {path} answered {resp.status}"
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return f"GET {path} failed: {exc.__class__.__name__} {exc}".strip()


def health_base(url: str, settings: Settings) -> str:
    """Base URL active checks go to (the worker, or its babysitter on port + 1)."""
    if settings.health_target != "babysitter":
        return url
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}:{port + 1}"


async def check_worker_health(session: aiohttp.ClientSession, state: WorkerState, settings: Settings) -> str:
    """One active check of one worker at its health target; empty string when it passes."""
    if state.spec.connection == "grpc":
        return await check_grpc_health(state.spec.url, settings.health_timeout)
    # The worker's own key goes to the worker itself only, never to a babysitter's port.
    headers = upstream_headers(state.spec) if settings.health_target == "service" else None
    return await check_health(session, health_base(state.spec.url, settings), settings.health_path,
                              settings.health_timeout, headers)


def upstream_headers(spec: WorkerSpec) -> dict[str, str] | None:
    """The worker's own key as a request header (engines started with an API key ask for it on
    /v1/models, some on /health too); None when it has none or it cannot be read (the probe then
    goes without, and the worker's answer says what is wrong)."""
    ref = upstream_ref(spec.api_key_env, spec.api_key_file)
    if not ref:
        return None
    try:
        return {"Authorization": "Bearer " + resolve(ref)}
    except KeySourceError:
        return None


def health_due(state: WorkerState, settings: Settings, now: float) -> bool:
    """Time for the first discovery (models unknown) or for the next health check."""
    if not state.discovered:
        return now - state.last_check >= min(DISCOVERY_RETRY, settings.discovery_interval)
    return now - state.last_check >= settings.health_interval


def models_due(state: WorkerState, settings: Settings, now: float) -> bool:
    """Time to read the models again (workers configured without a model, once discovered)."""
    return state.discovered and state.spec.model is None and \
        now - state.models_read_at >= settings.discovery_interval


def due(state: WorkerState, settings: Settings, now: float) -> bool:
    return health_due(state, settings, now) or models_due(state, settings, now)


async def list_models(session: aiohttp.ClientSession, state: WorkerState,
                      settings: Settings) -> tuple[str, ...]:
    """The worker's models (GET /v1/models, or GetModelInfo over gRPC); raises ValueError."""
    url = state.spec.url
    if state.spec.connection == "grpc":
        return await discover_grpc_models(url, settings.health_timeout)
    return await discover_models(session, url, settings.health_timeout, upstream_headers(state.spec))


async def probe(session: aiohttp.ClientSession, state: WorkerState, settings: Settings,
                now: float | None = None, force: bool = False) -> bool:
    """One probe of one worker (what is due, everything with ``force``); True when anything
    routing-relevant changed."""
    now = time.monotonic() if now is None else now
    if not state.discovered:
        state.last_check = now
        try:
            state.models = await list_models(session, state, settings)
        except ValueError as exc:
            changed = state.reason != str(exc)
            state.reason = str(exc)
            return changed
        state.discovered, state.reason, state.models_read_at = True, "", now
        return True
    changed = False
    if models_due(state, settings, now):
        state.models_read_at = now
        changed = await _reread_models(session, state, settings)
    if force or health_due(state, settings, now):
        state.last_check = now
        reason = await check_worker_health(session, state, settings)
        changed = state.record(not reason, reason, settings.health_fall, settings.health_rise) or changed
    return changed


async def _reread_models(session: aiohttp.ClientSession, state: WorkerState, settings: Settings) -> bool:
    try:
        models = await list_models(session, state, settings)
    except ValueError as exc:
        log.debug("worker %s: models not re-read (%s); keeping %s", state.spec.url, exc,
                  ",".join(state.models))
        return False
    if models == state.models:
        return False
    log.info("worker %s now serves %s (was %s)", state.spec.url, ",".join(models), ",".join(state.models))
    state.models = models
    return True


async def probe_due(session: aiohttp.ClientSession, fleet: Fleet, settings: Settings,
                    force: bool = False, now: float | None = None) -> bool:
    """Probe every worker whose turn it is (all of them with ``force``); True if any changed."""
    now = time.monotonic() if now is None else now
    states = [s for s in fleet.states.values() if force or due(s, settings, now)]
    if not states:
        return False
    limit = asyncio.Semaphore(MAX_CONCURRENT_PROBES)

    async def bounded(state: WorkerState) -> bool:
        async with limit:
            return await probe(session, state, settings, now, force)

    results = await asyncio.gather(*(bounded(s) for s in states))
    return any(results)
