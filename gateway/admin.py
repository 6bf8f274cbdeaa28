"""The admin API: apps, branches, instances and logs over HTTP/1.1 + JSON, behind a bearer token.

This is the control plane, so it favours obviously-correct over fast: h11 parses (the data plane
uses httptools), one asyncio task serves each connection, and every read and write has a deadline.
Anything a client sends wrong gets a JSON error naming the offending field — never a traceback —
and nothing but `GET /v1/health` answers without the token. The token is checked before a request
body is read, so an anonymous client cannot make the server buffer anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import re
import socket
import sqlite3
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, NoReturn, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

import h11
import orjson

from gateway.appspec import SpecError, parse_app_spec, parse_branch_spec
from gateway.auth import check_bearer
from gateway.config import GatewayConfig, split_host_port
from gateway.logs import follow, log_path, read_tail
from gateway.names import InvalidName, check_app_name, check_branch_name
from gateway.registry import DEFAULT_BRANCH, Registry

log = logging.getLogger("dorm.admin")

MAX_BODY = 1024 * 1024
MAX_HEAD = 16 * 1024
MAX_TAIL_LINES = 10_000
DEFAULT_TAIL_LINES = 100
MAX_CONNECTIONS = 256  # the default of `admin_max_connections`
# Requests served on one keep-alive connection; the last one's answer closes it.
MAX_REQUESTS_PER_CONNECTION = 1000
# Response bodies are written (and drained) in pieces of this size, so a slow reader holds at
# most one piece plus the transport's high-water mark in memory, and every piece has its deadline.
_WRITE_PIECE = 64 * 1024
# A connection the server closes while the client may still be sending is drained this long.
_LINGER = 1.0
# TCP keep-alive probes (idle seconds, interval, count): a peer that vanished without a FIN
# (a dropped link) is noticed within about two minutes even while nothing is sent to it, e.g.
# a `follow=1` stream of a quiet log, which would otherwise hold its slot forever.
_TCP_KEEPALIVE = (60, 10, 6)
# Reads are no bigger than the head cap, so h11 sees an over-long head while it is incomplete
# (it only enforces max_incomplete_event_size then) and answers 431.
_READ_SIZE = MAX_HEAD
# Idle waits are cut into slices this long so connections notice the server closing.
_IDLE_SLICE = 0.5


class InstanceManager(Protocol):
    """What the admin API needs from the instance manager (gateway/instances.py implements it)."""

    def snapshot(self) -> list[dict[str, Any]]: ...

    async def stop(self, app: str, branch: str | None) -> int: ...

    async def app_changed(self, app: str) -> None: ...

    async def app_removed(self, app: str) -> None: ...

    async def branch_changed(self, app: str, branch: str) -> None: ...

    async def redeploy(self, app: str, branch: str) -> None: ...

    def activity(self) -> list[tuple[str, str, float]]: ...

    def busy(self, app: str, branch: str) -> bool: ...


class AppLock:
    """Shared by work on one branch of an app (deploy, rollback, branch delete, expiry);
    exclusive for what changes the app as a whole: deleting it, or a deploy that creates it
    (whose undo deletes it). Waiting exclusive holders go before new shared ones."""

    def __init__(self) -> None:
        self.shared_holders = 0
        self.exclusive_held = False
        self.exclusive_waiting = 0
        self._waiters: list[asyncio.Future[None]] = []

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _until(self, ready: Any) -> None:
        while not ready():
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    @contextlib.asynccontextmanager
    async def hold(self, *, exclusive: bool) -> AsyncIterator[None]:
        if exclusive:
            self.exclusive_waiting += 1
            try:
                await self._until(lambda: not self.exclusive_held and not self.shared_holders)
            finally:
                self.exclusive_waiting -= 1
                self._wake()
            self.exclusive_held = True
        else:
            await self._until(lambda: not self.exclusive_held and not self.exclusive_waiting)
            self.shared_holders += 1
        try:
            yield
        finally:
            if exclusive:
                self.exclusive_held = False
            else:
                self.shared_holders -= 1
            self._wake()


class Locks:
    """The locks that order changes to one registry's apps and branches: an `AppLock` per
    app, and a lock per branch taken inside it (see `branch_locked`). Shared by the admin
    routes and the deploy routes (`locks_of`), so an env change, a deploy and a delete of the
    app never interleave."""

    def __init__(self) -> None:
        self._apps: weakref.WeakValueDictionary[str, AppLock] = weakref.WeakValueDictionary()
        self._branches: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    def app(self, app: str) -> AppLock:
        lock = self._apps.get(app)
        if lock is None:
            lock = self._apps[app] = AppLock()
        return lock

    def branch(self, app: str, branch: str) -> asyncio.Lock:
        """The branch's own lock; take it inside the app's (`branch_locked` does both)."""
        lock = self._branches.get((app, branch))
        if lock is None:
            lock = self._branches[(app, branch)] = asyncio.Lock()
        return lock

    @contextlib.asynccontextmanager
    async def branch_locked(self, app: str, branch: str) -> AsyncIterator[None]:
        """The app shared, then the branch: work on one branch, never beside a change to the
        app as a whole (which could leave the branch's writes without their app)."""
        async with self.app(app).hold(exclusive=False), self.branch(app, branch):
            yield


_LOCKS: weakref.WeakKeyDictionary[Registry, Locks] = weakref.WeakKeyDictionary()


def locks_of(registry: Registry) -> Locks:
    """The `Locks` of `registry`, created on first use."""
    locks = _LOCKS.get(registry)
    if locks is None:
        locks = _LOCKS[registry] = Locks()
    return locks


class ApiError(Exception):
    """An error answer: HTTP status plus the field at fault (None when no single field is)."""

    def __init__(
        self,
        status: int,
        field: str | None,
        message: str,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
        self.message = message
        self.headers = list(headers)


@dataclass(slots=True)
class Request:
    """An admin request. `params` are the validated `{placeholders}` of the route.

    The body is in `body`, read whole, unless the route streams it: then `stream` yields it in
    pieces as they arrive (and `body` stays empty), so an upload never sits in memory whole.
    """

    method: str
    path: str
    query: dict[str, str]
    params: dict[str, str]
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def json(self, *, optional: bool = False) -> Any:
        """The body as JSON; an empty body is None if `optional`, else a 400 naming `body`.

        A key given twice in one object is a 400 naming it: parsers disagree about which one
        counts (orjson keeps the last), so a body that a proxy or a reviewer read one way must
        not be applied the other way.
        """
        if not self.body.strip():
            if optional:
                return None
            raise ApiError(400, "body", "expected a JSON object in the request body")
        try:
            value = orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "body", f"not valid JSON: {exc}") from None
        duplicate = _duplicate_key(self.body)
        if duplicate is not None:
            raise ApiError(400, duplicate, "given more than once in the JSON body")
        return value


@dataclass(slots=True)
class Response:
    """A complete response body (JSON unless `content_type` says otherwise)."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class StreamResponse:
    """A response streamed until `chunks` ends or the client goes away (then it is closed)."""

    status: int
    chunks: AsyncGenerator[bytes, None]
    content_type: str = "text/plain; charset=utf-8"


Handler = Callable[[Request], Awaitable[Response | StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    """One endpoint. `pattern` segments in braces are captured; `{app}` and `{branch}` are
    validated as names before the handler runs. `query` lists the accepted query parameters.

    With `stream_body` the handler gets the body as `Request.stream` instead of `Request.body`:
    each piece must arrive within `body_timeout` of the previous one (a large upload may take
    longer than that in all), and more than `max_body` bytes is a 413.
    """

    method: str
    pattern: str
    handler: Handler
    auth: bool = True
    max_body: int = MAX_BODY
    query: frozenset[str] = frozenset()
    stream_body: bool = False

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.pattern.strip("/").split("/"))


def disk_full(exc: BaseException) -> bool:
    """SQLite's "database or disk is full", or ENOSPC/EDQUOT from the OS."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def registry_full(what: str) -> ApiError:
    """The 507 for a write `what` ("the deploy") that the registry could not record because the
    data dir is full (`disk_full`)."""
    return ApiError(
        507,
        "registry",
        f"not enough disk space to record {what} (the registry's database in the data dir is "
        "full); nothing was changed",
    )


def json_response(status: int, obj: Any, headers: Iterable[tuple[str, str]] = ()) -> Response:
    return Response(status, orjson.dumps(obj) + b"\n", headers=list(headers))


def error_body(field: str | None, message: str) -> bytes:
    return orjson.dumps({"error": {"field": field, "message": message}}) + b"\n"


class _Pairs(dict[str, Any]):
    """A JSON object that remembers the first key it was given twice."""

    duplicate: str | None = None


def _pairs(items: list[tuple[str, Any]]) -> _Pairs:
    obj = _Pairs()
    for key, value in items:
        if key in obj and obj.duplicate is None:
            obj.duplicate = key
        obj[key] = value
    return obj


def _duplicate_key(body: bytes) -> str | None:
    """The dotted path ("limits.memory", "env.A") of the first key given twice in one object of
    `body`, which orjson already accepted as JSON (so it is valid and at most 1024 deep); None
    if there is none. orjson cannot report duplicates, so the body is parsed once more."""
    if b"{" not in body:
        return None
    try:
        root = json.loads(body, object_pairs_hook=_pairs)
    except (RecursionError, ValueError):
        return None  # too deep for the stdlib's parser, which orjson's limit allows: no check
    todo: list[tuple[str, Any]] = [("", root)]
    while todo:  # depth first, in document order; iterative, as the nesting may be deep
        path, value = todo.pop()
        if isinstance(value, _Pairs):
            if value.duplicate is not None:
                return path + value.duplicate
            todo.extend((f"{path}{k}.", v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            todo.extend((f"{path}{i}.", v) for i, v in reversed(list(enumerate(value))))
    return None


def _match(segments: tuple[str, ...], parts: list[str]) -> dict[str, str] | None:
    if len(segments) != len(parts):
        return None
    params: dict[str, str] = {}
    for seg, part in zip(segments, parts, strict=True):
        if seg.startswith("{") and seg.endswith("}"):
            params[seg[1:-1]] = part
        elif seg != part:
            return None
    return params


def _validate_params(params: dict[str, str]) -> None:
    for name, check in (("app", check_app_name), ("branch", check_branch_name)):
        if name in params:
            try:
                check(params[name])
            except InvalidName as exc:
                raise ApiError(400, name, str(exc)) from None


def _declares_body(request: h11.Request) -> bool:
    """Whether a request has a body to read (chunked, or a Content-Length other than 0)."""
    for key, value in request.headers:
        if key == b"transfer-encoding" or (key == b"content-length" and value.strip() != b"0"):
            return True
    return False


class _Closed(Exception):
    """The connection is finished (EOF, timeout already answered, or unrecoverable)."""


class _TooSlow(Exception):
    """A body did not move in time: `by_rate` if below the minimum rate, else idle too long."""

    def __init__(self, by_rate: bool) -> None:
        super().__init__("too slow")
        self.by_rate = by_rate


@dataclass(slots=True)
class _Pace:
    """The minimum average rate of one body, in either direction.

    Only the time spent waiting for the client counts (`waited`: reads that had to wait for
    its bytes, drains that had to wait for it to read), not the time the server itself took
    between two pieces (spooling to disk, a quiet log). Each wait may last at most `idle`; and
    once `grace` seconds have been waited in all, `moved / waited` must stay at least `rate`
    bytes per second (`rate` 0: no minimum).
    """

    rate: int
    grace: float
    idle: float
    moved: int = 0
    waited: float = 0.0

    def allowance(self) -> tuple[float, bool]:
        """How long the next wait may last, and whether the rate (not `idle`) sets that."""
        if self.rate > 0:
            left = max(self.grace, self.moved / self.rate) - self.waited
            if left < self.idle:
                return left, True
        return self.idle, False

    async def wait(self, aw: Awaitable[Any], deadline: float | None = None) -> Any:
        """Await `aw` within the allowance (and `deadline`); `_TooSlow` if it does not end."""
        allowed, by_rate = self.allowance()
        if deadline is not None and deadline - time.monotonic() < allowed:
            allowed, by_rate = deadline - time.monotonic(), False
        if allowed <= 0:
            if asyncio.iscoroutine(aw):
                aw.close()
            raise _TooSlow(by_rate)
        start = time.monotonic()
        try:
            return await asyncio.wait_for(aw, allowed)
        except TimeoutError:
            raise _TooSlow(by_rate) from None
        finally:
            self.waited += time.monotonic() - start

    def too_slow(self, what: str) -> str:
        """The 408 message for a body below the minimum rate."""
        return (
            f"{what} too slow: {self.moved} bytes in {self.waited:.1f}s, under the minimum of "
            f"{self.rate} bytes/s (admin_min_upload_rate) after the first {self.grace:g}s"
        )


@dataclass(eq=False, slots=True)
class _Slot:
    """One admitted connection: when it was accepted, whether it ever sent the right token
    (until then it may be replaced by a newcomer when all slots are taken), how many
    requests it sent, and whether it should be drained before it is closed."""

    task: asyncio.Task[Any] | None
    accepted: float
    authenticated: bool = False
    requests: int = 0
    evicted: bool = False
    linger: bool = False


class AdminServer:
    """Routes and per-connection HTTP handling; one instance per admin listener."""

    def __init__(
        self,
        cfg: GatewayConfig,
        registry: Registry,
        instances: InstanceManager,
        token: str,
        extra_routes: Iterable[Route] = (),
    ) -> None:
        if not token:
            raise ValueError("the admin API needs a token")
        self.cfg = cfg
        self.registry = registry
        self.instances = instances
        self.token = token
        self.locks = locks_of(registry)
        self.server: asyncio.base_events.Server | None = None
        # Admitted connections, oldest first, and those of them without a token yet.
        self._slots: dict[_Slot, None] = {}
        self._anonymous: dict[_Slot, None] = {}
        # Extra routes are matched first, so a subsystem can extend a built-in endpoint (the
        # bundle code adds deploy state to the branch listing and cleanup to branch deletion).
        self.routes: list[Route] = [*extra_routes, *self._builtin_routes()]

    def _builtin_routes(self) -> list[Route]:
        logs_query = frozenset({"branch", "tail", "follow"})
        return [
            Route("GET", "/v1/health", self.health, auth=False),
            Route("GET", "/v1/apps", self.list_apps),
            Route("GET", "/v1/apps/{app}", self.get_app),
            Route("PUT", "/v1/apps/{app}", self.put_app),
            Route("DELETE", "/v1/apps/{app}", self.delete_app),
            Route("GET", "/v1/apps/{app}/branches", self.list_branches),
            Route("GET", "/v1/apps/{app}/branches/{branch}", self.get_branch),
            Route("PUT", "/v1/apps/{app}/branches/{branch}", self.put_branch),
            Route("DELETE", "/v1/apps/{app}/branches/{branch}", self.delete_branch),
            Route("POST", "/v1/apps/{app}/branches/{branch}/stop", self.stop_branch),
            Route("POST", "/v1/apps/{app}/stop", self.stop_app),
            Route("GET", "/v1/apps/{app}/logs", self.logs, query=logs_query),
            Route("GET", "/v1/instances", self.list_instances, query=frozenset({"app"})),
        ]

    # -- handlers --------------------------------------------------------------------------------
    def _app(self, req: Request) -> str:
        app = req.params["app"]
        if self.registry.get_app(app) is None:
            raise ApiError(404, "app", f"no app named {app!r}")
        return app

    async def health(self, req: Request) -> Response:
        return json_response(200, {"status": "ok"})

    async def list_apps(self, req: Request) -> Response:
        apps = self.registry.apps
        return json_response(200, {"apps": [apps[name].to_json() for name in sorted(apps)]})

    async def get_app(self, req: Request) -> Response:
        spec = self.registry.get_app(self._app(req))
        assert spec is not None
        return json_response(200, spec.to_json())

    async def put_app(self, req: Request) -> Response:
        app = req.params["app"]
        try:
            spec = parse_app_spec(app, req.json())
            self.registry.check_runtime(spec)  # an uploaded runtime must exist
        except SpecError as exc:
            raise ApiError(400, exc.field, exc.message) from None
        # Exclusive: not beside a deploy that creates the app, nor a delete of it.
        async with self.locks.app(app).hold(exclusive=True):
            created = await self.registry.put_app(spec)
            await self.instances.app_changed(app)
        return json_response(201 if created else 200, spec.to_json())

    async def delete_app(self, req: Request) -> Response:
        app = self._app(req)
        async with self.locks.app(app).hold(exclusive=True):
            self._app(req)  # it may have gone while this waited
            # Forget it first so no new request is routed to it, then stop what is running.
            await self.registry.delete_app(app)
            await self.instances.app_removed(app)
        return json_response(200, {"deleted": app})

    async def list_branches(self, req: Request) -> Response:
        app = self._app(req)
        return json_response(
            200, {"branches": [b.to_json() for b in self.registry.branches_of(app)]}
        )

    def _branch(self, req: Request) -> tuple[str, str]:
        app = self._app(req)
        branch = req.params["branch"]
        if self.registry.get_branch(app, branch) is None:
            raise ApiError(404, "branch", f"app {app!r} has no branch {branch!r}")
        return app, branch

    async def get_branch(self, req: Request) -> Response:
        app, branch = self._branch(req)
        spec = self.registry.get_branch(app, branch)
        assert spec is not None
        return json_response(200, spec.to_json())

    async def put_branch(self, req: Request) -> Response:
        app = self._app(req)
        branch = req.params["branch"]
        try:
            spec = parse_branch_spec(app, branch, req.json(optional=True))
        except SpecError as exc:
            raise ApiError(400, exc.field, exc.message) from None
        # After a deploy to the branch in progress, whose undo would otherwise put back the
        # env from before this change; and never beside a delete of the app.
        async with self.locks.branch_locked(app, branch):
            self._app(req)  # it may have gone while this waited
            existed = (app, branch) in self.registry.branches
            await self.registry.put_branch(spec)
            # A running instance has the old environment: drain it; the next request starts
            # afresh.
            await self.instances.branch_changed(app, branch)
        return json_response(200 if existed else 201, spec.to_json())

    async def delete_branch(self, req: Request) -> Response:
        app = self._app(req)
        branch = req.params["branch"]
        async with self.locks.branch_locked(app, branch):
            self._app(req)  # it may have gone while this waited
            if (app, branch) not in self.registry.branches:
                what = "overrides to remove" if branch == DEFAULT_BRANCH else "such branch"
                raise ApiError(404, "branch", f"app {app!r} branch {branch!r}: no {what}")
            await self.registry.delete_branch(app, branch)
            await self.instances.branch_changed(app, branch)
        return json_response(200, {"deleted": f"{app}/{branch}"})

    async def stop_branch(self, req: Request) -> Response:
        app, branch = self._branch(req)
        return json_response(200, {"stopped": await self.instances.stop(app, branch)})

    async def stop_app(self, req: Request) -> Response:
        app = self._app(req)
        return json_response(200, {"stopped": await self.instances.stop(app, None)})

    async def list_instances(self, req: Request) -> Response:
        items = self.instances.snapshot()
        if "app" in req.query:
            app = req.query["app"]
            try:
                check_app_name(app)
            except InvalidName as exc:
                raise ApiError(400, "app", str(exc)) from None
            items = [item for item in items if item.get("app") == app]
        return json_response(200, {"instances": items})

    async def logs(self, req: Request) -> Response | StreamResponse:
        app = self._app(req)
        branch = req.query.get("branch", DEFAULT_BRANCH)
        try:
            check_branch_name(branch)
        except InvalidName as exc:
            raise ApiError(400, "branch", str(exc)) from None
        tail_text = req.query.get("tail", str(DEFAULT_TAIL_LINES))
        # ASCII digits only, and few: str.isdigit() takes "²" (which int() refuses) and int()
        # refuses more than 4300 digits, each of which was a 500.
        if not re.fullmatch(r"[0-9]{1,9}", tail_text) or int(tail_text) > MAX_TAIL_LINES:
            raise ApiError(400, "tail", f"expected a whole number from 0 to {MAX_TAIL_LINES}")
        tail = int(tail_text)
        follow_text = req.query.get("follow", "0").lower()
        if follow_text not in ("0", "1", "true", "false", "yes", "no"):
            raise ApiError(400, "follow", "expected 1 or 0")
        path = log_path(self.cfg.data_dir, app, branch)
        if follow_text in ("1", "true", "yes"):
            return StreamResponse(200, follow(path, start_lines=tail))
        data = await asyncio.to_thread(read_tail, path, tail)
        return Response(200, data, content_type="text/plain; charset=utf-8")

    # -- routing ---------------------------------------------------------------------------------
    def _resolve(self, method: str, target: bytes) -> tuple[Route | None, Request]:
        """Find the route for a request head. Returns (route, request) or raises ApiError.

        A route that does not need auth is returned with its request; for every other outcome
        (including 404/405) the caller must check the token first, so unauthenticated clients
        learn nothing about which paths exist.
        """
        try:
            text = target.decode("ascii")
        except UnicodeDecodeError:
            raise ApiError(400, "path", "the request target must be ASCII") from None
        split = urlsplit(text)
        if not split.path.startswith("/"):
            raise ApiError(400, "path", "expected an absolute path")
        parts = [unquote(p) for p in split.path.strip("/").split("/")]
        request = Request(method, split.path, {}, {}, [])
        allowed: list[str] = []
        for route in self.routes:
            params = _match(route.segments, parts)
            if params is None:
                continue
            if route.method != method:
                if route.method not in allowed:  # extra routes may extend a built-in one
                    allowed.append(route.method)
                continue
            request.params = params
            return route, request
        if allowed:
            raise ApiError(
                405,
                "method",
                f"{method} is not allowed here (allowed: {', '.join(allowed)})",
                headers=[("allow", ", ".join(allowed))],
            )
        raise ApiError(404, "path", f"no such endpoint: {split.path}")

    @staticmethod
    def _parse_query(route: Route, target: bytes) -> dict[str, str]:
        query: dict[str, str] = {}
        pairs = parse_qsl(urlsplit(target.decode("ascii")).query, keep_blank_values=True)
        for key, value in pairs:
            if key not in route.query:
                known = ", ".join(sorted(route.query)) or "none"
                raise ApiError(400, key, f"unknown query parameter (known: {known})")
            if key in query:
                raise ApiError(400, key, "given more than once")
            query[key] = value
        return query

    # -- connection handling ---------------------------------------------------------------------
    def _serving(self) -> bool:
        return self.server is not None and self.server.is_serving()

    @property
    def connections(self) -> int:
        """Connections holding a slot (those refused with a 503 hold none)."""
        return len(self._slots)

    def _admit(self, slot: _Slot) -> bool:
        """Give `slot` one of the `admin_max_connections` slots. When all are taken, the oldest
        connection that never sent the right token gives its slot up (it is closed at once);
        False if every slot is held by an authenticated connection."""
        if len(self._slots) >= self.cfg.admin_max_connections and self._anonymous:
            oldest = next(iter(self._anonymous))
            self._release(oldest)
            oldest.evicted = True
            if oldest.task is not None:
                oldest.task.cancel()
        if len(self._slots) >= self.cfg.admin_max_connections:
            return False
        self._slots[slot] = None
        self._anonymous[slot] = None
        return True

    def _release(self, slot: _Slot) -> None:
        self._slots.pop(slot, None)
        self._anonymous.pop(slot, None)

    def _authenticated(self, slot: _Slot) -> None:
        """`slot` sent the right token: it keeps its slot from now on."""
        slot.authenticated = True
        self._anonymous.pop(slot, None)

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve requests on one connection until it closes, times out or errs."""
        slot = _Slot(asyncio.current_task(), time.monotonic())
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        _probe_peer(writer)
        try:
            if not self._admit(slot):
                slot.linger = True
                await self._raw_error(
                    writer,
                    503,
                    None,
                    f"too many admin connections (all {self.cfg.admin_max_connections} are in "
                    "use by authenticated clients); retry shortly",
                    headers=[("retry-after", "1")],
                )
            while await self._exchange(slot, conn, reader, writer):
                conn.start_next_cycle()
        except asyncio.CancelledError:
            if not slot.evicted:
                raise
        except (_Closed, ConnectionError, TimeoutError):
            pass
        except Exception:
            log.exception("admin connection failed")
        finally:
            # The slot is free from here on: lingering is bounded by _LINGER, not by the client.
            self._release(slot)
            lingering = slot.linger or conn.their_state in (h11.SEND_BODY, h11.ERROR)
            if lingering and not slot.evicted:
                await self._linger(reader, writer)
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), _LINGER)
            except Exception:
                # A close waits for the unsent answer to flush, which never happens for a
                # client that stopped reading: drop it, or the socket and its buffer stay.
                writer.transport.abort()

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close and discard what the client is still sending, briefly.

        Closing a socket with unread input makes the kernel send RST, which can destroy the
        error response (413, 400) before the client reads it.
        """
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()
            deadline = time.monotonic() + _LINGER
            discarded = 0
            while discarded < 4 * MAX_BODY and time.monotonic() < deadline:
                data = await asyncio.wait_for(reader.read(_READ_SIZE), deadline - time.monotonic())
                if not data:
                    break
                discarded += len(data)

    async def _raw_error(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        fld: str | None,
        message: str,
        headers: Iterable[tuple[str, str]] = (),
    ) -> NoReturn:
        """An error written without h11, for when the exchange is beyond saving; then close."""
        body = error_body(fld, message)
        reason = HTTPStatus(status).phrase
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
        head = (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{extra}connection: close\r\n\r\n"
        )
        with contextlib.suppress(Exception):
            writer.write(head.encode() + body)
            await asyncio.wait_for(writer.drain(), self.cfg.body_timeout)
        raise _Closed

    async def _receive(
        self, conn: h11.Connection, reader: asyncio.StreamReader, deadline: float
    ) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        size = _READ_SIZE
        if conn.their_state is h11.IDLE:
            # Reading a head: never let the buffer grow past MAX_HEAD + 1 in one read, or a
            # head of up to twice the cap would arrive complete and h11 (which only bounds an
            # incomplete head) would accept it.
            size = max(1, MAX_HEAD + 1 - len(conn.trailing_data[0]))
        data = await asyncio.wait_for(reader.read(size), remaining)
        conn.receive_data(data)

    async def _wait_idle(
        self, conn: h11.Connection, reader: asyncio.StreamReader, deadline: float
    ) -> bool:
        """Wait for the first byte of the next request. False: close quietly (EOF, idle, stop)."""
        if conn.trailing_data[0]:
            return True
        while self._serving():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                data = await asyncio.wait_for(reader.read(_READ_SIZE), min(remaining, _IDLE_SLICE))
            except TimeoutError:
                continue
            conn.receive_data(data)
            return bool(data)
        return False

    async def _next_event(
        self, conn: h11.Connection, reader: asyncio.StreamReader, deadline: float
    ) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            await self._receive(conn, reader, deadline)

    def _pace(self) -> _Pace:
        cfg = self.cfg
        return _Pace(cfg.admin_min_upload_rate, cfg.admin_upload_grace, cfg.body_timeout)

    async def _exchange(
        self,
        slot: _Slot,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """One request and its response. Returns True if the connection can be reused.

        The first request's head must be complete within `header_timeout` of the accept, so a
        client that has not authenticated holds its slot no longer than that (and never past
        its response: only an authorized request keeps a connection open). Later heads have
        `header_timeout` from their first byte, after up to `keepalive_timeout` idle.
        """
        if slot.requests == 0:
            deadline = slot.accepted + self.cfg.header_timeout
            if not await self._wait_idle(conn, reader, deadline):
                return False
        else:
            idle_deadline = time.monotonic() + self.cfg.keepalive_timeout
            if not await self._wait_idle(conn, reader, idle_deadline):
                return False
            deadline = time.monotonic() + self.cfg.header_timeout
        try:
            event = await self._next_event(conn, reader, deadline)
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            await self._raw_error(writer, status, "request", f"malformed request: {exc}")
        except TimeoutError:
            await self._raw_error(writer, 408, None, "timed out reading the request head")
        if isinstance(event, h11.ConnectionClosed):
            return False
        assert isinstance(event, h11.Request), event
        slot.requests += 1
        authorized = self._authorized(list(event.headers))
        if authorized:
            self._authenticated(slot)
        try:
            response = await self._dispatch(conn, reader, writer, event, authorized)
        except ApiError as exc:
            response = Response(exc.status, error_body(exc.field, exc.message), headers=exc.headers)
        except (_Closed, ConnectionError, TimeoutError):
            raise
        except Exception as exc:
            if disk_full(exc):
                # Not a fault of the gateway's: say what to do, without a traceback.
                log.warning("admin request %s %r: %s", event.method, event.target, exc)
                message = "no space left in the gateway's data dir; free some and retry"
                response = Response(507, error_body(None, message))
            else:
                log.exception("admin request %s %r failed", event.method, event.target)
                response = Response(500, error_body(None, "internal error; see the gateway log"))
        if isinstance(response, StreamResponse):
            await self._stream(conn, reader, writer, response)
            return False
        if conn.their_state is h11.SEND_BODY and not _declares_body(event):
            # Answered before its body was read (an error), but it has none: take its end, so
            # the connection stays usable for the next request.
            with contextlib.suppress(h11.ProtocolError):
                conn.next_event()
        keep_alive = authorized and slot.requests < MAX_REQUESTS_PER_CONNECTION
        if not keep_alive and not _client_closes(event):
            slot.linger = True  # the client may have sent more: drain it before closing
        await self._send(
            conn, writer, response, head_only=event.method == b"HEAD", keep_alive=keep_alive
        )
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE and self._serving()

    async def _dispatch(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        event: h11.Request,
        authorized: bool,
    ) -> Response | StreamResponse:
        method = event.method.decode("ascii", "replace")
        headers = list(event.headers)
        names = {k for k, _ in headers}
        if b"content-length" in names and b"transfer-encoding" in names:
            # h11 would go by Transfer-Encoding; a proxy in front may have gone by the length.
            raise ApiError(
                400, "request", "both Content-Length and Transfer-Encoding: ambiguous framing"
            )
        route: Route | None = None
        request = Request(method, "", {}, {}, [])
        try:
            route, request = self._resolve(method, event.target)
        except ApiError as exc:
            if exc.status >= 500 or authorized:
                raise
        if (route is None or route.auth) and not authorized:
            auth = next((v for k, v in headers if k == b"authorization"), None)
            message = "missing bearer token" if auth is None else "invalid bearer token"
            raise ApiError(
                401,
                "authorization",
                message,
                headers=[("www-authenticate", 'Bearer realm="dorm"')],
            )
        if route is None:  # authorized, so the ApiError above was re-raised
            raise AssertionError("unreachable")
        request.headers = headers
        request.query = self._parse_query(route, event.target)
        _validate_params(request.params)
        length = next((v for k, v in headers if k == b"content-length"), None)
        if length is not None and int(length) > route.max_body:
            raise ApiError(413, "body", f"request body larger than {route.max_body} bytes")
        if not route.stream_body:
            request.body = await self._read_body(conn, reader, writer, route.max_body)
            return await route.handler(request)
        stream = self._body_stream(conn, reader, writer, route.max_body)
        request.stream = stream
        try:
            return await route.handler(request)
        finally:
            await stream.aclose()

    def _authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """One `Authorization: Bearer <token>` header with the right token. Two such headers
        are refused whatever they hold: which one counts would be ambiguous (a proxy in front
        may have checked the other)."""
        values = [v for k, v in headers if k == b"authorization"]
        return len(values) == 1 and check_bearer(values[0], self.token)

    async def _body_event(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pace: _Pace,
        deadline: float | None = None,
    ) -> Any:
        """The next event of a request body, read under `pace` (and `deadline`). A malformed
        body or one that does not arrive in time is answered here (400, 408) and ends the
        connection (`_Closed`)."""
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                await self._raw_error(writer, 400, "body", f"malformed request body: {exc}")
            if event is not h11.NEED_DATA:
                if isinstance(event, h11.Data):
                    pace.moved += len(event.data)
                return event
            try:
                data = await pace.wait(reader.read(_READ_SIZE), deadline)
            except _TooSlow as exc:
                message = (
                    pace.too_slow("request body")
                    if exc.by_rate
                    else "timed out reading the request body"
                )
                await self._raw_error(writer, 408, "body", message)
            conn.receive_data(data)

    async def _read_body(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        limit: int,
    ) -> bytes:
        """The whole body (at most `limit` bytes), within `body_timeout` in all and at the
        minimum rate."""
        if conn.they_are_waiting_for_100_continue:
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.cfg.body_timeout
        pace = self._pace()
        while True:
            event = await self._body_event(conn, reader, writer, pace, deadline)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise ApiError(413, "body", f"request body larger than {limit} bytes")
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise _Closed

    async def _body_stream(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        limit: int,
    ) -> AsyncGenerator[bytes, None]:
        """Yield the request body as it arrives. A malformed body, a stall longer than
        `body_timeout`, an average rate under `admin_min_upload_rate` after
        `admin_upload_grace` or a client that goes away ends the connection (`_Closed`) after
        an error answer where one can still be sent; past `limit` bytes it is a 413."""
        if conn.they_are_waiting_for_100_continue:
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        size = 0
        pace = self._pace()
        while True:
            event = await self._body_event(conn, reader, writer, pace)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise ApiError(413, "body", f"request body larger than {limit} bytes")
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise _Closed

    async def _write(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, data: bytes, pace: _Pace
    ) -> None:
        """Send `data` as body in pieces, each drained under `pace` (`TimeoutError` if the
        client does not read it in time): memory held for a slow reader stays bounded."""
        for start in range(0, len(data), _WRITE_PIECE):
            piece = data[start : start + _WRITE_PIECE]
            writer.write(conn.send(h11.Data(data=piece)))
            pace.moved += len(piece)
            try:
                await pace.wait(writer.drain())
            except _TooSlow as exc:
                if exc.by_rate:
                    log.info("admin response closed: %s", pace.too_slow("the client reads"))
                raise TimeoutError from None

    async def _send(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        resp: Response,
        *,
        head_only: bool = False,
        keep_alive: bool = True,
    ) -> None:
        """Send `resp` whole; `head_only` (a HEAD request) sends its head, Content-Length
        included, without the body; without `keep_alive` the connection closes after it."""
        headers = [
            ("content-type", resp.content_type),
            ("content-length", str(len(resp.body))),
            ("cache-control", "no-store"),
            ("x-content-type-options", "nosniff"),
            *resp.headers,
        ]
        # A request whose body we did not read cannot be followed by another on this connection.
        if conn.their_state is not h11.DONE or not self._serving() or not keep_alive:
            headers.append(("connection", "close"))
        writer.write(
            conn.send(
                h11.Response(
                    status_code=resp.status,
                    headers=headers,
                    reason=HTTPStatus(resp.status).phrase,
                )
            )
        )
        if resp.body and not head_only:
            await self._write(conn, writer, resp.body, self._pace())
        writer.write(conn.send(h11.EndOfMessage()))
        await asyncio.wait_for(writer.drain(), self.cfg.body_timeout)

    async def _stream(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        resp: StreamResponse,
    ) -> None:
        """Send `resp.chunks` until they end, the client leaves, or the server stops serving.

        Each chunk is drained before the next is taken (`_write`), so a client that stops
        reading makes the producer wait, holds at most a piece plus the transport's buffer,
        and is cut off after `body_timeout` (or when under the minimum rate).
        """
        headers = [
            ("content-type", resp.content_type),
            ("cache-control", "no-store"),
            ("x-content-type-options", "nosniff"),
            ("connection", "close"),
        ]

        async def pump() -> None:
            writer.write(
                conn.send(
                    h11.Response(
                        status_code=resp.status,
                        headers=headers,
                        reason=HTTPStatus(resp.status).phrase,
                    )
                )
            )
            await asyncio.wait_for(writer.drain(), self.cfg.body_timeout)
            pace = self._pace()
            async for chunk in resp.chunks:
                if chunk:
                    await self._write(conn, writer, chunk, pace)
            writer.write(conn.send(h11.EndOfMessage()))
            await asyncio.wait_for(writer.drain(), self.cfg.body_timeout)

        async def client_gone() -> None:
            while await reader.read(_READ_SIZE):
                pass  # nothing more is expected; anything sent is ignored until EOF

        async def server_stopped() -> None:
            while self._serving():
                await asyncio.sleep(_IDLE_SLICE)

        tasks = [asyncio.create_task(c) for c in (pump(), client_gone(), server_stopped())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    exc = task.exception()
                    if not isinstance(exc, ConnectionError | TimeoutError):
                        log.error("admin stream failed", exc_info=exc)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await resp.chunks.aclose()
        if tasks[2] in done and conn.our_state is h11.SEND_BODY:
            # Shutting down: end the stream cleanly so the client sees a complete response.
            with contextlib.suppress(Exception):
                writer.write(conn.send(h11.EndOfMessage()))
                await asyncio.wait_for(writer.drain(), self.cfg.body_timeout)


def _probe_peer(writer: asyncio.StreamWriter) -> None:
    """Turn on TCP keep-alive probes (`_TCP_KEEPALIVE`) for a TCP connection."""
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    idle, interval, count = _TCP_KEEPALIVE
    with contextlib.suppress(OSError, AttributeError):  # the TCP_* names are Linux's
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


def _client_closes(event: h11.Request) -> bool:
    """Whether the client said this is its last request (`Connection: close`, or HTTP/1.0)."""
    if event.http_version == b"1.0":
        return True
    return any(
        key == b"connection" and b"close" in (t.strip() for t in value.lower().split(b","))
        for key, value in event.headers
    )


async def start_admin_server(
    cfg: GatewayConfig,
    registry: Registry,
    instances: InstanceManager,
    token: str,
    *,
    extra_routes: Iterable[Route] = (),
) -> asyncio.base_events.Server:
    """Listen on `cfg.admin_listen` and serve the admin API until the returned server closes.

    `extra_routes` lets later subsystems (bundles, tokens, metrics) add endpoints with the same
    auth, limits and error format. Closing the server also ends open log streams and idle
    keep-alive connections within about half a second.
    """
    host, port = split_host_port(cfg.admin_listen, "admin_listen")
    admin = AdminServer(cfg, registry, instances, token, extra_routes)
    server = await asyncio.start_server(
        admin.handle_connection, host, port, reuse_address=True, limit=_READ_SIZE
    )
    admin.server = server
    return server
