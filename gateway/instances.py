"""Instances: one per (app, branch), moving COLD → STARTING → READY → DRAINING → COLD, or FAILED.

The data plane calls `Instance.checkout(now)` for every plain request (a pooled connection, or
None) and `Instance.acquire(exchange, now)` otherwise; everything else here is the control path
(starting, readiness, eviction, crash handling), which may use tasks and await.

Rules the design follows, each from a complaint users have about other scale-to-zero systems:
  * Concurrent first requests share one start: they wait in a bounded per-instance queue.
  * Idleness is measured by in-flight requests and open upgraded connections, not arrivals, so a
    long stream or an open WebSocket is never evicted mid-way.
  * A crash is restarted by the next request after an exponential backoff; a crash loop is FAILED
    for a cool-down and answered 503 with the reason, rather than fork-bombing the host.
  * A cap on warm instances evicts the least recently used idle instance first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import itertools
import logging
import math
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.appspec import AppSpec, BranchSpec, SpecError, is_uploaded_runtime
from gateway.bundles import DeployError
from gateway.coldstart import ColdStartStats, StartStages
from gateway.config import ConfigError, GatewayConfig, PoolConfig, parse_uid_range
from gateway.instance import WARM, Instance, State, StaticSite, Waiter
from gateway.launcher import ExitInfo, Launcher, LaunchError, LaunchSpec, app_socket
from gateway.logs import log_path, read_tail
from gateway.registry import Registry
from gateway.runtimespec import ROOTFS_DIR, RuntimeRecord
from runtimes.runner.pools import load_overrides, save_overrides

if TYPE_CHECKING:
    from gateway.upstream import UpstreamConnection

log = logging.getLogger("dorm.instances")

CRASH_LOOP_FAILURES = 5
CRASH_LOOP_COOLDOWN = 60.0
BACKOFF_BASE = 0.25
BACKOFF_MAX = 30.0
STABLE_AFTER = 10.0  # an instance ready this long before it died resets the failure count
KILL_WAIT = 5.0
START_ATTEMPTS = 3  # per start: the first, a fresh interpreter, one after a fork-server restart
BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


PYTHON_TARGET = "runtimes.python:main"
PYTHON_RUNTIMES = ("python-asgi", "python-wsgi")
SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/bin", "/sbin")


_OWN_NETNS: int | None = None


def tcp_socket(netns_fd: int) -> socket.socket:
    """A non-blocking TCP socket, created inside the network namespace `netns_fd` if >= 0.

    A socket belongs to the namespace it was created in, wherever it is used afterwards: so the
    gateway can reach 127.0.0.1:$PORT of a sandbox that has no network interface but `lo`, with
    two setns calls (microseconds, this thread only) and no relay process.
    """
    global _OWN_NETNS
    if netns_fd < 0:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    else:
        from sandboxes.libc import CLONE_NEWNET, setns

        if _OWN_NETNS is None:
            _OWN_NETNS = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        setns(netns_fd, CLONE_NEWNET)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            setns(_OWN_NETNS, CLONE_NEWNET)
    sock.setblocking(False)
    return sock


def resolve_isolation(wanted: str) -> tuple[str, list[str]]:
    """The isolation level instances get by default, and why it is not stronger.

    "auto" means sandbox wherever the host allows it: as root, or without root through a user
    namespace (rootless: the reasons list what that cannot provide); else process, with the
    reasons. Asking for "sandbox" where it cannot be had is a start-up error.
    """
    if wanted == "process":
        return "process", ['isolation = "process" in the config']
    from sandboxes.doctor import explain_isolation

    level, reasons = explain_isolation()
    if level in ("sandbox", "rootless"):
        return "sandbox", reasons
    if wanted == "sandbox":
        raise ConfigError("isolation: sandbox is not available here: " + "; ".join(reasons))
    return "process", reasons


def member_uids(uids: range, pool: PoolConfig) -> range:
    """The top quarter of gateway.uid_range, for warm-pool members (empty with pools off).

    A serving member drops to its uid before anyone knows its tenant, so its uid cannot come
    from the per-instance allocation; the fork server hands these out and takes them back."""
    if pool.max_idle <= 0 or len(uids) < 4:
        return range(0)
    return uids[len(uids) - len(uids) // 4 :]


def python_binds() -> tuple[str, ...]:
    """Host directories a sandbox needs read-only for Python tenants: the interpreter's prefix,
    the virtualenv, and dorm's runtimes package (for the fresh-process path)."""
    import runtimes

    wanted = [sys.base_prefix, sys.prefix, str(Path(runtimes.__file__).resolve().parent)]
    out: list[str] = []
    for path in wanted:
        real = str(Path(path).resolve())
        if real.startswith(SYSTEM_DIRS) or real in out:
            continue
        if any(real.startswith(p + "/") for p in out):
            continue
        out.append(real)
    return tuple(out)


