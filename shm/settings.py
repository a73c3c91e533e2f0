"""Every router setting, declared once.

Role: the single declaration of shardgate's settings. The coordinator derives its CLI flags,
environment variables, config-file keys and the generated reference (docs/settings.md) from
the fields of :class:`Settings`; proxies receive the resolved ``Settings`` inside every
snapshot, so a SIGHUP that changes a timeout reaches them without a restart.

Invariants:
- A field's name is its config-file key; its flag is ``--name-with-dashes``; its environment
  variable is ``SHARDGATE_NAME``. Precedence: defaults < file < environment < CLI.
- Each field carries a ``Meta(description=...)``; the first sentence is the CLI help.
- Adding a field never breaks an old snapshot: every field has a default.
- A setting that defers to another when unset (``prefill_policy``, ``decode_policy``) says so
  with "", never None, so every value round-trips through its flag and environment variable.
"""

from __future__ import annotations

import typing
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

Policy = Literal[
    "round_robin",
    "weighted_round_robin",
    "random",
    "weighted_random",
    "least_connections",
    "least_latency",
    "power_of_two",
    "consistent_hash",
    "consistent_hash_bounded",
    "session_affinity",
    "cache_aware",
    "least_loaded",
    "quota_aware",
]
POLICY_NAMES: tuple[str, ...] = Policy.__args__  # type: ignore[attr-defined]
# A policy name, or "" for "not set here: fall back" (the PD side settings below).
PolicyOrUnset = Literal[Policy, ""]
# The fields, here and in shm.schema.ModelPolicy, whose value is a policy name: every reader
# (alias translation, checks, engine scraping) takes the list from here.
POLICY_FIELDS: tuple[str, ...] = ("policy", "prefill_policy", "decode_policy")
PdDialect = Literal["two_phase", "bootstrap"]

Seconds = Annotated[float, Meta(gt=0)]


