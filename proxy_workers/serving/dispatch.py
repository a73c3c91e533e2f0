"""The data path of each of the four routers: which exchange carries a routed request.

Role: :data:`DATA_PATHS` maps a router name (``RequestContext.router``, set by
:func:`proxy_workers.routing.decision.prepare`) to the factory of its
:class:`proxy_workers.contract.ClientExchange`. The client protocol and admission control start
exchanges only through it.

Invariants: the route's kind follows from the router: a ModelRoute for the regular routers, a
PDRoute for http_pd, either for the gRPC path, which serves both of its routers. grpc is imported
on the first gRPC request only, so a fleet without gRPC workers never loads it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias

from proxy_workers.http.exchange import Exchange
from proxy_workers.http.pd import PDExchange

if TYPE_CHECKING:
    from proxy_workers.contract import ClientExchange, ClientSink
    from proxy_workers.forwarding.request import Request
    from proxy_workers.routing.context import RequestContext
    from proxy_workers.serving.state import ProxyProcess


def _grpc_exchange(proc: ProxyProcess, client: ClientSink, request: Request, route: Any,
                   ctx: RequestContext) -> ClientExchange:
    from proxy_workers.grpc.exchange import GrpcExchange  # grpc is loaded on first use only

    return GrpcExchange(proc, client, request, route, ctx)


if TYPE_CHECKING:
    ExchangeFactory: TypeAlias = Callable[[ProxyProcess, ClientSink, Request, Any, RequestContext],
                                          ClientExchange]
DATA_PATHS: dict[str, ExchangeFactory] = {"http_regular": Exchange, "http_pd": PDExchange,
                                          "grpc_regular": _grpc_exchange, "grpc_pd": _grpc_exchange}
