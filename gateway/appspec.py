"""The app spec: what an operator says about an app, validated once, on the way in.

The same keys arrive as JSON on `PUT /v1/apps/{app}`, as `[apps.NAME]` tables in dorm.toml and
as bundle manifests (`dorm.toml` at a bundle's root), so validation lives here, in one place. Every
error names the offending field with a dotted path (`limits.memory`) so an API client can point at
it.

A branch runs the *effective* spec: the operator's app spec overlaid with the branch bundle's
manifest (`overlay_spec`). The bundle may change how its code starts but may only tighten what the
operator granted: limits can only go down, isolation can only get stronger.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gateway.names import InvalidName, check_app_name, check_branch_name
from gateway.units import UnitError, format_size, parse_duration, parse_size

RUNTIMES = ("command", "python-asgi", "python-wsgi", "static")  # built in; others are uploaded
PYTHON_RUNTIMES = ("python-asgi", "python-wsgi")
ISOLATIONS = ("process", "sandbox")
STARTS = ("zygote", "fresh")
NETWORKS = ("none", "egress")
MAX_ENV_ENTRIES = 256
MAX_ENV_BYTES = 64 * 1024
MAX_ARGV = 256
MAX_ARG_LEN = 4096
# Variables the gateway sets for every instance; an app may not override them.
RESERVED_ENV = frozenset({"DORM_SOCKET", "DORM_APP", "DORM_BRANCH", "PORT"})
MAX_STATIC_INDEX = 16
MIN_TTL = 1.0
N = TypeVar("N", int, float)
_DIGEST = re.compile(r"[0-9a-f]{64}")
# Uploaded runtime names: lowercase DNS labels, like app and branch names (they name directories
# and appear in logs and URLs).
_RUNTIME_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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
class StaticOptions:
    """How the static runtime serves a bundle: index files for directories, optional SPA fallback.

    `spa_fallback` is the file answered for paths that match nothing, so client-side routes of a
    single-page app load the app instead of a 404.
    """

    index: tuple[str, ...] = ("index.html",)
    spa_fallback: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"index": list(self.index), "spa_fallback": self.spa_fallback}


@dataclass(frozen=True, slots=True)
class AppSpec:
    """One app: how to start it and the limits it runs under. Immutable; replaced as a whole."""

    name: str
    runtime: str = "command"
    command: tuple[str, ...] = ()
    entry: str | None = None  # "module:attr" for the python-* runtimes
    env: dict[str, str] = field(default_factory=dict)
    idle_timeout: float = 300.0
    startup_timeout: float = 10.0
    stop_timeout: float = 10.0
    max_body: int = 10 * 1024**2
    max_queue: int = 100
    health: str | None = None
    isolation: str | None = None  # None: the gateway's default
    limits: Limits = field(default_factory=Limits)
    static: StaticOptions = field(default_factory=StaticOptions)
    ttl: float | None = None  # branches other than main idle this long are deleted
    start: str = "zygote"  # python runtimes: fork from the zygote, or a "fresh" interpreter
    app_dir: str | None = None  # operator only: a host directory shown at /app (no bundle)
    network: str = "none"  # "egress" grants outbound network (operator only)
    volume: bool = False  # a persistent /data per branch (operator only)
    port: int | None = None  # command runtime: serves on 127.0.0.1:$PORT instead of DORM_SOCKET

    def to_json(self) -> dict[str, Any]:
        """The spec as the admin API shows it (sizes in readable units); parses back to itself."""
        return {
            "name": self.name,
            "runtime": self.runtime,
            "command": list(self.command),
            "entry": self.entry,
            "env": dict(self.env),
            "idle_timeout": self.idle_timeout,
            "startup_timeout": self.startup_timeout,
            "stop_timeout": self.stop_timeout,
            "max_body": format_size(self.max_body),
            "max_queue": self.max_queue,
            "health": self.health,
            "isolation": self.isolation,
            "limits": self.limits.to_json(),
            "static": self.static.to_json(),
            "ttl": self.ttl,
            "start": self.start,
            "app_dir": self.app_dir,
            "network": self.network,
            "volume": self.volume,
            "port": self.port,
        }


@dataclass(frozen=True, slots=True)
class BranchSpec:
    """A branch of an app: its own instance, with optional environment overrides, and the bundle
    it runs.

    `bundle` and `previous_bundle` are sha256 hex digests of uploaded archives (the extracted tree
    is `BundleStore.path(digest)`); `previous_bundle` is what a rollback returns to. `created`
    and `last_request` (Unix times) are bookkeeping for the TTL and do not take part in equality:
    a branch whose only change is that it was used is the same branch.
    """

    app: str
    name: str
    env: dict[str, str] = field(default_factory=dict)
    bundle: str | None = None
    previous_bundle: str | None = None
    deployed_at: float | None = None
    created: float | None = field(default=None, compare=False)
    last_request: float | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        """What was PUT for the branch (its overrides); `deploy_json` adds the deploy state."""
        return {"app": self.app, "name": self.name, "env": dict(self.env)}

    def deploy_json(self, last_request: float | None = None) -> dict[str, Any]:
        """The branch with its bundles and activity, as the branch listing shows it."""
        times = [t for t in (self.last_request, last_request) if t is not None]
        return {
            **self.to_json(),
            "bundle": self.bundle,
            "previous_bundle": self.previous_bundle,
            "deployed_at": self.deployed_at,
            "created": self.created,
            "last_request": max(times) if times else None,
        }

    @property
    def bundles(self) -> tuple[str, ...]:
        """The bundles this branch keeps alive (current and rollback target)."""
        return tuple(b for b in (self.bundle, self.previous_bundle) if b is not None)

    def last_active(self) -> float | None:
        """The latest of creation, deploy and request: what a TTL counts from."""
        times = [t for t in (self.created, self.deployed_at, self.last_request) if t is not None]
        return max(times) if times else None


def is_uploaded_runtime(name: str) -> bool:
    """Whether an app's `runtime` names an operator-uploaded runtime rather than a built-in.

    Only the syntax is known here (parsing stays pure): whether such a runtime exists is checked
    where a spec is accepted (`Registry.check_runtime`) and again when an instance starts.
    """
    return name not in RUNTIMES


def is_digest(value: object) -> bool:
    """A lowercase sha256 hex digest, as bundles are named."""
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


_APP_KEYS = {f.name for f in dataclasses.fields(AppSpec)} - {"name"}
_LIMIT_KEYS = {f.name for f in dataclasses.fields(Limits)}
_STATIC_KEYS = {f.name for f in dataclasses.fields(StaticOptions)}


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


def _entry(value: Any) -> str:
    """`module:attr`, both dotted Python identifiers: what granian is told to import."""
    if not isinstance(value, str) or len(value) > 512:
        raise SpecError("entry", 'expected "module:attr", such as "app:app"')
    module, sep, attr = value.partition(":")
    parts = [*module.split("."), *attr.split(".")]
    if not sep or not all(_IDENTIFIER.fullmatch(part) for part in parts):
        raise SpecError("entry", f'expected "module:attr", such as "app:app", got {value!r}')
    return value


def _runtime_entry(value: Any) -> str:
    """What an uploaded runtime's `{entry}` placeholder becomes (a script path, a jar, ...).

    The runtime decides what it means, so only what could never be a sane argument is refused:
    it is passed as one argv element (never through a shell), so no quoting rules apply.
    """
    if (
        not isinstance(value, str)
        or not value
        or len(value) > MAX_ARG_LEN
        or any(ord(c) < 32 or ord(c) == 127 for c in value)
    ):
        raise SpecError(
            "entry",
            f"expected a non-empty string without control characters, at most "
            f'{MAX_ARG_LEN} chars, such as "server.js"',
        )
    return value


def _relative_path(value: Any, path: str) -> str:
    """A path inside the bundle: relative, no `..`, no NUL; static files are looked up by it."""
    if (
        not isinstance(value, str)
        or not value
        or len(value) > 1024
        or value.startswith("/")
        or "\0" in value
        or any(part in ("", ".", "..") for part in value.split("/"))
    ):
        raise SpecError(path, 'expected a relative path inside the bundle, such as "index.html"')
    return value


def _static(value: Any) -> StaticOptions:
    if not isinstance(value, dict):
        raise SpecError("static", 'expected an object such as {"index": ["index.html"]}')
    unknown = sorted(set(value) - _STATIC_KEYS)
    if unknown:
        raise SpecError(f"static.{unknown[0]}", "unknown field (known: index, spa_fallback)")
    index: tuple[str, ...] = StaticOptions().index
    if "index" in value:
        raw = value["index"]
        if not isinstance(raw, list) or len(raw) > MAX_STATIC_INDEX:
            raise SpecError("static.index", f"expected a list of at most {MAX_STATIC_INDEX} names")
        for i, name in enumerate(raw):
            if not isinstance(name, str) or "/" in name:
                raise SpecError(f"static.index.{i}", "expected a file name without '/'")
            _relative_path(name, f"static.index.{i}")
        index = tuple(raw)
    fallback = value.get("spa_fallback")
    if fallback is not None:
        fallback = _relative_path(fallback, "static.spa_fallback")
    return StaticOptions(index=index, spa_fallback=fallback)


def _ttl(obj: dict[str, Any]) -> float | None:
    if obj.get("ttl") is None:
        return None
    return _duration(obj, "ttl", 0.0, minimum=MIN_TTL)


def parse_app_spec(name: str, obj: Any) -> AppSpec:
    """Validate a JSON/TOML object into an AppSpec, or raise SpecError naming the field.

    `command` is required for the command runtime and `entry` for the python runtimes; either may
    be present for other runtimes (an overlay can change the runtime and leave the other behind),
    where it is validated but not used.
    """
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
    if not isinstance(runtime, str) or (
        runtime not in RUNTIMES and _RUNTIME_NAME.fullmatch(runtime) is None
    ):
        raise SpecError(
            "runtime",
            f"unknown runtime {runtime!r}: expected a built-in ({', '.join(RUNTIMES)}) or the "
            "name of an uploaded runtime (a lowercase DNS label)",
        )
    command: tuple[str, ...] = ()
    if runtime == "command":
        if "command" not in obj:
            raise SpecError("command", "required for the command runtime")
        command = _command(obj["command"])
    elif obj.get("command") not in (None, []):
        command = _command(obj["command"])
    entry = obj.get("entry")
    if entry is not None:
        entry = _runtime_entry(entry) if is_uploaded_runtime(runtime) else _entry(entry)
    if runtime in PYTHON_RUNTIMES and entry is None:
        raise SpecError("entry", f'required for the {runtime} runtime, e.g. "app:app"')
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
    start = obj.get("start", "zygote")
    if start not in STARTS:
        raise SpecError("start", f"expected one of {', '.join(STARTS)}")
    app_dir = obj.get("app_dir")
    if app_dir is not None and (
        not isinstance(app_dir, str) or not app_dir.startswith("/") or "\0" in app_dir
    ):
        raise SpecError("app_dir", "expected an absolute host directory path")
    network = obj.get("network", "none")
    if network not in NETWORKS:
        raise SpecError("network", f"expected one of {', '.join(NETWORKS)}")
    volume = obj.get("volume", False)
    if not isinstance(volume, bool):
        raise SpecError("volume", "expected true or false")
    port = obj.get("port")
    if port is not None:
        port = _int(port, "port", minimum=1, maximum=65535)
    return AppSpec(
        name=name,
        runtime=runtime,
        command=command,
        entry=entry,
        env=parse_env(obj.get("env", {})),
        idle_timeout=_duration(obj, "idle_timeout", 300.0, minimum=0.1),
        startup_timeout=_duration(obj, "startup_timeout", 10.0, minimum=0.1),
        stop_timeout=_duration(obj, "stop_timeout", 10.0),
        max_body=_size(obj.get("max_body", 10 * 1024**2), "max_body"),
        max_queue=_int(obj.get("max_queue", 100), "max_queue", minimum=1, maximum=100_000),
        health=health,
        isolation=isolation,
        limits=_limits(obj.get("limits", {})),
        static=_static(obj.get("static", {})),
        ttl=_ttl(obj),
        start=start,
        app_dir=app_dir,
        network=network,
        volume=volume,
        port=port,
    )


def _lower(base: N | None, wanted: N | None) -> N | None:
    """The smaller of two limits, where None means unlimited."""
    if base is None:
        return wanted
    if wanted is None:
        return base
    return min(base, wanted)


# Keys that widen what a tenant can reach: a bundle may only set them to their safe value.
_OPERATOR_ONLY: dict[str, Any] = {"app_dir": None, "network": "none", "volume": False}


def overlay_spec(base: AppSpec, manifest: Mapping[str, Any]) -> AppSpec:
    """The effective spec of a branch: `base` (the operator's) with a bundle manifest on top.

    Keys in the manifest replace the operator's, except `env`, which merges (the bundle's
    variables win), `limits`, where each limit the manifest names can only lower the operator's,
    and `isolation`, which a bundle may strengthen to "sandbox" but never weaken. Raises
    SpecError naming the manifest field at fault (without a "manifest." prefix; callers add it).
    """
    merged: dict[str, Any] = base.to_json()
    for key, value in manifest.items():
        if key == "env":
            merged["env"] = {**base.env, **parse_env(value)}
        elif key == "limits":
            wanted = _limits(value)
            given = set(value)
            limits = base.limits
            merged["limits"] = Limits(
                memory=_lower(limits.memory, wanted.memory) if "memory" in given else limits.memory,
                cpu=_lower(limits.cpu, wanted.cpu) if "cpu" in given else limits.cpu,
                pids=_lower(limits.pids, wanted.pids) if "pids" in given else limits.pids,
            ).to_json()
        elif key == "isolation":
            # A tenant's own manifest may ask for more confinement, never for less.
            if value != "sandbox":
                raise SpecError("isolation", 'a bundle can only ask for "sandbox" isolation')
            merged["isolation"] = value
        elif key in _OPERATOR_ONLY:
            if value != _OPERATOR_ONLY[key]:
                raise SpecError(key, "can only be granted by the operator, not by a bundle")
            merged[key] = value
        else:
            merged[key] = value
    return parse_app_spec(base.name, merged)


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
