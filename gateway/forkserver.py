"""The fork server: the only process that forks tenant instances.

Why a separate process: the gateway runs an event loop and helper threads, and fork() from a
threaded process can deadlock the child on a lock some other thread held. This process is started
once at boot, is single-threaded, holds no secrets (its environment is scrubbed), and does three
things in one epoll loop:
  1. spawns instances on request: confined by `sandboxes` (namespaces, cgroups, uid, seccomp…)
     or, in development, as plain processes; by exec, or in zygote mode by calling preloaded code;
  2. pumps each instance's stdout+stderr into its size-rotated log file;
  3. notices exits through one pidfd per instance (never waitpid(-1), which would also reap the
     sandbox pool's idle children) and reports how each ended (code, signal, OOM);
  4. keeps warm pools per recent sandbox shape, sized between [pool] min_idle and max_idle by
     recent misses, and answers `pools` queries about them. Pools of the python runtimes hold
     *serving members*: zygote children already fully confined (own uid from the pool's uid
     range, no capabilities, seccomp) and already running granian on a hidden socket name; a
     claim attaches the tenant's dirs from outside (sandboxes.attach) and hands the member its
     environment and log fd (runtimes/python.py `member_main`). Other shapes hold half-confined
     pre-forked children (sandboxes/prefork.py) that finish confinement at the spawn.
It talks to the gateway over one Unix stream socket with length-prefixed JSON frames. When the
gateway goes away (EOF), it kills every instance and exits, so nothing outlives the gateway.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import gc
import importlib
import itertools
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import orjson

from gateway.logs import RotatingLog
from runtimes.sizing import PoolSizing

FRAME = struct.Struct("!I")
MAX_FRAME = 4 * 1024 * 1024
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_SIGNALS = {s.value for s in signal.Signals}
# Modules imported before any fork, so zygote-mode children start with them loaded (and share
# their pages with the fork server): the python runtimes pull in granian and uvloop.
PRELOAD = ("runtimes.python",)
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"  # for a spawn whose environment has no PATH
# Spawns calling MEMBER_CALL can be served by claiming a serving member (MEMBER_TARGET running).
MEMBER_CALL = "runtimes.python:main"
MEMBER_TARGET = "runtimes.python:member_main"
SERVING_RUNTIMES = frozenset({"python-asgi", "python-wsgi"})
# SandboxSpec fields that belong to one tenant: set at the claim, never part of a pool's shape.
TENANT_FIELDS = frozenset(
    {"name", "uid", "gid", "socket_dir", "app_dir", "data_dir", "data_idmap", "hostname"}
)
MEMBER_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"}


def encode_frame(message: dict[str, Any]) -> bytes:
    body = orjson.dumps(message)
    return FRAME.pack(len(body)) + body


@dataclass
class Child:
    """One running instance as the fork server sees it."""

    id: str
    pid: int
    pidfd: int
    run_dir: Path
    log: RotatingLog
    log_fd: int
    sandbox: Any = None  # sandboxes.Sandbox when confined
    exit_status: int | None = None
    timing: dict[str, Any] = field(default_factory=dict)  # how the start went (see `spawn`)
    pending: bytearray = field(default_factory=bytearray)
    member: Member | None = None  # the claimed pool member this instance is (its uid, its dir)


@dataclass
class Build:
    """A serving member on its way, driven by the main loop (its socket is in the selector):
    first the pre-forked child joins its cgroup and namespaces (`idle`), then it confines itself
    (`pending`). Neither step needs the fork server, so it keeps serving meanwhile."""

    shape: Shape
    uid: int
    socket_dir: Path
    spec: Any
    channel: socket.socket  # our end of the member's claim channel
    their_end: socket.socket | None  # its fd 0 once confining; closed after the plan went out
    idle: Any  # sandboxes.prefork.Idle
    pending: Any = None  # sandboxes.spawn.PendingSandbox once the plan went out
    watched: socket.socket | None = None  # what the selector watches for it right now
    started: float = field(default_factory=time.monotonic)


@dataclass
class Member:
    """A serving pool member: confined, granian listening on its hidden socket, no tenant yet."""

    pid: int
    pidfd: int  # watched while idle, so a member that dies is replaced at once
    uid: int  # from the pool's own uid range; returned when the process is gone
    sandbox: Any
    channel: socket.socket  # its fd 0: the claim goes here
    socket_dir: Path  # the host dir it sees as /run/dorm
    names: tuple[int, ...] = ()  # write fds of its /etc/hostname and /etc/hosts, for the claim


MAX_SHAPES = 8  # sandbox shapes (layout and limits) with a pool; the least recent is dropped
MAINTAIN_EVERY = 0.5  # seconds between checks for dead idle members and quiet pools
REFILL_GRACE = 0.02  # seconds after a spawn before refilling pools that still have members
BUILD_BACKOFF = 1.0  # seconds without new builds after one failed
BUILD_TIMEOUT = 30.0  # a member build that has not finished by then is abandoned


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """[pool] as the fork server applies it (gateway/config.py documents the keys)."""

    min_idle: int = 0
    max_idle: int = 0
    refill_concurrency: int = 2
    shrink_after: float = 30.0
    member_uids: tuple[int, int] = (0, -1)  # first, last: uids for serving members (none: off)
    member_dir: str = ""  # where serving members' socket dirs live (the gateway's run dir/pool)


@dataclass
class Shape(PoolSizing):
    """A pool: idle pre-confined children for one sandbox shape, and its accounting.

    `target` is how many idle members the refill loop aims for: `min_idle` at rest, raised by
    one per miss up to `max_idle` (a burst asks for more than the pool held, so the next one
    probably will too) and lowered back after `shrink_after` seconds without a miss.
    """

    spec: Any
    runtime: str
    serving: bool = False  # members are serving members (see `Member`), not prefork children
    members: set[int] = field(default_factory=set)  # pids built for this pool, maybe claimed
    idle: list[Member] = field(default_factory=list)  # serving members waiting for a claim


class ForkServer:
    def __init__(
        self,
        control: socket.socket,
        pool: PoolConfig | None = None,
        env_channel: socket.socket | None = None,
    ) -> None:
        self.control = control
        # Tenants' environments arrive here as memfds (one message per spawn, sent just before
        # its frame), never as bytes: see `_receive_env`.
        self.env_channel = env_channel
        if env_channel is not None:
            env_channel.settimeout(5.0)
        # Idle pre-confined children per recent sandbox shape, built while nothing else is
        # asked of us: a spawn that finds one skips the namespace/cgroup set-up (~5 vs ~20 ms).
        self.pool = pool or PoolConfig()
        self.overrides: dict[str, tuple[int, int]] = {}  # runtime → (min_idle, max_idle)
        self.shapes: dict[tuple[Any, ...], Shape] = {}
        self.refill_pending = False
        self.last_maintain = 0.0
        self.last_spawn = 0.0
        self.builds: list[Build] = []  # serving members on their way (see `advance_build`)
        # Claimed members whose "live" word is read when convenient, not on its wake-up: the
        # gateway watches their sockets itself (see `member_live`).
        self.unheard: list[Child] = []
        self.build_failed_at = -BUILD_BACKOFF
        self.control.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.children: dict[str, Child] = {}
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.running = True
        self.sig_r, self.sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.sig_w)
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the gateway, which tells us
        self.selector.register(self.control, selectors.EVENT_READ, "control")
        self.selector.register(self.sig_r, selectors.EVENT_READ, "signal")
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.sandboxes: Any = None  # the module, imported on first sandboxed spawn
        self._idmap: Any = None  # sandboxes.idmap, imported with it
        # Per filesystem (st_dev) of /data volumes: None if they are attached idmapped, else
        # why not (they are chowned per start then). Probed at the first volume on each.
        self.volume_modes: dict[int, str | None] = {}
        self._claim = (0.0, False)  # the last spawn's claim-or-fork seconds, and pool hit
        first, last = self.pool.member_uids
        self.member_uids: deque[int] = deque(range(first, last + 1))  # free ones
        self.has_member_uids = last >= first  # configured at all (the free ones come and go)
        self.member_dir = Path(self.pool.member_dir) if self.pool.member_dir else None
        self._member_ids = itertools.count(1)
        if self.member_dir is not None:  # ours alone: whatever a previous run left is stale
            remove_tree(self.member_dir)

    # -- main loop ------------------------------------------------------------------------------
    def serve(self) -> None:
        while self.running or self.children:
            wait = MAINTAIN_EVERY
            if self.can_refill():
                wait = max(0.0, self.last_spawn + self.refill_grace() - time.monotonic())
            ready = self.selector.select(timeout=wait)
            if self.shapes and time.monotonic() - self.last_maintain >= MAINTAIN_EVERY:
                self.maintain()
            due = time.monotonic() >= self.last_spawn + self.refill_grace()
            if not ready and due and self.can_refill():
                self.refill_pending = self.refill()
            for key, events in ready:
                data = key.data
                if data == "control":
                    if events & selectors.EVENT_READ:
                        self.read_control()
                    if events & selectors.EVENT_WRITE:
                        self.flush()
                elif data == "signal":
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.sig_r, 4096)
                elif isinstance(data, Member):  # an idle serving member died
                    self.member_died(data)
                elif isinstance(data, Build):
                    self.advance_build(data)
                elif isinstance(data, tuple) and data[0] == "live":
                    self.member_live(data[1])
                elif isinstance(data, tuple):  # ("exit", child): its pidfd became readable
                    self.reap(data[1])
                else:
                    self.pump_log(data)
        if self.sandboxes is not None:
            # Idle pre-confined children are ours too: dismiss them and remove their cgroups.
            importlib.import_module("sandboxes.prefork").POOL.clear()
            for build in list(self.builds):
                self._abandon_build(build)
            for shape in self.shapes.values():
                self._dismiss(shape, 0)

    def stop(self) -> None:
        """Kill every instance; the loop ends once all are reaped."""
        self.running = False
        for child in list(self.children.values()):
            self.kill(child, signal.SIGKILL)

    # -- control channel ----------------------------------------------------------------------
    def read_control(self) -> None:
        try:
            data = self.control.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(self.control)
            self.stop()
            return
        self.inbuf += data
        while len(self.inbuf) >= FRAME.size:
            (size,) = FRAME.unpack_from(self.inbuf)
            if size > MAX_FRAME:
                raise SystemExit("fork server: oversized control frame")
            if len(self.inbuf) < FRAME.size + size:
                break
            message = orjson.loads(bytes(self.inbuf[FRAME.size : FRAME.size + size]))
            del self.inbuf[: FRAME.size + size]
            self.handle(message)

    def send(self, message: dict[str, Any]) -> None:
        if self.control.fileno() < 0:
            return
        self.outbuf += encode_frame(message)
        self.flush()

    def flush(self) -> None:
        try:
            sent = self.control.send(self.outbuf)
            del self.outbuf[:sent]
        except BlockingIOError:
            pass
        except OSError:
            self.outbuf.clear()
        with contextlib.suppress(KeyError, ValueError):
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbuf else 0)
            self.selector.modify(self.control, events, "control")

    def handle(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "spawn":
            message["env_fd"] = -1
            try:
                if message.get("env_memfd"):
                    message["env_fd"] = self._receive_env(message["id"])
                self.spawn(message)  # says "spawned" itself, as early as it can
            except Exception as exc:  # any failure is reported, never fatal to the server
                self.send({"ev": "spawn_failed", "id": message["id"], "error": str(exc)})
            finally:
                if message["env_fd"] >= 0:
                    os.close(message["env_fd"])
        elif op == "signal":
            found = self.children.get(message["id"])
            if found is not None:
                self.kill(found, int(message["sig"]))
        elif op == "note":
            # A line from the gateway for the instance's log (its "ready in" breakdown): the
            # fork server is the log's only writer, so rotation never races.
            noted = self.children.get(message["id"])
            if noted is not None and noted.log_fd >= 0:
                noted.log.write(f"[dorm] {message['text'][:500]}\n".encode())
        elif op == "pools":
            self.send({"ev": "pools", "id": message["id"], **self.pool_state()})
        elif op == "pool_config":
            self.configure(message)
        elif op == "warm":
            # A shape remembered by the gateway across a restart of this process: refill its
            # pool before the next request needs it.
            with contextlib.suppress(Exception):
                # Only the shape matters: no tenant paths beyond what spawned it last time.
                message["sandbox"] = {**message["sandbox"], "data_dir": None, "app_dir": None}
                spec = self._sandbox_spec(message, Path(message["socket_dir"]))
                if message.get("pool"):
                    self.remember_shape(spec, message["pool"])
        elif op == "shutdown":
            self.stop()

    # -- spawning -----------------------------------------------------------------------------
    def _receive_env(self, instance_id: str) -> int:
        """The memfd holding the tenant's environment for the spawn of `instance_id`.

        This process never reads it: every zygote child and pool member is a fork of this
        process and inherits its memory, freed memory included, so an environment parsed here
        (tenant A's database password) would be readable by every tenant forked after it. The
        fd goes on to the one process that needs the contents: the tenant's own (a zygote child
        or a claimed member reads it before running tenant code) or the C launcher."""
        if self.env_channel is None:
            raise RuntimeError("no environment channel to receive the environment on")
        msg, fds, _flags, _addr = socket.recv_fds(self.env_channel, 256, 1)
        if msg != instance_id.encode() or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise RuntimeError(f"environment for {instance_id} out of step (got {msg[:40]!r})")
        return fds[0]

    def _env(self, req: dict[str, Any]) -> Any:
        """What the sandboxes package takes as the environment: the request's memfd, if any."""
        if req["env_fd"] >= 0:
            return self.sandboxes.EnvFile(req["env_fd"], req.get("path") or DEFAULT_PATH)
        return req["env"]

    def spawn(self, req: dict[str, Any]) -> Child:
        instance_id: str = req["id"]
        if instance_id in self.children:
            raise RuntimeError(f"instance {instance_id} is already running")
        run_dir = Path(req["run_dir"])
        _remove_run_dir(run_dir)  # a stale socket would fake readiness
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        # The log file is opened once the tenant runs (its output waits in the pipe): for a pool
        # claim that is one file open fewer before the member hears of its tenant.
        log_r, log_w = os.pipe2(os.O_CLOEXEC)
        began = time.perf_counter()
        self._claim = (0.0, False)
        member: Member | None = None
        try:
            if req.get("sandbox") is not None:
                sandbox, member = self._spawn_sandboxed(req, run_dir, log_w)
                pid = sandbox.pid
            else:
                run_dir.mkdir(mode=0o700)
                pid, sandbox = self._spawn_process(req, run_dir, log_w), None
            if member is not None:  # watched since it was built: the same pidfd, now the child's
                pidfd, member.pidfd = member.pidfd, -1
            else:
                pidfd = os.pidfd_open(pid)
        except BaseException as exc:
            os.close(log_r)
            _remove_run_dir(run_dir)
            log = _open_log(req)
            log.write(f"[dorm] failed to start: {exc}\n".encode())
            log.close()
            raise
        finally:
            os.close(log_w)
        elapsed = (time.perf_counter() - began) * 1000
        self.last_spawn = time.monotonic()
        claim_ms = self._claim[0] * 1000
        # Which path served the start: a serving pool member (pool), a fork of this process
        # made for the request (zygote, maybe from a half-confined pre-forked child), or a new
        # interpreter (fresh: exec).
        path = "pool" if member is not None else ("zygote" if req.get("call") else "fresh")
        timing: dict[str, Any] = {
            "path": path,
            "claim_ms": round(claim_ms, 3),
            "confine_ms": round(max(0.0, elapsed - claim_ms), 3),
        }
        if member is not None:
            timing["uid"] = member.uid
        said: dict[str, Any] = {"ev": "spawned", "id": instance_id, "pid": pid, **timing}
        if req.get("netns") and self._send_netns(instance_id, pid):
            said["netns"] = True
        # Told before the bookkeeping below: the gateway's readiness probe (and a claimed
        # member's import) run meanwhile. Nothing after this point can fail the start.
        self.send(said)
        log = _open_log(req)
        fcntl.fcntl(log_r, fcntl.F_SETFL, os.O_NONBLOCK)
        child = Child(instance_id, pid, pidfd, run_dir, log, log_r, sandbox, timing=timing)
        child.member = member
        if member is not None:  # it says when it is live (see `member_live`)
            if req.get("watched"):
                self.unheard.append(child)
            else:
                self.selector.register(member.channel, selectors.EVENT_READ, ("live", child))
        self.children[instance_id] = child
        self.selector.register(log_r, selectors.EVENT_READ, child)
        self.selector.register(pidfd, selectors.EVENT_READ, ("exit", child))
        how = "sandboxed" if sandbox is not None else "unconfined"
        what = req.get("call") or " ".join(req["argv"])
        log.write(f"[dorm] started pid {pid} ({how}, {path}): {what[:500]}\n".encode())
        return child

    def _send_netns(self, instance_id: str, pid: int) -> bool:
        """Pass the instance's network namespace to the gateway, over the environment channel
        and before "spawned" (which says it was sent), for an app it reaches on TCP inside it.
        Opened here, by pid, without a race: this process is the instance's parent and reaps it
        only in its own loop, so the pid is the instance's until then. False if it could not be
        sent (the gateway then kills the instance: it would be unreachable)."""
        if self.env_channel is None:
            return False
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            _say(f"cannot open the network namespace of {instance_id}: {exc}")
            return False
        try:
            socket.send_fds(self.env_channel, [instance_id.encode()], [fd])
        except OSError as exc:
            _say(f"cannot pass the network namespace of {instance_id}: {exc}")
            return False
        finally:
            os.close(fd)
        return True

    def _spawn_sandboxed(
        self, req: dict[str, Any], run_dir: Path, log_w: int
    ) -> tuple[Any, Member | None]:
        """Claim a serving member, or confine per the request's sandbox spec (see the sandboxes
        package for the steps). Returns the sandbox, and the member if one was claimed."""
        data_dir = req["sandbox"].get("data_dir")
        if data_dir is not None:  # it must exist for the spec; its owner depends on the path
            os.makedirs(data_dir, mode=0o700, exist_ok=True)
        # The socket dir the gateway will connect in: a claimed member's, or a new one.
        spec = self._sandbox_spec(req, run_dir.parent)
        pool = req.get("pool")  # None: this runtime is not pooled
        shape = self.remember_shape(spec, pool) if pool else None
        call = req.get("call")
        if shape is not None and shape.serving and call == MEMBER_CALL:
            began = time.perf_counter()
            member = self._claim_member(shape, spec, req, run_dir, log_w)
            self._claim = (time.perf_counter() - began, member is not None)
            self.count_claim(shape, hit=member is not None)
            if member is not None:
                return member.sandbox, member
            shape = None  # counted: the fallback below must not count again
        run_dir.mkdir(mode=0o700)
        spec = dataclasses.replace(spec, socket_dir=str(run_dir))
        if data_dir is not None:
            idmapped = self._volume(data_dir, spec.uid, spec.effective_gid)
            spec = dataclasses.replace(spec, data_idmap=idmapped)
        sb = self.sandboxes
        sb.prepare_socket_dir(str(run_dir), spec.uid)
        if call is not None:
            sandbox = sb.spawn_call(
                spec, call, req["argv"], self._env(req), stdout_fd=log_w, stderr_fd=log_w
            )
        else:
            env = self._env(req)
            sandbox = sb.spawn(spec, req["argv"], env, stdout_fd=log_w, stderr_fd=log_w)
        if shape is not None:
            self.count_claim(shape, hit=self._claim[1])
        return sandbox, None

    # -- serving members ------------------------------------------------------------------------
    def _claim_member(
        self, shape: Shape, spec: Any, req: dict[str, Any], run_dir: Path, log_w: int
    ) -> Member | None:
        """Turn an idle serving member into this instance; None if there is none (or it failed:
        the caller falls back to a zygote fork, which serves the request a little later)."""
        while shape.idle:
            data_attrs = self._rw_attrs
            if spec.data_dir is not None:
                # Before a member is taken: a volume that cannot be made ready is not the
                # member's fault, so the start fails with the reason (the zygote path would too)
                # and the pool keeps its members.
                uid = shape.idle[-1].uid
                if self._volume(spec.data_dir, uid, uid):
                    data_attrs |= self._idmap_attr
            member = shape.idle.pop()
            self.selector.unregister(member.pidfd)  # its exit is the instance's now
            try:
                binds = []
                if spec.app_dir is not None:
                    binds.append((spec.app_dir.encode(), b"/app", self._ro_attrs))
                if spec.data_dir is not None:
                    binds.append((spec.data_dir.encode(), b"/data", data_attrs))
                ids = (member.uid, member.uid)
                self._fill_name_files(member.names, spec.hostname)  # before it can read them
                self.sandboxes.attach(member.pid, binds, spec.hostname.encode(), ids)
                # "watched": the gateway sees the member go live by itself (inotify), so the
                # member's own word can wait until its first response is out.
                told: dict[str, Any] = {"argv": req["argv"], "watched": bool(req.get("watched"))}
                if req["env_fd"] >= 0:  # the member reads it: see `_receive_env`
                    claim = orjson.dumps(told)
                    socket.send_fds(member.channel, [claim], [log_w, req["env_fd"]])
                else:
                    claim = orjson.dumps({**told, "env": req["env"]})
                    socket.send_fds(member.channel, [claim], [log_w])
                member.channel.setblocking(False)
                # The gateway connects to <run_dir>/http.sock, the member's socket dir, once it
                # hears "spawned": linked after the member was told, which is what it waits on.
                os.symlink(member.socket_dir, run_dir)
                self._close_names(member)  # after the member was told: off its wake-up path
            except Exception as exc:
                _say(f"claim failed: {exc}")
                self._discard_member(member)
                _remove_run_dir(run_dir)
                continue
            return member
        return None

    def _volume(self, data_dir: str, uid: int, gid: int) -> bool:
        """Make a persistent /data volume ready for an instance running as `uid`/`gid`; True:
        attach it idmapped (sandboxes/idmap.py), False: as it is.

        Idmapped (root, and the volume's filesystem supports it, probed once per filesystem): the
        volume is adopted by the storage owner the first time (a one-off chown of a volume of the
        older scheme) and never chowned again, so a big volume no longer stalls every start.
        Otherwise (rootless mode, whose single mapped uid owns everything anyway; or no support,
        said once per filesystem) the tree is chowned to the instance's uid whenever it changed."""
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            # The tenant may open its volume's root to others, and leave setuid files in it
            # (setuid to the storage owner on disk, which owns every volume): no other host user
            # may reach them, so the volume's parent (<data_dir>/volumes/<app>, ours) is 0700.
            parent = os.path.dirname(data_dir)
            st = os.stat(parent)
            if st.st_uid == 0 and st.st_mode & 0o077:
                os.chmod(parent, stat.S_IMODE(st.st_mode) & 0o700)
            idmap = self._idmap
            if uid == idmap.STORAGE_UID or gid == idmap.STORAGE_GID:
                raise RuntimeError(
                    f"instance uid/gid {uid}/{gid} is the volume storage owner "
                    f"({idmap.STORAGE_UID}): use a uid_range without it"
                )
            dev = os.stat(data_dir).st_dev
            if dev not in self.volume_modes:
                reason = idmap.probe(data_dir, uid, gid)
                self.volume_modes[dev] = reason
                _say(
                    f"/data volumes on {idmap.fstype(data_dir)} (like {data_dir}) are attached "
                    f"idmapped: files stay owned by {idmap.STORAGE_UID} on disk"
                    if reason is None
                    else f"/data volumes cannot be idmapped ({reason}): each start chowns the "
                    "volume to the instance's uid instead"
                )
            if self.volume_modes[dev] is None:
                changed = idmap.adopt(data_dir)
                if changed > 1:  # a volume of the older scheme (not just a new, empty one)
                    _say(f"volume {data_dir} now owned by {idmap.STORAGE_UID} ({changed} chowned)")
                return True
        _own_tree(data_dir, uid)
        return False

    def _start_build(self, shape: Shape) -> None:
        """Begin one serving member for `shape`; `advance_build` takes it from there."""
        assert self.member_dir is not None
        if not self.member_uids:
            raise OSError(errno.EAGAIN, "the pool's uid range is exhausted")
        uid = self.member_uids.popleft()
        n = next(self._member_ids)
        if None in self.volume_modes.values():  # volumes are idmapped: not on the claim's time
            with contextlib.suppress(OSError):
                self._idmap.prepare(uid, uid)
        socket_dir = self.member_dir / f"m{n}"
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            remove_tree(socket_dir)
            self.sandboxes.prepare_socket_dir(str(socket_dir), uid)
            spec = dataclasses.replace(
                shape.spec,
                name=f"member-{n}",
                uid=uid,
                gid=None,
                app_dir=None,
                data_dir=None,
                hostname="dorm",
                named_at_claim=True,
                socket_dir=str(socket_dir),
            )
            idle = self.sandboxes.prefork_for(spec)
        except BaseException:
            ours.close()
            theirs.close()
            remove_tree(socket_dir)
            self._free_member_uid(uid)
            raise
        build = Build(shape, uid, socket_dir, spec, ours, theirs, idle)
        self.builds.append(build)
        self._watch(build, idle.sock)

    def _watch(self, build: Build, sock: socket.socket | None) -> None:
        """Point the selector at `sock` for this build (None: at nothing). Always unregistered
        before anything can close it, so the selector never keeps a stale fd."""
        if build.watched is not None:
            self.selector.unregister(build.watched)
        build.watched = sock
        if sock is not None:
            self.selector.register(sock, selectors.EVENT_READ, build)

    def advance_build(self, build: Build) -> None:
        """The build's child spoke: it is ready for its plan, or confined (or it failed)."""
        self._watch(build, None)
        try:
            if build.pending is None:
                build.idle.complete_ready()
                build.pending = self.sandboxes.start_call(
                    build.spec,
                    MEMBER_TARGET,
                    ["dorm-member"],
                    {**MEMBER_ENV, "DORM_SOCKET": "/run/dorm/http.sock"},
                    stdout_fd=self.devnull,
                    stderr_fd=self.devnull,
                    stdin_fd=build.their_end.fileno() if build.their_end else None,
                    idle=build.idle,
                )
                build.idle = None  # its socket is the pending sandbox's report channel now
                if build.their_end is not None:
                    build.their_end.close()
                    build.their_end = None
                self._watch(build, build.pending.report)
                return
            sandbox = build.pending.finish()
            build.pending = None
        except Exception as exc:  # a failed build only costs the next spawn time
            _say(f"member failed: {exc}")
            self._abandon_build(build)
            self.build_failed_at = time.monotonic()
            return
        self.builds.remove(build)
        member = Member(
            sandbox.pid,
            os.pidfd_open(sandbox.pid),
            build.uid,
            sandbox,
            build.channel,
            build.socket_dir,
        )
        try:
            member.names = self._create_name_files(str(build.socket_dir))
        except OSError as exc:
            _say(f"member failed: {exc}")
            self._discard_member(member)
            self.build_failed_at = time.monotonic()
            return
        self.selector.register(member.pidfd, selectors.EVENT_READ, member)
        shape = build.shape
        shape.idle.insert(0, member)  # claims take the most recently built last
        shape.count_built(1, time.monotonic())
        self.refill_pending = True
        if self.shapes.get(self._shape_key(shape.spec, shape.runtime)) is not shape:
            self._dismiss(shape, 0)  # its shape was dropped while it was being built

    def _abandon_build(self, build: Build) -> None:
        """Undo a build at any stage: kill its child, return its uid, remove its dir."""
        with contextlib.suppress(ValueError):
            self.builds.remove(build)
        self._watch(build, None)
        if build.pending is not None:
            build.pending.abandon()
        elif build.idle is not None:
            build.idle.discard()
        build.channel.close()
        if build.their_end is not None:
            build.their_end.close()
        remove_tree(build.socket_dir)
        self._free_member_uid(build.uid)

    def member_live(self, child: Child, *, watched: bool = False, final: bool = False) -> bool:
        """A claimed member's channel spoke (its socket is live) or closed (it failed, or died):
        either way the channel is done; "live" is forwarded so the gateway connects at once.

        `watched`: the gateway sees the member go live by itself (inotify, gateway/launcher.py
        LiveWatch), so the channel is not in the selector: the member's word would wake this
        process, and it the gateway, just while the first request and response go through.
        It is read by `maintain` (every MAINTAIN_EVERY) or at the exit (`final`); it still
        carries the import time. Returns whether the channel is done."""
        assert child.member is not None
        channel = child.member.channel
        try:
            said = channel.recv(64)
        except BlockingIOError:
            if not final:
                return False
            said = b""
        except OSError:
            said = b""
        if not watched:
            self.selector.unregister(channel)
        channel.close()
        if said[:1] == b"L":  # "L<ms>": live, after loading the app for <ms>
            live: dict[str, Any] = {"ev": "live", "id": child.id}
            with contextlib.suppress(ValueError):
                live["import_ms"] = round(float(said[1:]), 3)
            self.send(live)
        return True

    def member_died(self, member: Member) -> None:
        """An idle serving member exited (OOM killer, operator): drop it; refill replaces it."""
        for shape in self.shapes.values():
            if member in shape.idle:
                shape.idle.remove(member)
        self._discard_member(member)
        self.refill_pending = True

    @staticmethod
    def _close_names(member: Member) -> None:
        for fd in member.names:
            os.close(fd)
        member.names = ()

    def _discard_member(self, member: Member) -> None:
        """Kill an unclaimed (or failed) member and release everything it held."""
        self._close_names(member)
        if member.pidfd >= 0:
            with contextlib.suppress(KeyError):  # not watched once a claim began
                self.selector.unregister(member.pidfd)
            os.close(member.pidfd)
            member.pidfd = -1
        member.channel.close()
        member.sandbox.kill()
        with contextlib.suppress(ChildProcessError, TimeoutError):
            member.sandbox.wait(5)
        with contextlib.suppress(Exception):
            member.sandbox.cleanup()
        self._release_member(member)

    def _release_member(self, member: Member) -> None:
        """Its processes are gone: its socket dir goes, its uid can be handed out again."""
        remove_tree(member.socket_dir)
        self._free_member_uid(member.uid)

    def _free_member_uid(self, uid: int) -> None:
        """The uid can be handed out again; the volume namespace cached for it goes with it."""
        self.member_uids.append(uid)
        if self._idmap is not None:
            self._idmap.forget(uid, uid)

    def _sandbox_spec(self, req: dict[str, Any], socket_dir: Path) -> Any:
        if self.sandboxes is None:
            self.sandboxes = importlib.import_module("sandboxes")
            mounts = importlib.import_module("sandboxes.mounts")
            self._ro_attrs, self._rw_attrs = mounts.RO_ATTRS, mounts.RW_ATTRS
            self._create_name_files = mounts.create_name_files
            self._fill_name_files = mounts.fill_name_files
            self._idmap = importlib.import_module("sandboxes.idmap")
            self._idmap_attr = importlib.import_module("sandboxes.libc").MOUNT_ATTR_IDMAP
            self._time_claims()
        fields = dict(req["sandbox"])
        fields["extra_ro_binds"] = tuple(fields.get("extra_ro_binds", ()))
        return self.sandboxes.SandboxSpec(socket_dir=str(socket_dir), **fields)

    def _spawn_process(self, req: dict[str, Any], run_dir: Path, log_w: int) -> int:
        """Development isolation: a plain child process in its own session, as the gateway's uid."""
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            forking = time.perf_counter()
            pid = os.fork()
            if pid != 0:
                self._claim = (time.perf_counter() - forking, False)
            if pid == 0:  # child: never returns
                self._exec_child(
                    req["argv"],
                    req["env"] if req["env_fd"] < 0 else req["env_fd"],
                    req["cwd"] or str(run_dir),
                    log_w,
                    err_w,
                    req.get("call"),
                )
            os.close(err_w)
            failure = _read_all(err_r)
        finally:
            os.close(err_r)
            with contextlib.suppress(OSError):
                os.close(err_w)
        if failure:
            os.waitpid(pid, 0)
            raise RuntimeError(failure.decode("utf-8", "replace"))
        return pid

    def _exec_child(
        self,
        argv: list[str],
        env: dict[str, str] | int,
        cwd: str,
        out: int,
        err: int,
        call: str | None,
    ) -> None:
        """Runs in the forked child: detach, wire stdio, then exec `argv` or call `call`.

        Failures before the tenant's code runs are reported on `err` (a CLOEXEC pipe the parent
        reads until EOF): exec closes it; in zygote mode (`call`), it is closed explicitly.
        """
        step = "setsid"
        try:
            environ: dict[str, str] = {}
            if isinstance(env, int):  # a memfd, read only here, in the tenant's own process
                step = "environment"
                environ = importlib.import_module("runtimes.python").read_env(env)
                step = "setsid"
            else:
                environ = env
            os.setsid()
            step = "pdeathsig"
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            step = "stdio"
            os.dup2(self.devnull, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
                signal.signal(sig, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            step = "close fds"
            os.closerange(3, err)
            os.closerange(err + 1, 0x7FFFFFFF)
            step = f"chdir {cwd}"
            os.chdir(cwd)
            if call is not None:
                step = f"call {call}"
                _call_in_child(_resolve(call), argv, environ, err)
            step = f"exec {argv[0]}"
            os.execvpe(argv[0], argv, environ)
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                os.write(err, f"{step}: {detail}".encode())
        finally:
            os._exit(127)

    def _time_claims(self) -> None:
        """Time the sandbox pool's `take` (and note whether it found an idle child).

        `sandboxes.spawn_call` takes a child and confines it in one call; wrapping the pool's
        `take` on our own instance splits that call into "claim or fork" and "confinement"
        without the sandboxes package knowing anything about timing.
        """
        pool = importlib.import_module("sandboxes.prefork").POOL
        take = pool.take

        def timed_take(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            before = set(pool.idle_pids())
            idle = take(*args, **kwargs)
            self._claim = (time.perf_counter() - began, idle.pid in before)
            return idle

        pool.take = timed_take

    # -- warm pools -----------------------------------------------------------------------------
    def _limits_for(self, runtime: str) -> tuple[int, int]:
        low, high = self.overrides.get(runtime, (self.pool.min_idle, self.pool.max_idle))
        return low, max(low, high)

    def remember_shape(self, spec: Any, runtime: str = "?") -> Shape | None:
        """Note a sandbox's shape (layout and limits), most recent last, at most MAX_SHAPES."""
        low, high = self._limits_for(runtime)
        if high <= 0:
            return None
        key = self._shape_key(spec, runtime)
        shape = self.shapes.pop(key, None)
        if shape is None:
            serving = (
                runtime in SERVING_RUNTIMES
                and self.member_dir is not None
                and self.has_member_uids
                and spec.network == "none"
                and spec.rootfs is None
            )
            shape = Shape(spec, runtime, serving, target=low)
        shape.spec, shape.runtime = spec, runtime
        self.shapes[key] = shape
        while len(self.shapes) > MAX_SHAPES:
            dropped = self.shapes.pop(next(iter(self.shapes)))
            self._dismiss(dropped, 0)
        self.refill_pending = True
        return shape

    @staticmethod
    def _shape_key(spec: Any, runtime: str) -> tuple[Any, ...]:
        """Every field of the spec but the tenant's own: members of a pool are built from the
        shape's spec and must differ from a tenant's sandbox only in what the claim sets. And
        the kind of member: a python runtime's pool holds serving members (granian, no app)
        and another runtime's half-confined ones, which a python start never claims, so a
        command app and a python app of the same layout and limits get a pool each (one key
        for both made the shape whichever kind came first, for good)."""
        fields = [f.name for f in dataclasses.fields(spec) if f.name not in TENANT_FIELDS]
        return (runtime in SERVING_RUNTIMES, *(getattr(spec, name) for name in fields))

    def count_claim(self, shape: Shape, *, hit: bool) -> None:
        """Account a spawn: a claim, or a miss that grows the pool's target (reactive prewarm)."""
        high = self._limits_for(shape.runtime)[1]
        shape.count_spawn(hit=hit, max_idle=high, now=time.monotonic())
        if not hit:
            self.refill_pending = True

    def idle_members(self, shape: Shape) -> list[int]:
        """The pool's members still idle (claimed or dead ones drop out of `members`)."""
        if shape.serving:
            return sorted(m.pid for m in shape.idle)
        idle = set(importlib.import_module("sandboxes.prefork").POOL.idle_pids())
        shape.members &= idle
        return sorted(shape.members)

    def refill_grace(self) -> float:
        """How long after a spawn to hold back refills: building a member costs both CPUs of a
        small host for a few ms, exactly when the instance just started answers its first
        request. Not when a serving pool is empty, though: the next claim would miss."""
        if any(shape.serving and not shape.idle for shape in self.shapes.values()):
            return 0.0
        return REFILL_GRACE

    def refill(self) -> bool:
        """Build up to `refill_concurrency` members for pools below their target; a spawn
        request waits for at most that many builds. Returns whether more are needed."""
        pool = importlib.import_module("sandboxes.prefork").POOL
        budget = max(1, self.pool.refill_concurrency)
        more = False
        budget -= len(self.builds)  # serving members still on their way count too
        for shape in reversed(list(self.shapes.values())):
            while shape.serving and len(shape.idle) + self._building(shape) < shape.target:
                if budget <= 0:
                    return True
                try:
                    self._start_build(shape)
                except Exception as exc:  # a failed build only costs the next spawn time
                    _say(f"member failed: {exc}")
                    self.build_failed_at = time.monotonic()
                    return False
                budget -= 1
            if shape.serving:
                continue
            while budget > 0 and len(self.idle_members(shape)) < shape.target:
                before = set(pool.idle_pids())
                try:
                    # `prewarm(spec, n)` builds until n children of this layout and these limits
                    # are idle: ask for one more than there are now.
                    have = len(self.idle_members(shape))
                    for wanted in range(have + 1, len(before) + 2):
                        if self.sandboxes.prewarm(shape.spec, wanted):
                            break
                except Exception as exc:  # a failed build only costs the next spawn time
                    _say(f"prewarm failed: {exc}")
                    return False
                new = set(pool.idle_pids()) - before
                if not new:
                    return False  # nothing can be built here (rootless): stop asking
                shape.members |= new
                shape.count_built(len(new), time.monotonic())
                budget -= 1
            if len(self.idle_members(shape)) < shape.target:
                more = True
        return more

    def _building(self, shape: Shape) -> int:
        return sum(1 for b in self.builds if b.shape is shape)

    def can_refill(self) -> bool:
        """Whether the main loop should call `refill` now (else it waits for an event)."""
        now = time.monotonic()
        if not self.refill_pending or not self.running:
            return False
        if now < self.build_failed_at + BUILD_BACKOFF:
            return False
        return len(self.builds) < max(1, self.pool.refill_concurrency)

    def maintain(self) -> None:
        """Replace idle members that died, and shrink pools that have been quiet long enough."""
        now = self.last_maintain = time.monotonic()
        for build in [b for b in self.builds if now - b.started > BUILD_TIMEOUT]:
            print("dorm fork server: member build timed out", file=sys.stderr, flush=True)
            self._abandon_build(build)
        self.unheard = [c for c in self.unheard if not self.member_live(c, watched=True)]
        pool = importlib.import_module("sandboxes.prefork").POOL
        if pool.reap_dead():
            self.refill_pending = True
        for shape in self.shapes.values():
            low = self._limits_for(shape.runtime)[0]
            if shape.age(now, low, self.pool.shrink_after):
                self._dismiss(shape, low)

    def _dismiss(self, shape: Shape, keep: int) -> None:
        """Kill idle members beyond `keep` (the most recently built stay)."""
        while len(shape.idle) > keep:
            self._discard_member(shape.idle.pop(0))
        pool = importlib.import_module("sandboxes.prefork").POOL
        idle = self.idle_members(shape)
        for pid in idle[: max(0, len(idle) - keep)]:
            pool.discard(pid)
            shape.members.discard(pid)

    def configure(self, message: dict[str, Any]) -> None:
        """Per-runtime bounds from the admin API; applied to that runtime's pools at once."""
        runtime = str(message["runtime"])
        low, high = int(message["min_idle"]), int(message["max_idle"])
        self.overrides[runtime] = (low, max(low, high))
        for shape in self.shapes.values():
            if shape.runtime == runtime:
                shape.target = min(max(shape.target, low), max(low, high))
                self._dismiss(shape, shape.target)
        self.refill_pending = True

    def pool_state(self) -> dict[str, Any]:
        pools = []
        for shape in reversed(list(self.shapes.values())):
            idle = self.idle_members(shape)
            low, high = self._limits_for(shape.runtime)
            spec = shape.spec
            pools.append(
                {
                    "runtime": shape.runtime,
                    "shape": {
                        "rootfs": spec.rootfs,
                        "network": spec.network,
                        "memory": spec.memory,
                        "cpu": spec.cpu,
                        "pids": spec.pids,
                    },
                    "idle": len(idle),
                    "idle_pids": idle,
                    "target": shape.target,
                    "peak_target": max(shape.peak, shape.target),
                    "min_idle": low,
                    "max_idle": high,
                    "claimed": shape.claimed,
                    "misses": shape.misses,
                    "forking": max(0, shape.target - len(idle)),
                    "built": shape.built,
                    "refill_rate": shape.refill_rate,
                }
            )
        return {
            "pools": pools,
            "config": {
                "min_idle": self.pool.min_idle,
                "max_idle": self.pool.max_idle,
                "refill_concurrency": self.pool.refill_concurrency,
                "shrink_after": self.pool.shrink_after,
                "overrides": {
                    k: {"min_idle": v[0], "max_idle": v[1]} for k, v in self.overrides.items()
                },
            },
        }

    # -- running children -----------------------------------------------------------------------
    def kill(self, child: Child, sig: int) -> None:
        """Signal an instance: its whole sandbox, or its process group."""
        if child.exit_status is not None:
            return
        if child.sandbox is not None:
            if sig == signal.SIGKILL or not _catches(child.pid, sig):
                # The tenant is pid 1 of its namespace: a signal it has no handler for is
                # dropped, so waiting a grace period for it to act on SIGTERM would be waiting
                # for nothing.
                child.sandbox.kill()
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, sig)
            return
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, sig)

    def pump_log(self, child: Child) -> None:
        try:
            data = os.read(child.log_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            child.log.write(data)
            return
        self.selector.unregister(child.log_fd)
        os.close(child.log_fd)
        child.log_fd = -1
        self.maybe_finish(child)

    def reap(self, child: Child) -> None:
        """The child's pidfd is readable: it exited; collect its status."""
        try:
            pid, status = os.waitpid(child.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = child.pid, 0
        if pid == 0:
            return
        self.selector.unregister(child.pidfd)
        os.close(child.pidfd)
        child.exit_status = status
        if child.sandbox is not None:
            child.sandbox.mark_reaped()
            child.sandbox.kill()  # anything it left behind in its cgroup
        else:
            # Orphans the instance left in its process group must not outlive it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        self.maybe_finish(child)

    def maybe_finish(self, child: Child) -> None:
        """Report an exit once the process is reaped and its log pipe is drained."""
        if child.exit_status is None:
            return
        if child.log_fd >= 0:
            # Drain what is buffered; leftovers holding the pipe were just killed, so EOF follows.
            self.pump_log(child)
            return
        code = os.waitstatus_to_exitcode(child.exit_status)
        oom = False
        if child.sandbox is not None:
            with contextlib.suppress(Exception):
                oom = bool(child.sandbox.oom_killed())
        info: dict[str, Any] = {"ev": "exited", "id": child.id, "pid": child.pid, "oom": oom}
        if code < 0:
            info.update(code=None, signal=-code)
            how = (
                f"killed by signal {signal.Signals(-code).name}" if -code in _SIGNALS else "killed"
            )
        else:
            info.update(code=code, signal=None)
            how = f"exited with code {code}"
        if oom:
            how += " (out of memory: the kernel killed it at its memory limit)"
        child.log.write(f"[dorm] pid {child.pid} {how}\n".encode())
        child.log.close()
        if child in self.unheard:  # its word (if it said it) before its exit
            self.unheard.remove(child)
            self.member_live(child, watched=True, final=True)
        del self.children[child.id]
        self.send(info)  # before the teardown: unmounting its tree waits for an RCU grace period
        if child.sandbox is not None:
            with contextlib.suppress(Exception):
                child.sandbox.cleanup()
        _remove_run_dir(child.run_dir)
        if child.member is not None:
            self._release_member(child.member)


def _open_log(req: dict[str, Any]) -> RotatingLog:
    return RotatingLog(Path(req["log_path"]), int(req["log_max_bytes"]), int(req["log_keep"]))


def _remove_run_dir(path: Path) -> None:
    """An instance's run dir: a directory, or a symlink to its claimed member's socket dir (which
    `remove_tree` removes as a name, never following it)."""
    remove_tree(path)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Remove `path` and everything under it: a directory a tenant could write to (its socket
    dir, its /data volume), removed by root after the tenant is gone, or a tree of the bundle
    store at any depth (`gateway.bundles.remove_tree`, which makes read-only directories
    writable first when the gateway is not root). Errors are ignored, as
    with ``shutil.rmtree(path, ignore_errors=True)``; a symlink at `path` is removed itself.

    Why not shutil.rmtree: it recurses once per level, holding a directory fd per level, so a
    tenant that left a chain of a few thousand nested directories (``mkdir d; cd d``, no limit
    applies) made it raise RecursionError, which killed the fork server and every instance
    with it. Here nothing recurses and at most two directory fds are open: the entries of each
    subdirectory of `path` are unlinked, its subdirectories renamed up into `path` itself (so
    nothing is ever more than one level deep), and the emptied directory removed, until `path`
    is empty. Every step is relative to a directory fd opened with O_NOFOLLOW: a symlink
    anywhere in the tree is removed as a name, never followed."""
    path = os.fspath(path)
    _unmount(path, os.path.dirname(path) or ".")
    try:
        top = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a symlink or a file: remove the name
            with contextlib.suppress(OSError):
                os.unlink(path)
        return
    try:
        _empty_dir(top)
    finally:
        os.close(top)
    with contextlib.suppress(OSError):
        os.rmdir(path)


MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8


def _unmount(path: str, parent: str) -> None:
    """Detach the mount at `path` if it is a mount point (a socket dir is a tmpfs of its own:
    sandboxes.prepare_socket_dir); `parent` is where its st_dev is compared (a path, or a
    /proc/self/fd link to a directory fd). Never follows a symlink at `path`."""
    if os.geteuid() != 0:
        return
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_dev == os.stat(parent).st_dev:
            return
    except OSError:
        return
    if _libc.umount2(os.fsencode(path), MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
        _say(f"cannot unmount {path}: {os.strerror(ctypes.get_errno())}")


def _entries(fd: int) -> list[tuple[str, bool]]:
    """(name, is a directory, not following symlinks) of each entry of the directory `fd`."""
    with os.scandir(fd) as it:
        return [(e.name, e.is_dir(follow_symlinks=False)) for e in it]


def _empty_dir(top: int) -> None:
    names = itertools.count()
    here = f"/proc/self/fd/{top}"
    with contextlib.suppress(OSError):
        for name, is_dir in _entries(top):
            if is_dir:  # a member's socket dir in the pool's dir is a mount point: detach it
                _unmount(f"{here}/{name}", here)
    while True:
        try:
            entries = _entries(top)
        except OSError:
            return
        progress = False
        for name, is_dir in entries:
            if not is_dir:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=top)
                    progress = True
                continue
            with contextlib.suppress(OSError):
                os.rmdir(name, dir_fd=top)  # already empty
                progress = True
                continue
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=top)
            except OSError:
                continue
            try:
                for child, child_is_dir in _entries(sub):
                    if child_is_dir:
                        progress |= _hoist(sub, child, top, names)
                    else:
                        with contextlib.suppress(OSError):
                            os.unlink(child, dir_fd=sub)
                            progress = True
            except OSError:
                pass
            finally:
                os.close(sub)
            with contextlib.suppress(OSError):
                os.rmdir(name, dir_fd=top)
                progress = True
        if not progress:  # what is left cannot be removed: leave it, as rmtree would
            return


def _hoist(parent: int, name: str, top: int, names: itertools.count[int]) -> bool:
    """Rename directory `name` of `parent` up into `top` under a name not taken there."""
    for _ in range(64):
        try:
            os.rename(name, f".dorm-rm-{next(names)}", src_dir_fd=parent, dst_dir_fd=top)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                return False
    return False


def _catches(pid: int, sig: int) -> bool:
    """Whether `pid` has a handler for `sig` (the SigCgt mask in /proc/<pid>/status)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def _say(message: str) -> None:
    print(f"dorm fork server: {message}", file=sys.stderr, flush=True)


def _own_tree(path: str, uid: int) -> None:
    """Give a persistent /data volume to the instance's uid (only when its owner changed): the
    fallback where it cannot be attached idmapped (see `ForkServer._volume`)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.stat(path, follow_symlinks=False).st_uid == uid:
        return
    # By directory fds, never by path: a tenant still running on this volume (an instance of the
    # same branch that is stopping) can swap a directory for a symlink to a host directory
    # between the listing and the descent, and a path walk would then chown the host's files.
    # Each directory is opened relative to its parent's fd with O_NOFOLLOW. Iterative, not
    # os.fwalk: that recursed once per level (RecursionError on a tenant's 3,000-deep chain, and
    # the start failed) holding an fd per level; here a directory's fd stays open only while
    # some of its subdirectories are still to be visited.
    pending: dict[int, int] = {}  # open directory fd -> its subdirectories not yet opened
    todo: list[tuple[int, str]] = []

    def visit(fd: int) -> None:
        subdirs = 0
        try:
            entries = _entries(fd)
        except OSError:
            entries = []
        for name, is_dir in entries:
            with contextlib.suppress(OSError):
                os.chown(name, uid, uid, dir_fd=fd, follow_symlinks=False)
            if is_dir:
                todo.append((fd, name))
                subdirs += 1
        if subdirs:
            pending[fd] = subdirs
        else:
            os.close(fd)

    try:
        with contextlib.suppress(OSError):
            visit(os.open(path, _DIR_FLAGS))
        while todo:
            parent, name = todo.pop()
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            except OSError:
                fd = -1
            pending[parent] -= 1
            if not pending[parent]:
                del pending[parent]
                os.close(parent)
            if fd >= 0:
                visit(fd)
    finally:
        for fd in pending:
            os.close(fd)
    os.chown(path, uid, uid, follow_symlinks=False)


def _resolve(target: str) -> Any:
    """ "module:qualname" → the object; the module is normally preloaded already."""
    module_name, _, qualname = target.partition(":")
    obj: Any = sys.modules.get(module_name) or importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _call_in_child(target: Any, argv: list[str], env: dict[str, str], err: int) -> NoReturn:
    """Zygote mode: become the tenant by calling `target` in this forked child; never returns."""
    os.environ.clear()
    os.environ.update(env)
    sys.argv = list(argv)
    os.close(err)  # set-up is done: from here on, failures are the tenant's, in its log
    code = 1
    try:
        result = target()
        code = result if isinstance(result, int) else 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(fd, 4096)
        except InterruptedError:
            continue
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            raise
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def main() -> None:
    # "<control fd>:<environment channel fd>" (see `ForkServer._receive_env`)
    fd_text, _, env_text = sys.argv[1].partition(":")
    fd = int(fd_text)
    # "--sandboxes <cgroup parent>": this gateway confines instances under that cgroup subtree.
    cgroup_parent = sys.argv[3] if sys.argv[2:3] == ["--sandboxes"] else None
    # "--pool <json>": the [pool] settings (min_idle, max_idle, refill_concurrency, shrink_after).
    pool = PoolConfig(**orjson.loads(sys.argv[5])) if sys.argv[4:5] == ["--pool"] else PoolConfig()
    control = socket.socket(fileno=fd)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        raise SystemExit("fork server: the gateway is already gone")
    if cgroup_parent is not None and os.geteuid() == 0:
        # Rootless, nothing outlives this process: no cgroups, no egress plumbing, and every
        # mount is in a sandbox's own namespace.
        sandboxes = importlib.import_module("sandboxes")
        found = sandboxes.cleanup_stale(cgroup_parent)
        if found:
            print(
                f"dorm fork server: removed {found} sandboxes left by a previous run",
                file=sys.stderr,
                flush=True,
            )
    if cgroup_parent is not None:
        # Build (or find) the sandbox launcher now: its one-time compile (~0.3 s) must not be
        # paid by the first request. Without a compiler, exec starts use the Python path.
        with contextlib.suppress(Exception):
            importlib.import_module("sandboxes.launcher").available()
    for module in PRELOAD:
        importlib.import_module(module)
    # Everything imported so far is shared with every zygote child; freezing it keeps the
    # children's garbage collections from touching (and so privately copying) those pages.
    gc.collect()
    gc.freeze()
    env_channel = socket.socket(fileno=int(env_text)) if env_text else None
    server = ForkServer(control, pool, env_channel)
    server.serve()
    if cgroup_parent is not None:
        # Every instance and idle member is gone: leave no empty cgroup directory behind either.
        with contextlib.suppress(Exception):
            importlib.import_module("sandboxes.cgroups").detect().remove_parent(cgroup_parent)


if __name__ == "__main__":
    main()
