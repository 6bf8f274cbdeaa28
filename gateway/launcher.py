"""The gateway's side of the fork server: start it at boot, ask it to spawn and signal instances.

All instance processes are children of the fork server, never of the uvloop process (see
forkserver.py for why). This module owns that process: it starts it with a scrubbed environment,
restarts it if it dies (its instances died with it, and are reported as exited), and turns its
length-prefixed JSON frames into awaitable results and exit callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import itertools
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.forkserver import FRAME, MAX_FRAME, encode_frame, remove_tree

log = logging.getLogger("dorm.launcher")

SPAWN_TIMEOUT = 30.0
QUERY_TIMEOUT = 5.0  # a control query (pool state) waits at most this long for its answer
STABLE_RUN = 5.0  # a fork server that ran this long is restarted at once when it dies
MAX_RESTART_DELAY = 5.0
WARM_SHAPES = 8  # sandbox shapes re-sent to a restarted fork server so it refills their pools
# The only variables the fork server (and so every instance) inherits from the gateway.
FORKSERVER_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONPATH")


def env_memfd(env: dict[str, str]) -> int:
    """A sealed, close-on-exec memfd of "NAME=value\\0" entries.

    A twin of sandboxes.spec.env_file, which must write the same bytes (tests/test_launcher.py
    checks): `import sandboxes.spec` runs sandboxes/__init__, about 60 ms the gateway's CLI
    commands should not pay, and sandboxes imports nothing from gateway."""
    for key, value in env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise ValueError(f"invalid environment variable {key!r}")
    data = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())
    fd = os.memfd_create("dorm-env", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _remove_trees(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            remove_tree(path)


@contextlib.contextmanager
def app_socket(path: str) -> Iterator[str]:
    """A path to connect to the app's Unix socket at `path` that cannot be redirected.

    The socket's directory belongs to the tenant (it is its /run/dorm), so the tenant can
    replace ``http.sock`` with a symlink to any host path at any time, and a root gateway that
    connects by path would follow it: to another tenant's socket or to a root-only one such as
    /var/run/docker.sock, with the tenant's visitors' requests. connect(2) has no O_NOFOLLOW, so
    the socket is pinned first: opened with O_PATH | O_NOFOLLOW (a symlink opens as itself and
    is refused, so is anything but a socket), and the caller connects through the pinned fd's
    /proc/self/fd link, which names exactly that inode. The fd is closed on leaving."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise OSError(errno.ECONNREFUSED, "the app's socket path is not a socket", path)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class ExitInfo:
    code: int | None
    signal: int | None
    oom: bool = False
    lost: bool = False  # the fork server died; the instance died with it

    def describe(self) -> str:
        if self.lost:
            return "the fork server died"
        if self.oom:
            return "ran out of memory and was killed"
        if self.signal is not None:
            return f"was killed by signal {self.signal}"
        return f"exited with code {self.code}"


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    id: str
    argv: list[str]
    env: dict[str, str]
    run_dir: str
    log_path: str
    log_max_bytes: int
    log_keep: int
    cwd: str | None = None
    call: str | None = None  # zygote mode: "module:qualname" called in the forked child
    sandbox: dict[str, Any] | None = field(default=None)
    pool: str | None = None  # the runtime whose warm-pool bounds apply (sandboxed only)
    # Sandboxed only: pass back the instance's network namespace (`Spawned.netns_fd`), for an
    # app the gateway reaches on TCP inside it.
    netns: bool = False


@dataclass(frozen=True, slots=True)
class Spawned:
    """The fork server's answer to a spawn: the pid and how the start went on its side."""

    pid: int
    path: str  # "pool" (an idle pre-confined child), "zygote" (forked for it), "fresh" (exec)
    claim_ms: float  # taking the idle child, or forking one
    confine_ms: float  # confinement until the tenant code was about to run
    uid: int | None = None  # a claimed pool member runs as its own uid (from the pool's range)
    # With `LaunchSpec.netns`: the instance's network namespace, an fd the caller now owns. The
    # fork server opens it (it is the instance's parent and reaps it only in its own loop, so
    # the pid cannot name another process yet) and passes it over the environment channel
    # just before "spawned"; by pid from here, the pid could have been reused by then.
    netns_fd: int = -1


IN_CREATE = 0x100
IN_MOVED_TO = 0x80
IN_ONLYDIR = 0x1000000
IN_Q_OVERFLOW = 0x4000
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name


