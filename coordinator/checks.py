"""Semantic checks of a whole configuration: what is well-formed field by field yet cannot serve.

Role: the checks ``serve`` and ``check-config`` both run after :func:`coordinator.config.load_config`
(one function, so check-config never says "ok" to what serve refuses). Each failure is one
:class:`ConfigError` line naming the field, with the valid values or a "did you mean".

Invariants:
- Only facts known before start are judged: a worker without ``model`` (discovered later) or a
  dynamic discovery source makes the model set open, and checks that need the full set are skipped.
- Nothing here mutates the config.
"""

from __future__ import annotations

from collections import defaultdict

from coordinator.compat import did_you_mean
from coordinator.config import Config, ConfigError
from shm.schema import WorkerSpec
from shm.settings import POLICY_FIELDS

NEEDS_QUOTA = "quota_aware"


def check(config: Config) -> None:
    from coordinator.discovery.core import dynamic_sources

    dynamic = bool(dynamic_sources(config.settings))
    if not config.workers and not dynamic:
        raise ConfigError("workers: no workers configured; give --worker URL (repeatable), a config file "
                          "with a 'workers:' list, or a discovery source (registry_url, etcd_endpoints, "
                          "admin_port)")
    by_model: dict[str, list[WorkerSpec]] = defaultdict(list)
    for w in config.workers:
        if w.model:
            by_model[w.model].append(w)
    closed = not dynamic and all(w.model for w in config.workers)
    for model, workers in by_model.items():
        _check_pd(model, workers, closed)
        _check_shards(model, workers)
    _check_policies(config, by_model)
    if closed:
        _check_names(config, set(by_model))


def _check_pd(model: str, workers: list[WorkerSpec], closed: bool) -> None:
    kinds = {(w.connection, w.type) for w in workers}
    if any((c, "regular") in kinds for c in ("http", "grpc")) or not closed:
        return  # a regular router serves the model whatever its PD side lacks
    roles = {t for _, t in kinds}
    for missing in ("prefill", "decode"):
        if missing not in roles:
            raise ConfigError(f"models.{model}: has {' and '.join(sorted(roles))} workers but no "
                              f"{missing} worker (type: {missing}) and no regular one; it could never be "
                              "served")
    for connection in ("http", "grpc"):
        if (connection, "prefill") in kinds and (connection, "decode") in kinds:
            return
    raise ConfigError(f"models.{model}: prefill and decode workers use different connections "
                      f"({', '.join(f'{t}={c}' for c, t in sorted(kinds))}); a PD pair needs both on "
                      "http or both on grpc (connection)")


def _check_shards(model: str, workers: list[WorkerSpec]) -> None:
    named = sorted({w.shard for w in workers if w.shard})
    if not named:
        return
    for w in workers:
        if not w.shard:
            raise ConfigError(f"worker {w.url}: shard: model {model}'s other workers name shards "
                              f"({', '.join(named)}); this one names none, so no key would reach it")


def _check_policies(config: Config, by_model: dict[str, list[WorkerSpec]]) -> None:
    uses: list[tuple[str, str, list[WorkerSpec]]] = [
        (key, getattr(config.settings, key), list(config.workers)) for key in POLICY_FIELDS]
    for model, mp in config.models.items():
        for key in POLICY_FIELDS:
            value = getattr(mp, key)
            if value:
                uses.append((f"models.{model}.{key}", value, by_model.get(model, [])))
    for field, policy, workers in uses:
        if policy == NEEDS_QUOTA and workers and not any(w.quota for w in workers):
            raise ConfigError(f"{field}: quota_aware needs a per-worker budget, but no worker declares "
                              "quota: {requests_per_minute: N, tokens_per_minute: N}")


def _check_names(config: Config, served: set[str]) -> None:
    known = sorted(served)
    for alias, targets in config.aliases.items():
        for model in targets:
            if model not in served:
                raise ConfigError(f"aliases.{alias}.{model}: no worker serves model '{model}'"
                                  f"{did_you_mean(model, known)}; models: {', '.join(known) or '-'}")
    for model in config.models:
        if model not in served and model not in config.aliases:
            raise ConfigError(f"models.{model}: no worker serves this model"
                              f"{did_you_mean(model, known)}; models: {', '.join(known) or '-'}")
