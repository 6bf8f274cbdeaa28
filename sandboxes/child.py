"""The child side of spawn: confinement steps, in order, ending in execve.

Everything here runs after ``fork`` in a process that must never return into the caller's code:
every path ends in ``execve`` or ``os._exit``. Failures are written to the report fd as
``E<step>\\0<errno>\\0<message>`` and the parent raises ``SandboxError`` from it; success is the
report fd closing on exec (it is close-on-exec), exactly like subprocess's error pipe.

Steps (names are what ``SandboxError.step`` reports; see spawn.py for why this order):
stdio, cgroup_join, namespaces, [mount_private, mount_static, mount_proc, pivot_root, loopback:
only when not pre-built, i.e. rootless], mount_instance, chdir, hostname, rlimits, session,
bounding_set, ids, parent_death, capabilities, no_new_privs, seccomp, fds, execve.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import importlib
import marshal
import os
import resource
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NoReturn

from . import caps, libc, mounts, netns, seccomp
from .spec import read_env_file

STEPS: Final = (
    "stdio",
    "cgroup_join",
    "namespaces",
    "mount_private",
    "mount_static",
    "mount_proc",
    "pivot_root",
    "mount_instance",
    "chdir",
    "loopback",
    "hostname",
    "rlimits",
    "session",
    "bounding_set",
    "ids",
    "parent_death",
    "capabilities",
    "no_new_privs",
    "seccomp",
    "fds",
    "execve",
)


@dataclass(frozen=True, slots=True)
class ChildPlan:
    """Everything the child needs, computed in the parent so the child does no lookups.

    Only plain data: it crosses a socket to pre-forked children as a ``marshal``-ed tuple
    (``to_wire``/``from_wire``; marshal is C-only and ~10x faster than pickle for this). fd fields
    hold fd numbers valid in the child (or, on the wire, indexes into the SCM_RIGHTS list).
    """

    stdout_fd: int
    stderr_fd: int
    devnull_fd: int
    report_fd: int
    join_fds: tuple[int, ...]
    unshare_flags: int
    ns_fds: tuple[int, int, int, int] | None  # (mnt, net, ipc, uts) to join; None if entered
    prebuilt: bool  # static root, lo and namespaces already set up (pre-forked / pooled)
    netns_fd: int  # egress netns to join instead of the pre-built one, or -1
    bind_fds: tuple[int, ...]  # detached trees for mounts.binds (opened by the parent), or ()
    mounts: mounts.MountPlan
    hostname: bytes
    rlimits: tuple[tuple[int, int], ...]
    uid: int
    gid: int
    cap_last: int
    argv: tuple[bytes, ...]
    env: dict[bytes, bytes]
    env_fd: int  # an EnvFile's memfd to read the environment from instead of `env`, or -1
    path: tuple[bytes, ...]
    call: str  # "" → execve(argv); "module:qualname" → call it in-process (zygote mode)
    rootless: bool
    outer_uid: int
    outer_gid: int

    def to_wire(self) -> bytes:
        m = self.mounts
        fields = [getattr(self, f) for f in self.__slots__]
        fields[self.__slots__.index("mounts")] = (
            m.base,
            m.root_data,
            m.instance_ops,
            m.binds,
            m.cwd,
        )
        return marshal.dumps(tuple(fields))

    @classmethod
    def from_wire(cls, data: bytes, fds: list[int], report_fd: int) -> ChildPlan:
        """Rebuild a plan sent by ``to_wire``, mapping fd indexes onto the received ``fds``."""
        t = list(marshal.loads(data))
        names = cls.__slots__
        d = dict(zip(names, t, strict=True))
        base, root_data, instance_ops, binds, cwd = d["mounts"]
        d["mounts"] = mounts.MountPlan(base, root_data, _NO_KEY, (), instance_ops, binds, cwd)
        d["stdout_fd"] = fds[d["stdout_fd"]]
        d["stderr_fd"] = fds[d["stderr_fd"]]
        d["devnull_fd"] = fds[d["devnull_fd"]]
        d["report_fd"] = report_fd
        d["join_fds"] = tuple(fds[i] for i in d["join_fds"])
        d["netns_fd"] = fds[d["netns_fd"]] if d["netns_fd"] >= 0 else -1
        d["bind_fds"] = tuple(fds[i] for i in d["bind_fds"])
        d["env_fd"] = fds[d["env_fd"]] if d["env_fd"] >= 0 else -1
        return cls(**d)

    def environment(self) -> dict[bytes, bytes]:
        """The tenant's environment: `env`, or read (only now, in this process) from `env_fd`."""
        return self.env if self.env_fd < 0 else read_env_file(self.env_fd)


