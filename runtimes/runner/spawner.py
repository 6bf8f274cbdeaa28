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
CPU-time polls (cgroup usage, every ``CPU_POLL`` seconds), and topping up the pre-forked pool
whenever nothing else is pending. Exits are reported with the cgroup's final counters.

Protocol (SOCK_SEQPACKET, one JSON object per message): the service sends ``settings`` first, then
``spawn`` (with the sandbox's control socket attached) and ``kill``; the spawner answers ``ready``,
``spawned``, ``failed`` and ``exited``.
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
from dataclasses import dataclass
from typing import Any

# The init every sandbox runs; imported here so pre-forked children already have it.
import runtimes.runner.boot  # noqa: F401  (preloaded for spawn_call)
import sandboxes
import sandboxes.cgroups
from sandboxes import Rlimits, SandboxSpec
from sandboxes.prefork import POOL
from sandboxes.spawn import _mount_plan

BOOT_TARGET = "runtimes.runner.boot:main"
CPU_POLL = 0.02
MAX_MESSAGE = 65536
PR_SET_PDEATHSIG = 1
BOOT_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"}


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
        self.prewarm_count: int = int(settings["prewarm"])
        self.template = self._spec({"id": "warm", "uid": int(settings["uid"]), **settings["warm"]})
        # The pool is keyed by the filesystem layout; sandboxes only reuse it for its count.
        self.layout = _mount_plan(self.template, False)
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
            if not events and not self.stopping:
                self.top_up()

    def _timeout(self) -> float | None:
        if not self.stopping and POOL.available(*self._pool_key()) < self.prewarm_count:
            return 0.0
        if not self.running:
            return None
        now = time.monotonic()
        soonest = min(r.deadline for r in self.running.values()) - now
        if any(r.cpu_limit_us is not None and r.killed is None for r in self.running.values()):
            soonest = min(soonest, CPU_POLL)
        return max(0.0, soonest)

    def _pool_key(self) -> tuple[Any, str]:
        return self.layout, self.cgroup_parent

    def top_up(self) -> None:
        """Pre-fork one idle child when nothing else is pending (each costs 1-20 ms)."""
        have = POOL.available(*self._pool_key())
        if have >= self.prewarm_count:
            return
        # Tell the service we are blocked for a while, so it sends work to another spawner.
        self.send({"ev": "busy", "busy": True})
        try:
            sandboxes.prewarm(self.template, have + 1)
        except Exception as exc:  # a failed prewarm only makes the next spawn slower
            print(f"runner spawner: prewarm failed: {exc}", file=sys.stderr, flush=True)
            self.prewarm_count = 0
        self.send({"ev": "busy", "busy": False})

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
        elif op == "stop":
            self.stop()

    def spawn(self, req: dict[str, Any], ctl_fd: int) -> None:
        spec = self._spec(req)
        box = sandboxes.spawn_call(
            spec, BOOT_TARGET, ["dorm-boot"], dict(BOOT_ENV), stdout_fd=ctl_fd, stderr_fd=ctl_fd
        )
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
