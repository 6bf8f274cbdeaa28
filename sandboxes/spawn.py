"""spawn(): start a tenant process fully confined, step by step, ending in execve().

Confinement order (root mode). Each step is one small function (child.py / mounts.py / caps.py);
a failure reports its name and errno back over a close-on-exec channel and ``spawn`` raises
``SandboxError(step, errno, message)``. Steps marked [prewarm] run ahead of time in a pre-forked
child (prefork.py) or in the fork server while it builds that child's namespaces (nspool.py);
everything else runs when ``spawn`` is called, before any tenant code:

 1. cgroup          [prewarm] create, limit (if the expected limits are known) and join;
                    at spawn: rename to the instance name (v1) and write limits if they differ
 2. namespaces      [prewarm] new pid ns (the child is its pid 1), mount, net, ipc, uts;
                    at spawn: setns into the egress netns if any, then unshare(cgroup ns)
 3. mounts          [prewarm] make / rprivate; tmpfs root; read-only nosuid nodev binds of /usr,
                    /lib*, the Python prefix, extra_ro_binds; generated /etc subset; /dev nodes;
                    pivot_root + detach of the old root; fresh /proc of the child's pid ns
                    at spawn: /etc identity files, /tmp and /dev/shm tmpfs with sizes, /app (ro),
                    /data, /run/dorm attached as detached trees (open_tree by the parent),
                    root remounted read-only, chdir(cwd)
 4. loopback        [prewarm] lo up with two ioctls
 5. hostname        sethostname in the new UTS namespace
 6. rlimits         NOFILE, CORE=0, FSIZE, MEMLOCK, MSGQUEUE, NPROC(=pids), STACK
 7. session         setsid
 8. bounding_set    PR_CAPBSET_DROP of every capability (needs CAP_SETPCAP: before the uid change)
 9. ids             setgroups([]), setresgid, setresuid to the instance's unprivileged uid
10. parent_death    PR_SET_PDEATHSIG(SIGKILL), re-armed after the uid change (which resets it)
11. capabilities    capset(0, 0, 0) and ambient cleared
12. no_new_privs    PR_SET_NO_NEW_PRIVS
13. seccomp         load the pre-compiled BPF deny list (built once in the fork server)
14. fds             every fd >= 3 marked close-on-exec (close_range), so only 0, 1, 2 survive
15. execve          argv with exactly the given environment (PATH lookup inside the sandbox)

Who runs the steps: for execve starts, the C launcher (launcher.c; posix_spawned by prefork.py,
no copy of the fork server), in this order; for zygote calls (and without a launcher), a forked
Python child running child.confine. tests/sandboxes/test_launcher.py checks both confine alike.

Why split at all: on this VM every RCU-bound kernel operation (moving a task between cgroups,
detaching the old root) costs 1-20 ms after an idle spell, and forking the Python fork server costs
1-3 ms of copy-on-write faults before the child runs; none of it depends on the instance.

Pid mapping: the fork server calls ``unshare(CLONE_NEWPID)`` (which only changes the pid namespace
*of its next child*), forks, and ``setns``-es straight back. The child is pid 1 of a fresh pid
namespace and, at the same time, a direct child of the caller: ``Sandbox.pid`` is its pid as the
caller sees it, and the caller ``waitpid``s it as usual. After execve the tenant's process *is*
that pid 1, so (a) when it exits the kernel SIGKILLs every other process of the sandbox, including
double-forked orphans, (b) orphans are reparented to it, never to the host, and (c) like any pid 1
it only receives signals it installed a handler for (SIGKILL from the host always works;
``Sandbox.kill`` uses it, through a pidfd).

Rootless mode (not root): no pre-forking; the child creates a user namespace mapping only the
caller's own uid, then the other namespaces, and runs every step itself. A second fork makes the
pid-1 process and the intermediate exits, so the caller becomes a child subreaper to keep the
waited pid its own child. The pid-1 process arms its parent-death signal only once the intermediate
has exited (it waits on a pidfd), or the intermediate's exit would SIGKILL it.
``doctor.missing_protections()`` lists what that mode cannot provide.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import resource
import select
import signal
import socket
import time
from typing import Any, Final

from . import caps, cgroups, child, launcher, libc, mounts, prefork, seccomp
from .child import STEPS
from .errors import SandboxError
from .spec import Env, EnvFile, SandboxSpec, SandboxSpecError, validate_argv, validate_env

__all__ = ["STEPS", "Sandbox", "prepare_socket_dir", "prewarm", "spawn", "spawn_call"]

NS_FLAGS_ROOTLESS: Final = (
    libc.CLONE_NEWNS | libc.CLONE_NEWIPC | libc.CLONE_NEWUTS | libc.CLONE_NEWCGROUP
)
DEFAULT_PATH: Final = "/usr/local/bin:/usr/bin:/bin"
SPAWN_TIMEOUT: Final = 10.0

_devnull_fd: int | None = None


def _devnull() -> int:
    global _devnull_fd
    if _devnull_fd is None:
        _devnull_fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    return _devnull_fd


def _high_fd(fd: int) -> int:
    """Move ``fd`` above 2 so dup2 onto stdio can never clobber it."""
    if fd > 2:
        return fd
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return new


def _rlimits(spec: SandboxSpec) -> tuple[tuple[int, int], ...]:
    r = spec.rlimits
    nproc = r.nproc if r.nproc is not None else spec.pids
    out = [
        (resource.RLIMIT_NOFILE, r.nofile),
        (resource.RLIMIT_CORE, r.core),
        (resource.RLIMIT_FSIZE, r.fsize),
        (resource.RLIMIT_MEMLOCK, r.memlock),
        (resource.RLIMIT_MSGQUEUE, r.msgqueue),
    ]
    if nproc is not None:
        out.append((resource.RLIMIT_NPROC, nproc))
    if r.stack is not None:
        out.append((resource.RLIMIT_STACK, r.stack))
    return tuple(out)


class Sandbox:
    """Handle for one running sandbox, owned by the single-threaded caller that spawned it."""

    __slots__ = (
        "_final",
        "_hold",
        "_pidfd",
        "_reaped",
        "cgroup",
        "egress",
        "pid",
        "spec",
        "started_at",
        "status",
    )

    def __init__(
        self,
        pid: int,
        pidfd: int,
        spec: SandboxSpec,
        cgroup: cgroups.CgroupHandle | None,
        egress: Any,
        hold: int = -1,
    ) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self._hold = hold  # the sandbox's mount namespace (prefork.Idle.mnt_fd), or -1
        self.spec = spec
        self.cgroup = cgroup
        self.egress = egress
        self.started_at = time.monotonic()
        self._reaped = False
        self.status: int | None = None  # wait status once reaped through ``wait``
        self._final: dict[str, int | None] | None = None  # cgroup stats captured by cleanup

    def kill(self) -> None:
        """SIGKILL the sandbox's init (the kernel then kills its whole pid namespace) and every
        process in its cgroup; uses the pidfd so a recycled pid can never be hit."""
        if self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                libc.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        elif not self._reaped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if self.cgroup is not None:
            self.cgroup.kill_all()

    def wait(self, timeout: float | None = None) -> int:
        """Convenience for callers without their own child reaper: waitpid with a timeout.

        Returns the raw wait status (again on later calls); raises ``TimeoutError`` if the sandbox
        is still running.
        """
        if self.status is not None:
            return self.status
        if self._pidfd >= 0:
            p = select.poll()
            p.register(self._pidfd, select.POLLIN)
            if not p.poll(None if timeout is None else max(0, int(timeout * 1000))):
                raise TimeoutError(f"sandbox {self.spec.name} pid {self.pid} still running")
            _, status = os.waitpid(self.pid, 0)
        else:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"sandbox {self.spec.name} pid {self.pid} still running")
                time.sleep(0.001)
        self._reaped = True
        self.status = status
        return status

    def mark_reaped(self) -> None:
        """Tell the handle the caller reaped ``pid`` (so ``kill`` never signals a recycled pid)."""
        self._reaped = True

    def cleanup(self) -> None:
        """After the pid was reaped: kill leftovers, remove the cgroup(s) and egress plumbing.

        The cgroup's final counters (OOM kills, peak memory, CPU) are captured first, so
        ``oom_killed()`` and ``stats()`` still answer afterwards (the gateway reports an OOM to
        the client and the instance list after the sandbox is gone). Idempotent.

        Also drops the caller's reference to the sandbox's mount namespace, so the kernel unmounts
        its tree here rather than in the tenant's exit (see prefork.Idle.mnt_fd)."""
        self._reaped = True
        try:
            if self.cgroup is not None:
                if self._final is None:
                    self._final = self.cgroup.stats()
                self.cgroup.remove()
        finally:
            prefork.drop_held(self._hold)
            self._hold = -1
            if self.egress is not None:
                self.egress.teardown()
                self.egress = None
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1

    def oom_killed(self) -> bool:
        """Did the kernel OOM-kill a process of this sandbox (also answers after cleanup)."""
        if self._final is not None:
            return bool(self._final.get("oom_kills"))
        return self.cgroup is not None and self.cgroup.oom_killed()

    def stats(self) -> dict[str, int | float | None]:
        out: dict[str, int | float | None] = {"pid": self.pid}
        if self._final is not None:
            out.update(self._final)
        elif self.cgroup is not None:
            out.update(self.cgroup.stats())
        out["uptime_s"] = round(time.monotonic() - self.started_at, 3)
        return out


