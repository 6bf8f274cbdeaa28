"""What this host supports, for ``dorm doctor`` and for choosing the isolation level at start.

Isolation levels:

* ``sandbox``  — root with cgroups (v1 or v2), seccomp and namespaces: every protection applies.
* ``rootless`` — not root, but unprivileged user namespaces work: namespaces, mounts, seccomp,
  no_new_privs and rlimits apply; ``missing_protections()`` lists what does not.
* ``process``  — neither: tenants run as plain processes (development only; the gateway must log it
  loudly).
"""

from __future__ import annotations

import os
import platform
from typing import Any

from . import cgroups, libc


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _userns() -> dict[str, Any]:
    max_ns = _read("/proc/sys/user/max_user_namespaces")
    unpriv = _read("/proc/sys/kernel/unprivileged_userns_clone")
    apparmor = _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
    ok = max_ns is not None and max_ns != "0" and unpriv != "0" and apparmor != "1"
    reasons = []
    if max_ns in (None, "0"):
        reasons.append(f"user.max_user_namespaces={max_ns}")
    if unpriv == "0":
        reasons.append("kernel.unprivileged_userns_clone=0")
    if apparmor == "1":
        reasons.append("kernel.apparmor_restrict_unprivileged_userns=1")
    return {
        "available": ok,
        "max_user_namespaces": max_ns,
        "unprivileged_userns_clone": unpriv,
        "apparmor_restrict_unprivileged_userns": apparmor,
        "reasons": reasons,
    }


def _seccomp() -> dict[str, Any]:
    actions = _read("/proc/sys/kernel/seccomp/actions_avail")
    out: dict[str, Any] = {"kernel": actions is not None, "actions": actions}
    try:
        from . import seccomp

        f = seccomp.compiled_filter()
        out["libseccomp"] = seccomp.library().version
        out["filter_instructions"] = f.instructions
        out["unresolved_syscalls"] = list(f.skipped)
    except OSError as e:
        out["libseccomp"] = None
        out["error"] = str(e)
    return out


def _pidfd() -> bool:
    try:
        fd = libc.pidfd_open(os.getpid())
    except OSError:
        return False
    os.close(fd)
    return True


def _filesystems() -> set[str]:
    text = _read("/proc/filesystems") or ""
    return {line.split()[-1] for line in text.splitlines() if line.strip()}


def explain_isolation() -> tuple[str, list[str]]:
    """(level, reasons): the level ``spawn`` can provide here and why not a stronger one."""
    reasons: list[str] = []
    root = os.geteuid() == 0
    backend, cg_reason, _ = cgroups.probe()
    seccomp_ok = _read("/proc/sys/kernel/seccomp/actions_avail") is not None
    try:
        from . import seccomp

        seccomp.library()
    except OSError as e:
        seccomp_ok = False
        reasons.append(f"libseccomp unavailable: {e}")
    if not seccomp_ok:
        reasons.append("seccomp filtering unavailable")
    if root:
        if backend is not None and seccomp_ok:
            return "sandbox", [f"running as root; {cg_reason}; seccomp available"]
        if backend is None:
            reasons.append(f"no usable cgroups: {cg_reason}")
        return "process", reasons
    reasons.append(f"not root (euid {os.geteuid()})")
    userns = _userns()
    if userns["available"] and seccomp_ok:
        return "rootless", reasons + [f"missing: {m}" for m in missing_protections()]
    reasons.extend(userns["reasons"] or ["user namespaces unavailable"])
    return "process", reasons


def detect_isolation() -> str:
    """``sandbox``, ``rootless`` or ``process``; see ``explain_isolation`` for the reasons."""
    return explain_isolation()[0]


def missing_protections() -> list[str]:
    """What rootless mode cannot provide, in words an operator can act on."""
    return [
        "no cgroup limits: memory, CPU and pids are unbounded (run as root, or delegate cgroup v2)",
        "no per-instance uid: every tenant runs as the gateway's own uid (only one uid is mapped)",
        "RLIMIT_NPROC is shared by all tenants, because they share that uid",
        "no egress mode: bridges, veths and NAT need CAP_NET_ADMIN on the host",
        "device nodes are bind mounts of the host's (mknod needs real root)",
    ]


def _launcher() -> str | None:
    """The C launcher exec starts use (built on first use), or None: the Python path then."""
    from . import launcher

    return launcher.path() if launcher.available() else None


def favordynmods_active() -> str | None:
    """The cgroup hierarchy mounted with favordynmods (fast cgroup joins), if any."""
    from .dynmods import active

    return active()


def volume_ownership(volumes: str) -> dict[str, Any]:
    """How persistent /data volumes under ``volumes`` get their owner (see idmap.py): ``idmap``
    (one storage owner on disk, an idmapped mount per start) or ``chown`` (the tree is chowned to
    each instance's uid), with the reason. Probes the volumes dir as the fork server does at the
    first volume on a filesystem, or before there is one, the filesystem of its nearest existing
    ancestor (that mount alone: what lies below an ancestor such as / says nothing about it)."""
    from . import idmap
    from .spec import MIN_UID

    path = os.path.abspath(volumes)
    while not os.path.isdir(path) and path != "/":
        path = os.path.dirname(path)
    found: dict[str, Any] = {"path": volumes, "probed": path, "fstype": idmap.fstype(path)}
    if os.geteuid() != 0:
        why = "not root: rootless sandboxes run every tenant as the gateway's own uid"
        return {**found, "mode": "chown", "reason": why}
    reason: str | None
    try:
        reason = idmap.probe(path, MIN_UID, MIN_UID, recursive=path == os.path.abspath(volumes))
    except OSError as e:
        reason = f"probe failed: {e}"
    finally:
        idmap.clear()
    if reason is not None:
        return {**found, "mode": "chown", "reason": reason}
    return {**found, "mode": "idmap", "storage_uid": idmap.STORAGE_UID}


def host_report() -> dict[str, Any]:
    """Facts for ``dorm doctor``: cgroups, user namespaces, seccomp, overlayfs, pidfd, root."""
    backend, cg_reason, facts = cgroups.probe()
    level, reasons = explain_isolation()
    fs = _filesystems()
    try:
        from .mounts import has_mount_setattr

        setattr_ok = has_mount_setattr()
    except OSError:
        setattr_ok = False
    return {
        "kernel": platform.release(),
        "arch": platform.machine(),
        "root": os.geteuid() == 0,
        "euid": os.geteuid(),
        "cgroup": {
            "version": backend.version if backend is not None else None,
            "controllers": backend.describe().get("controllers") if backend is not None else [],
            "reason": cg_reason,
            **facts,
        },
        "user_namespaces": _userns(),
        "seccomp": _seccomp(),
        "overlayfs": "overlay" in fs,
        "pidfd": _pidfd(),
        "mount_setattr": setattr_ok,
        "favordynmods": favordynmods_active(),
        "sandbox_launcher": _launcher(),
        "isolation": level,
        "isolation_reasons": reasons,
        "missing_protections": missing_protections() if level == "rootless" else [],
    }
