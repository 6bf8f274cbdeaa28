"""Cold-start benchmark: first-response latency and idle memory of a cold python-asgi app via dorm.

    python -m bench.coldstart [--quick] [--no-plot] [--profile auto|yes|no] [--no-write]

A real `dorm serve` is started three times with a throw-away config, each serving a tiny raw ASGI
app (`HELLO_APP`, shown at /app through `app_dir`) registered many times under distinct names:

  * isolation "auto" (a full sandbox when run as root) with warm pools on (`[pool]` as the
    gateway's defaults): cold starts claim a pre-forked, pre-confined pool member ("pool");
  * isolation "auto" with pools off (`[pool] max_idle = 0`), apps with `start = "zygote"`
    (forked from the fork server, which preloaded granian and uvloop) and `start = "fresh"`
    (a new interpreter running granian);
  * isolation "process" (plain child processes; pools off), zygote and fresh.

Each of these five setups is measured the same way:

  * sequential: one cold start at a time; the app is stopped through the admin API and waited
    for until `cold` between rounds, so every sample is a real cold start;
  * bursts of 1/5/25/100 distinct cold apps requested at the same moment (asyncio clients);
  * idle memory: K apps are woken one at a time, left idle, and the PSS of every process of each
    instance is summed from /proc/<pid>/smaps_rollup; the fork server's, the gateway's and every
    idle pool member's (the `idle_pids` of GET /v1/pools) too.

Every sample is classified by the path the gateway says the start took — `last_start.path` of
GET /v1/instances (pool, zygote or fresh), read after the response and checked to belong to this
start by the instance's `starts` counter — never by what the setup was meant to do: a start in
the pool setup that found the pool empty and fell back to a zygote fork counts as zygote. The
tables say how many starts of each setup took each path.

Latency is measured by the client: from before connect() until the whole response is read, on a
fresh connection with `Connection: close`. The gateway's per-stage timing of the same start
(queue, claim, confine, app, first byte; gateway/coldstart.py) splits it, and the app itself
reports when it was imported and when it served the request (wall clock, comparable across the
sandbox boundary: there is no time namespace).

Baselines from the same run: `python -I -c 'import asyncio'` and a fresh `granian --interface asgi
--uds` process (no dorm) until its first response. With strace installed, one sandboxed zygote
start (pools off) and one pool start are traced (fork server, its pool members and the gateway,
-f -ttt) to show where the milliseconds go.

Everything is bounded (timeouts on every wait, a cap on every loop), all traffic stays on
127.0.0.1, and every process started here is stopped at the end, on error or Ctrl-C too. Results
go to the `## Cold start` section of docs/benchmarks.md (other sections are left alone) and, with
plots on, to docs/img/coldstart-*.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    child_pids,
    children_cpu,
    command_line,
    free_port,
    git_revision,
    kill_pid_if_same,
    machine_cpu,
    machine_info,
    now_utc,
    percentile,
    pkg_version,
    process_tree,
    sigterm_as_interrupt,
    smaps_rollup,
    start_time,
    stop_process,
    tree_cpu_seconds,
    tree_memory,
    wait_for,
    write_section,
)
from gateway.config import PoolConfig

SECTION = "Cold start"
IMG_DIR = REPO / "docs" / "img"
MIB = 1024 * 1024
START_TIMEOUT = 30.0  # the gateway itself
REQUEST_TIMEOUT = 60.0  # one cold request (a burst of 100 fresh interpreters on 2 CPUs is slow)
STOP_TIMEOUT = 60.0  # waiting for stopped instances to be reported cold
MAX_SEQ_ERRORS = 3  # failed sequential starts after which a setup's sequential phase gives up
SETTLE = 0.15  # pause after instances are cold, so a teardown does not overlap the next start
POOL_WAIT = 15.0  # at most this long for a pool to be back at min_idle (before a wake, a burst)
IDLE_SETTLE = 3.0  # how long woken instances idle before their memory is read (--quick: 1 s)
# Before each phase, wait (at most --quiet-wait seconds) until other processes use no more than
# this share of the machine's CPUs: on 2 CPUs a neighbour's test suite doubles cold-start times.
QUIET = 0.15
# Targets from issues 4 and 5.
TARGET_POOL_P50 = 0.002
TARGET_POOL_P99 = 0.010
TARGET_ZYGOTE_P50 = 0.010
TARGET_FRESH_P50 = 0.150
TARGET_IDLE_PSS = 8 * MIB
TARGET_BURST = 25
TARGET_BURST_MAX = 0.100
# The warm pools of the pool setup: the gateway's own [pool] defaults, written out so that the
# report states them (and a change of the defaults shows up in it).
POOL_DEFAULTS = PoolConfig()


@dataclass(frozen=True, slots=True)
class Setup:
    """What a group of cold starts was configured for (not necessarily the path they took)."""

    key: str  # "sandbox/pool", "sandbox/zygote", ...
    isolation: str  # the gateway's isolation: "auto" (a sandbox as root) or "process"
    pools: bool  # [pool] on or off (max_idle = 0)
    start: str  # the apps' `start`: "zygote" or "fresh"
    min_idle: int = POOL_DEFAULTS.min_idle  # with pools on: [pool] min_idle and max_idle
    max_idle: int = POOL_DEFAULTS.max_idle

    @property
    def iso(self) -> str:
        return "sandbox" if self.isolation == "auto" else "process"

    @property
    def gateway(self) -> str:
        """Setups sharing a gateway: same isolation and pools."""
        if not self.pools:
            return f"{self.iso}-nopools"
        return f"{self.iso}-pools-{self.min_idle}-{self.max_idle}"


SETUPS = (
    Setup("sandbox/pool", "auto", True, "zygote"),
    # Pools sized for the burst target: do 25 idle members answer a burst of 25 in 100 ms?
    Setup(
        "sandbox/pool-25",
        "auto",
        True,
        "zygote",
        TARGET_BURST,
        max(TARGET_BURST, POOL_DEFAULTS.max_idle),
    ),
    Setup("sandbox/zygote", "auto", False, "zygote"),
    Setup("sandbox/fresh", "auto", False, "fresh"),
    Setup("process/zygote", "process", False, "zygote"),
    Setup("process/fresh", "process", False, "fresh"),
)
# Paths a start can take, as "<isolation>/<path the gateway reported>", in report order.
BURST_SETUPS = ("sandbox/pool", "sandbox/pool-25", "sandbox/zygote", "process/zygote")
PROFILED = ("sandbox/zygote", "sandbox/pool")  # setups with one start traced by strace
PATH_ORDER = tuple(
    f"{iso}/{p}" for iso in ("sandbox", "process") for p in ("pool", "zygote", "fresh")
)
TAKEN = ("pool", "zygote", "fresh", "?")  # "?": the gateway's report could not be tied to it

# The tenant: a raw ASGI app with no dependencies. It reports, as wall-clock times, when its
# module was imported and when it served the request, so the client can split a cold start.
HELLO_APP = """\
import time

IMPORTED = time.time()


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = b"hello %.6f %.6f" % (IMPORTED, time.time())
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})
"""


# -- samples -------------------------------------------------------------------------------------
@dataclass(slots=True)
class Sample:
    """One cold request: what the client saw, plus what the gateway and the app reported."""

    setup: str  # Setup.key: what it was configured for
    phase: str  # "seq" or "burst-N"
    app: str
    latency: float  # seconds, client-side: connect + request + whole response
    status: int | None = None
    error: str | None = None
    sent_wall: float = 0.0  # time.time() just before connect()
    imported: float | None = None  # app module imported (wall clock, from the response)
    served: float | None = None  # app handled the request (wall clock)
    taken: str = "?"  # the path the gateway reported for this start: pool, zygote, fresh
    stages: dict[str, Any] = field(default_factory=dict)  # its `last_start`, in ms per stage

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def path(self) -> str:
        """ "sandbox/pool", "process/zygote"...: the isolation and the path actually taken."""
        return f"{self.setup.split('/')[0]}/{self.taken}"

    def stage(self, name: str) -> float | None:
        """One stage of the gateway's timing of this start, in seconds (None if not reported)."""
        value = self.stages.get(f"{name}_ms")
        return None if value is None else float(value) / 1000

    @property
    def ready_ms(self) -> float | None:
        """Start began → instance ready (the log's `ready in`): total minus the queue wait."""
        total, queue = self.stages.get("total_ms"), self.stages.get("queue_ms")
        return None if total is None else float(total) - float(queue or 0.0)


@dataclass(slots=True)
class Phase:
    """A group of samples measured together, with the machine's other load meanwhile."""

    name: str
    setup: str
    samples: list[Sample] = field(default_factory=list)
    other_cpu: float = 0.0  # share of all CPUs used by processes that are not this benchmark
    wall: float = 0.0
    pool_idle: list[int] = field(default_factory=list)  # idle pool members as each round began

    def taken(self) -> Counter[str]:
        return Counter(s.taken for s in self.samples)


