"""The init of every runner sandbox: receives the job, starts the program as pid 2, reports.

This runs inside the sandbox (fully confined: its own uid, no capabilities, seccomp) as **pid 1**,
called by ``sandboxes.spawn_call`` in a fork of the spawner. Why an init of our own instead of
exec'ing the program as pid 1: the kernel shields a namespace's pid 1 from every signal it has no
handler for, so as pid 1 a program would survive ``kill -9 $$``, get EFBIG instead of SIGXFSZ at
RLIMIT_FSIZE and SIGSEGV instead of SIGABRT from ``abort()``. As pid 2 it behaves as it would under
Piston, and the init reports exactly how it ended.

The init is trustworthy although the program has the same uid: it installs no signal handlers (so
nothing in the namespace can signal it), it is non-dumpable (it changed uid), so /proc/1/mem and
/proc/1/fd are closed to the program, and ptrace is denied by seccomp. Its control socket is on no
fd the program inherits. After the program exits it SIGKILLs every other process in the namespace
(double-forked orphans included), reaps them, and only then writes its status: nothing the program
left behind can write after it.

Only modules the spawner preloaded (or the stdlib, which the sandbox can read) are used here.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import ctypes
import io
import json
import os
import random
import select
import signal
import socket
import sys
import sysconfig
import threading
import time
import traceback
import types
from typing import Any, NoReturn

from runtimes.runner.wire import MAGIC, MAX_HEADER, PREFIX, STATUS, WORK_DIR

_CHUNK = 256 * 1024
PR_SET_DUMPABLE = 4
_STDLIB = tuple(
    {p for p in (sysconfig.get_paths().get("stdlib"), sysconfig.get_paths().get("platstdlib")) if p}
)


class BootError(Exception):
    """Setting the job up failed (reported to the service as an internal error)."""


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(min(size - len(buf), _CHUNK))
        if not chunk:
            raise BootError(f"the job was cut short ({len(buf)} of {size} bytes)")
        buf += chunk
    return bytes(buf)


def _safe_path(name: str) -> str:
    """The file's path under the work dir; the service validated names, this double-checks."""
    norm = os.path.normpath(name)
    if not name or "\0" in name or norm.startswith(("/", "..")) or norm == ".":
        raise BootError(f"refusing file name {name!r}")
    return os.path.join(WORK_DIR, norm)


def _receive(ctl: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """Read the job: the prefix with its three fds, the header, then write every file."""
    msg, fds, _flags, _addr = socket.recv_fds(ctl, PREFIX.size, 3)
    if len(msg) != PREFIX.size or len(fds) != 3:
        raise BootError("malformed job prefix")
    magic, size = PREFIX.unpack(msg)
    if magic != MAGIC or size > MAX_HEADER:
        raise BootError("malformed job header")
    job: dict[str, Any] = json.loads(_recv_exact(ctl, size))
    os.mkdir(WORK_DIR, 0o755)
    for name, length, mode in job["files"]:
        path = _safe_path(name)
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode & 0o755)
        try:
            left = length
            while left:
                chunk = ctl.recv(min(left, _CHUNK))
                if not chunk:
                    raise BootError(f"file {name!r} was cut short")
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                left -= len(chunk)
        finally:
            os.close(fd)
    return job, fds


def _child(job: dict[str, Any], fds: list[int]) -> NoReturn:
    """In the forked program process: wire stdio, then exec the command or run the Python file."""
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, 65536)
        os.chdir(WORK_DIR)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        if job["mode"] == "python":
            _run_python(job)
        os.execvpe(job["argv"][0], job["argv"], job["env"])
    except BaseException as exc:  # like a shell: say why on the program's stderr, exit 127
        with contextlib.suppress(BaseException):
            os.write(2, f"dorm: cannot run {job['argv'][0]}: {exc}\n".encode())
    os._exit(127)


def _stdlib_module(module: types.ModuleType) -> bool:
    path = getattr(module, "__file__", None)
    return path is None or path.startswith(_STDLIB)