_NO_KEY: Final[mounts.LayoutKey] = (None, (), b"", False, "")


def reset_signals() -> None:
    """Python ignores SIGPIPE and SIGXFSZ, and whatever started dorm may have left glibc's two
    reserved signals ignored (GNU make does); ignored dispositions survive execve, so restore
    them all, and unblock everything the fork server may have blocked. The C launcher does the
    same for every signal: both paths leave the tenant the same dispositions."""
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    for reserved in libc.GLIBC_RESERVED_SIGNALS:
        libc.default_signal_action(reserved)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def step_stdio(p: ChildPlan) -> None:
    # Sources at 0-2 would be clobbered by the dup2s below: move them up first.
    out = p.stdout_fd if p.stdout_fd > 2 else fcntl.fcntl(p.stdout_fd, fcntl.F_DUPFD_CLOEXEC, 3)
    err = p.stderr_fd if p.stderr_fd > 2 else fcntl.fcntl(p.stderr_fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.dup2(p.devnull_fd, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    if not p.prebuilt:  # pre-forked children reset signals while idle
        reset_signals()


def step_cgroup_join(p: ChildPlan) -> None:
    for fd in p.join_fds:
        os.write(fd, b"0")


def join_prebuilt(ns_fds: tuple[int, int, int, int]) -> None:
    """Enter a pre-built (mnt, net, ipc, uts) set from nspool."""
    mnt, net, ipc, uts = ns_fds
    libc.setns(net, libc.CLONE_NEWNET)
    libc.setns(ipc, libc.CLONE_NEWIPC)
    libc.setns(uts, libc.CLONE_NEWUTS)
    libc.setns(mnt, libc.CLONE_NEWNS)


def step_namespaces(p: ChildPlan) -> None:
    if p.ns_fds is not None:
        join_prebuilt(p.ns_fds)
    if p.netns_fd >= 0:
        libc.setns(p.netns_fd, libc.CLONE_NEWNET)
    libc.unshare(p.unshare_flags)


def step_rlimits(p: ChildPlan) -> None:
    for res, value in p.rlimits:
        resource.setrlimit(res, (value, value))


def step_ids(p: ChildPlan) -> None:
    if p.rootless:
        return  # only our own uid is mapped; see doctor.missing_protections()
    caps.set_ids(p.uid, p.gid)


def step_fds() -> None:
    try:
        libc.close_range(3, 0xFFFFFFFF, libc.CLOSE_RANGE_CLOEXEC)
    except OSError as e:
        if e.errno != errno.ENOSYS:
            raise
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2:
                with contextlib.suppress(OSError):
                    os.set_inheritable(fd, False)


def step_execve(p: ChildPlan) -> NoReturn:
    first = p.argv[0]
    candidates = [first] if b"/" in first else [d + b"/" + first for d in p.path if d]
    last = OSError(errno.ENOENT, "not found")
    env = p.environment()
    for path in candidates:
        try:
            os.execve(path, p.argv, env)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR) or last.errno == errno.ENOENT:
                last = e
    raise OSError(last.errno, f"execve {first.decode(errors='replace')}: {last.strerror}")


def resolve_target(spec: str) -> Callable[[], object]:
    """``module:qualname`` → the callable; the module is normally already imported by the fork
    server (a zygote), otherwise it must be importable from inside the sandbox."""
    module_name, _, qualname = spec.partition(":")
    obj: object = sys.modules.get(module_name) or importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec} is not callable")
    return obj


