"""The seccomp deny list, compiled once with libseccomp and loaded in each child with one prctl.

Why compile once: building a libseccomp filter costs ~1 ms of resolving and BPF generation; the fork
server calls ``compiled_filter()`` before forking and every child only executes
``seccomp(SECCOMP_SET_MODE_FILTER, 0, &prog)`` on the pre-built classic-BPF program. The child
never touches libseccomp.

Policy (default ALLOW, then deny with an exact errno so tests and tenants see a clean failure
instead of a dead process):

* kernel attack surface unprivileged code should not need: io_uring, keyrings, userfaultfd, bpf,
  perf_event_open, ptrace and cross-process memory access, kcmp/pidfd_getfd, module and kexec
  loading, reboot, swap, clock setting, acct, quotactl, handle-based opens, iopl/ioperm, and the
  whole mount API (mount, umount2, pivot_root, move_mount, open_tree, fsopen, fsmount, fsconfig,
  fspick, mount_setattr)
* namespaces: setns always, unshare and clone with any CLONE_NEW* flag; clone3 gets ENOSYS because
  its flags live in memory the filter cannot read, and libc then falls back to clone
* ``ioctl`` TIOCSTI / TIOCLINUX / TIOCSETD with the upper 32 bits masked off (the kernel truncates
  the command to 32 bits, so a filter comparing 64 bits is bypassable)
* ``personality`` other than PER_LINUX (0) or the query value 0xffffffff
* socket families other than AF_UNIX, AF_INET, AF_INET6 and NETLINK_ROUTE (so AF_VSOCK, AF_PACKET,
  AF_ALG, AF_KEY, ... and every other netlink protocol are refused)
* every non-native architecture, x32 included (the libseccomp "bad arch" action → EPERM), so
  ``int 0x80`` 32-bit syscalls and x32-numbered syscalls cannot sidestep the rules above
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from typing import Final

from . import libc

SCMP_ACT_ALLOW: Final = 0x7FFF0000
SCMP_FLTATR_ACT_BADARCH: Final = 2
SCMP_FLTATR_CTL_OPTIMIZE: Final = 8
SCMP_CMP_NE: Final = 1
SCMP_CMP_EQ: Final = 4
SCMP_CMP_GE: Final = 5
SCMP_CMP_MASKED_EQ: Final = 7
MASK32: Final = 0xFFFFFFFF


def scmp_act_errno(err: int) -> int:
    return 0x00050000 | (err & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


DENY_ALWAYS: Final = (
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "keyctl",
    "add_key",
    "request_key",
    "userfaultfd",
    "bpf",
    "perf_event_open",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "process_madvise",
    "kcmp",
    "pidfd_getfd",
    "mount",
    "umount2",
    "pivot_root",
    "move_mount",
    "open_tree",
    "open_tree_attr",
    "fsopen",
    "fsmount",
    "fsconfig",
    "fspick",
    "mount_setattr",
    "chroot",
    "setns",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "syslog",
    "quotactl",
    "quotactl_fd",
    "lookup_dcookie",
    "name_to_handle_at",
    "open_by_handle_at",
    "iopl",
    "ioperm",
    "vhangup",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "uselib",
    "ustat",
    "sysfs",
    "_sysctl",
    "nfsservctl",
    "fanotify_init",
    "sethostname",
    "setdomainname",
)

# x86_64 numbers of syscalls newer than some libseccomp releases know by name.
_X86_64_FALLBACK: Final = {"open_tree_attr": 467, "quotactl_fd": 443, "mount_setattr": 442}

NS_FLAGS: Final = (
    libc.CLONE_NEWNS,
    libc.CLONE_NEWCGROUP,
    libc.CLONE_NEWUTS,
    libc.CLONE_NEWIPC,
    libc.CLONE_NEWUSER,
    libc.CLONE_NEWPID,
    libc.CLONE_NEWNET,
)
TIOCSTI: Final = 0x5412
TIOCLINUX: Final = 0x541C
TIOCSETD: Final = 0x5423
ALLOWED_FAMILIES: Final = frozenset({1, 2, 10, 16})  # AF_UNIX, AF_INET, AF_INET6, AF_NETLINK
AF_NETLINK: Final = 16


@dataclass(frozen=True, slots=True)
class CompiledFilter:
    """A classic-BPF program ready for ``PR_SET_SECCOMP``; keeps its buffer alive."""

    program: bytes
    buffer: ctypes.Array[ctypes.c_char]
    fprog: _SockFprog
    skipped: tuple[str, ...]  # names unknown to this libseccomp/arch (reported by doctor)

    @property
    def instructions(self) -> int:
        return len(self.program) // 8

    def load(self) -> None:
        libc.seccomp_set_filter(self.fprog)


class _Lib:
    def __init__(self) -> None:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        self.init = lib.seccomp_init
        self.init.argtypes = [ctypes.c_uint32]
        self.init.restype = ctypes.c_void_p
        self.release = lib.seccomp_release
        self.release.argtypes = [ctypes.c_void_p]
        self.release.restype = None
        self.attr_set = lib.seccomp_attr_set
        self.attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        self.attr_set.restype = ctypes.c_int
        self.resolve = lib.seccomp_syscall_resolve_name
        self.resolve.argtypes = [ctypes.c_char_p]
        self.resolve.restype = ctypes.c_int
        self.rule_add_array = lib.seccomp_rule_add_array
        self.rule_add_array.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_void_p,
        ]
        self.rule_add_array.restype = ctypes.c_int
        self.export_bpf = lib.seccomp_export_bpf
        self.export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self.export_bpf.restype = ctypes.c_int
        version = lib.seccomp_version
        version.restype = ctypes.c_void_p
        v = ctypes.cast(version(), ctypes.POINTER(ctypes.c_uint * 3)).contents
        self.version = f"{v[0]}.{v[1]}.{v[2]}"


_lib: _Lib | None = None


def library() -> _Lib:
    """libseccomp, loaded on first use; ``OSError`` when it is not installed."""
    global _lib
    if _lib is None:
        _lib = _Lib()
    return _lib


class _Builder:
    def __init__(self, lib: _Lib) -> None:
        self.lib = lib
        self.ctx = lib.init(SCMP_ACT_ALLOW)
        if not self.ctx:
            raise OSError(errno.ENOMEM, "seccomp_init failed")
        self.skipped: list[str] = []

    def nr(self, name: str) -> int | None:
        n = int(self.lib.resolve(name.encode()))
        if n < 0 and libc.MACHINE == "x86_64":
            n = _X86_64_FALLBACK.get(name, -1)
        if n < 0:
            self.skipped.append(name)
            return None
        return n

    def rule(self, action: int, name: str, *cmps: tuple[int, int, int, int]) -> None:
        n = self.nr(name)
        if n is None:
            return
        arr = (_ArgCmp * max(1, len(cmps)))(*[_ArgCmp(a, op, x, y) for a, op, x, y in cmps])
        rc = self.lib.rule_add_array(self.ctx, action, n, len(cmps), arr if cmps else None)
        if rc < 0:
            raise OSError(-rc, f"seccomp_rule_add({name}, {cmps}) failed")

    def export(self) -> bytes:
        fd = os.memfd_create("dorm-seccomp", os.MFD_CLOEXEC)
        try:
            rc = self.lib.export_bpf(self.ctx, fd)
            if rc < 0:
                raise OSError(-rc, "seccomp_export_bpf failed")
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.lib.release(self.ctx)


def build() -> CompiledFilter:
    """Compile the deny list into BPF (run once per process, in the fork server)."""
    lib = library()
    b = _Builder(lib)
    try:
        eperm = scmp_act_errno(errno.EPERM)
        rc = lib.attr_set(b.ctx, SCMP_FLTATR_ACT_BADARCH, eperm)
        if rc < 0:
            raise OSError(-rc, "seccomp_attr_set(ACT_BADARCH) failed")
        lib.attr_set(b.ctx, SCMP_FLTATR_CTL_OPTIMIZE, 2)  # binary tree; optional, ignore failure
        for name in DENY_ALWAYS:
            b.rule(eperm, name)
        for flag in NS_FLAGS:
            b.rule(eperm, "unshare", (0, SCMP_CMP_MASKED_EQ, flag, flag))
            b.rule(eperm, "clone", (0, SCMP_CMP_MASKED_EQ, flag, flag))
        b.rule(eperm, "unshare", (0, SCMP_CMP_MASKED_EQ, libc.CLONE_NEWTIME, libc.CLONE_NEWTIME))
        b.rule(scmp_act_errno(errno.ENOSYS), "clone3")
        for cmd in (TIOCSTI, TIOCLINUX, TIOCSETD):
            b.rule(eperm, "ioctl", (1, SCMP_CMP_MASKED_EQ, MASK32, cmd))
        # personality(p) with p (as the kernel's 32-bit value) neither 0 nor 0xffffffff. libseccomp
        # allows one comparison per argument, so use: a cyclic 32-bit string containing both a 0
        # and a 1 has some bit i set whose neighbour i+1 (mod 32) is clear → 32 masked rules.
        for i in range(32):
            j = (i + 1) % 32
            b.rule(eperm, "personality", (0, SCMP_CMP_MASKED_EQ, (1 << i) | (1 << j), 1 << i))
        # Comparisons are on the full 64-bit register while the kernel truncates to int: so
        # allowed values are matched exactly and everything else, including any value with
        # upper bits set, falls into a deny rule (fail closed).
        for family in range(AF_NETLINK + 1):
            if family not in ALLOWED_FAMILIES:
                b.rule(eperm, "socket", (0, SCMP_CMP_EQ, family, 0))
        b.rule(eperm, "socket", (0, SCMP_CMP_GE, AF_NETLINK + 1, 0))
        b.rule(eperm, "socket", (0, SCMP_CMP_EQ, AF_NETLINK, 0), (2, SCMP_CMP_NE, 0, 0))
        b.rule(eperm, "socketpair", (0, SCMP_CMP_NE, 1, 0))  # AF_UNIX only
        program = b.export()
    finally:
        b.close()
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p).value)
    return CompiledFilter(program, buf, fprog, tuple(dict.fromkeys(b.skipped)))


_compiled: CompiledFilter | None = None


def compiled_filter() -> CompiledFilter:
    """The process-wide compiled filter (built on first call; call it before forking)."""
    global _compiled
    if _compiled is None:
        _compiled = build()
    return _compiled