def _resolv_conf(spec: SandboxSpec) -> bytes:
    if spec.network == "none":
        return b"# network: none (only lo)\n"
    from . import egress

    return egress.resolv_conf()


def _read_errpipe(r: int, deadline: float) -> bytes:
    chunks: list[bytes] = []
    p = select.poll()
    p.register(r, select.POLLIN)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("sandbox child did not exec in time")
        if not p.poll(int(remaining * 1000) + 1):
            continue
        chunk = os.read(r, 4096)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _reap(pid: int, deadline: float) -> None:
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        time.sleep(0.0005)


def _parse_errpipe(data: bytes) -> tuple[int | None, tuple[str, int, str] | None]:
    inner_pid: int | None = None
    error: tuple[str, int, str] | None = None
    while data:
        if data.startswith(b"P"):
            line, _, data = data.partition(b"\n")
            inner_pid = int(line[1:])
        elif data.startswith(b"E"):
            step, err, message = data[1:].decode(errors="replace").split("\0", 2)
            error = (step, int(err), message)
            break
        else:
            error = ("protocol", 0, f"unexpected data from child: {data[:80]!r}")
            break
    return inner_pid, error


def _plan(
    spec: SandboxSpec,
    argv: list[str],
    env: Env,
    mplan: mounts.MountPlan,
    *,
    rootless: bool,
    fds: tuple[int, int, int, int, tuple[int, ...], int, tuple[int, ...]],
    call: str = "",
    env_fd: int = -1,
) -> child.ChildPlan:
    """`env_fd`: where the child finds an EnvFile's memfd (an fd, or its index on the wire)."""
    stdout_fd, stderr_fd, devnull_fd, report_fd, join_fds, netns_fd, bind_fds = fds
    return child.ChildPlan(
        stdout_fd=stdout_fd,
        stderr_fd=stderr_fd,
        devnull_fd=devnull_fd,
        report_fd=report_fd,
        join_fds=join_fds,
        unshare_flags=(
            NS_FLAGS_ROOTLESS | (0 if netns_fd >= 0 else libc.CLONE_NEWNET)
            if rootless
            else libc.CLONE_NEWCGROUP
        ),
        ns_fds=None,
        prebuilt=not rootless,
        netns_fd=netns_fd,
        bind_fds=bind_fds,
        mounts=mplan,
        hostname=spec.hostname.encode(),
        rlimits=_rlimits(spec),
        uid=spec.uid,
        gid=spec.effective_gid,
        cap_last=caps.cap_last_cap(),
        argv=tuple(a.encode() for a in argv),
        env={} if isinstance(env, EnvFile) else {k.encode(): v.encode() for k, v in env.items()},
        env_fd=env_fd if isinstance(env, EnvFile) else -1,
        path=tuple(p.encode() for p in _path(env).split(":")),
        call=call,
        rootless=rootless,
        outer_uid=os.geteuid(),
        outer_gid=os.getegid(),
    )


