"""The C launcher (launcher.c): exec-only idle children run every step in C, with the same result
as the Python path, and pools pick the right kind of child."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest

from sandboxes import (
    EnvFile,
    SandboxError,
    SandboxSpec,
    env_file,
    launcher,
    prefork,
    prewarm,
    spawn,
    spawn_call,
)

from . import targets
from .conftest import ENV, PY, Result, Runner

pytestmark = pytest.mark.skipif(
    os.geteuid() == 0 and not launcher.available(),
    reason="no sandbox launcher here (no C compiler or static libc): the Python path serves all",
)

# Everything the tenant can observe about its confinement, printed for comparison.
PROBE = r"""
import os, resource, socket
status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())
for k in ('Uid', 'Gid', 'Groups', 'CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb', 'NoNewPrivs',
          'Seccomp', 'Seccomp_filters', 'NSpid', 'NSsid', 'SigBlk', 'SigIgn'):
    print(k, status.get(k, '').split())
print('pid', os.getpid(), os.getppid(), os.getsid(0), os.getpgid(0))
print('host', socket.gethostname(), os.getcwd())
for r in ('NOFILE', 'CORE', 'FSIZE', 'MEMLOCK', 'MSGQUEUE', 'NPROC', 'STACK'):
    print(r, resource.getrlimit(getattr(resource, 'RLIMIT_' + r)))
print('fds', sorted(os.listdir('/proc/self/fd')))
print('cgroup', open('/proc/self/cgroup').read().split())
for line in open('/proc/self/mountinfo'):
    f = line.split()
    sep = f.index('-')
    print('mount', f[4], f[5], f[sep + 1], ','.join(sorted(f[sep + 3].split(','))))
for p in ('/etc/passwd', '/etc/group', '/etc/hostname', '/etc/hosts'):
    print(p, repr(open(p).read()))
