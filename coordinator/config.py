"""Configuration: CLI flags, environment, the YAML deployment file, validated in one pass.

Role: turn argv + environment + file into a :class:`Config` or one clear :class:`ConfigError`
line that names the field and the reason (the CLI prints it and exits 2; nothing starts).

Invariants:
- Every router setting comes from :class:`shm.settings.Settings`; flags (``--connect-timeout``),
  environment variables (``SHARDGATE_CONNECT_TIMEOUT``) and file keys (``connect_timeout``) are
  derived from its field names, never declared again here.
- Precedence: defaults < file < environment < CLI. Workers: the file's ``workers:`` list plus
  every ``--worker URL`` flag (CLI workers are appended).
- Worker URLs are checked here (scheme, host, port), so a typo fails at start, not at the first
  request.
"""

from __future__ import annotations

import argparse
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import yaml

from coordinator.compat import (
    CompatError,
    add_compat_flags,
    did_you_mean,
    native_policy,
    native_setting,
    translate,
)
from shm.keys import KeySourceError, client_keys, resolve, upstream_ref
from shm.schema import ClientKey, ModelPolicy, WorkerSpec
from shm.settings import DESCRIPTIONS, POLICY_FIELDS, SETTING_NAMES, Settings

ENV_PREFIX = "SHARDGATE_"
_HINTS = typing.get_type_hints(Settings, include_extras=True)
FILE_SECTIONS = ("workers", "models", "aliases")
WORKER_SCHEMES = {"http": "http", "https": "http", "grpc": "grpc", "grpcs": "grpc"}


class ConfigError(Exception):
    """A configuration problem; ``str()`` is the one line shown to the operator."""

    exit_code = 2


class Config(msgspec.Struct, frozen=True, kw_only=True):
    settings: Settings
    workers: tuple[WorkerSpec, ...] = ()
    models: dict[str, ModelPolicy] = {}
    aliases: dict[str, dict[str, float]] = {}
    config_file: str | None = None
    # Client API keys as digests (shm.keys.client_keys): what the snapshot carries.
    client_keys: tuple[ClientKey, ...] = ()
    # Where a foreign flag was translated approximately (coordinator.compat); shown once at start.
    notes: tuple[str, ...] = ()


def flag_name(setting: str) -> str:
    return "--" + setting.replace("_", "-")


def env_name(setting: str) -> str:
    return ENV_PREFIX + setting.upper()


