"""Registry scale: how much memory and time 100,000 registered apps cost the gateway.

    python -m bench.registry_scale [--quick] [--apps N] [--sample S] [--no-write]

Issue #7's target is 100,000 apps registered with one gateway under 300 MiB of RSS. Registered
apps are mostly cold (scale to zero), so what they cost is the registry's in-memory copy, the
SQLite rows, and whatever per-app state routing builds; this benchmark measures exactly that, on a
real `dorm serve` (bench.coldstart's Gateway: throw-away config and data dir, 127.0.0.1 only):

1. register N apps through the real admin API (`PUT /v1/apps/{app}`, one request per app: there is
   no bulk endpoint) from `--concurrency` keep-alive connections; half of them (at least S) are
   `static` apps, the rest python-asgi apps sharing one `app_dir`. At every tenth of the way the
   gateway's RSS is read, with the admin p50 and the gateway's CPU per registration in that
   tenth: CPU per write rising with the app count would be an O(n) write path;
2. deploy one static bundle (the same archive, so one stored tree) to S static apps through
   `PUT /v1/apps/{app}/branches/main/bundle`, then send a request to each of those S hosts twice
   (first: the gateway builds that app's routing state and instance record; second: cached) and
   to S unknown hosts (404); then one request to every other static app (503, no bundle): what
   an app that has been requested costs beyond a registered one. Nothing is ever started, the
   static runtime answers in the gateway;
3. the idle gateway's CPU over 10 s: empty, with N apps registered, after the requests;
4. restart: SIGTERM, then `dorm serve` again on the same data dir: time until the admin API
   answers (it opens last, after the registry is loaded; the registry's own load time is read
   from the gateway's log), RSS then, and after routing the S hosts again.

Memory is the gateway process's VmRSS, VmHWM (peak RSS) and PSS (/proc/<pid>/status and
smaps_rollup); its fork server is a separate process (measured in bench.coldstart) and not counted.
The result goes to the `## Registry scale` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import io
import re
import shutil
import signal
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from bench.coldstart import HELLO_APP, Gateway
from bench.common import (
    cpu_seconds,
    git_revision,
    machine_info,
    now_utc,
    percentile,
    sigterm_as_interrupt,
    smaps_rollup,
    stop_process,
    write_section,
)
from gateway.client import AdminClient

MIB = 1024 * 1024
TARGET_APPS = 100_000
TARGET_RSS = 300 * MIB
REQUEST_TIMEOUT = 30.0  # one admin or data-plane request
PHASE_TIMEOUT = 1800.0  # registering every app; the run gives up past this
LOAD_LINE = re.compile(r"registry: loaded \d+ apps, .* in ([0-9.]+)s")
RESENT = [0]  # requests sent again on a reopened connection (reported with the errors)
IDLE_WINDOW = 10.0  # seconds the gateway's idle CPU is measured over


# -- the gateway -------------------------------------------------------------------------------
class ScaleGateway(Gateway):
    """bench.coldstart's Gateway, restartable on its own data dir, with a process-wide view."""

    def restart(self) -> tuple[float, float]:
        """Stop (SIGTERM, drain) and start again on the same data; returns (stop s, start s)."""
        assert self.proc is not None
        t0 = time.perf_counter()
        stop_process(self.proc, signal.SIGTERM, grace=30)
        stopped = time.perf_counter() - t0
        t1 = time.perf_counter()
        self.start()  # returns once GET /v1/health answers: the admin API opens last
        return stopped, time.perf_counter() - t1

    def idle_cpu(self, seconds: float = IDLE_WINDOW) -> float:
        """The gateway's CPU use (share of one CPU) over `seconds` with no requests: its periodic
        work (instance sweeps, deploy housekeeping), which must not grow with the app count."""
        assert self.proc is not None
        c0 = cpu_seconds(self.proc.pid)
        time.sleep(seconds)
        return (cpu_seconds(self.proc.pid) - c0) / seconds

    def memory(self) -> dict[str, int]:
        """The gateway process's VmRSS, VmHWM (peak) and PSS, in bytes."""
        assert self.proc is not None
        out: dict[str, int] = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
        roll = smaps_rollup(self.proc.pid)
        out["Pss"] = roll.get("Pss", 0)
        out["Private"] = roll.get("Private_Clean", 0) + roll.get("Private_Dirty", 0)
        return out


