"""One instance: an (app, branch) and its process, and the per-request bookkeeping the data plane
calls (`Instance.checkout` for every plain request, `acquire`/`release` otherwise).

Compiled by mypyc with the relay (setup.py, gateway/compiled.py): `Instance` is a native class,
so the relay's calls into it are direct C calls on struct fields. Only synchronous bookkeeping
lives here; starting, readiness, eviction and crash handling (tasks and awaits) stay interpreted
in gateway/instances.py, which owns every Instance. That split keeps mypyc's one hazard out of
the control path: compiled code trusts mypy's narrowing of an attribute (`x.a = None`, then a
read of `x.a`) even where an await in between let another task change it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    from gateway.appspec import AppSpec, BranchSpec
    from gateway.coldstart import StartStages
    from gateway.instances import InstanceManager
    from gateway.launcher import ExitInfo
    from gateway.upstream import UpstreamConnection

MAX_UPSTREAM_CONNECTIONS = 256  # per instance; requests beyond wait in the queue
LOST_REASON_WAIT = 0.5


class StaticSite(Protocol):
    """Serves a static bundle inside the gateway (gateway/static.py); no process is started."""

    def serve(self, exchange: Any) -> None: ...


class Waiter(Protocol):
    """What an instance needs from a request waiting for it (gateway.proxy.Exchange)."""

    queued_at: float
    instance: Instance | None

    def attach(self, conn: UpstreamConnection) -> None: ...
    def fail(self, status: int, message: str, retry_after: int | None = None) -> None: ...


class State(enum.Enum):
    COLD = "cold"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


WARM = (State.STARTING, State.READY, State.DRAINING)
_READY: Final = State.READY  # a C static when compiled (setup.py); a module global otherwise


class Instance:
    """One (app, branch) and the process serving it, if any."""

    # Slots: CPython 3.11 specializes attribute access on small fixed layouts; the data plane
    # reads and writes several of these on every request (acquire, release).
    __slots__ = (
        "app",
        "branch",
        "broken",
        "connections",
        "exited",
        "failed_until",
        "failures",
        "first_byte_pending",
        "id",
        "idle",
        "import_ms",
        "in_flight",
        "internal",
        "last_activity",
        "last_error",
        "last_request",
        "live",
        "lost",
        "manager",
        "netns_fd",
        "next_start_at",
        "pid",
        "ready_at",
        "retired",
        "site",
        "socket_path",
        "special",
        "stages",
        "start_watches_exit",
        "started_at",
        "starts",
        "state",
        "stopping",
        "uid",
        "uid_from_pool",
        "upgraded",
        "waiters",
        "woken_at",
        "zygote_unfit",
    )

    def __init__(self, manager: InstanceManager, app: AppSpec, branch: BranchSpec) -> None:
        self.manager = manager
        self.app = app
        self.branch = branch
        self.state = State.COLD
        self.id: str | None = None
        self.pid: int | None = None
        self.socket_path = ""
        self.idle: list[UpstreamConnection] = []
        self.connections = 0
        self.waiters: deque[Waiter] = deque()
        self.in_flight = 0
        self.upgraded = 0
        self.last_activity = time.monotonic()
        self.last_request: float | None = None
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.starts = 0
        self.failures = 0
        self.next_start_at = 0.0
        self.failed_until = 0.0
        self.last_error: str | None = None
        self.exited: asyncio.Future[ExitInfo] | None = None
        # Resolved when the fork server reports the instance's socket live (pool claims only):
        # the readiness probe then connects once instead of polling.
        self.live: asyncio.Future[None] | None = None
        self.lost: list[Callable[[str], None]] = []
        self.stopping = False
        self.retired = False  # replaced by a new spec: finish what it has, never start again
        self.broken: str | None = None  # a spec that cannot run; answered 503 with this reason
        self.site: StaticSite | None = None  # static runtime: answered in the gateway
        self.special = False  # any of the three above: one check on the hot path
        self.uid: int | None = None  # the sandbox uid while a sandboxed process runs
        self.uid_from_pool = False  # `uid` is a claimed member's (the fork server returns it)
        self.internal = False  # one of dorm's own services: never evicted
        self.netns_fd = -1  # a sandboxed TCP app's network namespace, to connect inside it
        self.woken_at: float | None = None  # when the request that started it was queued
        self.stages: StartStages | None = None  # the last start, stage by stage
        self.first_byte_pending = False
        self.import_ms: float | None = None  # a claimed member's own time to load the app
        self.zygote_unfit = False  # its start forked from the zygote failed, a fresh one did not
        self.start_watches_exit = False  # the start task decides what an exit while starting means

    def first_byte_relayed(self) -> None:
        """The first response of this start reached the client: close its timing."""
        self.first_byte_pending = False
        if self.stages is not None and self.ready_at is not None:
            self.stages.first_byte = (time.monotonic() - self.ready_at) * 1000

    # -- hot path ---------------------------------------------------------------------------------
    def checkout(self, now: float) -> UpstreamConnection | None:
        """acquire's common case for a caller that sends on the connection itself: a pooled
        idle connection of a READY instance nobody is queued for, counted in flight (the
        caller hands it back with `release`). None: call `acquire`. One Python call a request
        instead of two (acquire, then the waiter's attach)."""
        idle = self.idle
        if idle and self.state is _READY and not self.waiters and not self.special:
            self.last_activity = self.last_request = now
            self.in_flight += 1
            return idle.pop()
        return None

    def acquire(self, waiter: Waiter, now: float) -> None:
        """Give `waiter` an upstream connection now, or queue it (waking the instance if cold).
        `now` is the caller's `time.monotonic()`: the data plane has just read the clock for
        its own deadline, and reading it again costs a call on every request."""
        if self.special:
            self._acquire_special(waiter)
            return
        self.last_activity = self.last_request = now
        if self.state is _READY and not self.waiters:
            idle = self.idle
            if idle:
                self.in_flight += 1
                waiter.attach(idle.pop())
                return
            if self.connections < MAX_UPSTREAM_CONNECTIONS:
                self.in_flight += 1
                self.connections += 1
                self.manager.connect(self, waiter)
                return
        if self.state is State.FAILED and now < self.failed_until:
            waiter.fail(
                503,
                f"app {self.app.name!r} is failing: {self.last_error}; retrying after a cool-down",
                math.ceil(self.failed_until - now),
            )
            return
        if len(self.waiters) >= self.app.max_queue:
            waiter.fail(
                503,
                f"app {self.app.name!r} is busy: {len(self.waiters)} requests already queued",
                1,
            )
            return
        waiter.queued_at = now
        self.waiters.append(waiter)
        self.manager._sweepable.add(self)
        if self.state in (State.COLD, State.FAILED):
            self.manager.wake(self)

    def _acquire_special(self, waiter: Waiter) -> None:
        if self.retired:
            self.manager.reroute(self, waiter)
        elif self.broken is not None:
            waiter.fail(503, f"app {self.app.name!r} cannot run: {self.broken}")
        elif self.site is not None:
            self.last_request = self.last_activity = time.monotonic()
            self.manager._recently_active.add(self)  # no process, never swept: noted for `activity`
            self.site.serve(waiter)

    def cancel(self, waiter: Waiter) -> None:
        """The client of a queued request went away."""
        with contextlib.suppress(ValueError):
            self.waiters.remove(waiter)

    def release(self, conn: UpstreamConnection, reusable: bool, now: float) -> None:
        """A request finished with `conn`: reuse it for the next waiter, pool it or close it.
        `now` is the caller's `time.monotonic()`, read once for this and its own deadline."""
        self.in_flight -= 1
        self.last_activity = now
        if reusable and self.state is _READY and not conn.closed:
            if self.waiters:
                self.in_flight += 1
                self.waiters.popleft().attach(conn)
                return
            self.idle.append(conn)
            return
        conn.close()
        self.dispatch_waiters()

    def connection_closed(self, conn: UpstreamConnection) -> None:
        self.connections -= 1
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def dispatch_waiters(self) -> None:
        """Hand queued requests to connections, opening new ones up to the cap."""
        while self.waiters and self.state is State.READY:
            if self.idle:
                self.in_flight += 1
                self.waiters.popleft().attach(self.idle.pop())
            elif self.connections < MAX_UPSTREAM_CONNECTIONS:
                self.in_flight += 1
                self.connections += 1
                self.manager.connect(self, self.waiters.popleft())
            else:
                return

    def fail_waiters(self, status: int, message: str, retry_after: int | None = None) -> None:
        waiters, self.waiters = self.waiters, deque()
        for waiter in waiters:
            waiter.fail(status, message, retry_after)

    def upstream_lost(
        self, report: Callable[[str], None], fallback: str = "the app closed the connection"
    ) -> None:
        """An upstream connection died mid-request: report why once the exit is known.

        The connection usually drops a moment before the fork server reports the exit; waiting
        briefly lets the client see "ran out of memory" instead of a bare "connection lost".
        """
        if self.pid is None:
            report(self.last_error or fallback)
            return
        self.lost.append(lambda reason: report(reason or fallback))
        asyncio.get_running_loop().call_later(LOST_REASON_WAIT, self._flush_lost, None)

    def _flush_lost(self, reason: str | None) -> None:
        lost, self.lost = self.lost, []
        for report in lost:
            report(reason or "")

    # -- views ------------------------------------------------------------------------------------
    @property
    def idle_for(self) -> float:
        return time.monotonic() - self.last_activity

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or self.upgraded > 0 or bool(self.waiters)

    def snapshot(self) -> dict[str, Any]:
        wall = time.time() - time.monotonic()

        def at(t: float | None) -> float | None:
            return None if t is None else round(wall + t, 3)

        return {
            "app": self.app.name,
            "branch": self.branch.name,
            "state": self.state.value,
            "pid": self.pid,
            "in_flight": self.in_flight,
            "upgraded": self.upgraded,
            "queued": len(self.waiters),
            "connections": self.connections,
            "started_at": at(self.started_at),
            "ready_at": at(self.ready_at),
            "last_request": at(self.last_request),
            "starts": self.starts,
            "failures": self.failures,
            "last_error": self.last_error,
            "isolation": self.app.isolation or self.manager.isolation,
            # Sandboxed without root: user namespaces, no cgroups, the gateway's own uid.
            "rootless": self.manager.rootless and self.app.isolation != "process",
            "uid": self.uid,
            "last_start": self.stages.as_dict() if self.stages is not None else None,
        }
