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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from gateway.appspec import AppSpec, SpecError, parse_app_spec
from gateway.names import InvalidName, check_app_name
from gateway.units import UnitError, parse_duration, parse_size

# sandboxes.idmap.STORAGE_UID, the on-disk owner of every /data volume. Not imported from there:
# that would load the whole sandboxes package into every CLI command (tests/test_config.py pins
# the two together).
VOLUME_OWNER_UID: Final = 2147483646

DEFAULT_CONFIG_PATHS = ("dorm.toml", "/etc/dorm/dorm.toml")
ISOLATION_MODES = ("auto", "process", "sandbox")
_SIZE_KEYS = frozenset(
    {
        "max_header_size",
        "log_max_bytes",
        "max_bundle_size",
        "max_bundle_unpacked",
        "admin_min_upload_rate",
    }
)
# Durations whose name does not end in "_timeout" (those are durations too).
_DURATION_KEYS = frozenset({"admin_upload_grace"})


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
    # Remount a cgroup hierarchy with favordynmods at start (host-wide, see sandboxes/dynmods.py):
    # cgroup joins stop waiting for an RCU grace period, 5-17 ms → 0.1-0.2 ms per start here.
    cgroup_favordynmods: bool = True
    max_bundle_size: int = 512 * 1024**2  # an uploaded archive, as sent
    max_bundle_unpacked: int = 2 * 1024**3  # its file contents once extracted
    max_bundle_files: int = 20_000  # entries (files, directories, links) in one bundle
    # The admin API (gateway/admin.py). Connections at once; when all are taken, a new one
    # replaces the oldest that has not yet sent an authenticated request, else it is a 503.
    admin_max_connections: int = 256
    # Request (and response) bodies must average at least this many bytes per second, counted
    # over the time spent waiting for the client, once `admin_upload_grace` of it has passed;
    # a slower one is a 408 and the connection is closed. 0: only header/body_timeout apply.
    admin_min_upload_rate: int = 16 * 1024
    admin_upload_grace: float = 10.0

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(self.data_dir) / "run"

    @property
    def token_path(self) -> Path:
        """Where the admin token lives when it is not given inline."""
        if self.admin_token_file:
            return Path(self.admin_token_file)
        return Path(self.data_dir) / "admin.token"


