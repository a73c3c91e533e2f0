"""The workers, models, policies and admin API reference (docs/reference.md), from declarations.

Role: one table per thing the operator writes or calls, keyed by the names the code declares:
the fields of :class:`shm.schema.WorkerSpec`, :class:`~shm.schema.Quota` and
:class:`~shm.schema.ModelPolicy` (types and defaults read from the structs), the policy names of
:data:`shm.settings.POLICY_NAMES` (with their foreign aliases from :mod:`coordinator.compat`) and
the admin API routes of :mod:`coordinator.admin`.

Invariants:
- Every declared field, policy and admin route has exactly one entry here; tests/test_compat_cli.py
  fails when one is added or removed without its entry (:func:`missing`), and when
  docs/reference.md differs from :func:`reference_markdown`.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

import msgspec

from coordinator.compat import POLICY_ALIASES
from shm.schema import ModelPolicy, Quota, WorkerSpec
from shm.settings import POLICY_NAMES

WORKER_FIELDS = {
    "url": "Base URL: `http://`, `https://` or `grpc://` host and port, no path.",
    "model": "The model it serves; omit to discover from the worker's `GET /v1/models`.",
    "type": "`regular`, or `prefill` / `decode` for prefill/decode disaggregation (the `http_pd` / "
            "`grpc_pd` routers).",
    "connection": "`http` or `grpc` (set by a `grpc://` URL).",
    "weight": "Relative share for the weighted policies (>= 1).",
    "labels": "Free-form key/value tags, shown in `/workers`.",
    "shard": "Shard name: the request key picks a shard on the model's ring, the policy a worker in "
             "it; all or none of a model's workers name one.",
    "quota": "Per-minute budget for `quota_aware` (fields below).",
    "bootstrap_port": "SGLang PD: the prefill worker's bootstrap port (null: the engine's default).",
    "max_concurrency": "Most requests in flight to it across all proxies (0: no cap).",
    "api_key_env": "Environment variable holding the worker's own API key (file or CLI only).",
    "api_key_file": "File whose first line is the worker's own API key (file or CLI only).",
}
QUOTA_FIELDS = {
    "requests_per_minute": "Requests per minute (0: unlimited).",
    "tokens_per_minute": "Tokens per minute (0: unlimited).",
}
MODEL_FIELDS = {
    "policy": "The model's policy (default: the global `policy`).",
    "prefill_policy": "PD: the prefill side's policy (default: the model's `policy`, else the global "
                      "`prefill_policy`, else the global `policy`).",
    "decode_policy": "PD: the decode side's policy (default: the model's `policy`, else the global "
                     "`decode_policy`, else the global `policy`).",
    "pd_dialect": "PD protocol: `two_phase` (vLLM: prefill first, its `kv_transfer_params` go to the "
                  "decode) or `bootstrap` (SGLang: both at once with bootstrap host/port/room); "
                  "null: the global `pd_dialect` setting (`--pd-disaggregation` makes it `bootstrap`).",
}
POLICIES = {
    "weighted_round_robin": "Smooth weighted round-robin (nginx's); plain round-robin with equal weights.",
    "round_robin": "The next worker in turn.",
    "random": "A uniform draw.",
    "weighted_random": "A draw in proportion to weight.",
    "least_connections": "Fewest in-flight requests / weight, over all proxies.",
    "least_latency": "Lowest moving average of time to the response head.",
    "power_of_two": "Two random workers; the one with fewer in-flight requests.",
    "consistent_hash": "The routing key's worker on a hash ring (160 virtual nodes per worker).",
    "consistent_hash_bounded": "consistent_hash passing over workers above mean load x "
                               "`bounded_load_factor`.",
    "session_affinity": "A session stays on its worker until idle for `session_ttl`.",
    "cache_aware": "The worker holding the longest prefix above `cache_threshold`, unless load is "
                   "imbalanced (sglang's rule).",
    "least_loaded": "Fewest running + waiting requests as the workers report them.",
    "quota_aware": "The worker with most of its per-minute `quota` left; 429 when none can take it.",
}
ADMIN = {
    ("GET", "/health"): ("liveness; no token needed", "curl -s http://127.0.0.1:9090/health"),
    ("GET", "/admin/workers"): ("every worker: source, health, ejection, drain, in flight",
                                "shardgate workers list"),
    ("POST", "/admin/workers"): ("add a worker `{url, model?, type?, weight?, labels?, shard?, ...}`; 201",
                                 "shardgate workers add http://10.0.0.3:8000 --model m1"),
    ("POST", "/admin/workers/remove"): ("`{url, model?, type?}`: leaves now; in-flight requests finish",
                                        "shardgate workers remove http://10.0.0.3:8000"),
    ("POST", "/admin/workers/drain"): ("`{url, ..., cancel?}`: no new requests; leaves once idle; 202",
                                       "shardgate workers drain http://10.0.0.3:8000"),
    ("POST", "/admin/workers/weight"): ("`{url, ..., weight}`",
                                        "shardgate workers weight http://10.0.0.3:8000 3"),
    ("GET", "/admin/shards"): ("model -> shard -> worker URLs", "shardgate workers shards"),
    ("POST", "/admin/shards"): ("`{model, shard, workers: [url, ...]}`: put workers in a shard",
                                "shardgate workers shard-add m1 a http://10.0.0.3:8000"),
    ("POST", "/admin/shards/remove"): ("`{model, shard}`: the shard's workers leave",
                                       "shardgate workers shard-remove m1 a"),
}
ADMIN_SOURCE = Path(__file__).with_name("admin.py")


def admin_routes() -> set[tuple[str, str]]:
    """The routes coordinator/admin.py registers (read from its source: no server started)."""
    text = ADMIN_SOURCE.read_text()
    return {(m.upper(), p) for m, p in re.findall(r"web\.(get|post|put|delete)\(\"([^\"]+)\"", text)}


def missing() -> list[str]:
    """Declared things without an entry here, and entries naming nothing declared."""
    out = []
    for label, struct, table in (("WorkerSpec", WorkerSpec, WORKER_FIELDS), ("Quota", Quota, QUOTA_FIELDS),
                                 ("ModelPolicy", ModelPolicy, MODEL_FIELDS)):
        out += [f"{label}.{n}" for n in set(struct.__struct_fields__) ^ set(table)]
    out += [f"policy {n}" for n in set(POLICY_NAMES) ^ set(POLICIES)]
    out += [f"admin {m} {p}" for m, p in admin_routes() ^ set(ADMIN)]
    return sorted(out)


def _type_name(hint: object) -> str:
    """A field's type as the file reads it; ``|`` escaped for the Markdown table."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal:
        text = "a policy name (below)" if args == POLICY_NAMES else " | ".join(str(v) for v in args)
    elif type(None) in args:  # Optional[...]: X | null
        return " \\| ".join(_type_name(a) for a in args if a is not type(None)) + " \\| null"
    else:
        text = str(hint).replace("typing.", "").replace("shm.schema.", "").replace("NoneType", "null")
        text = re.sub(r"<class '(\w+)'>", r"\1", text)
    return text.replace("|", "\\|")


