"""The sandbox filesystem: planned in the fork server, applied in a fresh mount namespace.

Why a plan: every path, flag, generated file and host lookup (``readlink`` of /bin, the bytes of
/etc/ld.so.cache, ...) is computed in the fork server; what runs in the namespace only replays
tuples of primitive operations, and a failure names the exact operation. The plan has two parts:
``static_ops`` (same for every sandbox of a layout; applied ahead of time by nspool.py, followed by
pivot_root) and the per-instance part (``instance_ops`` and ``binds``; applied at spawn, after
pivot_root, with the binds arriving as detached ``open_tree`` copies made by the parent).

Layout inside the sandbox (host mode; ``rootfs`` mode binds the bundle's top-level dirs instead of
the host system dirs)::

    /            tmpfs, remounted read-only once assembled (mode 0755, root-owned)
    /usr /lib*   read-only, nosuid, nodev binds of the host dirs (/bin → usr/bin symlinks copied)
    /etc         generated passwd, group, hosts, hostname (with ``named_at_claim``: those two are
                 symlinks into /run/dorm, written at the claim), nsswitch.conf, resolv.conf;
                 copies of ld.so.cache, services, protocols; read-only binds of /etc/ssl/certs,
                 /etc/ca-certificates, /etc/alternatives. Never shadow, gshadow, sudoers, ssh keys.
    <prefix>     sys.base_prefix and each ``extra_ro_binds`` path, read-only nosuid nodev
    /app         the tenant bundle, read-only nosuid nodev (empty dir when app_dir is None)
    /data        optional persistent dir, read-write nosuid nodev; idmapped when the spec says
                 ``data_idmap`` (on-disk owner idmap.STORAGE_UID shown as the instance's uid)
    /run/dorm    the instance's socket dir, read-write nosuid nodev noexec
    /tmp         tmpfs size=tmp_size mode=1777 nosuid nodev
    /dev         tmpfs with null zero full random urandom (mknod as root, binds when rootless),
                 fd/stdin/stdout/stderr symlinks, /dev/shm tmpfs size=shm_size nosuid nodev noexec
    /proc        fresh procfs of the sandbox's pid namespace, nosuid nodev noexec, hidepid=invisible

/proc is not masked further: nothing in it is writable by an unprivileged uid without capabilities
(tested: /proc/sys knobs and /proc/timer_list give EACCES, kallsyms shows zero addresses), and the
sandbox sees only its own processes.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import sys
from dataclasses import dataclass
from typing import Any, Final

from . import idmap, libc
from .spec import SandboxSpec

OP_MKDIR: Final = 0
OP_SYMLINK: Final = 1
OP_FILE: Final = 2
OP_BIND: Final = 3
OP_TMPFS: Final = 4
OP_MKNOD: Final = 5

Op = tuple[int, Any, Any, Any]  # (kind, a, b, c); kinds above, primitive args only

RO_ATTRS: Final = libc.MOUNT_ATTR_RDONLY | libc.MOUNT_ATTR_NOSUID | libc.MOUNT_ATTR_NODEV
RW_ATTRS: Final = libc.MOUNT_ATTR_NOSUID | libc.MOUNT_ATTR_NODEV
RW_NOEXEC_ATTRS: Final = RW_ATTRS | libc.MOUNT_ATTR_NOEXEC

SYSTEM_TOPS: Final = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
ETC_COPIES: Final = ("ld.so.cache", "services", "protocols", "gai.conf")
ETC_RO_DIRS: Final = ("ssl/certs", "ca-certificates", "alternatives")
DEVICES: Final = (
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
)
ROOTFS_SKIP: Final = frozenset({"app", "data", "dev", "proc", "run", "tmp", "sys"})

ROOT_DATA: Final = b"size=4m,nr_inodes=4096,mode=0755"
DEFAULT_MOUNT_BASE: Final = "/run/dorm-sandbox-root"
FALLBACK_MOUNT_BASE: Final = "/tmp/.dorm-sandbox-root"


Bind = tuple[bytes, bytes, int]  # (host source, path inside the sandbox, MOUNT_ATTR_* flags)


@dataclass(frozen=True, slots=True)
class MountPlan:
    base: bytes  # host directory the new root tmpfs is mounted on (inside the child's mount ns)
    root_data: bytes
    key: LayoutKey
    static_ops: tuple[Op, ...]  # same for every sandbox of a layout (pre-built by nspool)
    instance_ops: tuple[Op, ...]  # per instance, inside paths: /etc identity files, /tmp, /dev/shm
    binds: tuple[Bind, ...]  # per instance: /app, /data, /run/dorm (attached as detached trees)
    cwd: bytes


_mount_base: str | None = None


def mount_base() -> str:
    """An empty host dir to mount the new root on; only ever mounted on inside child namespaces."""
    global _mount_base
    if _mount_base is None:
        for candidate in (DEFAULT_MOUNT_BASE, FALLBACK_MOUNT_BASE):
            try:
                os.makedirs(candidate, mode=0o700, exist_ok=True)
                _mount_base = candidate
                break
            except OSError:
                continue
        else:
            raise OSError(13, "no writable location for the sandbox mount base")
    return _mount_base


_file_cache: dict[str, tuple[float, bytes]] = {}


def _cached_read(path: str) -> bytes | None:
    """File contents cached by mtime: /etc files rarely change but are copied on every spawn."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    hit = _file_cache.get(path)
    if hit is not None and hit[0] == st.st_mtime:
        return hit[1]
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    _file_cache[path] = (st.st_mtime, data)
    return data


