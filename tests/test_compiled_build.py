"""The compiled request path (proxy_workers.compiled): used only when it matches its sources.

Each case runs a fresh interpreter, as a proxy process starts, on a copy of the package: the
guard acts once, when ``proxy_workers`` is first imported.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import proxy_workers
from proxy_workers import compiled
from proxy_workers.policies import scan

ROOT = Path(__file__).resolve().parent.parent
PROBE = (
    "import json, sys, warnings\n"
    "warnings.simplefilter('always')\n"
    "with warnings.catch_warnings(record=True) as caught:\n"
    "    import proxy_workers\n"
    "import proxy_workers.http.exchange as exchange\n"
    "print(json.dumps({'build': proxy_workers.BUILD, 'file': exchange.__file__,\n"
    "                  'warnings': [str(w.message) for w in caught]}))\n"
)

needs_compiled = pytest.mark.skipif(not compiled.compiled_files(),
                                    reason="this install is pure Python (no compiled modules)")


def probe(root: Path, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != compiled.PURE_ENV}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=root, env={**environ, **env,
                         "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def copy_tree(tmp_path: Path) -> Path:
    """The package, its compiled modules and their shared library, in a directory of its own."""
    root = tmp_path / "tree"
    shutil.copytree(ROOT / "proxy_workers", root / "proxy_workers",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "shm", root / "shm", ignore=shutil.ignore_patterns("__pycache__"))
    for lib in ROOT.glob("shardgate_compiled__mypyc*"):
        shutil.copy2(lib, root)
    return root


def test_ci_runs_the_compiled_build() -> None:
    """CI installs the project as a user does (pip install -e .): the request path must come out
    compiled there, or CI would test something other than what ships."""
    if os.environ.get("SHARDGATE_EXPECT_COMPILED") != "1":
        pytest.skip("only where the install is expected to compile (.ci/run sets SHARDGATE_EXPECT_COMPILED)")
    assert proxy_workers.BUILD == "compiled"
    assert len(compiled.compiled_files()) == len(compiled.MODULES)
    assert scan.C_FIGURE is not None  # the policies' C scan is built with them


@pytest.mark.skipif(proxy_workers.BUILD != "compiled", reason="this install does not run compiled")
def test_a_matching_build_runs_compiled(tmp_path: Path) -> None:
    seen = probe(copy_tree(tmp_path))
    assert seen["build"] == "compiled"
    assert not seen["file"].endswith(".py")
    assert seen["warnings"] == []


@needs_compiled
def test_an_edited_source_runs_interpreted_with_a_warning(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    source = root / "proxy_workers" / "serving" / "records.py"
    source.write_text(source.read_text() + "\n# edited after the build\n")
    seen = probe(root)
    assert seen["build"] == "stale"
    assert seen["file"].endswith("exchange.py")  # every compiled module, not only the edited one
    assert any("older than its sources" in w for w in seen["warnings"])


@needs_compiled
def test_pure_switch_runs_the_sources(tmp_path: Path) -> None:
    seen = probe(copy_tree(tmp_path), **{compiled.PURE_ENV: "1"})
    assert seen["build"] == "pure"
    assert seen["file"].endswith("exchange.py")
    assert seen["warnings"] == []


def test_a_build_without_a_stamp_is_not_trusted(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "proxy_workers").mkdir(parents=True)
    for module in compiled.MODULES:
        path = compiled.source_path(module, root)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        path.with_suffix(importlib.machinery.EXTENSION_SUFFIXES[0]).write_bytes(b"")
    for c_source in compiled.C_SOURCES:
        (root / c_source).write_text("")
    assert compiled.state(root, {}) == "stale"
    (root / "proxy_workers" / compiled.STAMP_NAME).write_text(compiled.sources_digest(root))
    assert compiled.state(root, {}) == "compiled"
    assert compiled.state(root, {compiled.PURE_ENV: "1"}) == "pure"