# -- a small keep-alive HTTP/1.1 client -----------------------------------------------------------
class Conn:
    """One keep-alive connection: a request at a time, Content-Length bodies only (dorm's admin
    API and static answers always carry one). Leaner than http.client, so on 2 CPUs the client
    takes less of the machine away from the gateway it measures."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.used = False  # a request was answered on this connection already
        self.retries = 0

    async def request(
        self, method: str, path: str, host: str, headers: str = "", body: bytes = b""
    ) -> tuple[int, bytes]:
        """Send one request; a reused connection the server closed meanwhile (its keep-alive
        timeout racing our next request) is reopened and the request sent once more, as HTTP
        clients do for requests that are safe to repeat (every request here is: GET, or a PUT of
        the same spec)."""
        try:
            return await self._once(method, path, host, headers, body)
        except (asyncio.IncompleteReadError, ConnectionError):
            if not self.used:
                raise
            self.close()
            self.retries += 1
            return await self._once(method, path, host, headers, body)

    async def _once(
        self, method: str, path: str, host: str, headers: str, body: bytes
    ) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.used = False
        assert self.reader is not None
        clen = f"Content-Length: {len(body)}\r\n" if body or method != "GET" else ""
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{headers}{clen}\r\n".encode()
        self.writer.write(head + body)
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        close = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        data = await asyncio.wait_for(self.reader.readexactly(length), REQUEST_TIMEOUT)
        self.used = True
        if close:
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = self.reader = None


async def run_pool(
    port: int,
    concurrency: int,
    jobs: list[tuple[str, str, str, str, bytes]],
    on_done: Callable[[int, int, float], None],
) -> None:
    """Send `jobs` (method, path, host, extra headers, body) over `concurrency` keep-alive
    connections; `on_done(index, status, seconds)` after each. Bounded by PHASE_TIMEOUT."""
    it = iter(enumerate(jobs))

    async def worker() -> None:
        conn = Conn(port)
        try:
            for i, (method, path, host, headers, body) in it:
                t = time.perf_counter()
                status, _ = await conn.request(method, path, host, headers, body)
                on_done(i, status, time.perf_counter() - t)
        finally:
            RESENT[0] += conn.retries
            conn.close()

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), PHASE_TIMEOUT)


# -- the bundle --------------------------------------------------------------------------------
def static_bundle() -> bytes:
    """A tar.gz with a `static` manifest and one index.html: the same bytes for every app, so
    every deploy of it is one stored tree (content-addressed) and measures the registry, not
    disk."""
    out = io.BytesIO()
    with (
        gzip.GzipFile(filename="", fileobj=out, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as tf,
    ):
        for name, data in (("dorm.toml", b'runtime = "static"\n'), ("index.html", b"ok\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


# -- the measurement ---------------------------------------------------------------------------
@dataclass
class Result:
    apps: int
    sample: int
    concurrency: int

    @property
    def statics(self) -> int:
        """Apps r0..r{statics-1} are `static`; the rest python-asgi. Half, at least the sample."""
        return max(self.sample, self.apps // 2)

    base: dict[str, int] = field(default_factory=dict)
    reg_wall: float = 0.0
    reg_gateway_cpu: float = 0.0
    reg_latency: list[float] = field(default_factory=list)  # seconds, in completion order
    reg_errors: int = 0
    # per tenth of the registrations: apps so far, memory, admin p50 (s), gateway CPU per app (s)
    curve: list[tuple[int, dict[str, int], float, float]] = field(default_factory=list)
    after_reg: dict[str, int] = field(default_factory=dict)
    deploy_wall: float = 0.0
    deploy_errors: int = 0
    route_first: list[float] = field(default_factory=list)
    route_cached: list[float] = field(default_factory=list)
    route_unknown: list[float] = field(default_factory=list)
    route_errors: int = 0
    after_route: dict[str, int] = field(default_factory=dict)
    after_deploy: dict[str, int] = field(default_factory=dict)
    touched: list[float] = field(default_factory=list)  # static apps without a bundle, once each
    touch_wall: float = 0.0
    touch_errors: int = 0
    after_touch: dict[str, int] = field(default_factory=dict)
    idle_empty: float = 0.0  # share of one CPU the idle gateway used, empty
    idle_registered: float = 0.0  # … with every app registered
    idle_touched: float = 0.0  # … once half the apps have been requested
    update_cpu: float = 0.0  # gateway CPU per `PUT /v1/apps/{app}` of an existing python-asgi
    update_latency: list[float] = field(default_factory=list)  # … app, after the requests
    stop_s: float = 0.0
    start_s: float = 0.0
    after_restart: dict[str, int] = field(default_factory=dict)
    restart_route: list[float] = field(default_factory=list)
    after_restart_route: dict[str, int] = field(default_factory=dict)
    db_bytes: int = 0
    load_s: float = 0.0  # the registry's own load time after the restart, from the gateway log


def register(gw: ScaleGateway, res: Result, app_dir: Path) -> None:
    """PUT every app, reading the gateway's RSS at each tenth of the way."""
    auth = f"Authorization: Bearer {gw.token}\r\nContent-Type: application/json\r\n"
    asgi = orjson.dumps(
        {
            "runtime": "python-asgi",
            "entry": "main:app",
            "app_dir": str(app_dir),
            "idle_timeout": "5m",
        }
    )
    static = orjson.dumps({"runtime": "static"})
    jobs = [
        ("PUT", f"/v1/apps/{app_name(i)}", "admin", auth, static if i < res.statics else asgi)
        for i in range(res.apps)
    ]
    step = max(1, res.apps // 10)
    assert gw.proc is not None
    pid = gw.proc.pid
    done = [0]
    window: list[float] = []
    cpu_mark = [cpu_seconds(pid)]

    def on_done(i: int, status: int, seconds: float) -> None:
        done[0] += 1
        res.reg_latency.append(seconds)
        window.append(seconds)
        if status not in (200, 201):
            res.reg_errors += 1
        if done[0] % step == 0 or done[0] == res.apps:
            cpu = cpu_seconds(pid)
            per_app = (cpu - cpu_mark[0]) / len(window)
            res.curve.append((done[0], gw.memory(), percentile(window, 50), per_app))
            cpu_mark[0] = cpu
            window.clear()
            print(
                f"bench.registry_scale: {done[0]} apps, RSS {gw.memory()['VmRSS'] / MIB:.1f} MiB",
                file=sys.stderr,
            )

    cpu0 = cpu_seconds(pid)
    t0 = time.perf_counter()
    asyncio.run(run_pool(gw.admin_port, res.concurrency, jobs, on_done))
    res.reg_wall = time.perf_counter() - t0
    res.reg_gateway_cpu = cpu_seconds(pid) - cpu0


def update(gw: ScaleGateway, res: Result, app_dir: Path) -> None:
    """PUT the spec of `sample` existing python-asgi apps again (an update: 200), once half the
    apps have been requested: whether a write's cost depends on how many apps were requested."""
    auth = f"Authorization: Bearer {gw.token}\r\nContent-Type: application/json\r\n"
    body = orjson.dumps(
        {
            "runtime": "python-asgi",
            "entry": "main:app",
            "app_dir": str(app_dir),
            "idle_timeout": "6m",
        }
    )
    first = res.statics
    jobs = [
        ("PUT", f"/v1/apps/{app_name(i)}", "admin", auth, body)
        for i in range(first, min(res.apps, first + res.sample))
    ]

    def on_done(i: int, status: int, seconds: float) -> None:
        res.update_latency.append(seconds)
        if status != 200:
            res.reg_errors += 1

    assert gw.proc is not None
    cpu0 = cpu_seconds(gw.proc.pid)
    asyncio.run(run_pool(gw.admin_port, res.concurrency, jobs, on_done))
    res.update_cpu = (cpu_seconds(gw.proc.pid) - cpu0) / max(1, len(jobs))


def app_name(i: int) -> str:
    return f"r{i}"


def deploy_static(gw: ScaleGateway, res: Result) -> None:
    """Deploy the one static bundle to each sample app (4 uploads at a time, via gateway.client,
    as `dorm deploy` does)."""
    bundle = static_bundle()

    def one(i: int) -> int:
        client = AdminClient(f"http://127.0.0.1:{gw.admin_port}", gw.token, timeout=REQUEST_TIMEOUT)
        try:
            status, _ = client.upload(
                f"/v1/apps/{app_name(i)}/branches/main/bundle", io.BytesIO(bundle), len(bundle)
            )
        finally:
            client.close()
        return status

    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(one, range(res.sample)))
    res.deploy_wall = time.perf_counter() - t0
    res.deploy_errors = sum(s not in (200, 201) for s in statuses)