async def fetch(port: int, app: str, setup: str, phase: str) -> Sample:
    """One GET on a new connection to the gateway, timed from before connect to the last byte."""
    head = f"GET / HTTP/1.1\r\nHost: {app}.localhost\r\nConnection: close\r\n\r\n".encode()
    sent_wall = time.time()
    t0 = time.perf_counter()
    sample = Sample(setup, phase, app, 0.0, sent_wall=sent_wall)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head)
            raw_head = await reader.readuntil(b"\r\n\r\n")
            lines = raw_head.decode("latin-1").split("\r\n")
            sample.status = int(lines[0].split()[1])
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length) if length else await reader.read()
        sample.latency = time.perf_counter() - t0
        parts = body.split()
        if sample.status == 200 and len(parts) == 3 and parts[0] == b"hello":
            sample.imported, sample.served = float(parts[1]), float(parts[2])
        elif sample.status != 200:
            sample.error = f"HTTP {sample.status}: {body[:200].decode(errors='replace')}"
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
        sample.latency = time.perf_counter() - t0
        sample.error = f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    return sample


async def burst(port: int, apps: list[str], setup: str, phase: str) -> list[Sample]:
    """Request every app at the same moment; each on its own connection."""
    return list(await asyncio.gather(*(fetch(port, a, setup, phase) for a in apps)))


# -- one gateway ---------------------------------------------------------------------------------
class Gateway:
    """One `dorm serve` with its own config, data dir and cgroup parent; `close()` undoes it."""

    def __init__(
        self,
        tmp: Path,
        isolation: str,
        pools: bool,
        name: str,
        min_idle: int = POOL_DEFAULTS.min_idle,
        max_idle: int = POOL_DEFAULTS.max_idle,
    ) -> None:
        self.isolation = isolation
        self.pools_on = pools
        self.min_idle = min_idle if pools else 0
        self.max_idle = max_idle if pools else 0
        self.name = name
        self.dir = tmp / name
        self.dir.mkdir(mode=0o755)
        self.port = free_port()
        self.admin_port = free_port()
        self.token = f"bench-{secrets.token_hex(16)}"
        # A cgroup parent of our own: the fork server removes "stale" sandboxes under its parent
        # at start, and other engineers' gateways and tests may be using the default one.
        self.cgroup_parent = f"dorm-bench-{secrets.token_hex(4)}"
        self.log_path = self.dir / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen_pids: set[int] = set()
        self.seen_started: dict[int, int | None] = {}  # instance pid → its start time

    def pool_section(self) -> str:
        """[pool] spelled out (defaults but the bounds), or off (max_idle = 0: no members)."""
        if not self.pools_on:
            return "[pool]\nmin_idle = 0\nmax_idle = 0\n"
        d = POOL_DEFAULTS
        return (
            f"[pool]\nmin_idle = {self.min_idle}\nmax_idle = {self.max_idle}\n"
            f"refill_concurrency = {d.refill_concurrency}\nshrink_after = {d.shrink_after:g}\n"
        )

    def write_config(self) -> Path:
        cfg = self.dir / "dorm.toml"
        cfg.write_text(
            "[gateway]\n"
            f'listen = "127.0.0.1:{self.port}"\n'
            f'admin_listen = "127.0.0.1:{self.admin_port}"\n'
            'domains = ["localhost"]\n'
            f'data_dir = "{self.dir}/data"\n'
            f'run_dir = "{self.dir}/run"\n'
            f'admin_token = "{self.token}"\n'
            f'isolation = "{self.isolation}"\n'
            f'cgroup_parent = "{self.cgroup_parent}"\n'
            'uid_range = "310000-310999"\n'
            "max_warm_instances = 1000\n"
            'shutdown_timeout = "10s"\n'
            "\n" + self.pool_section()
        )
        return cfg

    def start(self) -> None:
        cfg = self.write_config()
        log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from gateway.server import serve; sys.exit(serve(sys.argv[1]))",
                str(cfg),
            ],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "DORM_LOG_LEVEL": "INFO"},
        )
        log.close()

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"dorm exited with {self.proc.returncode}\n{self.tail()}")
            try:
                return self.admin("GET", "/v1/health")[0] == 200
            except OSError:
                return False

        wait_for(up, START_TIMEOUT, "the gateway's admin API", interval=0.05)
        wait_for(lambda: self.forkserver_pid() is not None, START_TIMEOUT, "the fork server")

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"the {self.name} gateway died\n{self.tail()}")

    def forkserver_pid(self) -> int | None:
        """The gateway's child running gateway.forkserver."""
        if self.proc is None:
            return None
        for pid in child_pids(self.proc.pid):
            with contextlib.suppress(OSError):
                if b"gateway.forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
        return None

    # -- admin API ---------------------------------------------------------------------------------
    def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=30)
        headers = {"Authorization": f"Bearer {self.token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
        finally:
            conn.close()

    def put_app(self, name: str, spec: dict[str, Any]) -> None:
        status, body = self.admin("PUT", f"/v1/apps/{name}", spec)
        if status not in (200, 201):
            raise RuntimeError(f"PUT /v1/apps/{name}: {status} {body}")

    def instances(self) -> dict[str, dict[str, Any]]:
        """app name → its main-branch instance (with `starts` and `last_start`)."""
        status, body = self.admin("GET", "/v1/instances")
        if status != 200:
            raise RuntimeError(f"GET /v1/instances: {status} {body}")
        items = body["instances"] if isinstance(body, dict) else body
        out = {i["app"]: i for i in items if i["branch"] == "main"}
        for inst in out.values():
            if inst.get("pid"):
                self.saw(int(inst["pid"]))
        return out

    def instance(self, app: str) -> dict[str, Any]:
        """One instance, as GET /v1/instances/{app}/{branch} reports it ({} before its first)."""
        status, body = self.admin("GET", f"/v1/instances/{app}/main")
        if status == 404:
            return {}
        if status != 200:
            raise RuntimeError(f"GET /v1/instances/{app}/main: {status} {body}")
        if body.get("pid"):
            self.saw(int(body["pid"]))
        return dict(body)

    def saw(self, pid: int) -> None:
        """Remember an instance's pid with its start time, for the cleanup in `close()`."""
        self.seen_pids.add(pid)
        if pid not in self.seen_started:
            self.seen_started[pid] = start_time(pid)

    def pool_state(self) -> dict[str, Any]:
        """GET /v1/pools: per pool (sandbox shape) idle, idle_pids, claimed, misses..."""
        status, body = self.admin("GET", "/v1/pools")
        if status != 200:
            raise RuntimeError(f"GET /v1/pools: {status} {body}")
        return dict(body)

    def pool_idle(self) -> int:
        """Idle members over every python-asgi pool (0 with pools off)."""
        return sum(
            int(p.get("idle", 0))
            for p in self.pool_state().get("pools", [])
            if p.get("runtime") == "python-asgi" and p.get("kind", "runtime") == "runtime"
        )

    def stop_apps(self, apps: list[str]) -> dict[str, dict[str, Any]]:
        """Stop the apps' instances, wait until every one is reported cold; the final listing."""
        for app in apps:
            status, body = self.admin("POST", f"/v1/apps/{app}/stop")
            if status not in (200, 202, 204):
                raise RuntimeError(f"POST /v1/apps/{app}/stop: {status} {body}")
        wanted = set(apps)
        seen: dict[str, dict[str, Any]] = {}

        def all_cold() -> bool:
            seen.clear()
            seen.update(self.instances())
            return all(seen.get(a, {}).get("state", "cold") == "cold" for a in wanted)

        wait_for(all_cold, STOP_TIMEOUT, f"{len(apps)} instances to stop", interval=0.02)
        time.sleep(SETTLE)
        return dict(seen)

    # -- cleanup -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the gateway (it stops its instances), then make sure nothing of ours is left."""
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, grace=15)
        # The gateway kills its instances; this is the belt to its braces, by (pid, start time)
        # only: thousands of instances come and go in a run, and once they are gone their pids
        # belong to other people's processes on this shared machine.
        for pid, started in self.seen_started.items():
            kill_pid_if_same(pid, started, grace=1.0)
        self.seen_started.clear()
        self.seen_pids.clear()
        # The gateway removes its instances' cgroups but keeps the parent; it may sit right
        # under a controller's root or below this process's own cgroup (v1 hierarchies differ).
        # Directories may vanish while we look (the fork server's last removals): every scan
        # tolerates that, where Path.glob raises FileNotFoundError.
        for base in _find_dirs("/sys/fs/cgroup", self.cgroup_parent, depth=5):
            for top, _dirs, _files in os.walk(base, topdown=False, onerror=lambda _e: None):
                with contextlib.suppress(OSError):
                    os.rmdir(top)


def _find_dirs(root: str, name: str, depth: int) -> list[str]:
    """Directories called `name` at most `depth` levels below `root` (not below each other)."""
    found: list[str] = []
    todo = [(root, 0)]
    while todo and len(todo) < 100_000:
        where, level = todo.pop()
        try:
            entries = list(os.scandir(where))
        except OSError:
            continue
        for entry in entries:
            with contextlib.suppress(OSError):
                if not entry.is_dir(follow_symlinks=False):
                    continue
                if entry.name == name:
                    found.append(entry.path)
                elif level + 1 < depth:
                    todo.append((entry.path, level + 1))
    return found