def launch_command(
    app: AppSpec,
    runtimes: Callable[[str], RuntimeRecord | None] = lambda _: None,
    *,
    fresh: bool = False,
    env: dict[str, str] | None = None,
) -> tuple[list[str], str | None, dict[str, str], str | None]:
    """(argv, zygote call target or None, runtime environment, why a fresh interpreter) that
    start `app`.

    `runtimes` looks up operator-uploaded runtimes: their command runs (inside their rootfs,
    see `_sandbox_spec`) with its placeholders filled, and their `env` is set except where the
    app's own spec sets the same variable. A python app runs in a fresh interpreter when its
    spec says `start = "fresh"`, when `fresh` (the zygote path failed it before), or when its
    environment (or the branch's, `env`) sets a variable Python reads only at start-up.
    """
    if is_uploaded_runtime(app.runtime):
        record = runtimes(app.runtime)
        if record is None:  # deleted since the spec was accepted: _start reports it
            raise LookupError(f"no runtime named {app.runtime!r}")
        rd = record.definition
        runtime_env = {k: v for k, v in rd.env.items() if k not in app.env}
        runtime_env["DORM_RUNTIME"] = app.runtime
        return rd.argv(app), None, runtime_env, None
    if app.runtime in PYTHON_RUNTIMES:
        runtime_env = {
            "DORM_ENTRY": app.entry or "",
            "DORM_INTERFACE": app.runtime.removeprefix("python-"),
        }
        why = startup_variables(app.env, env or {})
        if app.start == "fresh" or fresh or why is not None:
            # -P: the app's directory is not searched before dorm's runtime is imported.
            return [sys.executable, "-P", "-m", "runtimes.python"], None, runtime_env, why
        return ["dorm-python", app.entry or ""], PYTHON_TARGET, runtime_env, None
    return list(app.command), None, {}, None


def startup_variables(*envs: dict[str, str]) -> str | None:
    """Why a forked zygote child cannot honour this environment, or None if it can.

    CPython reads PYTHONHASHSEED, PYTHONOPTIMIZE, PYTHONPATH, PYTHONUTF8 and the like once, when
    the interpreter starts; a child forked from the zygote has long started, so setting them
    would silently do nothing. PYTHONBREAKPOINT is read at each breakpoint() call."""
    names = sorted(
        {k for e in envs for k in e if k.startswith("PYTHON") and k != "PYTHONBREAKPOINT"}
    )
    if not names:
        return None
    return f"{', '.join(names)} in its environment: read only when an interpreter starts"


class Outcome(enum.Enum):
    """How one attempt at a start ended (see `InstanceManager._attempt`)."""

    DONE = "done"  # ready, or failed with its waiters answered
    FRESH = "fresh"  # exited on the zygote path: try a fresh interpreter, and remember if it works
    CRASHED = "crashed"  # killed by a signal on the zygote path: a fresh interpreter, this once
    LOST = "lost"  # the fork server died under it: try again once it is back


