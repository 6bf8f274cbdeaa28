"""The fork server: the only process that forks tenant instances.

Why a separate process: the gateway runs an event loop and helper threads, and fork() from a
threaded process can deadlock the child on a lock some other thread held. This process is started
once at boot, is single-threaded, holds no secrets (its environment is scrubbed), and does three
things in one epoll loop:
  1. spawns instances on request (process isolation here; sandboxes plug in through `sandbox`),
  2. pumps each instance's stdout+stderr into its size-rotated log file,
  3. reaps exited instances and reports how they ended (code, signal, OOM).
It talks to the gateway over one Unix stream socket with length-prefixed JSON frames. When the
gateway goes away (EOF), it kills every instance and exits, so nothing outlives the gateway.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import importlib
import os
import selectors
import shutil
import signal
import socket
import struct
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import orjson

from gateway.logs import RotatingLog

FRAME = struct.Struct("!I")
MAX_FRAME = 4 * 1024 * 1024
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def encode_frame(message: dict[str, Any]) -> bytes:
    body = orjson.dumps(message)
    return FRAME.pack(len(body)) + body


@dataclass
class Child:
    """One running instance as the fork server sees it."""

    id: str
    pid: int
    run_dir: Path
    log: RotatingLog
    log_fd: int
    sandbox: Any = None  # sandboxes.Sandbox when confined
    exit_status: int | None = None
    pending: bytearray = field(default_factory=bytearray)


class ForkServer:
    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.control.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.children: dict[str, Child] = {}
        self.by_pid: dict[int, Child] = {}
        self.by_log_fd: dict[int, Child] = {}
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.running = True
        self.sig_r, self.sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.sig_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the gateway, which tells us
        self.selector.register(self.control, selectors.EVENT_READ, "control")
        self.selector.register(self.sig_r, selectors.EVENT_READ, "signal")
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)

    # -- main loop --------------------------------------------------------------------------------
    def serve(self) -> None:
        while self.running or self.children:
            for key, events in self.selector.select(timeout=1.0):
                if key.data == "control":
                    if events & selectors.EVENT_READ:
                        self.read_control()
                    if events & selectors.EVENT_WRITE:
                        self.flush()
                elif key.data == "signal":
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.sig_r, 4096)
                    self.reap()
                else:
                    self.pump_log(key.data)
            self.reap()

    def stop(self) -> None:
        """Kill every instance; the loop ends once all are reaped."""
        self.running = False
        for child in list(self.children.values()):
            self.kill(child, signal.SIGKILL)

    # -- control channel --------------------------------------------------------------------------
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
        if not self.running and self.control.fileno() < 0:
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
            try:
                child = self.spawn(message)
            except Exception as exc:  # any failure is reported, never fatal to the server
                self.send({"ev": "spawn_failed", "id": message["id"], "error": str(exc)})
            else:
                self.send({"ev": "spawned", "id": child.id, "pid": child.pid})
        elif op == "signal":
            found = self.children.get(message["id"])
            if found is not None:
                self.kill(found, int(message["sig"]))
        elif op == "shutdown":
            self.stop()

    # -- spawning ---------------------------------------------------------------------------------
    def spawn(self, req: dict[str, Any]) -> Child:
        instance_id: str = req["id"]
        if instance_id in self.children:
            raise RuntimeError(f"instance {instance_id} is already running")
        run_dir = Path(req["run_dir"])
        shutil.rmtree(run_dir, ignore_errors=True)  # a stale socket would fake readiness
        run_dir.mkdir(parents=True, mode=0o700)
        log = RotatingLog(Path(req["log_path"]), int(req["log_max_bytes"]), int(req["log_keep"]))
        log_r, log_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        argv: list[str] = req["argv"]
        env: dict[str, str] = req["env"]
        cwd: str = req["cwd"] or str(run_dir)
        call: str | None = req.get("call")
        try:
            pid = os.fork()
            if pid == 0:  # child: never returns
                self._exec_child(argv, env, cwd, log_w, err_w, call)
            os.close(log_w)
            os.close(err_w)
            failure = _read_all(err_r)
        except BaseException:
            for fd in (log_r, log_w, err_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            log.close()
            raise
        finally:
            os.close(err_r)
        if failure:
            os.close(log_r)
            os.waitpid(pid, 0)
            shutil.rmtree(run_dir, ignore_errors=True)
            log.write(b"[dorm] failed to start: " + failure + b"\n")
            log.close()
            raise RuntimeError(failure.decode("utf-8", "replace"))
        fcntl.fcntl(log_r, fcntl.F_SETFL, os.O_NONBLOCK)
        child = Child(id=instance_id, pid=pid, run_dir=run_dir, log=log, log_fd=log_r)
        self.children[instance_id] = child
        self.by_pid[pid] = child
        self.by_log_fd[log_r] = child
        self.selector.register(log_r, selectors.EVENT_READ, child)
        log.write(f"[dorm] started pid {pid}: {' '.join(argv)[:500]}\n".encode())
        return child

    def _exec_child(
        self, argv: list[str], env: dict[str, str], cwd: str, out: int, err: int, call: str | None
    ) -> None:
        """Runs in the forked child: detach, wire stdio, then exec `argv` or call `call`.

        Failures before the tenant's code runs are reported on `err` (a CLOEXEC pipe the parent
        reads until EOF): exec closes it; in zygote mode (`call`), it is closed explicitly.
        """
        step = "setsid"
        try:
            os.setsid()
            step = "pdeathsig"
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            step = "stdio"
            os.dup2(self.devnull, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
                signal.signal(sig, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            step = "close fds"
            os.closerange(3, err)
            os.closerange(err + 1, 0x7FFFFFFF)
            step = f"chdir {cwd}"
            os.chdir(cwd)
            if call is not None:
                step = f"call {call}"
                _call_in_child(_resolve(call), argv, env, err)
            step = f"exec {argv[0]}"
            os.execvpe(argv[0], argv, env)
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                os.write(err, f"{step}: {detail}".encode())
        finally:
            os._exit(127)

    # -- running children -------------------------------------------------------------------------
    def kill(self, child: Child, sig: int) -> None:
        """Signal the instance's whole process group, so helpers it forked go too."""
        if child.exit_status is not None:
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
        self.by_log_fd.pop(child.log_fd, None)
        child.log_fd = -1
        self.maybe_finish(child)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.by_pid.pop(pid, None)
            if child is None:
                continue
            child.exit_status = status
            # Orphans the instance left in its process group must not outlive it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            self.maybe_finish(child)

    def maybe_finish(self, child: Child) -> None:
        """Report an exit once the process is reaped and its log pipe is drained."""
        if child.exit_status is None:
            return
        if child.log_fd >= 0:
            # Drain what is buffered; a grandchild holding the pipe was just killed, so EOF follows.
            self.pump_log(child)
            return
        status = child.exit_status
        code = os.waitstatus_to_exitcode(status)
        info: dict[str, Any] = {"ev": "exited", "id": child.id, "pid": child.pid, "oom": False}
        if code < 0:
            info.update(code=None, signal=-code)
            how = (
                f"killed by signal {signal.Signals(-code).name}" if -code in _SIGNALS else "killed"
            )
        else:
            info.update(code=code, signal=None)
            how = f"exited with code {code}"
        child.log.write(f"[dorm] pid {child.pid} {how}\n".encode())
        child.log.close()
        shutil.rmtree(child.run_dir, ignore_errors=True)
        del self.children[child.id]
        self.send(info)


_SIGNALS = {s.value for s in signal.Signals}
# Modules imported before any fork, so zygote-mode children start with them loaded (and share
# their pages with the fork server): the python runtimes pull in granian and uvloop.
PRELOAD = ("runtimes.python",)


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
    fd = int(sys.argv[1])
    control = socket.socket(fileno=fd)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        raise SystemExit("fork server: the gateway is already gone")
    for module in PRELOAD:
        importlib.import_module(module)
    server = ForkServer(control)
    server.serve()


if __name__ == "__main__":
    main()