_setattr_ok: bool | None = None


def has_mount_setattr() -> bool:
    """mount_setattr(2) exists (Linux 5.12+): one recursive syscall per read-only bind."""
    global _setattr_ok
    if _setattr_ok is None:
        try:
            libc.mount_setattr(b"", 0, dfd=-1)  # EBADF when the syscall exists
            _setattr_ok = True
        except OSError as e:
            _setattr_ok = e.errno != 38
    return _setattr_ok


class _Planner:
    def __init__(self, base: str) -> None:
        self.base = base
        self.ops: list[Op] = []
        self.dirs: set[str] = {"/"}
        self.bound: list[str] = []

    def p(self, inside: str) -> bytes:
        return (self.base + inside).encode()

    def mkdirs(self, inside: str) -> None:
        parts = inside.strip("/").split("/")
        cur = ""
        for part in parts:
            cur += "/" + part
            if cur not in self.dirs:
                self.dirs.add(cur)
                self.ops.append((OP_MKDIR, self.p(cur), 0o755, None))

    def covered(self, inside: str) -> bool:
        return any(inside == b or inside.startswith(b + "/") for b in self.bound)

    def bind(self, src: str, inside: str, attrs: int, *, is_file: bool = False) -> None:
        if is_file:
            self.mkdirs(os.path.dirname(inside))
            self.ops.append((OP_FILE, self.p(inside), 0o444, b""))
        else:
            self.mkdirs(inside)
        self.ops.append((OP_BIND, src.encode(), self.p(inside), attrs))
        self.bound.append(inside)

    def symlink(self, target: str, inside: str) -> None:
        self.mkdirs(os.path.dirname(inside))
        self.ops.append((OP_SYMLINK, target.encode(), self.p(inside), None))

    def file(self, inside: str, data: bytes, mode: int = 0o444) -> None:
        self.mkdirs(os.path.dirname(inside))
        self.ops.append((OP_FILE, self.p(inside), mode, data))

    def tmpfs(self, inside: str, flags: int, data: str) -> None:
        self.mkdirs(inside)
        self.ops.append((OP_TMPFS, self.p(inside), flags, data.encode()))


def name_files(hostname: str) -> dict[str, bytes]:
    """/etc/hostname and /etc/hosts for a sandbox called `hostname` (one DNS label)."""
    return {
        "hostname": f"{hostname}\n".encode(),
        "hosts": (
            f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        ).encode(),
    }


NAME_FILES: Final = ("hostname", "hosts")  # the order of name_files() and create_name_files()


def create_name_files(socket_dir: str) -> tuple[int, ...]:
    """A serving member's name files, empty, in its socket dir (its /run/dorm, where its
    /etc/hostname and /etc/hosts point: ``SandboxSpec.named_at_claim``); returns a write fd for
    each. Made while the member is built, so the claim only writes them
    (``fill_name_files``): creating an inode takes ~0.1 ms on this VM's ext4, rewriting
    through an open fd ~5 µs. Root's and read-only to the member, which runs no tenant code yet;
    what the tenant does to them later touches only its own sandbox."""
    fds: list[int] = []
    try:
        for name in NAME_FILES:
            path = os.path.join(socket_dir, name)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fds.append(os.open(path, flags, 0o444))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return tuple(fds)


