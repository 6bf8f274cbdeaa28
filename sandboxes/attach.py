"""Late binding: give an already running, fully confined sandbox its tenant's directories.

Why: a warm-pool member is confined before anyone knows which tenant it will serve (namespaces,
mounts, uid, capabilities, seccomp, rlimits: see docs/sandboxes.md), and once confined it can no
longer mount anything itself. So the claim is done from outside, by the (root, single-threaded)
fork server: it makes detached, attribute-locked copies of the tenant's directories in its own
mount namespace (``open_tree``), enters the member's mount namespace just long enough to attach
them (``move_mount`` onto the empty ``/app`` and ``/data`` mount points every layout has), sets
the member's hostname in its UTS namespace, and returns to its own namespaces. No process of the
member runs with any privilege at any point, and the member sees the directories appear exactly
as a sandbox started for that tenant would have had them.

Cost: three ``open`` of /proc namespace files, two ``setns`` pairs and one ``move_mount`` per
directory, all without an RCU grace period (tens of microseconds; mounting, unlike unmounting,
does not wait for one).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from . import libc
from .mounts import Bind, open_bind


def attach(
    pid: int,
    binds: Sequence[Bind],
    hostname: bytes | None = None,
    ids: tuple[int, int] | None = None,
) -> None:
    """Attach each ``(host dir, path inside, MOUNT_ATTR_* flags)`` into ``pid``'s mount namespace
    and set its hostname. The caller must be root, single-threaded, and ``pid``'s parent (so the
    pid cannot be recycled under it). A bind with ``MOUNT_ATTR_IDMAP`` (a /data volume kept by
    its storage owner, see idmap.py) is shown as owned by ``ids``, the sandbox's (uid, gid).
    Raises ``OSError`` naming the failed operation; on failure nothing partial stays attached
    except directories already moved (the caller kills the sandbox then, which releases them)."""
    fds: list[int] = []
    saved: list[int] = []
    try:
        for src, _target, attrs in binds:
            fds.append(open_bind(src, attrs, ids))
        flags = os.O_RDONLY | os.O_CLOEXEC
        saved = [
            os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC),
            os.open("/proc/self/ns/mnt", flags),
            os.open("/proc/self/ns/uts", flags),
        ]
        if binds:
            _in_namespace(pid, "mnt", libc.CLONE_NEWNS, saved, lambda: _move(fds, binds))
        if hostname is not None:
            _in_namespace(pid, "uts", libc.CLONE_NEWUTS, saved, lambda: libc.sethostname(hostname))
    finally:
        for fd in fds + saved:
            os.close(fd)


def _move(fds: list[int], binds: Sequence[Bind]) -> None:
    for fd, (_src, target, _attrs) in zip(fds, binds, strict=True):
        libc.move_mount_fd(fd, target)


def _in_namespace(
    pid: int, name: str, nstype: int, saved: list[int], action: Callable[[], None]
) -> None:
    """Run ``action`` inside ``pid``'s namespace of type ``nstype``, then come back.

    Entering a mount namespace also moves our root and cwd to its root: coming back restores the
    root, and ``fchdir`` the cwd."""
    cwd, own_mnt, own_uts = saved
    target = os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc.setns(target, nstype)
    finally:
        os.close(target)
    try:
        action()
    finally:
        if nstype == libc.CLONE_NEWNS:
            libc.setns(own_mnt, libc.CLONE_NEWNS)
            os.fchdir(cwd)
        else:
            libc.setns(own_uts, libc.CLONE_NEWUTS)