def classify(
    samples: list[Sample], before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
) -> None:
    """Give each sample the path and stages the gateway reported for its start.

    The report is the instance's `last_start`; it belongs to this sample's start only if the
    instance's `starts` went up by exactly one since the listing taken before the request (the
    app was cold then). Anything else (a crash and restart, a missing instance) stays "?".
    """
    for s in samples:
        inst = after.get(s.app) or {}
        prev = int((before.get(s.app) or {}).get("starts", 0))
        last = inst.get("last_start")
        if last and int(inst.get("starts", 0)) == prev + 1 and last.get("path") in TAKEN:
            s.taken = str(last["path"])
            s.stages = dict(last)


# -- the benchmark -------------------------------------------------------------------------------
@dataclass(slots=True)
class Memory:
    """Idle memory of the instances that took one path, and the shared processes next to them."""

    path: str  # path taken, e.g. "sandbox/pool"
    setup: str  # the setup whose instances these are
    per_instance: list[dict[str, int]]
    forkserver: dict[str, int]
    gateway: dict[str, int]
    pool: list[dict[str, int]] = field(default_factory=list)  # idle pool members (GET /v1/pools)


@dataclass
class Results:
    phases: list[Phase] = field(default_factory=list)
    memory: list[Memory] = field(default_factory=list)
    baselines: dict[str, list[float]] = field(default_factory=dict)
    baseline_memory: dict[str, int] = field(default_factory=dict)
    profiles: dict[str, str] = field(default_factory=dict)  # setup → strace summary
    errors: list[str] = field(default_factory=list)
    quiet_waited: float = 0.0  # seconds spent waiting for a quiet machine
    not_quiet: int = 0  # phases started while the machine was still busy