def _fields(struct: type[msgspec.Struct], table: dict[str, str]) -> list[str]:
    hints = typing.get_type_hints(struct)
    names = struct.__struct_fields__
    defaults = dict(zip(names[len(names) - len(struct.__struct_defaults__):], struct.__struct_defaults__,
                        strict=True))
    rows = []
    for name in struct.__struct_fields__:
        default = defaults.get(name, msgspec.NODEFAULT)
        if isinstance(default, msgspec._core.Factory):
            default = default.factory()
        shown = "required" if default is msgspec.NODEFAULT else f"`{msgspec.json.encode(default).decode()}`"
        rows.append(f"| `{name}` | `{_type_name(hints[name])}` | {shown} | {table[name]} |")
    return rows


HEADER = """# Workers, models, policies and the admin API

Generated by `shardgate reference-doc -o docs/reference.md` from `shm/schema.py`, `shm/settings.py`,
`coordinator/compat.py` and `coordinator/admin.py`; do not edit. Router settings are in
[settings.md](settings.md); flags of other routers in [migration.md](migration.md).

## Worker entries (`workers:` in the file, `POST /admin/workers`)

| field | type | default | meaning |
|---|---|---|---|
"""


ADMIN_INTRO = """

## Admin API

On its own listener, off by default: set `admin_port` (and `admin_host`, default 127.0.0.1). Every
request but `/health` needs `Authorization: Bearer TOKEN`, the token read from `admin_token_file`
or `SHARDGATE_ADMIN_TOKEN`; with no token configured the API refuses everything (403).
`shardgate workers ACTION` finds the API from `--admin URL`, else `SHARDGATE_ADMIN_URL`, else
`admin_host:admin_port` of `--config FILE` (or `SHARDGATE_CONFIG`), and its token from
`--token-file`, else the config's `admin_token_file`, else `SHARDGATE_ADMIN_TOKEN`. Every change is
published to all proxies at once; the answer carries the snapshot generation that holds it.

| method | path | what | example |
|---|---|---|---|
"""


def reference_markdown() -> str:
    aliases: dict[str, list[str]] = {}
    for a in POLICY_ALIASES:
        if a.ours and a.ours != a.name:
            aliases.setdefault(a.ours, []).append(f"`{a.name}`")
    parts = [HEADER + "\n".join(_fields(WorkerSpec, WORKER_FIELDS)),
             "\n\n### `quota`\n\n| field | type | default | meaning |\n|---|---|---|---|\n"
             + "\n".join(_fields(Quota, QUOTA_FIELDS)),
             "\n\n## Model entries (`models: {NAME: ...}`)\n\n| field | type | default | meaning |\n"
             "|---|---|---|---|\n" + "\n".join(_fields(ModelPolicy, MODEL_FIELDS)),
             "\n\n## Policies (`policy`, `prefill_policy`, `decode_policy`, the same under `models.NAME`)\n\n"
             "| policy | also accepted | picks |\n"
             "|---|---|---|\n" + "\n".join(f"| `{p}` | {', '.join(aliases.get(p, [])) or '-'} | "
                                           f"{POLICIES[p]} |" for p in POLICY_NAMES),
             ADMIN_INTRO
             + "\n".join(f"| {m} | `{p}` | {what} | `{ex}` |" for (m, p), (what, ex) in ADMIN.items())]
    return "".join(parts) + "\n"
