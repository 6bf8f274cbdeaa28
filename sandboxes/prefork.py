"""Pre-forked, half-confined children: the fork is paid before the request arrives.

(Children for execve starts are not forked at all any more: ``fork_idle(exec_only=True)`` starts
the C launcher with posix_spawn, see launcher.py. What follows describes the forked Python
children, which zygote calls need.)

Why: on this class of VM a fork of the Python fork server costs ~0.5 ms in the parent and the child
needs 1-3 ms of copy-on-write page faults before it runs its first step — more than the whole 3 ms
budget. So, when idle, the fork server ``prewarm``s: it builds a namespace set (nspool), forks a
child that is pid 1 of a fresh pid namespace, and that child joins the set, arms its parent-death
signal and blocks on a socket. ``spawn`` then only sends the per-instance plan (pickled plain data)
plus the fds it needs (stdout, stderr, /dev/null, cgroup.procs, egress netns) with SCM_RIGHTS; the
child runs the remaining steps (cgroup join, per-instance mounts, pivot_root, privileges, seccomp)
and execs. The same socket carries step failures back; its close-on-exec EOF signals success.

An idle child holds: root credentials in fresh namespaces nobody else uses, no tenant data, and
nothing but its socket. It is used for exactly one sandbox. The cost: each idle child is a
fork-server-sized process (mostly shared pages) and its already-copied pages are charged to the
fork server's memory cgroup, not the tenant's (≈1-2 MiB). Callers that reap with ``waitpid(-1)``
must ignore ``idle_pids()``.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import select
import signal
import socket
from dataclasses import dataclass
from typing import Final, NoReturn

from . import caps, cgroups, child, launcher, libc, mounts, nspool

MAX_MSG: Final = 1 << 20
READY: Final = b"R"
READY_TIMEOUT: Final = 30.0
MAX_FDS: Final = 16


PoolKey = tuple[mounts.LayoutKey, str]


@dataclass(slots=True)
class Idle:
    """One idle pre-forked child, owned by the pool until ``take``n."""

    pid: int
    sock: socket.socket
    key: PoolKey
    cgroup: cgroups.CgroupHandle
    limits: cgroups.Limits | None  # written at prewarm (None: unlimited until activated)
    exec_only: bool = False  # runs the C launcher (launcher.py): execve starts only, no spawn_call
    # Opened while idle, handed to the Sandbox: a pidfd (no pidfd_open on the start path) and a
    # reference to the mount namespace, so the tenant's exit does not unmount its tree (an
    # expedited RCU grace period plus ~15 unmounts, ~0.2-0.4 ms here) before its parent can see
    # the exit; Sandbox.cleanup drops it.
    pidfd: int = -1
    mnt_fd: int = -1

    def complete_ready(self) -> None:
        """For ``fork_idle(wait=False)``: the socket turned readable; take the child's word
        (raises ``OSError`` if it failed, and the caller must then ``discard`` it)."""
        _check_ready(self.sock.recv(4096, socket.MSG_DONTWAIT))

    def discard(self) -> None:
        """Kill and reap the child and remove its cgroup (used on failures and by ``clear``)."""
        self.sock.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self.release_fds()
        with contextlib.suppress(OSError, TimeoutError):
            self.cgroup.remove()

    def release_fds(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
        drop_held(self.mnt_fd)
        self.pidfd = self.mnt_fd = -1


_held: set[int] = set()
"""Mount-namespace fds the fork server holds for idle children and running sandboxes. A Python
child forked later inherits copies and closes them while idle: a copy kept until its own start
would make that start (or exec) the one that unmounts a finished neighbour's tree."""


def drop_held(fd: int) -> None:
    """Close a held mount-namespace fd (``Idle.mnt_fd``); -1 is ignored."""
    if fd >= 0:
        _held.discard(fd)
        os.close(fd)


_counter = itertools.count()


_own_pidns_fd: int | None = None