PYTHON_MODES = ("zygote", "fresh")
_RUNNER_DURATIONS = frozenset(
    {"run_timeout", "compile_timeout", "run_cpu_time", "compile_cpu_time", "shrink_after"}
)
_RUNNER_SIZES = frozenset(
    {"run_memory", "compile_memory", "output_max_size", "max_file_size", "tmp_size", "max_body"}
)


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    """[runner]: the Piston-compatible code runner (runtimes/runner, docs/runner.md).

    Durations and sizes are the server's maxima for one stage, which are also the defaults a
    request gets; requests may only lower them. Durations are kept in seconds and sizes in bytes
    here; the runner speaks milliseconds on its API, as Piston does.
    """

    enabled: bool = True
    host: str = "run"  # answered at <host>.<domain> (and /api/v2/* on the admin listener)
    max_concurrency: int = 0  # executions at once; 0: CPUs x 2
    queue: int = 64  # executions waiting for a slot; beyond: 503
    rate_per_minute: int = 300  # per client IP; 0: off
    max_per_client: int = 8  # concurrent executions per client IP; 0: off
    api_keys: tuple[str, ...] = ()
    api_key_file: str = ""  # one key per line
    uid_range: str = "400000-409999"  # one uid per execution, distinct from gateway.uid_range
    python_mode: str = "zygote"  # or "fresh"
    languages_dir: str = ""  # extra TOML language definitions
    run_timeout: float = 3.0
    compile_timeout: float = 10.0
    run_cpu_time: float = 3.0
    compile_cpu_time: float = 10.0
    run_memory: int = 256 * 1024**2
    compile_memory: int = 512 * 1024**2
    output_max_size: int = 64 * 1024  # per stream
    max_processes: int = 64
    max_open_files: int = 2048
    max_file_size: int = 10_000_000
    tmp_size: int = 64 * 1024**2  # the sandbox's /tmp (work dir), charged to its memory
    max_body: int = 2 * 1024**2
    spawners: int = 3  # processes forking sandboxes (refilling a pool blocks one for ~10 ms)
    # Warm pools of pre-forked sandboxes, one per sandbox layout (the built-in languages share
    # one): totals over the spawners; PUT /v1/pools/{language} changes them at run time.
    min_idle: int = 6  # kept idle at rest
    max_idle: int = 12  # the most a pool grows to after misses (a burst)
    refill_concurrency: int = 1  # sandboxes a spawner builds before looking at requests again
    shrink_after: float = 30.0  # seconds without a miss before a grown pool shrinks back

    def settings(self, cgroup_parent: str, internal_token: str) -> dict[str, Any]:
        """What the runner service gets (as JSON in its environment)."""
        uids = parse_uid_range(self.uid_range)
        keys = list(self.api_keys)
        if self.api_key_file:
            keys += read_key_file(self.api_key_file)
        return {
            "cgroup_parent": f"{cgroup_parent}-runner",
            "uid_first": uids.start,
            "uid_last": uids.stop - 1,
            "max_concurrency": self.max_concurrency,
            "queue": self.queue,
            "rate_per_minute": self.rate_per_minute,
            "max_per_client": self.max_per_client,
            "api_keys": keys,
            "internal_token": internal_token,
            "python_mode": self.python_mode,
            "languages_dir": self.languages_dir,
            "run_timeout": round(self.run_timeout * 1000),
            "compile_timeout": round(self.compile_timeout * 1000),
            "run_cpu_time": round(self.run_cpu_time * 1000),
            "compile_cpu_time": round(self.compile_cpu_time * 1000),
            "run_memory": self.run_memory,
            "compile_memory": self.compile_memory,
            "output_max_size": self.output_max_size,
            "max_processes": self.max_processes,
            "max_open_files": self.max_open_files,
            "max_file_size": self.max_file_size,
            "tmp_size": self.tmp_size,
            "max_body": self.max_body,
            "spawners": self.spawners,
            "min_idle": self.min_idle,
            "max_idle": self.max_idle,
            "refill_concurrency": self.refill_concurrency,
            "shrink_after": self.shrink_after,
        }