def _send_plan(
    spec: SandboxSpec,
    argv: list[str],
    env: Env,
    mplan: mounts.MountPlan,
    stdio: tuple[int, int, int],
    pid: int,
    sock: socket.socket,
    netns_fd: int,
    call: str,
    exec_only: bool = False,
) -> None:
    """Hand the plan to the pre-forked child ``pid``; its fds travel by SCM_RIGHTS and the plan
    carries their indexes in the sent list. ``exec_only``: the child is the C launcher, which
    takes launcher.encode's format."""
    try:
        bind_fds = mounts.open_binds(mplan, (spec.uid, spec.effective_gid))
    except (OSError, ValueError) as e:  # ValueError: ids that collide with the storage owner's
        _kill_unplanned(pid)
        code = getattr(e, "errno", None) or errno.EINVAL
        raise SandboxError("mount_instance", code, str(e)) from e
    try:
        wire, send = _wire(spec, argv, env, stdio, mplan, bind_fds, netns_fd, call, exec_only)
        socket.send_fds(sock, [wire], send)
    except (OSError, ValueError) as e:  # ValueError: a plan the launcher cannot carry out
        _kill_unplanned(pid)
        raise SandboxError(
            "plan", getattr(e, "errno", None) or errno.EINVAL, f"plan not handed over: {e}"
        ) from e
    finally:
        for fd in bind_fds:  # the child holds its own copies now (or failed)
            os.close(fd)


