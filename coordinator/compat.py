"""Compatibility with sglang-router (sgl-model-gateway), vllm-router and vLLM production-stack.

Role: the one declaration of their command-line flags and policy names and what each becomes
here. ``shardgate serve``/``check-config`` accept these flags (:func:`add_compat_flags`), turn them
into native settings and workers (:func:`translate`), and docs/migration.md is generated from the
same tables (:func:`migration_markdown`), so the page cannot drift from what the CLI does.

Invariants:
- A foreign policy name either aliases a native one with the same behaviour, or is refused with
  one line naming the closest native policy (never a silent approximation).
- Foreign flags only ever produce native settings and :class:`WorkerSpec` entries; nothing
  downstream knows they exist. A native flag given too wins over its foreign spelling.
- Errors are :class:`CompatError` (a ``ValueError``); coordinator.config turns them into
  ``ConfigError`` lines.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from typing import Any, NamedTuple

from shm.schema import WorkerSpec
from shm.settings import POLICY_FIELDS, POLICY_NAMES

SGL = "sglang-router"
VLLM = "vllm-router"
STACK = "production-stack"


class CompatError(ValueError):
    """A foreign flag or policy name that has no meaning here; ``str()`` is the operator's line."""


class PolicyAlias(NamedTuple):
    name: str           # their spelling
    tools: str          # who uses it
    ours: str | None    # the native policy with the same behaviour, or None
    closest: str        # None's nearest native policy (or what to do instead)
    note: str


POLICY_ALIASES: tuple[PolicyAlias, ...] = (
    PolicyAlias("random", f"{SGL}, {VLLM}", "random", "", "uniform draw"),
    PolicyAlias("round_robin", f"{SGL}, {VLLM}", "round_robin", "", "next worker in turn"),
    PolicyAlias("roundrobin", STACK, "round_robin", "", "next worker in turn"),
    PolicyAlias("power_of_two", f"{SGL}, {VLLM}", "power_of_two", "",
                "two random workers, the less loaded wins (in-flight counted over all proxies)"),
    PolicyAlias("cache_aware", f"{SGL}, {VLLM}", "cache_aware", "",
                "longest-prefix affinity with sglang's balance thresholds and defaults"),
    PolicyAlias("consistent_hashing", SGL, "consistent_hash", "",
                "hash ring on the routing key (hash_headers, then the body's user)"),
    PolicyAlias("consistent_hash", VLLM, "consistent_hash", "", "hash ring on the routing key"),
    PolicyAlias("session", STACK, "consistent_hash", "",
                "the session header (--session-key, set as hash_headers) on a hash ring, as the "
                "production-stack's session router does"),
    PolicyAlias("prefixaware", STACK, "cache_aware", "", "longest-prefix match picks the worker"),
    PolicyAlias("prefix_aware", f"{STACK} (spelling variant)", "cache_aware", "",
                "longest-prefix match picks the worker"),
    PolicyAlias("least_load", SGL, "least_loaded", "",
                "fewest running + waiting requests as the workers report them"),
    PolicyAlias("prefix_hash", SGL, None, "cache_aware",
                "hashes prompt prefixes onto a ring; cache_aware matches prefixes exactly instead"),
    PolicyAlias("manual", SGL, None, "session_affinity",
                "sticky routing by a client-given key; session_affinity keeps a key on its worker"),
    PolicyAlias("passthrough", SGL, None, "round_robin", "no native equivalent"),
    PolicyAlias("bucket", f"{SGL} (prefill)", None, "least_loaded",
                "prompt-length buckets; least_loaded balances by the workers' queues"),
    PolicyAlias("kvaware", STACK, None, "cache_aware",
                "asks LMCache where the KV is; cache_aware routes on the router's own prefix record"),
    PolicyAlias("disaggregated_prefill", STACK, None, "--prefill/--decode",
                "use --vllm-pd-disaggregation --prefill URL --decode URL (two-phase PD)"),
    PolicyAlias("disaggregated_prefill_orchestrated", STACK, None, "--prefill/--decode",
                "use --vllm-pd-disaggregation --prefill URL --decode URL (two-phase PD)"),
)
_ALIASES = {a.name: a for a in POLICY_ALIASES}

