"""One execution: a fresh sandbox per stage (compile, run), never reused; output captured here.

The service's event loop drives everything; the blocking fork work happens in the spawner process
(spawner.py), reached over a SEQPACKET socket. For each stage this module creates the sandbox's
control socket pair and its stdin/stdout/stderr pipes, sends the sandbox's end to the spawner
(with limits only), sends the code and the pipes to the sandbox's init (boot.py) directly, feeds
stdin, reads stdout and stderr with a per-stream byte cap (over it: truncate, flag OL/EL, kill),
and turns the init's report plus the spawner's exit report into Piston's stage result.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runtimes.runner.api import Job, JobFile
from runtimes.runner.languages import Language
from runtimes.runner.limits import Settings, StageLimits
from runtimes.runner.pools import PoolDef, aggregate
from runtimes.runner.wire import MAGIC, PREFIX, STATUS, WORK_DIR

log = logging.getLogger("dorm.runner")

MAX_STATUS = 128 << 20  # the init's report plus compile artifacts
EXIT_GRACE = 5.0  # after the deadline, how long until the spawner must have reported the exit
DRAIN_GRACE = 2.0  # after the exit, how long the output pipes may take to reach EOF
SPAWNER_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONPATH")
QUERY_TIMEOUT = 2.0  # a spawner answers between two builds (<= ~25 ms each) or not at all


class SpawnerGone(RuntimeError):
    """The spawner process died; the executions it had are lost."""


class StdinFull(Exception):
    """An interactive client sent more stdin than the program has read, beyond the bound."""


MAX_PENDING_SIGNALS = 64  # signals asked for before the stage's init can take them


class Live:
    """An interactive execution (Piston's `/api/v2/connect`), as the executor sees it.

    The session (connect.py) subclasses it: `stage`, `output` and `exit` are called as the
    execution goes; `write`, `signal` and `kill` are what the client asks for. Stdin goes to the
    run stage only (a compile stage gets EOF at once); what arrives before the run stage has
    started waits here. Pending stdin — here or in the pipe's write buffer, not yet read by the
    program — is bounded by `max_stdin` (StdinFull). Signals go to the current stage's program
    through its init (boot.py), queued while the stage is starting.
    """

    def __init__(self, max_stdin: int) -> None:
        self.max_stdin = max_stdin
        self.buffered = bytearray()
        self.eof = False
        self.signals: list[int] = []
        self.killed = False
        self._stdin: asyncio.WriteTransport | None = None
        self._ctl: socket.socket | None = None
        self._killer: Callable[[], None] | None = None

    # -- called by the executor ---------------------------------------------------------------
    def stage(self, name: str) -> None:
        """A stage ("compile", "run") starts."""

    def output(self, stream: str, data: bytes) -> None:
        """Bytes the program wrote to "stdout" or "stderr" (already within the cap)."""

    def exit(self, name: str, result: dict[str, Any]) -> None:
        """A stage ended; `result` is its Piston stage result."""

    def attach(self, killer: Callable[[], None]) -> None:
        self._killer = killer
        if self.killed:
            killer()

    def attach_stdin(self, transport: asyncio.WriteTransport) -> None:
        self._stdin = transport
        if self.buffered:
            transport.write(bytes(self.buffered))
            self.buffered.clear()
        if self.eof:
            transport.close()

    def attach_ctl(self, ctl: socket.socket) -> None:
        self._ctl = ctl
        signals, self.signals = self.signals, []
        for number in signals:
            self.signal(number)

    def detach(self) -> None:
        self._stdin = None
        self._ctl = None
        self._killer = None

    # -- called by the session ----------------------------------------------------------------
    def pending_stdin(self) -> int:
        stdin = self._stdin
        waiting = stdin.get_write_buffer_size() if stdin is not None else 0
        return len(self.buffered) + waiting

    def write(self, data: bytes, eof: bool = False) -> None:
        if self.pending_stdin() + len(data) > self.max_stdin:
            raise StdinFull(
                f"more than {self.max_stdin} bytes of stdin are waiting for the program to read"
            )
        if self.eof:
            return
        self.eof = eof
        stdin = self._stdin
        if stdin is None:
            self.buffered += data
            return
        if data and not stdin.is_closing():
            stdin.write(data)
        if eof:
            stdin.close()

    def signal(self, number: int) -> None:
        ctl = self._ctl
        if ctl is None:
            if len(self.signals) < MAX_PENDING_SIGNALS:
                self.signals.append(number)
            return
        with contextlib.suppress(OSError):  # a full buffer (a signal flood) or a gone init
            ctl.send(bytes([number]))

    def kill(self) -> None:
        """Kill the current stage's sandbox and start no further stage."""
        self.killed = True
        if self._killer is not None:
            self._killer()


@dataclass
class Exit:
    code: int | None
    signal: int | None
    killed: str | None
    oom: bool
    cpu_us: int | None
    memory: int | None
    wall_us: int


@dataclass
class Pending:
    spawned: asyncio.Future[int]
    exited: asyncio.Future[Exit]


class SpawnerClient:
    """The service's side of one spawner process: start it, send requests, route its events."""

    def __init__(self, settings: dict[str, Any], index: int) -> None:
        self.settings = settings
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.pending: dict[str, Pending] = {}
        self.ready: asyncio.Future[None] | None = None
        self.load = 0
        self.busy = False  # topping up its pool of pre-forked sandboxes (blocks it for ms)
        self.closing = False
        self.queries: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.query_ids = itertools.count(1)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {k: os.environ[k] for k in SPAWNER_ENV if k in os.environ}
        # Exec'd (vfork + exec, no preexec_fn), never forked: it must not inherit our memory.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtimes.runner.spawner", str(child.fileno())],
            pass_fds=(child.fileno(),),
            env=env,
            stdin=subprocess.DEVNULL,
            close_fds=True,
            # Its own session: the SIGTERM the gateway sends our process group on shutdown must
            # not kill it before it has reaped its sandboxes and removed their cgroups (it stops
            # when told to, or when we are gone: parent-death signal, EOF on its socket).
            start_new_session=True,
        )
        child.close()
        parent.setblocking(False)
        self.sock = parent
        self.ready = loop.create_future()
        parent.send(json.dumps(self.settings).encode())
        loop.add_reader(parent.fileno(), self._on_readable)
        await asyncio.wait_for(asyncio.shield(self.ready), 60)

    def _on_readable(self) -> None:
        assert self.sock is not None
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._lost()
                return
            self._dispatch(json.loads(data))

    def _dispatch(self, ev: dict[str, Any]) -> None:
        kind = ev.get("ev")
        if kind == "ready":
            if self.ready is not None and not self.ready.done():
                self.ready.set_result(None)
            return
        if kind == "busy":
            self.busy = bool(ev["busy"])
            return
        if kind == "pools":
            query = self.queries.get(str(ev.get("id")))
            if query is not None and not query.done():
                query.set_result(ev)
            return
        pending = self.pending.get(ev.get("id", ""))
        if pending is None:
            return
        if kind == "spawned" and not pending.spawned.done():
            pending.spawned.set_result(int(ev["pid"]))
        elif kind == "failed":
            if not pending.spawned.done():
                pending.spawned.set_exception(RuntimeError(ev["error"]))
            self.pending.pop(ev["id"], None)
        elif kind == "exited":
            self.pending.pop(ev["id"], None)
            if not pending.spawned.done():
                pending.spawned.set_result(0)
            if not pending.exited.done():
                pending.exited.set_result(
                    Exit(
                        ev["code"],
                        ev["signal"],
                        ev["killed"],
                        bool(ev["oom"]),
                        ev["cpu_us"],
                        ev["memory"],
                        int(ev["wall_us"]),
                    )
                )

    def _lost(self) -> None:
        loop = asyncio.get_running_loop()
        if self.sock is not None:
            loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        pending, self.pending = self.pending, {}
        for p in pending.values():
            for fut in (p.spawned, p.exited):
                if not fut.done():
                    fut.set_exception(SpawnerGone("the runner's spawner process died"))
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(SpawnerGone("the spawner exited during start-up"))
        if not self.closing:
            log.error("runner spawner %d died; restarting it", self.index)
            task = loop.create_task(self._restart())
            task.add_done_callback(lambda t: t.exception())

    async def _restart(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self.proc.wait, 5)
        await asyncio.sleep(0.2)
        await self.start()

    def _send(self, message: dict[str, Any], fds: list[int] = ()) -> None:  # type: ignore[assignment]
        if self.sock is None:
            raise SpawnerGone("the runner's spawner is not running")
        data = json.dumps(message).encode()
        try:
            socket.send_fds(self.sock, [data], fds) if fds else self.sock.send(data)
        except BlockingIOError:
            # The spawner is behind by a socket buffer of requests; wait for it briefly.
            self.sock.setblocking(True)
            self.sock.settimeout(5)
            try:
                socket.send_fds(self.sock, [data], fds) if fds else self.sock.send(data)
            finally:
                self.sock.setblocking(False)

    def spawn(self, sid: str, uid: int, limits: StageLimits, ctl_fd: int) -> Pending:
        loop = asyncio.get_running_loop()
        pending = Pending(loop.create_future(), loop.create_future())
        self.pending[sid] = pending
        try:
            self._send({"op": "spawn", "id": sid, "uid": uid, **limits.spawn_fields()}, [ctl_fd])
        except Exception:
            self.pending.pop(sid, None)
            raise
        return pending

    async def pools(self) -> dict[str, Any] | None:
        """This spawner's pool state, or None if it is down or does not answer in time."""
        if self.sock is None:
            return None
        qid = f"q{next(self.query_ids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.queries[qid] = future
        try:
            self._send({"op": "pools", "id": qid})
            return await asyncio.wait_for(future, QUERY_TIMEOUT)
        except (TimeoutError, SpawnerGone, OSError):
            return None
        finally:
            self.queries.pop(qid, None)

    def configure_pool(self, pool: dict[str, Any]) -> None:
        """New bounds for one pool: kept in the settings a restarted spawner gets, and sent."""
        self.settings["pools"] = [
            pool if p["name"] == pool["name"] else p for p in self.settings.get("pools", [])
        ]
        with contextlib.suppress(SpawnerGone, OSError):
            self._send({"op": "pool_config", **pool})

    def kill(self, sid: str, reason: str) -> None:
        if sid in self.pending:
            with contextlib.suppress(SpawnerGone, OSError):
                self._send({"op": "kill", "id": sid, "reason": reason})

    async def close(self) -> None:
        self.closing = True
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.send(json.dumps({"op": "stop"}).encode())
        if self.proc is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 10)
            except TimeoutError:
                self.proc.kill()


