"""Cold-start benchmark: first-response latency and idle memory of a cold python-asgi app via dorm.

    python -m bench.coldstart [--quick] [--no-plot] [--profile auto|yes|no] [--no-write]

A real `dorm serve` is started twice with a throw-away config: once with `isolation = "auto"`
(a full sandbox when run as root) and once with `isolation = "process"` (plain child processes),
so what confinement costs is measured in the same run. Each gateway serves a tiny raw ASGI app
(`HELLO_APP`, shown at /app through `app_dir`) registered many times under distinct names, half
with `start = "zygote"` (forked from the fork server, which preloaded granian and uvloop) and half
with `start = "fresh"` (a new interpreter running granian). For each of the four paths:

  * sequential: one cold start at a time; the app is stopped through the admin API and waited
    for until `cold` between rounds, so every sample is a real cold start;
  * bursts of 1/5/25/100 distinct cold apps requested at the same moment (asyncio clients);
  * idle memory: K apps are woken, left idle, and the PSS of every process of each instance is
    summed from /proc/<pid>/smaps_rollup; the fork server's and the gateway's own memory too.

Latency is measured by the client: from before connect() until the whole response is read, on a
fresh connection with `Connection: close`. The gateway's own `ready in X ms` log line (spawn
request until its readiness probe connected) splits that into "starting the instance" and the
rest, and the app itself reports when it was imported and when it served the request (wall clock,
comparable across the sandbox boundary: there is no time namespace), which splits the start into
"until the tenant's code runs" and "granian start + readiness probing".

Baselines from the same run: `python -I -c 'import asyncio'` and a fresh `granian --interface asgi
--uds` process (no dorm) until its first response. With strace installed, one sandboxed zygote
start is traced (fork server and gateway, -f -ttt) to show where the milliseconds go.

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
    kill_pid,
    machine_cpu,
    machine_info,
    now_utc,
    percentile,
    pkg_version,
    process_tree,
    sigterm_as_interrupt,
    smaps_rollup,
    stop_process,
    tree_cpu_seconds,
    tree_memory,
    wait_for,
    write_section,
)

SECTION = "Cold start"
IMG_DIR = REPO / "docs" / "img"
MIB = 1024 * 1024
START_TIMEOUT = 30.0  # the gateway itself
REQUEST_TIMEOUT = 60.0  # one cold request (a burst of 100 fresh interpreters on 2 CPUs is slow)
STOP_TIMEOUT = 60.0  # waiting for stopped instances to be reported cold
SETTLE = 0.15  # pause after instances are cold, so a teardown does not overlap the next start
IDLE_SETTLE = 3.0
# Before each phase, wait (at most --quiet-wait seconds) until other processes use no more than
# this share of the machine's CPUs: on 2 CPUs a neighbour's test suite doubles cold-start times.
QUIET = 0.15  # how long woken instances idle before their memory is read
PATHS = ("sandbox/zygote", "sandbox/fresh", "process/zygote", "process/fresh")
# Targets from issues 4 and 5 (the default path is sandbox/zygote: isolation "auto" as root).
TARGET_ZYGOTE_P50 = 0.010
TARGET_FRESH_P50 = 0.150
TARGET_IDLE_PSS = 8 * MIB
TARGET_BURST = 25
TARGET_BURST_MAX = 0.100

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
READY_LINE = re.compile(r"\b([a-z0-9-]+)/([a-z0-9-]+) ready in ([\d.]+) ms \(pid (\d+)\)")


# -- samples -------------------------------------------------------------------------------------
@dataclass(slots=True)
class Sample:
    """One cold request: what the client saw, plus what the gateway and the app reported."""

    path: str
    phase: str  # "seq" or "burst-N"
    app: str
    latency: float  # seconds, client-side: connect + request + whole response
    status: int | None = None
    error: str | None = None
    sent_wall: float = 0.0  # time.time() just before connect()
    imported: float | None = None  # app module imported (wall clock, from the response)
    served: float | None = None  # app handled the request (wall clock)
    ready_ms: float | None = None  # the gateway's "ready in X ms"

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


@dataclass(slots=True)
class Phase:
    """A group of samples measured together, with the machine's other load meanwhile."""

    name: str
    path: str
    samples: list[Sample] = field(default_factory=list)
    other_cpu: float = 0.0  # share of all CPUs used by processes that are not this benchmark
    wall: float = 0.0


