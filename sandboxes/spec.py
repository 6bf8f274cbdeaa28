"""The sandbox spec: everything that decides how one instance is confined, validated up front.

Validation happens in ``__post_init__`` so an invalid spec can never reach the fork server's child,
where an error would be far more expensive to report. Every error is a ``SandboxSpecError`` naming
the offending field, so the gateway can surface "field X: reason" to the operator verbatim.

There is deliberately no knob to turn seccomp, no_new_privs or capability dropping off: a spec can
only make a sandbox *stricter* (limits) or grant documented, narrow extras (egress, /data, extra
read-only binds).
"""

from __future__ import annotations

import fcntl
import os
import re
from dataclasses import dataclass, field
from typing import Final, Literal

_NAME_RE: Final = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_HOSTNAME_RE: Final = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_ENV_NAME_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Paths the sandbox layout owns; an extra bind may not shadow or nest into them.
RESERVED_PATHS: Final = ("/", "/app", "/data", "/dev", "/proc", "/run", "/tmp", "/etc", "/sys")

MIN_UID: Final = 1000
MAX_UID: Final = 2**32 - 2  # 2**32-1 is (uid_t)-1, "no change" for setresuid

NetworkMode = Literal["none", "egress"]


class SandboxSpecError(ValueError):
    """A spec field is invalid. ``field`` names it; ``message`` says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Rlimits:
    """Resource limits applied (soft = hard) before dropping privileges.

    Why these defaults: ``core=0`` keeps tenant memory out of core files on the host; ``fsize``
    bounds a runaway writer on /data even where no quota exists; ``nofile`` is generous enough for a
    proxy-fed server but bounded; ``memlock`` stays at the kernel's unprivileged default so pinned
    memory cannot bypass the memory cgroup; ``nproc`` (per uid, and uids are per instance) is set to
    the pids limit by ``spawn`` when ``nproc`` is None, a second fence against fork bombs that also
    works where no pids controller exists.
    """

    nofile: int = 4096
    core: int = 0
    fsize: int = 1 << 30
    memlock: int = 64 << 10
    msgqueue: int = 0
    nproc: int | None = None
    stack: int | None = None

    def __post_init__(self) -> None:
        for name in ("nofile", "core", "fsize", "memlock", "msgqueue"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SandboxSpecError(f"rlimits.{name}", f"must be an int >= 0, got {value!r}")
        if self.nofile < 16 or self.nofile > 1 << 20:
            raise SandboxSpecError("rlimits.nofile", f"must be in 16..{1 << 20}, got {self.nofile}")
        for name in ("nproc", "stack"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise SandboxSpecError(
                    f"rlimits.{name}", f"must be None or an int >= 1, got {value!r}"
                )


def _abs_path(field_name: str, value: object, *, must_exist: bool) -> str:
    if not isinstance(value, str) or not value:
        raise SandboxSpecError(field_name, f"must be a non-empty path string, got {value!r}")
    if "\0" in value:
        raise SandboxSpecError(field_name, "contains a NUL byte")
    if not value.startswith("/"):
        raise SandboxSpecError(field_name, f"must be absolute, got {value!r}")
    if os.path.normpath(value) != value.rstrip("/") and value != "/":
        raise SandboxSpecError(
            field_name, f"must be normalized (no '..', '.', '//'), got {value!r}"
        )
    if must_exist and not os.path.isdir(value):
        raise SandboxSpecError(field_name, f"directory does not exist: {value!r}")
    return value


def _positive_int(field_name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SandboxSpecError(field_name, f"must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """How one instance is confined. See docs/sandboxes.md for the resulting filesystem layout."""

    name: str
    uid: int
    socket_dir: str
    app_dir: str | None = None
    data_dir: str | None = None
    cwd: str = "/app"
    hostname: str = "dorm"
    memory: int | None = 256 << 20
    cpu: float | None = 1.0
    pids: int | None = 256
    cpu_weight: int | None = None  # 1..10000 (v2 cpu.weight); v1 maps to cpu.shares
    memory_high: int | None = None  # v2 memory.high soft limit; ignored on v1 (no equivalent)
    tmp_size: int = 64 << 20
    shm_size: int = 16 << 20
    rlimits: Rlimits = field(default_factory=Rlimits)
    network: NetworkMode = "none"
    extra_ro_binds: tuple[str, ...] = ()
    rootfs: str | None = None
    gid: int | None = None  # defaults to uid
    # Attach data_dir as an idmapped mount: files owned on disk by idmap.STORAGE_UID/GID show as
    # uid/gid inside, and new ones are written as the storage owner (root only; see idmap.py).
    data_idmap: bool = False
    # A serving pool member, built before its tenant (and so its hostname) is known: /etc/hostname
    # and /etc/hosts are symlinks to /run/dorm/hostname and /run/dorm/hosts, which the fork server
    # writes into the member's socket dir at the claim (mounts.write_name_files).
    named_at_claim: bool = False
    cgroup_parent: str = "dorm"  # dorm's cgroup subtree; tests use their own to stay isolated

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise SandboxSpecError(
                "name", f"must match [a-z0-9-], 1-63 chars, no leading/trailing '-': {self.name!r}"
            )
        _positive_int("uid", self.uid, MIN_UID)
        if self.uid > MAX_UID:
            raise SandboxSpecError("uid", f"must be <= {MAX_UID}, got {self.uid}")
        if self.gid is not None:
            _positive_int("gid", self.gid, MIN_UID)
            if self.gid > MAX_UID:
                raise SandboxSpecError("gid", f"must be <= {MAX_UID}, got {self.gid}")
        _abs_path("socket_dir", self.socket_dir, must_exist=True)
        if self.app_dir is not None:
            _abs_path("app_dir", self.app_dir, must_exist=True)
        if self.data_dir is not None:
            _abs_path("data_dir", self.data_dir, must_exist=True)
        if not isinstance(self.data_idmap, bool):
            raise SandboxSpecError("data_idmap", f"must be a bool, got {self.data_idmap!r}")
        if self.data_idmap and self.data_dir is None:
            raise SandboxSpecError("data_idmap", "needs a data_dir")
        if self.rootfs is not None:
            _abs_path("rootfs", self.rootfs, must_exist=True)
        _abs_path("cwd", self.cwd, must_exist=False)
        if not isinstance(self.hostname, str) or not _HOSTNAME_RE.match(self.hostname):
            raise SandboxSpecError("hostname", f"must be one DNS label, got {self.hostname!r}")
        if self.memory is not None:
            _positive_int("memory", self.memory, 4 << 20)
        if self.memory_high is not None:
            _positive_int("memory_high", self.memory_high, 4 << 20)
            if self.memory is not None and self.memory_high > self.memory:
                raise SandboxSpecError("memory_high", "must not exceed memory")
        if self.cpu is not None and (
            not isinstance(self.cpu, (int, float))
            or isinstance(self.cpu, bool)
            or not 0.01 <= float(self.cpu) <= 1024
        ):
            raise SandboxSpecError(
                "cpu", f"must be a number of CPUs in 0.01..1024, got {self.cpu!r}"
            )
        if self.pids is not None:
            _positive_int("pids", self.pids, 1)
        if self.cpu_weight is not None:
            _positive_int("cpu_weight", self.cpu_weight, 1)
            if self.cpu_weight > 10000:
                raise SandboxSpecError("cpu_weight", f"must be <= 10000, got {self.cpu_weight}")
        _positive_int("tmp_size", self.tmp_size, 1 << 20)
        _positive_int("shm_size", self.shm_size, 64 << 10)
        if not isinstance(self.rlimits, Rlimits):
            raise SandboxSpecError("rlimits", f"must be an Rlimits, got {type(self.rlimits)}")
        if self.network not in ("none", "egress"):
            raise SandboxSpecError("network", f"must be 'none' or 'egress', got {self.network!r}")
        if not isinstance(self.extra_ro_binds, tuple):
            raise SandboxSpecError("extra_ro_binds", "must be a tuple of absolute directory paths")
        for i, path in enumerate(self.extra_ro_binds):
            _abs_path(f"extra_ro_binds[{i}]", path, must_exist=True)
            for reserved in RESERVED_PATHS:
                if reserved == "/tmp" and path.startswith("/tmp/"):
                    continue  # mounted on top of the instance's /tmp (see mounts._instance)
                if path == reserved or (reserved != "/" and path.startswith(reserved + "/")):
                    raise SandboxSpecError(
                        f"extra_ro_binds[{i}]", f"{path!r} overlaps the reserved path {reserved!r}"
                    )
        if not isinstance(self.cgroup_parent, str) or not _NAME_RE.match(self.cgroup_parent):
            raise SandboxSpecError("cgroup_parent", f"must match [a-z0-9-]: {self.cgroup_parent!r}")

    @property
    def effective_gid(self) -> int:
        return self.uid if self.gid is None else self.gid


def validate_env(env: dict[str, str]) -> None:
    """Environment passed to execve: names must be identifiers, values NUL-free strings."""
    if not isinstance(env, dict):
        raise SandboxSpecError("env", "must be a dict[str, str]")
    for key, value in env.items():
        if not isinstance(key, str) or not _ENV_NAME_RE.match(key):
            raise SandboxSpecError("env", f"invalid variable name {key!r}")
        if not isinstance(value, str) or "\0" in value:
            raise SandboxSpecError("env", f"value of {key} must be a NUL-free string")


def validate_argv(argv: list[str]) -> None:
    if not isinstance(argv, list) or not argv:
        raise SandboxSpecError("argv", "must be a non-empty list of strings")
    for i, arg in enumerate(argv):
        if not isinstance(arg, str) or "\0" in arg:
            raise SandboxSpecError(f"argv[{i}]", "must be a NUL-free string")


@dataclass(frozen=True, slots=True)
class EnvFile:
    """An environment the caller passes on without holding it: `fd` is a sealed memfd of
    ``NAME=value\\0`` entries (`env_file`), read only by the sandbox's own process (after its
    fork, or in the C launcher) and closed before the tenant's code runs. `path` is its PATH (no
    secret) for execve's PATH lookup.

    Why: a zygote child is a fork of its caller and inherits all of its memory, freed memory
    included. A fork server that parsed tenant A's environment (its database password, say)
    handed the leftovers to every later fork, and tenant B could read them in its own memory
    (tests/test_isolation_review.py scans for them). An environment that never enters the
    caller's memory cannot be inherited."""

    fd: int
    path: str = "/usr/local/bin:/usr/bin:/bin"


Env = dict[str, str] | EnvFile


def env_file(env: dict[str, str]) -> int:
    """A sealed, close-on-exec memfd holding `env` (validated as `validate_env` does).

    gateway.launcher.env_memfd is a twin that must write the same bytes (tests/test_launcher.py
    checks): the gateway does not import this package (its __init__ costs ~60 ms)."""
    validate_env(env)
    data = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())
    fd = os.memfd_create("dorm-env", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_env_file(fd: int) -> dict[bytes, bytes]:
    """The environment in an `env_file` memfd (read from offset 0; the fd is left open).
    runtimes.python.read_env is its twin for the Python runtime, which must agree."""
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0) if size else b""
    env: dict[bytes, bytes] = {}
    for entry in data.split(b"\0"):
        name, eq, value = entry.partition(b"=")
        if eq:
            env[name] = value
    return env
