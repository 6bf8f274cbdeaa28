"""Fast cgroup joins: the `favordynmods` cgroup mount option.

Why: moving a process into a cgroup (writing its pid to ``cgroup.procs``, which every sandbox
start does unless it claims a pre-joined pool member) takes the kernel's global
``cgroup_threadgroup_rwsem`` for writing, and by default that waits for an RCU grace period.
Measured on this project's 2-vCPU VM (Linux 6.18, cgroup v1 pids): 5-17 ms per join, more than
the rest of a sandbox start together. With ``favordynmods`` on any cgroup hierarchy the write
side no longer waits: 0.1-0.2 ms per join, measured on the same machine. The kernel's price is
that forks and exits take the read side a little more expensively (cgroup-v2.rst: "Reduce the
latencies of dynamic cgroup modifications such as task migrations and controller on/offs at the
cost of making hot path operations such as forks and exits more expensive"), a trade that fits a
host whose main job is starting sandboxes.

The option is per hierarchy but its effect is host-wide, and since Linux 6.18 (per-threadgroup
rwsem) it stays in effect until reboot even if the option is removed again. So dorm turns it on
only when ``gateway.cgroup_favordynmods`` says so (the default: dorm runs as root to manage
cgroups on a host dedicated to it), says so in its log, and ``dorm doctor`` shows whether it is
on. It remounts the cgroup2 hierarchy (an empty unified one on v1 hosts) with its own super
options plus ``favordynmods``.

Two things a plain ``mount(MS_REMOUNT)`` would get wrong, and this does not:
  * a cgroup v1 hierarchy cannot take the option on a remount at all (the kernel refuses any
    change of a v1 root's flags after its first mount: "option or name mismatch", EINVAL), so a
    host with only v1 hierarchies is told so rather than sent a remount that always fails;
  * a remount without MS_BIND sets the mount's own flags to exactly those passed, and the
    superblock's read-only flag with them: passing none would make a read-only hierarchy
    writable and drop nosuid, nodev and noexec from it. The mount's flags are passed as
    mountinfo shows them, and a read-only hierarchy is left alone.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from . import libc, mountinfo
from .cgroups import _mounts

OPTION = "favordynmods"
_ACCESS = frozenset({"rw", "ro"})  # read-only or not: decided below, never passed as options
# Per-mount options as mountinfo shows them → the MS_* flag that keeps each through a remount.
MOUNT_FLAGS: dict[str, int] = {
    "nosuid": libc.MS_NOSUID,
    "nodev": libc.MS_NODEV,
    "noexec": libc.MS_NOEXEC,
    "nosymfollow": 0x100,  # MS_NOSYMFOLLOW
    "noatime": 0x400,  # MS_NOATIME
    "nodiratime": 0x800,  # MS_NODIRATIME
    "relatime": 0x200000,  # MS_RELATIME
    "strictatime": 0x1000000,  # MS_STRICTATIME
}


@dataclass(frozen=True, slots=True)
class Cgroup2Mount:
    """A cgroup2 mount reachable at its mount point, with both option lists from mountinfo."""

    mountpoint: str
    mount_options: frozenset[str]  # this mount's own flags (ro, nosuid, relatime...)
    super_options: frozenset[str]  # the hierarchy's (rw or ro, nsdelegate, favordynmods...)

    @property
    def read_only(self) -> bool:
        return "ro" in self.mount_options or "ro" in self.super_options


def cgroup2_mounts(path: str = "/proc/self/mountinfo") -> list[Cgroup2Mount]:
    """Every cgroup2 mount in `path` (a mountinfo file) that is what its path leads to now:
    mountinfo also lists mounts that a later mount covers, and remounting by path would hit the
    cover."""
    return [
        Cgroup2Mount(m.mountpoint, m.mount_options, m.super_options)
        for m in mountinfo.reachable(("cgroup2",), path)
    ]


def remount_arguments(mount: Cgroup2Mount) -> tuple[int, bytes]:
    """(flags, data) for the mount(2) call that adds favordynmods to `mount` and changes
    nothing else: its super options are passed back, its own flags too (see the docstring)."""
    flags = libc.MS_REMOUNT
    for name in mount.mount_options:
        flags |= MOUNT_FLAGS.get(name, 0)
    options = [*sorted(o for o in mount.super_options if o not in _ACCESS and o != OPTION)]
    return flags, ",".join([*options, OPTION]).encode()


def active() -> str | None:
    """The mount point of a cgroup hierarchy mounted with favordynmods, if any."""
    for mount in _mounts():
        if OPTION in mount.super_options:
            return mount.mountpoint
    return None


def enable() -> str:
    """Turn favordynmods on (root only); returns what was done. Raises OSError saying why not.

    Idempotent: if any hierarchy already has it, nothing is remounted."""
    already = active()
    if already is not None:
        return f"already on ({already})"
    if os.geteuid() != 0:
        raise PermissionError("remounting a cgroup hierarchy needs root")
    mounts = cgroup2_mounts()
    if not mounts:
        if any(m.fstype == "cgroup" for m in _mounts()):
            raise OSError(
                errno.EOPNOTSUPP,
                "no cgroup2 hierarchy is mounted, and a cgroup v1 hierarchy takes "
                f"{OPTION} only when it is first mounted, not on a remount",
            )
        raise FileNotFoundError("no cgroup hierarchy is mounted")
    target = next((m for m in mounts if not m.read_only), None)
    if target is None:
        raise OSError(
            errno.EROFS,
            f"{mounts[0].mountpoint} is mounted read-only: not remounting it to add {OPTION}",
        )
    flags, data = remount_arguments(target)
    libc.mount(None, target.mountpoint.encode(), None, flags, data)
    if active() is None:  # the kernel took the remount but not the option
        raise OSError(f"{target.mountpoint}: remounted, but {OPTION} is not shown in mountinfo")
    return f"on ({target.mountpoint} remounted with {OPTION})"
