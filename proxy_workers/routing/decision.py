"""From a parsed request to a route and a context: the routing steps, in one place.

Role: used by the proxy path (every ``/v1/*`` request) and by ``POST /route/explain`` (the same
steps, nothing sent), so an explanation always describes what routing would really do.

Steps: decode the routing fields of the body -> resolve an alias (traffic split) -> select the
router (connection preference, PD first, regular fallback) -> the model's route -> a
:class:`RequestContext` for the policy. The decision (router, policy, worker, reason, scores,
shard, fallback) is rendered by :func:`describe`, the seed's RoutingDecision.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import msgspec

from proxy_workers.errors import BadRequest, NoHealthyWorker, RouterError, clip
from proxy_workers.routing import multipart
from proxy_workers.routing.context import ROUTING_DECODER, RequestContext, RoutingFields, json_too_deep
from proxy_workers.routing.selection import resolve_alias, select_router
from proxy_workers.routing.table import ModelRoute, PDRoute, RoutingTable

if TYPE_CHECKING:
    from proxy_workers.forwarding.request import Request
    from proxy_workers.process_view import ProcessView
    from shm.schema import Worker

_encode = msgspec.json.Encoder().encode
# msgspec ends a validation message with the JSON path of the field: "... - at `$.model`".
_AT_PATH = re.compile(r" - at `\$\.([^`]+)`$")


def _body_error(exc: msgspec.MsgspecError) -> BadRequest:
    """A 400 naming the field (a wrong type; ``param`` is its JSON path, if msgspec gave one) or
    saying the body is not JSON (no ``param``)."""
    if isinstance(exc, msgspec.ValidationError):
        at = _AT_PATH.search(str(exc))
        return BadRequest(f"invalid request body: {exc}", param=at.group(1) if at else None,
                          reason="bad_json")
    return BadRequest(f"request body is not valid JSON: {exc}", reason="bad_json")


def _too_deep(limit: int) -> BadRequest:
    return BadRequest(f"request body nests JSON arrays and objects deeper than max_json_depth={limit}",
                      reason="json_too_deep")


def prepare(proc: ProcessView, request: Request,
            dry_run: bool = False) -> tuple[ModelRoute | PDRoute, RequestContext]:
    """The route and context for ``request``; raises RouterError (404, 503, 400) with a reason."""
    body = request.body
    if body and json_too_deep(body, proc.max_json_depth) and not multipart.is_multipart(request.headers):
        raise _too_deep(proc.max_json_depth)
    try:
        fields = ROUTING_DECODER.decode(body) if body else None
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        if not multipart.is_multipart(request.headers):  # looked at only when the body is not JSON
            raise _body_error(exc) from None
        return _prepare_form(proc, request, dry_run)
    except RecursionError:  # not expected after the depth check; never a 500 if it happens
        raise _too_deep(proc.max_json_depth) from None
    model = fields.model if fields is not None else None
    table = proc.latest_table()
    ctx = RequestContext(model, fields, request.body, request.headers, request.peer,
                         proc.hash_headers, proc.hash_fallback, explain=request.explain)
    ctx.dry_run = dry_run
    if model is None:
        ctx.router, ctx.reason = "http_regular", "no model field: round-robin over all workers"
        return table.any, ctx
    if model in table.aliases:
        ctx.alias = model
        model = ctx.model = resolve_alias(model, table.aliases, table.routes, proc.rng)
        if not dry_run:
            retarget(request, model)
            ctx.body = request.body
    preference = request.connection or proc.connection_preference
    choice = table.router_choice.get((model, preference))
    if choice is None:
        router, why = _usable_router(table, model, preference)
        choice = table.router_choice[(model, preference)] = (router, why, table.route_in(router, model))
    ctx.router, ctx.router_reason, route = choice
    return route, ctx


def prepare_any(proc: ProcessView, request: Request) -> tuple[ModelRoute, RequestContext]:
    """The default route for a request about a worker, not a model (``ANY_WORKER`` paths,
    :mod:`proxy_workers.routing.paths`): the body is not read for routing."""
    ctx = RequestContext(None, None, request.body, request.headers, request.peer,
                         proc.hash_headers, proc.hash_fallback, explain=request.explain)
    ctx.router, ctx.reason = "http_regular", "a request about a worker: round-robin over all workers"
    return proc.latest_table().any, ctx


def _prepare_form(proc: ProcessView, request: Request,
                  dry_run: bool) -> tuple[ModelRoute, RequestContext]:
    """:func:`prepare` for a multipart/form-data body: the same steps (alias, router, route) by
    its ``model`` form field (:mod:`proxy_workers.routing.multipart`), to a regular HTTP worker
    only (the PD and gRPC paths rewrite JSON). Off the JSON path, so that path pays nothing."""
    body = request.body
    model = multipart.model_span(request.headers, body)[0]
    table = proc.latest_table()
    ctx = RequestContext(model, RoutingFields(model=model), body, request.headers, request.peer,
                         proc.hash_headers, proc.hash_fallback, explain=request.explain)
    ctx.dry_run = dry_run
    if model in table.aliases:
        ctx.alias = model
        model = ctx.model = resolve_alias(model, table.aliases, table.routes, proc.rng)
        if not dry_run:
            request.body = ctx.body = multipart.replace_model(request.headers, body, model)
    if "http_regular" not in table.router_of.get(model, ()):
        router, _ = _usable_router(table, model, "any")  # raises for an unknown or unservable model
        raise NoHealthyWorker(f"model '{clip(model)}' has no regular HTTP worker, and a multipart "
                              f"body cannot go through {router}")
    ctx.router, ctx.router_reason = "http_regular", "multipart body: regular HTTP workers only"
    return table.route_for(model), ctx


def retarget(request: Request, model: str) -> None:
    """Rewrite the body's ``model`` to an alias's target, so the worker is asked for a model it serves.

    The worker's Content-Length is computed when the request is sent (``Request.wire``), so
    replacing the body is enough.
    """
    doc = msgspec.json.decode(request.body)  # prepare decoded it already: valid JSON
    doc["model"] = model
    request.body = _encode(doc)


def _usable_router(table: RoutingTable, model: str, preference: str) -> tuple[str, str]:
    """The selected router, unless it is a PD router without a healthy pair and a regular router
    of the model can serve: then the regular one (a PD model stays served while a side is down)."""
    available = table.router_of.get(model, ())
    if not available and (model in table.snapshot.models or model in table.snapshot.model_policies):
        raise NoHealthyWorker(_unservable(table, model))
    name, reason = select_router(model, available, preference)
    if name.endswith("_pd") and not table.route_in(name, model).candidates:
        rest = tuple(r for r in available if not r.endswith("_pd"))
        if rest:
            try:
                regular, _ = select_router(model, rest, preference)
            except RouterError:
                return name, reason
            if table.route_in(regular, model).candidates:
                return regular, f"{name} has no healthy prefill/decode pair: fell back to {regular}"
    return name, reason


def _unservable(table: RoutingTable, model: str) -> str:
    """Why a configured model (a worker or the ``models:`` section names it) has no router: no
    worker, or its workers' roles cannot form one (a PD model missing a side). A 503, not 404."""
    roles: dict[str, int] = {}
    for slot in table.snapshot.models.get(model, ()):
        worker = table.by_slot[slot]
        if worker is not None:
            key = f"{worker.connection} {worker.type}"
            roles[key] = roles.get(key, 0) + 1
    if not roles:
        return f"model '{clip(model)}' is configured (models: section) but no worker serves it"
    have = ", ".join(f"{n} {k}" for k, n in sorted(roles.items()))
    return (f"model '{clip(model)}' is configured but cannot be served: its workers ({have}) form "
            "no router (a regular worker, or both a prefill and a decode worker, is needed)")


def describe(route: ModelRoute, ctx: RequestContext, worker: Worker | None) -> dict[str, Any]:
    """The decision as the seed's RoutingDecision: router, policy, worker, reason, scores."""
    return {"router": ctx.router, "router_reason": ctx.router_reason, "model": ctx.model,
            "alias": ctx.alias, "policy": route.policy.name, "shard": ctx.shard,
            "worker": worker.url if worker is not None else None, "reason": ctx.reason,
            "fallback": ctx.fallback, "scores": ctx.scores or {}}


def header_value(decision: dict[str, Any]) -> bytes:
    """The decision as one response-header value (compact JSON, ASCII only)."""
    return _encode(decision).decode().encode("ascii", "backslashreplace")
