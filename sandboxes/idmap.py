"""Persistent /data volumes through idmapped mounts: one owner on disk, the instance's uid inside.

Why: every start of an app gets its own unprivileged uid, and a volume's files must look like
that uid's to the tenant. Chowning the whole tree to each new uid costs one ``lchown`` per file on
every start, in the single-threaded fork server (a volume with many files stalls all starts).
Instead, files stay owned on disk by one fixed storage owner (``STORAGE_UID``/``STORAGE_GID``),
and /data is attached as an *idmapped mount* (``mount_setattr(MOUNT_ATTR_IDMAP)``, Linux 5.12+):
the detached ``open_tree`` copy gets a user namespace whose maps hold exactly one line,
``STORAGE_UID -> instance uid`` (and the same for the gid). Through that mount the kernel shows
files owned by the storage owner as the instance's, and writes files the instance creates as the
storage owner. Nothing on disk changes between starts.

Why this storage owner: not root (a tenant may ``chmod u+s`` its own files; on disk that must not
become a setuid-root binary, and a forgotten idmap must not hand the tenant root-owned files), not
per app (isolation between apps comes from each sandbox seeing only its own volume, in its own
mount namespace, never from owners on disk; a per-app id would need an allocator and a registry
for nothing). 2147483646 (0x7ffffffe) is far from every account a host has (system and login
uids, 65534 "nobody", systemd's dynamic users below 65536 and its container ranges up to
0x6fffffff and foreign range 0x7ffe0000-0x7ffeffff), below 2**31 (tools that print uid_t signed),
and outside dorm's default uid ranges; an instance may never run as it (``userns_fd`` refuses).

What the tenant gains: nothing. Its mount maps one id pair, so it sees its own files as its uid
and everything else on the volume (files a host admin copied in as root, say) as the overflow id
(65534), read-only by mode at best; it cannot chown (no capabilities); /data stays nosuid and
nodev; other volumes are not in its mount namespace at all. The user namespace fds are held by
the (root) fork server, close-on-exec; a child forked from it drops them with every other fd
before tenant code runs (``close_range`` in the confinement), and no sandbox ever joins one.

Costs, measured on this 2-vCPU VM (kernel 6.18), with the fork server's modules loaded: a user
namespace with its maps ≈0.1-0.4 ms (a ``CLONE_VM`` child, see ``libc.clone_paused``; a fork of
the fork server took 4-8 ms), still cached per (uid, gid), least recently used dropped beyond
``CACHE_SIZE``; the idmapped ``open_tree`` + ``mount_setattr`` ≈25 µs, the same as a plain one.
"""

from __future__ import annotations

import errno
import os
from collections import OrderedDict
from typing import Final

from . import libc, mountinfo

STORAGE_UID: Final = 2147483646
STORAGE_GID: Final = 2147483646
CACHE_SIZE: Final = 64  # user namespaces kept (one fd each in the fork server)

# What a filesystem (or kernel) without idmapped mounts answers, rather than a bug of ours.
UNSUPPORTED: Final = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, errno.EPERM})

_userns: OrderedDict[tuple[int, int], int] = OrderedDict()


def userns_fd(uid: int, gid: int) -> int:
    """A user namespace fd mapping the storage owner to ``uid``/``gid`` (cached; do not close)."""
    key = (uid, gid)
    fd = _userns.get(key)
    if fd is not None:
        _userns.move_to_end(key)
        return fd
    if uid == STORAGE_UID or gid == STORAGE_GID:  # not an OSError: never "unsupported"
        raise ValueError(f"instance uid/gid {uid}/{gid} is the volume storage owner")
    fd = _new_userns(uid, gid)
    _userns[key] = fd
    while len(_userns) > CACHE_SIZE:
        _, old = _userns.popitem(last=False)
        os.close(old)
    return fd


def prepare(uid: int, gid: int) -> None:
    """Create (and cache) the namespace for ``uid``/``gid`` now, off a start's critical path."""
    userns_fd(uid, gid)


def forget(uid: int, gid: int) -> None:
    """Drop the namespace of an id pair that will not be used again soon (a released member's)."""
    fd = _userns.pop((uid, gid), None)
    if fd is not None:
        os.close(fd)


