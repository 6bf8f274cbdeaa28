"""dorm sandboxes: how one tenant process is confined (namespaces, cgroups, mounts, uid, caps,
no_new_privs, seccomp, rlimits, network). Imports nothing from ``gateway`` or ``runtimes``.

See docs/sandboxes.md for the confinement order, the filesystem layout and the measured costs.
"""

from .attach import attach
from .doctor import detect_isolation, host_report
from .errors import CgroupUnavailable, SandboxError
from .recovery import cleanup_stale
from .spawn import (
    STEPS,
    PendingSandbox,
    Sandbox,
    prefork_for,
    prepare_socket_dir,
    prewarm,
    spawn,
    spawn_call,
    start_call,
)
from .spec import EnvFile, Rlimits, SandboxSpec, SandboxSpecError, env_file, read_env_file

__all__ = [
    "STEPS",
    "CgroupUnavailable",
    "EnvFile",
    "PendingSandbox",
    "Rlimits",
    "Sandbox",
    "SandboxError",
    "SandboxSpec",
    "SandboxSpecError",
    "attach",
    "cleanup_stale",
    "detect_isolation",
    "env_file",
    "host_report",
    "prefork_for",
    "prepare_socket_dir",
    "prewarm",
    "read_env_file",
    "spawn",
    "spawn_call",
    "start_call",
]
