"""Crash recovery: find and remove what a previous (SIGKILLed) gateway left behind.

Why this is enough: every sandbox process lives in a cgroup under dorm's parent cgroup, and all
sandbox mounts live in the sandboxes' own mount namespaces (they vanish with their processes). The
only host-visible leftovers are therefore (1) those cgroups with their processes and (2) the egress
plumbing (a named netns bind mount and a veth) for egress-enabled instances.
"""

from __future__ import annotations

import contextlib
import os

from . import cgroups, libc


def _stale_mounts(prefixes: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mountpoint = line.split()[4].replace("\\040", " ")
            if any(mountpoint == p or mountpoint.startswith(p + "/") for p in prefixes):
                out.append(mountpoint)
    return sorted(out, key=len, reverse=True)


def cleanup_stale(cgroup_parent: str = "dorm") -> int:
    """Kill processes in dorm's cgroups from a previous run, remove those cgroups, stale mounts and
    egress leftovers. Returns how many stale sandboxes were found. Call once at gateway start,
    before spawning anything (it would otherwise remove live sandboxes)."""
    found = 0
    if os.geteuid() == 0:
        try:
            backend = cgroups.detect()
        except Exception:
            backend = None
        if backend is not None:
            for name in backend.list_children(cgroup_parent):
                found += 1
                backend.handle(cgroup_parent, name).remove()
    from .mounts import DEFAULT_MOUNT_BASE, FALLBACK_MOUNT_BASE

    for mountpoint in _stale_mounts((DEFAULT_MOUNT_BASE, FALLBACK_MOUNT_BASE)):
        with contextlib.suppress(OSError):
            libc.umount2(mountpoint.encode(), libc.MNT_DETACH)
    from .egress import STATE_DIR

    if os.path.isdir(STATE_DIR) and os.listdir(STATE_DIR):
        from . import egress

        found += egress.cleanup_stale(cgroup_parent)
    return found
