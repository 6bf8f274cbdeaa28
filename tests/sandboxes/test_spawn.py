"""spawn(): the confined process sees exactly what the spec says, failures name their step, and a
crashed gateway's sandboxes are found and removed by cleanup_stale()."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sandboxes import STEPS, SandboxError, cleanup_stale, prefork, prewarm, spawn
from sandboxes import cgroups as cg

from .conftest import ENV, PY, Runner, procs_of_uid


def test_identity_namespaces_and_layout(sbx: Runner, tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "main.txt").write_text("hello")
    spec = sbx.spec(app_dir=str(app), hostname="tenant-a")
    r = sbx.py(
        "import os, socket\n"
        "print(os.getpid(), os.getppid())\n"
        "print(os.getresuid(), os.getresgid(), os.getgroups())\n"
        "print(socket.gethostname())\n"
        "print(os.getcwd(), open('/app/main.txt').read())\n"
        "print(sorted(os.listdir('/')))\n"
        "print(sorted(os.listdir('/dev')))\n"
        "print(sorted({l.split(':', 2)[2] for l in open('/proc/self/cgroup').read().split()}))\n"
        "import pwd; print(pwd.getpwuid(os.getuid()).pw_name)\n",
        spec,
    )
    lines = r.lines()
    assert lines[0] == "1 0"  # pid 1 of its own pid namespace; its parent is outside
    ids = f"({spec.uid}, {spec.uid}, {spec.uid})"
    assert lines[1] == f"{ids} {ids} []"
    assert lines[2] == "tenant-a"
    assert lines[3] == "/app hello"
    root = eval(lines[4])
    assert {"app", "data", "dev", "etc", "proc", "run", "tmp", "usr"} <= set(root)
    assert "home" not in root and "var" not in root and "sys" not in root
    assert eval(lines[5]) == sorted(
        ["fd", "full", "null", "random", "shm", "stderr", "stdin", "stdout", "urandom", "zero"]
    )
    assert lines[6] == "['/']"  # every hierarchy: cgroup namespace rooted at the sandbox's cgroup
    assert lines[7] == "app"


def test_pid_is_a_direct_child_and_exit_status_propagates(sbx: Runner) -> None:
    sb, out, err = sbx.start(["/bin/sh", "-c", "exit 42"])
    with open(f"/proc/{sb.pid}/status") as f:
        ppid = next(int(line.split()[1]) for line in f if line.startswith("PPid:"))
    assert ppid == os.getpid()
    r = sbx.finish(sb, out, err)
    assert r.exit_code == 42


def test_stdout_and_stderr_go_to_the_given_fds(sbx: Runner) -> None:
    r = sbx.run(["/bin/sh", "-c", "echo to-out; echo to-err >&2; read x || echo stdin-eof"])
    assert r.out == "to-out\nstdin-eof\n"
    assert r.err == "to-err\n"


def test_environment_is_exactly_the_given_one(sbx: Runner) -> None:
    r = sbx.run(["/usr/bin/env"], env={"PATH": "/usr/bin:/bin", "ONLY": "this"})
    assert sorted(r.lines()) == ["ONLY=this", "PATH=/usr/bin:/bin"]


def test_only_stdio_fds_survive_exec(sbx: Runner) -> None:
    leak_r, leak_w = os.pipe()
    os.set_inheritable(leak_r, True)
    try:
        r = sbx.py("import os; print(sorted(int(f) for f in os.listdir('/proc/self/fd')))")
    finally:
        os.close(leak_r)
        os.close(leak_w)
    assert eval(r.out) in ([0, 1, 2], [0, 1, 2, 3])  # 3 is listdir's own directory fd


def test_rlimits_applied(sbx: Runner) -> None:
    r = sbx.py(
        "import resource as r\n"
        "print([r.getrlimit(x) for x in (r.RLIMIT_NOFILE, r.RLIMIT_CORE, r.RLIMIT_NPROC)])"
    )
    assert eval(r.out) == [(4096, 4096), (0, 0), (64, 64)]


def test_data_dir_persists_and_socket_dir_is_writable(sbx: Runner, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    spec = sbx.spec(data_dir=str(data))
    os.chown(data, spec.uid, spec.uid)
    code = (
        "import socket\n"
        "open('/data/state', 'a').write('x')\n"
        "s = socket.socket(socket.AF_UNIX); s.bind('/run/dorm/app.sock'); print('bound')\n"
    )
    r = sbx.py(code, spec)
    assert r.out.strip() == "bound"
    assert (Path(spec.socket_dir) / "app.sock").exists()
    assert (data / "state").read_text() == "x"


def test_execve_failure_names_the_step(sbx: Runner, cgroup_parent: str) -> None:
    spec = sbx.spec()
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        with pytest.raises(SandboxError) as info:
            spawn(spec, ["/app/does-not-exist"], ENV, stdout_fd=fd, stderr_fd=fd)
    finally:
        os.close(fd)
    assert info.value.step == "execve"
    assert info.value.errno == errno.ENOENT
    assert cg.detect().list_children(cgroup_parent) == []  # the failed sandbox's cgroup is gone
    assert procs_of_uid(spec.uid) == []


def test_bad_cwd_names_the_step(sbx: Runner) -> None:
    spec = sbx.spec(cwd="/nonexistent")
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        with pytest.raises(SandboxError) as info:
            spawn(spec, ["/bin/true"], ENV, stdout_fd=fd, stderr_fd=fd)
    finally:
        os.close(fd)
    assert (info.value.step, info.value.errno) == ("chdir", errno.ENOENT)
    assert info.value.step in STEPS


def test_path_lookup_happens_inside_the_sandbox(sbx: Runner) -> None:
    r = sbx.run(["true"])
    assert r.exit_code == 0


def test_stats_and_kill(sbx: Runner) -> None:
    sb, out, err = sbx.start([PY, "-I", "-S", "-c", "import time; time.sleep(30)"])
    time.sleep(0.1)
    stats = sb.stats()
    assert stats["pid"] == sb.pid
    assert isinstance(stats["memory_current"], int) and stats["memory_current"] > 0
    assert stats["pids_current"] == 1
    assert sb.oom_killed() is False
    sb.kill()
    r = sbx.finish(sb, out, err)
    assert r.signal == signal.SIGKILL


def test_prewarmed_children_serve_exactly_one_sandbox(sbx: Runner) -> None:
    spec = sbx.spec()
    prefork.POOL.clear()
    assert prewarm(spec, 2) == 2
    idle = set(prefork.POOL.idle_pids())
    assert len(idle) == 2
    sb1, out1, err1 = sbx.start(["/bin/true"], spec)
    sb2, out2, err2 = sbx.start(["/bin/true"], sbx.spec())  # other limits: any idle child will do
    assert {sb1.pid, sb2.pid} == idle  # the pre-forked children became the sandboxes
    assert prefork.POOL.idle_pids() == []
    assert sbx.finish(sb1, out1, err1).exit_code == 0
    assert sbx.finish(sb2, out2, err2).exit_code == 0


def test_without_prewarm_spawn_forks_on_demand(sbx: Runner) -> None:
    prefork.POOL.clear()
    r = sbx.run(["/bin/true"])
    assert r.exit_code == 0
    assert prefork.POOL.idle_pids() == []


def test_rootfs_bundle_replaces_host_system_dirs(sbx: Runner, cbin: Path, tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "etc").mkdir()
    (rootfs / "etc" / "passwd").write_text("app:x:1:1::/:/bin/hello\n")
    shutil.copy(cbin / "hello", rootfs / "bin" / "hello")
    (rootfs / "sbin").symlink_to("bin")
    spec = sbx.spec(rootfs=str(rootfs), cwd="/")
    r = sbx.run(["/sbin/hello"], spec)
    assert r.out.strip() == f"hello from the bundle, uid {spec.uid}"
    assert r.exit_code == 0  # and /usr/bin/env was not there


def test_extra_ro_bind_makes_a_venv_usable(sbx: Runner) -> None:
    venv = Path(sys.prefix)
    if venv == Path(sys.base_prefix):
        pytest.skip("tests are not running from a virtualenv")
    spec = sbx.spec(extra_ro_binds=(str(venv),), memory=256 << 20)
    r = sbx.run([str(venv / "bin" / "python"), "-c", "import uvloop, orjson; print('ok')"], spec)
    assert (r.out.strip(), r.exit_code) == ("ok", 0), r.err


def test_extra_ro_bind_under_tmp_sits_on_top_of_the_sandbox_tmp(sbx: Runner) -> None:
    """A read-only bind whose host path is under /tmp (a checkout's venv in CI, say) stays
    visible over the sandbox's own /tmp tmpfs, read-only, next to a writable /tmp."""
    host = Path(tempfile.mkdtemp(prefix="dorm-ro-", dir="/tmp"))
    try:
        (host / "inside").mkdir()
        (host / "inside" / "marker.txt").write_text("from the host\n")
        for path in (host, host / "inside"):
            path.chmod(0o755)
        (host / "inside" / "marker.txt").chmod(0o644)
        spec = sbx.spec(extra_ro_binds=(str(host),))
        script = (
            f"cat {host}/inside/marker.txt; "
            f"( echo x > {host}/inside/new ) 2>/dev/null || echo read-only; "
            "echo ok > /tmp/writable && cat /tmp/writable"
        )
        r = sbx.run(["/bin/sh", "-c", script], spec)
        assert r.exit_code == 0, r.err
        assert r.out.split() == ["from", "the", "host", "read-only", "ok"]
        assert not (host / "inside" / "new").exists()
    finally:
        shutil.rmtree(host, ignore_errors=True)


def test_cleanup_stale_after_gateway_crash(tmp_path: Path) -> None:
    """A forked 'gateway' spawns a sandbox and is SIGKILLed; the next start cleans everything."""
    parent = f"dorm-crash-{os.getpid()}"
    sock = tmp_path / "sock"
    sock.mkdir()
    r, w = os.pipe()
    gateway = os.fork()
    if gateway == 0:
        try:
            os.close(r)
            from sandboxes import SandboxSpec

            spec = SandboxSpec(
                name="crashy", uid=299999, socket_dir=str(sock), cgroup_parent=parent
            )
            fd = os.open(os.devnull, os.O_WRONLY)
            code = "import os, time\nif os.fork() == 0: os.setsid()\ntime.sleep(60)"
            sb = spawn(spec, [PY, "-I", "-S", "-c", code], ENV, stdout_fd=fd, stderr_fd=fd)
            os.write(w, str(sb.pid).encode())
            time.sleep(60)
        finally:
            os._exit(1)
    os.close(w)
    try:
        sandbox_pid = int(os.read(r, 32) or b"0")
        assert sandbox_pid > 0
        backend = cg.detect()
        children = backend.list_children(parent)
        # v1 renames a pre-built cgroup to the sandbox's name; v2 refuses that (EPERM) and
        # keeps the pool's name: one cgroup either way.
        assert children == ["crashy"] if backend.version == 1 else len(children) == 1, children
        os.kill(gateway, signal.SIGKILL)
        os.waitpid(gateway, 0)
        assert cleanup_stale(parent) == 1
        assert backend.list_children(parent) == []
        deadline = time.monotonic() + 5
        while procs_of_uid(299999) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert procs_of_uid(299999) == []
        assert cleanup_stale(parent) == 0
    finally:
        os.close(r)
        backend = cg.detect()
        for child in backend.list_children(parent):
            backend.handle(parent, child).remove()
        backend.remove_parent(parent)


def test_threaded_caller_is_refused_with_a_reason(sbx: Runner) -> None:
    import threading

    stop = threading.Event()
    t = threading.Thread(target=stop.wait, args=(10,))
    t.start()
    try:
        prefork.POOL.clear()
        fd = os.open(os.devnull, os.O_WRONLY)
        try:
            with pytest.raises(SandboxError) as info:
                spawn(sbx.spec(), ["/bin/true"], ENV, stdout_fd=fd, stderr_fd=fd)
        finally:
            os.close(fd)
    finally:
        stop.set()
        t.join(5)
    assert info.value.step == "namespaces"
    assert "single-threaded" in info.value.message
