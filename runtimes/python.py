"""The python-asgi and python-wsgi runtimes: the app served by granian on the instance's socket.

Two ways in, one code path:
  * zygote (default): the fork server imported this module, and with it granian and uvloop, at
    boot; an instance is a fork of it that calls `main()`, so the first response costs a fork and
    the app's own import (milliseconds) instead of an interpreter start (~100 ms).
  * fresh: `python -m runtimes.python`, for runtimes the zygote cannot serve (another Python, a
    runtime bundle's rootfs) and for measuring what the zygote saves.
Both read the same environment: DORM_SOCKET (where to listen), DORM_ENTRY ("module:attr"),
DORM_INTERFACE ("asgi" or "wsgi"); the app's code is in the working directory (/app in a sandbox),
its vendored dependencies in ./vendor.

A third way in, the fastest, is a warm-pool **member** (`member_main`): a zygote child that is
already fully confined and already serving — granian bound and accepting on a hidden socket name
in /run/dorm — before anyone knows which tenant it will be. Its app is a `LateApp` with nothing in
it. The claim (see gateway/forkserver.py) attaches the tenant's bundle at /app from outside and
sends the tenant's environment and log fd on fd 0; the member imports the app, runs its lifespan
startup, and only then renames its socket to DORM_SOCKET, which is what the gateway's readiness
probe connects to. So a claimed member answers after the app's own import, not after granian's
start (~5 ms measured here), and a tenant whose import fails never looks ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

import orjson
import uvloop
from granian.asgi import LifespanProtocol
from granian.constants import Interfaces
from granian.server.embed import Server

INTERFACES = ("asgi", "wsgi")
MEMBER_SOCKET = ".member.sock"  # a member listens here until its claim is complete
MAX_CLAIM = 1 << 20  # bytes of one claim message (the tenant's environment)
LIVE = b"L"  # sent back on the claim channel once the socket has its real name, + import ms
LIVE_WORD_DELAY = 0.05  # seconds the "claimed" log line of a member the gateway watches waits
HOST_PACKAGES = frozenset({"gateway", "sandboxes"})  # the fork server's, not the runtime's


class EntryError(Exception):
    """DORM_ENTRY does not name a loadable app; the message says which part failed."""


def forget_host_packages(directories: list[str]) -> None:
    """Drop the fork server's own packages from `sys.modules` where the app ships a top-level
    module of the same name (`gateway` and `sandboxes` are common names), so it imports its own,
    as it would in a fresh interpreter. What is already running keeps its module globals, and
    nothing in an instance imports them again. Only when shadowed: the purge touches ~0.8 MiB of
    memory shared with the zygote (copy-on-write), which every other instance keeps shared."""
    shadowed = {
        name
        for name in HOST_PACKAGES
        for directory in directories
        if os.path.exists(os.path.join(directory, name))
        or os.path.exists(os.path.join(directory, name + ".py"))
    }
    if shadowed:
        for name in [n for n in sys.modules if n.partition(".")[0] in shadowed]:
            del sys.modules[name]


def _warm_import(scratch: str) -> None:
    """Import a throwaway module from a throwaway directory under `scratch`, as `load_app` will
    import the tenant's, and remove every trace of it. A member does this while idle: in a fork
    of the zygote the first import costs ~1 ms of copy-on-write faults and cache building (path
    finders, the compiler), which the claim would otherwise pay. No bytecode is written, and
    only the directory's own finder is dropped afterwards: both keep the cost in memory down."""
    directory = os.path.join(scratch, f".dorm-warm-{os.getpid()}")
    name = "_dorm_warm_import"
    source = os.path.join(directory, name + ".py")
    sys.dont_write_bytecode, writing = True, sys.dont_write_bytecode
    try:
        os.mkdir(directory, 0o700)
        with open(source, "w") as fh:
            fh.write("import os\nVALUE = os.sep\n")
        sys.path.insert(0, directory)
        importlib.import_module(name)
    except OSError:
        pass  # no writable scratch space: the claim pays the import's first-touch costs
    finally:
        sys.dont_write_bytecode = writing
        with contextlib.suppress(ValueError):
            sys.path.remove(directory)
        sys.modules.pop(name, None)
        sys.path_importer_cache.pop(directory, None)
        with contextlib.suppress(OSError):
            os.unlink(source)
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def load_app(entry: str, interface: str) -> Any:
    """Import "module:attr" (attr may be dotted) from the app's directory and vendor/."""
    module_name, sep, attr = entry.partition(":")
    if not sep or not module_name or not attr:
        raise EntryError(f"entry {entry!r} must look like 'module:attribute'")
    here = os.getcwd()
    searched = [os.path.join(here, "vendor"), here]
    forget_host_packages(searched)
    for path in searched:
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise EntryError(f"cannot import {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise EntryError(f"module {module_name!r} has no attribute {attr!r}") from None
    if interface == "wsgi":
        from a2wsgi import WSGIMiddleware

        target = _coroutine_channels(WSGIMiddleware(target))
    return target


def _coroutine_channels(app: Any) -> Any:
    """Give `app` coroutine receive/send callables.

    granian's are awaitables implemented in Rust, and a2wsgi hands `receive()` to
    `asyncio.run_coroutine_threadsafe`, which accepts only real coroutines.
    """

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        async def receive_coro() -> Any:
            return await receive()

        async def send_coro(message: Any) -> None:
            await send(message)

        await app(scope, receive_coro, send_coro)

    return asgi


def _server(app: Any, socket_path: str) -> Server:
    return Server(
        app,
        uds=Path(socket_path),
        interface=Interfaces.ASGI,
        websockets=True,
        runtime_threads=1,
        blocking_threads=1,
        backlog=1024,
        log_enabled=True,
        log_access=False,
    )


def serve(app: Any, socket_path: str) -> None:
    """Run granian's embedded server on `socket_path` until SIGTERM/SIGINT."""
    uvloop.run(_server(app, socket_path).serve())


def main() -> int:
    """Entry point for both paths: load the app named by the environment and serve it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # granian installs its own once serving
    interface = os.environ.get("DORM_INTERFACE", "asgi")
    if interface not in INTERFACES:
        print(
            f"dorm python runtime: DORM_INTERFACE must be asgi or wsgi, not {interface!r}",
            file=sys.stderr,
        )
        return 2
    try:
        app = load_app(os.environ.get("DORM_ENTRY", ""), interface)
    except EntryError as exc:
        print(f"dorm python runtime: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(asyncio.CancelledError):
        serve(app, os.environ["DORM_SOCKET"])
    return 0


class ClaimError(Exception):
    """The claim cannot complete (bad message, app not loadable, lifespan failed): exit code 2."""


class LateApp:
    """The ASGI app a pool member serves: nothing until the claim, then the tenant's app.

    granian runs *its* lifespan on this object when the member starts; the tenant's lifespan runs
    at the claim (`claim`), and granian's shutdown is forwarded to it. Request scopes get the
    tenant's lifespan state, as they would from granian directly.
    """

    def __init__(self) -> None:
        self.app: Any = None
        self.lifespan: LifespanProtocol | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._own_lifespan(receive, send)
            return
        app = self.app
        if app is None:  # unreachable through dorm: the socket has its real name only once set
            await _plain_response(send, 503, b"not claimed yet\n")
            return
        if self.lifespan is not None:
            scope["state"] = self.lifespan.state.copy()
        await app(scope, receive, send)

    async def _own_lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.lifespan is not None:
                    await self.lifespan.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def claim(self, app: Any) -> None:
        """Run the tenant's lifespan startup (if it has one), then serve it."""
        lifespan = LifespanProtocol(app)
        await lifespan.startup()
        if lifespan.interrupt:
            raise ClaimError(f"the app's lifespan startup failed: {lifespan.exc or 'failed'}")
        self.lifespan = None if lifespan.unsupported else lifespan
        self.app = app


async def _plain_response(send: Any, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": body})


_environments: list[Any] = []  # every environment installed by `replace_environment`, kept alive


def replace_environment(env: dict[str, str]) -> None:
    """Make `env` the process environment, for C code (getenv) and Python (os.environ) alike,
    without freeing anything a running thread may be reading.

    Why not `os.environ.clear(); os.environ.update(env)`: a claimed member's granian threads run
    while the claim is taken, and glibc's unsetenv/setenv free and move what a concurrent
    getenv() walks. That crashed a member in getenv (a general protection fault, about 1 start
    in 600). POSIX lets a program replace its whole environment by assigning `environ`: one
    pointer store here, to an array that is never freed, so a reader sees either the old
    environment or the new one. Python's mapping is updated without putenv (it would copy)."""
    entries = [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]
    array = (ctypes.c_char_p * (len(entries) + 1))(*entries, None)
    _environments.append((entries, array))
    ctypes.c_void_p.in_dll(_LIBC, "environ").value = ctypes.addressof(array)
    data = os.environ._data  # type: ignore[attr-defined]  # bytes → bytes on POSIX
    data.clear()
    data.update({os.fsencode(k): os.fsencode(v) for k, v in env.items()})


_LIBC = ctypes.CDLL(None, use_errno=True)


def _take_claim(channel: socket.socket) -> tuple[dict[str, str], list[str], bool]:
    """Read the claim from fd 0: the tenant's argv, its log fd, which becomes stdout and stderr,
    and its environment: a memfd read here and closed (an EnvFile: it never passed through the
    fork server's memory), or in the message; and whether the gateway watches the socket dir
    itself (see `_member`). fd 0 then becomes /dev/null, as in any other instance."""
    message, fds, _flags, _addr = socket.recv_fds(channel, MAX_CLAIM, 2)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if not message:
        raise SystemExit(0)  # the fork server dismissed this member
    if len(fds) not in (1, 2):
        raise ClaimError(f"a claim carries a log fd and maybe an environment, got {len(fds)} fds")
    for target in (1, 2):
        os.dup2(fds[0], target)
    os.close(fds[0])
    claim = orjson.loads(message)
    if len(fds) == 2:
        try:
            env = read_env(fds[1])
        finally:
            os.close(fds[1])
    else:
        env = dict(claim["env"])
    return env, list(claim["argv"]), bool(claim.get("watched"))


def read_env(fd: int) -> dict[str, str]:
    """The environment in a memfd of "NAME=value\\0" entries: sandboxes.spec.read_env_file's
    twin (decoded), which must agree (tests/test_launcher.py checks). Not imported from there:
    a fork server without sandboxes never imports that costly package, and a member may have
    dropped it from sys.modules (`forget_host_packages`)."""
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0) if size else b""
    env: dict[str, str] = {}
    for entry in data.split(b"\0"):
        name, eq, value = entry.partition(b"=")
        if eq:
            env[os.fsdecode(name)] = os.fsdecode(value)
    return env


async def _member(late: LateApp, socket_dir: str) -> None:
    """Serve `late` on the hidden socket; on the claim, load the tenant's app and go live."""
    loop = asyncio.get_running_loop()
    channel = socket.socket(fileno=os.dup(0))
    channel.setblocking(False)
    claimed: asyncio.Future[None] = loop.create_future()

    def on_claim() -> None:
        if not claimed.done():
            claimed.set_result(None)

    loop.add_reader(channel.fileno(), on_claim)
    hidden = os.path.join(socket_dir, MEMBER_SOCKET)
    serving = asyncio.create_task(_server(late, hidden).serve())
    warming = asyncio.create_task(_warm_up(hidden))
    await asyncio.wait({serving, claimed}, return_when=asyncio.FIRST_COMPLETED)
    warming.cancel()
    loop.remove_reader(channel.fileno())
    if serving.done():  # granian could not start: nothing to claim
        serving.result()
        return
    try:
        began = time.perf_counter()
        channel.setblocking(True)
        env, argv, watched = _take_claim(channel)
        replace_environment(env)
        sys.argv = argv
        os.chdir("/app")
        interface = env.get("DORM_INTERFACE", "asgi")
        if interface not in INTERFACES:
            raise ClaimError(f"DORM_INTERFACE must be asgi or wsgi, not {interface!r}")
        try:
            app = load_app(env.get("DORM_ENTRY", ""), interface)
        except EntryError as exc:
            raise ClaimError(str(exc)) from None
        await late.claim(app)
        took = (time.perf_counter() - began) * 1000
        os.rename(os.path.join(socket_dir, MEMBER_SOCKET), env["DORM_SOCKET"])
        with contextlib.suppress(OSError):  # "live", and how long the app took to load
            channel.send(LIVE + f"{took:.3f}".encode())
        channel.close()  # nothing of the fork server's is left to the tenant
        line = f"dorm python runtime: claimed; app loaded in {took:.1f} ms"
        if watched:
            # The gateway saw the rename itself (inotify: gateway/launcher.py, LiveWatch), and
            # the fork server reads the word above when convenient, not woken by it: this log
            # line, which would wake it (it pumps the log), waits as well, off the way of the
            # first request and its response.
            loop.call_later(LIVE_WORD_DELAY, lambda: print(line, file=sys.stderr))
        else:  # the gateway connects when it hears the word, relayed by the fork server
            print(line, file=sys.stderr)
    except ClaimError as exc:
        _end_claim(2, f"dorm python runtime: {exc}")
    except SystemExit as exc:  # the app's import (or lifespan) exits, as a script may
        code = exc.code
        if isinstance(code, int) or code is None:
            _end_claim(code or 0, None)
        _end_claim(1, code)
    except BaseException:  # any other failure of the app's: its traceback, exit 1
        traceback.print_exc()
        _end_claim(1, None)
    await serving


def _end_claim(code: int, message: object) -> NoReturn:
    """Exit a member whose claim failed, at once: granian is serving in this loop, so unwinding
    through it would bury the app's own error under the loop's. The error goes to the
    instance's log, and the gateway sees the exit before the socket ever had its real name."""
    if message is not None:
        print(message, file=sys.stderr)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


async def _warm_up(path: str) -> None:
    """Send ourselves one request before any claim, so the tenant's first request is not also
    granian's: its lazily built request path and the first-touch (copy-on-write) page faults of
    the objects it uses are paid while idle. Measured here: the first response after a claim
    took ~4 ms without this."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while True:
        try:
            reader, writer = await asyncio.open_unix_connection(path)
            break
        except OSError:
            if loop.time() > deadline:
                return
            await asyncio.sleep(0.001)
    try:
        writer.write(b"GET /dorm-warm-up HTTP/1.1\r\nhost: member\r\nconnection: close\r\n\r\n")
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(reader.read(), 5.0)
    finally:
        writer.close()


def member_main() -> int:
    """Entry point of a warm-pool member (see the module docstring): the fork server calls it in
    a confined zygote child whose fd 0 is the claim channel."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    socket_dir = os.path.dirname(os.environ["DORM_SOCKET"])
    _warm_import("/tmp")
    with contextlib.suppress(asyncio.CancelledError):
        uvloop.run(_member(LateApp(), socket_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
