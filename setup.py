"""Build: the project's metadata is in pyproject.toml; this adds the compiled request path.

The modules listed in proxy_workers/compiled.py are compiled with mypyc (docs/compiled-hot-path.md),
and the policies' C helpers (proxy_workers/policies/_boardscan.c, _affinity.c) with the C compiler,
unless SHARDGATE_PURE=1 is set. A build that cannot compile them (no C compiler, a mypyc error)
installs the same sources interpreted, with a warning: compiling is an optimisation, not a
requirement.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def _compiled_module() -> object:
    path = HERE / "proxy_workers" / "compiled.py"
    spec = importlib.util.spec_from_file_location("_shardgate_compiled", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class OptionalBuildExt(build_ext):
    """Compiling is optional: a failure removes whatever was built and leaves the sources, which
    run interpreted (a partial build would fail to import: the modules share one library)."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # any build failure falls back to the sources
            print(f"shardgate: compiling the request path failed ({exc}); installing it interpreted",
                  file=sys.stderr)
            self._remove_outputs()

    def _remove_outputs(self) -> None:
        for ext in self.extensions:
            for inplace in (0, 1):
                self.inplace = inplace
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
        (HERE / "proxy_workers" / _compiled_module().STAMP_NAME).unlink(missing_ok=True)


def _native() -> list:
    """The policies' C helpers (proxy_workers/policies/native.py), one extension per source listed
    in compiled.C_SOURCES; their Python twins run wherever these are not built."""
    return [Extension(path[:-2].replace("/", "."), [path], extra_compile_args=["-O3"])
            for path in _compiled_module().C_SOURCES]


def _ext_modules() -> list:
    if os.environ.get("SHARDGATE_PURE") == "1":
        return []
    return [*_native(), *_request_path()]


def _request_path() -> list:
    compiled = _compiled_module()
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("shardgate: mypyc is not available; installing the request path interpreted", file=sys.stderr)
        return []
    paths = [str(compiled.source_path(m, HERE).relative_to(HERE)) for m in compiled.MODULES]
    try:
        # A dependency the build environment lacks reads as Any (unchecked). The ones whose types
        # the compiled code relies on (msgspec, httptools) are build requirements (pyproject.toml),
        # so what compiled code checks does not depend on the environment.
        flags = ["--ignore-missing-imports"]
        modules = mypycify([*flags, *paths], opt_level="3", group_name="shardgate_compiled")
    except BaseException as exc:  # mypyc reports type errors with SystemExit
        print(f"shardgate: mypyc could not compile the request path ({exc}); installing it interpreted",
              file=sys.stderr)
        return []
    (HERE / "proxy_workers" / compiled.STAMP_NAME).write_text(compiled.sources_digest(HERE) + "\n")
    return modules


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
