"""The ops listener's connections: the back office on a port of its own (``ops_port``).

Role: :class:`OpsProtocol` is a client connection that answers the back office (``/workers``,
``/stats``, ``/metrics``, ``/routers``, ``/route/explain``, the status page ``/dashboard`` and
its ``/dashboard.json``: ``endpoints.BACK_OFFICE``) and the probes (``/health``, ``/readiness``),
and nothing else: it never routes or proxies. Every proxy process binds the ops
port with SO_REUSEPORT next to the data port (:mod:`proxy_workers.serving.process`), so the ops
listener lives exactly as long as the data plane, orphaned proxies included, and its figures are
the load board's totals whichever proxy answers.

Invariants:
- No API key is asked here: the ops listener is reached by the network it is bound to
  (``ops_host``, loopback by default), which is its access rule (docs/api-keys.md).
- Parsing, limits, timeouts and draining are the client protocol's (this class only changes what
  a complete request leads to); ops answers are not counted as client requests.
"""

from __future__ import annotations

import logging

from proxy_workers.errors import InternalError, RouterError, render_response
from proxy_workers.forwarding.request import Request
from proxy_workers.serving import endpoints
from proxy_workers.serving.protocol import ClientProtocol

log = logging.getLogger("shardgate.proxy")


class OpsProtocol(ClientProtocol):
    """One connection to the ops listener."""

    __slots__ = ()

    def dispatch(self, request: Request) -> None:
        self.idle_since = 0.0
        try:
            if request.error is not None:
                raise request.error
            # Exact paths only (endpoints.OPS_PATHS): a dot segment or an encoded one is a 404.
            status, body, content_type = endpoints.answer(self.proc, request, ops=True)
        except RouterError as err:
            self.send_error(err, request)  # OpenAI's shape, HEAD and draining handled there
            self._next(request)
            return
        except Exception:  # a bug: answered with 500 and logged, the connection closed after it
            log.exception("internal error while answering on the ops listener")
            request.keep_alive = False
            self.send_error(InternalError("internal router error; see the router's log"), request)
            self._next(request)
            return
        if self.proc.draining:
            request.keep_alive = False
        response = render_response(status, body, content_type, request.request_id.decode(),
                                   close=not request.keep_alive)
        if request.method == b"HEAD":  # RFC 9110 9.3.2: the head alone, Content-Length kept
            response = response[:response.index(b"\r\n\r\n") + 4]
        self.write(response)
        self._next(request)
