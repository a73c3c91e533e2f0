"""Every metric /metrics exports, declared once: name, type, labels and help.

Role: the exposition (:mod:`proxy_workers.serving.metrics`) takes each family's ``# HELP`` and
``# TYPE`` from here, the reference docs/metrics.md is generated from here
(``shardgate metrics-doc``), and the Grafana dashboard's test checks its queries against it.

Invariants: names carry the ``shardgate_`` prefix and base units (seconds, tokens); counters end
in ``_total``; every label's values are bounded (listed in LABEL_VALUES, or the fleet's workers,
or the snapshot's indexed models + "other").
"""

from __future__ import annotations

from typing import NamedTuple


class MetricDef(NamedTuple):
    name: str
    kind: str  # counter | gauge | histogram | summary
    labels: tuple[str, ...]
    help: str


METRICS: tuple[MetricDef, ...] = (
    MetricDef("shardgate_build_info", "gauge", ("version",), "Build information."),
    # -- requests ---------------------------------------------------------------------------------
    MetricDef("shardgate_requests_total", "counter", (),
              "Requests answered by the router (proxied or refused)."),
    MetricDef("shardgate_request_errors_total", "counter", (),
              "Requests that ended in a router error or truncation."),
    MetricDef("shardgate_model_requests_total", "counter", ("model", "router", "status", "outcome"),
              "Requests by model, router (none: refused before routing), status class (none: nothing "
              "was answered) and outcome (success, error, rejected, client_gone)."),
    MetricDef("shardgate_request_duration_seconds", "histogram", ("model",),
              "Time from a request's dispatch to its last byte (refusals excluded)."),
    MetricDef("shardgate_time_to_first_token_seconds", "histogram", ("model",),
              "Time to the first chunk written to the client (a stream); to the last byte (a whole answer)."),
    MetricDef("shardgate_time_per_output_token_seconds", "histogram", ("model",),
              "Mean inter-token latency of a stream: (end - first chunk) / (output tokens - 1); one "
              "observation per stream of two tokens or more."),
    MetricDef("shardgate_input_tokens_total", "counter", ("model",),
              "Prompt tokens, from the usage the workers returned (streams: only with include_usage)."),
    MetricDef("shardgate_output_tokens_total", "counter", ("model",),
              "Generated tokens, from the workers' usage (a stream without it: its content events)."),
    MetricDef("shardgate_requests_rejected_total", "counter", ("reason",),
              "Requests the router refused before routing them, by reason (bad HTTP or JSON, limits, "
              "unknown model or path, admission control); summed over reasons: all refusals."),
    MetricDef("shardgate_retries_total", "counter", (), "Requests moved to another worker after a failure."),
    MetricDef("shardgate_retries_by_reason_total", "counter", ("reason",),
              "Retries by reason: status (a worker answered a retryable status) or failure (connect "
              "error, broken connection, stall)."),
    MetricDef("shardgate_client_disconnects_total", "counter", (),
              "Requests whose client went away before the response was complete."),
    MetricDef("shardgate_in_flight_requests", "gauge", (), "Requests in flight across all proxies."),
    # -- admission control ------------------------------------------------------------------------
    MetricDef("shardgate_admission_queue_depth", "gauge", (), "Requests waiting in the admission queues."),
    MetricDef("shardgate_admission_queue_wait_seconds", "summary", (),
              "Time admitted requests spent in the admission queue."),
    MetricDef("shardgate_admission_admitted_total", "counter", (),
              "Requests admission control let through (at once or after waiting)."),
    MetricDef("shardgate_admission_rejected_total", "counter", ("reason",),
              "Requests admission control refused, by reason (429 rate_limited; 503 otherwise)."),
    MetricDef("shardgate_admission_abandoned_total", "counter", (),
              "Queued requests whose client disconnected before they were admitted."),
    # -- processes and snapshot -------------------------------------------------------------------
    MetricDef("shardgate_proxies", "gauge", (), "Proxy processes configured."),
    MetricDef("shardgate_proxy_up", "gauge", ("proxy",), "1 while the proxy process of this index runs."),
    MetricDef("shardgate_proxy_restarts_total", "counter", ("proxy",),
              "Times the coordinator restarted the proxy process of this index."),
    MetricDef("shardgate_snapshot_generation", "gauge", (), "Generation of the routing snapshot in use."),
    MetricDef("shardgate_snapshot_age_seconds", "gauge", (),
              "Seconds since the routing snapshot in use was published (grows while the"
              " coordinator is gone)."),
    MetricDef("shardgate_coordinator_up", "gauge", (),
              "1 while the coordinator runs (as the answering proxy sees it)."),
    MetricDef("shardgate_discovery_source_up", "gauge", ("source",),
              "1 when a discovery source's last sync worked."),
    MetricDef("shardgate_notices", "gauge", (), "Problems the coordinator reports in /workers notices."),
    # -- workers ----------------------------------------------------------------------------------
    MetricDef("shardgate_worker_info", "gauge", ("worker", "type", "connection"),
              "1 per worker: its type (regular, prefill, decode: PD legs apart) and connection."),
    MetricDef("shardgate_worker_ejected", "gauge", ("worker",),
              "1 while passive health keeps the worker out."),
    MetricDef("shardgate_worker_healthy", "gauge", ("worker",),
              "1 when the worker is healthy and not draining."),
    MetricDef("shardgate_worker_requests_total", "counter", ("worker",), "Requests sent to the worker."),
    MetricDef("shardgate_worker_errors_total", "counter", ("worker",), "Failed requests to the worker."),
    MetricDef("shardgate_worker_errors_by_kind_total", "counter", ("worker", "kind"),
              "Failed requests to the worker by kind: connect, status (a 5xx answer), other "
              "(broken connection, timeout, stall)."),
    MetricDef("shardgate_worker_connect_errors_total", "counter", ("worker",),
              "Failed connection attempts to the worker."),
    MetricDef("shardgate_worker_streams_total", "counter", ("worker",),
              "Streamed (SSE) responses from the worker."),
    MetricDef("shardgate_worker_in_flight_requests", "gauge", ("worker",),
              "Requests in flight to the worker."),
    MetricDef("shardgate_worker_latency_ewma_seconds", "gauge", ("worker",),
              "Moving average of request latency (EWMA, alpha 0.2)."),
    MetricDef("shardgate_worker_ttfb_ewma_seconds", "gauge", ("worker",),
              "Moving average of time to the worker's response head (EWMA, alpha 0.2)."),
    MetricDef("shardgate_worker_first_byte_seconds", "histogram", ("worker",),
              "Time from sending an attempt to the worker's first byte (HTTP response head, first "
              "gRPC message): the worker's TTFT for gRPC and whole answers."),
    # -- routing ----------------------------------------------------------------------------------
    MetricDef("shardgate_policy_decisions_total", "counter", ("policy",),
              "Routing decisions made, per policy."),
    MetricDef("shardgate_policy_fallbacks_total", "counter", ("policy",),
              "Decisions where the policy fell back (no key, backup shard, imbalance, cache miss...)."),
)
BY_NAME = {m.name: m for m in METRICS}
# Fixed label values (the others: workers, models, policies, sources of the running fleet).
LABEL_VALUES = {
    "router": "http_regular, http_pd, grpc_regular, grpc_pd, none",
    "status": "none, 1xx, 2xx, 3xx, 4xx, 5xx",
    "outcome": "success, error, rejected, client_gone",
    "kind": "connect, status, other",
}


def exported_names() -> set[str]:
    """Every sample name a scrape may carry (histograms: _bucket, _sum, _count)."""
    names: set[str] = set()
    for m in METRICS:
        if m.kind in ("histogram", "summary"):
            names.update((m.name + "_bucket", m.name + "_sum", m.name + "_count"))
            if m.kind == "summary":
                names.discard(m.name + "_bucket")
        else:
            names.add(m.name)
    return names