print('ls', sorted(os.listdir('/')), sorted(os.listdir('/proc')))
"""


def _idle_kinds() -> dict[int, bool]:
    """Idle pid -> whether it is the launcher (by its executable)."""
    out = {}
    for pid in prefork.POOL.idle_pids():
        out[pid] = os.readlink(f"/proc/{pid}/exe") == launcher.path()
    return out


def test_idle_launcher_child_holds_only_its_socket(sbx: Runner) -> None:
    spec = sbx.spec()
    prefork.POOL.clear()
    assert prewarm(spec, 1, exec_only=True) == 1
    [(pid, is_launcher)] = _idle_kinds().items()
    assert is_launcher
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f.read().splitlines())
    assert status["NSpid"].split() == [str(pid), "1"]  # pid 1 of its own pid namespace
    assert status["PPid"].strip() == str(os.getpid())  # a direct child of the fork server
    assert status["CapBnd"].strip() == "0000000000000000"  # emptied while idle
    assert status["Uid"].split()[0] == "0"  # still root: the request's mounts need it
    assert sorted(os.listdir(f"/proc/{pid}/fd"), key=int) == ["0", "1", "2", "3"]
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    with open(f"/proc/{pid}/cgroup") as f:
        assert "/idle-" in f.read()
    prefork.POOL.clear()


def test_both_paths_confine_identically(sbx: Runner, tmp_path: Path) -> None:
    """The same spec started by a launcher child and by a Python child: the tenant sees exactly
    the same identity, capabilities, seccomp, rlimits, fds, cgroup, mounts and files."""
    app = tmp_path / "app"
    app.mkdir()
    uid = sbx.spec().uid
    outputs = {}
    for exec_only in (True, False):
        spec = sbx.spec(uid=uid, app_dir=str(app), hostname="same-tenant")
        prefork.POOL.clear()
        assert prewarm(spec, 1, exec_only=exec_only) == 1
        assert list(_idle_kinds().values()) == [exec_only]
        r = sbx.run([PY, "-I", "-S", "-c", PROBE], spec)
        assert r.exit_code == 0, r.err
        assert prefork.POOL.idle_pids() == []  # the prewarmed child served it
        outputs[exec_only] = r.out
    assert outputs[True] == outputs[False], (outputs[True], outputs[False])
    probe = outputs[True]
    assert "CapEff ['0000000000000000']" in probe and "NoNewPrivs ['1']" in probe
    assert "Seccomp ['2']" in probe and "fds ['0', '1', '2', '3']" in probe
    assert re.search(r"^mount / ro,", probe, re.M)  # the root is read-only on both paths


def test_step_failures_are_named_by_the_launcher(sbx: Runner) -> None:
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        for argv, cwd, step, err in (
            (["/app/does-not-exist"], "/app", "execve", errno.ENOENT),
            (["does-not-exist-anywhere"], "/app", "execve", errno.ENOENT),
            (["/bin/true"], "/app/missing", "chdir", errno.ENOENT),
        ):
            spec = sbx.spec(cwd=cwd)
            prefork.POOL.clear()
            prewarm(spec, 1, exec_only=True)
            with pytest.raises(SandboxError) as info:
                spawn(spec, argv, ENV, stdout_fd=fd, stderr_fd=fd)
            assert (info.value.step, info.value.errno) == (step, err)
            assert prefork.POOL.idle_pids() == []
    finally:
        os.close(fd)


def _call(sbx: Runner, spec: SandboxSpec) -> tuple[int, int | None]:
    """spawn_call the preloaded report target; (sandbox pid, exit code)."""
    out = sbx.workdir / f"lz{len(sbx.live) + len(sbx.finished)}"
    fo = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        sb = spawn_call(spec, f"{targets.__name__}:report", ["a"], {}, stdout_fd=fo, stderr_fd=fo)
    finally:
        os.close(fo)
    sbx.live.append((sb, spec.uid))
    return sb.pid, sbx.finish(sb, out, out).exit_code


def test_zygote_calls_never_get_a_launcher_child(sbx: Runner) -> None:
    spec = sbx.spec()
    prefork.POOL.clear()
    prewarm(spec, 1, exec_only=True)
    launcher_pid = prefork.POOL.idle_pids()[0]
    pid, code = _call(sbx, spec)
    assert code == 3
    assert pid != launcher_pid
    assert prefork.POOL.idle_pids() == [launcher_pid]  # still idle, for an exec start
    prefork.POOL.clear()


def test_a_plan_the_launcher_cannot_run_goes_to_a_python_child(sbx: Runner) -> None:
    """A pool member's layout (``named_at_claim``: /etc/hostname and /etc/hosts are symlinks,
    which launcher.c does not make) is started by a Python child even when an exec-only one is
    idle, and the exec-only one stays idle; nothing is left open."""
    spec = sbx.spec(named_at_claim=True)
    prefork.POOL.clear()
    prewarm(spec, 1, exec_only=True)
    launcher_pid = prefork.POOL.idle_pids()[0]
    fds = sorted(os.listdir("/proc/self/fd"))
    try:
        res = sbx.py("import os; print(os.readlink('/etc/hostname'))", spec)
        assert res.exit_code == 0, res
        assert res.out.strip() == "/run/dorm/hostname", res
        assert prefork.POOL.idle_pids() == [launcher_pid]
        assert sorted(os.listdir("/proc/self/fd")) == fds
    finally:
        prefork.POOL.clear()


def test_prewarm_default_follows_how_a_layout_is_started(sbx: Runner, tmp_path: Path) -> None:
    """prewarm() without exec_only builds launcher children only for a layout that has only ever
    been started with execve; Python children (which also serve zygote calls) otherwise."""
    extra = tmp_path / "layout"  # a layout (pool key) no other test uses
    extra.mkdir()
    spec = sbx.spec(extra_ro_binds=(str(extra),))
    prefork.POOL.clear()
    prewarm(spec, 1)
    assert list(_idle_kinds().values()) == [False]  # nothing known yet: serves both kinds
    assert sbx.run(["/bin/true"], spec).exit_code == 0
    prewarm(spec, 1)
    assert list(_idle_kinds().values()) == [True]
    assert _call(sbx, spec)[1] == 3
    prefork.POOL.clear()
    prewarm(spec, 1)
    assert list(_idle_kinds().values()) == [False]  # called once: Python children again
    prefork.POOL.clear()


def test_large_argv_and_env_reach_the_tenant_exactly(sbx: Runner) -> None:
    """No item limit of the launcher's own: 2,000 arguments and 1,000 variables arrive intact."""
    spec = sbx.spec()
    prefork.POOL.clear()
    prewarm(spec, 1, exec_only=True)
    env = {f"VAR_{i}": f"value {i} ={'x' * (i % 50)}" for i in range(1000)}
    env.update(ENV)  # PATH, and LANG (else Python coerces the locale and adds LC_CTYPE)
    args = [f"arg-{i}" for i in range(2000)]
    code = "import os, sys, json\nprint(json.dumps([sys.argv[1:], dict(os.environ)]))\n"
    r = sbx.run([PY, "-I", "-S", "-c", code, *args], spec, env=env)
    assert r.exit_code == 0, r.err
    got_args, got_env = json.loads(r.out)
    assert got_args == args
    assert got_env == env