def read_key_file(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            return [line.strip() for line in fh if line.strip() and not line.startswith("#")]
    except OSError as exc:
        raise ConfigError(f"runner.api_key_file: cannot read {path}: {exc.strerror}") from None


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """[pool]: warm pools of pre-forked, pre-confined sandboxes (one per recent sandbox shape).

    A pool keeps `min_idle` members at rest; each spawn that finds none (a miss) raises its target
    by one up to `max_idle`, and `shrink_after` seconds without a miss bring it back (the extra
    members are killed). `refill_concurrency` bounds the members being built at once: serving
    members (the python runtimes) are built without blocking the fork server, so it is how much
    CPU a refill may take; half-confined members are built between two requests, so for them it
    bounds how long a request can wait behind a refill. `max_idle = 0` turns pools off.
    Per-runtime bounds can be changed at run time: `PUT /v1/pools/{runtime}`.
    """

    min_idle: int = 2
    max_idle: int = 8
    refill_concurrency: int = 2
    shrink_after: float = 30.0

    def settings(self) -> dict[str, Any]:
        """What the fork server gets (as JSON on its command line)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class Config:
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    apps: tuple[AppSpec, ...] = ()
    source: str = "(defaults)"
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)


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
    """Turn a [gateway] TOML value (or an environment string) into the field's type."""
    return _coerce_value(
        key,
        raw,
        getattr(GatewayConfig(), key),
        duration=key.endswith("_timeout") or key in _DURATION_KEYS,
        size=key in _SIZE_KEYS,
        from_env=from_env,
        lower_lists=True,  # domain suffixes are case-insensitive
    )


def _coerce_value(
    key: str,
    raw: Any,
    default: Any,
    *,
    duration: bool,
    size: bool,
    from_env: bool,
    lower_lists: bool = False,
) -> Any:
    """Turn a TOML value (or an environment string) into the type of `default`, or raise
    ConfigError naming `key`. Shared by every config section."""
    try:
        if duration:
            return parse_duration(raw)
        if size:
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
        return tuple(x.lower().strip(".") for x in raw) if lower_lists else tuple(raw)
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
    if first <= VOLUME_OWNER_UID <= last:
        # Every /data volume is owned on disk by this id (sandboxes/idmap.py): an instance
        # given it would own every app's volume.
        raise ConfigError(
            f"uid_range: must not contain {VOLUME_OWNER_UID}, the owner of every /data volume "
            "on disk"
        )
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
    if not 1 <= cfg.admin_max_connections <= 65536:
        raise ConfigError("admin_max_connections: expected 1 to 65536")
    if cfg.admin_min_upload_rate and cfg.admin_upload_grace <= 0:
        raise ConfigError("admin_upload_grace: must be more than 0s (or admin_min_upload_rate 0)")


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
    unknown_sections = sorted(set(data) - {"gateway", "apps", "runner", "pool"})
    if unknown_sections:
        raise ConfigError(
            f"{source}: unknown section [{unknown_sections[0]}] "
            "(known: gateway, apps, runner, pool)"
        )
    section = data.get("gateway", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: [gateway] must be a table")
    known = {f.name for f in dataclasses.fields(GatewayConfig)}
    values: dict[str, Any] = {}
    for key, raw in section.items():
        if key == "prewarm":
            raise ConfigError(f"{source}: gateway.prewarm is now [pool] min_idle (and max_idle)")
        if key not in known:
            raise ConfigError(f"{source}: unknown key gateway.{key}")
        values[key] = _coerce(key, raw, from_env=False)
    _env_overrides(values, known, "DORM_", _coerce, environ)
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
    runner = _load_runner(data.get("runner", {}), environ, source)
    tenants, runs = parse_uid_range(cfg.uid_range), parse_uid_range(runner.uid_range)
    if tenants.start < runs.stop and runs.start < tenants.stop:
        raise ConfigError(f"{source}: runner.uid_range must not overlap gateway.uid_range")
    pool = _load_pool(data.get("pool", {}), environ, source)
    return Config(gateway=cfg, apps=tuple(apps), source=source, runner=runner, pool=pool)


def _env_overrides(
    values: dict[str, Any],
    known: Iterable[str],
    prefix: str,
    coerce: Callable[..., Any],
    environ: Mapping[str, str],
) -> None:
    """Every known key set as PREFIX + KEY in the environment wins over the file; a bad value
    names the variable."""
    for key in known:
        env_key = prefix + key.upper()
        if env_key in environ:
            try:
                values[key] = coerce(key, environ[env_key], from_env=True)
            except ConfigError as exc:
                raise ConfigError(f"{env_key}: {exc}") from None


def _load_pool(section: Any, environ: Mapping[str, str], source: str) -> PoolConfig:
    """[pool], with DORM_POOL_<KEY> overrides; unknown keys are errors naming the key."""
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: [pool] must be a table")
    known = {f.name for f in dataclasses.fields(PoolConfig)}
    raw_values: dict[str, tuple[str, Any, bool]] = {}
    for key, raw in section.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key pool.{key}")
        raw_values[key] = (f"{source}: pool.{key}", raw, False)
    for key in known:
        env_key = "DORM_POOL_" + key.upper()
        if env_key in environ:
            raw_values[key] = (env_key, environ[env_key], True)
    values: dict[str, Any] = {}
    for key, (where, raw, from_env) in raw_values.items():
        if key == "shrink_after":
            try:
                values[key] = parse_duration(raw)
            except UnitError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            continue
        if from_env and isinstance(raw, str) and raw.strip().isdigit():
            raw = int(raw)
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0 or raw > 1000:
            raise ConfigError(f"{where}: expected a whole number from 0 to 1000, got {raw!r}")
        values[key] = raw
    pool = PoolConfig(**values)
    if pool.max_idle and pool.max_idle < pool.min_idle:
        raise ConfigError(f"{source}: pool.max_idle must be >= pool.min_idle (or 0: no pools)")
    if pool.refill_concurrency < 1:
        raise ConfigError(f"{source}: pool.refill_concurrency must be at least 1")
    return pool


def _coerce_runner(key: str, raw: Any, *, from_env: bool) -> Any:
    return _coerce_value(
        key,
        raw,
        getattr(RunnerConfig(), key),
        duration=key in _RUNNER_DURATIONS,
        size=key in _RUNNER_SIZES,
        from_env=from_env,
    )


def _load_runner(section: Any, environ: Mapping[str, str], source: str) -> RunnerConfig:
    """[runner], with DORM_RUNNER_<KEY> overrides; unknown keys are errors naming the key."""
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: [runner] must be a table")
    known = {f.name for f in dataclasses.fields(RunnerConfig)}
    values: dict[str, Any] = {}
    try:
        for key, raw in section.items():
            if key == "prewarm":
                raise ConfigError("prewarm is now min_idle (a total over the spawners)")
            if key not in known:
                raise ConfigError(f"unknown key runner.{key}")
            values[key] = _coerce_runner(key, raw, from_env=False)
    except ConfigError as exc:
        raise ConfigError(f"{source}: runner.{exc}".replace("runner.unknown", "unknown")) from None
    if "DORM_RUNNER_PREWARM" in environ:
        raise ConfigError("DORM_RUNNER_PREWARM is now DORM_RUNNER_MIN_IDLE (a total)")
    _env_overrides(values, known, "DORM_RUNNER_", _coerce_runner, environ)
    runner = RunnerConfig(**values)
    try:
        check_app_name(runner.host)
    except InvalidName as exc:
        raise ConfigError(f"{source}: runner.host: {exc}") from None
    if runner.python_mode not in PYTHON_MODES:
        raise ConfigError(
            f"{source}: runner.python_mode: expected one of {', '.join(PYTHON_MODES)}"
        )
    try:
        runner_uids = parse_uid_range(runner.uid_range)
    except ConfigError as exc:
        raise ConfigError(f"{source}: runner.{exc}") from None
    if runner.spawners < 1 or runner.spawners > 16:
        raise ConfigError(f"{source}: runner.spawners: expected 1 to 16")
    if runner.max_idle > 1000:
        raise ConfigError(f"{source}: runner.max_idle: expected a whole number from 0 to 1000")
    if runner.max_idle < runner.min_idle:
        raise ConfigError(f"{source}: runner.max_idle must be >= runner.min_idle")
    if not 1 <= runner.refill_concurrency <= 64:
        raise ConfigError(f"{source}: runner.refill_concurrency: expected 1 to 64")
    if runner.run_memory < 4 * 1024**2 or runner.compile_memory < 4 * 1024**2:
        raise ConfigError(f"{source}: runner.run_memory and compile_memory: at least 4MiB")
    if runner.output_max_size < 1 or runner.tmp_size < 1024**2:
        raise ConfigError(f"{source}: runner.output_max_size >= 1 and tmp_size >= 1MiB")
    if runner.languages_dir and not Path(runner.languages_dir).is_dir():
        raise ConfigError(
            f"{source}: runner.languages_dir: {runner.languages_dir} is not a directory"
        )
    return dataclasses.replace(runner, uid_range=f"{runner_uids.start}-{runner_uids.stop - 1}")