def run_call(p: ChildPlan, target: Callable[[], object]) -> NoReturn:
    """Zygote mode: become the tenant without execve, fully confined (every step above ran).

    The process keeps the fork server's preloaded modules (that is the point: no interpreter
    start-up), gets exactly ``env`` as ``os.environ`` and ``argv`` as ``sys.argv``, default
    signal handlers, fresh stdio objects, and only fds 0-2; closing the report channel tells
    ``spawn`` the sandbox is up. Objects inherited from the fork server are frozen out of the
    garbage collector, so no finalizer can ever close an fd number the tenant reuses.
    """
    os.environ.clear()
    os.environ.update({k.decode(): v.decode() for k, v in p.environment().items()})
    sys.argv = [a.decode() for a in p.argv]
    for sig in range(1, signal.NSIG):
        with contextlib.suppress(OSError, ValueError, TypeError):
            if callable(signal.getsignal(sig)):
                signal.signal(sig, signal.SIG_DFL)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    libc.close_range(3, 0xFFFFFFFF, 0)  # also closes the report channel: success
    gc.freeze()
    gc.enable()
    code = 0
    try:
        result = target()
        code = result if isinstance(result, int) else 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
    os._exit(code & 0xFF)


def rootless_userns(p: ChildPlan) -> None:
    # A process that changed uids is non-dumpable, which makes /proc/self/uid_map root-owned and
    # unwritable from the new namespace; execve resets dumpability anyway.
    libc.prctl(libc.PR_SET_DUMPABLE, 1)
    libc.unshare(libc.CLONE_NEWUSER)
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{p.outer_uid} {p.outer_uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{p.outer_gid} {p.outer_gid} 1")
    libc.unshare(libc.CLONE_NEWPID)


def own_pidfd() -> int:
    """A pidfd on this (intermediate) process, for the child it forks to wait on; -1 without pidfd
    support (kernel < 5.3), where the parent-death race below stays open."""
    try:
        return libc.pidfd_open(os.getpid())
    except OSError:
        return -1


def fail(report_fd: int, step: str, err: int, message: str) -> NoReturn:
    with contextlib.suppress(OSError):
        os.write(report_fd, b"E" + f"{step}\0{err}\0{message}".encode(errors="replace"))
    os._exit(127)


def confine(p: ChildPlan) -> NoReturn:
    """Run every step in order and exec; never returns."""
    # A collection would touch every tracked object and copy-on-write most of the fork server's
    # heap; the child only lives until execve, so it never needs one.
    gc.disable()
    intermediate = -1  # rootless: pidfd on the process that forks pid 1 (see caps.await_exit)
    step = "stdio"
    try:
        step_stdio(p)
        step = "cgroup_join"
        step_cgroup_join(p)
        if p.rootless:
            step = "userns"
            rootless_userns(p)
            intermediate = own_pidfd()
            pid = os.fork()
            if pid != 0:
                os.write(p.report_fd, b"P%d\n" % pid)
                os._exit(0)
        step = "namespaces"
        step_namespaces(p)
        bind_fds = p.bind_fds
        if not p.prebuilt:
            step = "mount_private"
            mounts.make_private()
            step = "mount_static"
            mounts.build_static(p.mounts)
            bind_fds = tuple(mounts.open_binds(p.mounts))
            step = "mount_proc"
            mounts.mount_proc(p.mounts.base + b"/proc")
            step = "pivot_root"
            mounts.pivot(p.mounts)
        step = "mount_instance"
        mounts.build_instance(p.mounts, bind_fds)
        step = "chdir"
        mounts.enter_cwd(p.mounts)
        if not p.prebuilt:  # pre-built and egress netns already have lo up
            step = "loopback"
            netns.loopback_up()
        step = "hostname"
        netns.set_hostname(p.hostname)
        step = "rlimits"
        step_rlimits(p)
        if not p.prebuilt:  # a pre-forked child did both while idle (prefork._idle_main)
            step = "session"
            caps.new_session()
            step = "bounding_set"
            caps.drop_bounding_set(p.cap_last)
        step = "ids"
        step_ids(p)
        step = "parent_death"
        caps.await_exit(intermediate)
        caps.arm_parent_death(p.report_fd)
        step = "capabilities"
        caps.clear_capabilities()
        step = "no_new_privs"
        caps.no_new_privs()
        step = "seccomp"
        seccomp.compiled_filter().load()
        if p.call:
            step = "resolve"
            target = resolve_target(p.call)
            step = "fds"
            run_call(p, target)
        step = "fds"
        step_fds()
        step = "execve"
        step_execve(p)
    except OSError as e:
        fail(p.report_fd, step, e.errno or 0, str(e))
    except BaseException as e:
        fail(p.report_fd, step, 0, f"{type(e).__name__}: {e}")