def _d(text: str) -> Meta:
    return Meta(description=text)


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Router settings (everything except the worker list)."""

    host: Annotated[str, _d("Address the proxies listen on.")] = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535), _d("Port the proxies listen on (SO_REUSEPORT).")] = 8080
    proxies: Annotated[
        int, Meta(ge=0, le=256), _d("Number of proxy processes; 0 means one per CPU.")
    ] = 0
    policy: Annotated[Policy, _d("Load-balancing policy used when a model names none.")] = (
        "weighted_round_robin"
    )
    # Prefill/decode (http_pd, grpc_pd). A model's own entry (models: {m: {...}}) wins over these;
    # proxy_workers.routing.table holds the order in which they apply.
    prefill_policy: Annotated[
        PolicyOrUnset, _d("PD: the prefill side's policy for models that set none of their own "
                          "(models.NAME.prefill_policy or .policy); empty: the policy setting.")
    ] = ""
    decode_policy: Annotated[
        PolicyOrUnset, _d("PD: the decode side's policy for models that set none of their own "
                          "(models.NAME.decode_policy or .policy); empty: the policy setting.")
    ] = ""
    pd_dialect: Annotated[
        PdDialect, _d("PD protocol of models that set none (models.NAME.pd_dialect): 'two_phase' (vLLM: "
                      "prefill first, its kv_transfer_params go to the decode) or 'bootstrap' (SGLang: "
                      "both at once with bootstrap host/port/room).")
    ] = "two_phase"
    hash_headers: Annotated[
        str, _d("Comma-separated request headers whose value is the routing key for consistent_hash "
                "and session_affinity, tried in order, before the body's 'user' field.")
    ] = "x-session-id,x-user-id"
    hash_fallback: Annotated[
        Literal["random", "client_ip"],
        _d("Routing key when a request carries none: 'random' (no affinity) or 'client_ip'."),
    ] = "random"
    bounded_load_factor: Annotated[
        float, Meta(ge=1.0), _d("consistent_hash_bounded: skip workers whose in-flight load exceeds "
                                "the mean times this factor.")
    ] = 1.25
    session_ttl: Annotated[
        Seconds, _d("session_affinity: seconds a session stays on its worker after its last request.")
    ] = 300.0
    cache_threshold: Annotated[
        float, Meta(ge=0.0, le=1.0), _d("cache_aware: least prefix match rate (0-1) that routes to the "
                                        "worker holding the prefix; below it, the least loaded worker.")
    ] = 0.3
    balance_abs_threshold: Annotated[
        int, Meta(ge=0), _d("cache_aware: load is imbalanced when max - min in-flight exceeds this "
                            "(sglang's default 64 lets a shared prompt pile onto one worker) ...")
    ] = 4
    balance_rel_threshold: Annotated[
        float, Meta(ge=1.0), _d("... and max exceeds min times this; then the least loaded worker wins.")
    ] = 1.5
    cache_block_chars: Annotated[
        int, Meta(ge=8), _d("cache_aware: prompt characters per prefix block (the match granularity).")
    ] = 64
    affinity_capacity: Annotated[
        int, Meta(ge=1024), _d("Entries per proxy in the shared affinity table (sessions, prefixes).")
    ] = 65536
    metrics_interval: Annotated[
        Seconds, _d("least_loaded: seconds between scrapes of each worker's GET /metrics.")
    ] = 2.0
    quota_headroom: Annotated[
        float, Meta(gt=0.0, le=1.0), _d("quota_aware: share of a worker's per-minute budget after "
                                        "which it is avoided.")
    ] = 0.9
    connection_preference: Annotated[
        Literal["any", "http", "grpc"],
        _d("Which connection's routers serve a model first; a request may ask with the "
           "X-Shardgate-Connection header."),
    ] = "any"
    connect_timeout: Annotated[Seconds, _d("Seconds to open a connection to a worker.")] = 5.0
    first_byte_timeout: Annotated[
        Seconds, _d("Seconds to wait for a worker's response head (time to first byte).")
    ] = 300.0
    idle_timeout: Annotated[
        Seconds, _d("Seconds a response may stay silent between two chunks (streams).")
    ] = 60.0
    total_timeout: Annotated[Seconds, _d("Seconds a whole request may take, stream included.")] = 300.0
    max_tries: Annotated[
        int,
        Meta(ge=1, le=10),
        _d("Workers tried per request when one fails before any response byte reached the client."),
    ] = 3
    retry_statuses: Annotated[
        str,
        Meta(pattern=r"^\s*(\d{3}\s*(,\s*\d{3}\s*)*)?$"),
        _d("Comma-separated worker answers retried on another worker before any byte reached the "
           "client (sglang-router's set); empty turns answer retries off. Connection failures are "
           "always retried."),
    ] = "408,429,500,502,503,504"
    retry_backoff: Annotated[
        Seconds, _d("Wait before the first retry of a worker's answer; doubles per retry, +-20% jitter.")
    ] = 0.05
    retry_backoff_max: Annotated[
        Seconds, _d("Longest wait between retries; a worker's Retry-After above it is relayed, not waited "
                    "out.")
    ] = 1.0
    retry_budget: Annotated[
        float, Meta(ge=0, le=1),
        _d("Share of a proxy's in-flight requests that may be retrying a worker's answer at once "
           "(Envoy's retry budget): retries never add more than this much load.")
    ] = 0.2
    retry_budget_min: Annotated[
        int, Meta(ge=0), _d("Requests that may always be retrying at once, whatever the budget says.")
    ] = 3
    max_body_size: Annotated[
        int, Meta(ge=1024), _d("Largest request body in bytes; larger bodies get 413.")
    ] = 32 * 1024 * 1024
    max_head_size: Annotated[
        int, Meta(ge=1024, le=1024 * 1024),
        _d("Largest request head in bytes (request line, header fields and chunked-body trailer "
           "fields together); a longer request line gets 414, longer fields 431.")
    ] = 64 * 1024
    max_header_count: Annotated[
        int, Meta(ge=8, le=10000), _d("Most header fields (trailer fields included) in one request; "
                                      "more get 431.")
    ] = 100
    max_pipelined: Annotated[
        int, Meta(ge=1, le=1024),
        _d("Most requests a client may pipeline on one connection ahead of their answers; the "
           "router stops reading from that client until the queue shrinks.")
    ] = 16
    max_json_depth: Annotated[
        int, Meta(ge=4, le=512), _d("Deepest nesting of arrays and objects in a JSON request body; "
                                    "deeper bodies get 400.")
    ] = 64
    header_timeout: Annotated[
        Seconds, _d("Seconds a client may take to send a request's head and body (slowloris guard).")
    ] = 30.0
    keepalive_timeout: Annotated[
        Seconds, _d("Seconds an idle client or worker keep-alive connection is kept open.")
    ] = 15.0
    pool_size: Annotated[
        int, Meta(ge=0), _d("Idle keep-alive connections kept per worker in each proxy process.")
    ] = 64
    # admission control (docs/overload.md); every limit is off by default
    max_concurrent_requests: Annotated[
        int, Meta(ge=0), _d("Most proxied requests in flight across the router (0: no cap); each proxy "
                            "admits its share, the rest wait in the admission queue.")
    ] = 0
    queue_size: Annotated[
        int, Meta(ge=0), _d("Requests that may wait for capacity across the router (each proxy holds its "
                            "share); beyond it 503 with Retry-After; 0: no queue, 503 at once.")
    ] = 100
    queue_timeout: Annotated[
        Seconds, _d("Seconds a request may wait in the admission queue before it gets 503 with Retry-After.")
    ] = 60.0
    rate_limit_rpm: Annotated[
        int, Meta(ge=0), _d("Requests per minute each client may send (0: no limit); over it 429 with "
                            "Retry-After. Each proxy enforces its share.")
    ] = 0
    rate_limit_tpm: Annotated[
        int, Meta(ge=0), _d("Estimated tokens (prompt bytes / 4 + max_tokens) per minute each client may "
                            "send (0: no limit); over it 429 with Retry-After. Each proxy enforces its "
                            "share.")
    ] = 0
    rate_limit_key: Annotated[
        str, Meta(min_length=1), _d("Request header whose value identifies a client for rate limits "
                                    "(hashed, never logged); 'authorization' uses the Bearer token. A "
                                    "request without it is keyed by its client address.")
    ] = "authorization"
    grace_period: Annotated[
        Seconds, _d("Seconds SIGTERM waits for in-flight requests and streams to finish.")
    ] = 30.0
    health_interval: Annotated[Seconds, _d("Seconds between active health checks of a worker.")] = 30.0
    health_timeout: Annotated[Seconds, _d("Seconds an active health check may take.")] = 5.0
    health_path: Annotated[str, _d("HTTP path probed by active health checks.")] = "/health"
    health_fall: Annotated[
        int, Meta(ge=1), _d("Consecutive failed checks that mark a worker unhealthy.")
    ] = 3
    health_rise: Annotated[
        int, Meta(ge=1), _d("Consecutive passed checks that mark a worker healthy again.")
    ] = 2
    discovery_interval: Annotated[
        Seconds, _d("Seconds between re-reads of a worker's GET /v1/models (gRPC: GetModelInfo) when its "
                    "model is not set, so a change of what it serves is followed; until its first "
                    "answer it is retried every 2 s, or this often if shorter.")
    ] = 30.0
    max_workers: Annotated[
        int, Meta(ge=1, le=1_000_000), _d("Worker slots in shared memory (capacity of the fleet).")
    ] = 16384
    snapshot_capacity: Annotated[
        int, Meta(ge=65536), _d("Bytes reserved for one encoded snapshot in shared memory.")
    ] = 64 * 1024 * 1024
    orphan_timeout: Annotated[
        float, Meta(ge=0), _d("Seconds a proxy keeps serving its last snapshot after its coordinator "
                              "died, before it drains and exits; 0: until a coordinator started on the "
                              "same address replaces it (it then drains).")
    ] = 0.0
    restart_backoff_max: Annotated[
        Seconds, _d("Longest wait in seconds before restarting a proxy that died.")
    ] = 10.0
    watchdog_timeout: Annotated[
        float, Meta(ge=0), _d("Seconds a running proxy may go without updating its heartbeat (it writes one "
                              "every 0.25 s) before the coordinator kills it with SIGKILL and starts a "
                              "new one; 0 turns the watchdog off, otherwise at least 1.")
    ] = 10.0
    log_level: Annotated[
        Literal["debug", "info", "warning", "error"], _d("Log level of all processes.")
    ] = "info"
    log_format: Annotated[
        Literal["text", "json"], _d("Format of every log line of the coordinator and the proxies: 'text' "
                                    "or 'json' (one object a line; docs/logging.md).")
    ] = "text"
    access_log: Annotated[
        str, _d("Where the proxies write one line per request (docs/logging.md): '' (off), '-' (stderr, "
                "with the other logs) or a file path every proxy appends to. Lines follow log_format.")
    ] = ""
    max_models: Annotated[
        int, Meta(ge=1, le=4096), _d("Models with their own series in /metrics (docs/metrics.md); more "
                                     "are counted under model=\"other\". Fixed at start, like max_workers.")
    ] = 64
    # discovery and health
    config_watch_interval: Annotated[
        float, Meta(ge=0), _d("Seconds between checks of the config file for changes (re-read like "
                              "SIGHUP); 0 turns the watch off.")
    ] = 1.0
    registry_url: Annotated[
        str, _d("Base URL of the HTTP service registry (`shardgate registry`) polled for workers; "
                "empty: no registry.")
    ] = ""
    registry_interval: Annotated[Seconds, _d("Seconds between polls of the service registry.")] = 10.0
    registry_grace: Annotated[
        float, Meta(ge=0), _d("Seconds a worker may be missing from the registry's answers before it "
                              "is removed.")
    ] = 60.0
    etcd_endpoints: Annotated[
        str, _d("Comma-separated etcd v3 client URLs (JSON gateway) to watch for workers; empty: no etcd.")
    ] = ""
    etcd_prefix: Annotated[
        str, Meta(min_length=1), _d("etcd key prefix; each key under it is one worker, its value a JSON "
                                    "object of worker fields.")
    ] = "/shardgate/workers/"
    source_timeout: Annotated[
        Seconds, _d("Seconds one request to the registry or etcd may take before the source counts as down.")
    ] = 5.0
    health_target: Annotated[
        Literal["service", "babysitter"],
        _d("Where active checks go: the worker's own port ('service'), or the seed's babysitter on the "
           "worker's port + 1 ('babysitter'); both use health_path."),
    ] = "service"
    stall_timeout: Annotated[
        Seconds, _d("Seconds a streamed request's worker may take to send its response head (engines "
                    "send it at once for streams) before the attempt is a stall: a failure for passive "
                    "health, retried on another worker when tries and total_timeout allow. A client that "
                    "gave up on a stream after waiting this long also leaves a failure on the worker. "
                    "Passive health also ejects a worker holding 3+ requests with none answered for this "
                    "long while its peers answer theirs.")
    ] = 5.0
    slow_outlier_factor: Annotated[
        float, Meta(ge=0.0), _d("Passive health ejects a worker whose time to first byte, over its recent "
                                "answers, is more than this many times the median of its model's other "
                                "workers (and more than slow_outlier_min_gap above it); 0 turns this "
                                "rule off.")
    ] = 3.0
    slow_outlier_min_gap: Annotated[
        float, Meta(ge=0.0), _d("Seconds a worker's time to first byte must exceed its peers' median by "
                                "before slow_outlier_factor can call it slow.")
    ] = 1.0
    passive_interval: Annotated[
        Seconds, _d("Seconds between reads of the proxies' per-worker counters for passive health.")
    ] = 0.5
    passive_consecutive_failures: Annotated[
        int, Meta(ge=0), _d("Failed attempts in a row (connect errors, resets, timeouts; all proxies "
                            "together) that eject a worker; 0 turns this rule off.")
    ] = 5
    passive_failure_rate: Annotated[
        float, Meta(ge=0.0, le=1.0), _d("Share of failed attempts over passive_window that ejects a "
                                        "worker; 0 turns this rule off.")
    ] = 0.5
    passive_window: Annotated[
        Seconds, _d("Length in seconds of the sliding window the failure rate is computed over.")
    ] = 30.0
    passive_min_requests: Annotated[
        int, Meta(ge=1), _d("Least attempts in the window before the failure rate is judged.")
    ] = 10
    ejection_time: Annotated[
        Seconds, _d("Seconds a worker stays ejected the first time; each further ejection adds as much.")
    ] = 30.0
    max_ejection_time: Annotated[Seconds, _d("Longest ejection in seconds.")] = 300.0
    ejected_probe_interval: Annotated[
        Seconds, _d("Seconds between active probes of an ejected worker: once one failed, the first "
                    "that passes readmits it (half-open) without waiting for the ejection to end.")
    ] = 1.0
    max_ejection_percent: Annotated[
        int, Meta(ge=0, le=100), _d("Most workers of a model that may be ejected at once, in percent "
                                    "(at least one of two or more; never the last routable one).")
    ] = 50
    slow_start: Annotated[
        float, Meta(ge=0), _d("Seconds over which a new or recovered worker's weight ramps from a tenth to "
                              "all of it (weighted policies); 0 turns slow start off.")
    ] = 0.0
    admin_host: Annotated[str, _d("Address the admin API listens on.")] = "127.0.0.1"
    admin_port: Annotated[
        int, Meta(ge=0, le=65535), _d("Port of the admin API (bearer token from admin_token_file or "
                                      "SHARDGATE_ADMIN_TOKEN); 0 turns it off.")
    ] = 0
    admin_token_file: Annotated[
        str, _d("File holding the admin API's bearer token (SHARDGATE_ADMIN_TOKEN is used when empty).")
    ] = ""
    # client API keys and the back office (docs/api-keys.md); all off by default
    api_key: Annotated[
        str, _d("A client API key (sglang-router's --api-key): requests must send it as 'Authorization: "
                "Bearer KEY' or 'X-API-Key: KEY', else 401. Prefer SHARDGATE_API_KEY to the flag (a flag "
                "shows in ps); proxies only ever see its SHA-256 digest. Empty: no such key.")
    ] = ""
    api_key_file: Annotated[
        str, _d("File of client API keys, one a line: 'KEY', 'NAME:KEY' or 'NAME:sha256:HEX' (the file then "
                "holds no secret); '#' starts a comment. Re-read on SIGHUP. Empty: no key file. With no "
                "key at all, the router is open.")
    ] = ""
    forward_authorization: Annotated[
        bool, _d("With client API keys on, also forward the client's Authorization and X-API-Key headers "
                 "to workers (off: workers never see a client's key). A worker with its own upstream key "
                 "(api_key_env or api_key_file in its entry) always gets that instead.")
    ] = False
    ops_host: Annotated[str, _d("Address the ops listener (ops_port) listens on.")] = "127.0.0.1"
    ops_port: Annotated[
        int, Meta(ge=0, le=65535),
        _d("Port of the ops listener, which serves /workers, /stats, /metrics, /routers, /route/explain, "
           "/health and /readiness without an API key; the data port then refuses the back-office paths "
           "(404). 0: the back office stays on the data port, behind the API key when keys are on.")
    ] = 0
    worker_cidrs: Annotated[
        str, _d("Comma-separated CIDRs that workers from the admin API, registry or etcd must resolve "
                "into; empty: any address but link-local, metadata, multicast and unspecified.")
    ] = ""


SETTING_NAMES: tuple[str, ...] = Settings.__struct_fields__


def _descriptions() -> dict[str, str]:
    hints = typing.get_type_hints(Settings, include_extras=True)
    out = {}
    for name in SETTING_NAMES:
        texts = [m.description for m in getattr(hints[name], "__metadata__", ())
                 if isinstance(m, Meta) and m.description]
        out[name] = texts[-1] if texts else ""
    return out


DESCRIPTIONS: dict[str, str] = _descriptions()