def route(gw: ScaleGateway, res: Result, first: list[float], cached: list[float] | None) -> None:
    """GET / on every sample host (then again, cached, if `cached` is given) and on as many
    unknown hosts; 8 keep-alive connections."""
    hosts = [f"{app_name(i)}.localhost" for i in range(res.sample)]
    rounds: list[tuple[list[float], list[str], int]] = [(first, hosts, 200)]
    if cached is not None:
        rounds.append((cached, hosts, 200))
        unknown = [f"nope{i}.localhost" for i in range(res.sample)]
        rounds.append((res.route_unknown, unknown, 404))
    for out, names, want in rounds:
        jobs = [("GET", "/", host, "", b"") for host in names]

        def on_done(i: int, status: int, seconds: float, out: list[float] = out, want: int = want):
            out.append(seconds)
            if status != want:
                res.route_errors += 1

        asyncio.run(run_pool(gw.port, 8, jobs, on_done))


def registry_load_seconds(gw: ScaleGateway) -> float:
    """The last "registry: loaded … in X.XXs" line of the gateway's log (0 if none)."""
    found = LOAD_LINE.findall(gw.log_path.read_text(errors="replace"))
    return float(found[-1]) if found else 0.0


def touch_rest(gw: ScaleGateway, res: Result) -> None:
    """One GET / to every static app without a bundle: 503 "none is deployed", answered by the
    gateway without starting anything, after it has built that app's instance record. What the
    gateway keeps per app that has ever been requested, as opposed to merely registered."""
    jobs = [
        ("GET", "/", f"{app_name(i)}.localhost", "", b"") for i in range(res.sample, res.statics)
    ]

    def on_done(i: int, status: int, seconds: float) -> None:
        res.touched.append(seconds)
        if status != 503:
            res.touch_errors += 1

    t0 = time.perf_counter()
    asyncio.run(run_pool(gw.port, 8, jobs, on_done))
    res.touch_wall = time.perf_counter() - t0


