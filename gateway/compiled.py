"""Which modules of the data plane run compiled by mypyc (setup.py), and which builds are stale.

An editable install (`pip install -e .`, what `make` does) builds the compiled modules next to
their source, and Python imports the compiled one first: an edit to gateway/proxy.py has no
effect until the next build. `make` rebuilds when the source changes; the test suite refuses to
run against a stale build (tests/conftest.py) rather than test code that is not the source.

`DORM_INTERPRETED=1` runs the same modules from their source instead (gateway/__init__.py installs
`SourceFirst` before anything else is imported): a way to tell a compiler problem from a bug,
and how the tests check that the uncompiled code still works (tests/test_compiled.py).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import EXTENSION_SUFFIXES, ModuleSpec, PathFinder, SourceFileLoader
from pathlib import Path
from types import ModuleType

MODULES = ("gateway.proxy", "gateway.upstream", "gateway.instance")
_COMPILED_STEMS = frozenset(name.rpartition(".")[2] for name in MODULES)
PACKAGE = Path(__file__).parent
INTERPRETED_ENV = "DORM_INTERPRETED"


class SourceFirst(MetaPathFinder):
    """Finds the compiled modules' .py source, so the extension beside it is never loaded."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in MODULES:
            return None
        spec = PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.origin is None:
            return None
        source = Path(spec.origin).with_name(fullname.rpartition(".")[2] + ".py")
        if not source.exists():
            return None
        loader = SourceFileLoader(fullname, str(source))
        return importlib.util.spec_from_file_location(fullname, source, loader=loader)


def install_source_first() -> None:
    """Called by gateway/__init__.py when DORM_INTERPRETED=1."""
    if not any(isinstance(f, SourceFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, SourceFirst())


def _origin(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.origin) if spec is not None and spec.origin else None


def is_compiled(name: str) -> bool:
    """Whether importing `name` loads an extension module (without importing it)."""
    origin = _origin(name)
    return origin is not None and any(origin.name.endswith(s) for s in EXTENSION_SUFFIXES)


def stale(package: Path = PACKAGE) -> list[str]:
    """Builds in `package` (gateway/) that are older than their module's .py, or that build a
    module no longer compiled (left by an older checkout): either would shadow the source."""
    found = []
    for built in sorted(package.iterdir()):
        if not built.name.endswith(tuple(EXTENSION_SUFFIXES)):
            continue
        stem = built.name.split(".", 1)[0].removesuffix("__mypyc")
        source = package / f"{stem}.py"
        if stem not in _COMPILED_STEMS and stem != "_heads":
            found.append(f"{built.name} (a build of a module no longer compiled: remove it)")
        elif source.exists() and source.stat().st_mtime > built.stat().st_mtime:
            found.append(f"{built.name} is older than {source.name}")
    return found


def describe() -> str:
    """One line for logs and benchmark records."""
    compiled = [name for name in MODULES if is_compiled(name)]
    if not compiled:
        forced = os.environ.get(INTERPRETED_ENV) == "1"
        return "relay interpreted" + (f" ({INTERPRETED_ENV}=1)" if forced else " (not compiled)")
    return f"relay compiled by mypyc ({', '.join(compiled)})"
