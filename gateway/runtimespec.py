"""Operator runtimes: what a `runtime.toml` says, validated once, and how an app uses it.

An operator uploads a runtime bundle (`PUT /v1/runtimes/{name}`, gateway/runtime_bundles.py): a
root filesystem under `rootfs/` and a `runtime.toml` saying how an app is started inside it and
how dorm tells it is ready. Apps then say `runtime = "<name>"`. This module is the pure part,
kept apart from the routes so the registry (which stores runtimes) and the instance manager
(which starts them) can use it without importing the admin API.

An app on an uploaded runtime always runs sandboxed, with the runtime's rootfs as its root: the
rootfs is the whole point (a Node or JVM the host does not have), and running its command on the
host instead would silently run something else. See docs/runtimes.md.
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass, field
from typing import Any

from gateway.appspec import AppSpec, SpecError, parse_env
from gateway.units import UnitError, parse_duration

RUNTIME_TOML = "runtime.toml"
ROOTFS_DIR = "rootfs"  # the root filesystem inside a runtime bundle
LISTENS = ("unix", "tcp")
PLACEHOLDERS = ("entry", "port", "socket")
SANDBOX_SOCKET = "/run/dorm/http.sock"  # where DORM_SOCKET points inside every sandbox
DEFAULT_TCP_PORT = 8080
MAX_COMMAND = 256
MAX_ARG = 4096
MAX_DESCRIPTION = 512
MAX_STARTUP = 3600.0
_KEYS = ("command", "listen", "port", "env", "ready", "startup_timeout", "pool", "description")
_READY_KEYS = ("path",)


@dataclass(frozen=True, slots=True)
class RuntimeDef:
    """A parsed `runtime.toml`: how to start an app in this runtime and see that it is ready."""

    command: tuple[str, ...]
    listen: str = "unix"
    port: int | None = None  # listen = "tcp": the port apps serve on unless they set `port`
    env: dict[str, str] = field(default_factory=dict)
    ready_path: str | None = None  # the app's `health` unless the app sets one
    startup_timeout: float | None = None  # a floor for the app's startup_timeout
    pool: bool = False  # may be kept in a warm pool (used by the pool; stored here)
    description: str = ""

    def to_json(self) -> dict[str, Any]:
        """The definition in runtime.toml's own shape; `parse_runtime_def` reads it back."""
        out: dict[str, Any] = {
            "command": list(self.command),
            "listen": self.listen,
            "env": dict(self.env),
            "pool": self.pool,
            "description": self.description,
        }
        if self.port is not None:
            out["port"] = self.port
        if self.ready_path is not None:
            out["ready"] = {"path": self.ready_path}
        if self.startup_timeout is not None:
            out["startup_timeout"] = self.startup_timeout
        return out

    def argv(self, app: AppSpec) -> list[str]:
        """The command with its placeholders filled for `app` (its spec already resolved, so
        `app.port` is the port it listens on if it speaks TCP)."""
        values = {
            "entry": app.entry or "",
            "port": "" if app.port is None else str(app.port),
            "socket": SANDBOX_SOCKET,
        }
        return [arg.format_map(values) for arg in self.command]

    @property
    def needs_entry(self) -> bool:
        """Whether the command has an `{entry}` placeholder, so apps must set `entry`."""
        return any("entry" in _fields(arg) for arg in self.command)


@dataclass(frozen=True, slots=True)
class RuntimeRecord:
    """An uploaded runtime as the registry keeps it: its definition and stored tree."""

    name: str
    digest: str  # sha256 of the uploaded archive; the tree is BundleStore.path(digest)
    definition: RuntimeDef
    size: int  # archive bytes
    files: int  # entries extracted
    unpacked: int  # bytes of file content
    uploaded: float  # Unix time of the upload

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "builtin": False,
            "digest": self.digest,
            "size": self.size,
            "files": self.files,
            "unpacked": self.unpacked,
            "uploaded": self.uploaded,
            "description": self.definition.description,
            "definition": self.definition.to_json(),
        }


def _fields(arg: str) -> list[str]:
    """Placeholder names in one argument; ValueError for malformed braces."""
    return [name for _, name, _, _ in string.Formatter().parse(arg) if name is not None]