class LiveWatch:
    """Learns that a claimed pool member is live from the kernel, not from the fork server.

    A member goes live by renaming its socket to ``http.sock`` (runtimes/python.py) and then
    says so on its claim channel, which the fork server forwards: two more processes to wake
    on the way to the gateway, each a cross-CPU wake-up (0.1-0.5 ms here), and the fork server
    is busy with the claim's bookkeeping just then. An inotify watch on the instance's run dir
    (a symlink the fork server made to the member's socket dir, followed here) wakes the
    gateway's own loop at the rename. The forwarded word stays: it carries the member's import
    time, and it still says "live" if inotify is unavailable or its queue overflowed. An event
    only makes the readiness probe try now; readiness is still the socket accepting (pinned,
    `app_socket`), so a tenant that makes names in its dir gains nothing but early tries."""

    def __init__(self, on_live: Callable[[str], None]) -> None:
        import ctypes  # here, not at module import: the CLI imports this module too

        self._libc = ctypes.CDLL(None, use_errno=True)
        self._ctypes = ctypes
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.fd = fd
        self._on_live = on_live
        self._by_wd: dict[int, str] = {}
        self._by_id: dict[str, int] = {}
        asyncio.get_running_loop().add_reader(fd, self._read)

    def watch(self, instance_id: str, run_dir: str) -> None:
        """Watch `run_dir` for `http.sock` appearing; on failure, the fork server's word does."""
        mask = IN_MOVED_TO | IN_CREATE | IN_ONLYDIR
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(run_dir), mask)
        if wd >= 0:
            self._by_wd[wd] = instance_id
            self._by_id[instance_id] = wd

    def forget(self, instance_id: str) -> None:
        wd = self._by_id.pop(instance_id, None)
        if wd is not None:
            self._by_wd.pop(wd, None)
            self._libc.inotify_rm_watch(self.fd, wd)

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except OSError:
            return
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, size = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size : offset + _EVENT.size + size].rstrip(b"\0")
            offset += _EVENT.size + size
            if mask & IN_Q_OVERFLOW or name != b"http.sock":
                continue
            instance_id = self._by_wd.get(wd)
            if instance_id is not None:
                self.forget(instance_id)
                self._on_live(instance_id)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.fd)
        os.close(self.fd)
        self._by_wd.clear()
        self._by_id.clear()


class LaunchError(RuntimeError):
    """The fork server could not start an instance; the message says why.

    `lost`: the fork server died (or was not running) rather than refusing the start; it is
    restarted at once, so the start can be tried again (`Launcher.wait_running`).
    `unanswered`: the spawn was sent and not answered in time; the fork server may still carry
    it out (the instance is then killed), so what the start reserved for it (its uid) is not
    free until `on_exit` reports that id."""

    def __init__(self, message: str, *, lost: bool = False, unanswered: bool = False) -> None:
        super().__init__(message)
        self.lost = lost
        self.unanswered = unanswered