def setting_kind(name: str) -> tuple[str, tuple[str, ...]]:
    """(metavar, choices) of a setting, from its declared type: the help and the docs show both."""
    hint = _HINTS[name]
    while typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) is typing.Literal:
        choices = tuple(str(c) for c in typing.get_args(hint))
        return ("{" + ",".join(choices) + "}" if len(choices) <= 4 else name.upper()), choices
    return {int: "INT", float: "NUMBER", bool: "BOOL", str: "TEXT"}.get(hint, "VALUE"), ()


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; values stay strings so msgspec does the converting and checking."""
    group = parser.add_argument_group("router settings (also SHARDGATE_<NAME> or the config file)")
    for name in SETTING_NAMES:
        default = getattr(Settings(), name)
        metavar, choices = setting_kind(name)
        valid = f" One of: {', '.join(c for c in choices if c)}." if len(choices) > 4 else ""
        text = f"{DESCRIPTIONS[name]}{valid} (default: {default!r})".replace("%", "%%")  # argparse %-formats
        group.add_argument(flag_name(name), dest=f"setting_{name}", metavar=metavar, default=None,
                           help=text)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.usage = "%(prog)s [--config FILE] [--worker URL ...] [--SETTING VALUE ...] [their flags ...]"
    parser.add_argument("--config", "-c", metavar="FILE", default=os.environ.get(ENV_PREFIX + "CONFIG"),
                        help="YAML deployment file (workers, models, settings).")
    parser.add_argument("--worker", "-w", action="append", default=[], metavar="URL",
                        help="A worker base URL; repeat for more (models are discovered).")
    add_setting_flags(parser)
    add_compat_flags(parser)


def load_config(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Config:
    environ = os.environ if environ is None else environ
    raw = read_file(args.config) if args.config else {}
    file_settings = {k: v for k, v in raw.items() if k not in FILE_SECTIONS}
    env_settings = {n: environ[env_name(n)] for n in SETTING_NAMES if env_name(n) in environ}
    cli_settings = {n: getattr(args, f"setting_{n}") for n in SETTING_NAMES
                    if getattr(args, f"setting_{n}", None) is not None}
    notes: list[str] = []
    try:
        cli_settings, foreign = translate(args, cli_settings, notes)
    except CompatError as exc:
        raise ConfigError(str(exc)) from None
    settings = _settings(file_settings, env_settings, cli_settings, args.config)
    workers = (_workers(raw.get("workers") or [], args.config) + _cli_workers(args.worker)
               + [check_worker(w, f"{w.type} worker {w.url}") for w in foreign])
    models = _models(raw.get("models") or {}, args.config)
    aliases = _aliases(raw.get("aliases") or {}, args.config)
    _check_unique(workers)
    _check_discovery(settings)
    _check_watchdog(settings)
    _check_ops(settings)
    try:
        keys = client_keys(settings.api_key, settings.api_key_file)
    except KeySourceError as exc:
        raise ConfigError(str(exc)) from None
    if len(workers) > settings.max_workers:
        raise ConfigError(f"max_workers: {len(workers)} workers are listed but max_workers is "
                          f"{settings.max_workers}")
    return Config(settings=settings, workers=tuple(workers), models=models, aliases=aliases,
                  config_file=args.config, client_keys=keys, notes=tuple(notes))


def read_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"config file {path}: not valid YAML{where}: "
                          f"{getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of settings")
    return data


def _settings(file: dict[str, Any], env: dict[str, str], cli: dict[str, str], path: str | None) -> Settings:
    """Merge in precedence order; name the source of a bad value."""
    for source, values, strict in ((f"config file {path}", file, True),
                                   ("environment", env, False), ("command line", cli, False)):
        for key in values:
            if key not in SETTING_NAMES:
                raise ConfigError(f"{source}: unknown setting '{key}'"
                                  f"{did_you_mean(key, SETTING_NAMES + FILE_SECTIONS)}")
            try:
                values[key] = native_setting(key, values[key], _field_name(key, _label(source)))
            except CompatError as exc:
                raise ConfigError(f"{source}: {exc}") from None
        try:
            msgspec.convert(values, Settings, strict=strict)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{source}: {_field_message(exc, _label(source))}") from None
    merged = {**file, **env, **cli}
    return msgspec.convert(merged, Settings, strict=False)


def _field_name(field: str, style: str) -> str:
    return {"env": env_name(field), "flag": flag_name(field)}.get(style, field)


def _label(source: str) -> str:
    return {"environment": "env", "command line": "flag"}.get(source, "file")


def _field_message(exc: msgspec.ValidationError, style: str) -> str:
    """Rewrite msgspec's '... - at `$.port`' so it names the field the way the user wrote it."""
    text = str(exc)
    if " - at `$." not in text:
        return text
    reason, _, where = text.rpartition(" - at `$.")
    field = where.rstrip("`")
    name = {"env": env_name(field.split(".")[0].split("[")[0]), "flag": flag_name(field)}.get(style, field)
    return f"{name}: {reason}"


def _convert(value: Any, kind: Any, field: str, path: str | None) -> Any:
    """Convert one file section; the error names its location even when msgspec's is the root."""
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        reason, sep, where = str(exc).rpartition(" - at `$")
        if not sep:  # msgspec leaves the location out when the problem is at the root
            reason, where = str(exc), ""
        raise ConfigError(f"config file {path}: {field}{where.rstrip('`')}: {reason}") from None


def _models(entries: Any, path: str | None) -> dict[str, ModelPolicy]:
    """Per-model sections, converted one by one so an error names the model."""
    if not isinstance(entries, dict):
        raise ConfigError(f"config file {path}: 'models' must be a mapping of model name to settings")
    out = {}
    for name, entry in entries.items():
        if not isinstance(name, str):
            raise ConfigError(f"config file {path}: models: model name {name!r} must be a string")
        if isinstance(entry, dict):
            entry = dict(entry)
            for key in POLICY_FIELDS:
                if key in entry:
                    try:
                        entry[key] = native_policy(entry[key], f"models.{name}.{key}")
                    except CompatError as exc:
                        raise ConfigError(f"config file {path}: {exc}") from None
        out[name] = _convert(entry, ModelPolicy, f"models.{name}", path)
    return out


def _workers(entries: Sequence[Any], path: str | None) -> list[WorkerSpec]:
    if not isinstance(entries, list):
        raise ConfigError(f"config file {path}: 'workers' must be a list")
    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, dict) and "api_key" in entry:
            # A key written in the file would be a secret in a file that is shared and versioned.
            raise ConfigError(f"config file {path}: workers[{i}].api_key: a worker's key is not written "
                              "in the config file; name it with api_key_env: VARIABLE or "
                              "api_key_file: PATH (docs/api-keys.md)")
        spec = _convert(entry, WorkerSpec, f"workers[{i}]", path)
        out.append(check_worker(spec, f"config file {path}: workers[{i}]", upstream_keys=True))
    return out


