"""The compiled request path: which modules mypyc compiles, and the guard that keeps them honest.

Role: :data:`MODULES` names the modules of the per-request path that an install compiles with
mypyc (``setup.py`` reads this file; docs/compiled-hot-path.md says why and what it buys). The
same source runs interpreted, so an install without a C compiler, or with ``SHARDGATE_PURE=1``
set when it is built, is a pure-Python one that behaves the same.

Invariants:
- Compiled modules call each other natively, so they are used all together or not at all: the
  build writes a digest of their sources (:data:`STAMP_NAME`), and :func:`guard` (run on importing
  the ``proxy_workers`` package, before any of them loads) falls back to the sources of *all*
  of them when any source differs from the build's. An edit in a checkout installed with
  ``pip install -e .`` therefore takes effect at once (interpreted, with one warning) instead of
  being shadowed by a stale ``.so``; reinstalling compiles it again.
- ``SHARDGATE_PURE=1`` in the environment when a process starts runs the sources too (to
  compare, or to profile with cProfile, which sees no compiled functions).
- Stdlib only: ``setup.py`` loads this file by path, before the project's dependencies exist.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mypy_extensions import mypyc_attr
else:
    def mypyc_attr(*names: str, **flags: Any) -> Any:
        """``mypy_extensions.mypyc_attr`` for mypyc, which reads it from the source; at run time
        a no-op (mypy_extensions is a build requirement, not a dependency)."""
        return lambda cls: cls

ROOT = Path(__file__).resolve().parent.parent  # the directory holding the proxy_workers package
STAMP_NAME = "_compiled.stamp"  # in this package: the digest of the sources it was built from
PURE_ENV = "SHARDGATE_PURE"

# Every module a proxied request runs through, and only those (compiling costs build time, and a
# compiled class cannot be subclassed or patched from Python).
MODULES: tuple[str, ...] = (
    "proxy_workers.outbox",
    "proxy_workers.process_view",
    "proxy_workers.forwarding.attempts",
    "proxy_workers.forwarding.chunks",
    "proxy_workers.forwarding.headers",
    "proxy_workers.forwarding.request",
    "proxy_workers.forwarding.usage",
    "proxy_workers.http.exchange",
    "proxy_workers.http.pools",
    "proxy_workers.http.recovery",
    "proxy_workers.http.upstream",
    "proxy_workers.routing.decision",
    "proxy_workers.routing.table",
    "proxy_workers.serving.flow",
    "proxy_workers.serving.ops",  # subclasses ClientProtocol: a compiled class's subclasses are compiled
    "proxy_workers.serving.protocol",
    "proxy_workers.serving.reading",
    "proxy_workers.serving.records",
    "proxy_workers.serving.state",
    "proxy_workers.routing.context",
    "proxy_workers.policies.base",
    "proxy_workers.policies.affinity",
    "proxy_workers.policies.hashing",
    "proxy_workers.policies.load",
    "proxy_workers.policies.quota",
    "proxy_workers.policies.registry",
    "proxy_workers.policies.native",
    "proxy_workers.policies.scan",
)


# C sources built with them (setup.py), used exactly when they run compiled: part of the digest.
C_SOURCES: tuple[str, ...] = ("proxy_workers/policies/_boardscan.c", "proxy_workers/policies/_affinity.c")


def source_path(module: str, root: Path = ROOT) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def sources_digest(root: Path = ROOT) -> str:
    """One digest of the compiled modules' sources (their bytes, in :data:`MODULES` order), then
    of :data:`C_SOURCES`."""
    digest = hashlib.sha256()
    for module in MODULES:
        digest.update(module.encode() + b"\0" + source_path(module, root).read_bytes() + b"\0")
    for path in C_SOURCES:
        digest.update(path.encode() + b"\0" + root.joinpath(path).read_bytes() + b"\0")
    return digest.hexdigest()


def compiled_files(root: Path = ROOT) -> list[Path]:
    """The extension modules present for the compiled modules (none in a pure install)."""
    found = []
    for module in MODULES:
        source = source_path(module, root)
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            candidate = source.with_suffix(suffix)
            if candidate.exists():
                found.append(candidate)
    return found


def state(root: Path = ROOT, environ: Mapping[str, str] = os.environ, compiled: bool | None = None) -> str:
    """"compiled", "pure" (no compiled modules, or ``SHARDGATE_PURE=1``) or "stale" (compiled,
    but a source changed since the build: the sources run). ``compiled``: whether extension
    modules are present, when the caller already looked (:func:`compiled_files`)."""
    if compiled is None:
        compiled = bool(compiled_files(root))
    if not compiled or environ.get(PURE_ENV) == "1":
        return "pure"
    try:
        built = (root / "proxy_workers" / STAMP_NAME).read_text().strip()
    except OSError:
        return "stale"
    return "compiled" if built == sources_digest(root) else "stale"


class _SourcesFirst(importlib.abc.MetaPathFinder):
    """Loads the compiled modules from their ``.py`` files, ahead of the extension modules."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, source_path(fullname, self.root))


def guard() -> str:
    """Run once, on importing ``proxy_workers``; returns :func:`state`'s answer."""
    present = bool(compiled_files())
    current = state(compiled=present)
    if current != "compiled" and present:
        if not any(isinstance(f, _SourcesFirst) for f in sys.meta_path):
            sys.meta_path.insert(0, _SourcesFirst(ROOT))
        if current == "stale":
            warnings.warn("shardgate: the compiled request path is older than its sources; running "
                          "the sources (reinstall to compile them: pip install -e .)", stacklevel=2)
    return current
