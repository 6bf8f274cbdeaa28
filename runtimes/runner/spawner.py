"""The spawner: the single-threaded process that forks every runner sandbox, and the zygote.

Why a process of its own: ``sandboxes.spawn_call`` forks, which is only safe from a single-threaded
process, and blocks for 1-3 ms per sandbox (longer when its pool of pre-forked children runs dry);
the service's event loop must not. Why it never sees request data: every sandbox is a fork of this
process (through its pre-forked pool), so whatever sits in its memory — even freed — is readable by
the untrusted code it forks. It therefore receives only limits and one socket end per sandbox
(SCM_RIGHTS); the code, stdin and output travel between the service and the sandbox's init
directly. It is exec'd (not forked) by the service with a scrubbed environment, so it does not
hold the service's memory (API keys, other requests) either.

One epoll loop: spawn and kill requests in, pidfds of running sandboxes, wall-clock deadlines and
CPU-time polls (cgroup usage, every ``CPU_POLL`` seconds), and topping up the pre-forked pools
whenever nothing else is pending. Exits are reported with the cgroup's final counters.

Pools (see pools.py): one per sandbox layout (set of extra binds) the service names in its
settings, each with this spawner's share of ``min_idle``/``max_idle``. A spawn that finds no idle
child of its layout is a *miss* and raises the pool's target by one up to ``max_idle`` (reactive
prewarm); ``shrink_after`` seconds without a miss bring it back to ``min_idle``. At most
``refill_concurrency`` children are built between two looks at the control socket, which bounds
how long a request can wait behind a refill.

Protocol (SOCK_SEQPACKET, one JSON object per message): the service sends ``settings`` first, then
``spawn`` (with the sandbox's control socket attached), ``kill``, ``pools`` (a state query) and
``pool_config`` (new bounds for one pool); the spawner answers ``ready``, ``spawned``, ``failed``,
``exited``, ``busy`` and ``pools``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

# The init every sandbox runs; imported here so pre-forked children already have it.
import runtimes.runner.boot  # noqa: F401  (preloaded for spawn_call)
import sandboxes
import sandboxes.cgroups
from runtimes.sizing import PoolSizing
from sandboxes import Rlimits, SandboxSpec
from sandboxes.prefork import POOL
from sandboxes.spawn import _mount_plan

BOOT_TARGET = "runtimes.runner.boot:main"
CPU_POLL = 0.02
MAX_MESSAGE = 65536
PR_SET_PDEATHSIG = 1
BOOT_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"}
MAINTAIN_EVERY = 1.0  # how often dead idle children are replaced and quiet pools shrunk


@dataclass(slots=True)
class Running:
    """One sandbox this process spawned and has not reaped yet."""

    id: str
    box: sandboxes.Sandbox
    pidfd: int
    started: float
    deadline: float
    cpu_limit_us: int | None
    cpu_file: str | None
    killed: str | None = None


@dataclass(slots=True)
class Pool(PoolSizing):
    """This spawner's idle children of one sandbox layout, and their accounting."""

    name: str
    binds: tuple[str, ...]
    template: SandboxSpec
    min_idle: int
    max_idle: int
    members: set[int] = field(default_factory=set)  # pids built for this pool, maybe taken
    error: str | None = None  # why nothing is being built (a failed prewarm)


def _cpu_file(box: sandboxes.Sandbox) -> str | None:
    """The cgroup file whose first number is the sandbox's CPU usage (v1: ns, v2: cpu.stat)."""
    cg = box.cgroup
    if cg is None:
        return None
    by_controller = getattr(cg, "by_controller", None)
    if by_controller is not None:
        base = by_controller.get("cpuacct")
        return None if base is None else os.path.join(base, "cpuacct.usage")
    return os.path.join(cg.path, "cpu.stat")


def _cpu_usage_us(path: str) -> int | None:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    if path.endswith("cpuacct.usage"):
        return int(data) // 1000
    for line in data.splitlines():
        if line.startswith(b"usage_usec "):
            return int(line.split()[1])
    return None


