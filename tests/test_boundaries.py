"""Import boundaries between the three parts of shardgate.

The proxies (``proxy_workers``) and the coordinator (``coordinator``) share only the contract in
``shm``: a proxy never loads coordinator code (a fresh interpreter per proxy stays small and cannot
call into the control plane), the coordinator never loads proxy code, and ``shm`` depends on
neither. Each check runs in a fresh interpreter and inspects ``sys.modules`` after importing every
module of one package.
"""

from __future__ import annotations

import ast
import importlib.machinery
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("proxy_workers", "coordinator", "shm")
FORBIDDEN = {
    "proxy_workers": ("coordinator",),
    "coordinator": ("proxy_workers",),
    "shm": ("coordinator", "proxy_workers"),
}

PROBE = """
import importlib, json, pkgutil, sys
package = sys.argv[1]
names = [package] + sorted(
    m.name for m in pkgutil.walk_packages(importlib.import_module(package).__path__, package + ".")
    if not m.name.endswith(".__main__")  # running the entry point is not importing it
)
for name in names:
    importlib.import_module(name)
print(json.dumps({"imported": names, "loaded": sorted(sys.modules)}))
"""


def modules_of(package: str, extensions: bool = True) -> list[str]:
    """Every module of ``package``, subpackages included (walked on disk, not imported); with
    ``extensions``, also the C extension modules built without a ``.py`` of their own."""
    found = set()
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__main__" or (parts[-1] == "__init__" and len(parts) == 2):
            continue
        found.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES if extensions else ():
        for path in (ROOT / package).rglob("*" + suffix):
            found.add(".".join((*path.relative_to(ROOT).parts[:-1], path.name.split(".")[0])))
    return sorted(found)


def loaded_after_importing(package: str) -> tuple[list[str], list[str]]:
    result = subprocess.run([sys.executable, "-c", PROBE, package], capture_output=True, text=True,
                            timeout=60, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    return doc["imported"], doc["loaded"]


@pytest.mark.parametrize("package", PACKAGES)
def test_package_does_not_load_the_other_side(package: str) -> None:
    imported, loaded = loaded_after_importing(package)
    assert imported == [package, *modules_of(package)]
    assert len(imported) > 1, f"no module found in {package}"
    for other in FORBIDDEN[package]:
        leaked = [m for m in loaded if m == other or m.startswith(other + ".")]
        assert not leaked, f"importing {package} loaded {leaked}"


def test_shm_loads_no_shardgate_cli_either() -> None:
    _, loaded = loaded_after_importing("shm")
    assert not [m for m in loaded if m == "shardgate" or m.startswith("shardgate.")]


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> modules of ``package`` it imports, read from the source (type-only imports and
    imports inside functions included: a cycle through them still ties the modules together)."""
    names = modules_of(package, extensions=False)
    modules = {name: ROOT / (name.replace(".", "/") + ".py") for name in names}
    for name in list(modules):
        if not modules[name].exists():  # a subpackage: its __init__
            modules[name] = ROOT / name.replace(".", "/") / "__init__.py"
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    target = full if full in modules else node.module
                    if target in modules and target != name:
                        graph[name].add(target)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in modules and a.name != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_not_even_a_type_only_one(package: str) -> None:
    assert cycles(import_graph(package)) == []


def test_the_contract_imports_nothing_of_the_proxy_package() -> None:
    assert import_graph("proxy_workers")["proxy_workers.contract"] == set()


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
