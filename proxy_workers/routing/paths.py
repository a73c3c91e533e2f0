"""The path families the router proxies to workers, in one table.

Role: :data:`PROXIED_PATHS` maps a request path outside ``/v1/`` to how it is routed and which
methods it accepts: SGLang's and vLLM's native endpoints, the ones their routers pass through.
The client protocol (:mod:`proxy_workers.serving.protocol`) looks a path up here only after the
``/v1/`` prefix test failed, so the OpenAI paths (``/v1/*``, every one routed by the body's
``model``; ``/v1/models`` is the router's own) pay nothing for it. Adding a path family is one
row here.

Invariants:
- ``BODY_MODEL``: routed as a ``/v1/*`` request (:func:`proxy_workers.routing.decision.prepare`):
  by the body's JSON ``model`` field, or, without one, the default route (round-robin over every
  healthy regular HTTP worker).
- ``ANY_WORKER``: the body is not read for routing; the default route
  (:func:`proxy_workers.routing.decision.prepare_any`). For requests about a worker, not a model
  (version, server info, a health probe that generates).
- A method outside a row's ``methods`` gets 405 naming the accepted ones, before any worker.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

RouteBy = Literal["body_model", "any_worker"]
BODY_MODEL: RouteBy = "body_model"
ANY_WORKER: RouteBy = "any_worker"
_POST = frozenset({b"POST"})
_GET = frozenset({b"GET"})


class PathRule(NamedTuple):
    """How one proxied path is routed, and the methods it accepts."""

    route_by: RouteBy
    methods: frozenset[bytes]


PROXIED_PATHS: dict[bytes, PathRule] = {
    # SGLang native generation API and its helpers
    b"/generate": PathRule(BODY_MODEL, _POST),
    b"/tokenize": PathRule(BODY_MODEL, _POST),
    b"/detokenize": PathRule(BODY_MODEL, _POST),
    b"/rerank": PathRule(BODY_MODEL, _POST),  # /v1/rerank is a /v1/* path: body model too
    # about a worker, not a model
    b"/health_generate": PathRule(ANY_WORKER, _GET),
    b"/version": PathRule(ANY_WORKER, _GET),
    b"/get_model_info": PathRule(ANY_WORKER, _GET),
    b"/get_server_info": PathRule(ANY_WORKER, _GET),
}
