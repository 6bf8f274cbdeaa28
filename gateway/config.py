"""Gateway configuration: dorm.toml, overridable key by key through DORM_* environment variables.

Unknown keys are errors that name the key: a misspelt `idle_timout` must not silently fall back to a
default in production. Every value is parsed here once, into typed fields, so nothing downstream
re-validates strings.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.appspec import AppSpec, SpecError, parse_app_spec
from gateway.units import UnitError, parse_duration, parse_size

DEFAULT_CONFIG_PATHS = ("dorm.toml", "/etc/dorm/dorm.toml")
ISOLATION_MODES = ("auto", "process", "sandbox")
_SIZE_KEYS = frozenset(
    {"max_header_size", "log_max_bytes", "max_bundle_size", "max_bundle_unpacked"}
)


class ConfigError(ValueError):
    """A bad configuration value; the message names the key (and the file or variable)."""


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Everything under [gateway]. Durations in seconds, sizes in bytes."""

    listen: str = "127.0.0.1:8080"
    admin_listen: str = "127.0.0.1:8081"
    domains: tuple[str, ...] = ("localhost",)
    data_dir: str = "/var/lib/dorm"
    run_dir: str = ""  # "" → <data_dir>/run; holds instance sockets, so keep it short
    admin_token: str = ""
    admin_token_file: str = ""
    isolation: str = "auto"
    max_warm_instances: int = 1000
    max_connections: int = 10_000
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 75.0
    upstream_timeout: float = 300.0
    shutdown_timeout: float = 30.0
    max_header_size: int = 64 * 1024
    log_max_bytes: int = 10 * 1024**2
    log_keep: int = 3
    trust_forwarded: bool = False
    cgroup_parent: str = "dorm"  # the cgroup subtree (per controller) this gateway's sandboxes use
    uid_range: str = "200000-299999"  # unprivileged uids handed to sandboxed instances
    prewarm: int = 2  # idle pre-confined sandboxes kept per recent shape (0: none)
    max_bundle_size: int = 512 * 1024**2  # an uploaded archive, as sent
    max_bundle_unpacked: int = 2 * 1024**3  # its file contents once extracted
    max_bundle_files: int = 20_000  # entries (files, directories, links) in one bundle

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(self.data_dir) / "run"

    @property
    def token_path(self) -> Path:
        """Where the admin token lives when it is not given inline."""
        if self.admin_token_file:
            return Path(self.admin_token_file)
        return Path(self.data_dir) / "admin.token"


@dataclass(frozen=True, slots=True)
class Config:
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    apps: tuple[AppSpec, ...] = ()
    source: str = "(defaults)"


def split_host_port(value: str, key: str) -> tuple[str, int]:
    """ "127.0.0.1:8080", "[::1]:8080" or ":8080" → (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{key}: expected host:port such as 127.0.0.1:8080, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _coerce(key: str, raw: Any, *, from_env: bool) -> Any:
    """Turn a TOML value (or an environment string) into the field's type, or raise ConfigError."""
    default = getattr(GatewayConfig(), key)
    try:
        if key.endswith("_timeout"):
            return parse_duration(raw)
        if key in _SIZE_KEYS:
            return parse_size(raw)
    except UnitError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        if (
            from_env
            and isinstance(raw, str)
            and raw.lower() in ("1", "true", "yes", "0", "false", "no")
        ):
            return raw.lower() in ("1", "true", "yes")
        raise ConfigError(f"{key}: expected true or false, got {raw!r}")
    if isinstance(default, int):
        if from_env and isinstance(raw, str) and raw.strip().isdigit():
            raw = int(raw)
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
            raise ConfigError(f"{key}: expected a whole number >= 0, got {raw!r}")
        return raw
    if isinstance(default, tuple):
        if from_env and isinstance(raw, str):
            raw = [part.strip() for part in raw.split(",") if part.strip()]
        if not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
            raise ConfigError(f"{key}: expected a list of non-empty strings, got {raw!r}")
        return tuple(x.lower().strip(".") for x in raw)
    if not isinstance(raw, str):
        raise ConfigError(f"{key}: expected a string, got {raw!r}")
    return raw


def parse_uid_range(value: str) -> range:
    """ "200000-299999" → range(200000, 300000); refuses root-ish and overlapping-system uids."""
    low, sep, high = value.partition("-")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        raise ConfigError(f"uid_range: expected FIRST-LAST such as 200000-299999, got {value!r}")
    first, last = int(low), int(high)
    if first < 1000 or last < first or last >= 2**32 - 1:
        raise ConfigError("uid_range: must lie within 1000..4294967294 with FIRST <= LAST")
    return range(first, last + 1)


def _validate(cfg: GatewayConfig) -> None:
    split_host_port(cfg.listen, "listen")
    split_host_port(cfg.admin_listen, "admin_listen")
    if cfg.isolation not in ISOLATION_MODES:
        raise ConfigError(f"isolation: expected one of {', '.join(ISOLATION_MODES)}")
    if not cfg.domains:
        raise ConfigError("domains: at least one domain suffix is needed")
    if cfg.max_header_size < 1024:
        raise ConfigError("max_header_size: must be at least 1KiB")
    parse_uid_range(cfg.uid_range)
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", cfg.cgroup_parent):
        raise ConfigError("cgroup_parent: expected a name of a-z, 0-9 and '-'")
    if cfg.max_warm_instances < 1:
        raise ConfigError("max_warm_instances: must be at least 1")
    if cfg.log_max_bytes < 4096:
        # RotatingLog needs room for at least a few lines; 0 would make every write rotate.
        raise ConfigError("log_max_bytes: must be at least 4KiB")
    if cfg.max_bundle_size < 1024 or cfg.max_bundle_unpacked < 1024:
        raise ConfigError("max_bundle_size and max_bundle_unpacked: must be at least 1KiB")
    if cfg.max_bundle_files < 1:
        raise ConfigError("max_bundle_files: must be at least 1")


def load_config(path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (if any) and apply DORM_<KEY> overrides for every [gateway] key."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    source = "(defaults)"
    if path is None:
        path = environ.get("DORM_CONFIG") or next(
            (p for p in DEFAULT_CONFIG_PATHS if Path(p).is_file()), None
        )
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        source = str(path)
    unknown_sections = sorted(set(data) - {"gateway", "apps"})
    if unknown_sections:
        raise ConfigError(
            f"{source}: unknown section [{unknown_sections[0]}] (known: gateway, apps)"
        )
    section = data.get("gateway", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: [gateway] must be a table")
    known = {f.name for f in dataclasses.fields(GatewayConfig)}
    values: dict[str, Any] = {}
    for key, raw in section.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key gateway.{key}")
        values[key] = _coerce(key, raw, from_env=False)
    for key in known:
        env_key = "DORM_" + key.upper()
        if env_key in environ:
            try:
                values[key] = _coerce(key, environ[env_key], from_env=True)
            except ConfigError as exc:
                raise ConfigError(f"{env_key}: {exc}") from None
    cfg = GatewayConfig(**values)
    try:
        _validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{source}: gateway.{exc}") from None
    apps_section = data.get("apps", {})
    if not isinstance(apps_section, dict):
        raise ConfigError(f"{source}: [apps] must be a table of [apps.NAME] tables")
    apps = []
    for name, spec in apps_section.items():
        try:
            apps.append(parse_app_spec(name, spec))
        except SpecError as exc:
            raise ConfigError(f"{source}: apps.{name}.{exc.field}: {exc.message}") from None
    return Config(gateway=cfg, apps=tuple(apps), source=source)
