"""Fixtures for the sandbox tests: real kernel, real cgroups, real namespaces, no mocks.

Every sandbox a test starts goes through ``Runner``, which enforces a wall-clock timeout, and on
teardown asserts that nothing is left behind: no process with the sandbox's uid, no cgroup
directory, no new host mount. Tests use a throwaway cgroup parent (``dorm-test-<pid>``) so they
never touch the sandboxes of a gateway running on the same machine.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sandboxes import Sandbox, SandboxSpec, prefork, spawn
from sandboxes import cgroups as cg

PY = os.path.join(sys.base_prefix, "bin", "python3")
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
_uids = itertools.count(300000 + (os.getpid() % 500) * 200)

NOT_ROOT = (
    f"sandbox tests need root to create namespaces and cgroups (euid={os.geteuid()}); "
    "rootless mode is covered by test_doctor.py, which drops root itself"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.skip(reason=NOT_ROOT))


def next_uid() -> int:
    return next(_uids)


def host_mounts() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4] for line in f}


def procs_of_uid(uid: int) -> list[int]:
    """Host pids whose real uid is ``uid`` (scans /proc: the ground truth, not the cgroup)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{name}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    if int(line.split()[1]) == uid:
                        out.append(int(name))
                    break
    return out


@dataclass
class Result:
    status: int
    out: str
    err: str
    sandbox: Sandbox

    @property
    def exit_code(self) -> int | None:
        return os.waitstatus_to_exitcode(self.status) if os.WIFEXITED(self.status) else None

    @property
    def signal(self) -> int | None:
        return os.WTERMSIG(self.status) if os.WIFSIGNALED(self.status) else None

    def lines(self) -> list[str]:
        return self.out.strip().splitlines()


class Runner:
    """Starts sandboxes for one test and proves, at the end, that they left nothing behind."""

    def __init__(self, workdir: Path, cgroup_parent: str) -> None:
        self.workdir = workdir
        self.cgroup_parent = cgroup_parent
        self.live: list[tuple[Sandbox, int]] = []
        self.finished: list[tuple[Sandbox, int]] = []
        self._n = itertools.count()

    def spec(self, **overrides: Any) -> SandboxSpec:
        n = next(self._n)
        uid = overrides.pop("uid", None) or next_uid()
        sock = self.workdir / f"sock{n}"
        sock.mkdir()
        os.chown(sock, uid, uid)
        fields: dict[str, Any] = {
            "name": f"t{os.getpid()}-{n}",
            "uid": uid,
            "socket_dir": str(sock),
            "cgroup_parent": self.cgroup_parent,
            "memory": 128 << 20,
            "pids": 64,
            "cpu": 1.0,
        }
        fields.update(overrides)
        return SandboxSpec(**fields)

    def start(
        self, argv: list[str], spec: SandboxSpec | None = None, env: dict[str, str] | None = None
    ) -> tuple[Sandbox, Path, Path]:
        spec = spec or self.spec()
        n = next(self._n)
        out = self.workdir / f"out{n}"
        err = self.workdir / f"err{n}"
        fo = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        fe = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            sb = spawn(spec, argv, dict(ENV) if env is None else env, stdout_fd=fo, stderr_fd=fe)
        finally:
            os.close(fo)
            os.close(fe)
        self.live.append((sb, spec.uid))
        return sb, out, err

    def finish(self, sb: Sandbox, out: Path, err: Path, timeout: float = 10.0) -> Result:
        try:
            status = sb.wait(timeout)
        except TimeoutError:
            sb.kill()
            status = sb.wait(5)
        sb.cleanup()
        self._forget(sb)
        return Result(status, out.read_text(), err.read_text(), sb)

    def run(
        self,
        argv: list[str],
        spec: SandboxSpec | None = None,
        timeout: float = 10.0,
        env: dict[str, str] | None = None,
    ) -> Result:
        sb, out, err = self.start(argv, spec, env)
        return self.finish(sb, out, err, timeout)

    def py(self, code: str, spec: SandboxSpec | None = None, timeout: float = 10.0) -> Result:
        """Run a Python snippet in a sandbox (-I -S: no user site, no site-packages)."""
        return self.run([PY, "-I", "-S", "-c", code], spec, timeout)

    def _forget(self, sb: Sandbox) -> None:
        for i, (s, _) in enumerate(self.live):
            if s is sb:
                self.finished.append(self.live.pop(i))
                return

    def close(self) -> None:
        for sb, _ in list(self.live):
            sb.kill()
            with contextlib.suppress(ChildProcessError, TimeoutError):
                sb.wait(5)
            sb.cleanup()
            self._forget(sb)
        for sb, uid in self.finished:
            assert procs_of_uid(uid) == [], f"processes of uid {uid} survived"
            assert sb.cgroup is not None and not sb.cgroup.exists(), "cgroup dir left behind"


@pytest.fixture(scope="session")
def cgroup_parent() -> Iterator[str]:
    name = f"dorm-test-{os.getpid()}"
    yield name
    backend = cg.detect()
    leftovers = backend.list_children(name)
    for child in leftovers:
        backend.handle(name, child).remove()
    with contextlib.suppress(OSError):
        backend.remove_parent(name)
    assert leftovers == [], f"sandbox cgroups left behind: {leftovers}"


@pytest.fixture(scope="session", autouse=True)
def no_host_mount_leaks() -> Iterator[None]:
    before = host_mounts()
    yield
    prefork.POOL.clear()  # idle pre-forked children are ours: reap them before leaving
    assert host_mounts() - before == set(), "sandbox tests left mounts on the host"


@pytest.fixture
def sbx(tmp_path: Path, cgroup_parent: str) -> Iterator[Runner]:
    tmp_path.chmod(0o755)
    runner = Runner(tmp_path, cgroup_parent)
    try:
        yield runner
    finally:
        runner.close()


@pytest.fixture(scope="session")
def cbin() -> Iterator[Path]:
    """A directory of tiny C programs compiled once (32-bit syscalls, x32, TIOCSTI, setuid)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed: cannot build the raw-syscall test programs")
    d = Path(tempfile.mkdtemp(prefix="dorm-cbin-"))
    d.chmod(0o755)
    src = Path(__file__).parent / "csrc"
    for c in sorted(src.glob("*.c")):
        static = ["-static"] if c.stem == "hello" else []
        subprocess.run(
            ["gcc", "-O1", *static, "-o", str(d / c.stem), str(c)], check=True, capture_output=True
        )
    yield d
    shutil.rmtree(d, ignore_errors=True)


def errno_name(value: int) -> str:
    return errno.errorcode.get(value, str(value))


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
