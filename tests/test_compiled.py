"""The relay's compiled build (setup.py, gateway/compiled.py): compiled wherever mypyc is
installed, so the suite tests what runs, and the same source still right when interpreted."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

from gateway import compiled
from tests.conftest import ROOT


def test_the_relay_is_compiled_where_mypyc_is_installed() -> None:
    if os.environ.get(compiled.INTERPRETED_ENV) == "1":
        pytest.skip(f"{compiled.INTERPRETED_ENV}=1: this run tests the interpreted relay")
    if importlib.util.find_spec("mypyc") is None:
        pytest.skip("mypyc is not installed here: the relay runs interpreted")
    import gateway.instance
    import gateway.proxy
    import gateway.upstream

    for module in (gateway.proxy, gateway.upstream, gateway.instance):
        assert module.__file__ is not None
        assert module.__file__.endswith(tuple(EXTENSION_SUFFIXES)), compiled.describe()
    assert compiled.describe().startswith("relay compiled by mypyc")
    assert compiled.stale() == []


def test_interpreted_relay_passes_the_data_plane_tests(tmp_path: object) -> None:
    """DORM_INTERPRETED=1 loads the .py source even beside a build, and the data plane's
    protocol-level tests pass on it (the rest of the suite runs the compiled build)."""
    env = {**os.environ, compiled.INTERPRETED_ENV: "1"}
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import gateway.proxy as p; from gateway import compiled; "
            "print(p.__file__); print(compiled.describe())",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    path, described = probe.stdout.splitlines()
    assert path.endswith("gateway/proxy.py")
    assert described == "relay interpreted (DORM_INTERPRETED=1)"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path}",
            "tests/test_fastpath.py",
            "tests/test_desync.py",
            "tests/test_static.py",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1]


def test_compiled_modules_hold_no_coroutines() -> None:
    """Only synchronous code is compiled (docs/architecture.md, "The compiled relay"): compiled
    code trusts mypy's narrowing of an attribute across an `await`, where another task may have
    changed it, and raises TypeError where the interpreter would go on."""
    import ast

    for name in compiled.MODULES:
        path = ROOT / (name.replace(".", "/") + ".py")
        tree = ast.parse(path.read_text(), str(path))
        found = [
            f"{path.name}:{node.lineno}"
            for node in ast.walk(tree)
            if isinstance(node, ast.AsyncFunctionDef | ast.Await | ast.AsyncFor | ast.AsyncWith)
        ]
        assert found == [], f"coroutine code in a compiled module: {found}"


def test_stale_and_orphan_builds_are_reported(tmp_path: Path) -> None:
    """What tests/conftest.py refuses to run against: a build older than its source, and the
    build of a module no longer compiled; fresh builds and the C head check are fine."""
    suffix = EXTENSION_SUFFIXES[0]
    for name, age in [
        ("proxy.py", 0),
        (f"proxy{suffix}", 60),  # built a minute before the source changed
        (f"proxy__mypyc{suffix}", 60),
        ("upstream.py", 60),
        (f"upstream{suffix}", 0),
        (f"instances{suffix}", 0),  # compiled by an older version
        (f"_heads{suffix}", 0),
        ("notes.txt", 0),
    ]:
        path = tmp_path / name
        path.write_bytes(b"")
        os.utime(path, (time.time() - age, time.time() - age))
    assert compiled.stale(tmp_path) == [
        f"instances{suffix} (a build of a module no longer compiled: remove it)",
        f"proxy{suffix} is older than proxy.py",
        f"proxy__mypyc{suffix} is older than proxy.py",
    ]