@dataclass
class Capture:
    """One output stream with its byte cap; `output` is shared by both streams (arrival order)."""

    cap: int
    output: bytearray
    data: bytearray = field(default_factory=bytearray)
    over: bool = False


class _Reader(asyncio.Protocol):
    def __init__(
        self,
        capture: Capture,
        on_over: Any,
        done: asyncio.Future[None],
        forward: Callable[[bytes], None] | None = None,
    ) -> None:
        self.capture = capture
        self.on_over = on_over
        self.done = done
        self.forward = forward

    def data_received(self, data: bytes) -> None:
        cap = self.capture
        if cap.over:
            return
        room = cap.cap - len(cap.data)
        piece = data if len(data) <= room else data[:room]
        cap.data += piece
        cap.output += piece
        if self.forward is not None and piece:
            self.forward(piece)
        if len(data) > room:
            cap.over = True
            self.on_over()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


class _Writer(asyncio.Protocol):
    def connection_lost(self, exc: Exception | None) -> None:
        pass


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def error_stage(message: str) -> dict[str, Any]:
    return {
        "stdout": "",
        "stderr": "",
        "output": "",
        "code": None,
        "signal": None,
        "message": message,
        "status": "XX",
        "cpu_time": None,
        "wall_time": None,
        "memory": None,
    }