class Spawner:
    def __init__(self, ctl: socket.socket, settings: dict[str, Any]) -> None:
        self.ctl = ctl
        self.ctl.setblocking(False)
        self.cgroup_parent: str = settings["cgroup_parent"]
        self.empty_dir: str = settings["empty_dir"]
        self.binds: tuple[str, ...] = tuple(settings["binds"])
        self.refill_concurrency = max(1, int(settings.get("refill_concurrency", 1)))
        self.shrink_after = float(settings.get("shrink_after", 30.0))
        # Pre-forked children get the warm limits; a spawn lowers them if its stage asks less.
        self.warm: dict[str, Any] = {"id": "warm", "uid": int(settings["uid"]), **settings["warm"]}
        self.pools: dict[tuple[str, ...], Pool] = {}
        for p in settings.get("pools", []):
            binds = tuple(p["binds"])
            low, high = int(p["min_idle"]), int(p["max_idle"])
            template = self._spec({**self.warm, "binds": list(binds)})
            self.pools[binds] = Pool(p["name"], binds, template, low, max(low, high), target=low)
        self.last_maintain = time.monotonic()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.ctl, selectors.EVENT_READ, None)
        self.running: dict[str, Running] = {}
        self.outbox: list[bytes] = []
        self.stopping = False

    def _spec(self, req: dict[str, Any]) -> SandboxSpec:
        pids = int(req["pids"])
        return SandboxSpec(
            name=f"r{req['id']}",
            uid=int(req["uid"]),
            socket_dir=self.empty_dir,
            cwd="/tmp",
            hostname="runner",
            memory=int(req["memory"]),
            cpu=float(req["cpu"]),
            pids=pids,
            tmp_size=int(req["tmp_size"]),
            shm_size=min(int(req["tmp_size"]), 16 << 20),
            rlimits=Rlimits(nofile=int(req["nofile"]), fsize=int(req["fsize"]), nproc=pids),
            network="none",
            extra_ro_binds=self.binds + tuple(req.get("binds", ())),
            cgroup_parent=self.cgroup_parent,
        )

    # -- loop ---------------------------------------------------------------------------------
    def serve(self) -> None:
        self.send({"ev": "ready"})
        while not self.stopping or self.running:
            timeout = self._timeout()
            events = self.selector.select(timeout)
            for key, _mask in events:
                if key.data is None:
                    self.read_control()
                else:
                    self.reap(key.data)
            self.check_limits()
            if self.stopping:
                continue
            if time.monotonic() - self.last_maintain >= MAINTAIN_EVERY:
                self.maintain()
            if not events:
                self.top_up()

    def _timeout(self) -> float | None:
        if self.stopping:
            if not self.running:
                return None
            soonest = MAINTAIN_EVERY
        else:
            if self._wanting():
                return 0.0
            soonest = self.last_maintain + MAINTAIN_EVERY - time.monotonic()
        now = time.monotonic()
        if self.running:
            soonest = min(soonest, min(r.deadline for r in self.running.values()) - now)
        if any(r.cpu_limit_us is not None and r.killed is None for r in self.running.values()):
            soonest = min(soonest, CPU_POLL)
        return max(0.0, soonest)

    # -- pools --------------------------------------------------------------------------------
    def idle_members(self, pool: Pool) -> set[int]:
        """The pool's children still idle (taken or dead ones drop out of `members`)."""
        pool.members &= set(POOL.idle_pids())
        return pool.members

    def _wanting(self) -> list[Pool]:
        return [
            p
            for p in self.pools.values()
            if p.error is None and len(self.idle_members(p)) < p.target
        ]

    def top_up(self) -> None:
        """Pre-fork up to `refill_concurrency` idle children when nothing else is pending (each
        costs 1-25 ms, during which this process answers nothing)."""
        wanting = self._wanting()
        if not wanting:
            return
        # Tell the service we are blocked for a while, so it sends work to another spawner.
        self.send({"ev": "busy", "busy": True})
        try:
            budget = self.refill_concurrency
            while budget > 0 and wanting:
                for pool in wanting[:budget]:
                    self._build(pool)
                    budget -= 1
                wanting = self._wanting()
        finally:
            self.send({"ev": "busy", "busy": False})

    def _build(self, pool: Pool) -> None:
        before = set(POOL.idle_pids())
        layout = _mount_plan(pool.template, False)
        try:
            # prewarm(spec, n) builds until n children of this layout are idle: one more.
            sandboxes.prewarm(pool.template, POOL.available(layout, self.cgroup_parent) + 1)
        except Exception as exc:  # a failed prewarm only makes the next spawn slower
            print(f"runner spawner: prewarm failed: {exc}", file=sys.stderr, flush=True)
            pool.error = f"prewarm failed: {exc}"
            return
        new = set(POOL.idle_pids()) - before
        if not new:
            pool.error = "nothing can be pre-forked here"
            return
        pool.members |= new
        pool.count_built(len(new), time.monotonic())

    def count_spawn(self, pool: Pool, *, hit: bool) -> None:
        """Account a spawn: a claim, or a miss that grows the pool's target (reactive prewarm)."""
        pool.count_spawn(hit=hit, max_idle=pool.max_idle, now=time.monotonic())

    def maintain(self) -> None:
        """Drop idle children that died (OOM killer, operator) so they are rebuilt, shrink pools
        that have been quiet for `shrink_after`, and age the refill-rate window."""
        now = self.last_maintain = time.monotonic()
        POOL.reap_dead()
        for pool in self.pools.values():
            if pool.age(now, pool.min_idle, self.shrink_after):
                self._dismiss(pool, pool.target)

    def _dismiss(self, pool: Pool, keep: int) -> None:
        """Kill idle children beyond `keep` (the most recently built stay)."""
        idle = sorted(self.idle_members(pool))
        for pid in idle[: max(0, len(idle) - keep)]:
            POOL.discard(pid)
            pool.members.discard(pid)

    def configure(self, req: dict[str, Any]) -> None:
        """New bounds (this spawner's share) for one pool, applied at once."""
        pool = next((p for p in self.pools.values() if p.name == req.get("name")), None)
        if pool is None:
            return
        low, high = int(req["min_idle"]), int(req["max_idle"])
        pool.min_idle, pool.max_idle = low, max(low, high)
        pool.target = min(max(pool.target, low), pool.max_idle)
        pool.error = None  # a new bound is a new attempt
        self._dismiss(pool, pool.target)

    def pool_state(self) -> list[dict[str, Any]]:
        out = []
        for pool in self.pools.values():
            idle = len(self.idle_members(pool))
            out.append(
                {
                    "name": pool.name,
                    "idle": idle,
                    "target": pool.target,
                    "peak": max(pool.peak, pool.target),
                    "min_idle": pool.min_idle,
                    "max_idle": pool.max_idle,
                    "claimed": pool.claimed,
                    "misses": pool.misses,
                    "built": pool.built,
                    "forking": 0 if pool.error else max(0, pool.target - idle),
                    "refill_rate": pool.refill_rate,
                    "error": pool.error,
                }
            )
        return out

    # -- control ------------------------------------------------------------------------------
    def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode()
        try:
            self.ctl.send(data)
        except BlockingIOError:
            self.ctl.setblocking(True)
            try:
                self.ctl.send(data)
            finally:
                self.ctl.setblocking(False)
        except OSError:
            self.stop()

    def read_control(self) -> None:
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(self.ctl, MAX_MESSAGE, 4)
            except BlockingIOError:
                return
            except OSError:
                msg, fds = b"", []
            if not msg:
                for fd in fds:
                    os.close(fd)
                self.stop()
                return
            self.handle(json.loads(msg), fds)

    def handle(self, req: dict[str, Any], fds: list[int]) -> None:
        op = req.get("op")
        if op == "spawn":
            try:
                self.spawn(req, fds[0])
            except Exception as exc:
                self.send({"ev": "failed", "id": req["id"], "error": str(exc)})
            finally:
                for fd in fds:
                    os.close(fd)
        elif op == "kill":
            run = self.running.get(req["id"])
            if run is not None:
                self.kill(run, str(req.get("reason") or "killed"))
        elif op == "pools":
            pending = bool(self._wanting())
            message = {"ev": "pools", "id": req.get("id"), "refill_pending": pending}
            self.send({**message, "pools": self.pool_state()})
        elif op == "pool_config":
            self.configure(req)
        elif op == "stop":
            self.stop()

    def spawn(self, req: dict[str, Any], ctl_fd: int) -> None:
        spec = self._spec(req)
        pool = self.pools.get(tuple(req.get("binds", ())))
        idle = set(self.idle_members(pool)) if pool is not None else set()
        box = sandboxes.spawn_call(
            spec, BOOT_TARGET, ["dorm-boot"], dict(BOOT_ENV), stdout_fd=ctl_fd, stderr_fd=ctl_fd
        )
        if pool is not None:
            # A pre-forked child becomes the sandbox's pid 1: its pid says whether it was idle.
            self.count_spawn(pool, hit=box.pid in idle)
        now = time.monotonic()
        pidfd = os.pidfd_open(box.pid)
        cpu_ms = req.get("cpu_ms")
        run = Running(
            id=req["id"],
            box=box,
            pidfd=pidfd,
            started=now,
            deadline=now + float(req["wall_ms"]) / 1000,
            cpu_limit_us=None if cpu_ms is None else int(cpu_ms) * 1000,
            cpu_file=_cpu_file(box),
        )
        self.running[run.id] = run
        self.selector.register(pidfd, selectors.EVENT_READ, run)
        self.send({"ev": "spawned", "id": run.id, "pid": box.pid})

    def kill(self, run: Running, reason: str) -> None:
        if run.killed is None:
            run.killed = reason
        with contextlib.suppress(Exception):
            run.box.kill()

    def check_limits(self) -> None:
        now = time.monotonic()
        for run in list(self.running.values()):
            if run.killed is not None:
                continue
            if now >= run.deadline:
                self.kill(run, "wall")
            elif run.cpu_limit_us is not None and run.cpu_file is not None:
                used = _cpu_usage_us(run.cpu_file)
                if used is not None and used >= run.cpu_limit_us:
                    self.kill(run, "cpu")

    def reap(self, run: Running) -> None:
        try:
            pid, status = os.waitpid(run.box.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = run.box.pid, 0
        if pid == 0:
            return
        wall_us = int((time.monotonic() - run.started) * 1e6)
        self.selector.unregister(run.pidfd)
        os.close(run.pidfd)
        run.box.mark_reaped()
        stats: dict[str, Any] = {}
        oom = False
        try:
            run.box.cleanup()
            stats = run.box.stats()
            oom = run.box.oom_killed()
        except Exception as exc:
            print(f"runner spawner: cleanup of {run.id} failed: {exc}", file=sys.stderr, flush=True)
        del self.running[run.id]
        code = os.waitstatus_to_exitcode(status)
        self.send(
            {
                "ev": "exited",
                "id": run.id,
                "code": code if code >= 0 else None,
                "signal": -code if code < 0 else None,
                "killed": run.killed,
                "oom": oom,
                "cpu_us": stats.get("cpu_usage_usec"),
                "memory": stats.get("memory_peak"),
                "wall_us": wall_us,
            }
        )

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.ctl)
        for run in list(self.running.values()):
            self.kill(run, "shutdown")
        POOL.clear()


def main() -> None:
    ctl = socket.socket(fileno=int(sys.argv[1]))
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        raise SystemExit("runner spawner: the service is already gone")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = json.loads(ctl.recv(MAX_MESSAGE))
    found = sandboxes.cleanup_stale(settings["cgroup_parent"])
    if found:
        print(f"runner spawner: removed {found} stale sandboxes", file=sys.stderr, flush=True)
    Spawner(ctl, settings).serve()
    # Every sandbox is reaped and the pool dismissed: leave no empty cgroup directories behind.
    with contextlib.suppress(Exception):
        sandboxes.cgroups.detect().remove_parent(settings["cgroup_parent"])


if __name__ == "__main__":
    main()