class InstanceManager:
    """Owns every Instance: creation, starts, readiness, exits, eviction and shutdown."""

    def __init__(
        self, cfg: GatewayConfig, registry: Registry, pool: PoolConfig | None = None
    ) -> None:
        self.cfg = cfg
        self.pool = pool or PoolConfig()
        self.registry = registry
        self.instances: dict[tuple[str, str], Instance] = {}
        self._by_app: dict[str, set[str]] = {}  # app → branches with an instance record
        # Instances the 4/s sweep must look at: not cold, or with queued requests. Cold ones
        # (most of them, with many tenants) leave it, so an idle gateway does no per-tenant work.
        self._sweepable: set[Instance] = set()
        self._recently_active: set[Instance] = set()  # requested since the last `activity`, unswept
        self.running: dict[str, Instance] = {}
        self.isolation, self.isolation_reasons = resolve_isolation(cfg.isolation)
        # Sandboxes without root: one user namespace per instance, every tenant as the gateway's
        # own uid, no cgroups, no pools (a member is built and claimed with root's powers).
        self.rootless = self.isolation == "sandbox" and os.geteuid() != 0
        uids = parse_uid_range(cfg.uid_range)
        if self.rootless:
            self.pool = dataclasses.replace(self.pool, min_idle=0, max_idle=0)
        members = member_uids(uids, self.pool)
        pool_settings = {
            **self.pool.settings(),
            "member_uids": [members.start, members.stop - 1],
            "member_dir": str(cfg.run_path / "pool"),
        }
        self.launcher = Launcher(
            self._on_exit,
            cfg.cgroup_parent if self.isolation == "sandbox" else None,
            pool_settings,
            self._on_live,
        )
        self._free_uids = list(reversed(uids[: len(uids) - len(members)]))
        # Uids of spawns given up on (LaunchError.unanswered), by instance id: free again once
        # the fork server says how each ended.
        self._late_uids: dict[str, int] = {}
        self._python_binds = python_binds()
        self.internal: dict[str, Instance] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self.on_change: Callable[[], None] = lambda: None
        self.upstream_factory: Callable[[Instance], UpstreamConnection] | None = None
        # gateway/runner.py's hook, once registered.
        self.runner_hook: Any = None
        self.static_site: Callable[[Path, AppSpec], StaticSite] | None = None
        bundles = Path(cfg.data_dir) / "bundles"
        self.bundle_path: Callable[[str], Path] = lambda digest: bundles / digest
        self.runtime_defs: Callable[[str], RuntimeRecord | None] = registry.runtimes.get
        self.coldstarts = ColdStartStats()
        self.pool_overrides_path = Path(cfg.data_dir) / "pool-overrides.json"

    async def start(self) -> None:
        # Pool bounds set through the admin API before a restart apply again (the launcher hands
        # them to the fork server when it starts it).
        saved = await asyncio.to_thread(load_overrides, str(self.pool_overrides_path))
        for runtime, (low, high) in saved.items():
            self.launcher.configure_pool(runtime, low, high)
        if self.isolation == "process":
            log.warning(
                "ISOLATION IS OFF: instances run as unconfined processes with the gateway's own "
                "uid (%s). Use this for development only.",
                "; ".join(self.isolation_reasons),
            )
        elif self.rootless:
            log.warning(
                "ROOTLESS SANDBOXES: instances are confined through user namespaces, but %s",
                "; ".join(r.removeprefix("missing: ") for r in self.isolation_reasons),
            )
        else:
            log.info(
                "instances run sandboxed (cgroup subtree %r, uids %s)",
                self.cfg.cgroup_parent,
                self.cfg.uid_range,
            )
        if self.isolation == "sandbox" and not self.rootless and self.cfg.cgroup_favordynmods:
            from sandboxes import dynmods

            try:
                done = await asyncio.to_thread(dynmods.enable)
                log.info("cgroup favordynmods %s: sandbox cgroup joins skip an RCU wait", done)
            except OSError as exc:
                log.warning("cgroup favordynmods not enabled (cgroup joins stay slow): %s", exc)
        await self.launcher.start()
        self._schedule_sweep()

    # -- lookups ----------------------------------------------------------------------------------
    def add_internal(self, spec: AppSpec) -> Instance:
        """Register a service of dorm's own (the code runner) as an always-routable instance.

        It is not in the registry (operators cannot change or delete it), it is never evicted
        for idleness or by the warm cap, and it is started, logged and restarted after a crash
        like any tenant. `spec.isolation` says how it runs (the runner needs "process": it
        creates sandboxes itself).
        """
        inst = Instance(self, spec, BranchSpec(app=spec.name, name="main"))
        inst.internal = True
        self.internal[spec.name] = inst
        self._put((spec.name, "main"), inst)
        return inst

    def get(self, app_name: str, branch_name: str) -> Instance | None:
        """The instance for (app, branch) if the registry knows both; created on first use."""
        key = (app_name, branch_name)
        inst = self.instances.get(key)
        if inst is not None:
            return inst
        inst = self._build(app_name, branch_name)
        if inst is not None:
            self._put(key, inst)
        return inst

    def _put(self, key: tuple[str, str], inst: Instance) -> None:
        self.instances[key] = inst
        self._by_app.setdefault(key[0], set()).add(key[1])

    def _pop(self, key: tuple[str, str]) -> Instance:
        branches = self._by_app.get(key[0])
        if branches is not None:
            branches.discard(key[1])
            if not branches:
                del self._by_app[key[0]]
        return self.instances.pop(key)

    def _keys_of(self, app: str) -> list[tuple[str, str]]:
        """The instance keys of one app, without visiting every instance (apps can be 100,000)."""
        return [(app, branch) for branch in self._by_app.get(app, ())]

    def _build(self, app_name: str, branch_name: str) -> Instance | None:
        """A new Instance for the branch's effective spec (app spec overlaid by its bundle)."""
        branch = self.registry.get_branch(app_name, branch_name)
        base = self.registry.get_app(app_name)
        if branch is None or base is None:
            return None
        try:
            spec = self.registry.effective_spec(app_name, branch_name) or base
        except SpecError as exc:
            inst = Instance(self, base, branch)
            inst.broken = f"its spec cannot run here: {exc}"
            inst.special = True
            return inst
        inst = Instance(self, spec, branch)
        if spec.runtime == "static":
            inst.special = True
            if branch.bundle is None or self.static_site is None:
                inst.broken = "the static runtime serves a bundle, and none is deployed"
            else:
                inst.site = self.static_site(self.bundle_path(branch.bundle), spec)
        return inst

    def busy(self, app: str, branch: str) -> bool:
        """Whether the branch has in-flight requests, open tunnels or queued requests."""
        inst = self.instances.get((app, branch))
        return inst is not None and inst.busy

    def activity(self) -> list[tuple[str, str, float]]:
        """(app, branch, wall-clock time of the last request) for every instance warm since the
        previous call that had one.

        The data plane stamps requests with the monotonic clock (one float store per request);
        converting here, off the hot path, is what the registry's periodic flush needs.
        """
        offset = time.time() - time.monotonic()
        # Only instances warm since the last call can have a newer request: those still in the
        # sweep set, and those that left it since (with 100,000 tenants, not every record).
        recent, self._recently_active = self._sweepable | self._recently_active, set()
        return [
            (i.app.name, i.branch.name, offset + i.last_request)
            for i in recent
            if i.last_request is not None and not i.retired
        ]

    def warm_count(self) -> int:
        return sum(1 for i in self.instances.values() if i.state in WARM)

    def snapshot(self) -> list[dict[str, Any]]:
        return [
            i.snapshot()
            for i in sorted(self.instances.values(), key=lambda i: (i.app.name, i.branch.name))
        ]

    # -- connections ------------------------------------------------------------------------------
    def connect(self, inst: Instance, waiter: Waiter) -> None:
        self._spawn_task(self._connect(inst, waiter))

    async def _connect(self, inst: Instance, waiter: Waiter) -> None:
        try:
            conn = await self._open(inst)
        except OSError as exc:
            inst.connections -= 1
            inst.in_flight -= 1
            # A refused connection usually means the process is exiting: say why, if it is.
            name = inst.app.name
            inst.upstream_lost(
                lambda reason: waiter.fail(502, f"app {name!r} failed: {reason}"),
                f"cannot connect: {exc.strerror or exc}",
            )
            return
        waiter.attach(conn)

    async def _open(self, inst: Instance, *, first: bool = False) -> UpstreamConnection:
        factory: Callable[[Instance], UpstreamConnection] | None = self.upstream_factory
        assert factory is not None

        def protocol() -> asyncio.Protocol:
            conn = factory(inst)
            conn.first_byte = first  # the probe's: it carries the request that woke the instance
            return conn  # type: ignore[return-value]  # an asyncio protocol by its methods

        loop = asyncio.get_running_loop()
        conn: UpstreamConnection
        if inst.app.port is None:
            with app_socket(inst.socket_path) as path:  # the tenant's dir: never a symlink
                _, conn = await loop.create_unix_connection(protocol, path)  # type: ignore[assignment]
            return conn
        # A TCP-only app: its 127.0.0.1 is its own network namespace's (sandbox) or the host's.
        sock = tcp_socket(inst.netns_fd)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", inst.app.port))
        except BaseException:
            sock.close()
            raise
        _, conn = await loop.create_connection(protocol, sock=sock)  # type: ignore[assignment]
        return conn

    # -- starting ---------------------------------------------------------------------------------
    def wake(self, inst: Instance) -> None:
        if inst.state in (State.COLD, State.FAILED):
            inst.state = State.STARTING
            self._sweepable.add(inst)
            inst.woken_at = time.monotonic()
            self._spawn_task(self._start(inst))

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _make_room(self, inst: Instance) -> bool:
        """Keep warm instances under the cap by evicting the least recently used idle one."""
        warm = [i for i in self.instances.values() if i.state in WARM and i is not inst]
        if len(warm) < self.cfg.max_warm_instances:
            return True
        idle = [i for i in warm if i.state is State.READY and not i.busy and not i.internal]
        if not idle:
            return False
        victim = min(idle, key=lambda i: i.last_activity)
        log.info(
            "evicting %s/%s (least recently used) to stay under %d warm instances",
            victim.app.name,
            victim.branch.name,
            self.cfg.max_warm_instances,
        )
        self._spawn_task(self.stop_instance(victim, "evicted: least recently used"))
        return True

    async def _start(self, inst: Instance) -> None:
        try:
            await self._start_inner(inst)
        except Exception as exc:  # a bug here must not leave requests hanging
            log.exception("starting %s/%s failed", inst.app.name, inst.branch.name)
            self._start_failed(inst, 502, f"internal error starting the app: {exc}")

    async def _start_inner(self, inst: Instance) -> None:
        now = time.monotonic()
        if not self._make_room(inst):
            inst.state = State.COLD
            inst.fail_waiters(
                503, f"at capacity: {self.cfg.max_warm_instances} warm instances, none idle", 1
            )
            return
        delay = inst.next_start_at - now
        if delay > 0:
            if delay > inst.app.startup_timeout:
                inst.state = State.COLD
                inst.fail_waiters(
                    503,
                    f"app {inst.app.name!r} crashed ({inst.last_error}); "
                    f"restarting in {delay:.0f}s",
                    math.ceil(delay),
                )
                return
            await asyncio.sleep(delay)
        inst.started_at = time.monotonic()
        inst.ready_at = None
        inst.stages = None
        inst.first_byte_pending = False
        inst.starts += 1
        deadline = inst.started_at + inst.app.startup_timeout
        # The fallback chain: a pool member or a zygote fork first (the fork server picks);
        # a fresh interpreter if that start failed in a way a fresh one may not (or this app
        # is known to need one); the same again once a fork server that died is back.
        fresh, learn = inst.zygote_unfit, False
        fallback: str | None = "needs a fresh interpreter (learned earlier)" if fresh else None
        for _ in range(START_ATTEMPTS):
            outcome, why = await self._attempt(inst, deadline, fresh, fallback)
            if outcome in (Outcome.FRESH, Outcome.CRASHED):
                fresh, fallback, learn = True, why, outcome is Outcome.FRESH
            elif outcome is Outcome.LOST:
                fallback = why
                if not await self.launcher.wait_running(deadline - time.monotonic()):
                    fallback = f"{why}, and no fork server was running again before the deadline"
                    break
            else:
                if learn and inst.state is State.READY:
                    inst.zygote_unfit = True  # later starts of this spec skip the zygote path
                return
        self._record_failure(inst, f"could not start: {fallback}")
        self._start_failed(inst, 502, f"app {inst.app.name!r} could not start: {fallback}")

    async def _attempt(
        self, inst: Instance, deadline: float, fresh: bool, fallback: str | None
    ) -> tuple[Outcome, str | None]:
        """One try at starting `inst`: launch it and wait until it is ready.

        Returns DONE when the start is over (ready, or failed with the waiters answered), FRESH
        when a zygote-path process died before it was ready (the caller tries a fresh
        interpreter, which shares none of the zygote's state), LOST when the fork server died
        under it (the caller waits for its restart and tries again)."""
        app, branch = inst.app, inst.branch
        instance_id = f"i{next(self._ids):x}"
        run_dir = self.cfg.run_path / instance_id
        inst.id = instance_id
        inst.socket_path = str(run_dir / "http.sock")
        inst.exited = asyncio.get_running_loop().create_future()
        inst.live = asyncio.get_running_loop().create_future()
        inst.import_ms = None
        bundle_dir = str(self.bundle_path(branch.bundle)) if branch.bundle else None
        code_dir = bundle_dir or app.app_dir
        try:
            argv, call, runtime_env, why_fresh = launch_command(
                app, self.runtime_defs, fresh=fresh, env=branch.env
            )
        except LookupError as exc:  # its runtime was deleted since the spec was accepted
            inst.state = State.COLD
            inst.fail_waiters(503, f"app {app.name!r} cannot start: {exc}")
            return Outcome.DONE, None
        fallback = fallback or why_fresh
        sandboxed = (app.isolation or self.isolation) == "sandbox"
        if sandboxed and self.isolation != "sandbox":
            inst.state = State.COLD
            inst.fail_waiters(
                503,
                f"app {app.name!r} asks for sandbox isolation, which this "
                f"host cannot provide: {'; '.join(self.isolation_reasons)}",
            )
            return Outcome.DONE, None
        # What the instance sees: in a sandbox its code is /app and its socket /run/dorm.
        seen_code = "/app" if sandboxed else code_dir
        env = {
            **BASE_ENV,
            "HOME": "/tmp" if sandboxed else str(run_dir),
            **app.env,
            **branch.env,
            "DORM_SOCKET": "/run/dorm/http.sock" if sandboxed else inst.socket_path,
            "DORM_APP": app.name,
            "DORM_BRANCH": branch.name,
        }
        env.update(runtime_env)
        if app.port is not None:
            env["PORT"] = str(app.port)
        if seen_code is not None and app.runtime == "command":
            # Vendored Python dependencies are importable without an install step.
            env.setdefault("PYTHONPATH", f"{seen_code}/vendor:{seen_code}")
        sandbox = None
        if sandboxed:
            if self.rootless and app.network == "egress":
                inst.state = State.COLD
                inst.fail_waiters(
                    503, f"app {app.name!r} asks for egress, which rootless sandboxes cannot give"
                )
                return Outcome.DONE, None
            inst.uid = self._take_uid()
            if inst.uid is None:
                inst.state = State.COLD
                inst.fail_waiters(503, "no free sandbox uid: widen gateway.uid_range", 5)
                return Outcome.DONE, None
            sandbox = self._sandbox_spec(app, branch, instance_id, inst.uid, code_dir)
        spec = LaunchSpec(
            id=instance_id,
            argv=argv,
            call=call,
            env=env,
            run_dir=str(run_dir),
            log_path=str(log_path(self.cfg.data_dir, app.name, branch.name)),
            log_max_bytes=self.cfg.log_max_bytes,
            log_keep=self.cfg.log_keep,
            cwd=code_dir,
            sandbox=sandbox,
            pool=app.runtime if sandbox is not None and self._poolable(app, call) else None,
            netns=sandbox is not None and app.port is not None,
        )
        attempt_at = time.monotonic()
        self.running[instance_id] = inst
        try:
            # Waits no longer than the start may take: a stuck fork server must not hold the
            # start (and every request queued behind it) for the launcher's own 30 s.
            spawned = await self.launcher.spawn(spec, timeout=deadline - time.monotonic())
            spawned_at = time.monotonic()
            inst.pid = spawned.pid
            if spawned.uid is not None:  # a claimed pool member keeps the uid it was built with
                self._release_uid(inst)
                inst.uid, inst.uid_from_pool = spawned.uid, True
            if sandboxed and app.port is not None:
                # Held while it runs: connections to the app are made inside this namespace.
                # Passed by the fork server (never opened here by pid: it may be reused).
                inst.netns_fd = spawned.netns_fd
        except LaunchError as exc:
            self.running.pop(instance_id, None)
            inst.id = None
            if exc.unanswered and inst.uid is not None and not inst.uid_from_pool:
                # The fork server may still start it as this uid (and then kill it): not free
                # for another tenant until _on_exit hears how that spawn ended.
                self._late_uids[instance_id] = inst.uid
                inst.uid = None
            self._release_uid(inst)
            if exc.lost and time.monotonic() < deadline:
                return Outcome.LOST, f"{exc} while starting it"
            self._record_failure(inst, f"could not start: {exc}")
            self._start_failed(inst, 502, f"app {app.name!r} could not start: {exc}")
            return Outcome.DONE, None
        if fallback is not None:
            how = "started in a fresh interpreter" if call is None else "started again"
            self.launcher.note(instance_id, f"{how}: {fallback}")
        inst.start_watches_exit = True  # an exit while starting is decided below, not in _on_exit
        try:
            conn = await self._wait_ready(inst, deadline, announced=spawned.path == "pool")
        finally:
            inst.start_watches_exit = False
        if conn is None:
            if inst.exited.done():
                return self._died_starting(inst, inst.exited.result(), call, deadline)
            self._record_failure(inst, f"not ready within {app.startup_timeout:g}s")
            inst.fail_waiters(
                504,
                f"app {app.name!r} did not become ready within "
                f"{app.startup_timeout:g}s; see `dorm logs {app.name}`",
            )
            await self._terminate(inst, grace=0.0)
            return Outcome.DONE, None
        if inst.state is not State.STARTING:  # stopped while starting
            conn.close()
            return Outcome.DONE, None
        inst.state = State.READY
        inst.ready_at = time.monotonic()
        inst.last_activity = inst.ready_at
        inst.idle.append(conn)
        assert inst.started_at is not None
        woken = inst.woken_at if inst.woken_at is not None else inst.started_at
        inst.stages = stages = StartStages(
            path=spawned.path,
            queue=(inst.started_at - woken) * 1000,
            spawn=(spawned_at - attempt_at) * 1000,
            claim=spawned.claim_ms,
            confine=spawned.confine_ms,
            app=(inst.ready_at - spawned_at) * 1000,
            app_import=inst.import_ms,
            total=(inst.ready_at - woken) * 1000,
            fallback=fallback,
        )
        inst.first_byte_pending = True
        self.coldstarts.record(stages)
        ready_in = f"ready in {(inst.ready_at - inst.started_at) * 1000:.1f} ms"
        # "(pid N)" right after the time: bench/coldstart.py parses that form.
        log.info(
            "%s/%s %s (pid %s) [%s]", app.name, branch.name, ready_in, inst.pid, stages.describe()
        )
        self.launcher.note(instance_id, f"{ready_in} ({stages.describe()})")
        inst.dispatch_waiters()
        return Outcome.DONE, None

    def _died_starting(
        self, inst: Instance, info: ExitInfo, call: str | None, deadline: float
    ) -> tuple[Outcome, str | None]:
        """The instance exited before it was ready: try a slower path, or fail the waiters."""
        if inst.state is not State.STARTING:  # stopped meanwhile: nothing left to answer
            return Outcome.DONE, None
        app = inst.app
        reason = info.describe()
        if time.monotonic() < deadline:
            if info.lost:
                return Outcome.LOST, f"{reason} while starting it"
            if call is not None and not info.oom:
                # Forked from the zygote, it shared the fork server's interpreter state; a fresh
                # interpreter shares none of it (and an app that fails there too fails for real).
                # An exit is the app refusing that state: worth remembering. A crash (a signal)
                # may be a one-off: the next start tries the zygote path again.
                why = f"a start forked from the zygote {reason} before it was ready"
                log.warning(
                    "%s/%s: %s; trying a fresh interpreter", app.name, inst.branch.name, why
                )
                return (Outcome.FRESH if info.signal is None else Outcome.CRASHED), why
        self._record_failure(inst, f"the app {reason}")
        self._start_failed(
            inst, 502, f"app {app.name!r} {reason} during startup; see `dorm logs {app.name}`"
        )
        return Outcome.DONE, None

    async def _wait_ready(
        self, inst: Instance, deadline: float, *, announced: bool = False
    ) -> UpstreamConnection | None:
        """Poll the instance's socket until it accepts (and the health path answers).

        With `announced` (a claimed pool member, which tells the fork server when its socket is
        live), a first attempt that fails waits for that word (or the exit) instead of polling:
        the member is usually live before the gateway even heard "spawned", so the first attempt
        mostly succeeds, and when it does not, the next one is made at the right moment."""
        assert inst.exited is not None and inst.live is not None
        pause = 0.0005
        while not inst.exited.done():
            try:
                conn = await self._open(inst, first=True)
            except OSError:
                pass
            else:
                inst.connections += 1
                if inst.app.health is None or await self._healthy(inst):
                    return conn
                conn.close()
            if time.monotonic() + pause > deadline:
                return None
            wake: set[asyncio.Future[Any]] = {inst.exited}
            if announced and not inst.live.done():
                wake.add(inst.live)
                pause = max(0.0, deadline - time.monotonic())
            await asyncio.wait(wake, timeout=pause, return_when=asyncio.FIRST_COMPLETED)
            pause = min(pause * 1.5, 0.05)
        return None

    async def _healthy(self, inst: Instance) -> bool:
        try:
            reader, writer = await asyncio.wait_for(self._open_stream(inst), 2.0)
        except (OSError, TimeoutError):
            return False
        try:
            writer.write(
                f"GET {inst.app.health} HTTP/1.1\r\nHost: localhost\r\n"
                "Connection: close\r\nUser-Agent: dorm-health\r\n\r\n".encode()
            )
            line = await asyncio.wait_for(reader.readline(), 2.0)
            parts = line.split()
            return len(parts) >= 2 and parts[1][:1] in (b"2", b"3")
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()

    async def _open_stream(
        self, inst: Instance
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A plain stream connection to the app (for health checks), wherever it listens."""
        if inst.app.port is None:
            with app_socket(inst.socket_path) as path:  # the tenant's dir: never a symlink
                return await asyncio.open_unix_connection(path)
        sock = tcp_socket(inst.netns_fd)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", inst.app.port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    def _record_failure(self, inst: Instance, reason: str) -> None:
        now = time.monotonic()
        inst.failures += 1
        inst.last_error = reason
        inst.next_start_at = now + min(BACKOFF_BASE * 2 ** (inst.failures - 1), BACKOFF_MAX)
        if inst.failures >= CRASH_LOOP_FAILURES:
            inst.failed_until = now + CRASH_LOOP_COOLDOWN
            inst.next_start_at = inst.failed_until
            log.warning(
                "%s/%s is crash-looping (%s); cooling down for %ds",
                inst.app.name,
                inst.branch.name,
                reason,
                CRASH_LOOP_COOLDOWN,
            )

    def _start_failed(self, inst: Instance, status: int, message: str) -> None:
        inst.state = State.FAILED if inst.failures >= CRASH_LOOP_FAILURES else State.COLD
        inst.fail_waiters(status, message)

    def _sandbox_spec(
        self, app: AppSpec, branch: BranchSpec, instance_id: str, uid: int, code_dir: str | None
    ) -> dict[str, Any]:
        """The sandboxes.SandboxSpec fields for one instance (sent to the fork server as JSON)."""
        limits = app.limits
        volume = None
        if app.volume:
            volume = str(Path(self.cfg.data_dir) / "volumes" / app.name / branch.name)
        rootfs = None
        binds = self._python_binds
        record = self.runtime_defs(app.runtime) if is_uploaded_runtime(app.runtime) else None
        if record is not None:
            # The runtime's own root instead of the host's system dirs, and nothing of the
            # host's Python: the app sees exactly what the operator uploaded.
            rootfs = str(self.bundle_path(record.digest) / ROOTFS_DIR)
            binds = ()
        return {
            "name": f"{app.name[:40]}-{instance_id}",
            "uid": uid,
            "app_dir": code_dir,
            "data_dir": volume,
            "cwd": "/app",
            "hostname": app.name,
            "memory": limits.memory,
            "cpu": limits.cpu,
            "pids": limits.pids,
            "network": app.network,
            "extra_ro_binds": binds,
            "rootfs": rootfs,
            "cgroup_parent": self.cfg.cgroup_parent,
        }

    def _take_uid(self) -> int | None:
        """A free uid from gateway.uid_range; rootless, always the gateway's own (the only uid
        its user namespaces can map)."""
        if self.rootless:
            return os.geteuid()
        return self._free_uids.pop() if self._free_uids else None

    def _release_uid(self, inst: Instance) -> None:
        if inst.uid is not None and not inst.uid_from_pool and not self.rootless:
            self._free_uids.append(inst.uid)
        inst.uid, inst.uid_from_pool = None, False

    async def set_pool_bounds(self, runtime: str, min_idle: int, max_idle: int) -> None:
        """`PUT /v1/pools/{runtime}`: applied at once, and kept in the data dir for restarts."""
        self.launcher.configure_pool(runtime, min_idle, max_idle)
        overrides = self.launcher.pool_overrides
        await asyncio.to_thread(save_overrides, str(self.pool_overrides_path), overrides)

    def _poolable(self, app: AppSpec, call: str | None) -> bool:
        """Built-in runtimes are pooled; an operator's runtime only if its runtime.toml says
        `pool = true` (a pre-started member must be harmless to keep idle). A python app started
        in a fresh interpreter (`call` None) is not: it must not count as its pool's miss."""
        if self.rootless or (app.runtime in PYTHON_RUNTIMES and call is None):
            return False
        if not is_uploaded_runtime(app.runtime):
            return True
        record = self.runtime_defs(app.runtime)
        return record is not None and record.definition.pool

    def _on_live(self, instance_id: str, import_ms: float | None) -> None:
        inst = self.running.get(instance_id)
        if inst is None or inst.id != instance_id:
            return
        inst.import_ms = import_ms
        if inst.stages is not None and inst.stages.path == "pool":  # ready before this came
            inst.stages.app_import = import_ms
        if inst.live is not None and not inst.live.done():
            inst.live.set_result(None)

    # -- exits ------------------------------------------------------------------------------------
    def _on_exit(self, instance_id: str, info: ExitInfo) -> None:
        late_uid = self._late_uids.pop(instance_id, None)
        if late_uid is not None and not self.rootless:
            self._free_uids.append(late_uid)
        inst = self.running.pop(instance_id, None)
        if inst is None or inst.id != instance_id:
            return
        was = inst.state
        reason = info.describe()
        inst.id = None
        inst.pid = None
        self._release_uid(inst)
        if inst.netns_fd >= 0:
            os.close(inst.netns_fd)
            inst.netns_fd = -1
        for conn in list(inst.idle):
            conn.close()
        if was is State.DRAINING or inst.stopping:
            inst.state = State.COLD
            if inst.ready_at is not None and time.monotonic() - inst.ready_at >= STABLE_AFTER:
                inst.failures = 0
        elif was is State.STARTING and inst.start_watches_exit:
            pass  # `_attempt` answers its waiters, or tries a slower path first
        else:
            if inst.ready_at is not None and time.monotonic() - inst.ready_at >= STABLE_AFTER:
                inst.failures = 0
            self._record_failure(inst, f"the app {reason}")
            inst.state = State.FAILED if inst.failures >= CRASH_LOOP_FAILURES else State.COLD
            if was is State.STARTING:
                inst.fail_waiters(
                    502,
                    f"app {inst.app.name!r} {reason} during startup; "
                    f"see `dorm logs {inst.app.name}`",
                )
        inst._flush_lost(f"the app {reason}")
        if inst.exited is not None and not inst.exited.done():
            inst.exited.set_result(info)
        if inst.retired:
            waiters, inst.waiters = inst.waiters, deque()
            for waiter in waiters:
                self.reroute(inst, waiter)
        elif inst.waiters and inst.state in (State.COLD, State.FAILED):
            self.wake(inst)

    # -- stopping ---------------------------------------------------------------------------------
    async def stop_instance(self, inst: Instance, why: str, *, drain: float | None = None) -> None:
        """Drain (wait for in-flight work up to `drain` seconds), then SIGTERM, grace, SIGKILL."""
        if inst.state not in (State.READY, State.STARTING) or inst.stopping:
            return
        inst.stopping = True
        try:
            if inst.state is State.STARTING:
                while inst.state is State.STARTING and inst.id is None:
                    await asyncio.sleep(0.01)
            inst.state = State.DRAINING
            log.info("stopping %s/%s: %s", inst.app.name, inst.branch.name, why)
            for conn in list(inst.idle):
                conn.close()
            limit = time.monotonic() + (inst.app.stop_timeout if drain is None else drain)
            while (inst.in_flight or inst.upgraded) and time.monotonic() < limit:
                await asyncio.sleep(0.02)
            await self._terminate(inst, grace=inst.app.stop_timeout)
        finally:
            inst.stopping = False

    async def _terminate(self, inst: Instance, grace: float) -> None:
        if inst.id is None or inst.exited is None:
            inst.state = State.COLD if inst.state is not State.FAILED else inst.state
            return
        inst.state = State.DRAINING if inst.state is not State.FAILED else inst.state
        instance_id = inst.id
        exited = inst.exited
        if grace > 0:
            self.launcher.signal(instance_id, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(exited), grace)
        if not exited.done():
            self.launcher.signal(instance_id, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(exited), KILL_WAIT)

    async def stop(self, app: str, branch: str | None) -> int:
        keys = self._keys_of(app) if branch is None else [(app, branch)]
        found = (self.instances.get(key) for key in keys)
        targets = [i for i in found if i is not None and i.state in WARM]
        await asyncio.gather(*(self.stop_instance(i, "stopped by the admin API") for i in targets))
        return len(targets)

    def reroute(self, old: Instance, waiter: Waiter) -> None:
        """A request that reached a retired instance goes to its replacement, if there is one."""
        new = self.get(old.app.name, old.branch.name)
        if new is None:
            waiter.fail(404, f"app {old.app.name!r} (branch {old.branch.name!r}) no longer exists")
        else:
            waiter.instance = new
            new.acquire(waiter, time.monotonic())

    async def app_changed(self, app: str) -> None:
        """New app spec: new requests get new instances; running ones drain and stop."""
        await self._retire(self._keys_of(app), "app spec changed")

    async def app_removed(self, app: str) -> None:
        await self._retire(self._keys_of(app), "app removed")

    async def branch_changed(self, app: str, branch: str) -> None:
        """A branch was created, changed or deleted: same as an app change, for one branch."""
        key = (app, branch)
        await self._retire([key] if key in self.instances else [], "branch changed")

    async def redeploy(self, app: str, branch: str) -> None:
        """Switch a branch to its newly deployed bundle without dropping a request.

        A cold branch just forgets its instance (the next request starts the new bundle). A warm
        one starts the new bundle beside the old; only when the new one is ready does traffic
        switch, and the old one drains. If the new one will not start, the old keeps serving and
        DeployError says why (with the end of its log).
        """
        key = (app, branch)
        old = self.instances.get(key)
        if old is None or old.state not in (State.READY, State.STARTING):
            await self._retire([key] if old is not None else [], "redeployed")
            self.on_change()
            return
        new = self._build(app, branch)
        if new is None:
            raise DeployError(f"app {app!r} branch {branch!r} no longer exists")
        if new.broken is not None:
            raise DeployError(new.broken)
        new.state = State.STARTING
        self._sweepable.add(new)
        await self._start(new)
        if new.state is not State.READY:
            why = new.last_error or "it did not become ready"
            await self._terminate(new, grace=0.0)
            tail = await asyncio.to_thread(read_tail, log_path(self.cfg.data_dir, app, branch), 20)
            raise DeployError(
                f"the new bundle failed to start ({why}); the previous one keeps "
                f"serving. Last log lines:\n{tail.decode('utf-8', 'replace')}"
            )
        self._put(key, new)
        old.retired = old.special = True
        self.on_change()
        waiters, old.waiters = old.waiters, deque()
        for waiter in waiters:
            self.reroute(old, waiter)
        self._spawn_task(self.stop_instance(old, "replaced by a new deploy"))

    async def _retire(self, keys: list[tuple[str, str]], why: str) -> None:
        keys = [k for k in keys if not self.instances[k].internal]  # dorm's own stay put
        old = [self._pop(key) for key in keys]
        for inst in old:
            inst.retired = inst.special = True
        self.on_change()  # cached routes may name a retired instance, or none where one now is
        for inst in old:
            if inst.state not in WARM:
                waiters, inst.waiters = inst.waiters, deque()
                for waiter in waiters:
                    self.reroute(inst, waiter)
        await asyncio.gather(*(self.stop_instance(i, why) for i in old))

    # -- periodic housekeeping --------------------------------------------------------------------
    def _schedule_sweep(self) -> None:
        self._sweeper = asyncio.get_running_loop().call_later(0.25, self._sweep)

    def _sweep(self) -> None:
        now = time.monotonic()
        for inst in list(self._sweepable):
            if inst.state in (State.COLD, State.FAILED) and not inst.waiters:
                self._sweepable.discard(inst)
                self._recently_active.add(inst)  # its last request still goes to the registry
                continue
            while inst.waiters and now - inst.waiters[0].queued_at > inst.app.startup_timeout:
                inst.waiters.popleft().fail(
                    504,
                    f"app {inst.app.name!r} did not answer within "
                    f"{inst.app.startup_timeout:g}s of queueing",
                )
            if (
                not inst.internal
                and inst.state is State.READY
                and not inst.busy
                and not inst.stopping
                and now - inst.last_activity >= inst.app.idle_timeout
            ):
                self._spawn_task(self.stop_instance(inst, "idle"))
        self._schedule_sweep()

    async def shutdown(self, timeout: float) -> None:
        """Stop every instance (draining up to `timeout`), then the fork server."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        warm = [i for i in self.instances.values() if i.state in WARM]
        await asyncio.gather(
            *(self.stop_instance(i, "gateway shutdown", drain=timeout) for i in warm)
        )
        for inst in self.instances.values():
            inst.fail_waiters(503, "the gateway is shutting down", 5)
        await self.launcher.close()
