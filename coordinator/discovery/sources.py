"""Discovery sources and how their memberships merge into one fleet.

Role: the vocabulary shared by every discovery source (config file, service registry, etcd, admin
API): a :class:`Source` holds its last good membership and its current error, and :func:`merge`
turns all of them plus the admin API's :class:`Overrides` into the one list of WorkerSpecs the
coordinator applies (:meth:`coordinator.fleet.membership.Fleet.apply`).

Precedence (documented in docs/discovery.md):
- Sources are unioned. A worker (URL, model, type) listed by several sources is taken from the
  first of: admin API, config file, etcd, registry; each source is its own layer, so re-reading
  the file (SIGHUP or a change on disk) never drops what the admin API or etcd added.
- The admin API's removals and finished drains exclude a worker whatever source lists it, until
  the admin API adds it again; its weight and shard changes patch the merged spec.

Invariants:
- A source that fails (down, slow, garbage) keeps its last good membership; only its error
  changes. A source's membership changes only on a good answer, so an outage never empties it.
- Entries that arrive over the network are validated like admin additions
  (:mod:`coordinator.discovery.urlcheck`); a bad entry is left out with a notice, the rest still apply.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from coordinator.config import ConfigError, check_worker
from coordinator.discovery.urlcheck import UrlChecker, shape_problem
from coordinator.fleet.membership import Key, spec_key
from shm.schema import WorkerSpec

# Merge order: earlier wins for a worker several sources list.
PRECEDENCE = ("admin", "file", "etcd", "registry")
SPEC_FIELDS = frozenset(WorkerSpec.__struct_fields__)


class Source:
    """One source's last good membership and health."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.specs: dict[Key, WorkerSpec] = {}
        self.error = ""
        self.error_since = 0.0
        self.entry_problems: list[str] = []  # entries left out of the last good answer
        self.ok_at = 0.0

    def succeeded(self, specs: Mapping[Key, WorkerSpec], problems: Iterable[str] = ()) -> bool:
        """Record a good answer; True when the membership or the list of refused entries changed."""
        self.error, self.error_since, self.ok_at = "", 0.0, time.time()
        problems = list(problems)
        changed = problems != self.entry_problems or dict(specs) != self.specs
        self.entry_problems = problems
        self.specs = dict(specs)
        return changed

    def failed(self, why: str) -> bool:
        """Record a failure, keeping the membership; True when the error text changed."""
        if not self.error_since:
            self.error_since = time.time()
        changed = why != self.error
        self.error = why
        return changed

    def status(self) -> str:
        """The source's error for the snapshot's ``sources`` map ("" when fine)."""
        if self.error:
            return self.error
        if self.entry_problems:
            return f"{len(self.entry_problems)} entr{'y' if len(self.entry_problems) == 1 else 'ies'} " \
                   f"left out: {self.entry_problems[0]}"
        return ""

    def notices(self) -> list[str]:
        out = []
        if self.error:
            since = time.strftime("%H:%M:%S", time.localtime(self.error_since))
            out.append(f"{self.name}: {self.error} (since {since}); keeping its last "
                       f"{len(self.specs)} worker(s)")
        out += [f"{self.name}: left out: {p}" for p in self.entry_problems[:10]]
        if len(self.entry_problems) > 10:
            out.append(f"{self.name}: ... and {len(self.entry_problems) - 10} more entries left out")
        return out


class Overrides:
    """The admin API's layer: additions, exclusions and per-worker patches.

    (Drains are :class:`coordinator.discovery.drains.Drains`; a finished one ends here as a removal.)
    """

    def __init__(self) -> None:
        self.source = Source("admin")  # additions, merged like any source
        self.excluded: set[Key] = set()
        self.patches: dict[Key, dict[str, Any]] = {}

    def add(self, spec: WorkerSpec) -> None:
        key = spec_key(spec)
        self.excluded.discard(key)
        self.patches.pop(key, None)
        specs = dict(self.source.specs)
        specs[key] = spec
        self.source.succeeded(specs)

    def remove(self, key: Key) -> None:
        """Out of the fleet whichever source lists it, until added again."""
        specs = dict(self.source.specs)
        specs.pop(key, None)
        self.source.succeeded(specs)
        self.excluded.add(key)
        self.patches.pop(key, None)

    def patch(self, key: Key, **fields: Any) -> None:
        self.patches.setdefault(key, {}).update(fields)

    def forget(self, present: Iterable[Key]) -> None:
        """Drop the patches of workers no source lists any more."""
        keep = set(present)
        for key in [k for k in self.patches if k not in keep]:
            del self.patches[key]


def merge(sources: Iterable[Source], overrides: Overrides) -> tuple[list[WorkerSpec], dict[Key, str]]:
    """(the fleet's specs, key -> name of the source it came from)."""
    ordered = sorted([overrides.source, *sources], key=lambda s: PRECEDENCE.index(s.name)
                     if s.name in PRECEDENCE else len(PRECEDENCE))
    out: dict[Key, WorkerSpec] = {}
    origin: dict[Key, str] = {}
    for source in ordered:
        for key, spec in source.specs.items():
            if key not in out and key not in overrides.excluded:
                out[key] = spec
                origin[key] = source.name
    for key, fields in overrides.patches.items():
        if key in out:
            out[key] = msgspec.structs.replace(out[key], **fields)
    return list(out.values()), origin


def spec_from_entry(entry: Any, strict: bool) -> WorkerSpec:
    """A WorkerSpec from a registry entry or an etcd value; raises ValueError with the reason.

    ``strict`` (etcd, our own format) refuses unknown fields so a typo shows up. Otherwise (the
    seed registry's entries) ``host``/``port`` stand for ``url``, a one-element ``models`` list for
    ``model``, ``metadata`` for ``labels``, and other fields (name, babysitter_url, ...) are ignored.
    """
    if not isinstance(entry, dict):
        raise ValueError(f"expected a JSON object, got {type(entry).__name__}")
    fields = dict(entry)
    if not strict:
        if "url" not in fields and "host" in fields and "port" in fields:
            fields["url"] = f"http://{fields['host']}:{fields['port']}"
        models = fields.get("models")
        if "model" not in fields and isinstance(models, list) and len(models) == 1:
            fields["model"] = models[0]
        if "labels" not in fields and isinstance(fields.get("metadata"), dict):
            fields["labels"] = {str(k): str(v) for k, v in fields["metadata"].items()
                                if isinstance(v, str | int | float | bool)}
        fields = {k: v for k, v in fields.items() if k in SPEC_FIELDS}
    if isinstance(fields.get("url"), str):
        problem, _ = shape_problem(fields["url"])  # on the raw URL: normalising drops credentials
        if problem:
            raise ValueError(problem)
    try:
        spec = msgspec.convert(fields, WorkerSpec)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from None
    try:
        return check_worker(spec, "worker")
    except ConfigError as exc:
        raise ValueError(str(exc).removeprefix("worker: ")) from None


async def validated(entries: Iterable[tuple[str, Any]], checker: UrlChecker,
                    strict: bool) -> tuple[dict[Key, WorkerSpec], list[str]]:
    """Convert and SSRF-check named entries; (good specs, problems of the bad ones)."""
    specs: dict[Key, WorkerSpec] = {}
    problems: list[str] = []
    for name, entry in entries:
        try:
            spec = spec_from_entry(entry, strict)
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
            continue
        why = await checker.check_url(spec.url)
        if why:
            problems.append(f"{name}: {why}")
            continue
        key = spec_key(spec)
        if key in specs:
            problems.append(f"{name}: {spec.url} is listed twice")
            continue
        specs[key] = spec
    return specs, problems