def fill_name_files(fds: tuple[int, ...], hostname: str) -> None:
    """Write a claimed member's name into the files ``create_name_files`` made."""
    for fd, data in zip(fds, name_files(hostname).values(), strict=True):
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))


def _etc_files(spec: SandboxSpec) -> dict[str, bytes]:
    gid = spec.effective_gid
    names = {} if spec.named_at_claim else name_files(spec.hostname)
    return {
        "passwd": (
            "root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"app:x:{spec.uid}:{gid}:app:/app:/usr/sbin/nologin\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ).encode(),
        "group": f"root:x:0:\napp:x:{gid}:\nnogroup:x:65534:\n".encode(),
        **names,
    }


def _rootfs_entries(rootfs: str) -> list[tuple[str, str, str | None]]:
    """(kind, name, link target) of a bundle rootfs's top level; kind in dir/link/file."""
    out: list[tuple[str, str, str | None]] = []
    for entry in sorted(os.scandir(rootfs), key=lambda e: e.name):
        if entry.name in ROOTFS_SKIP:
            continue
        if entry.is_symlink():
            out.append(("link", entry.name, os.readlink(entry.path)))
        elif entry.is_dir():
            out.append(("dir", entry.name, None))
        elif entry.is_file():
            out.append(("file", entry.name, None))
    return out


LayoutKey = tuple[str | None, tuple[str, ...], bytes, bool, str]


def layout_key(spec: SandboxSpec, *, rootless: bool, resolv_conf: bytes, base: str) -> LayoutKey:
    """What the static part of the filesystem depends on: sandboxes with equal keys can use
    interchangeable pre-built mount namespaces (see nspool.py)."""
    return (spec.rootfs, spec.extra_ro_binds, resolv_conf, rootless, base)


def _static_ops(key: LayoutKey) -> tuple[Op, ...]:
    rootfs, extra_ro_binds, resolv_conf, rootless, base = key
    pl = _Planner(base)
    if rootfs is None:
        for top in SYSTEM_TOPS:
            host = "/" + top
            if os.path.islink(host):
                pl.symlink(os.readlink(host), host)
            elif os.path.isdir(host):
                pl.bind(host, host, RO_ATTRS)
        pl.mkdirs("/etc")
        pl.file("/etc/nsswitch.conf", NSSWITCH)
        pl.file("/etc/resolv.conf", resolv_conf)
        for name in ETC_COPIES:
            data = _cached_read("/etc/" + name)
            if data is not None:
                pl.file("/etc/" + name, data)
        if os.path.islink("/etc/localtime"):
            pl.symlink(os.readlink("/etc/localtime"), "/etc/localtime")
        for name in ETC_RO_DIRS:
            if os.path.isdir("/etc/" + name) and not os.path.islink("/etc/" + name):
                pl.bind("/etc/" + name, "/etc/" + name, RO_ATTRS)
        if os.path.isfile("/etc/ssl/openssl.cnf"):
            pl.bind("/etc/ssl/openssl.cnf", "/etc/ssl/openssl.cnf", RO_ATTRS, is_file=True)
        prefixes = [base_prefix()]
    else:
        for kind, name, target in _rootfs_entries(rootfs):
            host = os.path.join(rootfs, name)
            if kind == "link" and target is not None:
                pl.symlink(target, "/" + name)
            elif kind == "dir":
                pl.bind(host, "/" + name, RO_ATTRS)
            else:
                pl.bind(host, "/" + name, RO_ATTRS, is_file=True)
        prefixes = []
    for path in prefixes:
        # rootless: a prefix the unprivileged caller cannot read (e.g. under /root) is useless
        if _under_tmp(path):
            continue  # per instance, on top of its /tmp: see _instance
        if not pl.covered(path) and (not rootless or os.access(path, os.R_OK | os.X_OK)):
            pl.bind(path, path, RO_ATTRS)
    for path in extra_ro_binds:
        if not _under_tmp(path) and not pl.covered(path):
            pl.bind(path, path, RO_ATTRS)
    for mountpoint in ("/app", "/data", "/run/dorm", "/tmp", "/proc"):
        pl.mkdirs(mountpoint)
    pl.tmpfs("/dev", libc.MS_NOSUID | libc.MS_NOEXEC, "size=64k,nr_inodes=64,mode=0755")
    for name, major, minor in DEVICES:
        if rootless:
            pl.bind("/dev/" + name, "/dev/" + name, 0, is_file=True)
        else:
            dev = os.makedev(major, minor)
            pl.ops.append((OP_MKNOD, pl.p("/dev/" + name), stat.S_IFCHR | 0o666, dev))
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        pl.symlink(target, "/dev/" + name)
    pl.mkdirs("/dev/shm")
    return tuple(pl.ops)


