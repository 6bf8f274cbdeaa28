"""The runner's settings (from the gateway's [runner] config) and the limits of one stage.

Every execution limit has a server maximum, which is also the default (as in Piston); a request
may only lower it. Times are milliseconds and sizes bytes, as in the Piston API.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

MIN_MEMORY = 4 << 20  # the sandbox's smallest memory cgroup


@dataclass(frozen=True, slots=True)
class Settings:
    """What the service is told at start (JSON in $DORM_RUNNER_SETTINGS; never the admin token)."""

    cgroup_parent: str = "dorm-runner"
    uid_first: int = 400000
    uid_last: int = 409999
    max_concurrency: int = 0  # 0: CPUs x 2
    queue: int = 64
    rate_per_minute: int = 300
    max_per_client: int = 8
    api_keys: tuple[str, ...] = ()
    internal_token: str = ""  # marks requests forwarded by the admin listener
    python_mode: str = "zygote"
    languages_dir: str = ""
    run_timeout: int = 3000
    compile_timeout: int = 10000
    run_cpu_time: int = 3000
    compile_cpu_time: int = 10000
    run_memory: int = 256 << 20
    compile_memory: int = 512 << 20
    output_max_size: int = 64 << 10
    max_processes: int = 64
    max_open_files: int = 2048
    max_file_size: int = 10_000_000
    tmp_size: int = 64 << 20
    max_body: int = 2 << 20
    max_files: int = 64
    cpus: float = 1.0  # CPU quota of one sandbox
    spawners: int = 3
    # Warm pools (pools.py): totals over the spawners, per pool (sandbox layout).
    min_idle: int = 6
    max_idle: int = 12
    refill_concurrency: int = 1  # children one spawner builds between two looks at its socket
    shrink_after: float = 30.0  # seconds without a miss before a grown pool shrinks back
    pool_overrides_file: str = ""  # bounds set through the admin API, kept across restarts

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Settings:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "api_keys" in values:
            values["api_keys"] = tuple(values["api_keys"])
        return cls(**values)

    @property
    def concurrency(self) -> int:
        return self.max_concurrency or (os.cpu_count() or 1) * 2


@dataclass(frozen=True, slots=True)
class StageLimits:
    """The limits one sandbox runs under."""

    wall_ms: int
    cpu_ms: int
    memory: int
    processes: int
    open_files: int
    file_size: int
    output: int
    tmp_size: int
    cpus: float = 1.0
    binds: tuple[str, ...] = field(default=())

    def spawn_fields(self) -> dict[str, Any]:
        """The part the spawner needs (it never sees anything about the code itself)."""
        return {
            "wall_ms": self.wall_ms,
            "cpu_ms": self.cpu_ms,
            "memory": self.memory,
            "pids": self.processes,
            "nofile": self.open_files,
            "fsize": self.file_size,
            "tmp_size": self.tmp_size,
            "cpu": self.cpus,
            "binds": list(self.binds),
        }
