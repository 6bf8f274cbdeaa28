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
on. It remounts one hierarchy with its own super options plus ``favordynmods``: the cgroup2 one
if there is one (an empty unified hierarchy on v1 hosts), else one v1 hierarchy.
"""

from __future__ import annotations

import os

from . import libc
from .cgroups import _mounts

OPTION = "favordynmods"
_ACCESS = frozenset({"rw", "ro"})  # mount flags, not super options: remount keeps them


def active() -> str | None:
    """The mount point of a cgroup hierarchy mounted with favordynmods, if any."""
    for mount in _mounts():
        if OPTION in mount.options:
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
    mounts = _mounts()
    target = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if target is None:
        target = next((m for m in mounts if m.fstype == "cgroup"), None)
    if target is None:
        raise FileNotFoundError("no cgroup hierarchy is mounted")
    options = [*sorted(o for o in target.options if o not in _ACCESS), OPTION]
    libc.mount(None, target.mountpoint.encode(), None, libc.MS_REMOUNT, ",".join(options).encode())
    if active() is None:  # the kernel took the remount but not the option
        raise OSError(f"{target.mountpoint}: remounted, but {OPTION} is not shown in mountinfo")
    return f"on ({target.mountpoint} remounted with {OPTION})"