NSSWITCH: Final = (
    b"passwd: files\ngroup: files\nhosts: files dns\nnetworks: files\n"
    b"protocols: files\nservices: files\n"
)

_static_cache: dict[LayoutKey, tuple[float, tuple[Op, ...]]] = {}


def static_ops(key: LayoutKey) -> tuple[Op, ...]:
    """Static operations for a layout, cached while /etc/ld.so.cache is unchanged."""
    try:
        stamp = os.stat("/etc/ld.so.cache").st_mtime
    except OSError:
        stamp = 0.0
    hit = _static_cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    ops = _static_ops(key)
    _static_cache[key] = (stamp, ops)
    return ops


_NOSUID_NODEV: Final = libc.MS_NOSUID | libc.MS_NODEV


def _instance(spec: SandboxSpec) -> tuple[tuple[Op, ...], tuple[Bind, ...]]:
    """Per-instance operations, paths as seen inside (they run after pivot_root)."""
    ops: list[Op] = []
    if spec.rootfs is None:
        ops.extend(
            (OP_FILE, b"/etc/" + name.encode(), 0o444, data)
            for name, data in _etc_files(spec).items()
        )
        if spec.named_at_claim:
            ops.extend(
                (OP_SYMLINK, b"/run/dorm/" + name, b"/etc/" + name, None)
                for name in (b"hostname", b"hosts")
            )
    ops.append((OP_TMPFS, b"/tmp", _NOSUID_NODEV, b"size=%d,mode=1777" % spec.tmp_size))
    ops.append(
        (
            OP_TMPFS,
            b"/dev/shm",
            _NOSUID_NODEV | libc.MS_NOEXEC,
            b"size=%d,mode=1777" % spec.shm_size,
        )
    )
    binds: list[Bind] = []
    # Read-only binds that live under /tmp on the host (a virtualenv in a CI checkout, say) would
    # be hidden by the instance's own /tmp tmpfs: they are attached on top of it instead, on
    # root-owned mount points in the sticky /tmp, which the tenant can neither remove nor write.
    made: set[str] = set()
    for path in _tmp_binds(spec):
        parts = path.strip("/").split("/")
        for depth in range(2, len(parts) + 1):
            sub = "/" + "/".join(parts[:depth])
            if sub not in made:
                made.add(sub)
                ops.append((OP_MKDIR, sub.encode(), 0o755, None))
        binds.append((path.encode(), path.encode(), RO_ATTRS))
    if spec.app_dir is not None:
        binds.append((spec.app_dir.encode(), b"/app", RO_ATTRS))
    if spec.data_dir is not None:
        idmapped = libc.MOUNT_ATTR_IDMAP if spec.data_idmap else 0
        binds.append((spec.data_dir.encode(), b"/data", RW_ATTRS | idmapped))
    binds.append((spec.socket_dir.encode(), b"/run/dorm", RW_NOEXEC_ATTRS))
    return tuple(ops), tuple(binds)


@functools.cache
def base_prefix() -> str:
    """The interpreter prefix every layout binds, resolved once (a realpath is ~5 lstat calls,
    and the per-instance plan needs it on every start)."""
    return os.path.realpath(sys.base_prefix)


def _under_tmp(path: str) -> bool:
    return path.startswith("/tmp/")


def _tmp_binds(spec: SandboxSpec) -> list[str]:
    """The read-only binds (extra ones, and the Python prefix) that sit under /tmp."""
    wanted = list(spec.extra_ro_binds)
    if spec.rootfs is None:
        wanted.append(base_prefix())
    out: list[str] = []
    for path in sorted(p for p in wanted if _under_tmp(p)):
        if not any(path == o or path.startswith(o + "/") for o in out):
            out.append(path)
    return out


def plan(
    spec: SandboxSpec,
    *,
    rootless: bool = False,
    resolv_conf: bytes = b"",
    base: str | None = None,
) -> MountPlan:
    """Compute every mount operation for ``spec`` (runs in the parent, before fork)."""
    base = base or mount_base()
    key = layout_key(spec, rootless=rootless, resolv_conf=resolv_conf, base=base)
    instance_ops, binds = _instance(spec)
    return MountPlan(
        base=base.encode(),
        root_data=ROOT_DATA,
        key=key,
        static_ops=static_ops(key),
        instance_ops=instance_ops,
        binds=binds,
        cwd=spec.cwd.encode(),
    )


