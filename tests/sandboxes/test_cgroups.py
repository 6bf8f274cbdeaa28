"""Cgroup backends against the real kernel: v1 for real here, v2 where its controllers exist.

The v2 *core* (create, join, cgroup.kill, remove) needs no controller, so it is exercised on any
mounted cgroup2 hierarchy (here the empty one at /sys/fs/cgroup/unified); limit tests need the
memory/pids/cpu controllers in v2 and skip with the detected reason otherwise.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from sandboxes import cgroups as cg

LIMITS = cg.Limits(memory=64 << 20, memory_high=None, cpu=0.5, cpu_weight=50, pids=32)


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "30"])


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


@pytest.fixture
def parent() -> Iterator[str]:
    name = f"dorm-cgtest-{os.getpid()}"
    yield name
    backend = cg.detect()
    for child in backend.list_children(name):
        backend.handle(name, child).remove()
    backend.remove_parent(name)


def _v1_or_skip() -> cg.V1Backend:
    backend, reason, _ = cg.probe()
    if not isinstance(backend, cg.V1Backend):
        pytest.skip(f"cgroup v1 backend not selected on this host: {reason}")
    return backend


def test_detection_reports_a_reason() -> None:
    backend, reason, facts = cg.probe()
    assert backend is not None, reason
    assert reason
    assert backend.describe()["version"] == backend.version
    assert "v1_hierarchies" in facts and "v2_mounts" in facts


def test_v1_limits_join_kill_remove(parent: str) -> None:
    backend = _v1_or_skip()
    handle = backend.create(parent, "box", LIMITS)
    assert isinstance(handle, cg.V1Handle)
    mem = handle.by_controller["memory"]
    assert int(_read(f"{mem}/memory.limit_in_bytes")) == 64 << 20
    if os.path.exists(f"{mem}/memory.memsw.limit_in_bytes"):
        assert int(_read(f"{mem}/memory.memsw.limit_in_bytes")) == 64 << 20  # swap = 0
    assert _read(f"{handle.by_controller['pids']}/pids.max") == "32"
    cpu = handle.by_controller["cpu"]
    assert _read(f"{cpu}/cpu.cfs_quota_us") == "50000"
    assert _read(f"{cpu}/cpu.cfs_period_us") == "100000"
    assert _read(f"{cpu}/cpu.shares") == str(50 * 1024 // 100)
    proc = _sleeper()
    try:
        handle.add_pid(proc.pid)
        assert handle.pids() == {proc.pid}
        for d in handle.dirs:
            assert str(proc.pid) in _read(f"{d}/cgroup.procs").split()
        handle.kill_all(timeout=5)
        assert proc.wait(timeout=5) == -signal.SIGKILL
        assert handle.pids() == set()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    stats = handle.stats()
    assert set(stats) >= {"memory_current", "memory_peak", "cpu_usage_usec", "pids_current"}
    assert handle.oom_killed() is False
    handle.remove()
    assert not handle.exists()
    assert backend.list_children(parent) == []


def test_v1_remove_kills_survivors(parent: str) -> None:
    backend = _v1_or_skip()
    handle = backend.create(parent, "leftover", LIMITS)
    proc = _sleeper()
    handle.add_pid(proc.pid)
    handle.remove(timeout=5)
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert not handle.exists()


def _v2_core_mount() -> tuple[str, str]:
    mounts = [m.mountpoint for m in cg._mounts() if m.fstype == "cgroup2"]
    if not mounts:
        pytest.skip("no cgroup2 filesystem mounted on this host")
    return mounts[0], cg._own_cgroups().get("", "/")


def test_v2_core_join_kill_remove_without_controllers() -> None:
    mountpoint, own = _v2_core_mount()
    backend = cg.V2Backend(mountpoint, own, frozenset())
    name = f"dorm-v2core-{os.getpid()}"
    handle = backend.create(name, "box", cg.Limits(memory=64 << 20, pids=8, cpu=0.5))
    proc = _sleeper()
    try:
        handle.add_pid(proc.pid)
        assert handle.pids() == {proc.pid}
        assert os.path.exists(os.path.join(handle.path, "cgroup.kill"))
        handle.kill_all(timeout=5)
        assert proc.wait(timeout=5) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        handle.remove()
        backend.remove_parent(name)
    assert not os.path.exists(handle.path)


def test_v2_limits_written() -> None:
    reason = cg.v2_unavailable_reason()
    if reason is not None:
        pytest.skip(f"cgroup v2 controllers unavailable: {reason}")
    backend, _, _ = cg.probe()
    assert isinstance(backend, cg.V2Backend)
    name = f"dorm-v2test-{os.getpid()}"
    handle = backend.create(
        name,
        "box",
        cg.Limits(memory=64 << 20, cpu=0.5, pids=32, cpu_weight=50, memory_high=48 << 20),
    )
    try:
        assert _read(f"{handle.path}/memory.max") == str(64 << 20)
        assert _read(f"{handle.path}/memory.high") == str(48 << 20)
        assert _read(f"{handle.path}/memory.swap.max") == "0"
        assert _read(f"{handle.path}/pids.max") == "32"
        assert _read(f"{handle.path}/cpu.max") == "50000 100000"
        assert _read(f"{handle.path}/cpu.weight") == "50"
        proc = _sleeper()
        handle.add_pid(proc.pid)
        t = time.monotonic()
        handle.kill_all(timeout=5)
        assert proc.wait(timeout=5) == -signal.SIGKILL and time.monotonic() - t < 5
    finally:
        handle.remove()
        backend.remove_parent(name)
    assert not os.path.exists(handle.path)


def test_v1_memory_limit_can_be_raised_and_lowered_again() -> None:
    """v1 needs memsw >= limit at every write: raising must write memsw first."""
    backend = cg.detect()
    if backend.version != 1:
        pytest.skip(f"cgroup v{backend.version} here; this is the v1 ordering rule")
    parent = f"dorm-raise-{os.getpid()}"
    handle = backend.create(parent, "raise", cg.Limits(memory=64 << 20))
    try:
        mem = handle.by_controller["memory"]  # type: ignore[attr-defined]
        for value in (256 << 20, 32 << 20, 512 << 20):
            backend.apply_limits(handle, cg.Limits(memory=value))
            with open(os.path.join(mem, "memory.limit_in_bytes")) as fh:
                assert int(fh.read()) == value
            memsw = os.path.join(mem, "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):
                with open(memsw) as fh:
                    assert int(fh.read()) == value
    finally:
        handle.remove()
        backend.remove_parent(parent)