class Launcher:
    def __init__(
        self,
        on_exit: Callable[[str, ExitInfo], None],
        cgroup_parent: str | None = None,
        pool: dict[str, Any] | None = None,
        on_live: Callable[[str, float | None], None] | None = None,
    ) -> None:
        # A claimed pool member is serving (and took this many ms to load its app).
        self._on_live = on_live or (lambda _id, _ms: None)
        self._pool = pool or {}  # [pool] settings, passed to the fork server at each start
        self._overrides: dict[str, tuple[int, int]] = {}  # runtime → (min_idle, max_idle)
        # Recent sandbox shapes (by their limits and layout), for refilling after a restart.
        self._shapes: dict[str, dict[str, Any]] = {}
        self._queries: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._query_ids = itertools.count(1)
        self._on_exit = on_exit
        self._cgroup_parent = cgroup_parent  # set: instances may be sandboxed under it
        self._proc: subprocess.Popen[bytes] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._env_channel: socket.socket | None = None
        # Held from sending a spawn's environment to writing its frame: the fork server pairs
        # them by order, and sending may wait for room (see `_send_env`).
        self._send_lock = asyncio.Lock()
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[Spawned]] = {}
        self._want_netns: set[str] = set()  # pending spawns whose netns fd must come back
        self._running: set[str] = set()
        # Each spawn's run dir, until the fork server has removed it: if it dies first, the
        # gateway does (a sandbox's run dir is a tmpfs mounted on the host).
        self._run_dirs: dict[str, str] = {}
        self._abandoned: set[str] = set()  # spawns `spawn` stopped waiting for, not yet over
        self._closing = False
        self._up = asyncio.Event()  # set while a fork server is running and connected
        self._started_at = 0.0  # loop time of the last start
        self._restart_delay = 0.0  # grows while the fork server keeps dying right after starting
        # While it is down: when the next try to start it is due (loop time), and why the last
        # try failed, so a start waiting for it can give up at once, saying why, when the next
        # try would come after its own deadline.
        self._retry_at: float | None = None
        self._start_error: str | None = None
        self._watchers: list[asyncio.Future[None]] = []  # wait_running calls, woken on news
        self._live_watch: LiveWatch | None = None  # claimed members' sockets (see LiveWatch)

    async def start(self) -> None:
        """Start the fork server. Raises OSError if it cannot be started (its interpreter cannot
        be executed, no more processes or descriptors): at boot that stops the gateway; after a
        death, `_read_loop` keeps trying."""
        self._started_at = asyncio.get_running_loop().time()
        if self._cgroup_parent is not None and self._live_watch is None:
            try:
                self._live_watch = LiveWatch(lambda instance_id: self._on_live(instance_id, None))
            except OSError as exc:  # the fork server's "live" word still comes
                log.warning("no inotify for pool members' sockets: %s", exc)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Tenants' environments go over their own channel, as memfds (see `spawn`).
        env_ours, env_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env_ours.setblocking(False)
        env = {k: os.environ[k] for k in FORKSERVER_ENV if k in os.environ}
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        # Popen without preexec_fn uses vfork/exec, which is safe from a threaded process.
        fds = f"{child.fileno()}:{env_theirs.fileno()}"
        argv = [sys.executable, "-m", "gateway.forkserver", fds]
        if self._cgroup_parent is not None:
            argv += [
                "--sandboxes",
                self._cgroup_parent,
                "--pool",
                orjson.dumps(self._pool).decode(),
            ]
        try:
            self._proc = subprocess.Popen(
                argv,
                pass_fds=(child.fileno(), env_theirs.fileno()),
                env=env,
                stdin=subprocess.DEVNULL,
                close_fds=True,
            )
        except BaseException:
            parent.close()
            env_ours.close()
            raise
        finally:
            child.close()
            env_theirs.close()
        if self._env_channel is not None:
            self._env_channel.close()
        self._env_channel = env_ours
        reader, writer = await asyncio.open_unix_connection(sock=parent, limit=MAX_FRAME)
        self._writer = writer
        self._up.set()
        self._retry_at = self._start_error = None
        self._wake_watchers()
        self._reader_task = asyncio.create_task(self._read_loop(reader), name="dorm-forkserver")
        # A restarted fork server knows nothing: give it the operator's overrides and the shapes
        # in use, so pools are refilled before the next request needs a member.
        for runtime, (low, high) in self._overrides.items():
            self._send_config(runtime, low, high)
        for warm in self._shapes.values():
            writer.write(encode_frame({"op": "warm", **warm}))

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def spawn(self, spec: LaunchSpec, timeout: float | None = None) -> Spawned:
        """Start an instance; returns once it has exec'd (or is calling its entry point), or
        raises LaunchError.

        `timeout` (at most SPAWN_TIMEOUT): how long to wait for the fork server's answer (and
        for room to send the environment, see `_send_env`), so a start can stop waiting at its
        own deadline; an instance the fork server starts after that is killed when it reports
        it (see `_dispatch`)."""
        if self._writer is None:
            why = f" (starting it failed: {self._start_error})" if self._start_error else ""
            raise LaunchError(f"the fork server is not running{why}", lost=not self._closing)
        if timeout is not None and timeout <= 0:
            # Sent anyway, the fork server would start it only for it to be killed as late.
            raise LaunchError("the start's deadline passed before the fork server was asked")
        loop = asyncio.get_running_loop()
        limit = SPAWN_TIMEOUT if timeout is None else min(max(timeout, 0.0), SPAWN_TIMEOUT)
        deadline = loop.time() + limit
        # The environment (the tenant's secrets) never enters the fork server's memory, which
        # every zygote child inherits: it goes as a sealed memfd, just before the frame.
        message = {
            "op": "spawn",
            **{k: getattr(spec, k) for k in LaunchSpec.__slots__ if k != "env"},
            "env_memfd": True,
            "path": spec.env.get("PATH"),
            # A claimed member's socket is watched here (LiveWatch): its "live" word may wait.
            "watched": self._live_watch is not None,
        }
        # Encoded first: once its environment is sent, nothing may stop the frame from following
        # (an environment without its frame would put every later spawn out of step).
        frame = encode_frame(message)
        async with self._send_lock:  # uncontended (the usual case), this does not yield
            await self._send_env(spec.id, spec.env, deadline)  # before anything is pending
            if self._writer is None:  # the fork server died while this waited for room
                raise LaunchError("the fork server died", lost=True)
            future: asyncio.Future[Spawned] = loop.create_future()
            self._pending[spec.id] = future
            if spec.netns:
                self._want_netns.add(spec.id)
            self._run_dirs[spec.id] = spec.run_dir
            self._writer.write(frame)
        if spec.sandbox is not None and spec.pool is not None:
            self._remember_shape(spec)
        try:
            return await asyncio.wait_for(future, max(deadline - loop.time(), 0.0))
        except TimeoutError:
            self._abandoned.add(spec.id)
            raise LaunchError("the fork server did not answer in time", unanswered=True) from None
        finally:
            self._pending.pop(spec.id, None)
            self._want_netns.discard(spec.id)

    async def _send_env(self, instance_id: str, env: dict[str, str], deadline: float) -> None:
        """Send the spawn's environment as a memfd. When the channel is full (a few hundred
        spawns the fork server has not read yet: a burst of cold starts while it is busy), wait
        for room until `deadline` (loop time), never fail at once: the frames wait in the
        control socket's buffer just the same."""
        channel = self._env_channel
        assert channel is not None
        try:
            fd = env_memfd(env)
        except (OSError, ValueError) as exc:
            raise LaunchError(f"cannot pass the environment: {exc}") from None
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self._env_channel is not channel:  # a new fork server: the frame would
                    raise LaunchError("the fork server died", lost=True)  # go to it, out of step
                try:
                    socket.send_fds(channel, [instance_id.encode()], [fd])
                    return
                except BlockingIOError:
                    pass
                except OSError as exc:
                    why = f"cannot pass the environment to the fork server: {exc}"
                    raise LaunchError(why, lost=True) from None
                room: asyncio.Future[None] = loop.create_future()
                fileno = channel.fileno()
                loop.add_writer(fileno, _wake, room)
                try:
                    await asyncio.wait_for(room, max(deadline - loop.time(), 0.0))
                except TimeoutError:
                    raise LaunchError(
                        "the fork server did not take the environment in time"
                    ) from None
                finally:
                    loop.remove_writer(fileno)
        finally:
            os.close(fd)

    async def wait_running(self, timeout: float) -> bool:
        """Wait (at most `timeout` seconds) for a fork server to be running; False if none is.

        Returns False early, without waiting out `timeout`, once the next try to start one is
        due after the timeout (a fork server that keeps failing to start is tried ever more
        slowly): a start waiting for it then fails at once instead of at its deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._closing and not self._up.is_set():
            now = loop.time()
            if now >= deadline or (self._retry_at is not None and self._retry_at > deadline):
                break
            watcher: asyncio.Future[None] = loop.create_future()
            self._watchers.append(watcher)
            try:
                await asyncio.wait_for(watcher, deadline - now)
            except TimeoutError:
                break
            finally:
                with contextlib.suppress(ValueError):
                    self._watchers.remove(watcher)
        return self._up.is_set() and not self._closing

    def _wake_watchers(self) -> None:
        """Something a `wait_running` caller decides on changed: it is up, or a try failed."""
        watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            if not watcher.done():
                watcher.set_result(None)

    def _remember_shape(self, spec: LaunchSpec) -> None:
        assert spec.sandbox is not None
        sandbox = spec.sandbox
        key = orjson.dumps(
            [spec.pool, *(sandbox.get(k) for k in ("rootfs", "extra_ro_binds", "network"))]
            + [sandbox.get(k) for k in ("cgroup_parent", "memory", "cpu", "pids")]
        ).decode()
        self._shapes.pop(key, None)
        self._shapes[key] = {
            "sandbox": sandbox,
            "socket_dir": os.path.dirname(spec.run_dir),
            "pool": spec.pool,
        }
        while len(self._shapes) > WARM_SHAPES:
            self._shapes.pop(next(iter(self._shapes)))

    async def pools(self) -> dict[str, Any]:
        """The fork server's pool state (per shape: idle, claimed, misses, refill rate...)."""
        if self._writer is None:
            raise LaunchError("the fork server is not running")
        query_id = f"q{next(self._query_ids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._queries[query_id] = future
        self._writer.write(encode_frame({"op": "pools", "id": query_id}))
        try:
            return await asyncio.wait_for(future, QUERY_TIMEOUT)
        except TimeoutError:
            raise LaunchError("the fork server did not answer in time") from None
        finally:
            self._queries.pop(query_id, None)

    def configure_pool(self, runtime: str, min_idle: int, max_idle: int) -> None:
        """Override [pool] bounds for one runtime (kept across fork-server restarts)."""
        self._overrides[runtime] = (min_idle, max_idle)
        self._send_config(runtime, min_idle, max_idle)

    @property
    def pool_overrides(self) -> dict[str, tuple[int, int]]:
        return dict(self._overrides)

    def _send_config(self, runtime: str, min_idle: int, max_idle: int) -> None:
        if self._writer is not None:
            message: dict[str, Any] = {"op": "pool_config", "runtime": runtime}
            message.update(min_idle=min_idle, max_idle=max_idle)
            self._writer.write(encode_frame(message))

    def note(self, instance_id: str, text: str) -> None:
        """Append a `[dorm] text` line to a running instance's log (the fork server writes it)."""
        if self._writer is not None and instance_id in self._running:
            self._writer.write(encode_frame({"op": "note", "id": instance_id, "text": text}))

    def signal(self, instance_id: str, sig: int) -> None:
        if self._writer is not None and instance_id in self._running:
            self._writer.write(encode_frame({"op": "signal", "id": instance_id, "sig": sig}))

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                header = await reader.readexactly(FRAME.size)
                (size,) = FRAME.unpack(header)
                self._dispatch(orjson.loads(await reader.readexactly(size)))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        if not self._closing:
            log.error("the fork server died; its instances are gone; restarting it")
        run_dirs = self._fail_all()
        # Beside the restart, not before it: a tenant may have filled its run dir.
        cleanup = (
            asyncio.create_task(asyncio.to_thread(_remove_trees, run_dirs)) if run_dirs else None
        )
        if not self._closing:
            await self._reap_proc()
            # One that keeps dying at once (a broken host, say) is restarted ever more slowly,
            # not in a tight loop; one that ran a while is restarted at once.
            ran = asyncio.get_running_loop().time() - self._started_at
            self._restart_delay = 0.0 if ran > STABLE_RUN else self._longer_delay()
            await self._restart()
        if cleanup is not None:
            await cleanup

    def _longer_delay(self) -> float:
        return min(max(0.1, self._restart_delay * 2), MAX_RESTART_DELAY)

    async def _restart(self) -> None:
        """Start the fork server again, and keep trying (ever more slowly) while that fails.

        Why keep trying: a start can fail for a reason that passes (no more processes or
        descriptors for a moment, an interpreter being upgraded in place), and without a fork
        server the gateway can start nothing at all until it is restarted itself."""
        loop = asyncio.get_running_loop()
        while not self._closing:
            if self._restart_delay:
                self._retry_at = loop.time() + self._restart_delay
                self._wake_watchers()
                log.error("restarting the fork server in %.1fs", self._restart_delay)
                await asyncio.sleep(self._restart_delay)
                if self._closing:
                    return
            try:
                await self.start()
                return
            except OSError as exc:
                self._start_error = str(exc)
                self._restart_delay = self._longer_delay()
                log.error("could not start the fork server again: %s", exc)

    def _dispatch(self, message: dict[str, Any]) -> None:
        ev = message.get("ev")
        instance_id = message["id"]
        if ev == "pools":
            query = self._queries.get(instance_id)
            if query is not None and not query.done():
                query.set_result(message)
        elif ev == "spawned":
            self._running.add(instance_id)
            # Taken off the channel whatever happens next: the next one's must not meet it.
            netns_fd = self._take_netns(instance_id) if message.get("netns") else -1
            future = self._pending.get(instance_id)
            if netns_fd >= 0 and (future is None or future.done()):
                os.close(netns_fd)
            if future is None or future.done():
                # Started after `spawn` stopped waiting (SPAWN_TIMEOUT): its start has already
                # failed, nobody will route to it or stop it, and the uid it runs as may be
                # handed to another tenant. It must not run.
                log.warning(
                    "instance %s started after its start was given up: killing it", instance_id
                )
                self.signal(instance_id, signal.SIGKILL)
            elif instance_id in self._want_netns and netns_fd < 0:
                # Unreachable without it (a socket made outside it would reach the host's own
                # 127.0.0.1): it must not run, and its uid is not free until it is reported gone.
                log.error(
                    "instance %s started without its network namespace: killing it", instance_id
                )
                self._abandoned.add(instance_id)
                self.signal(instance_id, signal.SIGKILL)
                future.set_exception(
                    LaunchError(
                        "the fork server did not pass the instance's network namespace",
                        unanswered=True,
                    )
                )
            else:
                if message.get("path") == "pool" and self._live_watch is not None:
                    run_dir = self._run_dirs.get(instance_id)
                    if run_dir is not None:  # before the start task's first probe runs
                        self._live_watch.watch(instance_id, run_dir)
                future.set_result(
                    Spawned(
                        int(message["pid"]),
                        str(message.get("path", "fresh")),
                        float(message.get("claim_ms", 0.0)),
                        float(message.get("confine_ms", 0.0)),
                        message.get("uid"),
                        netns_fd,
                    )
                )
        elif ev == "live":
            if self._live_watch is not None:
                self._live_watch.forget(instance_id)
            took = message.get("import_ms")
            self._on_live(instance_id, float(took) if isinstance(took, (int, float)) else None)
        elif ev == "spawn_failed":
            future = self._pending.get(instance_id)
            if future is not None and not future.done():
                future.set_exception(LaunchError(message["error"]))
            elif instance_id in self._abandoned:  # given up on, and never started: over
                self._abandoned.discard(instance_id)
                self._on_exit(instance_id, ExitInfo(None, None))
            self._run_dirs.pop(instance_id, None)
        elif ev == "exited":
            if self._live_watch is not None:
                self._live_watch.forget(instance_id)
            self._run_dirs.pop(instance_id, None)
            self._running.discard(instance_id)
            self._abandoned.discard(instance_id)
            self._on_exit(instance_id, ExitInfo(message["code"], message["signal"], message["oom"]))

    def _take_netns(self, instance_id: str) -> int:
        """The network namespace fd the fork server sent for `instance_id` just before its
        "spawned" frame (so it is already queued: no waiting); -1 if it is not there."""
        channel = self._env_channel
        if channel is None:
            return -1
        try:
            msg, fds, _flags, _addr = socket.recv_fds(channel, 256, 1)
        except OSError:
            return -1
        if msg == instance_id.encode() and len(fds) == 1:
            return fds[0]
        for fd in fds:
            os.close(fd)
        log.error("network namespace for %s out of step (got %r)", instance_id, msg[:40])
        return -1

    def _fail_all(self) -> list[str]:
        """Fail whatever waits on the dead fork server; returns the run dirs left to remove."""
        self._up.clear()
        if self._writer is not None and not self._closing:
            self._writer.close()
            self._writer = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(LaunchError("the fork server died", lost=True))
        for query in self._queries.values():
            if not query.done():
                query.set_exception(LaunchError("the fork server died"))
        running, self._running = self._running, set()
        abandoned, self._abandoned = self._abandoned, set()
        for instance_id in running | abandoned:  # the fork server's sandboxes die with it
            if self._live_watch is not None:
                self._live_watch.forget(instance_id)
            self._on_exit(instance_id, ExitInfo(None, None, lost=True))
        # The dead fork server cannot remove their run dirs any more: the gateway does, on a
        # thread (a tenant may have filled one; it is no work for the event loop).
        run_dirs, self._run_dirs = list(self._run_dirs.values()), {}
        return run_dirs

    async def _reap_proc(self) -> None:
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(proc.wait, 5.0)
            if proc.poll() is None:
                proc.kill()
                await asyncio.to_thread(proc.wait, 5.0)

    async def close(self) -> None:
        """Stop the fork server; it kills whatever instances are still running.

        The socket stays open until the fork server has reported every exit and closed its end,
        so instances are accounted for to the last one.
        """
        self._closing = True
        if self._writer is not None:
            with contextlib.suppress(ConnectionError):
                self._writer.write(encode_frame({"op": "shutdown"}))
        if self._reader_task is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._reader_task, 10.0)
        if self._writer is not None:
            self._writer.close()
        await self._reap_proc()
        if self._live_watch is not None:
            self._live_watch.close()
            self._live_watch = None