class Bench:
    """Owns every process and file of one run; `close()` undoes all of it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="dorm-cs-", dir="/tmp"))
        self.tmp.chmod(0o755)  # sandboxed tenants run as other uids and must reach /app
        self.app_dir = self.tmp / "app"
        self.app_dir.mkdir(mode=0o755)
        (self.app_dir / "main.py").write_text(HELLO_APP)
        (self.app_dir / "main.py").chmod(0o644)
        self.gateways: list[Gateway] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.loop = asyncio.Runner()
        self.results = Results()

    def close(self) -> None:
        for proc in self.procs:
            stop_process(proc, signal.SIGTERM, grace=3)
        for gw in self.gateways:
            gw.close()
        self.loop.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers -----------------------------------------------------------------------------------
    def spec(self, start: str) -> dict[str, Any]:
        return {
            "runtime": "python-asgi",
            "entry": "main:app",
            "app_dir": str(self.app_dir),
            "start": start,
            "idle_timeout": "1h",  # we stop them ourselves; eviction must not race a measurement
            "startup_timeout": f"{REQUEST_TIMEOUT:g}s",
        }

    @staticmethod
    def app_names(setup: Setup, count: int) -> list[str]:
        return [f"{setup.start[0]}{i}" for i in range(count)]

    def wait_quiet(self) -> None:
        """Wait, bounded, for other processes to leave the CPUs mostly idle before a phase."""
        if self.args.quiet_wait <= 0:  # --quick: no half-second load sample per phase either
            return
        # Each wait is bounded, and so is their sum (--quiet-budget): 30 phases on a machine that
        # stays busy must not add five minutes to the run.
        left = max(0.0, self.args.quiet_budget - self.results.quiet_waited)
        deadline = time.monotonic() + min(self.args.quiet_wait, left)
        t0 = time.monotonic()
        cpus = os.cpu_count() or 1
        while True:
            busy, _ = machine_cpu()
            time.sleep(0.5)
            share = (machine_cpu()[0] - busy) / (0.5 * cpus)
            if share <= QUIET:
                break
            if time.monotonic() > deadline:
                self.results.not_quiet += 1
                print(f"bench.coldstart: machine still {share:.0%} busy; going on", file=sys.stderr)
                break
        self.results.quiet_waited += time.monotonic() - t0

    @contextlib.contextmanager
    def measured(self, gw: Gateway, phase: Phase) -> Iterator[None]:
        """Time a phase and record how much CPU other processes used meanwhile."""
        self.wait_quiet()
        ours = self._our_cpu(gw)
        busy, _ = machine_cpu()
        t0 = time.monotonic()
        yield
        phase.wall = time.monotonic() - t0
        busy2, _ = machine_cpu()
        spent = self._our_cpu(gw) - ours
        cpus = os.cpu_count() or 1  # /proc/stat sums every CPU, not just our affinity
        if phase.wall > 0:
            phase.other_cpu = max(0.0, (busy2 - busy - spent) / (phase.wall * cpus))

    @staticmethod
    def _our_cpu(gw: Gateway) -> float:
        me = os.times()
        total = me.user + me.system + children_cpu()
        if gw.proc is not None:
            total += tree_cpu_seconds(gw.proc.pid)
        return total

    def wait_pool(self, gw: Gateway) -> None:
        """With pools on: wait (bounded) until the pool is back at min_idle after claims."""
        if not gw.pools_on:
            return
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: gw.pool_idle() >= gw.min_idle, POOL_WAIT, "pool", interval=0.01)

    # -- phases ------------------------------------------------------------------------------------
    def run_gateway(self, setups: list[Setup]) -> None:
        """One gateway for setups that share isolation and pools; each setup measured in turn."""
        first = setups[0]
        began = time.monotonic()
        gw = Gateway(
            self.tmp, first.isolation, first.pools, first.gateway, first.min_idle, first.max_idle
        )
        self.gateways.append(gw)
        gw.start()
        n_apps = max(max(self.args.bursts), self.args.idle)
        for setup in setups:
            for name in self.app_names(setup, n_apps):
                gw.put_app(name, self.spec(setup.start))
        # Warm-up (not recorded): the first start after boot pays one-off costs (seccomp filter
        # compile, page cache, the sandboxes import in the fork server); with pools on, it is
        # also the miss that makes the fork server fill a pool for this sandbox shape.
        for setup in setups:
            name = self.app_names(setup, 1)[0]
            self.loop.run(fetch(gw.port, name, "warmup", "warmup"))
            gw.stop_apps([name])
            self.wait_pool(gw)
        for setup in setups:
            if setup.key in PROFILED and self.args.profile_with:
                self.wait_pool(gw)
                self.results.profiles[setup.key] = self.profile(gw, setup)
            self.sequential(gw, setup)
            for size in self.args.bursts:
                self.bursts(gw, setup, size)
            self.idle_memory(gw, setup)
        gw.check_alive()
        gw.close()
        print(
            f"bench.coldstart: {', '.join(s.key for s in setups)} took "
            f"{time.monotonic() - began:.0f} s",
            file=sys.stderr,
        )

    def sequential(self, gw: Gateway, setup: Setup) -> None:
        app = self.app_names(setup, 1)[0]
        phase = Phase("seq", setup.key)
        before = gw.instances()
        with self.measured(gw, phase):
            for i in range(self.args.seq):
                phase.pool_idle.append(gw.pool_idle() if gw.pools_on else 0)
                s = self.loop.run(fetch(gw.port, app, setup.key, "seq"))
                classify([s], before, {app: gw.instance(app)})
                before = gw.stop_apps([app])
                phase.samples.append(s)
                self.progress(setup.key, f"seq {i + 1}/{self.args.seq}", [s])
                if sum(not x.ok for x in phase.samples) >= MAX_SEQ_ERRORS:
                    # A broken path would cost REQUEST_TIMEOUT per sample; say so and go on.
                    self.results.errors.append(
                        f"{setup.key} sequential stopped after {len(phase.samples)} starts: "
                        f"{MAX_SEQ_ERRORS} failed (last: {s.error})"
                    )
                    break
        self.results.phases.append(phase)
        gw.check_alive()

    def bursts(self, gw: Gateway, setup: Setup, size: int) -> None:
        apps = self.app_names(setup, size)
        reps = self.args.burst_reps.get(size, 1)
        phase = Phase(f"burst-{size}", setup.key)
        before = gw.instances()
        with self.measured(gw, phase):
            for r in range(reps):
                # With pools on, each round meets a pool back at min_idle (refilling 25 members
                # takes longer than the pause after the stop), not what the last round left.
                self.wait_pool(gw)
                phase.pool_idle.append(gw.pool_idle() if gw.pools_on else 0)
                samples = self.loop.run(burst(gw.port, apps, setup.key, f"burst-{size}"))
                classify(samples, before, gw.instances())
                before = gw.stop_apps(apps)
                phase.samples += samples
                self.progress(setup.key, f"burst {size} ({r + 1}/{reps})", samples)
                if not any(x.ok for x in samples):
                    self.results.errors.append(
                        f"{setup.key} burst of {size}: every request of round {r + 1} failed; "
                        "no more rounds"
                    )
                    break
        self.results.phases.append(phase)
        gw.check_alive()

    def idle_memory(self, gw: Gateway, setup: Setup) -> None:
        """Wake K apps one at a time, let them idle, sum the PSS of each instance's processes.

        One at a time, and with pools on after the pool is back at min_idle, so that each wake
        takes the setup's path (a burst would exhaust the pool); each instance is still filed
        under the path the gateway reports for it.
        """
        apps = self.app_names(setup, self.args.idle)
        self.wait_quiet()
        before = gw.instances()
        failed = 0
        for app in apps:
            self.wait_pool(gw)
            s = self.loop.run(fetch(gw.port, app, setup.key, "idle"))
            if not s.ok:
                self.results.errors.append(f"{setup.key} idle wake {s.app}: {s.error}")
                failed += 1
                if failed >= MAX_SEQ_ERRORS:
                    break
        time.sleep(self.args.idle_settle)
        insts = gw.instances()
        by_path: dict[str, list[dict[str, int]]] = {}
        for app in apps:
            inst = insts.get(app)
            s = Sample(setup.key, "idle", app, 0.0)
            classify([s], before, insts)
            if inst and inst.get("state") == "ready" and inst.get("pid"):
                mem = tree_memory(int(inst["pid"]))
                if mem.get("processes"):
                    by_path.setdefault(s.path, []).append(mem)
        fs = gw.forkserver_pid()
        assert gw.proc is not None
        # Idle pool members, as the gateway lists them: what a pool costs while nobody needs it.
        # Only the app runtimes' pools (the fork server's), not the code runner's, if listed.
        members = [
            tree_memory(int(pid))
            for p in gw.pool_state().get("pools", [])
            if p.get("kind", "runtime") == "runtime"
            for pid in p.get("idle_pids", [])
        ]
        members = [m for m in members if m.get("processes")]
        fs_mem = smaps_rollup(fs) if fs else {}
        gw_mem = smaps_rollup(gw.proc.pid)
        for path in sorted(by_path, key=path_rank):
            per = by_path[path]
            self.results.memory.append(Memory(path, setup.key, per, fs_mem, gw_mem, members))
            pss = sorted(m.get("Pss", 0) for m in per)
            print(
                f"{setup.key:15} idle: {len(per)} instances took {path}, PSS median "
                f"{pss[len(pss) // 2] / MIB:.1f} MiB; {len(members)} idle pool members; fork "
                f"server PSS {fs_mem.get('Pss', 0) / MIB:.1f} MiB",
                file=sys.stderr,
            )
        gw.stop_apps(apps)

    @staticmethod
    def progress(setup: str, what: str, samples: list[Sample]) -> None:
        lat = sorted(s.latency for s in samples)
        errors = sum(not s.ok for s in samples)
        taken = Counter(s.taken for s in samples)
        print(
            f"{setup:15} {what:18} p50 {fmt_ms(percentile(lat, 50))}  max {fmt_ms(lat[-1])}  "
            + ",".join(f"{k} {v}" for k, v in sorted(taken.items()))
            + (
                f"  ERRORS {errors}: {next(s.error for s in samples if not s.ok)}" if errors else ""
            ),
            file=sys.stderr,
        )

    # -- baselines -------------------------------------------------------------------------------
    def baselines(self) -> None:
        """The costs dorm's paths are made of, measured without dorm on this machine, now."""
        n = self.args.baseline_runs
        self.wait_quiet()
        py: list[float] = []
        for _ in range(n):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-I", "-c", "import asyncio"], check=True, timeout=30)
            py.append(time.perf_counter() - t0)
        self.results.baselines["python -I -c 'import asyncio'"] = py
        granian = Path(sys.executable).parent / "granian"
        if not granian.exists():
            return
        gr: list[float] = []
        for i in range(n):
            sock = self.tmp / f"granian-{i}.sock"
            cmd = [
                str(granian),
                "--interface",
                "asgi",
                "--uds",
                str(sock),
                "--workers",
                "1",
                "--runtime-threads",
                "1",
                "--no-access-log",
                "--log-level",
                "warning",
                "main:app",
            ]
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                cmd,
                cwd=self.app_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            self.procs.append(proc)
            try:
                gr.append(self._first_uds_response(sock, proc, t0))
                if i == n - 1:
                    time.sleep(IDLE_SETTLE)
                    mem = tree_memory(proc.pid)
                    self.results.baseline_memory["granian"] = mem.get("Pss", 0)
                    self.results.baseline_memory["granian_processes"] = mem.get("processes", 0)
            finally:
                stop_process(proc, signal.SIGTERM, grace=5)
                self.procs.remove(proc)
        self.results.baselines["granian --interface asgi --uds (no dorm)"] = gr

    @staticmethod
    def _first_uds_response(sock: Path, proc: subprocess.Popen[bytes], t0: float) -> float:
        """Poll the socket every 0.2 ms until a GET is answered; seconds since `t0`."""
        import socket as _socket

        deadline = t0 + REQUEST_TIMEOUT
        while time.perf_counter() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"granian exited with {proc.returncode}")
            with _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM) as s:
                try:
                    s.connect(str(sock))
                except OSError:
                    time.sleep(0.0002)
                    continue
                s.settimeout(10)
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
                if not data.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"granian answered {data[:80]!r}")
                return time.perf_counter() - t0
        raise TimeoutError("granian did not answer in time")

    # -- profile ---------------------------------------------------------------------------------
    def profile(self, gw: Gateway, setup: Setup) -> str:
        """strace one sandboxed start (fork server and gateway, -f -ttt) and summarize it."""
        fs = gw.forkserver_pid()
        assert gw.proc is not None and fs is not None
        app = self.app_names(setup, 1)[0]
        # Untraced reference, right before.
        before = gw.instances()
        ref = self.loop.run(fetch(gw.port, app, setup.key, "profile"))
        classify([ref], before, {app: gw.instance(app)})
        before = gw.stop_apps([app])
        outs = {"forkserver": self.tmp / "strace-fs.txt", "gateway": self.tmp / "strace-gw.txt"}
        tracers = []
        # -p for every existing descendant too: pre-forked, pre-confined pool members exist
        # before strace attaches, and -f follows only children forked after it.
        for what, pids in (("forkserver", process_tree(fs)), ("gateway", [gw.proc.pid])):
            attach = [arg for pid in pids for arg in ("-p", str(pid))]
            tracers.append(
                subprocess.Popen(
                    [
                        "strace",
                        "-f",
                        "-ttt",
                        "-T",
                        "-s",
                        "80",
                        "-o",
                        str(outs[what]),
                        *attach,
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
            self.procs.append(tracers[-1])
        time.sleep(1.0)  # attaching to every thread takes a moment
        s = self.loop.run(fetch(gw.port, app, setup.key, "profile"))
        time.sleep(0.3)
        for t in tracers:
            stop_process(t, signal.SIGINT, grace=5)  # strace detaches on SIGINT
            self.procs.remove(t)
        inst = gw.instance(app)
        classify([s], before, {app: inst})
        gw.stop_apps([app])
        return summarize_strace(outs, fs, s, ref, int(inst.get("pid") or 0))


# -- strace summary ------------------------------------------------------------------------------
_STRACE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(.*?)(?: <(\d+\.\d+)>)?$")
_FS_WAIT = ("poll(", "<... poll resumed>", "ppoll(", "<... ppoll resumed>")
_KERNEL_SETUP = (
    "mkdir(",
    "rmdir(",
    "mount(",
    "mount_setattr(",
    "umount2(",
    "open_tree(",
    "move_mount(",
    "pivot_root(",
    "unshare(",
    "setns(",
    "symlink(",
    "mknod(",
)


@dataclass(slots=True)
class _Event:
    t: float
    who: str
    pid: int
    text: str
    dur: float  # seconds inside the syscall (strace -T), 0 if unknown


def summarize_strace(
    outs: dict[str, Path], fs_pid: int, traced: Sample, ref: Sample, tenant_pid: int
) -> str:
    """Turn two strace logs of one cold start into a timeline in ms since the client's connect.

    The tenant's events are those of the instance's pid (as GET /v1/instances reports it) and of
    the processes and threads it cloned: a pool member was confined before the trace began, and
    the refills that follow a claim confine other members meanwhile, so "the first setresuid
    after the spawn frame" would be a refill's, not the tenant's.

    The fork server handles one spawn at a time, so the span from its receiving the spawn frame
    to its sending `spawned` is time during which no other start can make progress: in a burst
    of N cold apps the last one waits for N such spans.
    """
    events: list[_Event] = []
    for who, path in outs.items():
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                m = _STRACE.match(line)
                if m:
                    dur = float(m.group(4)) if m.group(4) else 0.0
                    events.append(_Event(float(m.group(2)), who, int(m.group(1)), m.group(3), dur))
    events.sort(key=lambda e: e.t)
    t0 = traced.sent_wall

    def first(pred: Callable[[_Event], bool], after: float = 0.0) -> float | None:
        for e in events:
            if e.t >= after and pred(e):
                return e.t
        return None

    def ms(t: float | None) -> str:
        return "—" if t is None else f"{(t - t0) * 1000:.2f}"

    got = first(lambda e: e.pid == fs_pid and 'op\\":\\"spawn\\"' in e.text)
    sent = first(lambda e: e.pid == fs_pid and 'ev\\":\\"spawned\\"' in e.text, got or 0.0)
    window = [e for e in events if got and sent and got <= e.t <= sent]
    fs_wait = sum(e.dur for e in window if e.pid == fs_pid and e.text.startswith(_FS_WAIT))
    fs_kernel = sum(e.dur for e in window if e.pid == fs_pid and e.text.startswith(_KERNEL_SETUP))
    forked = first(
        lambda e: e.pid == fs_pid and e.text.startswith(("clone(", "<... clone resumed")),
        got or 0.0,
    )
    tenant = _descendants(events, tenant_pid)
    after = got or 0.0

    def by_tenant(prefix: str) -> float | None:
        return first(lambda e: e.pid in tenant and e.text.startswith(prefix), after)

    marks: list[tuple[str, float | None]] = [
        (
            "gateway accepts the client",
            first(lambda e: e.who == "gateway" and "accept4(" in e.text),
        ),
        ("fork server receives the spawn frame", got),
        ("fork server's first clone() after the spawn frame (a pool refill, if any)", forked),
        ("tenant: uid dropped (setresuid; — if before the claim)", by_tenant("setresuid(")),
        ("tenant: seccomp filter loaded (— if before the claim)", by_tenant("seccomp(")),
        ("fork server sends `spawned` (free for the next start)", sent),
        (
            "tenant opens /app/main.py (app import)",
            first(
                lambda e: (
                    e.pid in tenant
                    and e.text.startswith("openat(")
                    and "main.py" in e.text
                    and "ENOENT" not in e.text
                ),
                after,
            ),
        ),
        (
            "the socket appears at /run/dorm/http.sock (bind, or rename of one bound before)",
            first(
                lambda e: (
                    e.text.startswith(("bind(", "rename(", "renameat(", "renameat2("))
                    and "http.sock" in e.text
                ),
                after,
            ),
        ),
        ("tenant listens (— if before the claim)", by_tenant("listen(")),
        (
            "gateway's first readiness connect()",
            first(
                lambda e: (
                    e.who == "gateway" and e.text.startswith("connect(") and "http.sock" in e.text
                )
            ),
        ),
        (
            "gateway's readiness connect() succeeds",
            first(
                lambda e: (
                    e.who == "gateway"
                    and e.text.startswith("connect(")
                    and "http.sock" in e.text
                    and ("= 0" in e.text or "EINPROGRESS" in e.text)
                )
            ),
        ),
    ]
    probes = sum(
        1
        for e in events
        if e.who == "gateway" and e.text.startswith("connect(") and "http.sock" in e.text
    )
    rows = [
        f"| event (strace -f -ttt -T, one start that took {traced.path}) | ms after connect() |",
        "|---|---:|",
    ]
    rows += [f"| {label} | {ms(t)} |" for label, t in marks]
    rows.append(f"| client has the whole response | {traced.latency * 1000:.2f} |")
    span = (sent - got) * 1000 if got and sent else None
    notes = [
        f"Traced start: {traced.latency * 1000:.1f} ms client-side (gateway: ready in "
        f"{fmt_opt(traced.ready_ms)} ms); the same start untraced "
        f"just before: {ref.latency * 1000:.1f} ms (ready in "
        f"{fmt_opt(ref.ready_ms)} ms). ptrace stops every system "
        "call, so traced times are stretched "
        f"({traced.latency / ref.latency:.1f}x here): read the order and the shares, not the "
        "totals."
    ]
    if span is not None:
        notes.append(
            f"The fork server was busy with this one spawn for {span:.1f} ms (spawn frame in → "
            f"`spawned` out), of which {fs_kernel * 1000:.1f} ms inside cgroup/namespace/mount "
            f"system calls it made itself (mkdir in cgroupfs, unshare, mount, pivot_root, setns) "
            f"and {fs_wait * 1000:.1f} ms blocked in poll() waiting for its child to report "
            "(for a zygote start: first that the pre-forked child is set up, then that the "
            "tenant is confined; for a pool start: that the claimed member took the tenant)."
        )
    notes.append(f"The gateway made {probes} readiness connect() attempts.")
    return "\n".join(rows) + "\n\n" + " ".join(notes)


def _descendants(events: list[_Event], root: int) -> set[int]:
    """`root` and every pid/tid it (or they) cloned during the trace (strace -f's clone lines)."""
    children: dict[int, list[int]] = {}
    for e in events:
        if e.text.startswith(("clone(", "clone3(", "<... clone", "vfork(", "fork(")):
            m = re.search(r"= (\d+)$", e.text.split(" <")[0].rstrip())
            if m:
                children.setdefault(e.pid, []).append(int(m.group(1)))
    out: set[int] = set()
    todo = [root]
    while todo and len(out) < 10_000:
        pid = todo.pop()
        if pid in out:
            continue
        out.add(pid)
        todo += children.get(pid, [])
    return out


def fmt_opt(ms: float | None) -> str:
    return "—" if ms is None else f"{ms:.1f}"


# -- reporting -----------------------------------------------------------------------------------
def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1000
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"


def stats(values: list[float]) -> tuple[float, float, float] | None:
    return (percentile(values, 50), percentile(values, 99), max(values)) if values else None


def p50(values: list[float]) -> float | None:
    return percentile(values, 50) if values else None


def path_rank(path: str) -> int:
    return PATH_ORDER.index(path) if path in PATH_ORDER else len(PATH_ORDER)


def phase_rank(name: str) -> int:
    return 0 if name == "seq" else int(name.split("-")[1])


def phase_label(name: str) -> str:
    return "sequential" if name == "seq" else f"burst of {name.split('-')[1]}"


def taken_cell(counts: Counter[str]) -> str:
    """ "pool 38, zygote 2": how many starts took each path (the gateway's report)."""
    return ", ".join(f"{p} {counts[p]}" for p in TAKEN if counts.get(p))


def samples_by(results: Results, path: str, phase_name: str) -> list[Sample]:
    """The successful samples of one phase (over every setup) that took `path`."""
    return [
        s
        for ph in results.phases
        if ph.name == phase_name
        for s in ph.samples
        if s.ok and s.path == path
    ]


def paths_seen(results: Results) -> list[str]:
    return sorted({s.path for ph in results.phases for s in ph.samples if s.ok}, key=path_rank)


def phase_names(results: Results) -> list[str]:
    return sorted({ph.name for ph in results.phases}, key=phase_rank)


def setup_phase(results: Results, setup: str, name: str) -> Phase | None:
    return next((p for p in results.phases if p.setup == setup and p.name == name), None)


def setups_table(results: Results) -> str:
    """Per setup and phase: how many starts took each path, errors, and the whole phase's spread."""
    rows = [
        "| setup (configured) | phase | starts | path taken (gateway's report) | errors | "
        "p50, all starts | max, all starts | idle pool members as a round began | other load |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for ph in results.phases:
        lat = [s.latency for s in ph.samples if s.ok]
        errors = sum(not s.ok for s in ph.samples)
        idle = (
            f"{sorted(ph.pool_idle)[len(ph.pool_idle) // 2]} (median)"
            if ph.pool_idle and any(ph.pool_idle)
            else "0"
        )
        rows.append(
            f"| {ph.setup} | {phase_label(ph.name)} | {len(ph.samples)} | "
            f"{taken_cell(ph.taken())} | {errors} | {fmt_ms(p50(lat))} | "
            f"{fmt_ms(max(lat) if lat else None)} | {idle} | {ph.other_cpu:.0%} |"
        )
    return "\n".join(rows)


def latency_table(results: Results) -> str:
    """Per path taken and phase (over every setup): client latency and the gateway's stages."""
    rows = [
        "| path taken | phase | n | from setup | p50 | p99 | max | gateway total p50 | "
        "connect → app imported p50 |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for path in paths_seen(results):
        for name in phase_names(results):
            ok = samples_by(results, path, name)
            if not ok:
                continue
            st = stats([s.latency for s in ok])
            assert st is not None
            total = [t for s in ok if (t := s.stage("total")) is not None]
            imp = [s.imported - s.sent_wall for s in ok if s.imported is not None]
            origin = Counter(s.setup for s in ok)
            rows.append(
                f"| {path} | {phase_label(name)} | {len(ok)} | "
                + ", ".join(f"{k} {v}" for k, v in origin.items())
                + " | "
                + " | ".join(fmt_ms(x) for x in st)
                + f" | {fmt_ms(p50(total))} | {fmt_ms(p50(imp))} |"
            )
    return "\n".join(rows)


SPLIT_STAGES = ("queue", "claim", "confine", "app", "first_byte")


def split_table(results: Results) -> str:
    """Where a sequential cold start's time goes, from the gateway's stages and the app's clock."""
    rows = [
        "| path taken (sequential, p50 of each) | client total | gateway total | queue | "
        "claim or fork | confine | app (spawned → socket accepts) | first byte | "
        "connect → app imported | app imported → served | client - gateway total |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path in paths_seen(results):
        ok = samples_by(results, path, "seq")
        if not ok:
            continue
        cells = [p50([s.latency for s in ok])]
        cells.append(p50([t for s in ok if (t := s.stage("total")) is not None]))
        for stage in SPLIT_STAGES:
            cells.append(p50([t for s in ok if (t := s.stage(stage)) is not None]))
        cells.append(p50([s.imported - s.sent_wall for s in ok if s.imported is not None]))
        cells.append(p50([s.served - s.imported for s in ok if s.served and s.imported]))
        cells.append(p50([s.latency - t for s in ok if (t := s.stage("total")) is not None]))
        rows.append(f"| {path} | " + " | ".join(fmt_ms(c) for c in cells) + " |")
    return "\n".join(rows)


def mib(value: int) -> str:
    return f"{value / MIB:.1f} MiB"


def memory_table(results: Results) -> str:
    rows = [
        "| path taken | setup | instances | PSS median | PSS min-max | USS (private) median | "
        "RSS median | processes/instance | fork server PSS (RSS) | gateway PSS (RSS) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in sorted(results.memory, key=lambda m: path_rank(m.path)):
        pss = sorted(x.get("Pss", 0) for x in m.per_instance)
        uss = sorted(x.get("Private_Clean", 0) + x.get("Private_Dirty", 0) for x in m.per_instance)
        rss = sorted(x.get("Rss", 0) for x in m.per_instance)
        procs = sorted(x.get("processes", 0) for x in m.per_instance)
        mid = len(pss) // 2
        fs, gw = m.forkserver, m.gateway
        rows.append(
            f"| {m.path} | {m.setup} | {len(pss)} | {mib(pss[mid])} | {pss[0] / MIB:.1f}-"
            f"{mib(pss[-1])} | {mib(uss[mid])} | {mib(rss[mid])} | {procs[mid]} | "
            f"{fs.get('Pss', 0) / MIB:.1f} ({mib(fs.get('Rss', 0))}) | "
            f"{gw.get('Pss', 0) / MIB:.1f} ({mib(gw.get('Rss', 0))}) |"
        )
    members: dict[str, list[dict[str, int]]] = {}
    for m in results.memory:
        members.setdefault(m.setup, m.pool)
    rows += [
        "",
        "| idle pool members (GET /v1/pools `idle_pids`) | members | PSS median | PSS min-max | "
        "USS (private) median | RSS median |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for setup in (s.key for s in SETUPS):
        pool = members.get(setup)
        if pool is None:
            continue
        if not pool:
            rows.append(f"| {setup} | 0 | — | — | — | — |")
            continue
        pss = sorted(x.get("Pss", 0) for x in pool)
        uss = sorted(x.get("Private_Clean", 0) + x.get("Private_Dirty", 0) for x in pool)
        rss = sorted(x.get("Rss", 0) for x in pool)
        mid = len(pss) // 2
        rows.append(
            f"| {setup} | {len(pss)} | {mib(pss[mid])} | {pss[0] / MIB:.1f}-{mib(pss[-1])} | "
            f"{mib(uss[mid])} | {mib(rss[mid])} |"
        )
    return "\n".join(rows)


def baseline_table(results: Results) -> str:
    rows = ["| baseline (no dorm) | n | p50 | max | idle PSS |", "|---|---:|---:|---:|---:|"]
    for name, values in results.baselines.items():
        st = stats(values)
        assert st is not None
        mem = ""
        if name.startswith("granian") and results.baseline_memory.get("granian"):
            mem = (
                f"{mib(results.baseline_memory['granian'])} "
                f"({results.baseline_memory.get('granian_processes', 0)} processes)"
            )
        rows.append(f"| `{name}` | {len(values)} | {fmt_ms(st[0])} | {fmt_ms(st[2])} | {mem} |")
    return "\n".join(rows)


def seq_latencies(results: Results, path: str) -> list[float]:
    return [s.latency for s in samples_by(results, path, "seq")]


def median_pss(m: Memory) -> int:
    pss = sorted(x.get("Pss", 0) for x in m.per_instance)
    return pss[len(pss) // 2]


def targets_table(results: Results) -> tuple[str, list[str]]:
    """Each target of issues 4 and 5: measured value, met or not, and the gap.

    Targets of setups this run did not measure (`--setups`) are left out; a target of a measured
    setup without a value (no start took the path, a burst had errors) is "not measured".
    """
    rows = ["| target | measured | verdict |", "|---|---:|---|"]
    missed: list[str] = []
    ran = {ph.setup for ph in results.phases}

    def add(
        label: str, value: float | None, limit: float, unit: str, setup: str | None = None
    ) -> None:
        if (setup or label.split(" ")[0]) not in ran:
            return
        if value is None:
            rows.append(f"| {label} | — | **not measured** |")
            missed.append(f"{label} (not measured)")
            return
        scale = 1000 if unit == "ms" else 1 / MIB
        met = value <= limit
        shown = (
            f"{value * scale:.2f} {unit}" if value * scale < 10 else f"{value * scale:.1f} {unit}"
        )
        gap = "" if met else f" (gap {(value - limit) * scale:+.1f} {unit}, {value / limit:.1f}x)"
        rows.append(f"| {label} | {shown} | **{'met' if met else 'not met'}**{gap} |")
        if not met:
            missed.append(label)

    pool = seq_latencies(results, "sandbox/pool")
    pooled = [ph for ph in results.phases if ph.name == "seq" and "/pool" in ph.setup]
    of = f"{len(pool)} of {sum(len(ph.samples) for ph in pooled)}"
    add(
        f"sandbox/pool sequential p50 ≤ 2 ms ({of} starts with pools on took the pool path)",
        p50(pool),
        TARGET_POOL_P50,
        "ms",
    )
    add(
        "sandbox/pool sequential p99 ≤ 10 ms",
        percentile(pool, 99) if pool else None,
        TARGET_POOL_P99,
        "ms",
    )
    for iso in ("sandbox", "process"):
        add(
            f"{iso}/zygote sequential p50 ≤ 10 ms",
            p50(seq_latencies(results, f"{iso}/zygote")),
            TARGET_ZYGOTE_P50,
            "ms",
        )
        add(
            f"{iso}/fresh sequential p50 ≤ 150 ms",
            p50(seq_latencies(results, f"{iso}/fresh")),
            TARGET_FRESH_P50,
            "ms",
        )
    for setup in BURST_SETUPS:
        b = setup_phase(results, setup, f"burst-{TARGET_BURST}")
        lat = [s.latency for s in b.samples if s.ok] if b else []
        all_ok = b is not None and bool(lat) and len(lat) == len(b.samples)
        where = f"; {taken_cell(b.taken())}" if b else ""
        add(
            f"{setup} setup, burst of {TARGET_BURST} cold apps: all answered within 100 ms "
            f"(max{where})",
            max(lat) if all_ok else None,
            TARGET_BURST_MAX,
            "ms",
        )
    for m in sorted(results.memory, key=lambda m: path_rank(m.path)):
        add(
            f"warm idle {m.path} instance PSS ≤ 8 MiB (median of {len(m.per_instance)}, "
            f"{m.setup} setup)",
            median_pss(m),
            TARGET_IDLE_PSS,
            "MiB",
            m.setup,
        )
    return "\n".join(rows), missed


def reading(results: Results, quick: bool) -> str:
    """A paragraph that says what the numbers mean, generated from the numbers themselves."""
    parts: list[str] = []
    sp, sz, sf, pz = (
        p50(seq_latencies(results, p))
        for p in ("sandbox/pool", "sandbox/zygote", "sandbox/fresh", "process/zygote")
    )
    pooled = [ph for ph in results.phases if ph.name == "seq" and "/pool" in ph.setup]
    if pooled:
        counts: Counter[str] = sum((ph.taken() for ph in pooled), Counter())
        text = (
            f"With warm pools on ({' and '.join(ph.setup for ph in pooled)}), "
            f"{counts.get('pool', 0)} of {counts.total()} sequential cold starts took the pool path"
        )
        pool = seq_latencies(results, "sandbox/pool")
        if pool and sp is not None:
            text += (
                f" and answered in {fmt_ms(sp)} p50, {fmt_ms(percentile(pool, 99))} p99 "
                "(client-side)"
            )
        if sz is not None:
            text += f", against {fmt_ms(sz)} for a zygote fork in the same sandbox with pools off"
        if sf is not None:
            text += f" and {fmt_ms(sf)} for a fresh interpreter"
        parts.append(text + ".")
    ok = samples_by(results, "sandbox/pool", "seq")
    if ok:
        st = {
            name: p50([t for s in ok if (t := s.stage(name)) is not None]) for name in SPLIT_STAGES
        }
        total = p50([t for s in ok if (t := s.stage("total")) is not None])
        outside = p50([s.latency - t for s in ok if (t := s.stage("total")) is not None])
        imp = p50([s.imported - s.sent_wall for s in ok if s.imported is not None])
        served = p50([s.served - s.imported for s in ok if s.served and s.imported])
        parts.append(
            f"Of a pool start (p50 of each stage, as the gateway timed it) claiming the member "
            f"took {fmt_ms(st['claim'])}, confining it to the tenant {fmt_ms(st['confine'])}, "
            f"the app from `spawned` until its socket accepted {fmt_ms(st['app'])} and the "
            f"first byte after that {fmt_ms(st['first_byte'])}; the gateway's total (first "
            f"request queued → ready) was {fmt_ms(total)} and the client saw "
            f"{fmt_ms(outside)} more (accept, routing, the proxied request, the response). By "
            f"the app's own clock its module was imported {fmt_ms(imp)} after the client's "
            f"connect() and it served the request {fmt_ms(served)} after that."
        )
    if sz is not None and pz is not None and sz > pz:
        parts.append(
            f'Without the sandbox (isolation = "process") a zygote start took {fmt_ms(pz)}, so '
            f"confinement (cgroup, namespaces, mounts, uid, seccomp) costs about "
            f"{fmt_ms(sz - pz)} per start when it is done at start time."
        )
    for setup in BURST_SETUPS:
        b25 = setup_phase(results, setup, f"burst-{TARGET_BURST}")
        b100 = setup_phase(results, setup, "burst-100")
        lat = [s.latency for s in b25.samples if s.ok] if b25 else []
        if not b25 or not lat:
            continue
        text = (
            f"In the {setup} setup a burst of {TARGET_BURST} distinct cold apps was all answered "
            f"within {fmt_ms(max(lat))} (p50 {fmt_ms(p50(lat))}; {taken_cell(b25.taken())})"
        )
        lat100 = [s.latency for s in b100.samples if s.ok] if b100 else []
        if b100 and lat100:
            text += f"; a burst of 100 within {fmt_ms(max(lat100))} ({taken_cell(b100.taken())})"
        parts.append(text + ".")
    if any(
        (ph := setup_phase(results, s, f"burst-{TARGET_BURST}")) is not None
        and ph.taken().get("zygote")
        for s in ("sandbox/pool",)
    ):
        parts.append(
            "Starts beyond the idle members fall back to zygote forks, which queue behind one "
            "another in the fork server and on two CPUs, so the last of a burst waits for most "
            "of the others."
        )
    b25 = setup_phase(results, f"sandbox/pool-{TARGET_BURST}", f"burst-{TARGET_BURST}")
    pooled25 = [x for x in b25.samples if x.ok and x.taken == "pool"] if b25 else []
    spawn = [t for x in pooled25 if (t := x.stage("spawn")) is not None]
    if pooled25 and spawn:
        worst = max(x.latency for x in pooled25)
        rounds = len(b25.pool_idle) if b25 else 0
        text = (
            f"With {TARGET_BURST} idle members, {len(pooled25)} of {len(b25.samples) if b25 else 0}"
            f" starts in {rounds} burst(s) of {TARGET_BURST} took the pool path and the slowest "
            f"was answered after {fmt_ms(worst)}; the gateway's spawn stage (launch request until "
            "the fork "
            f"server answered) was {fmt_ms(p50(spawn))} p50 and {fmt_ms(max(spawn))} at worst"
        )
        if max(spawn) > worst / 2:
            text += ": the claims wait for one another in the single fork server"
        parts.append(text + ".")
    mems = {m.path: m for m in results.memory if m.setup == m.path}
    mp = mems.get("sandbox/pool")
    if mp and mp.per_instance:
        text = f"An idle instance that took the pool path holds {mib(median_pss(mp))} PSS"
        mz = mems.get("sandbox/zygote")
        if mz and mz.per_instance:
            text += f" (a zygote-forked one {mib(median_pss(mz))})"
        if mp.pool:
            pss = sorted(x.get("Pss", 0) for x in mp.pool)
            text += (
                f"; each of the {len(pss)} idle pool members waiting for a tenant holds "
                f"{mib(pss[len(pss) // 2])} PSS (median)"
            )
        parts.append(text + ".")
    others = [p.other_cpu for p in results.phases]
    if others:
        worst = max(others)
        parts.append(
            f"Other processes on the machine (other engineers' test suites may have been running) "
            f"used {percentile(others, 50):.0%} of its CPU during a median phase and up to "
            f"{worst:.0%} during the busiest"
            + ("; latencies, especially the tails, are inflated by it." if worst > 0.05 else ".")
        )
    if results.errors:
        parts.append(f"Errors outside the tables: {'; '.join(results.errors[:5])}.")
    if quick:
        parts.append("This was a --quick run: few samples; p99 is close to the max.")
    return " ".join(parts)


# -- plots ---------------------------------------------------------------------------------------
COLORS = {
    "sandbox/pool": "#9467bd",
    "sandbox/zygote": "#1f77b4",
    "sandbox/fresh": "#d62728",
    "process/pool": "#8c564b",
    "process/zygote": "#2ca02c",
    "process/fresh": "#ff7f0e",
}


def plot(results: Results) -> list[Path]:
    """ECDFs of sequential latencies, and per-burst-size distributions, per path taken (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMG_DIR.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    paths = paths_seen(results)

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for path in paths:
        lat = sorted(x * 1000 for x in seq_latencies(results, path))
        if lat:
            ys = [(i + 1) / len(lat) for i in range(len(lat))]
            ax.step(
                lat,
                ys,
                where="post",
                color=COLORS.get(path, "grey"),
                label=f"{path} (n={len(lat)})",
            )
    for x, label in (
        (2, "pool target p50 2 ms"),
        (10, "zygote p50, pool p99 10 ms"),
        (150, "fresh target 150 ms"),
    ):
        ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
        ax.text(x * 1.03, 0.97, label, color="grey", fontsize=8, rotation=90, va="top")
    ax.set_xscale("log")
    ax.set_xlabel("first-response latency of a cold app, client-side (ms, log scale)")
    ax.set_ylabel("fraction of cold starts ≤ x")
    ax.set_title("dorm cold start, one at a time, by the path the gateway reports")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out = IMG_DIR / "coldstart-sequential.png"
    fig.savefig(out)
    plt.close(fig)
    written.append(out)

    sizes = sorted(
        {int(p.name.split("-")[1]) for p in results.phases if p.name.startswith("burst-")}
    )
    if sizes:
        # One box per path taken, and one for every start of the pool setup's burst whatever
        # path it took: what a client sees when a burst meets the default configuration.
        series: list[tuple[str, str, dict[int, list[float]]]] = [
            (
                path,
                COLORS.get(path, "grey"),
                {
                    n: [x.latency * 1000 for x in samples_by(results, path, f"burst-{n}")]
                    for n in sizes
                },
            )
            for path in paths
        ]
        for key, color in (("sandbox/pool", "#c5b0d5"), ("sandbox/pool-25", "#e377c2")):
            pool_setup = {n: setup_phase(results, key, f"burst-{n}") for n in sizes}
            if any(pool_setup.values()):
                series.append(
                    (
                        f"{key} setup, all starts",
                        color,
                        {
                            n: [x.latency * 1000 for x in ph.samples if x.ok] if ph else []
                            for n, ph in pool_setup.items()
                        },
                    )
                )
        fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
        width = 0.8 / max(1, len(series))
        for j, (label, color, by_size) in enumerate(series):
            data, pos = [], []
            for i, size in enumerate(sizes):
                if by_size.get(size):
                    data.append(by_size[size])
                    pos.append(i + (j - (len(series) - 1) / 2) * width)
            if data:
                bp = ax.boxplot(
                    data,
                    positions=pos,
                    widths=width * 0.9,
                    whis=(0, 100),
                    patch_artist=True,
                    manage_ticks=False,
                )
                for box in bp["boxes"]:
                    box.set_facecolor(color)
                    box.set_alpha(0.6)
                for med in bp["medians"]:
                    med.set_color("black")
                ax.plot([], [], color=color, linewidth=6, alpha=0.6, label=label)
        ax.axhline(100, color="grey", linestyle="--", linewidth=0.8)
        ax.text(-0.45, 105, "issue 5: burst of 25 all within 100 ms", color="grey", fontsize=8)
        ax.set_xticks(range(len(sizes)), [f"{s} app{'s' if s > 1 else ''} at once" for s in sizes])
        ax.set_yscale("log")
        ax.set_ylabel("first-response latency (ms, log scale)")
        ax.set_title(
            "dorm cold starts in bursts of distinct apps, by path taken "
            "(box: quartiles, whiskers: min-max)"
        )
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        out = IMG_DIR / "coldstart-bursts.png"
        fig.savefig(out)
        plt.close(fig)
        written.append(out)
    return written


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.coldstart", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="few samples, no waiting for quiet")
    plot_group = p.add_mutually_exclusive_group()
    plot_group.add_argument(
        "--plot",
        dest="plot",
        action="store_true",
        default=None,
        help="write docs/img/coldstart-*.png (default in full mode)",
    )
    plot_group.add_argument("--no-plot", dest="plot", action="store_false")
    p.add_argument(
        "--profile",
        choices=("auto", "yes", "no"),
        default="auto",
        help="strace one sandboxed zygote and one pool start (auto: if strace is installed)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        help="seconds to wait before each phase for other load to drop below "
        # %% : argparse formats help strings
        f"{QUIET * 100:.0f}%% (default 10; --quick 0: no wait)",
    )
    p.add_argument(
        "--setups",
        default=",".join(s.key for s in SETUPS),
        help="comma-separated setups to measure (default: all of them)",
    )
    p.add_argument(
        "--quiet-budget",
        type=float,
        default=120.0,
        help="seconds of waiting for quiet in all; after that phases start at once (default 120)",
    )
    p.add_argument("--no-write", action="store_true", help="print only; leave the docs alone")
    args = p.parse_args(argv)
    known = {s.key: s for s in SETUPS}
    wanted = [x.strip() for x in args.setups.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in known]
    if unknown or not wanted:
        p.error(f"--setups: unknown {unknown or wanted}; known: {', '.join(known)}")
    args.setup_list = [known[k] for k in known if k in wanted]
    args.seq = 10 if args.quick else 40
    args.bursts = (1, 5, 25, 100)
    args.burst_reps = {1: 3, 5: 1, 25: 1, 100: 1} if args.quick else {1: 10, 5: 4, 25: 3, 100: 1}
    args.idle = 10 if args.quick else 50
    args.baseline_runs = 3 if args.quick else 10
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.quick else 10.0
    args.idle_settle = 1.0 if args.quick else IDLE_SETTLE
    if args.plot is None:
        args.plot = not args.quick
    strace = shutil.which("strace")
    if args.profile == "yes" and strace is None:
        p.error("--profile yes but strace is not installed")
    args.profile_with = strace if args.profile != "no" else None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cmd = command_line()
    bench = Bench(args)
    with sigterm_as_interrupt():
        try:
            return run(bench, args, cmd)
        except KeyboardInterrupt:
            print("\nbench.coldstart: interrupted", file=sys.stderr)
            return 130
        finally:
            bench.close()


def run(bench: Bench, args: argparse.Namespace, cmd: str) -> int:
    started = now_utc()
    revision = git_revision(("gateway", "runtimes", "sandboxes"))
    print(f"bench.coldstart: working in {bench.tmp}", file=sys.stderr)
    bench.baselines()
    groups: dict[str, list[Setup]] = {}
    for setup in args.setup_list:
        groups.setdefault(setup.gateway, []).append(setup)
    for setups in groups.values():
        bench.run_gateway(setups)
    r = bench.results
    tables = "\n\n".join(
        [
            "**Starts per setup**, by the path the gateway reported for each:",
            setups_table(r),
            "**Latency by path taken** (successful starts of every setup that took that path):",
            latency_table(r),
            "**Where a sequential start's time goes**, by path taken:",
            split_table(r),
            "**Idle memory**, by path taken, and of the idle pool members next to the instances:",
            memory_table(r),
            "**Baselines** on the same machine, in the same run:",
            baseline_table(r),
        ]
    )
    targets, missed = targets_table(r)
    para = reading(r, args.quick)
    images: list[Path] = []
    if args.plot:
        try:
            images = plot(r)
        except Exception as exc:  # minutes of measurements must still be written
            print(f"bench.coldstart: no plots: {type(exc).__name__}: {exc}", file=sys.stderr)
    profile = "\n\n".join(
        f"#### One start of the {setup} setup\n\n{text}" for setup, text in r.profiles.items()
    )
    print(f"\n{targets}\n\n{tables}\n\n{para}\n\n{profile}")
    if not args.no_write:
        info = machine_info()
        quiet = (
            f"waited {r.quiet_waited:.0f} s in all for a quiet machine (≤ {QUIET:.0%} busy) before "
            f"phases, at most {args.quiet_wait:g} s each and {args.quiet_budget:g} s in all; "
            f"{r.not_quiet} phase(s) started busy"
        )
        section = render_section(
            started, revision, info, cmd, args, targets, tables, para, profile, images, quiet
        )
        write_section(SECTION, section)
        print(f"\nbench.coldstart: wrote '## {SECTION}' in docs/benchmarks.md", file=sys.stderr)
    errors = sum(not s.ok for p in r.phases for s in p.samples)
    if errors:
        print(f"bench.coldstart: {errors} cold requests failed", file=sys.stderr)
    unknown = sum(s.ok and s.taken == "?" for p in r.phases for s in p.samples)
    if unknown:
        print(f"bench.coldstart: {unknown} starts could not be tied to a path", file=sys.stderr)
    if missed:
        print(f"bench.coldstart: targets not met: {'; '.join(missed)}", file=sys.stderr)
    return 0


def render_section(
    started: str,
    revision: str,
    info: dict[str, str],
    cmd: str,
    args: argparse.Namespace,
    targets: str,
    tables: str,
    para: str,
    profile: str,
    images: list[Path],
    quiet: str,
) -> str:
    reps = ", ".join(f"{size}: {n}x" for size, n in args.burst_reps.items())
    pics = "\n".join(f"![{p.stem}](img/{p.name})" for p in images)
    prof = f"### Where a sandboxed start spends its time\n\n{profile}\n" if profile else ""
    d = POOL_DEFAULTS
    return f"""## {SECTION}

First-response latency through dorm for a cold python-asgi hello app (a raw ASGI callable, no
dependencies, shown at /app via `app_dir`), on six setups: `sandbox/pool` (isolation `auto`, a
sandbox as this runs as root, with warm pools on: `[pool]` min_idle {d.min_idle}, max_idle
{d.max_idle}, refill_concurrency {d.refill_concurrency}, shrink_after {d.shrink_after:g} s, the
gateway's defaults), `sandbox/pool-{TARGET_BURST}` (the same with min_idle {TARGET_BURST} and
max_idle {max(TARGET_BURST, d.max_idle)}: a pool sized for the burst target), and with pools
off (`[pool] max_idle = 0`) `sandbox/zygote`,
`sandbox/fresh`, `process/zygote`, `process/fresh` (isolation `auto` or `process`, times
`start = "zygote"`, forked from the fork server with granian and uvloop preloaded, or `"fresh"`, a
new interpreter running granian). Every start is filed under the **path the gateway reports for
it** (`last_start.path` of `GET /v1/instances/{{app}}/{{branch}}`, tied to the start by the
instance's `starts` counter), not under its setup: a start of the pool setup that found no idle
member and was forked from the zygote counts as `sandbox/zygote`. Client-side latency: from
before connect() to the last byte of the response, new connection, `Connection: close`.

- **Date:** {started}; dorm at commit {revision}
- **Machine:** {info["cpus"]} CPUs ({info["cpu_model"]}), kernel {info["kernel"]}
- **Software:** Python {info["python"]}, granian {pkg_version("granian")}, uvloop
  {info["uvloop"]}, httptools {info["httptools"]}
- **Command:** `make bench-coldstart`, i.e. `{cmd}`
- **Sequential:** {args.seq} cold starts per setup; between two, the app is stopped through
  `POST /v1/apps/{{app}}/stop`, waited for until `cold` in `GET /v1/instances`, then
  {SETTLE * 1000:.0f} ms of quiet (with pools on, the pool refills meanwhile, or the next start
  falls back and is counted as such). One unrecorded warm-up start per setup after the gateway
  starts (with pools on, the miss that creates the pool).
- **Bursts:** N distinct cold apps requested at the same moment by asyncio clients, repeated
  ({reps}), all stopped between repetitions; with pools on, each round begins once the pool is
  back at min_idle (bounded wait)
- **Idle memory:** {args.idle} apps per setup woken one at a time (with pools on, each after the
  pool is back at min_idle) and left idle {args.idle_settle:g} s; per instance, `Pss` (and private =
  `Private_Clean + Private_Dirty`) of `/proc/<pid>/smaps_rollup` summed over the instance's
  processes (the `pid` of `GET /v1/instances` and its descendants); per idle pool member, the
  same over each of the `idle_pids` of `GET /v1/pools`. PSS divides shared pages among everyone
  mapping them, so it falls as more zygote children share the fork server's pages.
- **Gateway stages:** `last_start` of the instance (gateway/coldstart.py): queue (first request
  queued → start began), claim (fork server: taking an idle member or forking one), confine,
  app (`spawned` → the instance's socket accepted), first byte (ready → first response head
  relayed), total (queued → ready). **App imported:** the tenant's module records `time.time()`
  at import and when it serves the request and returns both (no time namespace, so the clocks
  are comparable).
- **Other load:** the machine's busy CPU (`/proc/stat`) during a phase minus what this
  benchmark, the gateway, the fork server and the instances used, as a share of all CPUs:
  work by other processes (other engineers' test suites may have been running); {quiet}

### Targets (issues 4 and 5)

{targets}

### Results

{tables}

{para}

{pics}

{prof}"""


if __name__ == "__main__":
    sys.exit(main())