class Executor:
    """Runs jobs: one or more spawner processes, a uid pool, and the per-stage plumbing."""

    def __init__(
        self,
        settings: Settings,
        spawner_settings: dict[str, Any],
        pools: list[PoolDef] | None = None,
    ) -> None:
        self.settings = settings
        self.pools = pools or []
        count = max(1, settings.spawners)
        self.spawners = [
            SpawnerClient(
                {
                    **spawner_settings,
                    "cgroup_parent": f"{settings.cgroup_parent}-{i}",
                    "pools": [d.spawner_settings(count, i) for d in self.pools],
                },
                i,
            )
            for i in range(count)
        ]
        self.free_uids = list(range(settings.uid_last, settings.uid_first - 1, -1))
        self.ids = itertools.count(1)
        self.turn = 0
        self.python_path: list[str] = []

    async def start(self) -> None:
        await asyncio.gather(*(s.start() for s in self.spawners))

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.spawners))

    async def pool_state(self, shape: dict[str, Any]) -> list[dict[str, Any]]:
        """Every pool's state summed over the spawners that answered (see pools.aggregate)."""
        answers = await asyncio.gather(*(s.pools() for s in self.spawners))
        return aggregate(self.pools, list(answers), shape)

    def configure_pool(self, pool: PoolDef, min_idle: int, max_idle: int) -> None:
        """Set a pool's total bounds; each spawner gets its share at once."""
        pool.min_idle, pool.max_idle = min_idle, max_idle
        for index, spawner in enumerate(self.spawners):
            spawner.configure_pool(pool.spawner_settings(len(self.spawners), index))

    def _spawner(self) -> SpawnerClient:
        """An idle spawner (not refilling its pool) with the fewest executions; ties rotate."""
        self.turn = (self.turn + 1) % len(self.spawners)
        order = self.spawners[self.turn :] + self.spawners[: self.turn]
        return min(order, key=lambda s: (s.busy, s.load))

    async def execute(self, job: Job, live: Live | None = None) -> dict[str, Any]:
        """The full Piston response body for one job; with `live`, interactively (its
        callbacks see each stage start, its output as it comes and its result)."""
        lang = job.language
        if not self.free_uids:
            raise RuntimeError("no free sandbox uid (widen runner.uid_range)")
        uid = self.free_uids.pop()
        spawner = self._spawner()
        spawner.load += 1
        try:
            result: dict[str, Any] = {"language": lang.name, "version": lang.version}
            files = list(job.files)
            if lang.compile is not None:
                if live is not None:
                    live.stage("compile")
                compiled, artifacts = await self._stage(
                    spawner,
                    uid,
                    "compile",
                    lang,
                    lang.compile,
                    job,
                    files,
                    b"",
                    job.compile_limits,
                    live,
                )
                result["compile"] = compiled
                if live is not None:
                    live.exit("compile", compiled)
                if compiled["code"] != 0 or compiled["status"] is not None:
                    result["run"] = compiled  # Piston: run = compile when the run never started
                    return result
                files += [JobFile(name, data, False, 0o755) for name, data in artifacts]
            run_argv = lang.run
            mode = "exec"
            if lang.zygote and self.settings.python_mode == "zygote":
                mode = "python"
            if live is not None:
                if live.killed:
                    return result
                live.stage("run")
            result["run"], _ = await self._stage(
                spawner, uid, mode, lang, run_argv, job, files, job.stdin, job.run_limits, live
            )
            if live is not None:
                live.exit("run", result["run"])
            return result
        finally:
            spawner.load -= 1
            self.free_uids.append(uid)

    @staticmethod
    def _argv(template: tuple[str, ...], lang: Language, job: Job) -> list[str]:
        code = [f.name for f in job.files if f.utf8]
        sources = [n for n in code if not n.endswith(lang.headers)] if lang.headers else code
        out: list[str] = []
        for word in template:
            if word == "{args}":
                out += job.args
            elif word == "{sources}":
                out += sources
            else:
                out.append(word.replace("{main}", code[0]))
        return out

    async def _stage(
        self,
        spawner: SpawnerClient,
        uid: int,
        mode: str,
        lang: Language,
        template: tuple[str, ...],
        job: Job,
        files: list[JobFile],
        stdin: bytes,
        limits: StageLimits,
        live: Live | None = None,
    ) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
        loop = asyncio.get_running_loop()
        sid = f"{next(self.ids)}"
        argv = self._argv(template, lang, job)
        header = {
            "mode": "compile" if mode == "compile" else mode,
            "argv": argv,
            "env": {
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "HOME": "/tmp",
                "TMPDIR": "/tmp",
                "LANG": "C.UTF-8",
                "PISTON_LANGUAGE": lang.name,
                **lang.env,
            },
            "main": argv[1] if len(argv) > 1 else "",
            "files": [[f.name, len(f.data), f.mode] for f in files],
            "artifacts": list(lang.artifacts) if mode == "compile" else [],
            "max_artifact": limits.file_size,
            "python_path": self.python_path,
            "work_dir": WORK_DIR,
            "interactive": live is not None,
        }
        ctl, ctl_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pipes: list[int] = []
        try:
            stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            pipes = [stdin_r, stdin_w, out_r, out_w, err_r, err_w]
            body = json.dumps(header).encode()
            socket.send_fds(ctl, [PREFIX.pack(MAGIC, len(body))], [stdin_r, out_w, err_w])
            for fd in (stdin_r, out_w, err_w):
                os.close(fd)
                pipes.remove(fd)
            pending = spawner.spawn(sid, uid, limits, ctl_child.fileno())
        except Exception as exc:
            for fd in pipes:
                os.close(fd)
            ctl.close()
            return error_stage(f"internal error: {exc}"), []
        finally:
            ctl_child.close()
        ctl.setblocking(False)
        output = bytearray()
        out_cap = Capture(limits.output, output)
        err_cap = Capture(limits.output, output)
        killed: list[str] = []

        def over(reason: str) -> None:
            if not killed:
                killed.append(reason)
                spawner.kill(sid, reason)

        out_done: asyncio.Future[None] = loop.create_future()
        err_done: asyncio.Future[None] = loop.create_future()
        transports: list[asyncio.BaseTransport] = []
        out_fwd = err_fwd = None
        if live is not None:
            out_fwd = functools.partial(live.output, "stdout")
            err_fwd = functools.partial(live.output, "stderr")
            live.attach(lambda: over("killed"))
        try:
            out_t, _ = await loop.connect_read_pipe(
                lambda: _Reader(out_cap, lambda: over("OL"), out_done, out_fwd),
                os.fdopen(out_r, "rb", 0),
            )
            transports.append(out_t)
            err_t, _ = await loop.connect_read_pipe(
                lambda: _Reader(err_cap, lambda: over("EL"), err_done, err_fwd),
                os.fdopen(err_r, "rb", 0),
            )
            transports.append(err_t)
            writer, _ = await loop.connect_write_pipe(_Writer, os.fdopen(stdin_w, "wb", 0))
            transports.append(writer)
            if live is not None and mode != "compile":
                live.attach_stdin(writer)  # the client's stdin, as it comes
            else:
                if stdin and live is None:
                    writer.write(stdin)
                writer.close()  # EOF once written (or dropped if the program never reads it)
            status_task = loop.create_task(self._send_and_receive(ctl, body, files, live))
            try:
                await pending.spawned
            except Exception as exc:
                status_task.cancel()
                return error_stage(f"internal error: could not start the sandbox: {exc}"), []
            try:
                ended = await asyncio.wait_for(
                    asyncio.shield(pending.exited), limits.wall_ms / 1000 + EXIT_GRACE
                )
            except TimeoutError:
                spawner.kill(sid, "wall")
                ended = await asyncio.wait_for(asyncio.shield(pending.exited), EXIT_GRACE)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(out_done, err_done), DRAIN_GRACE)
            try:
                report = await asyncio.wait_for(status_task, DRAIN_GRACE)
            except (TimeoutError, OSError, ValueError):
                report = None
        except Exception as exc:
            log.exception("stage %s failed", sid)
            return error_stage(f"internal error: {exc}"), []
        finally:
            if live is not None:
                live.detach()
            for t in transports:
                t.close()
            ctl.close()
        return self._result(
            report, ended, killed[0] if killed else None, out_cap, err_cap, output, mode
        )

    async def _send_and_receive(
        self, ctl: socket.socket, body: bytes, files: list[JobFile], live: Live | None = None
    ) -> tuple[dict[str, Any], list[tuple[str, bytes]]] | None:
        """Send the header and files to the init, then read its report until EOF (an
        interactive stage's signals go on the same socket once the files are sent)."""
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(ctl, body)
            for f in files:
                if f.data:
                    await loop.sock_sendall(ctl, f.data)
            if live is not None:
                live.attach_ctl(ctl)
        except OSError:
            pass  # the sandbox died early: its exit report says why
        data = bytearray()
        while len(data) <= MAX_STATUS:
            try:
                chunk = await loop.sock_recv(ctl, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
        if len(data) < STATUS.size:
            return None
        (size,) = STATUS.unpack_from(data)
        status = json.loads(bytes(data[STATUS.size : STATUS.size + size]))
        offset = STATUS.size + size
        artifacts = []
        for name, length in status.get("artifacts", []):
            artifacts.append((name, bytes(data[offset : offset + length])))
            offset += length
        return status, artifacts

    def _result(
        self,
        report: tuple[dict[str, Any], list[tuple[str, bytes]]] | None,
        ended: Exit,
        over: str | None,
        out: Capture,
        err: Capture,
        output: bytearray,
        mode: str,
    ) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
        status: dict[str, Any] | None = report[0] if report else None
        artifacts = report[1] if report else []
        code: int | None = None
        sig: int | None = None
        state: str | None = None
        message: str | None = None
        killed = over or ended.killed
        if killed == "OL":
            state, message, sig = "OL", "stdout length exceeded", signal.SIGKILL
        elif killed == "EL":
            state, message, sig = "EL", "stderr length exceeded", signal.SIGKILL
        elif killed == "wall":
            state, message, sig = "TO", "Time limit exceeded (wall clock)", signal.SIGKILL
        elif killed == "cpu":
            state, message, sig = "TO", "Time limit exceeded", signal.SIGKILL
        elif status is not None and status.get("error"):
            state, message = "XX", f"internal error: {status['error']}"
        elif status is not None:
            code, sig = status.get("code"), status.get("signal")
        elif ended.signal is not None:
            sig = ended.signal  # the whole sandbox died (its init too): OOM or an outside kill
        else:
            state = "XX"
            message = f"internal error: the sandbox's init exited with code {ended.code}"
        if state is None:
            if sig is not None:
                state, message = "SG", f"Caught fatal signal {sig}"
                if ended.oom:
                    message += " (out of memory: memory limit exceeded)"
            elif code:
                state, message = "RE", f"Exited with error status {code}"
        if not artifacts and mode == "compile" and code == 0 and state is None:
            state, message = "XX", "internal error: the compiler's output was lost"
        wall_us = status.get("wall_us") if status else None
        result = {
            "stdout": out.data.decode("utf-8", "replace"),
            "stderr": err.data.decode("utf-8", "replace"),
            "output": output.decode("utf-8", "replace"),
            "code": None if sig is not None else code,
            "signal": None if sig is None else signal_name(sig),
            "message": message,
            "status": state,
            "cpu_time": None if ended.cpu_us is None else round(ended.cpu_us / 1000),
            "wall_time": round((wall_us if wall_us is not None else ended.wall_us) / 1000),
            "memory": ended.memory,
        }
        return result, artifacts
