"""Thin typed ctypes bindings for the Linux syscalls Python 3.11 does not expose.

Why ctypes and not a C extension: the fork server must stay a plain Python process with no build
step, and every call here is a single syscall whose cost (≈1 µs through ctypes) is negligible next
to namespace creation. Each wrapper raises ``OSError`` with the real errno so confinement steps can
report exactly what failed.

Only x86_64 and aarch64 syscall numbers are listed; other architectures raise at import of the
wrapper that needs a number (``syscall_nr``), which ``doctor.host_report`` surfaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import signal
from typing import Final

_libc = ctypes.CDLL(None, use_errno=True)

MACHINE: Final = platform.machine()

# Syscall numbers that glibc 2.36 lacks wrappers for (or whose wrappers ctypes cannot reach).
_SYSCALLS: Final[dict[str, dict[str, int]]] = {
    "x86_64": {
        "pivot_root": 155,
        "capset": 126,
        "unshare": 272,
        "setns": 308,
        "seccomp": 317,
        "pidfd_open": 434,
        "pidfd_send_signal": 424,
        "close_range": 436,
        "mount_setattr": 442,
        "open_tree": 428,
        "move_mount": 429,
        "rt_sigaction": 13,
    },
    "aarch64": {
        "pivot_root": 41,
        "capset": 91,
        "unshare": 97,
        "setns": 268,
        "seccomp": 277,
        "pidfd_open": 434,
        "pidfd_send_signal": 424,
        "close_range": 436,
        "mount_setattr": 442,
        "open_tree": 428,
        "move_mount": 429,
        "rt_sigaction": 134,
    },
}

# clone/unshare flags
CLONE_NEWNS: Final = 0x00020000
CLONE_NEWCGROUP: Final = 0x02000000
CLONE_NEWUTS: Final = 0x04000000
CLONE_NEWIPC: Final = 0x08000000
CLONE_NEWUSER: Final = 0x10000000
CLONE_NEWPID: Final = 0x20000000
CLONE_NEWNET: Final = 0x40000000
CLONE_NEWTIME: Final = 0x00000080

# mount flags
MS_RDONLY: Final = 0x1
MS_NOSUID: Final = 0x2
MS_NODEV: Final = 0x4
MS_NOEXEC: Final = 0x8
MS_REMOUNT: Final = 0x20
MS_BIND: Final = 0x1000
MS_MOVE: Final = 0x2000
MS_REC: Final = 0x4000
MS_PRIVATE: Final = 0x40000
MS_SLAVE: Final = 0x80000
MNT_DETACH: Final = 0x2

# mount_setattr
AT_RECURSIVE: Final = 0x8000
AT_FDCWD: Final = -100
MOUNT_ATTR_RDONLY: Final = 0x1
MOUNT_ATTR_NOSUID: Final = 0x2
MOUNT_ATTR_NODEV: Final = 0x4
MOUNT_ATTR_NOEXEC: Final = 0x8
MOUNT_ATTR_IDMAP: Final = 0x00100000  # needs mount_attr.userns_fd; detached trees only (5.12+)

# prctl options
PR_SET_PDEATHSIG: Final = 1
PR_SET_DUMPABLE: Final = 4
PR_SET_KEEPCAPS: Final = 8
PR_SET_SECCOMP: Final = 22
PR_CAPBSET_READ: Final = 23
PR_CAPBSET_DROP: Final = 24
PR_SET_SECUREBITS: Final = 28
PR_SET_NO_NEW_PRIVS: Final = 38
PR_GET_NO_NEW_PRIVS: Final = 39
PR_SET_CHILD_SUBREAPER: Final = 36
PR_CAP_AMBIENT: Final = 47
PR_CAP_AMBIENT_CLEAR_ALL: Final = 4
SECCOMP_MODE_FILTER: Final = 2

CLOSE_RANGE_CLOEXEC: Final = 4


def syscall_nr(name: str) -> int:
    """Number of ``name`` on this architecture; ``OSError(ENOSYS)`` when we do not know it."""
    table = _SYSCALLS.get(MACHINE)
    if table is None or name not in table:
        raise OSError(38, f"syscall {name} unknown on {MACHINE}")
    return table[name]


_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

_mount = _libc.mount
_mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_mount.restype = ctypes.c_int

_umount2 = _libc.umount2
_umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_umount2.restype = ctypes.c_int

_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int

_sethostname = _libc.sethostname
_sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_sethostname.restype = ctypes.c_int


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


class _KernelSigaction(ctypes.Structure):
    _fields_ = [
        ("handler", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("restorer", ctypes.c_void_p),
        ("mask", ctypes.c_uint64),
    ]


# glibc keeps these two for itself (SIGCANCEL, SIGSETXID): its sigaction() and so Python's
# signal module refuse them, but an ignored disposition inherited from a parent (GNU make
# leaves both ignored in its children) survives execve like any other.
GLIBC_RESERVED_SIGNALS: Final = (32, 33)


def default_signal_action(sig: int) -> None:
    """Set `sig` to SIG_DFL with the raw rt_sigaction system call (for the signals glibc
    reserves, see GLIBC_RESERVED_SIGNALS)."""
    action = _KernelSigaction(None, 0, None, 0)
    nr = syscall_nr("rt_sigaction")
    _check(
        _syscall(
            ctypes.c_long(nr), ctypes.c_int(sig), ctypes.byref(action), None, ctypes.c_size_t(8)
        ),
        f"rt_sigaction {sig}",
    )


def unshare(flags: int) -> None:
    _check(_syscall(ctypes.c_long(syscall_nr("unshare")), ctypes.c_ulong(flags)), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(
        _syscall(ctypes.c_long(syscall_nr("setns")), ctypes.c_int(fd), ctypes.c_int(nstype)),
        "setns",
    )


def mount(
    source: bytes | None,
    target: bytes,
    fstype: bytes | None,
    flags: int,
    data: bytes | None = None,
) -> None:
    _check(_mount(source, target, fstype, flags, data), f"mount {target!r}")


def umount2(target: bytes, flags: int) -> None:
    _check(_umount2(target, flags), f"umount2 {target!r}")


def pivot_root(new_root: bytes, put_old: bytes) -> None:
    nr = syscall_nr("pivot_root")
    _check(
        _syscall(ctypes.c_long(nr), ctypes.c_char_p(new_root), ctypes.c_char_p(put_old)),
        "pivot_root",
    )


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


AT_EMPTY_PATH: Final = 0x1000
OPEN_TREE_CLONE: Final = 1
OPEN_TREE_CLOEXEC: Final = 0o2000000
MOVE_MOUNT_F_EMPTY_PATH: Final = 0x4


def mount_setattr(
    path: bytes,
    attr_set: int,
    *,
    recursive: bool = True,
    dfd: int = AT_FDCWD,
    userns_fd: int = 0,
) -> None:
    """Set mount attributes (read-only, nosuid, ...) on a whole tree in one syscall (5.12+).

    With ``dfd`` a mount fd and ``path`` empty, applies to that (possibly detached) tree.
    ``MOUNT_ATTR_IDMAP`` in ``attr_set`` needs ``userns_fd``: the user namespace whose id maps
    translate on-disk owners (see idmap.py)."""
    attr = _MountAttr(attr_set, 0, 0, userns_fd)
    flags = (AT_RECURSIVE if recursive else 0) | (AT_EMPTY_PATH if not path else 0)
    _check(
        _syscall(
            ctypes.c_long(syscall_nr("mount_setattr")),
            ctypes.c_int(dfd),
            ctypes.c_char_p(path),
            ctypes.c_uint(flags),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        ),
        f"mount_setattr {path!r}",
    )


def open_tree_clone(path: bytes, recursive: bool = True) -> int:
    """A detached, close-on-exec copy of the mount tree at ``path`` (a bind mount not yet
    attached anywhere), as an fd that can cross into another mount namespace; with
    ``recursive`` false, of the mount at ``path`` alone (none of the mounts below it)."""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    return _check(
        _syscall(
            ctypes.c_long(syscall_nr("open_tree")),
            ctypes.c_int(AT_FDCWD),
            ctypes.c_char_p(path),
            ctypes.c_uint(flags),
        ),
        f"open_tree {path!r}",
    )


def move_mount_fd(fd: int, target: bytes) -> None:
    """Attach the detached tree ``fd`` at ``target`` (relative to the caller's root)."""
    _check(
        _syscall(
            ctypes.c_long(syscall_nr("move_mount")),
            ctypes.c_int(fd),
            ctypes.c_char_p(b""),
            ctypes.c_int(AT_FDCWD),
            ctypes.c_char_p(target),
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
        ),
        f"move_mount {target!r}",
    )


CLONE_VM: Final = 0x00000100
_CLONE_STACK: Final = 64 * 1024

_clone = _libc.clone
_clone.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
_clone.restype = ctypes.c_int
_pause_fn: Final = ctypes.cast(_libc.pause, ctypes.c_void_p).value


def clone_paused(flags: int) -> int:
    """Start a child in new namespaces (``flags``: CLONE_NEW*) that only sleeps in ``pause()``,
    for the caller to read or set up those namespaces from outside, then SIGKILL and reap it.

    Why not fork: a fork copies the caller's page tables (≈4-6 ms from the fork server), while
    this child shares the caller's memory (CLONE_VM, as posix_spawn's does) and runs no Python
    code at all, only libc's ``pause`` on a stack of its own: ≈0.1 ms. Every signal is blocked
    while it is created, and the child keeps that mask, so nothing but SIGKILL (or SIGSTOP) ever
    reaches it. The stack must outlive the child: the caller must kill and reap it before the
    returned pid's stack (kept here until then) goes; ``release_paused`` does both.

    Known limit: the child runs no code that could ask for a parent-death signal, so if the
    caller is SIGKILLed in the ~0.1-0.4 ms between this and ``release_paused``, the child stays
    paused (reparented, holding the caller's address space and a user namespace) until someone
    kills it. The window is once per new (uid, gid) pair of a volume, in the fork server."""
    stack = ctypes.create_string_buffer(_CLONE_STACK)
    top = (ctypes.addressof(stack) + _CLONE_STACK - 64) & ~0xF  # grows down (x86_64, aarch64)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        pid = _clone(_pause_fn, top, flags | CLONE_VM | signal.SIGCHLD, None)
        err = ctypes.get_errno()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    if pid < 0:
        raise OSError(err, f"clone: {os.strerror(err)}")
    _paused_stacks[pid] = stack
    return pid


_paused_stacks: dict[int, ctypes.Array[ctypes.c_char]] = {}


def release_paused(pid: int) -> None:
    """SIGKILL and reap (by pid) a ``clone_paused`` child, then free its stack. The wait has no
    timeout because it needs none: SIGKILL ends a process sleeping in ``pause()`` at once."""
    try:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    finally:
        _paused_stacks.pop(pid, None)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


def sethostname(name: bytes) -> None:
    _check(_sethostname(name, len(name)), "sethostname")


class CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


_LINUX_CAPABILITY_VERSION_3: Final = 0x20080522


# Built once at import (in the fork server), so a child only makes the call.
_ZERO_HDR: Final = CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
_ZERO_DATA: Final = (CapData * 2)()


def capset_zero() -> None:
    """Clear effective, permitted and inheritable capability sets of the calling thread."""
    _check(
        _syscall(
            ctypes.c_long(syscall_nr("capset")), ctypes.byref(_ZERO_HDR), ctypes.byref(_ZERO_DATA)
        ),
        "capset",
    )


def close_range(first: int, last: int, flags: int) -> None:
    _check(
        _syscall(
            ctypes.c_long(syscall_nr("close_range")),
            ctypes.c_uint(first),
            ctypes.c_uint(last),
            ctypes.c_uint(flags),
        ),
        "close_range",
    )


def pidfd_open(pid: int) -> int:
    return _check(
        _syscall(ctypes.c_long(syscall_nr("pidfd_open")), ctypes.c_int(pid), ctypes.c_uint(0)),
        "pidfd_open",
    )


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    _check(
        _syscall(
            ctypes.c_long(syscall_nr("pidfd_send_signal")),
            ctypes.c_int(pidfd),
            ctypes.c_int(sig),
            ctypes.c_void_p(None),
            ctypes.c_uint(0),
        ),
        "pidfd_send_signal",
    )


SECCOMP_SET_MODE_FILTER: Final = 1


def seccomp_set_filter(prog: ctypes.Structure) -> None:
    """Install a classic-BPF seccomp program (struct sock_fprog) for the calling thread."""
    _check(
        _syscall(
            ctypes.c_long(syscall_nr("seccomp")),
            ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
            ctypes.c_uint(0),
            ctypes.byref(prog),
        ),
        "seccomp",
    )