def measure(args: argparse.Namespace, tmp: Path) -> Result:
    res = Result(apps=args.apps, sample=min(args.sample, args.apps), concurrency=args.concurrency)
    app_dir = tmp / "app"
    app_dir.mkdir(mode=0o755)
    (app_dir / "main.py").write_text(HELLO_APP)
    gw = ScaleGateway(tmp, "auto", True, "auto")  # [pool]: the gateway defaults
    try:
        gw.start()
        time.sleep(1.0)
        res.base = gw.memory()
        res.idle_empty = gw.idle_cpu()
        register(gw, res, app_dir)
        time.sleep(1.0)
        res.after_reg = gw.memory()
        res.idle_registered = gw.idle_cpu()
        deploy_static(gw, res)
        time.sleep(1.0)
        res.after_deploy = gw.memory()
        route(gw, res, res.route_first, res.route_cached)
        time.sleep(1.0)
        res.after_route = gw.memory()
        touch_rest(gw, res)
        time.sleep(1.0)
        res.after_touch = gw.memory()
        res.idle_touched = gw.idle_cpu()
        update(gw, res, app_dir)
        res.stop_s, res.start_s = gw.restart()
        time.sleep(1.0)
        res.after_restart = gw.memory()
        res.load_s = registry_load_seconds(gw)
        route(gw, res, res.restart_route, None)
        time.sleep(1.0)
        res.after_restart_route = gw.memory()
        res.db_bytes = sum(p.stat().st_size for p in (gw.dir / "data").glob("dorm.sqlite*"))
    finally:
        gw.close()
    return res


# -- the report --------------------------------------------------------------------------------
def mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.2f} ms" if values else "—"


