"""The runner service: Piston v2 over HTTP/1.1 on $DORM_SOCKET, behind the gateway.

Started and supervised by the gateway's instance manager as an internal instance (process
isolation: it runs as root because it creates one sandbox per execution). Only the gateway
connects to its Unix socket — the public data plane for `run.<domain>`, the admin listener for
`/api/v2/*` — so `X-Forwarded-For` is trusted here and its last entry (the one the gateway
appended) is the client. Requests the admin listener forwards carry the per-start internal token
instead of an API key.

Abuse controls, in the order a request meets them: body size (also enforced by the gateway),
API key, per-client rate (token bucket) and concurrency (429 + Retry-After), then a global bound
on running executions with a bounded queue in front (503 + Retry-After when full). h11 is enough
here: an execution costs milliseconds, parsing microseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import h11
import orjson
import uvloop

from runtimes.runner.api import ApiError, parse_job
from runtimes.runner.connect import CONNECT_PATHS, accept, handshake_error
from runtimes.runner.executor import Executor, SpawnerGone, error_stage
from runtimes.runner.languages import Language, load_languages, python_interpreter, python_path
from runtimes.runner.limits import Settings
from runtimes.runner.pools import (
    MAX_IDLE_LIMIT,
    layouts,
    load_overrides,
    pool_for,
    save_overrides,
)

log = logging.getLogger("dorm.runner")

MAX_HEAD = 16 * 1024
READ_TIMEOUT = 60.0
RUNTIMES_PATHS = ("/api/v2/runtimes", "/api/v2/piston/runtimes")
EXECUTE_PATHS = ("/api/v2/execute", "/api/v2/piston/execute")
POOLS_PATH = "/dorm/pools"  # internal (admin listener) only: warm pool state and bounds
INTERNAL_HEADER = b"x-dorm-runner-internal"
BUCKET_IDLE = 600.0  # forget a client's rate bucket after this long without requests


class Busy(Exception):
    """The global queue is full."""


class Gate:
    """At most `limit` executions at once; up to `queue` more wait (FIFO); beyond that, Busy."""

    def __init__(self, limit: int, queue: int) -> None:
        self.limit = limit
        self.queue = queue
        self.running = 0
        self.waiting: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.running < self.limit and not self.waiting:
            self.running += 1
            return
        if len(self.waiting) >= self.queue:
            raise Busy
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut in self.waiting:
                self.waiting.remove(fut)
            elif fut.done() and not fut.cancelled():
                self.release()  # handed a slot just as the client went away
            raise

    def release(self) -> None:
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes straight to the next waiter
                return
        self.running -= 1


@dataclass(slots=True)
class Bucket:
    tokens: float
    at: float


class ClientLimits:
    """Per-client rate (token bucket, `rate_per_minute` burst) and concurrency."""

    def __init__(self, rate_per_minute: int, max_per_client: int) -> None:
        self.rate = rate_per_minute
        self.max_active = max_per_client
        self.buckets: dict[str, Bucket] = {}
        self.active: dict[str, int] = {}
        self.swept = time.monotonic()

    def admit(self, client: str) -> None:
        """Count one request against `client`, or raise a 429 ApiError with Retry-After."""
        now = time.monotonic()
        if now - self.swept > BUCKET_IDLE:
            self._sweep(now)
        if self.max_active and self.active.get(client, 0) >= self.max_active:
            raise ApiError(
                429, f"too many concurrent executions from this client (max {self.max_active})", 1
            )
        if self.rate:
            per_second = self.rate / 60.0
            bucket = self.buckets.get(client)
            if bucket is None:
                bucket = self.buckets[client] = Bucket(float(self.rate), now)
            bucket.tokens = min(float(self.rate), bucket.tokens + (now - bucket.at) * per_second)
            bucket.at = now
            if bucket.tokens < 1.0:
                wait = math.ceil((1.0 - bucket.tokens) / per_second)
                raise ApiError(429, f"rate limit: {self.rate} executions per minute", wait)
            bucket.tokens -= 1.0
        self.active[client] = self.active.get(client, 0) + 1

    def done(self, client: str) -> None:
        left = self.active.get(client, 0) - 1
        if left > 0:
            self.active[client] = left
        else:
            self.active.pop(client, None)

    def _sweep(self, now: float) -> None:
        self.swept = now
        for client, bucket in list(self.buckets.items()):
            if now - bucket.at > BUCKET_IDLE:
                del self.buckets[client]


class RunnerService:
    def __init__(self, settings: Settings, languages: list[Language], executor: Executor) -> None:
        self.settings = settings
        self.languages = languages
        self.executor = executor
        self.gate = Gate(settings.concurrency, settings.queue)
        self.clients = ClientLimits(settings.rate_per_minute, settings.max_per_client)
        self.runtimes_body = orjson.dumps([lang.to_piston() for lang in languages])
        self.keys = [k.encode() for k in settings.api_keys]
        self.internal = settings.internal_token.encode()
        self.overrides = load_overrides(settings.pool_overrides_file)
        self.pool_shape: dict[str, Any] = {}

    # -- HTTP ---------------------------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            while True:
                request, body = await self._read_request(conn, reader)
                if request is None:
                    return
                if request.target.split(b"?", 1)[0].decode("latin-1") in CONNECT_PATHS:
                    await self._connect(conn, request, reader, writer)
                    return
                status, payload, headers = await self._respond(request, body)
                out = conn.send(
                    h11.Response(
                        status_code=status,
                        headers=[
                            ("content-type", "application/json; charset=utf-8"),
                            ("content-length", str(len(payload))),
                            *headers,
                        ],
                    )
                )
                out = (out or b"") + (conn.send(h11.Data(data=payload)) or b"")
                out += conn.send(h11.EndOfMessage()) or b""
                writer.write(out)
                await writer.drain()
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, ConnectionError, TimeoutError, h11.LocalProtocolError):
            return
        finally:
            writer.close()

    async def _connect(
        self,
        conn: h11.Connection,
        request: h11.Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """`/api/v2/connect`: a WebSocket session (connect.py), or an HTTP error and close."""
        internal = self._internal(request)
        refused = handshake_error(request)
        if refused is None and self.keys and not internal and not self._authorized(request):
            refused = 401, "a valid API key is required in the Authorization header"
        if refused is None:
            await accept(self, conn, request, reader, writer, self._client(request, internal))
            return
        status, message = refused
        payload = orjson.dumps({"message": message})
        headers = [
            ("content-type", "application/json; charset=utf-8"),
            ("content-length", str(len(payload))),
            ("connection", "close"),
        ]
        if status == 426:
            headers.append(("upgrade", "websocket"))
        out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
        out += conn.send(h11.Data(data=payload)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        writer.write(out)
        await writer.drain()

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[h11.Request | None, bytes]:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await asyncio.wait_for(reader.read(65536), READ_TIMEOUT)
                conn.receive_data(data)
                if not data and request is None:
                    return None, b""
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.settings.max_body:
                    raise ConnectionError("request body over the limit")
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    async def _respond(
        self, request: h11.Request, body: bytes
    ) -> tuple[int, bytes, list[tuple[str, str]]]:
        try:
            return 200, await self.route(request, body), []
        except ApiError as exc:
            headers = [] if exc.retry_after is None else [("retry-after", str(exc.retry_after))]
            return exc.status, orjson.dumps({"message": exc.message}), headers

    async def route(self, request: h11.Request, body: bytes) -> bytes:
        path = request.target.split(b"?", 1)[0].decode("latin-1")
        method = request.method
        if path in RUNTIMES_PATHS:
            if method not in (b"GET", b"HEAD"):
                raise ApiError(405, f"{method.decode()} is not allowed on {path}")
            return self.runtimes_body
        if path in EXECUTE_PATHS:
            if method != b"POST":
                raise ApiError(405, f"{method.decode()} is not allowed on {path}")
            return await self.execute(request, body)
        if (path == POOLS_PATH or path.startswith(POOLS_PATH + "/")) and self._internal(request):
            return await self.pools(method, unquote(path[len(POOLS_PATH) + 1 :]), body)
        raise ApiError(404, f"no such endpoint: {path}")

    # -- warm pools (internal) ----------------------------------------------------------------
    async def pools(self, method: bytes, name: str, body: bytes) -> bytes:
        """GET: every pool's state summed over the spawners; PUT <language>: its pool's bounds."""
        if not name:
            if method != b"GET":
                raise ApiError(405, f"{method.decode()} is not allowed on {POOLS_PATH}")
            return orjson.dumps(
                {
                    "pools": await self.executor.pool_state(self.pool_shape),
                    "config": self.pool_config(),
                }
            )
        if method != b"PUT":
            raise ApiError(405, f"{method.decode()} is not allowed on {POOLS_PATH}/{name}")
        pool = pool_for(self.executor.pools, self.languages, name)
        if pool is None:
            raise ApiError(404, f"no runner language or pool named {name!r}")
        try:
            data = orjson.loads(body)
            low, high = int(data["min_idle"]), int(data["max_idle"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ApiError(400, 'expected {"min_idle": n, "max_idle": m}') from None
        if not 0 <= low <= high <= MAX_IDLE_LIMIT:
            raise ApiError(400, f"expected 0 <= min_idle <= max_idle <= {MAX_IDLE_LIMIT}")
        self.executor.configure_pool(pool, low, high)
        self.overrides[pool.name] = (low, high)
        try:
            path = self.settings.pool_overrides_file
            await asyncio.to_thread(save_overrides, path, dict(self.overrides))
        except OSError as exc:  # applied now; only a restart would forget it
            log.warning("could not save the runner's pool bounds: %s", exc)
        return orjson.dumps(
            {
                "runtime": "runner",
                "pool": pool.name,
                "languages": list(pool.languages),
                "min_idle": low,
                "max_idle": high,
            }
        )

    def pool_config(self) -> dict[str, Any]:
        s = self.settings
        overrides = {k: {"min_idle": lo, "max_idle": hi} for k, (lo, hi) in self.overrides.items()}
        return {
            "min_idle": s.min_idle,
            "max_idle": s.max_idle,
            "refill_concurrency": s.refill_concurrency,
            "shrink_after": s.shrink_after,
            "spawners": len(self.executor.spawners),
            "overrides": overrides,
        }

    # -- execute ------------------------------------------------------------------------------
    def _header(self, request: h11.Request, name: bytes) -> bytes | None:
        for key, value in request.headers:
            if key == name:
                return bytes(value)
        return None

    def _client(self, request: h11.Request, internal: bool) -> str:
        if internal:
            return "admin"
        xff = self._header(request, b"x-forwarded-for")
        if not xff:
            return "unknown"
        return xff.rsplit(b",", 1)[-1].strip().decode("latin-1")

    def _authorized(self, request: h11.Request) -> bool:
        """Constant-time check of `Authorization: <key>` or `Bearer <key>` against every key."""
        given = self._header(request, b"authorization") or b""
        if given[:7].lower() == b"bearer ":
            given = given[7:]
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(given.strip(), key)
        return ok

    def _internal(self, request: h11.Request) -> bool:
        """Forwarded by the gateway's admin listener (it carries this start's internal token)."""
        token = self._header(request, INTERNAL_HEADER)
        if not self.internal or token is None:
            return False
        return hmac.compare_digest(token, self.internal)

    async def execute(self, request: h11.Request, body: bytes) -> bytes:
        internal = self._internal(request)
        if self.keys and not internal and not self._authorized(request):
            raise ApiError(401, "a valid API key is required in the Authorization header")
        content_type = self._header(request, b"content-type") or b""
        if not content_type.lower().startswith(b"application/json"):
            raise ApiError(415, "requests must be of type application/json")
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        job = parse_job(data, self.languages, self.settings)
        client = self._client(request, internal)
        self.clients.admit(client)
        try:
            try:
                await self.gate.acquire()
            except Busy:
                raise ApiError(
                    503, f"the runner is busy: {self.gate.queue} executions already queued", 1
                ) from None
            try:
                result = await self.executor.execute(job)
            except SpawnerGone as exc:
                result = {
                    "language": job.language.name,
                    "version": job.language.version,
                    "run": error_stage(f"internal error: {exc}"),
                }
            finally:
                self.gate.release()
        finally:
            self.clients.done(client)
        return orjson.dumps(result)


def _empty_dir(socket_path: str) -> str:
    """A root-owned, empty, read-only-to-sandboxes directory for their /run/dorm mount."""
    path = os.path.join(os.path.dirname(os.path.abspath(socket_path)), "empty")
    os.makedirs(path, mode=0o755, exist_ok=True)
    os.chmod(path, 0o555)
    return path


async def serve(settings: Settings, socket_path: str) -> None:
    python = python_interpreter()
    languages = await asyncio.to_thread(load_languages, settings.languages_dir or None, python)
    log.info("runner languages: %s", ", ".join(f"{lang.name} {lang.version}" for lang in languages))
    uid_first = settings.uid_first
    spawner_settings: dict[str, Any] = {
        "empty_dir": _empty_dir(socket_path),
        "binds": [],
        "refill_concurrency": settings.refill_concurrency,
        "shrink_after": settings.shrink_after,
        "uid": uid_first,
        # Pre-forked children get the largest memory limit any stage may have: on cgroup v1 a
        # limit can be lowered at spawn but raising it fails (memsw must grow first).
        "warm": {
            "memory": max(settings.run_memory, settings.compile_memory),
            "pids": settings.max_processes,
            "nofile": settings.max_open_files,
            "fsize": settings.max_file_size,
            "tmp_size": settings.tmp_size,
            "cpu": settings.cpus,
        },
    }
    pools = layouts(languages, settings.min_idle, settings.max_idle)
    overrides = load_overrides(settings.pool_overrides_file)  # set through the admin API
    for pool in pools:
        pool.min_idle, pool.max_idle = overrides.get(pool.name, (pool.min_idle, pool.max_idle))
    executor = Executor(settings, spawner_settings, pools)
    executor.python_path = await asyncio.to_thread(python_path, python)
    await executor.start()
    service = RunnerService(settings, languages, executor)
    warm = spawner_settings["warm"]
    service.pool_shape = {
        "rootfs": None,
        "network": "none",
        "memory": warm["memory"],
        "cpu": warm["cpu"],
        "pids": warm["pids"],
    }
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    server = await asyncio.start_unix_server(service.handle, path=socket_path, limit=MAX_HEAD)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("runner serving on %s (%d executions at once)", socket_path, settings.concurrency)
    await stop.wait()
    server.close()
    await executor.close()


def main() -> int:
    logging.basicConfig(
        level=os.environ.get("DORM_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    raw = os.environ.pop("DORM_RUNNER_SETTINGS", "{}")
    settings = Settings.from_json(orjson.loads(raw))
    socket_path = os.environ.get("DORM_SOCKET")
    if not socket_path:
        print("runner: DORM_SOCKET is not set", file=sys.stderr)
        return 2
    uvloop.run(serve(settings, socket_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