def _run_python(job: dict[str, Any]) -> NoReturn:
    """Zygote mode: run the snippet in this (forked, pre-imported) interpreter.

    What a fresh ``python3 main.py`` would see is recreated where it matters: argv, sys.path,
    environment, stdio objects (block-buffered stdout, line-buffered stderr), Python's signal
    dispositions, a fresh random seed, the shutdown sequence (threads joined, atexit run, streams
    flushed). Modules dorm itself loaded are dropped from sys.modules (they stay in memory: see
    docs/runner.md for what a zygote shares).
    """
    # A fork of the init inherits its non-dumpable flag (it changed uid), which would make the
    # snippet's own /proc/self/{environ,fd,...} root-owned; execve resets it, so do the same.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    main = job["argv"][1] if len(job["argv"]) > 1 else job["main"]
    path = os.path.join(WORK_DIR, main)
    sys.argv = list(job["argv"][1:])
    sys.path[:] = [WORK_DIR, *job["python_path"]]
    os.environ.clear()
    os.environ.update(job["env"])
    stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8")
    stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8")
    stderr = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=True,
    )
    sys.stdin, sys.stdout, sys.stderr = stdin, stdout, stderr
    for name, stream in (("__stdin__", stdin), ("__stdout__", stdout), ("__stderr__", stderr)):
        setattr(sys, name, stream)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for name in [n for n, m in sys.modules.items() if m is not None and not _stdlib_module(m)]:
        del sys.modules[name]
    random.seed()
    module = types.ModuleType("__main__")
    module.__file__ = path
    module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = module
    code = 0
    try:
        with open(path, "rb") as fh:
            source = fh.read()
        exec(compile(source, path, "exec"), module.__dict__)
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException as exc:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_globals is globals():  # hide our own frame
            tb = tb.tb_next
        with contextlib.suppress(BaseException):
            sys.excepthook(type(exc), exc.with_traceback(tb), tb)
        code = 1
    code = _shutdown(code)
    os._exit(code)


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    with contextlib.suppress(BaseException):
        print(exc.code, file=sys.stderr)
    return 1


def _shutdown(code: int) -> int:
    """The interpreter's exit sequence: join threads, run atexit, flush (120 if stdout is gone)."""
    try:
        threading._shutdown()  # type: ignore[attr-defined]
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:
        traceback.print_exc()
    try:
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            if stream is sys.stdout and code == 0:
                code = 120
    return code


def _reap_everything() -> None:
    """Kill every other process of the namespace (we are pid 1: kill(-1) spares only us).

    Again before every wait: a fork bomb may have created a process while the previous kill(-1)
    walked the task list."""
    while True:
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _wait_interactive(ctl: socket.socket, pid: int) -> int:
    """Wait for the program while relaying signals: each byte the service sends on the control
    socket after the files is a signal number for the program (pid 2, our child: its pid cannot
    be reused before we reap it). Returns its wait status."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # no pidfd (old kernel): poll its exit every 20 ms instead
        pidfd = -1
    poller = select.poll()
    if pidfd >= 0:
        poller.register(pidfd, select.POLLIN)
    poller.register(ctl.fileno(), select.POLLIN)
    try:
        while True:
            got, status = os.waitpid(pid, os.WNOHANG)
            if got:
                return status
            for fd, _events in poller.poll(None if pidfd >= 0 else 20):
                if fd != ctl.fileno():
                    continue
                try:
                    data = ctl.recv(256)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:  # the service closed its side: nothing more to relay
                    poller.unregister(fd)
                    continue
                for number in data:
                    if 0 < number < signal.NSIG:
                        with contextlib.suppress(OSError):
                            os.kill(pid, number)
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _artifacts(job: dict[str, Any]) -> list[tuple[str, bytes]]:
    out = []
    limit = int(job.get("max_artifact", 64 << 20))
    for name in job.get("artifacts", ()):
        path = _safe_path(name)
        if os.path.getsize(path) > limit:
            raise BootError(f"artifact {name!r} is larger than {limit} bytes")
        with open(path, "rb") as fh:
            out.append((name, fh.read()))
    return out


def _report(ctl: socket.socket, status: dict[str, Any], blobs: list[bytes] = ()) -> None:  # type: ignore[assignment]
    body = json.dumps(status).encode()
    with contextlib.suppress(OSError):
        ctl.sendall(STATUS.pack(len(body)) + body)
        for blob in blobs:
            ctl.sendall(blob)
        ctl.shutdown(socket.SHUT_WR)


def main() -> int:
    """Entry point (``spawn_call`` target). Always exits 0 once it has reported."""
    ctl = socket.socket(fileno=os.dup(1))  # dup: close-on-exec, and above what the child wires
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    try:
        job, fds = _receive(ctl)
    except Exception as exc:
        _report(ctl, {"error": f"setting up the job failed: {exc}"})
        return 0
    started = time.monotonic()
    try:
        pid = os.fork()
    except OSError as exc:
        _report(ctl, {"error": f"cannot start the program: {exc}"})
        return 0
    if pid == 0:
        ctl.close()
        _child(job, fds)
    for fd in fds:
        os.close(fd)
    if job.get("interactive"):
        status = _wait_interactive(ctl, pid)
    else:
        _, status, _usage = os.wait4(pid, 0)
    wall_us = int((time.monotonic() - started) * 1e6)
    _reap_everything()
    result: dict[str, Any] = {"code": None, "signal": None, "wall_us": wall_us, "artifacts": []}
    if os.WIFSIGNALED(status):
        result["signal"] = os.WTERMSIG(status)
    else:
        result["code"] = os.waitstatus_to_exitcode(status)
    blobs: list[bytes] = []
    if job["mode"] == "compile" and result["code"] == 0:
        try:
            found = _artifacts(job)
        except (OSError, BootError) as exc:
            result["error"] = f"the compiler succeeded but left no usable output: {exc}"
        else:
            result["artifacts"] = [[name, len(data)] for name, data in found]
            blobs = [data for _, data in found]
    _report(ctl, result, blobs)
    return 0