async def fetch(port: int, app: str, path: str, phase: str) -> Sample:
    """One GET on a new connection to the gateway, timed from before connect to the last byte."""
    head = f"GET / HTTP/1.1\r\nHost: {app}.localhost\r\nConnection: close\r\n\r\n".encode()
    sent_wall = time.time()
    t0 = time.perf_counter()
    sample = Sample(path, phase, app, 0.0, sent_wall=sent_wall)
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


async def burst(port: int, apps: list[str], path: str, phase: str) -> list[Sample]:
    """Request every app at the same moment; each on its own connection."""
    return list(await asyncio.gather(*(fetch(port, a, path, phase) for a in apps)))


# -- one gateway ---------------------------------------------------------------------------------
class Gateway:
    """One `dorm serve` with its own config, data dir and cgroup parent; `close()` undoes it."""

    def __init__(self, tmp: Path, isolation: str) -> None:
        self.isolation = isolation
        self.dir = tmp / isolation
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
            raise RuntimeError(f"the {self.isolation} gateway died\n{self.tail()}")

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
        """app name → its main-branch instance."""
        status, body = self.admin("GET", "/v1/instances")
        if status != 200:
            raise RuntimeError(f"GET /v1/instances: {status} {body}")
        items = body["instances"] if isinstance(body, dict) else body
        out = {i["app"]: i for i in items if i["branch"] == "main"}
        for inst in out.values():
            if inst.get("pid"):
                self.seen_pids.add(int(inst["pid"]))
        return out

    def stop_apps(self, apps: list[str]) -> None:
        """Stop the apps' instances and wait until every one is reported cold."""
        for app in apps:
            status, body = self.admin("POST", f"/v1/apps/{app}/stop")
            if status not in (200, 202, 204):
                raise RuntimeError(f"POST /v1/apps/{app}/stop: {status} {body}")
        wanted = set(apps)

        def all_cold() -> bool:
            insts = self.instances()
            return all(insts.get(a, {}).get("state", "cold") == "cold" for a in wanted)

        wait_for(all_cold, STOP_TIMEOUT, f"{len(apps)} instances to stop", interval=0.02)
        time.sleep(SETTLE)

    # -- the gateway's log ---------------------------------------------------------------------
    def log_mark(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def ready_lines(self, mark: int) -> dict[str, list[float]]:
        """app → the `ready in X ms` values logged since `mark`, in order."""
        out: dict[str, list[float]] = {}
        with open(self.log_path, "rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        for m in READY_LINE.finditer(text):
            out.setdefault(m.group(1), []).append(float(m.group(3)))
        return out

    # -- cleanup -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the gateway (it stops its instances), then make sure nothing of ours is left."""
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, grace=15)
        for pid in self.seen_pids:  # the gateway kills them; this is the belt to its braces
            kill_pid(pid, grace=1.0)
        # The gateway removes its instances' cgroups but keeps the parent; it may sit right
        # under a controller's root or below this process's own cgroup (v1 hierarchies differ).
        root = Path("/sys/fs/cgroup")
        for pattern in ("*", "*/*", "*/*/*", "*/*/*/*"):
            for base in root.glob(f"{pattern}/{self.cgroup_parent}"):
                for sub in sorted(base.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                    if sub.is_dir():
                        with contextlib.suppress(OSError):
                            sub.rmdir()
                with contextlib.suppress(OSError):
                    base.rmdir()


# -- the benchmark -------------------------------------------------------------------------------
@dataclass(slots=True)
class Memory:
    """Idle memory of one path: per-instance sums and the shared processes next to them."""

    path: str
    per_instance: list[dict[str, int]]
    forkserver: dict[str, int]
    gateway: dict[str, int]
    pool: list[dict[str, int]] = field(default_factory=list)  # idle pre-forked sandboxes


@dataclass
class Results:
    phases: list[Phase] = field(default_factory=list)
    memory: dict[str, Memory] = field(default_factory=dict)
    baselines: dict[str, list[float]] = field(default_factory=dict)
    baseline_memory: dict[str, int] = field(default_factory=dict)
    profile: str = ""
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
    def app_names(start: str, count: int) -> list[str]:
        return [f"{start[0]}{i}" for i in range(count)]

    def wait_quiet(self) -> None:
        """Wait, bounded, for other processes to leave the CPUs mostly idle before a phase."""
        deadline = time.monotonic() + self.args.quiet_wait
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

    def attach_ready(self, gw: Gateway, mark: int, samples: list[Sample]) -> None:
        """Give each sample the gateway's `ready in` for its app, in order of the log."""
        lines = gw.ready_lines(mark)
        for s in samples:
            values = lines.get(s.app)
            if values:
                s.ready_ms = values.pop(0)

    # -- phases ------------------------------------------------------------------------------------
    def run_gateway(self, isolation: str) -> None:
        gw = Gateway(self.tmp, isolation)
        self.gateways.append(gw)
        gw.start()
        label = "sandbox" if isolation == "auto" else "process"
        n_apps = max(max(self.args.bursts), self.args.idle)
        for start in ("zygote", "fresh"):
            for name in self.app_names(start, n_apps):
                gw.put_app(name, self.spec(start))
        # Warm-up (not recorded): the first start after boot pays one-off costs (seccomp filter
        # compile, page cache, the sandboxes import in the fork server).
        for start in ("zygote", "fresh"):
            name = self.app_names(start, 1)[0]
            self.loop.run(fetch(gw.port, name, "warmup", "warmup"))
            gw.stop_apps([name])
        if isolation == "auto" and self.args.profile_with:
            self.results.profile = self.profile(gw)
        for start in ("zygote", "fresh"):
            path = f"{label}/{start}"
            self.sequential(gw, path, start)
            for size in self.args.bursts:
                self.bursts(gw, path, start, size)
            self.idle_memory(gw, path, start)
        gw.check_alive()
        gw.close()

    def sequential(self, gw: Gateway, path: str, start: str) -> None:
        app = self.app_names(start, 1)[0]
        phase = Phase("seq", path)
        with self.measured(gw, phase):
            for i in range(self.args.seq):
                mark = gw.log_mark()
                s = self.loop.run(fetch(gw.port, app, path, "seq"))
                gw.stop_apps([app])
                self.attach_ready(gw, mark, [s])
                phase.samples.append(s)
                self.progress(path, f"seq {i + 1}/{self.args.seq}", [s])
        self.results.phases.append(phase)
        gw.check_alive()

    def bursts(self, gw: Gateway, path: str, start: str, size: int) -> None:
        apps = self.app_names(start, size)
        reps = self.args.burst_reps.get(size, 1)
        phase = Phase(f"burst-{size}", path)
        with self.measured(gw, phase):
            for r in range(reps):
                mark = gw.log_mark()
                samples = self.loop.run(burst(gw.port, apps, path, f"burst-{size}"))
                gw.stop_apps(apps)
                self.attach_ready(gw, mark, samples)
                phase.samples += samples
                self.progress(path, f"burst {size} ({r + 1}/{reps})", samples)
        self.results.phases.append(phase)
        gw.check_alive()

    def idle_memory(self, gw: Gateway, path: str, start: str) -> None:
        """Wake K apps (bursts of 10), let them idle, sum the PSS of each instance's processes."""
        apps = self.app_names(start, self.args.idle)
        self.wait_quiet()
        for i in range(0, len(apps), 10):
            for s in self.loop.run(burst(gw.port, apps[i : i + 10], path, "idle")):
                if not s.ok:
                    self.results.errors.append(f"{path} idle wake {s.app}: {s.error}")
        time.sleep(IDLE_SETTLE)
        insts = gw.instances()
        per: list[dict[str, int]] = []
        for app in apps:
            inst = insts.get(app)
            if inst and inst.get("state") == "ready" and inst.get("pid"):
                mem = tree_memory(int(inst["pid"]))
                if mem.get("processes"):
                    per.append(mem)
        fs = gw.forkserver_pid()
        assert gw.proc is not None
        # The fork server's other children are its pool of pre-forked (idle) sandboxes.
        instance_pids = {int(i["pid"]) for i in insts.values() if i.get("pid")}
        pool = [
            tree_memory(pid) for pid in (child_pids(fs) if fs else []) if pid not in instance_pids
        ]
        self.results.memory[path] = Memory(
            path,
            per,
            smaps_rollup(fs) if fs else {},
            smaps_rollup(gw.proc.pid),
            [m for m in pool if m.get("processes")],
        )
        pss = sorted(m.get("Pss", 0) for m in per)
        if pss:
            print(
                f"{path:15} idle: {len(per)} instances, PSS median {pss[len(pss) // 2] / MIB:.1f} "
                f"MiB, fork server PSS {smaps_rollup(fs).get('Pss', 0) / MIB if fs else 0:.1f} MiB",
                file=sys.stderr,
            )
        gw.stop_apps(apps)

    @staticmethod
    def progress(path: str, what: str, samples: list[Sample]) -> None:
        lat = sorted(s.latency for s in samples)
        errors = sum(not s.ok for s in samples)
        print(
            f"{path:15} {what:18} p50 {fmt_ms(percentile(lat, 50))}  max {fmt_ms(lat[-1])}"
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
    def profile(self, gw: Gateway) -> str:
        """strace one sandboxed zygote start (fork server and gateway, -f -ttt) and summarize."""
        fs = gw.forkserver_pid()
        assert gw.proc is not None and fs is not None
        app = self.app_names("zygote", 1)[0]
        # Untraced reference, right before.
        mark = gw.log_mark()
        ref = self.loop.run(fetch(gw.port, app, "profile", "profile"))
        gw.stop_apps([app])
        self.attach_ready(gw, mark, [ref])
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
        mark = gw.log_mark()
        s = self.loop.run(fetch(gw.port, app, "profile", "profile"))
        time.sleep(0.3)
        for t in tracers:
            stop_process(t, signal.SIGINT, grace=5)  # strace detaches on SIGINT
            self.procs.remove(t)
        gw.stop_apps([app])
        self.attach_ready(gw, mark, [s])
        return summarize_strace(outs, fs, s, ref)


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


def summarize_strace(outs: dict[str, Path], fs_pid: int, traced: Sample, ref: Sample) -> str:
    """Turn two strace logs of one cold start into a timeline in ms since the client's connect.

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
    tenant = {e.pid for e in events if e.text.startswith("setresuid(") and e.t >= (got or 0.0)}
    marks: list[tuple[str, float | None]] = [
        (
            "gateway accepts the client",
            first(lambda e: e.who == "gateway" and "accept4(" in e.text),
        ),
        ("fork server receives the spawn frame", got),
        ("fork server's first clone() after the spawn frame (a pool refill, if any)", forked),
        ("tenant: uid dropped (setresuid)", first(lambda e: e.text.startswith("setresuid("))),
        ("tenant: seccomp filter loaded", first(lambda e: e.text.startswith("seccomp("))),
        ("fork server sends `spawned` (free for the next start)", sent),
        (
            "tenant opens /app/main.py (app import)",
            first(
                lambda e: (
                    e.text.startswith("openat(") and "main.py" in e.text and "ENOENT" not in e.text
                )
            ),
        ),
        (
            "granian binds /run/dorm/http.sock",
            first(lambda e: e.text.startswith("bind(") and "http.sock" in e.text),
        ),
        ("granian listens", first(lambda e: e.pid in tenant and e.text.startswith("listen("))),
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
        "| event (strace -f -ttt -T, one sandboxed zygote start) | ms after connect() |",
        "|---|---:|",
    ]
    rows += [f"| {label} | {ms(t)} |" for label, t in marks]
    rows.append(f"| client has the whole response | {traced.latency * 1000:.2f} |")
    span = (sent - got) * 1000 if got and sent else None
    notes = [
        f"Traced start: {traced.latency * 1000:.1f} ms client-side (gateway: ready in "
        f"{traced.ready_ms if traced.ready_ms is not None else '—'} ms); the same start untraced "
        f"just before: {ref.latency * 1000:.1f} ms (ready in "
        f"{ref.ready_ms if ref.ready_ms is not None else '—'} ms). ptrace stops every system "
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
            "(first that the pre-forked child is set up, then that the tenant is confined)."
        )
    notes.append(f"The gateway made {probes} readiness connect() attempts.")
    return "\n".join(rows) + "\n\n" + " ".join(notes)


# -- reporting -----------------------------------------------------------------------------------
def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1000
    return f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"


def stats(values: list[float]) -> tuple[float, float, float] | None:
    return (percentile(values, 50), percentile(values, 99), max(values)) if values else None


def latency_table(results: Results) -> str:
    rows = [
        "| path | phase | n | p50 | p99 | max | gateway `ready in` p50 | "
        "connect → app imported p50 | errors | other load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ph in results.phases:
        ok = [s for s in ph.samples if s.ok]
        st = stats([s.latency for s in ok])
        ready = [s.ready_ms / 1000 for s in ok if s.ready_ms is not None]
        imp = [s.imported - s.sent_wall for s in ok if s.imported is not None]
        errors = len(ph.samples) - len(ok)
        label = "sequential" if ph.name == "seq" else f"burst of {ph.name.split('-')[1]}"
        rows.append(
            f"| {ph.path} | {label} | {len(ph.samples)} | "
            + (" | ".join(fmt_ms(x) for x in st) if st else "— | — | —")
            + f" | {fmt_ms(percentile(ready, 50)) if ready else '—'}"
            f" | {fmt_ms(percentile(imp, 50)) if imp else '—'}"
            f" | {errors} | {ph.other_cpu:.0%} |"
        )
    return "\n".join(rows)


def memory_table(results: Results) -> str:
    rows = [
        "| path | instances | PSS median | PSS min-max | USS (private) median | RSS median | "
        "processes/instance | fork server PSS (RSS) | pool members: n, PSS median | "
        "gateway PSS (RSS) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path in PATHS:
        m = results.memory.get(path)
        if m is None or not m.per_instance:
            continue
        pss = sorted(x.get("Pss", 0) for x in m.per_instance)
        uss = sorted(x.get("Private_Clean", 0) + x.get("Private_Dirty", 0) for x in m.per_instance)
        rss = sorted(x.get("Rss", 0) for x in m.per_instance)
        procs = sorted(x.get("processes", 0) for x in m.per_instance)
        mid = len(pss) // 2
        fs = m.forkserver
        rows.append(
            f"| {path} | {len(pss)} | {pss[mid] / MIB:.1f} MiB | {pss[0] / MIB:.1f}-"
            f"{pss[-1] / MIB:.1f} MiB | {uss[mid] / MIB:.1f} MiB | {rss[mid] / MIB:.1f} MiB | "
            f"{procs[mid]} | {fs.get('Pss', 0) / MIB:.1f} ({fs.get('Rss', 0) / MIB:.1f}) MiB | "
            f"{pool_cell(m.pool)} | "
            f"{m.gateway.get('Pss', 0) / MIB:.1f} ({m.gateway.get('Rss', 0) / MIB:.1f}) MiB |"
        )
    return "\n".join(rows)


def pool_cell(pool: list[dict[str, int]]) -> str:
    if not pool:
        return "0"
    pss = sorted(x.get("Pss", 0) for x in pool)
    return f"{len(pss)}, {pss[len(pss) // 2] / MIB:.1f} MiB"


def baseline_table(results: Results) -> str:
    rows = ["| baseline (no dorm) | n | p50 | max | idle PSS |", "|---|---:|---:|---:|---:|"]
    for name, values in results.baselines.items():
        st = stats(values)
        assert st is not None
        mem = ""
        if name.startswith("granian") and results.baseline_memory.get("granian"):
            mem = (
                f"{results.baseline_memory['granian'] / MIB:.1f} MiB "
                f"({results.baseline_memory.get('granian_processes', 0)} processes)"
            )
        rows.append(f"| `{name}` | {len(values)} | {fmt_ms(st[0])} | {fmt_ms(st[2])} | {mem} |")
    return "\n".join(rows)


def phase(results: Results, path: str, name: str) -> Phase | None:
    return next((p for p in results.phases if p.path == path and p.name == name), None)


def ok_latencies(ph: Phase | None) -> list[float]:
    return [s.latency for s in ph.samples if s.ok] if ph else []


def targets_table(results: Results) -> tuple[str, list[str]]:
    """Each target of issues 4 and 5: measured value, met or not, and the gap."""
    rows = ["| target | measured | verdict |", "|---|---:|---|"]
    missed: list[str] = []

    def add(label: str, value: float | None, limit: float, unit: str) -> None:
        if value is None:
            rows.append(f"| {label} | — | not measured |")
            return
        scale = 1000 if unit == "ms" else 1 / MIB
        met = value <= limit
        shown = f"{value * scale:.1f} {unit}"
        gap = "" if met else f" (gap {(value - limit) * scale:+.1f} {unit}, {value / limit:.1f}x)"
        rows.append(f"| {label} | {shown} | **{'met' if met else 'not met'}**{gap} |")
        if not met:
            missed.append(label)

    for iso in ("sandbox", "process"):
        z = ok_latencies(phase(results, f"{iso}/zygote", "seq"))
        f = ok_latencies(phase(results, f"{iso}/fresh", "seq"))
        add(
            f"{iso}/zygote sequential p50 ≤ 10 ms",
            percentile(z, 50) if z else None,
            TARGET_ZYGOTE_P50,
            "ms",
        )
        add(
            f"{iso}/fresh sequential p50 ≤ 150 ms",
            percentile(f, 50) if f else None,
            TARGET_FRESH_P50,
            "ms",
        )
        b = phase(results, f"{iso}/zygote", f"burst-{TARGET_BURST}")
        lat = ok_latencies(b)
        all_ok = b is not None and len(lat) == len(b.samples)
        add(
            f"{iso}/zygote burst of {TARGET_BURST}: all answered within 100 ms (max)",
            max(lat) if lat and all_ok else None,
            TARGET_BURST_MAX,
            "ms",
        )
        for start in ("zygote", "fresh"):
            m = results.memory.get(f"{iso}/{start}")
            if m and m.per_instance:
                pss = sorted(x.get("Pss", 0) for x in m.per_instance)
                add(
                    f"{iso}/{start} idle instance PSS ≤ 8 MiB (median)",
                    pss[len(pss) // 2],
                    TARGET_IDLE_PSS,
                    "MiB",
                )
    return "\n".join(rows), missed


def split_table(results: Results) -> str:
    """Where a sequential cold start's time goes, from the gateway's log and the app's clock."""
    rows = [
        "| path (sequential, p50 of each part) | client total | gateway `ready in` | "
        "connect → app module imported | app imported → request served | "
        "outside the start (total - ready in) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for path in PATHS:
        ph = phase(results, path, "seq")
        ok = [s for s in ph.samples if s.ok] if ph else []
        if not ok:
            continue
        total = percentile([s.latency for s in ok], 50)
        ready = [s.ready_ms / 1000 for s in ok if s.ready_ms is not None]
        imp = [s.imported - s.sent_wall for s in ok if s.imported is not None]
        served = [s.served - s.imported for s in ok if s.served and s.imported]
        outside = [s.latency - s.ready_ms / 1000 for s in ok if s.ready_ms is not None]
        cells = [percentile(v, 50) if v else None for v in (ready, imp, served, outside)]
        rows.append(f"| {path} | {fmt_ms(total)} | " + " | ".join(fmt_ms(c) for c in cells) + " |")
    return "\n".join(rows)


def reading(results: Results, quick: bool) -> str:
    """A paragraph that says what the numbers mean, generated from the numbers themselves."""
    parts: list[str] = []

    def p50(path: str, name: str = "seq") -> float | None:
        lat = ok_latencies(phase(results, path, name))
        return percentile(lat, 50) if lat else None

    sz, sf, pz, _pf = (p50(p) for p in PATHS)
    if sz and sf:
        parts.append(
            f"A cold python-asgi app answered its first request in {fmt_ms(sz)} (p50) on the "
            f"default path (sandboxed, forked from the zygote) against {fmt_ms(sf)} with a fresh "
            f"interpreter in the same sandbox: the zygote saves {fmt_ms(sf - sz)} "
            f"({sf / sz:.1f}x)."
        )
    if sz and pz:
        parts.append(
            f'Without the sandbox (isolation = "process") the zygote path took {fmt_ms(pz)}, so '
            f"confinement (cgroup, namespaces, mounts, uid, seccomp) costs about "
            f"{fmt_ms(sz - pz)} per start here."
        )
    ph = phase(results, "sandbox/zygote", "seq")
    ok = [s for s in ph.samples if s.ok] if ph else []
    ready = [s.ready_ms for s in ok if s.ready_ms is not None]
    imp = [s.imported - s.sent_wall for s in ok if s.imported is not None]
    served = [s.served - s.imported for s in ok if s.served and s.imported]
    if ok and ready and imp and served and sz:
        parts.append(
            f"Of the sandboxed zygote start, the gateway logged `ready in` "
            f"{percentile(ready, 50):.1f} ms (p50) — from the spawn request to its readiness "
            f"probe connecting — and the client saw {fmt_ms(sz - percentile(ready, 50) / 1000)} "
            f"more (accept, parse, route, the proxied request itself). The tenant's module was "
            f"imported {fmt_ms(percentile(imp, 50))} after the client's connect() (fork, "
            f"confinement, the runtime's main), and it served the request "
            f"{fmt_ms(percentile(served, 50))} after that (granian's embedded server starting, "
            f"binding, the gateway's readiness polling finding it, the request reaching it)."
        )
    for path in ("sandbox/zygote", "sandbox/fresh"):
        b25 = ok_latencies(phase(results, path, f"burst-{TARGET_BURST}"))
        b100 = ok_latencies(phase(results, path, "burst-100"))
        if b25:
            text = (
                f"A burst of {TARGET_BURST} distinct cold apps on {path} was all answered within "
                f"{fmt_ms(max(b25))} (p50 {fmt_ms(percentile(b25, 50))})"
            )
            if b100:
                text += f"; a burst of 100 within {fmt_ms(max(b100))}"
            parts.append(
                text + ": the starts queue behind one another in the single-threaded fork server "
                "and on two CPUs, so the last of a burst waits for all the others."
            )
    m = results.memory.get("sandbox/zygote")
    if m and m.per_instance:
        pss = sorted(x.get("Pss", 0) for x in m.per_instance)
        uss = sorted(x.get("Private_Clean", 0) + x.get("Private_Dirty", 0) for x in m.per_instance)
        mid = len(pss) // 2
        text = (
            f"An idle sandboxed zygote instance holds {pss[mid] / MIB:.1f} MiB PSS "
            f"({uss[mid] / MIB:.1f} MiB of it private, the rest its share of pages inherited from "
            f"the fork server, {m.forkserver.get('Pss', 0) / MIB:.1f} MiB PSS itself)"
        )
        mf = results.memory.get("sandbox/fresh")
        if mf and mf.per_instance:
            fp = sorted(x.get("Pss", 0) for x in mf.per_instance)
            text += f", a fresh one {fp[len(fp) // 2] / MIB:.1f} MiB"
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
    "sandbox/zygote": "#1f77b4",
    "sandbox/fresh": "#d62728",
    "process/zygote": "#2ca02c",
    "process/fresh": "#ff7f0e",
}


def plot(results: Results) -> list[Path]:
    """ECDFs of sequential latencies, and per-burst-size distributions, per path (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMG_DIR.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for path in PATHS:
        lat = sorted(x * 1000 for x in ok_latencies(phase(results, path, "seq")))
        if lat:
            ys = [(i + 1) / len(lat) for i in range(len(lat))]
            ax.step(lat, ys, where="post", color=COLORS[path], label=f"{path} (n={len(lat)})")
    for x, label in ((10, "zygote target 10 ms"), (150, "fresh target 150 ms")):
        ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
        ax.text(x * 1.03, 0.03, label, color="grey", fontsize=8, rotation=90, va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("first-response latency of a cold app, client-side (ms, log scale)")
    ax.set_ylabel("fraction of cold starts ≤ x")
    ax.set_title("dorm cold start, one at a time (python-asgi hello app)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center", fontsize=8)
    fig.tight_layout()
    out = IMG_DIR / "coldstart-sequential.png"
    fig.savefig(out)
    plt.close(fig)
    written.append(out)

    sizes = sorted(
        {int(p.name.split("-")[1]) for p in results.phases if p.name.startswith("burst-")}
    )
    if sizes:
        fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
        width = 0.8 / len(PATHS)
        for j, path in enumerate(PATHS):
            data, pos = [], []
            for i, size in enumerate(sizes):
                lat = [x * 1000 for x in ok_latencies(phase(results, path, f"burst-{size}"))]
                if lat:
                    data.append(lat)
                    pos.append(i + (j - (len(PATHS) - 1) / 2) * width)
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
                    box.set_facecolor(COLORS[path])
                    box.set_alpha(0.6)
                for med in bp["medians"]:
                    med.set_color("black")
                ax.plot([], [], color=COLORS[path], linewidth=6, alpha=0.6, label=path)
        ax.axhline(100, color="grey", linestyle="--", linewidth=0.8)
        ax.text(-0.45, 105, "issue 5: burst of 25 all within 100 ms", color="grey", fontsize=8)
        ax.set_xticks(range(len(sizes)), [f"{s} app{'s' if s > 1 else ''} at once" for s in sizes])
        ax.set_yscale("log")
        ax.set_ylabel("first-response latency (ms, log scale)")
        ax.set_title(
            "dorm cold starts in bursts of distinct apps (box: quartiles, whiskers: min-max)"
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
    p.add_argument("--quick", action="store_true", help="few samples (about a minute)")
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
        help="strace one sandboxed zygote start (auto: if strace is installed)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        help="seconds to wait before each phase for other load to drop below "
        f"{QUIET * 100:.0f}%% (default 10; --quick 5)",  # %% : argparse formats help strings
    )
    p.add_argument("--no-write", action="store_true", help="print only; leave the docs alone")
    args = p.parse_args(argv)
    args.seq = 10 if args.quick else 40
    args.bursts = (1, 5, 25, 100)
    args.burst_reps = {1: 3, 5: 1, 25: 1, 100: 1} if args.quick else {1: 10, 5: 4, 25: 3, 100: 1}
    args.idle = 10 if args.quick else 50
    args.baseline_runs = 3 if args.quick else 10
    if args.quiet_wait is None:
        args.quiet_wait = 5.0 if args.quick else 10.0
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
    for isolation in ("auto", "process"):
        bench.run_gateway(isolation)
    r = bench.results
    tables = "\n\n".join([latency_table(r), split_table(r), memory_table(r), baseline_table(r)])
    targets, missed = targets_table(r)
    para = reading(r, args.quick)
    images: list[Path] = plot(r) if args.plot else []
    print(f"\n{targets}\n\n{tables}\n\n{para}\n\n{r.profile}")
    if not args.no_write:
        info = machine_info()
        quiet = (
            f"waited {r.quiet_waited:.0f} s in all for a quiet machine (≤ {QUIET:.0%} busy) before "
            f"phases, at most {args.quiet_wait:g} s each; {r.not_quiet} phase(s) started busy"
        )
        section = render_section(
            started, revision, info, cmd, args, targets, tables, para, r.profile, images, quiet
        )
        write_section(SECTION, section)
        print(f"\nbench.coldstart: wrote '## {SECTION}' in docs/benchmarks.md", file=sys.stderr)
    errors = sum(not s.ok for p in r.phases for s in p.samples)
    if errors:
        print(f"bench.coldstart: {errors} cold requests failed", file=sys.stderr)
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
    prof = f"### Where a sandboxed zygote start spends its time\n\n{profile}\n" if profile else ""
    return f"""## {SECTION}

First-response latency through dorm for a cold python-asgi hello app (a raw ASGI callable, no
dependencies, shown at /app via `app_dir`), on four paths: isolation `auto` (a sandbox: this runs
as root) or `process`, times `start = "zygote"` (forked from the fork server, granian and uvloop
preloaded) or `"fresh"` (a new interpreter running granian). Client-side latency: from before
connect() to the last byte of the response, new connection, `Connection: close`.

- **Date:** {started}; dorm at commit {revision}
- **Machine:** {info["cpus"]} CPUs ({info["cpu_model"]}), kernel {info["kernel"]}
- **Software:** Python {info["python"]}, granian {pkg_version("granian")}, uvloop
  {info["uvloop"]}, httptools {info["httptools"]}
- **Command:** `make bench-coldstart`, i.e. `{cmd}`
- **Sequential:** {args.seq} cold starts per path; between two, the app is stopped through
  `POST /v1/apps/{{app}}/stop`, waited for until `cold` in `GET /v1/instances`, then
  {SETTLE * 1000:.0f} ms of quiet. One unrecorded warm-up start per path after the gateway starts.
- **Bursts:** N distinct cold apps requested at the same moment by asyncio clients, repeated
  ({reps}), all stopped between repetitions
- **Idle memory:** {args.idle} apps per path woken (10 at a time) and left idle
  {IDLE_SETTLE:g} s; per instance, `Pss` (and private = `Private_Clean + Private_Dirty`) of
  `/proc/<pid>/smaps_rollup` summed over the instance's processes (the `pid` of
  `GET /v1/instances` and its descendants). PSS divides shared pages among everyone mapping
  them, so it falls as more zygote children share the fork server's pages.
- **Gateway `ready in`:** the gateway's own log line: spawn request until its readiness probe
  connected. **App imported:** the tenant's module records `time.time()` at import and when it
  serves the request and returns both (no time namespace, so the clocks are comparable).
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