def own_pidns_fd() -> int:
    global _own_pidns_fd
    if _own_pidns_fd is None:
        _own_pidns_fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    return _own_pidns_fd


def fork_into_new_pidns() -> int:
    """fork() with the child as pid 1 of a new pid namespace, the parent staying in its own.

    ``unshare(CLONE_NEWPID)`` only changes the namespace of the caller's *future children*; the
    parent ``setns``-es straight back, so nothing else it forks is affected.
    """
    libc.unshare(libc.CLONE_NEWPID)
    try:
        pid = os.fork()
    except BaseException:
        libc.setns(own_pidns_fd(), libc.CLONE_NEWPID)
        raise
    if pid != 0:
        libc.setns(own_pidns_fd(), libc.CLONE_NEWPID)
    return pid


def _warmup_wire(mp: mounts.MountPlan) -> bytes:
    """A plan shaped like a real one, decoded once while idle: the decode path's first-touch
    (copy-on-write) page faults then happen before the request, not after."""
    return child.ChildPlan(
        stdout_fd=0,
        stderr_fd=0,
        devnull_fd=0,
        report_fd=-1,
        join_fds=(),
        unshare_flags=0,
        ns_fds=None,
        prebuilt=True,
        netns_fd=-1,
        bind_fds=tuple(0 for _ in mp.binds),
        mounts=mp,
        hostname=b"dorm",
        rlimits=((7, 1024),),
        uid=65534,
        gid=65534,
        cap_last=40,
        argv=(b"/bin/true",),
        env={b"PATH": b"/usr/bin:/bin"},
        env_fd=-1,
        path=(b"/usr/bin", b"/bin"),
        call="",
        rootless=False,
        outer_uid=0,
        outer_gid=0,
    ).to_wire()


def _idle_main(
    sock: socket.socket, ns: nspool.NamespaceSet, join_fds: list[int], warmup: bytes
) -> NoReturn:
    """Pre-forked child: join its cgroup and the pre-built namespaces, wait for a plan, confine.

    (Exec-only children run the same steps in C: launcher.c.)"""
    gc.disable()
    try:
        for fd in _held:  # other sandboxes' mount namespaces: not ours to keep alive
            with contextlib.suppress(OSError):
                os.close(fd)
        for fd in join_fds:  # the slow part of a cgroup move (an RCU grace period) happens here
            os.write(fd, b"0")
            os.close(fd)
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
        p = select.poll()
        p.register(sock.fileno(), select.POLLIN)
        for _fd, ev in p.poll(0):
            if ev & (select.POLLHUP | select.POLLERR):
                os._exit(0)  # the fork server died between fork and prctl
        child.join_prebuilt(ns.fds())
        ns.close()
        mounts.mount_proc()  # we are pid 1 of our pid namespace: its procfs, ahead of time
        # Instance-independent privilege steps, done while idle: a new session, and an empty
        # capability bounding set (effective/permitted caps stay until the uid change at spawn,
        # so the remaining mount and setns work still succeeds).
        caps.new_session()
        caps.drop_bounding_set(caps.cap_last_cap())
        child.reset_signals()
        child.ChildPlan.from_wire(warmup, [-1], -1)
        sock.send(READY)
        msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_MSG, MAX_FDS)
    except BaseException as e:
        child.fail(sock.fileno(), "namespaces", getattr(e, "errno", 0) or 0, str(e))
    if not msg:
        os._exit(0)  # pool drained: the parent closed our socket
    try:
        plan = child.ChildPlan.from_wire(msg, fds, sock.fileno())
    except BaseException as e:
        child.fail(sock.fileno(), "plan", 0, f"{type(e).__name__}: {e}")
    child.confine(plan)


