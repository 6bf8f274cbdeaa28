"""The app spec: what an operator says about an app, validated once, on the way in.

The same keys arrive as JSON on `PUT /v1/apps/{app}`, as `[apps.NAME]` tables in dorm.toml and
(later) as bundle manifests, so validation lives here, in one place. Every error names the
offending field with a dotted path (`limits.memory`) so an API client can point at it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from gateway.names import InvalidName, check_app_name, check_branch_name
from gateway.units import UnitError, format_size, parse_duration, parse_size

RUNTIMES = ("command",)
ISOLATIONS = ("process", "sandbox")
MAX_ENV_ENTRIES = 256
MAX_ENV_BYTES = 64 * 1024
MAX_ARGV = 256
MAX_ARG_LEN = 4096
# Variables the gateway sets for every instance; an app may not override them.
RESERVED_ENV = frozenset({"DORM_SOCKET", "DORM_APP", "DORM_BRANCH", "PORT"})


class SpecError(ValueError):
    """A bad app spec. `field` is the dotted path of the offending key, `message` what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits of one instance. None means "no limit" and must be asked for explicitly."""

    memory: int | None = 256 * 1024**2
    cpu: float | None = 1.0
    pids: int | None = 64

    def to_json(self) -> dict[str, Any]:
        return {
            "memory": None if self.memory is None else format_size(self.memory),
            "cpu": self.cpu,
            "pids": self.pids,
        }


@dataclass(frozen=True, slots=True)
class AppSpec:
    """One app: how to start it and the limits it runs under. Immutable; replaced as a whole."""

    name: str
    runtime: str = "command"
    command: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    idle_timeout: float = 300.0
    startup_timeout: float = 10.0
    stop_timeout: float = 10.0
    max_body: int = 10 * 1024**2
    max_queue: int = 100
    health: str | None = None
    isolation: str | None = None  # None: the gateway's default
    limits: Limits = field(default_factory=Limits)

    def to_json(self) -> dict[str, Any]:
        """The spec as the admin API shows it (sizes in readable units)."""
        return {
            "name": self.name,
            "runtime": self.runtime,
            "command": list(self.command),
            "env": dict(self.env),
            "idle_timeout": self.idle_timeout,
            "startup_timeout": self.startup_timeout,
            "stop_timeout": self.stop_timeout,
            "max_body": format_size(self.max_body),
            "max_queue": self.max_queue,
            "health": self.health,
            "isolation": self.isolation,
            "limits": self.limits.to_json(),
        }


@dataclass(frozen=True, slots=True)
class BranchSpec:
    """A branch of an app: its own instance, with optional environment overrides."""

    app: str
    name: str
    env: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"app": self.app, "name": self.name, "env": dict(self.env)}


_APP_KEYS = {f.name for f in dataclasses.fields(AppSpec)} - {"name"}
_LIMIT_KEYS = {f.name for f in dataclasses.fields(Limits)}


def _duration(obj: dict[str, Any], key: str, default: float, *, minimum: float = 0.0) -> float:
    if key not in obj:
        return default
    try:
        value = parse_duration(obj[key])
    except UnitError as exc:
        raise SpecError(key, str(exc)) from None
    if value < minimum:
        raise SpecError(key, f"must be at least {minimum:g} seconds")
    return value


def _size(value: Any, path: str, *, minimum: int = 0) -> int:
    try:
        size = parse_size(value)
    except UnitError as exc:
        raise SpecError(path, str(exc)) from None
    if size < minimum:
        raise SpecError(path, f"must be at least {format_size(minimum)}")
    return size


def _int(value: Any, path: str, *, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(path, f"expected a whole number, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise SpecError(path, f"must be between {minimum} and {maximum}")
    return value


def parse_env(value: Any, path: str = "env") -> dict[str, str]:
    """An environment mapping: string keys (no '=' or NUL) to string values, bounded in size."""
    if not isinstance(value, dict):
        raise SpecError(path, "expected an object of string to string")
    if len(value) > MAX_ENV_ENTRIES:
        raise SpecError(path, f"at most {MAX_ENV_ENTRIES} variables")
    total = 0
    env: dict[str, str] = {}
    for key, val in value.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise SpecError(f"{path}.{key}", "variable names must be non-empty, without '=' or NUL")
        if key in RESERVED_ENV:
            raise SpecError(f"{path}.{key}", "is set by the gateway and cannot be overridden")
        if not isinstance(val, str) or "\0" in val:
            raise SpecError(f"{path}.{key}", "expected a string without NUL bytes")
        total += len(key) + len(val) + 2
        env[key] = val
    if total > MAX_ENV_BYTES:
        raise SpecError(path, f"larger than {format_size(MAX_ENV_BYTES)} in all")
    return env


def _command(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise SpecError(
            "command", 'expected a non-empty list of strings, e.g. ["python3", "app.py"]'
        )
    if len(value) > MAX_ARGV:
        raise SpecError("command", f"at most {MAX_ARGV} arguments")
    for i, arg in enumerate(value):
        if not isinstance(arg, str) or "\0" in arg or len(arg) > MAX_ARG_LEN:
            raise SpecError(
                f"command.{i}", f"expected a string without NUL, at most {MAX_ARG_LEN} chars"
            )
    return tuple(value)


def _limits(value: Any) -> Limits:
    if not isinstance(value, dict):
        raise SpecError("limits", "expected an object with memory, cpu and pids")
    unknown = sorted(set(value) - _LIMIT_KEYS)
    if unknown:
        raise SpecError(f"limits.{unknown[0]}", "unknown field (known: memory, cpu, pids)")
    base = Limits()
    memory = base.memory
    if "memory" in value:
        memory = (
            None
            if value["memory"] is None
            else _size(value["memory"], "limits.memory", minimum=4 * 1024**2)
        )
    cpu = base.cpu
    if "cpu" in value:
        raw = value["cpu"]
        if raw is None:
            cpu = None
        elif isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
            raise SpecError("limits.cpu", "expected a number of CPUs such as 0.5 or 2")
        elif not 0.01 <= raw <= 1024:
            raise SpecError("limits.cpu", "must be between 0.01 and 1024 CPUs")
        else:
            cpu = float(raw)
    pids = base.pids
    if "pids" in value:
        pids = (
            None
            if value["pids"] is None
            else _int(value["pids"], "limits.pids", minimum=1, maximum=1 << 22)
        )
    return Limits(memory=memory, cpu=cpu, pids=pids)


def parse_app_spec(name: str, obj: Any) -> AppSpec:
    """Validate a JSON/TOML object into an AppSpec, or raise SpecError naming the field."""
    try:
        check_app_name(name)
    except InvalidName as exc:
        raise SpecError("name", str(exc)) from None
    if not isinstance(obj, dict):
        raise SpecError("body", "expected a JSON object")
    unknown = sorted(set(obj) - _APP_KEYS - {"name"})
    if unknown:
        raise SpecError(unknown[0], f"unknown field (known: {', '.join(sorted(_APP_KEYS))})")
    if "name" in obj and obj["name"] != name:
        raise SpecError("name", f"does not match the app in the URL ({name!r})")
    runtime = obj.get("runtime", "command")
    if runtime not in RUNTIMES:
        raise SpecError("runtime", f"unknown runtime {runtime!r} (known: {', '.join(RUNTIMES)})")
    if "command" not in obj:
        raise SpecError("command", "required for the command runtime")
    health = obj.get("health")
    if health is not None and (
        not isinstance(health, str)
        or not health.startswith("/")
        or len(health) > 1024
        or any(c in health for c in " \r\n\0")
    ):
        raise SpecError("health", 'expected a path such as "/healthz"')
    isolation = obj.get("isolation")
    if isolation is not None and isolation not in ISOLATIONS:
        raise SpecError("isolation", f"expected one of {', '.join(ISOLATIONS)}")
    return AppSpec(
        name=name,
        runtime=runtime,
        command=_command(obj["command"]),
        env=parse_env(obj.get("env", {})),
        idle_timeout=_duration(obj, "idle_timeout", 300.0, minimum=0.1),
        startup_timeout=_duration(obj, "startup_timeout", 10.0, minimum=0.1),
        stop_timeout=_duration(obj, "stop_timeout", 10.0),
        max_body=_size(obj.get("max_body", 10 * 1024**2), "max_body"),
        max_queue=_int(obj.get("max_queue", 100), "max_queue", minimum=1, maximum=100_000),
        health=health,
        isolation=isolation,
        limits=_limits(obj.get("limits", {})),
    )


def parse_branch_spec(app: str, name: str, obj: Any) -> BranchSpec:
    """Validate a branch body (`{"env": {...}}`) or raise SpecError naming the field."""
    try:
        check_branch_name(name)
    except InvalidName as exc:
        raise SpecError("branch", str(exc)) from None
    if obj is None:
        obj = {}
    if not isinstance(obj, dict):
        raise SpecError("body", "expected a JSON object")
    unknown = sorted(set(obj) - {"env"})
    if unknown:
        raise SpecError(unknown[0], "unknown field (known: env)")
    return BranchSpec(app=app, name=name, env=parse_env(obj.get("env", {})))
