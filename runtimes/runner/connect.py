"""Interactive executions: Piston's WebSocket `/api/v2/connect`, served with wsproto.

The gateway tunnels the Upgrade to the service like any app's WebSocket; h11 reads the request
(service.py) and this module answers the handshake and then speaks WebSocket frames through
wsproto (sans-IO) on the same stream.

The protocol is Piston's (engineer-man/piston, api/src/api/v2.js): the client sends
`{"type": "init", <an /execute body>}` within a second, then `{"type": "data", "stream": "stdin",
"data": ...}` and `{"type": "signal", "signal": "SIGINT"}` at any time; the server sends
`{"type": "runtime", language, version}`, `{"type": "stage", "stage": "compile"|"run"}`,
`{"type": "data", "stream": "stdout"|"stderr", "data": ...}` as the program writes,
`{"type": "exit", "stage", "code", "signal", ...}` after each stage, and closes with 4999
"Job Completed". Misuse closes with Piston's codes: 4000 Already Initialized, 4001
Initialization Timeout, 4002 Notified Error (after an `{"type": "error", "message"}`), 4003 Not
yet initialized, 4004 Can only write to stdin, 4005 Invalid signal; an oversized message closes
with 1009, a protocol error with wsproto's code (1002, 1007).

Every wait is bounded (init, a slot, each stage's limits, the closing handshake) and every
buffer too (message size, pending stdin, output per stream as for /execute, the socket's write
buffer). A client that goes away, or any close, kills the program.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import signal
import time
from typing import TYPE_CHECKING, Any

import h11
import orjson
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import LocalProtocolError, generate_accept_token

from runtimes.runner.api import ApiError, Job, parse_job
from runtimes.runner.executor import Live, SpawnerGone, StdinFull

if TYPE_CHECKING:
    from runtimes.runner.service import RunnerService

log = logging.getLogger("dorm.runner")

CONNECT_PATHS = ("/api/v2/connect", "/api/v2/piston/connect")
INIT_TIMEOUT = 1.0  # Piston's: the init message must come within a second of the handshake
SLOT_TIMEOUT = 30.0  # waiting for an execution slot (the queue is bounded too)
CLOSE_TIMEOUT = 5.0  # after our close frame, how long the client has to answer it
JOB_GRACE = 15.0  # after a kill or a close, how long the execution may take to wind down
MAX_PENDING_STDIN = 1 << 20  # stdin sent but not yet read by the program
MAX_OUTBOX = 4 << 20  # bytes queued for a client that does not read them
READ_SIZE = 65536

# Piston accepts any signal name of the platform; these are Linux's standard signals (and their
# aliases: SIGIOT, SIGCLD, SIGPOLL).
SIGNALS = {
    name: int(number) for name, number in signal.Signals.__members__.items() if 0 < number < 32
}

# Piston's close codes.
ALREADY_INITIALIZED = (4000, "Already Initialized")
INIT_TIMED_OUT = (4001, "Initialization Timeout")
NOTIFIED_ERROR = (4002, "Notified Error")
NOT_INITIALIZED = (4003, "Not yet initialized")
STDIN_ONLY = (4004, "Can only write to stdin")
INVALID_SIGNAL = (4005, "Invalid signal")
JOB_COMPLETED = (4999, "Job Completed")
TOO_BIG = (1009, "Message Too Big")


def _header(request: h11.Request, name: bytes) -> bytes:
    for key, value in request.headers:
        if key == name:
            return bytes(value)
    return b""


def handshake_error(request: h11.Request) -> tuple[int, str] | None:
    """Why this request is not a WebSocket handshake we accept (status, message), or None."""
    if request.method != b"GET":
        return 405, f"{request.method.decode('latin-1')} is not allowed on /api/v2/connect"
    upgrade = _header(request, b"upgrade").lower()
    if b"websocket" not in [t.strip() for t in upgrade.split(b",")]:
        return 426, "/api/v2/connect is a WebSocket endpoint (Upgrade: websocket is required)"
    if _header(request, b"sec-websocket-version").strip() != b"13":
        return 400, "Sec-WebSocket-Version 13 is required"
    if not _header(request, b"sec-websocket-key").strip():
        return 400, "Sec-WebSocket-Key is required"
    return None


async def accept(
    service: RunnerService,
    conn: h11.Connection,
    request: h11.Request,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    client: str,
) -> None:
    """Answer the handshake (101) and run the session until it is closed."""
    key = _header(request, b"sec-websocket-key").strip()
    head = conn.send(
        h11.InformationalResponse(
            status_code=101,
            headers=[
                ("upgrade", "websocket"),
                ("connection", "Upgrade"),
                ("sec-websocket-accept", generate_accept_token(key).decode("latin-1")),
            ],
        )
    )
    writer.write(head or b"")
    trailing, _closed = conn.trailing_data
    session = Session(service, reader, writer, client, bytes(trailing))
    await session.run()


class Session(Live):
    """One WebSocket connection: at most one execution, then closed."""

    def __init__(
        self,
        service: RunnerService,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: str,
        trailing: bytes,
    ) -> None:
        super().__init__(MAX_PENDING_STDIN)
        self.service = service
        self.reader = reader
        self.writer = writer
        self.client = client
        self.ws = Connection(ConnectionType.SERVER)
        self.trailing = trailing
        self.message = bytearray()  # the message being received (text as UTF-8)
        self.max_message = service.settings.max_body
        self.initialized = False
        self.job_task: asyncio.Task[None] | None = None
        self.running = False  # the execution has its slot
        self.close_deadline: float | None = None
        self.wakeup: asyncio.Future[None] | None = None
        self.gone = False
        self.decoders = {
            name: codecs.getincrementaldecoder("utf-8")("replace") for name in ("stdout", "stderr")
        }

    # -- the connection -----------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(INIT_TIMEOUT, self._init_timeout)
        read: asyncio.Task[bytes] | None = None
        try:
            if self.trailing:
                self.ws.receive_data(self.trailing)
                self._events()
            while not self.gone and self.ws.state is not ConnectionState.CLOSED:
                timeout = None
                if self.close_deadline is not None:
                    timeout = self.close_deadline - time.monotonic()
                    if timeout <= 0:
                        break  # the client did not answer our close frame in time
                if read is None:
                    read = loop.create_task(self.reader.read(READ_SIZE))
                self.wakeup = loop.create_future()  # close() sets it: a deadline to apply
                await asyncio.wait(
                    (read, self.wakeup), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not read.done():
                    continue
                data, read = read.result(), None
                if not data:
                    self.gone = True
                    break
                self.ws.receive_data(data)
                self._events()
        except (ConnectionError, OSError, LocalProtocolError):
            self.gone = True
        except Exception:  # a bug of ours: logged here, a well-formed close for the client
            log.exception("interactive session failed")
            with contextlib.suppress(Exception):
                self.close(1011, "internal error")
        finally:
            timer.cancel()
            if read is not None:
                read.cancel()
            self.kill()
            await self._wind_down()
            self.writer.close()

    async def _wind_down(self) -> None:
        """Wait (bounded) for the execution to end; it was killed if it had not."""
        task = self.job_task
        if task is None or task.done():
            return
        if not self.running:  # still waiting for a slot: stop waiting
            task.cancel()
        try:
            await asyncio.wait_for(asyncio.shield(task), JOB_GRACE)
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
        except Exception:  # logged by the task itself
            log.warning("an interactive execution did not end %.0f s after its kill", JOB_GRACE)

    def _init_timeout(self) -> None:
        if not self.initialized:
            self.close(*INIT_TIMED_OUT)

    def _events(self) -> None:
        for event in self.ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                if self.close_deadline is not None:
                    continue  # closing: whatever the client still sends is dropped
                data = event.data.encode() if isinstance(event, TextMessage) else event.data
                if len(self.message) + len(data) > self.max_message:
                    self.message.clear()
                    self.close(*TOO_BIG)
                    continue
                self.message += data
                if event.message_finished:
                    message, self.message = bytes(self.message), bytearray()
                    self._handle(message)
            elif isinstance(event, Ping):
                if self.ws.state is ConnectionState.OPEN:
                    self._send_frame(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    self._send_frame(self.ws.send(event.response()))
                elif self.ws.state is ConnectionState.OPEN:  # a protocol error wsproto found
                    self.close(event.code, event.reason or "")
                self.kill()

    def _send_frame(self, data: bytes) -> None:
        if self.gone:
            return
        transport = self.writer.transport
        if transport.is_closing():
            self.gone = True
            return
        self.writer.write(data)
        if transport.get_write_buffer_size() > MAX_OUTBOX:  # the client does not read
            log.info("dropping an interactive client that does not read its output")
            transport.abort()
            self.gone = True
            self.kill()

    def send(self, message: dict[str, Any]) -> None:
        if self.ws.state is not ConnectionState.OPEN:
            return
        self._send_frame(self.ws.send(TextMessage(data=orjson.dumps(message).decode())))

    def close(self, code: int, reason: str) -> None:
        """Send a close frame (once); the program is killed; the client has CLOSE_TIMEOUT to
        answer before the connection is dropped."""
        self.kill()
        if self.ws.state is not ConnectionState.OPEN:
            return
        self._send_frame(self.ws.send(CloseConnection(code=code, reason=reason)))
        self.close_deadline = time.monotonic() + CLOSE_TIMEOUT
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    def error(self, message: str) -> None:
        """Piston's way of reporting an error: an error message, then close 4002."""
        self.send({"type": "error", "message": message})
        self.close(*NOTIFIED_ERROR)

    # -- Piston messages ----------------------------------------------------------------------
    def _handle(self, raw: bytes) -> None:
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            self.error(f"the message is not valid JSON: {exc}")
            return
        if not isinstance(msg, dict):
            self.error("a message must be a JSON object")
            return
        kind = msg.get("type")
        if kind == "init":
            if self.initialized:
                self.close(*ALREADY_INITIALIZED)
                return
            self._init(msg)
        elif kind == "data":
            if not self.initialized:
                self.close(*NOT_INITIALIZED)
            elif msg.get("stream") != "stdin":
                self.close(*STDIN_ONLY)
            elif not isinstance(msg.get("data"), str):
                self.error("data is required as a string")
            else:
                try:
                    self.write(msg["data"].encode("utf-8", "surrogatepass"), msg.get("eof") is True)
                except StdinFull as exc:
                    self.error(str(exc))
        elif kind == "signal":
            if not self.initialized:
                self.close(*NOT_INITIALIZED)
            elif not isinstance(msg.get("signal"), str) or msg["signal"] not in SIGNALS:
                self.close(*INVALID_SIGNAL)
            else:
                self.signal(SIGNALS[msg["signal"]])
        else:
            shown = kind if isinstance(kind, str) else orjson.dumps(kind).decode()
            self.error(f"unknown message type {shown[:100]!r}: expected init, data or signal")

    def _init(self, msg: dict[str, Any]) -> None:
        service = self.service
        try:
            job = parse_job(
                {k: v for k, v in msg.items() if k not in ("type", "stdin")},
                service.languages,
                service.settings,
            )
        except ApiError as exc:
            self.error(exc.message)
            return
        self.initialized = True
        task = asyncio.get_running_loop().create_task(self._execute(job))
        self.job_task = task

    async def _execute(self, job: Job) -> None:
        """Admit, wait for a slot, run every stage; report and close as Piston does."""
        from runtimes.runner.service import Busy

        service = self.service
        try:
            service.clients.admit(self.client)
        except ApiError as exc:
            self.error(exc.message)
            return
        try:
            try:
                await asyncio.wait_for(service.gate.acquire(), SLOT_TIMEOUT)
            except Busy:
                self.error(f"the runner is busy: {service.gate.queue} executions already queued")
                return
            except TimeoutError:
                self.error(f"the runner is busy: no execution slot within {SLOT_TIMEOUT:.0f} s")
                return
            self.running = True
            try:
                if self.killed:
                    return
                lang = job.language
                self.send({"type": "runtime", "language": lang.name, "version": lang.version})
                await service.executor.execute(job, self)
            except SpawnerGone as exc:
                self.error(f"internal error: {exc}")
                return
            except Exception as exc:
                log.exception("interactive execution failed")
                self.error(f"internal error: {type(exc).__name__}")
                return
            finally:
                service.gate.release()
        finally:
            service.clients.done(self.client)
        self.close(*JOB_COMPLETED)

    # -- Live callbacks (the executor) --------------------------------------------------------
    def stage(self, name: str) -> None:
        self.send({"type": "stage", "stage": name})

    def output(self, stream: str, data: bytes) -> None:
        text = self.decoders[stream].decode(data)
        if text:
            self.send({"type": "data", "stream": stream, "data": text})

    def exit(self, name: str, result: dict[str, Any]) -> None:
        for stream, decoder in self.decoders.items():
            rest = decoder.decode(b"", final=True)
            decoder.reset()
            if rest:
                self.send({"type": "data", "stream": stream, "data": rest})
        fields = ("code", "signal", "status", "message", "cpu_time", "wall_time", "memory")
        self.send({"type": "exit", "stage": name, **{k: result.get(k) for k in fields}})