def _spawn_launcher(sock: socket.socket, ns: nspool.NamespaceSet, join_fds: list[int]) -> int:
    """Start the C launcher as pid 1 of a new pid namespace with posix_spawn (vfork: the fork
    server's memory is neither copied nor write-protected, so neither this nor the next start
    pays for it); it joins the cgroup and namespaces itself (launcher.c)."""
    fds = [sock.fileno(), *ns.fds(), *join_fds]
    argv = ["dorm-launcher", "idle", str(caps.cap_last_cap()), *(str(fd) for fd in fds)]
    actions = [(os.POSIX_SPAWN_DUP2, fd, fd) for fd in fds]  # fd onto itself: inheritable
    binary = launcher.path()  # before unshare: a rebuild forks the compiler
    libc.unshare(libc.CLONE_NEWPID)
    try:
        return os.posix_spawn(binary, argv, {}, file_actions=actions)
    finally:
        libc.setns(own_pidns_fd(), libc.CLONE_NEWPID)


def fork_idle(
    mp: mounts.MountPlan,
    cgroup_parent: str,
    limits: cgroups.Limits | None = None,
    *,
    wait: bool = True,
    exec_only: bool = False,
) -> Idle:
    """Create an idle cgroup and a namespace set, fork a child into both (in the fork server).

    With ``limits`` (the expected spec's), they are written now so ``spawn`` need not. With
    ``wait=False`` it returns before the child has joined them (its cgroup join waits for an RCU
    grace period: milliseconds of nothing to do): the caller polls ``sock`` and then calls
    ``complete_ready``. ``exec_only`` children are the C launcher (faster execve starts, no
    zygote calls); the caller must have checked ``launcher.available()``."""
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        # unshare(CLONE_NEWNS) needs an unshared fs_struct, and fork() from a threaded process
        # copies locks other threads may hold: the fork server must be single-threaded.
        raise OSError(22, f"the fork server must be single-threaded (it has {threads} threads)")
    backend = cgroups.detect()
    cg = backend.make(cgroup_parent, f"idle-{os.getpid()}-{next(_counter)}")
    join_fds: list[int] = []
    try:
        if limits is not None:
            backend.apply_limits(cg, limits)
        join_fds = cg.open_join_fds()
        warmup = b"" if exec_only else _warmup_wire(mp)
        ns = nspool.build(mp)
        try:
            parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                if exec_only:
                    pid = _spawn_launcher(child_sock, ns, join_fds)
                else:
                    pid = fork_into_new_pidns()
                    if pid == 0:
                        try:
                            parent_sock.close()
                            _idle_main(child_sock, ns, join_fds, warmup)
                        finally:
                            os._exit(127)
            except BaseException:
                parent_sock.close()
                raise
            finally:
                child_sock.close()
            mnt_fd, ns.mnt = ns.mnt, -1  # kept: see Idle.mnt_fd
            _held.add(mnt_fd)
        finally:
            ns.close()
    except BaseException:
        with contextlib.suppress(OSError, TimeoutError):
            cg.remove()
        raise
    finally:
        for fd in join_fds:
            os.close(fd)
    try:
        pidfd = libc.pidfd_open(pid)
    except OSError:
        pidfd = -1
    idle = Idle(pid, parent_sock, (mp.key, cgroup_parent), cg, limits, exec_only, pidfd, mnt_fd)
    if not wait:
        return idle
    try:
        _await_ready(idle)
    except BaseException:
        idle.discard()
        raise
    return idle


def _await_ready(idle: Idle) -> None:
    """Block until the child has joined its cgroup and namespaces (or report why it could not).

    The cgroup join waits for an RCU grace period; waiting here keeps that wait inside prewarm
    (or inside the on-demand path) instead of letting it surface in a later ``spawn``."""
    idle.sock.settimeout(READY_TIMEOUT)
    try:
        msg = idle.sock.recv(4096)
    except TimeoutError:
        raise OSError(110, "pre-forked child did not get ready") from None
    finally:
        idle.sock.settimeout(None)
    _check_ready(msg)