# Log level spellings of theirs that ours do not already accept.
LOG_LEVEL_ALIASES = {"warn": "warning", "critical": "error", "trace": "debug"}


def native_policy(value: Any, field: str) -> Any:
    """``value`` as a native policy name; their names are aliased or refused with the closest."""
    if not isinstance(value, str) or value in POLICY_NAMES:
        return value
    alias = _ALIASES.get(value)
    if alias is not None:
        if alias.ours is not None:
            return alias.ours
        raise CompatError(f"{field}: '{value}' ({alias.tools}) has no equivalent here; closest: "
                          f"{alias.closest} ({alias.note})")
    hint = did_you_mean(value, list(POLICY_NAMES) + list(_ALIASES))
    raise CompatError(f"{field}: unknown policy '{value}'{hint}; valid: {', '.join(POLICY_NAMES)}")


def did_you_mean(name: str, known: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` naming the closest of ``known``, or "" when none is close: the
    hint every config error gives for a misspelt name."""
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class CompatFlag(NamedTuple):
    flag: str
    tools: str
    ours: str      # what it becomes here
    kwargs: dict[str, Any]


# The foreign flags that are not already native settings flags. Native ones they share with us
# (--host, --port, --policy, --prefill-policy, --api-key, ...) are listed in SHARED below for the
# migration page.
FLAGS: tuple[CompatFlag, ...] = (
    CompatFlag("--worker-urls", f"{SGL}, {VLLM}", "`--worker URL` per URL",
               {"nargs": "+", "action": "extend", "metavar": "URL", "default": []}),
    CompatFlag("--pd-disaggregation", SGL, "`pd_dialect: bootstrap` (SGLang's PD protocol), and "
               "prefill/decode workers from `--prefill`/`--decode`", {"action": "store_true"}),
    CompatFlag("--vllm-pd-disaggregation", VLLM, "`pd_dialect: two_phase` (vLLM's PD protocol), and "
               "prefill/decode workers from `--prefill`/`--decode`", {"action": "store_true"}),
    CompatFlag("--prefill", f"{SGL}, {VLLM}", "a worker with `type: prefill` and `bootstrap_port`",
               {"nargs": "+", "action": "append", "metavar": ("URL", "BOOTSTRAP_PORT"), "default": []}),
    CompatFlag("--decode", f"{SGL}, {VLLM}", "a worker with `type: decode`",
               {"action": "append", "metavar": "URL", "default": []}),
    CompatFlag("--request-timeout-secs", f"{SGL}, {VLLM}", "`total_timeout`",
               {"metavar": "SECONDS", "type": float}),
    CompatFlag("--prometheus-port", f"{SGL}, {VLLM}", "`ops_port` (the back office: /metrics and more)",
               {"metavar": "PORT", "type": int}),
    CompatFlag("--prometheus-host", f"{SGL}, {VLLM}", "`ops_host`", {"metavar": "HOST"}),
    CompatFlag("--health-check-interval-secs", SGL, "`health_interval`",
               {"metavar": "SECONDS", "type": float}),
    CompatFlag("--health-check-timeout-secs", SGL, "`health_timeout`", {"metavar": "SECONDS", "type": float}),
    CompatFlag("--health-failure-threshold", SGL, "`health_fall`", {"metavar": "N", "type": int}),
    CompatFlag("--health-success-threshold", SGL, "`health_rise`", {"metavar": "N", "type": int}),
    CompatFlag("--health-check-endpoint", SGL, "`health_path`", {"metavar": "PATH"}),
    CompatFlag("--max-payload-size", SGL, "`max_body_size`", {"metavar": "BYTES", "type": int}),
    CompatFlag("--log-json", SGL, "`log_format: json`", {"action": "store_true"}),
    CompatFlag("--static-backends", STACK, "`--worker URL` per comma-separated URL",
               {"metavar": "URL,URL..."}),
    CompatFlag("--static-models", STACK, "each static backend's `model` (in order)",
               {"metavar": "MODEL,MODEL..."}),
    CompatFlag("--routing-logic", STACK, "`policy` (names aliased, table below)", {"metavar": "LOGIC"}),
    CompatFlag("--session-key", STACK, "`hash_headers` (the routing key header)", {"metavar": "HEADER"}),
)

# Their flags that are one native setting each, value unchanged.
SETTING_FLAGS = {"--request-timeout-secs": "total_timeout", "--prometheus-port": "ops_port",
                 "--prometheus-host": "ops_host", "--health-check-interval-secs": "health_interval",
                 "--health-check-timeout-secs": "health_timeout", "--health-failure-threshold": "health_fall",
                 "--health-success-threshold": "health_rise", "--health-check-endpoint": "health_path",
                 "--max-payload-size": "max_body_size"}

SHARED: tuple[tuple[str, str, str], ...] = (
    ("--host", f"{SGL}, {VLLM}, {STACK}", "`host` (ours defaults to 127.0.0.1)"),
    ("--port", f"{SGL}, {VLLM}, {STACK}", "`port`"),
    ("--policy", f"{SGL}, {VLLM}", "`policy` (names aliased, table below)"),
    ("--prefill-policy", f"{SGL}, {VLLM}", "`prefill_policy`: the prefill side's policy (names aliased; "
     "unset: `policy`)"),
    ("--decode-policy", f"{SGL}, {VLLM}", "`decode_policy`: the decode side's policy (names aliased; "
     "unset: `policy`)"),
    ("--api-key", f"{SGL}, {VLLM}", "`api_key` (prefer SHARDGATE_API_KEY)"),
    ("--log-level", f"{SGL}, {VLLM}, {STACK}", "`log_level` (`warn` is read as `warning`)"),
    ("--max-concurrent-requests", f"{SGL}, {VLLM}", "`max_concurrent_requests` (-1, their 'off', is 0)"),
    ("--cache-threshold", f"{SGL}, {VLLM}", "`cache_threshold` (same rule, same default)"),
    ("--balance-abs-threshold", f"{SGL}, {VLLM}", "`balance_abs_threshold` (same rule; default 4, "
     "theirs 64: docs/simulator.md)"),
    ("--balance-rel-threshold", f"{SGL}, {VLLM}", "`balance_rel_threshold` (same rule, same default)"),
)


def _dest(flag: str) -> str:
    return "compat_" + flag.lstrip("-").replace("-", "_")


def add_compat_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sglang-router / vllm-router / production-stack flags "
                                      "(docs/migration.md)")
    for f in FLAGS:
        group.add_argument(f.flag, dest=_dest(f.flag), help=f"As in {f.tools}: becomes "
                           f"{f.ours.replace('`', '')}.".replace("%", "%%"), **f.kwargs)


def translate(args: argparse.Namespace, cli: dict[str, Any],
              notes: list[str]) -> tuple[dict[str, Any], list[WorkerSpec]]:
    """Their flags as native CLI settings (native flags in ``cli`` win) and extra worker specs;
    where the translation is not exact, a line is appended to ``notes`` (shown once at start)."""
    def get(flag: str) -> Any:
        return getattr(args, _dest(flag), None)

    out: dict[str, Any] = {}
    workers = [WorkerSpec(url=u) for u in get("--worker-urls") or []]
    backends = [u.strip() for u in (get("--static-backends") or "").split(",") if u.strip()]
    models = [m.strip() for m in (get("--static-models") or "").split(",") if m.strip()]
    if models and len(models) != len(backends):
        raise CompatError(f"--static-models: {len(models)} model(s) for {len(backends)} "
                          "--static-backends; give one model per backend, in order")
    workers += [WorkerSpec(url=u, model=models[i] if models else None) for i, u in enumerate(backends)]
    prefills, decodes = get("--prefill") or [], get("--decode") or []
    if (prefills or decodes) and not (get("--pd-disaggregation") or get("--vllm-pd-disaggregation")):
        raise CompatError("--prefill/--decode: need --pd-disaggregation (SGLang) or "
                          "--vllm-pd-disaggregation (vLLM)")
    dialect = _pd_dialect(bool(get("--pd-disaggregation")), bool(get("--vllm-pd-disaggregation")))
    if dialect:
        out["pd_dialect"] = dialect
    for entry in prefills:
        if len(entry) > 2:
            raise CompatError(f"--prefill: expected URL [BOOTSTRAP_PORT], got {' '.join(entry)}")
        port: int | None = None
        if len(entry) == 2 and entry[1].lower() != "none":
            if not entry[1].isdigit():
                raise CompatError(f"--prefill {entry[0]}: BOOTSTRAP_PORT must be a port number or "
                                  f"'none', got '{entry[1]}'")
            port = int(entry[1])
        workers.append(WorkerSpec(url=entry[0], type="prefill", bootstrap_port=port))
    workers += [WorkerSpec(url=u, type="decode") for u in decodes]
    if get("--routing-logic"):
        out["policy"] = native_policy(get("--routing-logic"), "--routing-logic")
    if get("--session-key"):
        out["hash_headers"] = get("--session-key")
    for flag, setting in SETTING_FLAGS.items():
        if get(flag) is not None:
            out[setting] = get(flag)
    if get("--log-json"):
        out["log_format"] = "json"
    return {**out, **cli}, workers


def _pd_dialect(sglang: bool, vllm: bool) -> str | None:
    """The ``pd_dialect`` their PD switch means (None: neither given); both at once is refused."""
    if sglang and vllm:
        raise CompatError("--pd-disaggregation (SGLang, bootstrap) and --vllm-pd-disaggregation (vLLM, "
                          "two-phase) name different PD protocols; give one")
    return "bootstrap" if sglang else "two_phase" if vllm else None


def native_setting(name: str, value: Any, field: str) -> Any:
    """A setting's value with their spellings read as ours (policy names, log levels, -1 = off).
    An optional policy setting (``prefill_policy``, ``decode_policy``) left empty or null is ""."""
    if name in POLICY_FIELDS:
        if name != "policy" and value in ("", None):
            return ""
        return native_policy(value, field)
    if name == "log_level" and isinstance(value, str):
        return LOG_LEVEL_ALIASES.get(value.lower(), value.lower())
    if name == "max_concurrent_requests" and str(value).strip() == "-1":
        return 0
    return value


MIGRATION_HEADER = """# Migrating from sglang-router, vllm-router or the production-stack router

Generated by `shardgate migration-doc -o docs/migration.md` from `coordinator/compat.py`; do not
edit. `shardgate serve` and `shardgate check-config` accept the flags below as they are, so a
command line from a systemd unit or Helm values can be pasted unchanged; each becomes the native
setting or worker shown. Flags not listed are refused ("unrecognized arguments").

## Flags

| their flag | used by | here |
|---|---|---|
"""

POLICY_HEADER = """
## Policy names

Their names are accepted wherever a policy is (`--policy`, `--routing-logic`, `--prefill-policy`,
`--decode-policy`, the file's `policy`, `prefill_policy`, `decode_policy` and the same keys under
`models.NAME`). A name with no equivalent is refused
with one line naming the closest native policy.

| their policy | used by | here | behaviour |
|---|---|---|---|
"""

PD_NOTE = """
## Prefill/decode

`--pd-disaggregation --prefill URL [BOOTSTRAP_PORT] --decode URL` (repeatable) declares prefill
and decode workers, exactly like `type: prefill` (with `bootstrap_port`) and `type: decode` entries
in the file's `workers:` list. A model with both is served by the `http_pd` router.

The PD protocol is the `pd_dialect` setting: `--pd-disaggregation` sets it to `bootstrap`
(SGLang: prefill and decode at once, with bootstrap host/port/room), `--vllm-pd-disaggregation`
to `two_phase` (vLLM: prefill first, its `kv_transfer_params` go to the decode; also the
default). `--prefill-policy` and `--decode-policy` set each side's policy (`prefill_policy`,
`decode_policy`; a side without one uses `policy`), as in sglang-router. A model's own
`models: {NAME: {pd_dialect: ..., prefill_policy: ..., decode_policy: ..., policy: ...}}` in a
file wins over all of these; a native flag (`--pd-dialect`) wins over its foreign spelling.
"""


def migration_markdown() -> str:
    rows = [f"| `{flag}` | {tools} | {ours} |" for flag, tools, ours in SHARED]
    rows += [f"| `{f.flag}` | {f.tools} | {f.ours} |" for f in FLAGS]
    policies = [f"| `{a.name}` | {a.tools} | "
                f"{f'`{a.ours}`' if a.ours else f'refused; closest: `{a.closest}`'} | {a.note} |"
                for a in POLICY_ALIASES]
    return (MIGRATION_HEADER + "\n".join(rows) + "\n" + POLICY_HEADER + "\n".join(policies) + "\n"
            + PD_NOTE)