def _path(env: Env) -> str:
    """The PATH execve's lookup uses inside the sandbox."""
    return env.path if isinstance(env, EnvFile) else env.get("PATH", DEFAULT_PATH)


def _kill_unplanned(pid: int) -> None:
    """A pre-forked child that will never get its plan: killed and reaped, not left a zombie."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _reap(pid, time.monotonic() + 1)


def _wire(
    spec: SandboxSpec,
    argv: list[str],
    env: Env,
    stdio: tuple[int, int, int],
    mplan: mounts.MountPlan,
    bind_fds: list[int],
    netns_fd: int,
    call: str,
    exec_only: bool,
) -> tuple[bytes, list[int]]:
    """The plan as the child reads it (launcher.encode's format for the C launcher), and the
    fds it refers to by index."""
    send = [stdio[0], stdio[1], stdio[2], *bind_fds] + ([netns_fd] if netns_fd >= 0 else [])
    nb = len(bind_fds)
    netns_idx = 3 + nb if netns_fd >= 0 else -1
    env_idx = -1
    if isinstance(env, EnvFile):  # the child reads it: its contents never pass through here
        env_idx = len(send)
        send.append(env.fd)
    if exec_only:
        wire = launcher.encode(
            devnull=2,
            stdout=0,
            stderr=1,
            netns=netns_idx,
            mp=mplan,
            bind_fds=tuple(range(3, 3 + nb)),
            hostname=spec.hostname.encode(),
            uid=spec.uid,
            gid=spec.effective_gid,
            rlimits=_rlimits(spec),
            argv=argv,
            env={} if isinstance(env, EnvFile) else env,
            path=_path(env).split(":"),
            seccomp_program=seccomp.compiled_filter().program,
            env_fd=env_idx,
        )
    else:
        wire = _plan(
            spec,
            argv,
            env,
            mplan,
            rootless=False,
            fds=(0, 1, 2, -1, (), netns_idx, tuple(range(3, 3 + nb))),
            call=call,
            env_fd=env_idx,
        ).to_wire()
    return wire, send


def _start_rootless(
    spec: SandboxSpec,
    argv: list[str],
    env: Env,
    mplan: mounts.MountPlan,
    stdio: tuple[int, int, int],
    netns_fd: int,
    call: str,
) -> tuple[int, int]:
    """Fork directly (no pre-built namespaces); returns (intermediate pid, report read fd)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    r, w = _high_fd(r), _high_fd(w)
    plan = _plan(
        spec,
        argv,
        env,
        mplan,
        rootless=True,
        fds=(*stdio, w, (), netns_fd, ()),
        call=call,
        env_fd=env.fd if isinstance(env, EnvFile) else -1,
    )
    libc.prctl(libc.PR_SET_CHILD_SUBREAPER, 1)
    try:
        pid = os.fork()
        if pid == 0:
            try:
                child.confine(plan)
            finally:
                os._exit(127)
    finally:
        os.close(w)
    return pid, r


def spawn(
    spec: SandboxSpec,
    argv: list[str],
    env: Env,
    *,
    stdout_fd: int,
    stderr_fd: int,
    stdin_fd: int | None = None,
) -> Sandbox:
    """Start ``argv`` fully confined per ``spec`` (see the module docstring for the step order).

    Must be called from a single-threaded process (the fork server). Returns once the child has
    exec'd; raises ``SandboxError`` naming the failed step otherwise. ``stdin_fd`` becomes the
    sandbox's fd 0 (default /dev/null).
    """
    return _spawn(spec, argv, env, (stdout_fd, stderr_fd, stdin_fd), "")


def spawn_call(
    spec: SandboxSpec,
    target: str,
    argv: list[str],
    env: Env,
    *,
    stdout_fd: int,
    stderr_fd: int,
    stdin_fd: int | None = None,
) -> Sandbox:
    """Zygote mode: like ``spawn``, but instead of execve the confined child calls ``target``
    ("module:qualname", normally pre-imported by the fork server) with ``sys.argv = argv`` and
    ``os.environ = env``; its return value (int) or SystemExit code is the exit status.

    Every confinement step still runs (uid, capabilities, no_new_privs, seccomp, fds), so the
    tenant code runs exactly as confined as after execve, without interpreter start-up. Children
    pre-forked by ``prewarm`` only know the modules the fork server had imported at that time.
    Returns once the sandbox is confined and about to call ``target``.
    """
    if not isinstance(target, str) or ":" not in target:
        raise SandboxSpecError("target", f"must be 'module:qualname', got {target!r}")
    return _spawn(spec, argv, env, (stdout_fd, stderr_fd, stdin_fd), target)


def prefork_for(spec: SandboxSpec) -> prefork.Idle:
    """A pre-forked child for ``spec``'s shape, not waited for: poll its ``sock``, then call
    ``complete_ready`` and hand it to ``start_call``. Root only (rootless mode has no pre-forking).
    """
    seccomp.compiled_filter()
    return prefork.fork_idle(
        _mount_plan(spec, False), spec.cgroup_parent, _limits(spec), wait=False
    )


def start_call(
    spec: SandboxSpec,
    target: str,
    argv: list[str],
    env: Env,
    *,
    stdout_fd: int,
    stderr_fd: int,
    stdin_fd: int | None = None,
    idle: prefork.Idle,
) -> PendingSandbox:
    """``spawn_call`` without waiting: hand ``idle`` (a ready pre-forked child, see
    ``prefork.fork_idle(wait=False)``) its plan and return at once. The caller polls the result's
    ``fileno()`` for readability, then calls ``finish()`` for the ``Sandbox`` (or the
    ``SandboxError``). Lets a single-threaded caller keep serving while children confine
    themselves (the waits are the kernel's, not CPU)."""
    if not isinstance(target, str) or ":" not in target:
        raise SandboxSpecError("target", f"must be 'module:qualname', got {target!r}")
    return _begin(spec, argv, env, (stdout_fd, stderr_fd, stdin_fd), target, idle)


class PendingSandbox:
    """A child that has its plan and is confining itself; owns everything the sandbox will."""

    __slots__ = (
        "cg",
        "deadline",
        "hold",
        "net",
        "pid",
        "pidfd",
        "report",
        "report_fd",
        "rootless",
        "spec",
    )

    def __init__(
        self,
        spec: SandboxSpec,
        pid: int,
        report: socket.socket | None,
        report_fd: int,
        rootless: bool,
        cg: cgroups.CgroupHandle | None,
        net: Any,
        pidfd: int = -1,
        hold: int = -1,
    ) -> None:
        self.spec, self.pid, self.report, self.report_fd = spec, pid, report, report_fd
        self.rootless, self.cg, self.net = rootless, cg, net
        self.pidfd, self.hold = pidfd, hold  # from the idle child (prefork.Idle), or -1
        self.deadline = time.monotonic() + SPAWN_TIMEOUT

    def fileno(self) -> int:
        """Readable once the child has exec'd, called its target, or failed."""
        return self.report_fd

    def finish(self) -> Sandbox:
        """The running sandbox, or ``SandboxError`` naming the step that failed (blocks until
        the child reports, at most until the spawn deadline)."""
        pid = self.pid
        try:
            try:
                data = _read_errpipe(self.report_fd, self.deadline)
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                _reap(pid, self.deadline + 1)
                raise SandboxError(
                    "execve", errno.ETIMEDOUT, "child did not exec in time"
                ) from None
            inner, error = _parse_errpipe(data)
            if self.rootless:
                _reap(pid, self.deadline)  # the intermediate exits right after forking pid 1
                if inner is None:
                    raise SandboxError(*(error or ("userns", 0, "intermediate died")))
                pid = inner
            if error is not None:
                _reap(pid, self.deadline)
                raise SandboxError(*error)
            pidfd, self.pidfd = self.pidfd, -1
            if pidfd < 0:
                try:
                    pidfd = libc.pidfd_open(pid)
                except OSError:
                    pidfd = -1
            sandbox = Sandbox(pid, pidfd, self.spec, self.cg, self.net, self.hold)
            self.cg = self.net = None
            self.hold = -1
            return sandbox
        finally:
            self._release()

    def abandon(self) -> None:
        """Kill the child and release what it held (the caller gave up on it)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        _reap(self.pid, time.monotonic() + 1)
        self._release()

    def _release(self) -> None:
        if self.report is not None:
            self.report.close()
            self.report = None
        elif self.report_fd >= 0:
            os.close(self.report_fd)
        self.report_fd = -1
        if self.pidfd >= 0:
            os.close(self.pidfd)
        prefork.drop_held(self.hold)
        self.pidfd = self.hold = -1
        if self.cg is not None:
            with contextlib.suppress(OSError, TimeoutError):
                self.cg.remove()
            self.cg = None
        if self.net is not None:
            self.net.teardown()
            self.net = None


def _spawn(
    spec: SandboxSpec,
    argv: list[str],
    env: Env,
    stdio: tuple[int, int, int | None],
    call: str,
) -> Sandbox:
    return _begin(spec, argv, env, stdio, call).finish()


def _begin(
    spec: SandboxSpec,
    argv: list[str],
    env: Env,
    stdio: tuple[int, int, int | None],
    call: str,
    idle: prefork.Idle | None = None,
) -> PendingSandbox:
    """Everything up to the plan reaching the child: ``idle`` if given, else a pooled or newly
    forked child. On failure nothing stays behind (child, cgroup, egress plumbing)."""
    validate_argv(argv)
    if isinstance(env, EnvFile):
        if not isinstance(env.fd, int) or env.fd < 0:
            raise SandboxSpecError("env", "an EnvFile needs an open fd")
    else:
        validate_env(env)
    rootless = os.geteuid() != 0
    out_err_in = (stdio[0], stdio[1], _devnull() if stdio[2] is None else stdio[2])
    seccomp.compiled_filter()  # built once, before any fork
    limits = _limits(spec)
    cg: cgroups.CgroupHandle | None = None
    net: Any = None
    report: socket.socket | None = None
    report_fd = pidfd = hold = -1
    try:
        if spec.network == "egress":
            from . import egress

            try:
                net = egress.setup(spec)
            except OSError as e:
                raise SandboxError("egress", e.errno or 0, str(e)) from e
        netns_fd = net.netns_fd if net is not None else -1
        mplan = _mount_plan(spec, rootless)
        if rootless:
            pid, report_fd = _start_rootless(spec, argv, env, mplan, out_err_in, netns_fd, call)
        else:
            try:
                backend = cgroups.detect()
            except Exception as e:
                raise SandboxError("cgroup_create", errno.ENODEV, str(e)) from e
            if idle is None:
                try:
                    # A plan the C launcher cannot carry out goes to a Python child instead.
                    execs = not call and launcher.can_run(mplan)
                    idle = prefork.POOL.take(mplan, spec.cgroup_parent, limits, exec_start=execs)
                except OSError as e:
                    raise SandboxError("namespaces", e.errno or 0, f"preparing a child: {e}") from e
            if idle.exec_only and call:
                raise SandboxError("resolve", errno.EINVAL, "an exec-only child cannot call code")
            try:
                cg = backend.activate(idle.cgroup, spec.name, limits, idle.limits)
            except OSError as e:
                raise SandboxError("cgroup_create", e.errno or 0, str(e)) from e
            pid, report, exec_only = idle.pid, idle.sock, idle.exec_only
            pidfd, hold, idle.pidfd, idle.mnt_fd = idle.pidfd, idle.mnt_fd, -1, -1
            idle = None
            _send_plan(spec, argv, env, mplan, out_err_in, pid, report, netns_fd, call, exec_only)
            report_fd = report.fileno()
        pending = PendingSandbox(spec, pid, report, report_fd, rootless, cg, net, pidfd, hold)
        report, report_fd, cg, net, pidfd, hold = None, -1, None, None, -1, -1
        return pending
    finally:
        if idle is not None:
            idle.discard()
        if report is not None:
            report.close()
        elif report_fd >= 0:
            os.close(report_fd)
        if pidfd >= 0:
            os.close(pidfd)
        prefork.drop_held(hold)
        if cg is not None:
            with contextlib.suppress(OSError, TimeoutError):
                cg.remove()
        if net is not None:
            net.teardown()


def _mount_plan(spec: SandboxSpec, rootless: bool) -> mounts.MountPlan:
    base = None
    if rootless:
        base = f"/tmp/.dorm-sandbox-root-{os.geteuid()}"
        os.makedirs(base, mode=0o700, exist_ok=True)
    return mounts.plan(spec, rootless=rootless, resolv_conf=_resolv_conf(spec), base=base)


def prewarm(spec: SandboxSpec, count: int = 2, *, exec_only: bool | None = None) -> int:
    """Pre-fork ``count`` idle children (each in its own pre-built namespaces) for sandboxes shaped
    like ``spec`` (same rootfs, extra binds, network mode); call from the fork server when idle.
    Also compiles the seccomp filter. Returns how many were forked; 0 in rootless mode.

    ``exec_only=True`` builds children that hold the C launcher (launcher.py): ~1 ms faster
    ``spawn``s, but no ``spawn_call``. None (default) decides by what this layout has been used
    for so far: launcher children once it has only ever been ``spawn``ed, Python ones otherwise."""
    seccomp.compiled_filter()
    if os.geteuid() != 0:
        return 0
    return prefork.POOL.prewarm(
        _mount_plan(spec, False), spec.cgroup_parent, count, _limits(spec), exec_only=exec_only
    )


def _limits(spec: SandboxSpec) -> cgroups.Limits:
    return cgroups.Limits(
        memory=spec.memory,
        memory_high=spec.memory_high,
        cpu=spec.cpu,
        cpu_weight=spec.cpu_weight,
        pids=spec.pids,
    )


SOCKET_DIR_SIZE: Final = 1 << 20  # bytes a tenant may keep in its /run/dorm
SOCKET_DIR_INODES: Final = 256  # and files (a socket, the name files, a pid file...)


def prepare_socket_dir(path: str, uid: int, gid: int | None = None) -> None:
    """Create the per-instance socket dir owned by the instance uid, mode 0700 (host side).

    As root it is a tmpfs of its own, mounted on the host at `path` (SOCKET_DIR_SIZE bytes,
    SOCKET_DIR_INODES files, nosuid nodev noexec): the tenant writes there, and a directory of
    the host's filesystem let it fill the host's disk (RLIMIT_FSIZE caps a file, not how many;
    a tenant with a 256 MiB memory limit wrote 256 MiB to the gateway's disk in the test). Its
    pages are charged to whoever writes them: the tenant's memory cgroup. Whoever removes the
    dir unmounts it first (gateway.forkserver.remove_tree)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    gid = uid if gid is None else gid
    if os.geteuid() == 0 and not os.path.ismount(path):
        options = f"size={SOCKET_DIR_SIZE},nr_inodes={SOCKET_DIR_INODES},mode=0700"
        libc.mount(
            b"tmpfs",
            path.encode(),
            b"tmpfs",
            libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC,
            f"{options},uid={uid},gid={gid}".encode(),
        )
    os.chown(path, uid, gid)
    os.chmod(path, 0o700)