def _check_ready(msg: bytes) -> None:
    if msg == READY:
        return
    if msg.startswith(b"E"):
        step, err, message = msg[1:].decode(errors="replace").split("\0", 2)
        raise OSError(int(err), f"pre-forked child failed at {step}: {message}")
    raise OSError(5, f"pre-forked child exited during setup ({msg[:40]!r})")


class PreforkPool:
    """Idle children per (filesystem layout, cgroup parent)."""

    def __init__(self) -> None:
        self._idle: dict[PoolKey, list[Idle]] = {}
        # Which kinds of start each layout has seen: ``prewarm(exec_only=None)`` builds launcher
        # children only for layouts that exec and never call (a zygote needs Python children).
        self._seen: dict[PoolKey, set[bool]] = {}

    def take(
        self,
        mp: mounts.MountPlan,
        cgroup_parent: str,
        limits: cgroups.Limits,
        *,
        exec_start: bool = False,
    ) -> Idle:
        """An idle child for this layout, preferring one whose cgroup already has ``limits``.

        ``exec_start``: the start will execve (not call preloaded code), so a launcher child
        fits too, and is preferred (its start is ~1 ms shorter); without one idle, a launcher
        child is forked on demand when the launcher is available."""
        key = (mp.key, cgroup_parent)
        self._seen.setdefault(key, set()).add(exec_start)
        idle = self._idle.get(key)
        while idle:
            fits = [i for i in idle if exec_start or not i.exec_only]
            if not fits:
                break
            best = max(reversed(fits), key=lambda i: (i.exec_only, i.limits == limits))
            idle.remove(best)
            if _alive(best):
                return best
            best.discard()
        return fork_idle(mp, cgroup_parent, exec_only=exec_start and launcher.available())

    def prewarm(
        self,
        mp: mounts.MountPlan,
        cgroup_parent: str,
        count: int,
        limits: cgroups.Limits | None = None,
        *,
        exec_only: bool | None = None,
    ) -> int:
        """Fork idle children until ``count`` of this layout, ``limits`` and kind are idle.

        ``exec_only`` None: launcher children if every start of this layout so far was an
        execve (and the launcher is available), otherwise Python children, which serve both."""
        key = (mp.key, cgroup_parent)
        if exec_only is None:
            exec_only = self._seen.get(key) == {True}
        exec_only = exec_only and launcher.available()
        idle = self._idle.setdefault(key, [])
        built = 0
        while sum(1 for i in idle if i.limits == limits and i.exec_only == exec_only) < count:
            idle.append(fork_idle(mp, cgroup_parent, limits, exec_only=exec_only))
            built += 1
        return built

    def available(self, mp: mounts.MountPlan, cgroup_parent: str) -> int:
        return len(self._idle.get((mp.key, cgroup_parent), ()))

    def idle_pids(self) -> list[int]:
        return [i.pid for idle in self._idle.values() for i in idle]

    def discard(self, pid: int) -> bool:
        """Dismiss one idle child (a pool shrinking after a burst); False if it is not idle here."""
        for idle in self._idle.values():
            for i in idle:
                if i.pid == pid:
                    idle.remove(i)
                    i.discard()
                    return True
        return False

    def reap_dead(self) -> list[int]:
        """Drop idle children that died while waiting (OOM killer, operator); returns their pids,
        so the owner can build replacements now instead of finding the hole at the next claim."""
        dead = [i for idle in self._idle.values() for i in idle if not _alive(i)]
        for i in dead:
            self._idle[i.key].remove(i)
            i.discard()
        return [i.pid for i in dead]

    def clear(self) -> None:
        """Dismiss every idle child (closing its socket makes it exit) and reap it."""
        for idle in self._idle.values():
            for i in idle:
                i.discard()
        self._idle.clear()


def _alive(idle: Idle) -> bool:
    """An idle child that died (OOM killer, operator) must not be handed a tenant."""
    try:
        pid, _ = os.waitpid(idle.pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return pid == 0


POOL: Final = PreforkPool()
