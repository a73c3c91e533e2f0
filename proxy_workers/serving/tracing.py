"""One OpenTelemetry span per request, exported over OTLP, built only when the request ends.

Role: :func:`make_tracer` gives a proxy process its :class:`Tracer` (``proc.tracer``), or None
when tracing is off, which is the default. It is on when the ``otel`` extra is installed
(``opentelemetry-sdk``, ``opentelemetry-exporter-otlp-proto-http``) and the standard variable
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set; the exporter
reads the other standard ``OTEL_EXPORTER_OTLP_*`` variables itself (headers, timeout, ...), and
``OTEL_SERVICE_NAME`` names the service (default ``shardgate``). ``OTEL_SDK_DISABLED=true`` turns
it off.

Invariants:
- Off, it costs next to nothing: no import of the SDK, and the request path checks
  ``proc.tracer is not None`` where a client sent a traceparent and once as a request ends
  (:mod:`proxy_workers.serving.records`); the trace context itself is
  :mod:`proxy_workers.forwarding.tracecontext`'s, on or off.
- On, the router's span is the one whose id the workers got as their parent (the span id in
  ``request.traceparent``); its parent is the client's span when the client sent a valid
  traceparent (read back from ``request.headers``), else it is a root. A request whose traceparent
  is not sampled (flag 01 clear) exports nothing, as a parent-based sampler would.
- Nothing is built while the request runs: :meth:`Tracer.end` makes the finished span from plain
  values and hands it to the SDK's ``BatchSpanProcessor``, which queues it (bounded; full means
  dropped, never blocking) and exports from its own thread.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from proxy_workers.forwarding.tracecontext import parse_traceparent

if TYPE_CHECKING:
    from proxy_workers.contract import ClientRequest

log = logging.getLogger("shardgate.tracing")

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


class Tracer:
    """Turns finished requests into spans for a span processor (batched export)."""

    def __init__(self, processor: Any, service: str = "shardgate") -> None:
        # Imported here: the SDK is an optional extra, loaded only when tracing is on.
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

        self._processor = processor
        self._resource = Resource.create({"service.name": service})
        self._scope = InstrumentationScope("shardgate")
        self._span, self._context = ReadableSpan, SpanContext
        self._flags, self._state = TraceFlags, TraceState
        self._server, self._ok, self._error = SpanKind.SERVER, Status(StatusCode.UNSET), StatusCode.ERROR
        self._status = Status

    def end(self, request: ClientRequest, *, model: str | None, router: str, policy: str, worker: str,
            status: int, retries: int, started: float, ended: float) -> None:
        """Export the span of a finished request (call once, when its response ended).

        ``request``: the request as read (its ``traceparent``, ``tracestate``, ``headers``,
        ``method``, ``path``, ``request_id``); ``model``/``router``/``policy``: the decision
        (``""`` when none was made); ``worker``: the URL of the worker that answered (``""``:
        none, e.g. a refusal); ``status``: the HTTP status sent to the client (0: none, the
        client left); ``retries``: attempts after the first; ``started``, ``ended``: the event
        loop's clock (``loop.time()``, monotonic seconds) when the request was dispatched and when its
        response ended. Cheap when the request is not sampled; never raises.
        """
        tp = request.traceparent
        if len(tp) != 55 or not int(tp[53:55], 16) & 1:
            return  # not sampled (or never read to its end): nothing to export
        try:
            self._export(request, tp, model, router, policy, worker, status, retries, started, ended)
        except Exception:  # a span is never worth a request: log and go on
            log.exception("tracing: could not export the span of request %s", request.request_id)

    def _export(self, request: ClientRequest, tp: bytes, model: str | None, router: str, policy: str,
                worker: str, status: int, retries: int, started: float, ended: float) -> None:
        trace_hex = tp[3:35]
        trace_id, flags = int(trace_hex, 16), self._flags(int(tp[53:55], 16))
        state = request.tracestate
        trace_state = self._state.from_header([state.decode()]) if state else None
        context = self._context(trace_id, int(tp[36:52], 16), False, flags, trace_state)
        parent = None
        client = parse_traceparent([v for n, v in request.headers if n == b"traceparent"])
        if client is not None and client[0] == trace_hex and client[1] != tp[36:52]:
            parent = self._context(trace_id, int(client[1], 16), True, self._flags(int(client[2], 16) & 1),
                                   trace_state)
        # Monotonic loop times to the epoch: the offset is taken now (clocks may have been stepped).
        offset = time.time() - time.monotonic()
        attributes: dict[str, Any] = {
            "http.request.method": request.method.decode("latin-1"),
            "url.path": request.path.decode("latin-1"),
            "http.response.status_code": status,
            "shardgate.request_id": request.request_id.decode("latin-1"),
            "shardgate.retries": retries,
        }
        for key, value in (("gen_ai.request.model", model), ("shardgate.router", router),
                           ("shardgate.policy", policy), ("shardgate.worker", worker)):
            if value:
                attributes[key] = value
        span_status = self._status(self._error, f"HTTP {status}") if status >= 500 or not status else self._ok
        span = self._span(
            name=f"{attributes['http.request.method']} {attributes['url.path']}", context=context,
            parent=parent, resource=self._resource, attributes=attributes, kind=self._server,
            status=span_status, start_time=int((started + offset) * 1e9),
            end_time=int((ended + offset) * 1e9), instrumentation_scope=self._scope)
        self._processor.on_end(span)

    def close(self) -> None:
        """Export what is queued and stop the processor's thread (at process exit)."""
        self._processor.shutdown()


def make_tracer() -> Tracer | None:
    """This process's tracer, or None: tracing off (no endpoint set, or the SDK not installed)."""
    if not any(os.environ.get(name) for name in ENDPOINT_VARS):
        return None
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("tracing: an OTLP endpoint is set but the otel extra is not installed "
                    "(pip install 'shardgate[otel]'); spans are not exported")
        return None
    return Tracer(BatchSpanProcessor(OTLPSpanExporter()), os.environ.get("OTEL_SERVICE_NAME") or "shardgate")
