"""Cgroup backends against the real kernel: v1 for real here, v2 where its controllers exist.

The v2 *core* (create, join, cgroup.kill, remove) needs no controller, so it is exercised on any
mounted cgroup2 hierarchy (here the empty one at /sys/fs/cgroup/unified); limit tests need the
memory/pids/cpu controllers in v2 and skip with the detected reason otherwise. On this host they
run for real inside a pure cgroup v2 guest: tests/vm/test_cgroup2_guest.py boots one and runs this
file (and the sandbox tests that exercise limits) in it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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


def _v2_or_skip() -> cg.V2Backend:
    reason = cg.v2_unavailable_reason()
    if reason is not None:
        pytest.skip(f"cgroup v2 controllers unavailable: {reason}")
    backend = cg.detect()
    assert isinstance(backend, cg.V2Backend), backend.reason
    return backend


@pytest.fixture
def v2() -> Iterator[tuple[cg.V2Backend, str]]:
    backend = _v2_or_skip()
    name = f"dorm-v2test-{os.getpid()}"
    yield backend, name
    for child in backend.list_children(name):
        backend.handle(name, child).remove()
    backend.remove_parent(name)


def _joined(handle: cg.CgroupHandle, script: str) -> subprocess.Popen[bytes]:
    """``sh -c script`` moved into ``handle`` before it runs (it waits for a line on stdin).

    Why wait: v2 does not move memory charges with a task, and a process that already forked or
    allocated before joining would escape the limit under test.
    """
    proc = subprocess.Popen(["sh", "-c", f"read go; {script}"], stdin=subprocess.PIPE)
    handle.add_pid(proc.pid)
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    return proc


def test_v2_oom_is_detected_and_counted_once(v2: tuple[cg.V2Backend, str]) -> None:
    """memory.max kills a hog; memory.events reports it; one OOM counts as one.

    With memory.oom.group 1 the kernel's ``oom_kill`` reads 2 for one killed process (the victim
    is counted again by the group kill): ``oom_kills`` must say 1.
    """
    backend, parent = v2
    handle = backend.create(parent, "oom", cg.Limits(memory=32 << 20))
    assert isinstance(handle, cg.V2Handle)
    assert _read(f"{handle.path}/memory.oom.group") == "1"
    proc = _joined(handle, "exec tail /dev/zero")  # one endless line: grows until killed
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert handle.oom_killed() is True
    assert handle.stats()["oom_kills"] == 1
    events = cg._read_keyed(f"{handle.path}/memory.events")
    assert events["oom"] >= 1 and events["max"] >= 1
    handle.remove()
    assert not handle.exists()


def test_v2_pids_max_stops_a_fork_bomb(v2: tuple[cg.V2Backend, str]) -> None:
    backend, parent = v2
    handle = backend.create(parent, "forks", cg.Limits(pids=8))
    proc = _joined(
        handle,
        "i=0; while [ $i -lt 32 ]; do sleep 30 & i=$((i+1)); done 2>/dev/null; wait",
    )
    try:
        deadline = time.monotonic() + 30
        refused = 0
        while time.monotonic() < deadline:
            refused = cg._read_keyed(f"{handle.path}/pids.events").get("max", 0)
            if refused > 0:
                break
            time.sleep(0.05)
        assert refused > 0, "no fork was refused at pids.max"
        assert int(_read(f"{handle.path}/pids.current")) <= 8
    finally:
        handle.kill_all(timeout=10)
        proc.wait(timeout=10)
    assert handle.pids() == set()
    handle.remove()
    assert not handle.exists()


def test_v2_cpu_max_throttles(v2: tuple[cg.V2Backend, str]) -> None:
    """A busy loop under cpu.max 10% is throttled and gets a fraction of one CPU.

    Measured from cpu.stat over a wall interval after the loop runs (not from the process's own
    start-up, which a slow emulated guest would charge to the quota too).
    """
    backend, parent = v2
    handle = backend.create(parent, "cpu", cg.Limits(cpu=0.1, cpu_weight=50))
    assert _read(f"{handle.path}/cpu.max") == "10000 100000"
    proc = _joined(handle, "while :; do :; done")
    try:
        time.sleep(0.3)
        before = cg._read_keyed(f"{handle.path}/cpu.stat")
        t0 = time.monotonic()
        time.sleep(1.0)
        after = cg._read_keyed(f"{handle.path}/cpu.stat")
        wall_usec = (time.monotonic() - t0) * 1e6
    finally:
        handle.kill_all(timeout=10)
        proc.wait(timeout=10)
    used = after["usage_usec"] - before["usage_usec"]
    assert after["nr_throttled"] > before["nr_throttled"]
    assert used < 0.3 * wall_usec, f"{used} µs of CPU in {wall_usec:.0f} µs under a 10% quota"
    handle.remove()


def test_v2_cgroups_cannot_be_renamed_so_activate_keeps_the_name(
    v2: tuple[cg.V2Backend, str],
) -> None:
    """Why ``V2Backend.activate`` never renames (v1 does): cgroup2 has no rename operation."""
    backend, parent = v2
    idle = backend.create(parent, "idle-1", cg.Limits())
    with pytest.raises(PermissionError):
        os.rename(idle.path, os.path.join(os.path.dirname(idle.path), "instance"))
    limits = cg.Limits(memory=64 << 20, pids=16)
    active = backend.activate(idle, "instance", limits)
    assert active.path == idle.path
    assert _read(f"{active.path}/pids.max") == "16"
    assert _read(f"{active.path}/memory.max") == str(64 << 20)
    active.remove()


def test_v2_own_cgroup_with_processes_delegates_through_a_supervisor_leaf(
    v2: tuple[cg.V2Backend, str],
) -> None:
    """The systemd-service case: dorm's cgroup holds processes, so ``prepare`` moves them into
    ``<own>/supervisor`` before enabling controllers; a process started afterwards (a restarted
    fork server) inherits that leaf and must still find the same sandbox parent."""
    backend, parent = v2
    if os.path.realpath(backend.own_dir) == os.path.realpath(backend.mountpoint):
        pytest.skip("dorm's own cgroup here is the cgroup2 root (no internal-process rule)")
    handle = backend.create(parent, "box", cg.Limits(pids=8))
    try:
        own_now = cg._own_cgroups()[""]
        assert own_now.endswith("/" + cg.SUPERVISOR), own_now
        assert cg._procs(backend.own_dir) == []
        assert set(_read(f"{backend.own_dir}/cgroup.subtree_control").split()) >= {
            "memory",
            "pids",
            "cpu",
        }
        code = "from sandboxes import cgroups as cg; print(cg.detect().own_dir)"
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
        ).stdout.strip()
        assert out == backend.own_dir
        assert backend.list_children(parent) == ["box"]
    finally:
        handle.remove()


def test_v2_stats_of_a_running_process(v2: tuple[cg.V2Backend, str]) -> None:
    backend, parent = v2
    handle = backend.create(parent, "stats", cg.Limits(memory=64 << 20, pids=8))
    proc = _joined(handle, "exec sleep 30")
    try:
        # Pages charged before joining stay with the old cgroup (v2 moves no charges): wait for
        # the exec, whose new address space is charged here.
        deadline = time.monotonic() + 30
        while _read(f"/proc/{proc.pid}/comm") != "sleep" and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = handle.stats()
        assert stats["pids_current"] == 1
        assert isinstance(stats["memory_current"], int) and stats["memory_current"] > 0
        assert isinstance(stats["cpu_usage_usec"], int)
        assert stats["oom_kills"] == 0 and handle.oom_killed() is False
    finally:
        handle.remove()
    assert proc.wait(timeout=10) == -signal.SIGKILL


def _limit_files(handle: cg.CgroupHandle) -> dict[str, str]:
    """The limit files this backend writes, read back (v1 per controller, v2 one directory)."""
    if isinstance(handle, cg.V1Handle):
        mem, pids, cpu = (handle.by_controller[c] for c in ("memory", "pids", "cpu"))
        return {
            "memory": _read(f"{mem}/memory.limit_in_bytes"),
            "pids": _read(f"{pids}/pids.max"),
            "cpu": _read(f"{cpu}/cpu.cfs_quota_us"),
            "cpu_weight": _read(f"{cpu}/cpu.shares"),
        }
    d = handle.path
    return {
        "memory": _read(f"{d}/memory.max"),
        "memory_high": _read(f"{d}/memory.high"),
        "swap": _read(f"{d}/memory.swap.max"),
        "pids": _read(f"{d}/pids.max"),
        "cpu": _read(f"{d}/cpu.max"),
        "cpu_weight": _read(f"{d}/cpu.weight"),
    }


def test_activate_with_unset_limits_undoes_the_prewarm_ones() -> None:
    """An idle cgroup limited at prewarm for one spec, taken by a spawn whose limits are None
    ("any idle child will do"), must end up as unlimited as a fresh one, not keep the old values."""
    backend = cg.detect()
    if backend.version == 2:
        _v2_or_skip()
    parent = f"dorm-reset-{os.getpid()}"
    fresh = backend.create(parent, "fresh", cg.Limits())
    unlimited = _limit_files(fresh)
    fresh.remove()
    prewarm = cg.Limits(memory=64 << 20, memory_high=48 << 20, cpu=0.5, cpu_weight=50, pids=32)
    idle = backend.create(parent, "idle-1", prewarm)
    assert _limit_files(idle) != unlimited
    active = backend.activate(idle, "instance", cg.Limits(), prewarm)
    try:
        assert _limit_files(active) == unlimited
        # and a partial spec: what it sets is written, what it leaves unset is unlimited again
        again = backend.activate(active, "instance", cg.Limits(pids=16), cg.Limits(pids=8, cpu=1))
        files = _limit_files(again)
        assert files["pids"] == "16"
        assert files["cpu"] == unlimited["cpu"]
    finally:
        for child in backend.list_children(parent):
            backend.handle(parent, child).remove()
        backend.remove_parent(parent)