def clear() -> None:
    """Drop every cached namespace (they go away with their last fd)."""
    while _userns:
        os.close(_userns.popitem()[1])


def cached() -> int:
    return len(_userns)


def _new_userns(uid: int, gid: int) -> int:
    """A user namespace whose maps say "storage owner -> uid/gid", as an fd.

    A child is created in a new user namespace (``libc.clone_paused``: it only sleeps); the
    caller, root in the parent namespace, writes the child's maps and opens its namespace, then
    kills and reaps the child by pid (never waitpid(-1)). The fd keeps the namespace alive."""
    pid = libc.clone_paused(libc.CLONE_NEWUSER)
    try:
        for name, inner, outer in (("uid_map", STORAGE_UID, uid), ("gid_map", STORAGE_GID, gid)):
            fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"%d %d 1\n" % (inner, outer))
            finally:
                os.close(fd)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        libc.release_paused(pid)


def open_tree(path: bytes, attrs: int, uid: int, gid: int, recursive: bool = True) -> int:
    """A detached copy of ``path`` with ``attrs`` (MOUNT_ATTR_*) that shows files owned by the
    storage owner as ``uid``/``gid``; ready for ``move_mount`` like ``libc.open_tree_clone``'s."""
    ns = userns_fd(uid, gid)
    fd = libc.open_tree_clone(path, recursive)
    try:
        libc.mount_setattr(b"", attrs | libc.MOUNT_ATTR_IDMAP, dfd=fd, userns_fd=ns)
    except BaseException:
        os.close(fd)
        raise
    return fd


def probe(path: str, uid: int, gid: int, recursive: bool = True) -> str | None:
    """None if ``path`` can be attached idmapped for ``uid``/``gid`` here; else why not, in words.

    Creates (and caches) that pair's namespace, and one detached mount it closes at once. Only
    "this kernel, filesystem or privilege cannot" becomes a reason; other errors raise (and
    ``ValueError`` for ids that collide with the storage owner's). ``recursive`` false asks
    about the filesystem at ``path`` alone, not the mounts below it (``dorm doctor`` before any
    volume exists probes an ancestor, under which may be anything)."""
    what = fstype(path)
    attrs = libc.MOUNT_ATTR_NOSUID | libc.MOUNT_ATTR_NODEV
    try:
        fd = open_tree(path.encode(), attrs, uid, gid, recursive)
    except OSError as e:
        if e.errno not in UNSUPPORTED:
            raise
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        return f"{what} at {path}: {name} ({e.strerror or e})"
    os.close(fd)
    return None


def fstype(path: str) -> str:
    """The filesystem type under ``path`` (from /proc/self/mountinfo), for messages."""
    real = os.path.realpath(path)
    best, found = "", "unknown filesystem"
    try:
        mounts = mountinfo.reachable()
    except OSError:
        return found
    for m in mounts:
        inside = real == m.mountpoint or real.startswith(m.mountpoint.rstrip("/") + "/")
        if inside and len(m.mountpoint) >= len(best):
            best, found = m.mountpoint, m.fstype
    return found


def owned_by_storage(path: str) -> bool:
    """Whether the volume was adopted: its root is the storage owner's (children are done first)."""
    st = os.lstat(path)
    return st.st_uid == STORAGE_UID and st.st_gid == STORAGE_GID


def adopt(path: str) -> int:
    """Migrate a volume chowned to some instance uid by the older scheme (or created by root) to
    the storage owner, once: nothing happens when its root is already the storage owner's.

    The root directory is done last, so an interrupted migration is finished at the next start.
    Walks with directory fds and never follows symlinks, so a tree that changes underneath
    cannot redirect a chown outside the volume. Returns how many entries were changed."""
    if owned_by_storage(path):
        return 0
    changed = 0
    for _root, dirs, files, dir_fd in os.fwalk(path, follow_symlinks=False):
        for name in dirs + files:
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if st.st_uid != STORAGE_UID or st.st_gid != STORAGE_GID:
                    os.chown(name, STORAGE_UID, STORAGE_GID, dir_fd=dir_fd, follow_symlinks=False)
                    changed += 1
            except OSError:
                continue  # gone meanwhile: nothing to own
    os.chown(path, STORAGE_UID, STORAGE_GID, follow_symlinks=False)
    return changed + 1
