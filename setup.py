"""Only the compiled parts live here; every other setting is in pyproject.toml.

- gateway/_heads.c: the data plane's plain-head check (gateway/heads.py explains why it is in C
  and falls back to Python when it is not built).
- gateway/proxy.py, gateway/upstream.py and gateway/instance.py, the per-request relay and the
  instance bookkeeping it calls, compiled by mypyc: the same source, type-checked and turned
  into C, with their classes as native types (fields in a C struct, methods called directly).
  docs/architecture.md "Hot-path performance" has what it saves. The .py files stay as they
  are: without mypyc (or with DORM_NO_MYPYC=1) they are not compiled and the same code runs
  interpreted.
"""

import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

COMPILED = ["gateway/proxy.py", "gateway/upstream.py", "gateway/instance.py"]


def compiled_modules() -> list[Extension]:
    if os.environ.get("DORM_NO_MYPYC") == "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:  # the build-system requirement is missing: build without
        return []
    # One shared library per module (separate=True): the default groups the modules around a
    # top-level helper library, which an editable install does not put on sys.path.
    return mypycify(COMPILED, opt_level="3", separate=True)


class BuildExt(build_ext):
    """build_ext that marks every compiled module as built now, even when its C was unchanged
    and not rebuilt (gateway/compiled.py tells a stale build from the source's mtime), and, in
    place, removes builds of gateway modules no longer compiled: left there, Python would
    import them instead of their source."""

    def run(self) -> None:
        super().run()
        built = set()
        for ext in self.extensions:
            out = Path(self.get_ext_fullpath(ext.name))
            if out.exists():
                out.touch()
                built.add(out.resolve())
        if self.inplace:
            for old in Path("gateway").glob("*.so"):
                if old.resolve() not in built:
                    old.unlink()


setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=[
        Extension("gateway._heads", ["gateway/_heads.c"], extra_compile_args=["-O2"]),
        *compiled_modules(),
    ],
)