def _cli_workers(urls: Sequence[str]) -> list[WorkerSpec]:
    return [check_worker(WorkerSpec(url=url), f"--worker {url}") for url in urls]


def check_worker(spec: WorkerSpec, where: str, upstream_keys: bool = False) -> WorkerSpec:
    """Validate a worker's URL and fields; returns the spec with its URL normalised.

    ``upstream_keys``: whether the entry may name an upstream key (``api_key_env``,
    ``api_key_file``). Only the operator's own sources (config file, command line) may: a worker
    that registers itself could otherwise have any secret of the router's environment, or any
    file it can read, sent to its URL.
    """
    parts = urlsplit(spec.url)
    if parts.scheme not in WORKER_SCHEMES:
        raise ConfigError(f"{where}: url '{spec.url}' must start with http://, https:// or grpc://")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{where}: url '{spec.url}' has an invalid port") from None
    if not parts.hostname:
        raise ConfigError(f"{where}: url '{spec.url}' has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{where}: url '{spec.url}' must be a base URL (no path or query)")
    if spec.weight < 1:
        raise ConfigError(f"{where}: weight must be >= 1, got {spec.weight}")
    if spec.max_concurrency < 0:
        raise ConfigError(f"{where}: max_concurrency must be >= 0 (0: no cap), got {spec.max_concurrency}")
    if spec.api_key_env or spec.api_key_file:
        if not upstream_keys:
            raise ConfigError(f"{where}: api_key_env and api_key_file may only be set in the config file")
        try:
            resolve(upstream_ref(spec.api_key_env, spec.api_key_file))  # proxies resolve it again
        except KeySourceError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if WORKER_SCHEMES[parts.scheme] != spec.connection and parts.scheme.startswith("grpc"):
        spec = msgspec.structs.replace(spec, connection="grpc")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = f"{host}:{port}" if port else host
    return msgspec.structs.replace(spec, url=f"{parts.scheme}://{netloc}")


def _aliases(raw: Any, path: str | None) -> dict[str, dict[str, float]]:
    """``alias: {model: weight, ...}``; weights are positive and need not sum to 1."""
    aliases = _convert(raw, dict[str, dict[str, float]], "aliases", path)
    for alias, targets in aliases.items():
        if not targets:
            raise ConfigError(f"config file {path}: aliases.{alias}: needs at least one target model")
        for model, weight in targets.items():
            if weight <= 0:
                raise ConfigError(f"config file {path}: aliases.{alias}.{model}: weight must be > 0, "
                                  f"got {weight}")
    return aliases


def _check_discovery(settings: Settings) -> None:
    """Discovery settings that can be wrong in shape fail here, at start or on reload."""
    from coordinator.discovery.urlcheck import parse_cidrs

    try:
        parse_cidrs(settings.worker_cidrs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    urls = [("registry_url", settings.registry_url)] if settings.registry_url else []
    urls += [("etcd_endpoints", e.strip()) for e in settings.etcd_endpoints.split(",") if e.strip()]
    for name, url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{name}: '{url}' must be an http:// or https:// URL")


# Proxies rewrite their heartbeat every 0.25 s (proxy_workers.serving.process.SWEEP_SECONDS); a
# shorter timeout would kill healthy proxies between two sweeps.
WATCHDOG_MIN = 1.0


def _check_watchdog(settings: Settings) -> None:
    timeout = settings.watchdog_timeout
    if 0 < timeout < WATCHDOG_MIN:
        raise ConfigError(f"watchdog_timeout: must be 0 (off) or at least {WATCHDOG_MIN:g} seconds "
                          f"(proxies write a heartbeat every 0.25 s), got {timeout:g}")


def _check_ops(settings: Settings) -> None:
    """The ops listener needs a port of its own: in the data port's SO_REUSEPORT group it would
    take a share of the clients' connections."""
    port = settings.ops_port
    if not port:
        return
    if port == settings.port:
        raise ConfigError(f"ops_port: must differ from port ({port})")
    if port == settings.admin_port:
        raise ConfigError(f"ops_port: must differ from admin_port ({port})")


def _check_unique(workers: Sequence[WorkerSpec]) -> None:
    seen: dict[tuple[str, str | None, str], int] = {}
    for i, w in enumerate(workers):
        key = (w.url, w.model, w.type)
        if key in seen:
            raise ConfigError(f"worker {w.url} (model {w.model}, type {w.type}) is listed twice")
        seen[key] = i