def render(args: argparse.Namespace, res: Result) -> str:
    info = machine_info()
    given = " ".join(sys.argv[1:])
    rate = res.apps / res.reg_wall if res.reg_wall else 0.0
    per_app = (res.after_reg["VmRSS"] - res.base["VmRSS"]) / max(1, res.apps)
    touched = len(res.touched)
    per_touched = (res.after_touch["VmRSS"] - res.after_route["VmRSS"]) / max(1, touched)
    phases = (res.after_reg, res.after_route, res.after_touch, res.after_restart_route)
    peak = max(m.get("VmHWM", 0) for m in phases)
    worst = max(m["VmRSS"] for m in phases)
    lines = [
        "## Registry scale",
        "",
        f"{res.apps:,} apps registered with one `dorm serve` through the admin API "
        f"(`PUT /v1/apps/{{app}}`, one request per app from {res.concurrency} keep-alive "
        f"connections: there is no bulk endpoint). {res.statics:,} are `static` apps, the rest "
        "python-asgi apps sharing one `app_dir`. Then one static bundle is deployed "
        f"(`PUT /v1/apps/{{app}}/branches/main/bundle`) to {res.sample:,} of the static apps, "
        f"and `GET /` sent to each of those {res.sample:,} hosts twice (200 from the bundle) and "
        f"to {res.sample:,} unknown hosts (404); then once to each of the other {touched:,} "
        "static apps (503: no bundle deployed), which makes the gateway build the per-app "
        "state it keeps for an app that has been requested. Nothing is ever started: the static "
        "runtime answers in the gateway. Then a restart on the same SQLite database. Memory is "
        "the gateway process alone (VmRSS, VmHWM = peak RSS, PSS from smaps_rollup); its fork "
        "server is a separate, constant-size process.",
        "",
        f"- **Date:** {now_utc()}; dorm at commit {git_revision(('gateway',))}",
        f"- **Machine:** {info['cpus']} CPUs ({info['cpu_model']}), kernel {info['kernel']}, "
        f"Python {info['python']}",
        f"- **Command:** `python -m bench.registry_scale{' ' + given if given else ''}` "
        "(`make bench-registry`)",
        "",
        "| phase | apps | gateway RSS | peak RSS (VmHWM) | PSS | time |",
        "|---|---:|---:|---:|---:|---|",
        f"| started, empty | 0 | {mib(res.base['VmRSS'])} | {mib(res.base['VmHWM'])} | "
        f"{mib(res.base['Pss'])} | — |",
    ]
    for n, mem, p50, cpu in res.curve[:-1]:
        lines.append(
            f"| registering | {n:,} | {mib(mem['VmRSS'])} | {mib(mem['VmHWM'])} | "
            f"{mib(mem['Pss'])} | this tenth: admin p50 {p50 * 1000:.2f} ms, gateway CPU "
            f"{cpu * 1e6:.0f} µs per app |"
        )

    def row(phase: str, mem: dict[str, int], note: str) -> str:
        return (
            f"| {phase} | {res.apps:,} | {mib(mem['VmRSS'])} | {mib(mem['VmHWM'])} | "
            f"{mib(mem['Pss'])} | {note} |"
        )

    lines += [
        row(
            "registered",
            res.after_reg,
            f"{res.reg_wall:.1f} s ({rate:,.0f} apps/s; p50 {ms(res.reg_latency, 50)}, "
            f"p99 {ms(res.reg_latency, 99)})",
        ),
        row(f"+ {res.sample:,} bundles deployed", res.after_deploy, f"{res.deploy_wall:.1f} s"),
        row(
            f"+ {res.sample:,} static hosts routed",
            res.after_route,
            f"first request p50 {ms(res.route_first, 50)} (p99 {ms(res.route_first, 99)}), "
            f"cached {ms(res.route_cached, 50)}, unknown host {ms(res.route_unknown, 50)}",
        ),
        row(
            f"+ {touched:,} more apps requested once",
            res.after_touch,
            f"{res.touch_wall:.1f} s; p50 {ms(res.touched, 50)}",
        ),
        row(
            "restarted (admin API answering)",
            res.after_restart,
            f"stop {res.stop_s:.1f} s, start to ready {res.start_s:.2f} s",
        ),
        row(
            f"restarted, {res.sample:,} hosts routed",
            res.after_restart_route,
            f"first request p50 {ms(res.restart_route, 50)} (p99 {ms(res.restart_route, 99)})",
        ),
        "",
    ]
    errors = res.reg_errors + res.deploy_errors + res.route_errors + res.touch_errors
    # Whether a write costs more as the registry grows: judged on the gateway's CPU per write,
    # which neighbours on the machine do not change, not on latency, which they do.
    first_tenth, last_tenth = res.curve[0][3], res.curve[-1][3]
    if res.apps < 50_000:  # a tenth is then under a few CPU-seconds: clock ticks and noise
        growth = "too few apps per tenth to compare them"
    elif last_tenth < 1.5 * first_tenth:
        growth = "so a write costs no more with more apps"
    else:
        growth = "**a write costs more as the registry grows**"
    all_requested = res.after_reg["VmRSS"] + res.apps * per_touched
    if res.apps < TARGET_APPS:
        verdict = f"not measured at full size (this run: {res.apps:,} apps, {mib(worst)} RSS)"
    elif worst <= TARGET_RSS:
        verdict = (
            f"**met** for registered apps: {mib(worst)} RSS at most (peak {mib(peak)}) with "
            f"{res.apps:,} registered and {res.sample + touched:,} of them requested"
        )
    else:
        verdict = f"**not met**: {mib(worst)} RSS with {res.apps:,} apps"
    lines.append(
        f"Registering took {res.reg_wall:.1f} s ({rate:,.0f} apps/s through the admin API, "
        f"{res.reg_gateway_cpu / max(1, res.apps) * 1e6:.0f} µs of gateway CPU per app, client "
        f"on the same CPUs): {first_tenth * 1e6:.0f} µs per app in the first tenth and "
        f"{last_tenth * 1e6:.0f} µs in the last, {growth}. Each registered app costs the "
        f"gateway ≈ {per_app / 1024:.2f} KiB of RSS; the SQLite database is "
        f"{mib(res.db_bytes)}. An app that has been requested costs ≈ "
        f"{per_touched / 1024:.1f} KiB more (its instance record, kept while the gateway runs, "
        "even when cold): if every one of the "
        f"{res.apps:,} apps had been requested since the start, the gateway would hold "
        f"≈ {mib(int(all_requested))} (extrapolation). A restart loads all {res.apps:,} apps "
        f"from SQLite before the listeners open: {res.start_s:.2f} s from exec to a ready admin "
        f"API, of which the registry load took {res.load_s:.2f} s (the gateway's log), and "
        "forgets the instance records. The idle gateway (no requests, "
        f"{IDLE_WINDOW:g} s) used {res.idle_empty:.1%} of a CPU empty, {res.idle_registered:.1%} "
        f"with {res.apps:,} apps registered and {res.idle_touched:.1%} once "
        f"{res.sample + touched:,} of them had been requested; then updating "
        f"{len(res.update_latency):,} app specs (`PUT` again) cost {res.update_cpu * 1e6:.0f} µs "
        f"of gateway CPU each (p50 {ms(res.update_latency, 50)}), against "
        f"{res.reg_gateway_cpu / max(1, res.apps) * 1e6:.0f} µs per registration before any "
        f"request. {errors} errors ({RESENT[0]} requests resent after the server closed an idle "
        "keep-alive connection). Issue #7's target, "
        f"{TARGET_APPS:,} registered apps under {TARGET_RSS // MIB} MiB RSS: {verdict}."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Gateway memory and time with many registered apps (docs/benchmarks.md)"
    )
    parser.add_argument("--quick", action="store_true", help="10,000 apps instead of 100,000")
    parser.add_argument("--apps", type=int, default=0, help="apps to register")
    parser.add_argument("--sample", type=int, default=1000, help="static apps routed to")
    parser.add_argument("--concurrency", type=int, default=8, help="admin connections at once")
    parser.add_argument("--no-write", action="store_true", help="print, do not edit the docs")
    args = parser.parse_args(argv)
    args.apps = args.apps or (10_000 if args.quick else TARGET_APPS)
    tmp = Path(tempfile.mkdtemp(prefix="dorm-registry-", dir="/tmp"))
    tmp.chmod(0o755)
    try:
        with sigterm_as_interrupt():
            res = measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = render(args, res)
    print(text)
    if not args.no_write:
        write_section("Registry scale", text)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