def _command(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise SpecError("command", 'expected a non-empty list of strings, e.g. ["/bin/server"]')
    if len(value) > MAX_COMMAND:
        raise SpecError("command", f"at most {MAX_COMMAND} arguments")
    for i, arg in enumerate(value):
        if not isinstance(arg, str) or not arg or "\0" in arg or len(arg) > MAX_ARG:
            raise SpecError(
                f"command.{i}", f"expected a non-empty string without NUL, at most {MAX_ARG} chars"
            )
        try:
            parsed = list(string.Formatter().parse(arg))
        except ValueError as exc:
            raise SpecError(
                f"command.{i}", f"bad placeholder braces ({exc}); use {{{{ }}}} for literal braces"
            ) from None
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            if name not in PLACEHOLDERS or spec or conversion:
                raise SpecError(
                    f"command.{i}",
                    f"unknown placeholder {{{name}}} (known: "
                    + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
                    + ")",
                )
    if not value[0].startswith("/"):
        raise SpecError(
            "command.0", "must be an absolute path inside the runtime's rootfs, e.g. /bin/server"
        )
    if "{" in value[0]:
        raise SpecError("command.0", "the program path cannot hold a placeholder")
    return tuple(value)


def _ready(value: Any) -> str | None:
    if not isinstance(value, dict):
        raise SpecError("ready", 'expected a table such as { path = "/healthz" }')
    unknown = sorted(set(value) - set(_READY_KEYS))
    if unknown:
        raise SpecError(f"ready.{unknown[0]}", "unknown field (known: path)")
    path = value.get("path")
    if path is None:
        return None
    if (
        not isinstance(path, str)
        or not path.startswith("/")
        or len(path) > 1024
        or any(c in path for c in " \r\n\0")
    ):
        raise SpecError("ready.path", 'expected a path such as "/healthz"')
    return path


def parse_runtime_def(obj: Any) -> RuntimeDef:
    """Validate a parsed runtime.toml into a RuntimeDef, or raise SpecError naming the field."""
    if not isinstance(obj, dict):
        raise SpecError("runtime.toml", "expected a TOML table")
    unknown = sorted(set(obj) - set(_KEYS))
    if unknown:
        raise SpecError(unknown[0], f"unknown field (known: {', '.join(_KEYS)})")
    if "command" not in obj:
        raise SpecError("command", 'required, e.g. command = ["/usr/bin/node", "{entry}"]')
    command = _command(obj["command"])
    listen = obj.get("listen", "unix")
    if listen not in LISTENS:
        raise SpecError("listen", 'expected "unix" (serve on $DORM_SOCKET) or "tcp" (on $PORT)')
    port = obj.get("port")
    if port is not None:
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise SpecError("port", "expected a port number between 1 and 65535")
        if listen != "tcp":
            raise SpecError("port", 'only meaningful with listen = "tcp"')
    elif listen == "tcp":
        port = DEFAULT_TCP_PORT
    env = parse_env(obj.get("env", {}))
    ready_path = _ready(obj["ready"]) if "ready" in obj else None
    if ready_path is not None and listen == "tcp":
        # Health probes go to the instance's Unix socket; a TCP app is ready when it accepts.
        raise SpecError(
            "ready.path",
            'not supported with listen = "tcp" (readiness is the port accepting connections)',
        )
    startup: float | None = None
    if "startup_timeout" in obj:
        try:
            startup = parse_duration(obj["startup_timeout"])
        except UnitError as exc:
            raise SpecError("startup_timeout", str(exc)) from None
        if not 0.1 <= startup <= MAX_STARTUP:
            raise SpecError("startup_timeout", f"must be between 0.1 and {MAX_STARTUP:g} seconds")
    pool = obj.get("pool", False)
    if not isinstance(pool, bool):
        raise SpecError("pool", "expected true or false")
    description = obj.get("description", "")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        raise SpecError("description", f"expected a string of at most {MAX_DESCRIPTION} chars")
    return RuntimeDef(
        command=command,
        listen=listen,
        port=port,
        env=env,
        ready_path=ready_path,
        startup_timeout=startup,
        pool=pool,
        description=description,
    )


def check_app(spec: AppSpec, record: RuntimeRecord | None) -> None:
    """Whether `spec` can run on the uploaded runtime `record`; SpecError naming the app's field.

    Called where an app spec or bundle is accepted, so an app naming a runtime that does not
    exist, or missing what the runtime's command needs, is refused up front.
    """
    if record is None:
        raise SpecError("runtime", f"no runtime named {spec.runtime!r} (see `dorm runtimes`)")
    rd = record.definition
    if rd.needs_entry and spec.entry is None:
        raise SpecError(
            "entry", f"required by runtime {spec.runtime!r}, whose command uses {{entry}}"
        )
    if spec.port is not None and rd.listen != "tcp":
        raise SpecError("port", f"runtime {spec.runtime!r} serves on a Unix socket, not a port")


def resolve_app(spec: AppSpec, rd: RuntimeDef) -> AppSpec:
    """The spec an instance of `spec` runs with, given its uploaded runtime's definition.

    TCP runtimes give the app a port (unless it chose one), `ready.path` is the app's `health`
    unless it set one, the runtime's `startup_timeout` is a floor, and isolation is always
    "sandbox": without its root filesystem the runtime's command would not be what runs.
    """
    port = spec.port if spec.port is not None else (rd.port if rd.listen == "tcp" else None)
    startup = spec.startup_timeout
    if rd.startup_timeout is not None:
        startup = max(startup, rd.startup_timeout)
    return dataclasses.replace(
        spec,
        port=port,
        health=spec.health if spec.health is not None else rd.ready_path,
        startup_timeout=startup,
        isolation="sandbox",
    )


__all__ = [
    "LISTENS",
    "PLACEHOLDERS",
    "ROOTFS_DIR",
    "RUNTIME_TOML",
    "RuntimeDef",
    "RuntimeRecord",
    "check_app",
    "parse_runtime_def",
    "resolve_app",
]