def _apply(ops: tuple[Op, ...]) -> None:
    old_umask = os.umask(0)
    try:
        for kind, a, b, c in ops:
            if kind == OP_MKDIR:
                os.mkdir(a, b)
            elif kind == OP_BIND:
                libc.mount(a, b, None, libc.MS_BIND | libc.MS_REC, None)
                if c:
                    libc.mount_setattr(b, c)
            elif kind == OP_FILE:
                fd = os.open(a, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, b)
                try:
                    if c:
                        os.write(fd, c)
                finally:
                    os.close(fd)
            elif kind == OP_SYMLINK:
                os.symlink(a, b)
            elif kind == OP_TMPFS:
                libc.mount(b"tmpfs", a, b"tmpfs", b, c)
            elif kind == OP_MKNOD:
                os.mknod(a, b, c)
    finally:
        os.umask(old_umask)


def make_private() -> None:
    """Step: stop mount events propagating back to the host (and from it)."""
    libc.mount(None, b"/", None, libc.MS_REC | libc.MS_PRIVATE, None)


def build_static(mp: MountPlan) -> None:
    """Step (or pool pre-build): tmpfs root plus the layout's system binds, /etc and /dev."""
    libc.mount(b"tmpfs", mp.base, b"tmpfs", libc.MS_NOSUID | libc.MS_NODEV, mp.root_data)
    _apply(mp.static_ops)


def pivot(mp: MountPlan) -> None:
    """Step: pivot_root into the new root and lazily detach the old one, so no host path remains.

    The detach waits for an RCU grace period (milliseconds on a VM), which is why the pre-forked
    path does this at prewarm time, not per start."""
    os.chdir(mp.base)
    libc.pivot_root(b".", b".")
    libc.umount2(b".", libc.MNT_DETACH)
    os.chdir(b"/")


def mount_proc(target: bytes = b"/proc") -> None:
    """Fresh procfs of the caller's pid namespace (the caller must be in it: pid 1 mounts it).

    In a user namespace the kernel only allows this while an unobscured procfs is still visible
    in the mount namespace, i.e. before pivot_root detaches the host's."""
    flags = libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC
    libc.mount(b"proc", target, b"proc", flags, b"hidepid=invisible")


def open_bind(src: bytes, attrs: int, ids: tuple[int, int] | None = None) -> int:
    """One detached copy of ``src`` with ``attrs`` applied. ``MOUNT_ATTR_IDMAP`` in ``attrs``
    (a /data volume, see idmap.py) maps the volume's storage owner to ``ids`` (uid, gid)."""
    if attrs & libc.MOUNT_ATTR_IDMAP:
        if ids is None:
            raise OSError(errno.EINVAL, f"idmapped bind of {src!r} without the instance's ids")
        return idmap.open_tree(src, attrs & ~libc.MOUNT_ATTR_IDMAP, *ids)
    fd = libc.open_tree_clone(src)
    try:
        libc.mount_setattr(b"", attrs, dfd=fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_binds(mp: MountPlan, ids: tuple[int, int] | None = None) -> list[int]:
    """Detached copies of the per-instance host dirs, attributes already applied; ``ids`` is the
    instance's (uid, gid), needed when /data is idmapped.

    Opened while the host tree is still visible (the parent for pre-forked children, the child
    itself before pivot_root when rootless), attached inside with ``attach_binds``."""
    fds: list[int] = []
    try:
        for src, _target, attrs in mp.binds:
            fds.append(open_bind(src, attrs, ids))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def build_instance(mp: MountPlan, bind_fds: tuple[int, ...]) -> None:
    """Step (after pivot_root): identity files, /tmp, /dev/shm, the attached binds; then the root
    tmpfs becomes read-only.

    Root-owned 0755 already keeps the tenant out of /; read-only also stops root-in-userns
    (rootless mode) and any future bug that would leave the tenant with CAP_DAC_OVERRIDE.
    """
    _apply(mp.instance_ops)
    for fd, (_src, target, _attrs) in zip(bind_fds, mp.binds, strict=True):
        libc.move_mount_fd(fd, target)
    flags = libc.MS_REMOUNT | libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV
    libc.mount(None, b"/", None, flags, mp.root_data)


def enter_cwd(mp: MountPlan) -> None:
    os.chdir(mp.cwd)