def test_a_removed_launcher_binary_is_rebuilt(sbx: Runner) -> None:
    binary = launcher.path()
    os.unlink(binary)
    spec = sbx.spec()
    prefork.POOL.clear()
    assert prewarm(spec, 1, exec_only=True) == 1
    assert os.path.exists(launcher.path())
    assert sbx.run(["/bin/true"], spec).exit_code == 0


def test_building_a_launcher_removes_those_of_older_sources(sbx: Runner) -> None:
    binary = launcher.path()
    directory = os.path.dirname(binary)
    stale = os.path.join(directory, "launcher-0123456789abcdef")  # an older source's build
    with open(stale, "wb") as fh:
        fh.write(b"old")
    os.unlink(binary)  # the next use builds the current one again
    assert launcher.path() == binary and os.path.exists(binary)
    assert not os.path.exists(stale)
    assert sbx.run(["/bin/true"], sbx.spec()).exit_code == 0


def test_glibc_reserved_signals_ignored_by_our_parent_are_not_passed_on(sbx: Runner) -> None:
    """GNU make (so `make test`) leaves signals 32 and 33 ignored in its children, and an ignored
    disposition survives fork and execve: neither path may hand that on to a tenant."""
    import ctypes

    from sandboxes import libc

    def set_action(sig: int, handler: int) -> None:
        action = libc._KernelSigaction(handler, 0, None, 0)
        nr = libc.syscall_nr("rt_sigaction")
        assert libc._syscall(nr, sig, ctypes.byref(action), None, 8) == 0

    for sig in libc.GLIBC_RESERVED_SIGNALS:
        set_action(sig, 1)  # SIG_IGN, as make leaves it
    try:
        for exec_only in (True, False):
            spec = sbx.spec()
            prefork.POOL.clear()
            assert prewarm(spec, 1, exec_only=exec_only) == 1
            r = sbx.run(["/bin/grep", "SigIgn", "/proc/self/status"], spec)
            assert r.exit_code == 0, r.err
            assert r.out.split() == ["SigIgn:", "0000000000000000"], (exec_only, r.out)
    finally:
        for sig in libc.GLIBC_RESERVED_SIGNALS:
            libc.default_signal_action(sig)


def test_env_file_reaches_the_tenant_on_every_path(sbx: Runner) -> None:
    """An EnvFile's memfd is read by the launcher child, the Python child and a zygote call
    alike: the tenant gets exactly that environment, and the memfd is not among its fds."""
    env = {"PATH": "/usr/bin:/bin", "DB_PASSWORD": "s3cret=with=equals", "EMPTY": ""}
    code = "import os, json; print(json.dumps([dict(os.environ), os.listdir('/proc/self/fd')]))"

    def run(name: str, spec: SandboxSpec, argv: list[str], call: str | None = None) -> Result:
        """`argv` (or `call`) started with `env` in a fresh memfd; its result."""
        fd = env_file(env)
        out = sbx.workdir / f"envfile-{name}"
        fo = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            e = EnvFile(fd, "/usr/bin:/bin")
            if call is None:
                sb = spawn(spec, argv, e, stdout_fd=fo, stderr_fd=fo)
            else:
                sb = spawn_call(spec, call, argv, e, stdout_fd=fo, stderr_fd=fo)
        finally:
            os.close(fo)
            os.close(fd)
        sbx.live.append((sb, spec.uid))
        return sbx.finish(sb, out, out)

    for exec_only in (True, False):
        spec = sbx.spec()
        prefork.POOL.clear()
        assert prewarm(spec, 1, exec_only=exec_only) == 1
        r = run(str(exec_only), spec, ["python3" if exec_only else PY, "-I", "-S", "-c", code])
        assert r.exit_code == 0, r.out
        seen, fds = json.loads(r.out)
        seen.pop("LC_CTYPE", None)  # Python's own C-locale coercion, not the environment's
        assert seen == env and sorted(fds, key=int) in (["0", "1", "2"], ["0", "1", "2", "3"])
    r = run("call", sbx.spec(), ["a"], call=f"{targets.__name__}:report")
    assert r.exit_code == 3, r.out
    report = json.loads(r.out)
    assert report["env"] == env and report["fds"] in ([0, 1, 2], [0, 1, 2, 3])
