"""The C launcher (launcher.c): builds it once, hands it to idle children, encodes its plans.

Why: a child forked from the Python fork server costs the fork server a page-table copy and then
a write fault on every page it touches (~1.3 us each, ~180 on the next start's path); the
child's ``execve`` tears that copied address space down again (0.7-1.0 ms on this VM, more the
bigger the fork server), and the per-start steps cost ~0.6 ms of interpretation in Python. An
idle child that is going to exec is therefore this small static binary, started with
``posix_spawn`` (vfork, nothing copied); it runs every step itself, in the documented order, and
execs the tenant from a ~100 KiB process. Zygote mode (``spawn_call``) keeps forked Python
children: it needs the preloaded interpreter.

The binary is compiled from the source next to this file with the system C compiler into a
root-owned 0700 directory, keyed by the source's hash, the first time it is needed (the fork
server calls ``available()`` before forking). Without a compiler, static libc or root, or with
``DORM_SANDBOX_LAUNCHER=0``, ``available()`` is False and every start uses the Python path,
which runs the same steps in the same order.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Final

from . import mounts

SOURCE: Final = Path(__file__).with_name("launcher.c")
DIRS: Final = ("/run/dorm-sandbox-launcher", "/var/tmp/.dorm-sandbox-launcher")
CFLAGS: Final = ("-O2", "-static", "-Wall", "-Werror")
MAGIC: Final = 0x314C5344  # "DSL1", checked by launcher.c
SUPPORTED_OPS: Final = frozenset({mounts.OP_MKDIR, mounts.OP_FILE, mounts.OP_TMPFS})


def can_run(mp: mounts.MountPlan) -> bool:
    """Whether the launcher can apply every per-instance mount operation of ``mp`` (symlinks,
    say, are only made by the Python child)."""
    return all(op[0] in SUPPORTED_OPS for op in mp.instance_ops)


_state: dict[str, object] = {}


def _prune(directory: str, keep: str) -> None:
    """Remove launchers built from older sources (one per version would pile up otherwise). A
    fork server still using one rebuilds it when it finds it gone (see ``path``)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            old = os.path.join(directory, name)
            if name.startswith("launcher-") and not name.endswith(".tmp") and old != keep:
                with contextlib.suppress(OSError):
                    os.unlink(old)


def _build() -> str | None:
    """Path of a verified launcher binary, compiling it if needed; None if that is impossible."""
    if os.environ.get("DORM_SANDBOX_LAUNCHER", "1") == "0" or os.geteuid() != 0:
        return None
    cc = shutil.which("cc") or shutil.which("gcc")
    try:
        source = SOURCE.read_bytes()
    except OSError:
        return None
    digest = hashlib.sha256(source + " ".join(CFLAGS).encode()).hexdigest()[:16]
    for d in DIRS:
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
            st = os.lstat(d)
        except OSError:
            continue
        # Only a directory nobody else can write to: the binary runs as root.
        if st.st_uid != 0 or st.st_mode & 0o022 or not os.path.isdir(d) or os.path.islink(d):
            continue
        binary = os.path.join(d, f"launcher-{digest}")
        if not os.path.exists(binary):
            if cc is None:
                return None
            tmp = f"{binary}.{os.getpid()}.tmp"
            try:
                done = subprocess.run(
                    [cc, *CFLAGS, "-o", tmp, str(SOURCE)],
                    capture_output=True,
                    timeout=60,
                    check=False,
                )
                if done.returncode != 0:
                    return None
                os.chmod(tmp, 0o700)
                os.rename(tmp, binary)
                _prune(d, keep=binary)
            except (OSError, subprocess.SubprocessError):
                return None
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        try:
            st = os.lstat(binary)
            check = subprocess.run([binary, "--check"], capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if st.st_uid != 0 or st.st_mode & 0o022 or check.stdout != b"dorm-launcher ok\n":
            continue
        return binary
    return None


def available() -> bool:
    """Whether starts that exec can use the launcher (builds it on the first call)."""
    if "path" not in _state:
        _state["path"] = _build()
    return _state["path"] is not None


def path() -> str:
    """The verified binary (``available()`` must have returned True); rebuilt if it vanished
    since (a cleaned-up /run or /var/tmp), so a long-running fork server keeps working."""
    available()
    p = _state.get("path")
    if isinstance(p, str) and not os.path.exists(p):
        _state["path"] = p = _build()
    if not isinstance(p, str):
        raise OSError(2, "the sandbox launcher is not available")
    return p


_U32: Final = struct.Struct("<I")
_I32x4: Final = struct.Struct("<Iiiii")
_RLIMIT: Final = struct.Struct("<IQ")


def _s(b: bytes) -> bytes:
    return _U32.pack(len(b)) + b + b"\0"


_filter_wire: list[bytes] = [b"", b""]  # (program, its encoding): the same bytes on every start


def encode(
    *,
    devnull: int,
    stdout: int,
    stderr: int,
    netns: int,
    mp: mounts.MountPlan,
    bind_fds: tuple[int, ...],
    hostname: bytes,
    uid: int,
    gid: int,
    rlimits: tuple[tuple[int, int], ...],
    argv: list[str],
    env: dict[str, str],
    path: list[str],
    seccomp_program: bytes,
    env_fd: int = -1,
) -> bytes:
    """The launcher's plan (format: see the decoder in launcher.c). fd fields are indexes into
    the SCM_RIGHTS list sent with it; -1 for none."""
    parts = [
        _I32x4.pack(MAGIC, devnull, stdout, stderr, netns),
        _s(mp.root_data),
        _s(mp.cwd),
        _s(hostname),
        struct.pack("<III", uid, gid, len(mp.instance_ops)),
    ]
    for kind, a, b, c in mp.instance_ops:
        if kind not in SUPPORTED_OPS:
            raise ValueError(f"mount operation {kind} is not supported by the launcher")
        parts.append(_U32.pack(kind) + _s(a) + _U32.pack(b) + _s(c or b""))
    parts.append(_U32.pack(len(mp.binds)))
    for fd, (_src, target, _attrs) in zip(bind_fds, mp.binds, strict=True):
        parts.append(struct.pack("<i", fd) + _s(target))
    parts.append(_U32.pack(len(rlimits)))
    parts.extend(_RLIMIT.pack(res, value & 0xFFFFFFFFFFFFFFFF) for res, value in rlimits)
    parts.append(_U32.pack(len(argv)))
    parts.extend(_s(a.encode()) for a in argv)
    parts.append(_U32.pack(len(env)))
    parts.extend(_s(f"{k}={v}".encode()) for k, v in env.items())
    parts.append(struct.pack("<i", env_fd))  # an EnvFile's memfd: the launcher reads it
    parts.append(_U32.pack(len(path)))
    parts.extend(_s(p.encode()) for p in path)
    if _filter_wire[0] is not seccomp_program:
        _filter_wire[:] = [seccomp_program, _s(seccomp_program)]
    parts.append(_filter_wire[1])
    return b"".join(parts)
