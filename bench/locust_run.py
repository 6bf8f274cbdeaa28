"""Locust scenarios against a real dorm: cold starts, density, branch previews.

    python -m bench.locust_run coldstart|density|previews [--quick] [--no-write] [--no-plot]

A `dorm serve` is started with a throw-away config (`isolation = "auto"`: sandboxed when run as
root; a large `uid_range` and `max_warm_instances`), python-asgi hello apps are registered through
the admin API (coldstart, previews: `PUT /v1/apps/{app}` with `app_dir` pointing at ONE shared
directory, so they share code on disk, not processes; density: each app deployed as its own
bundle, `PUT /v1/apps/{app}/branches/main/bundle`, as separately deployed tenants are), and
`locust --headless` is run as a subprocess with a bounded `--run-time` against 127.0.0.1, the Host
header choosing the tenant. Locust's CSV
(`*_stats.csv`, `*_stats_history.csv`) gives the tables; the locustfiles also log one raw line
per request (for plots and the cold/warm split). Every second a sampler reads the gateway's RSS,
the summed PSS of every instance process (pids from `GET /v1/instances`, their trees, from
/proc/<pid>/smaps_rollup) and the number of warm instances.

Scenarios (quick / full):
  * coldstart: sequential cold starts, then bursts of 1/5/25(/100) distinct cold apps at once,
    through dorm and through the fresh-process-per-tenant baseline (`bench.locust.tiny_server`)
    driven by the same Locust pattern.
  * density: 50 / 1,000 apps, Zipf popularity, idle_timeout 20 s, steady load 30 s / 3 min; then
    "hold N warm idle": wake apps one by one and measure PSS until errors or a memory/time bound.
  * previews: 3 / 10 apps x 20 / 100 branches; reviewers with think time plus synchronized bursts
    on fresh branches.

Everything is bounded (timeouts, caps), traffic stays on 127.0.0.1, and every process started
here is stopped at the end, on error and on Ctrl-C. Results go to the `## Locust: <scenario>`
section of docs/benchmarks.md and docs/img/locust-*.png.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.coldstart import HELLO_APP, Gateway
from bench.common import (
    REPO,
    children_cpu,
    cpu_seconds,
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
    wait_for,
    write_section,
)
from gateway.client import AdminClient

IMG_DIR = REPO / "docs" / "img"
LOCUST_DIR = Path(__file__).resolve().parent / "locust"
MIB = 1024 * 1024
QUIET = 0.15


BUNDLE_UPLOADS = 4  # bundle uploads at a time: the gateway unpacks them in a thread pool


def hello_bundle(name: str, idle: str) -> bytes:
    """The hello app as one tenant's bundle (deterministic tar.gz: `dorm.toml` + `main.py`).

    The manifest carries the app's name in a comment, so each app's archive (and digest, and
    stored tree) is its own.
    """
    manifest = (
        f"# bench tenant {name}\n"
        'runtime = "python-asgi"\n'
        'entry = "main:app"\n'
        f'idle_timeout = "{idle}"\n'
        'startup_timeout = "60s"\n'
        "max_queue = 1000\n"
    ).encode()
    out = io.BytesIO()
    with (
        gzip.GzipFile(filename="", fileobj=out, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as tf,
    ):
        for member, data in (("dorm.toml", manifest), ("main.py", HELLO_APP.encode())):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


# -- the gateway -----------------------------------------------------------------------------------
class BigGateway(Gateway):
    """bench.coldstart's Gateway with room for thousands of warm instances."""

    max_warm = 10_000

    def __init__(self, tmp: Path, isolation: str, pools: bool, name: str) -> None:
        super().__init__(tmp, isolation, pools, name)
        self.seen_started: dict[int, int | None] = {}  # instance pid → its start time

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
            'uid_range = "330000-349999"\n'
            f"max_warm_instances = {self.max_warm}\n"
            "max_connections = 20000\n"
            'shutdown_timeout = "20s"\n'
        )
        return cfg

    def all_instances(self) -> list[dict[str, Any]]:
        status, body = self.admin("GET", "/v1/instances")
        if status != 200:
            raise RuntimeError(f"GET /v1/instances: {status} {body}")
        items = body["instances"] if isinstance(body, dict) else body
        for inst in items:
            pid = int(inst.get("pid") or 0)
            if pid and pid not in self.seen_started:
                self.seen_started[pid] = start_time(pid)
        return list(items)

    def close(self) -> None:
        """Stop the gateway, then kill what it left of the instances we saw, by (pid, start
        time) only: a density run sees thousands of instance pids, and once those instances
        exit the numbers go to other people's processes on this shared machine (bench.coldstart's
        plain kill by pid killed one of them after a full run)."""
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, grace=15)
        for pid, started in self.seen_started.items():
            kill_pid_if_same(pid, started, grace=1.0)
        self.seen_pids.clear()  # pids without a start time: never killed by number
        super().close()


# -- memory / warm-instance sampler ----------------------------------------------------------------
@dataclass(slots=True)
class MemSample:
    t: float  # seconds since the sampler started
    warm: int  # instances in state "ready" (or busy)
    instance_pss: int  # bytes, summed over every process of every live instance
    gateway_rss: int
    forkserver_pss: int


class Sampler:
    """Every `interval` s: warm instances, their summed PSS, the gateway's RSS (a thread)."""

    def __init__(self, gw: BigGateway, interval: float = 1.0) -> None:
        self.gw = gw
        self.interval = interval
        self.samples: list[MemSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()
        self.cpu = 0.0  # CPU seconds the sampler itself spent reading /proc
        self.stretched = 0  # samples after which the interval was stretched past `interval`

    def __enter__(self) -> Sampler:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def one(self) -> MemSample:
        insts = self.gw.all_instances()
        pss = 0
        warm = 0
        for inst in insts:
            if inst.get("state") in ("ready", "busy", "draining") and inst.get("pid"):
                warm += inst.get("state") != "draining"
                for p in process_tree(int(inst["pid"])):
                    pss += smaps_rollup(p).get("Pss", 0)
        gw_rss = smaps_rollup(self.gw.proc.pid).get("Rss", 0) if self.gw.proc else 0
        fs = self.gw.forkserver_pid()
        fs_pss = smaps_rollup(fs).get("Pss", 0) if fs else 0
        return MemSample(time.monotonic() - self.t0, warm, pss, gw_rss, fs_pss)

    def _run(self) -> None:
        """Sample every `interval` s, but stretch the interval so that reading /proc never takes
        more than a fifth of one CPU: smaps_rollup walks every page table, and on this 2-CPU
        machine sampling 1,000 instances each second would itself be load on what we measure."""
        self.cpu = 0.0
        self.stretched = 0
        while not self._stop.is_set():
            t = time.monotonic()
            c = time.thread_time()
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                self.samples.append(self.one())
            cost = time.thread_time() - c
            self.cpu += cost
            wait = max(self.interval, 5 * cost)
            self.stretched += wait > self.interval
            self._stop.wait(max(0.0, wait - (time.monotonic() - t)))


# -- one locust run --------------------------------------------------------------------------------
@dataclass
class LocustRun:
    """What one locust subprocess produced: CSV rows, history rows, raw samples, CPU, wall."""

    label: str
    command: str
    stats: list[dict[str, str]] = field(default_factory=list)
    history: list[dict[str, str]] = field(default_factory=list)
    raw: list[dict[str, Any]] = field(default_factory=list)
    wall: float = 0.0
    other_cpu: float = 0.0
    locust_cpu: float = 0.0
    memory: list[MemSample] = field(default_factory=list)
    returncode: int = 0
    sampler_cpu: float = 0.0
    sampler_stretched: int = 0
    gateway_cpu: float = 0.0  # the gateway process alone (event loop: proxy + control plane)
    tree_cpu: float = 0.0  # gateway + fork server + instances (live and reaped)

    def row(self, name: str) -> dict[str, str] | None:
        for r in self.stats:
            if r.get("Name") == name:
                return r
        return None


class Driver:
    """Owns the gateway, the temp dir and every locust process of one run; `close()` undoes all."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="dorm-locust-", dir="/tmp"))
        self.tmp.chmod(0o755)  # sandboxed tenants run as other uids and must reach /app
        self.app_dir = self.tmp / "app"
        self.app_dir.mkdir(mode=0o755)
        (self.app_dir / "main.py").write_text(HELLO_APP)
        (self.app_dir / "main.py").chmod(0o644)
        self.gw: BigGateway | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.quiet_waited = 0.0
        self.not_quiet = 0
        self.deployed = 0  # apps created by a bundle deploy (density) rather than PUT /v1/apps

    def close(self) -> None:
        for proc in self.procs:
            stop_process(proc, signal.SIGTERM, grace=5)
        if self.gw is not None:
            self.gw.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def start_gateway(self) -> BigGateway:
        self.gw = BigGateway(self.tmp, "auto", True, "auto")  # [pool]: the gateway defaults
        self.gw.start()
        return self.gw

    def spec(self, idle: str = "1h") -> dict[str, Any]:
        return {
            "runtime": "python-asgi",
            "entry": "main:app",
            "app_dir": str(self.app_dir),
            "idle_timeout": idle,
            "startup_timeout": "60s",
            "max_queue": 1000,
        }

    def register(self, names: list[str], idle: str = "1h") -> float:
        """PUT every app; returns seconds per registration (the admin API's cost)."""
        assert self.gw is not None
        t0 = time.perf_counter()
        spec = self.spec(idle)
        for name in names:
            self.gw.put_app(name, spec)
        return (time.perf_counter() - t0) / max(1, len(names))

    def deploy_bundles(self, names: list[str], idle: str = "1h") -> float:
        """Deploy every app as its own bundle; returns seconds per deploy (the admin API's cost).

        Each app gets its own archive through `PUT /v1/apps/{app}/branches/main/bundle`, which
        creates the app from the archive's `dorm.toml`: the hello app plus a manifest naming the
        app, so no two archives have the same digest and every app has its own stored tree (as
        separately deployed tenants would), not one tree shared through deduplication. Uploads
        go `BUNDLE_UPLOADS` at a time, each on its own connection (as `dorm deploy` does).
        """
        assert self.gw is not None
        gw = self.gw
        url = f"http://127.0.0.1:{gw.admin_port}"

        def one(name: str) -> None:
            data = hello_bundle(name, idle)
            client = AdminClient(url, gw.token, timeout=60.0)
            try:
                status, body = client.upload(
                    f"/v1/apps/{name}/branches/main/bundle", io.BytesIO(data), len(data)
                )
            finally:
                client.close()
            if status not in (200, 201):
                raise RuntimeError(f"deploy {name}: {status} {body}")

        t0 = time.perf_counter()
        with ThreadPoolExecutor(BUNDLE_UPLOADS) as pool:
            for _ in pool.map(one, names):
                pass
        self.deployed += len(names)
        return (time.perf_counter() - t0) / max(1, len(names))

    def wait_quiet(self) -> None:
        """Wait (bounded) until other processes leave the CPUs mostly idle, as bench.coldstart."""
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
                self.not_quiet += 1
                break
        self.quiet_waited += time.monotonic() - t0

    def our_cpu(self) -> float:
        me = os.times()
        total = me.user + me.system + children_cpu()
        if self.gw is not None and self.gw.proc is not None:
            total += tree_cpu_seconds(self.gw.proc.pid)
        return total

    def locust(
        self,
        label: str,
        locustfile: str,
        classes: list[str],
        users: int,
        spawn_rate: float,
        run_time: float,
        config: dict[str, Any],
        sample_memory: bool = False,
    ) -> LocustRun:
        """Run one bounded headless locust and parse what it wrote."""
        assert self.gw is not None
        out = self.tmp / f"run-{label}"
        out.mkdir()
        config = {**config, "samples": str(out / "raw.jsonl"), "users": users}
        cfg_path = out / "config.json"
        cfg_path.write_text(json.dumps(config))
        cmd = [
            str(Path(sys.executable).parent / "locust"),
            "--headless",
            "-f",
            str(LOCUST_DIR / locustfile),
            "--csv",
            str(out / "locust"),
            "--csv-full-history",
            "--run-time",
            f"{int(run_time)}s",
            "--stop-timeout",
            "10",
            "-u",
            str(users),
            "-r",
            f"{spawn_rate:g}",
            "--host",
            f"http://127.0.0.1:{self.gw.port}",
            "--only-summary",
            "--loglevel",
            "WARNING",
            *classes,
        ]
        shown = (
            f"locust --headless -f bench/locust/{locustfile} --csv <tmp> --run-time "
            f"{int(run_time)}s -u {users} -r {spawn_rate:g} --host http://127.0.0.1:<port> "
            + " ".join(classes)
        )
        self.wait_quiet()
        if "start_in" in config:  # synchronized rounds: fix the wall clock after the wait
            config["start_at"] = time.time() + config["start_in"]
            cfg_path.write_text(json.dumps(config))
        ours = self.our_cpu()
        busy, _ = machine_cpu()
        assert self.gw.proc is not None
        gw0, tree0, lc0 = (
            cpu_seconds(self.gw.proc.pid),
            tree_cpu_seconds(self.gw.proc.pid),
            children_cpu(),
        )
        t0 = time.monotonic()
        log = open(out / "locust.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "DORM_LOCUST_CONFIG": str(cfg_path), "PYTHONPATH": str(REPO)},
        )
        self.procs.append(proc)
        run = LocustRun(label, shown)
        sampler = Sampler(self.gw) if sample_memory else None
        try:
            if sampler:
                sampler.__enter__()
            try:
                proc.wait(run_time + 60)
            except subprocess.TimeoutExpired:
                print(f"locust {label}: did not stop in time; killing it", file=sys.stderr)
        finally:
            if sampler:
                sampler.__exit__(None)
                run.memory = sampler.samples
                run.sampler_cpu, run.sampler_stretched = sampler.cpu, sampler.stretched
            stop_process(proc, signal.SIGTERM, grace=10)
            run.locust_cpu = children_cpu() - lc0  # locust is our child: reaped, so counted
            log.close()
        run.gateway_cpu = cpu_seconds(self.gw.proc.pid) - gw0
        run.tree_cpu = tree_cpu_seconds(self.gw.proc.pid) - tree0
        run.wall = time.monotonic() - t0
        run.returncode = proc.returncode or 0
        spent = self.our_cpu() - ours
        cpus = os.cpu_count() or 1
        run.other_cpu = max(0.0, (machine_cpu()[0] - busy - spent) / (run.wall * cpus))
        run.stats = _read_csv(out / "locust_stats.csv")
        run.history = _read_csv(out / "locust_stats_history.csv")
        raw = out / "raw.jsonl"
        if raw.exists():
            run.raw = [json.loads(line) for line in raw.read_text().splitlines() if line.strip()]
        if not run.stats:
            tail = (out / "locust.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"locust {label} wrote no stats (rc {proc.returncode}):\n{tail}")
        self.procs.remove(proc)
        return run


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def parse_seconds(text: str) -> float:
    """ "20s", "2m" or "30" as seconds (the driver's own --idle flag)."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


# -- formatting ------------------------------------------------------------------------------------
def ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def mib(value: float) -> str:
    return f"{value / MIB:.1f} MiB"


def pcts(values: list[float]) -> tuple[float | None, float | None, float | None]:
    if not values:
        return None, None, None
    return percentile(values, 50), percentile(values, 99), max(values)


def header(scenario: str, intro: str, drv: Driver, runs: list[LocustRun]) -> str:
    info = machine_info()
    others = [r.other_cpu for r in runs]
    other = (
        f"{min(others):.0%}-{max(others):.0%} of all CPUs (median {percentile(others, 50):.0%})"
        if others
        else "—"
    )
    # As typed, but naming this scenario (`all` runs each; a reader re-runs just this one).
    argv = [scenario if a == "all" else a for a in sys.argv[1:]]
    given = " ".join(argv) if argv else scenario + (" --quick" * drv.args.quick)
    busy_note = (
        "Other engineers' test suites were running on this machine: absolute numbers are "
        "pessimistic."
        if others and max(others) > QUIET
        else "The machine was otherwise quiet."
    )
    return (
        f"## Locust: {scenario}\n\n{intro}\n\n"
        f"- **Date:** {now_utc()}; dorm at commit "
        f"{git_revision(('gateway', 'runtimes', 'sandboxes'))}\n"
        f"- **Machine:** {info['cpus']} CPUs ({info['cpu_model']}), kernel {info['kernel']}, "
        f"Python {info['python']}, locust {pkg_version('locust')}, granian "
        f"{pkg_version('granian')}\n"
        f"- **Command:** `python -m bench.locust_run {given}` "
        f"(`make bench-locust`); each locust run: "
        + "; ".join(f"`{r.command}`" for r in runs[:3])
        + (" …" if len(runs) > 3 else "")
        + "\n"
        '- **Gateway:** `isolation = "auto"` (sandboxed: run as root), python-asgi hello apps '
        + (
            "each deployed as its own bundle through `PUT /v1/apps/{app}/branches/main/bundle` "
            f"(a tar.gz of `dorm.toml` + `main.py`, one archive and stored tree per app, "
            f"{BUNDLE_UPLOADS} uploads at a time)"
            if drv.deployed
            else "registered through `PUT /v1/apps/{app}` with `app_dir` = one shared directory: "
            "they share code on disk, not processes (each app has its own instances)"
        )
        + '; default `start = "zygote"`\n'
        f"- **Other load:** CPU used by processes other than this benchmark, the gateway and "
        f"its instances and locust: {other}; waited {drv.quiet_waited:.0f} s in all for a quiet "
        f"machine (≤ {QUIET:.0%} busy, at most {drv.args.quiet_wait:g} s per run), "
        f"{drv.not_quiet} run(s) started busy. {busy_note}\n"
        "- **Locust itself** runs on the same CPUs (one process, FastHttpUser): at high "
        "request rates it is the client, not dorm, that saturates first.\n"
    )


def stats_table(runs: list[LocustRun], names: list[tuple[str, str]]) -> str:
    """Locust's own CSV numbers, per (run label, request name)."""
    lines = [
        "| run | request | n | failures | req/s | p50 | p90 | p99 | max |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_label = {r.label: r for r in runs}
    for label, name in names:
        run = by_label.get(label)
        row = run.row(name) if run else None
        if row is None:
            continue
        lines.append(
            f"| {label} | {name} | {row['Request Count']} | {row['Failure Count']} | "
            f"{float(row['Requests/s']):.1f} | {row['50%']} ms | {row['90%']} ms | "
            f"{row['99%']} ms | {float(row['Max Response Time']):.0f} ms |"
        )
    return "\n".join(lines)


# -- scenario: coldstart ---------------------------------------------------------------------------
def scenario_coldstart(drv: Driver) -> str:
    quick = drv.args.quick
    gw = drv.start_gateway()
    seq_n = 20 if quick else 60
    bursts = [(1, 5), (5, 3), (25, 2)] if quick else [(1, 10), (5, 4), (25, 3), (100, 2)]
    phases: list[tuple[str, int, int, float]] = [("sequential", 1, seq_n, 0.3)]
    for size, rounds in bursts:
        phases.append((f"burst-{size}", size, rounds, 3.0 if size <= 25 else 12.0))
    # one warm-up start, not recorded: the zygote's first fork touches cold pages
    drv.register(["warmup"])
    gw.admin("GET", "/v1/health")
    runs: list[LocustRun] = []
    app_path: dict[str, str] = {}
    for target in ("dorm", "baseline"):
        for phase, users, rounds, gap in phases:
            apps = [
                [f"{target[0]}{phase[0]}{users}r{k}u{i}" for i in range(users)]
                for k in range(rounds)
            ]
            if target == "dorm":
                drv.register([a for r in apps for a in r])
            label = f"{target} {phase}"
            cfg = {
                "phase": phase,
                "rounds": rounds,
                "gap": gap,
                "start_in": 4.0,
                "apps": apps,
            }
            run_time = 4 + rounds * max(gap, 1.0) + (60 if phase == "sequential" else 30)
            cls = "DormColdUser" if target == "dorm" else "FreshProcessUser"
            print(f"bench.locust_run: {label} ({users} users x {rounds} rounds)", file=sys.stderr)
            run = drv.locust(label, "coldstart.py", [cls], users, users, run_time, cfg)
            runs.append(run)
            if target == "dorm":
                for inst in gw.all_instances():
                    path = inst.get("path") or inst.get("start_path")
                    if path:
                        app_path[inst["app"]] = str(path)
                # stop them so the next phase's machine is as empty as the baseline's
                for r in apps:
                    with contextlib.suppress(Exception):
                        gw.stop_apps(r)
    return render_coldstart(drv, runs, app_path, phases)


def render_coldstart(
    drv: Driver, runs: list[LocustRun], app_path: dict[str, str], phases: list[Any]
) -> str:
    by = {r.label: r for r in runs}
    lines = [
        "| phase | dorm n | dorm p50 | dorm p99 | dorm max | waited for a start | errors | "
        "baseline p50 | baseline p99 | baseline max | errors | baseline / dorm (p50) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary: dict[str, tuple[float | None, float | None]] = {}
    for phase, _users, _rounds, _gap in phases:
        d, b = by.get(f"dorm {phase}"), by.get(f"baseline {phase}")
        if d is None:
            continue
        dv = [s["ms"] for s in d.raw if s["ok"]]
        bv = [s["ms"] for s in b.raw if s["ok"]] if b else []
        cold = sum(1 for s in d.raw if s.get("x") == "cold")
        de = sum(1 for s in d.raw if not s["ok"])
        be = sum(1 for s in b.raw if not s["ok"]) if b else 0
        dp, bp = pcts(dv), pcts(bv)
        ratio = f"{bp[0] / dp[0]:.1f}x" if dp[0] and bp[0] else "—"
        summary[phase] = (dp[0], bp[0])
        lines.append(
            f"| {phase} | {len(d.raw)} | {ms(dp[0])} | {ms(dp[1])} | {ms(dp[2])} | "
            f"{cold}/{len(d.raw)} | {de} | {ms(bp[0])} | {ms(bp[1])} | {ms(bp[2])} | {be} | "
            f"{ratio} |"
        )
    table = "\n".join(lines)
    names = [(r.label, r.label.split(" ", 1)[1]) for r in runs]
    csv_table = stats_table(runs, names)
    if app_path:
        groups: dict[str, list[float]] = {}
        for r in runs:
            if r.label.startswith("dorm"):
                for s in r.raw:
                    if s["ok"]:
                        groups.setdefault(app_path.get(s["app"], "unknown"), []).append(s["ms"])
        path_note = (
            "By cold-start path (`path` of `GET /v1/instances`):\n\n"
            "| path | n | p50 | p99 |\n|---|---:|---:|---:|\n"
            + "\n".join(
                f"| {k} | {len(v)} | {ms(pcts(v)[0])} | {ms(pcts(v)[1])} |"
                for k, v in groups.items()
            )
        )
    else:
        path_note = (
            "**Cold-start path:** `GET /v1/instances` reports no per-stage `path` field (pool / "
            "zygote / fresh) at this commit, so dorm's samples are reported all together: every "
            'app here is `start = "zygote"`, and with `prewarm` a start may or may not have '
            "claimed a pre-forked pool member. The driver groups by that field automatically "
            "once the gateway reports it."
        )
    seq = summary.get("sequential", (None, None))
    b25 = summary.get("burst-25", (None, None))
    reading = (
        f"Sequentially, a cold tenant answered its first request through dorm in {ms(seq[0])} "
        f"(p50) against {ms(seq[1])} for a fresh `python -m` server per tenant driven by the "
        f"same Locust pattern"
        + (f" ({seq[1] / seq[0]:.1f}x)" if seq[0] and seq[1] else "")
        + f". In bursts of 25 distinct cold tenants at once: {ms(b25[0])} vs {ms(b25[1])} (p50). "
        "Locust measures from just before its request is sent (on the user's pooled "
        "connection, new for the first round) until the whole response; the baseline's time "
        "runs from spawn to the whole response. The baseline server is a bare asyncio "
        "server (standard library only) while dorm's tenant runs granian in a sandbox, so the "
        'baseline is the cheapest a process-per-tenant gateway can be. "Waited for a start" '
        "counts responses whose module was imported after the request was sent."
    )
    body = header(
        "coldstart",
        "Every Locust user requests a different cold tenant: one user sequentially, then "
        "synchronized rounds of N users (each round at a fixed wall-clock time, every user a "
        "new app). Same pattern against the fresh-process baseline (`FreshProcessUser`: spawn "
        "`python -m bench.locust.tiny_server PORT` per tenant, poll until it listens, send the "
        "request). dorm's apps are stopped after each phase.",
        drv,
        runs,
    )
    body += "\n" + table + "\n\nLocust's own CSV (`*_stats.csv`, ms, Locust rounds them):\n\n"
    body += csv_table + "\n\n" + path_note + "\n\n" + reading + "\n"
    if not drv.args.no_plot:
        body += "\n![locust-coldstart](img/locust-coldstart.png)\n"
        plot_coldstart(runs, phases)
    return body


def plot_coldstart(runs: list[LocustRun], phases: list[Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [p[0] for p in phases]
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True, sharey=True)
    by = {r.label: r for r in runs}
    for ax, target in zip(axes, ("dorm", "baseline"), strict=True):
        for phase in names:
            run = by.get(f"{target} {phase}")
            if run is None:
                continue
            vals = sorted(s["ms"] for s in run.raw if s["ok"])
            if vals:
                ys = [(i + 1) / len(vals) for i in range(len(vals))]
                ax.step(vals, ys, where="post", label=f"{phase} (n={len(vals)})")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("first-response latency (ms, log)")
        ax.set_ylabel("fraction of requests ≤ x")
        title = "dorm (sandbox, zygote)" if target == "dorm" else "fresh process per tenant"
        ax.set_title(f"cold starts under Locust: {title}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    IMG_DIR.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG_DIR / "locust-coldstart.png", dpi=100)
    plt.close(fig)


# -- scenario: density -----------------------------------------------------------------------------
def scenario_density(drv: Driver) -> str:
    quick = drv.args.quick
    n_apps = drv.args.apps or (50 if quick else 1000)
    duration = drv.args.duration or (30 if quick else 180)
    users = drv.args.users or 16
    gw = drv.start_gateway()
    names = [f"d{i}" for i in range(n_apps)]
    per_reg = drv.deploy_bundles(names, idle=drv.args.idle)
    cfg = {"apps": names, "zipf_s": 1.0}
    print(f"bench.locust_run: density {n_apps} apps, {duration}s, {users} users", file=sys.stderr)
    run = drv.locust(
        "density", "density.py", ["DensityUser"], users, users, duration, cfg, sample_memory=True
    )
    # the Zipf tail: how many distinct apps were requested at all
    gw_reg_rss = smaps_rollup(gw.proc.pid).get("Rss", 0) if gw.proc else 0
    # Let the density apps go idle and be evicted, so "hold" counts only its own instances.
    with contextlib.suppress(TimeoutError):
        wait_for(
            lambda: Sampler(gw).one().warm == 0,
            parse_seconds(drv.args.idle) + 60,
            "the density apps to be evicted",
            interval=1.0,
        )
    hold = hold_warm(drv, drv.args.hold or (300 if quick else 2500))
    return render_density(drv, run, n_apps, duration, users, per_reg, gw_reg_rss, hold)


@dataclass
class Hold:
    """The "hold N warm idle" measurement."""

    target: int
    woken: int = 0
    errors: int = 0
    first_error: str = ""
    stopped_because: str = ""
    wall: float = 0.0
    curve: list[tuple[int, int, int]] = field(default_factory=list)  # (n, instance PSS, gw RSS)
    per_instance: list[int] = field(default_factory=list)
    wake_ms: list[float] = field(default_factory=list)
    mem_available_end: int = 0
    forkserver_pss: int = 0


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def hold_warm(drv: Driver, target: int) -> Hold:
    """Wake apps one by one (idle timeout 1 h) and see how many stay warm, and at what PSS.

    Stops at `target`, at the first error, when MemAvailable falls under --min-free, or when
    --hold-time runs out: each is reported as what limited the ceiling.
    """
    import http.client

    gw = drv.gw
    assert gw is not None
    names = [f"h{i}" for i in range(target)]
    drv.deploy_bundles(names, idle="1h")
    hold = Hold(target)
    t0 = time.monotonic()
    conn: http.client.HTTPConnection | None = None
    sampler = Sampler(gw)
    for i, name in enumerate(names):
        if time.monotonic() - t0 > drv.args.hold_time:
            hold.stopped_because = f"time bound ({drv.args.hold_time:g} s) reached"
            break
        if mem_available() < drv.args.min_free * 1024 * MIB:
            hold.stopped_because = f"MemAvailable under {drv.args.min_free:g} GiB"
            break
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=60)
            t = time.perf_counter()
            conn.request("GET", "/", headers={"Host": f"{name}.localhost"})
            resp = conn.getresponse()
            body = resp.read()
            hold.wake_ms.append((time.perf_counter() - t) * 1000)
            if resp.status != 200:
                hold.errors += 1
                hold.first_error = f"{name}: HTTP {resp.status} {body[:200]!r}"
        except (OSError, http.client.HTTPException) as exc:
            hold.errors += 1
            hold.first_error = f"{name}: {type(exc).__name__}: {exc}"
            conn = None
        if hold.errors:
            hold.stopped_because = f"first error: {hold.first_error}"
            break
        hold.woken = i + 1
        if hold.woken % 100 == 0 or hold.woken == target:
            with contextlib.suppress(OSError, RuntimeError):
                s = sampler.one()
                hold.curve.append((s.warm, s.instance_pss, s.gateway_rss))
                print(
                    f"bench.locust_run: hold {s.warm} warm, instances {mib(s.instance_pss)}",
                    file=sys.stderr,
                )
    else:
        hold.stopped_because = f"target of {target} reached"
    if conn is not None:
        conn.close()
    hold.wall = time.monotonic() - t0
    time.sleep(3)  # idle: let the instances settle
    for inst in gw.all_instances():
        if inst.get("app", "").startswith("h") and inst.get("state") == "ready" and inst.get("pid"):
            pss = sum(smaps_rollup(p).get("Pss", 0) for p in process_tree(int(inst["pid"])))
            if pss:
                hold.per_instance.append(pss)
    fs = gw.forkserver_pid()
    hold.forkserver_pss = smaps_rollup(fs).get("Pss", 0) if fs else 0
    hold.mem_available_end = mem_available()
    return hold


def render_density(
    drv: Driver,
    run: LocustRun,
    n_apps: int,
    duration: int,
    users: int,
    per_reg: float,
    gw_rss: int,
    hold: Hold,
) -> str:
    agg = run.row("Aggregated") or run.row("density") or {}
    n = int(agg.get("Request Count", 0) or 0)
    fails = int(agg.get("Failure Count", 0) or 0)
    rps = float(agg.get("Requests/s", 0) or 0)
    cold = [s for s in run.raw if s["name"] == "density cold"]
    cold_ms = [s["ms"] for s in cold if s["ok"]]
    mem = run.memory
    max_warm = max((m.warm for m in mem), default=0)
    peak_pss = max((m.instance_pss for m in mem), default=0)
    peak_rss = max((m.gateway_rss for m in mem), default=0)
    err_note = "no errors" if fails == 0 else f"{fails} failed requests"
    table = (
        "| apps | users | duration | requests | req/s | p50 | p99 | max | failures | "
        "cold-start requests (p50 / p99) | warm instances max | instances PSS max | "
        "gateway RSS max |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|\n"
        f"| {n_apps} | {users} | {duration} s | {n} | {rps:,.0f} | {agg.get('50%', '—')} ms | "
        f"{agg.get('99%', '—')} ms | {float(agg.get('Max Response Time', 0) or 0):.0f} ms | "
        f"{fails} | {len(cold)} ({ms(pcts(cold_ms)[0])} / {ms(pcts(cold_ms)[1])}) | "
        f"{max_warm} | {mib(peak_pss)} | {mib(peak_rss)} |"
    )
    pi = hold.per_instance
    pi_med = percentile(pi, 50) if pi else 0
    total_pss = sum(pi)
    last = hold.curve[-1] if hold.curve else (0, 0, 0)
    hold_table = (
        "| target | woken (warm idle) | errors | wake p50 / p99 | wall | per-instance PSS median "
        "(min-max) | all instances PSS | gateway RSS | fork server PSS | MemAvailable after | "
        "stopped because |\n|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---|\n"
        f"| {hold.target} | {len(pi)} ({hold.woken} requested) | {hold.errors} | "
        f"{ms(pcts(hold.wake_ms)[0])} / {ms(pcts(hold.wake_ms)[1])} | {hold.wall:.0f} s | "
        f"{mib(pi_med)} ({mib(min(pi) if pi else 0)}-{mib(max(pi) if pi else 0)}) | "
        f"{mib(total_pss)} | {mib(last[2])} | {mib(hold.forkserver_pss)} | "
        f"{hold.mem_available_end / (1024 * MIB):.1f} GiB | {hold.stopped_because} |"
    )
    full_target = 2000
    projected = (hold.mem_available_end + total_pss) / pi_med if pi_med else 0
    reading = (
        f"Under Zipf load over {n_apps} apps (idle timeout {drv.args.idle}), {users} Locust "
        f"users got {rps:,.0f} req/s with p50 {agg.get('50%', '—')} ms and p99 "
        f"{agg.get('99%', '—')} ms and {err_note}; up to {max_warm} instances were warm at "
        f"once (the largest number held without errors in this run), {len(cold)} requests "
        f"waited for a cold start. Deploying an app as its own bundle through the admin API "
        f"took {per_reg * 1000:.1f} ms ({BUNDLE_UPLOADS} uploads at a time); the gateway's "
        f"RSS with {n_apps + hold.target + 1} apps "
        f"registered is {mib(last[2] or gw_rss)}. "
        f"Hold N warm idle: {len(pi)} sandboxed instances were woken one by one and stayed "
        f"warm, {mib(pi_med)} PSS each (median), {mib(total_pss)} in all; it stopped because: "
        f"{hold.stopped_because}. The issue's target is ≥ {full_target:,} simultaneously warm "
        f"idle python-asgi instances: "
        + (
            "**met**"
            if len(pi) >= full_target and hold.errors == 0
            else f"**not shown in this run** ({len(pi)} held)"
        )
        + f"; by memory alone, MemAvailable after the run plus what the instances hold "
        f"divided by the per-instance PSS gives room for ≈ {projected:,.0f} such instances on "
        f"this machine (extrapolation, see docs/capacity.md). Every app is its own bundle: "
        "its own archive, stored tree and instances; they share the runtime (the zygote's "
        "interpreter and imports), not code."
    )
    body = header(
        "density",
        f"{n_apps} python-asgi apps, each deployed as its own bundle, with Zipf(s = 1) "
        "popularity (app k gets weight 1/k), "
        f"`idle_timeout` {drv.args.idle}, {users} Locust users without think time for "
        f"{duration} s; memory and warm instances sampled every second. Then **hold N warm "
        "idle**: apps with `idle_timeout` 1 h woken one at a time by a plain keep-alive client "
        "until the target, the first error, a MemAvailable floor "
        f"({drv.args.min_free:g} GiB) or a time bound ({drv.args.hold_time:g} s).",
        drv,
        [run],
    )
    hist_note = (
        f" CPU over the load run ({run.wall:.0f} s wall, {n} requests): Locust "
        f"{run.locust_cpu:.1f} s ({run.locust_cpu / max(run.wall, 1e-9):.0%} of one CPU: "
        f"{run.locust_cpu / max(n, 1) * 1e6:.0f} µs per request"
        + (
            " — one Locust process is the client ceiling here"
            if run.locust_cpu / max(run.wall, 1e-9) > 0.85
            else ": not saturated, the machine's CPUs were"
        )
        + f"), the gateway process {run.gateway_cpu:.1f} s "
        f"({run.gateway_cpu / max(n, 1) * 1e6:.0f} µs per request, cold starts and admin "
        f"polling included), gateway + fork server + instances {run.tree_cpu:.1f} s "
        f"({run.tree_cpu / max(n, 1) * 1e6:.0f} µs per request)."
    )
    waited = sum(s["ms"] for s in cold) / 1000
    hist_note += (
        f" The {users} users are a closed loop (each waits for its response before the next "
        f"request): requests that waited for a cold start took {waited:,.0f} of the "
        f"{users * duration:,} user-seconds ({waited / max(users * duration, 1):.0%}), so "
        "req/s falls with every cold start; Locust's rounded CSV percentiles are in the "
        "history plot. The memory sampler spent "
        f"{run.sampler_cpu:.1f} CPU-seconds reading /proc ({len(run.memory)} samples; the "
        f"1 s interval was stretched {run.sampler_stretched} times to keep it under 20% of "
        "one CPU)."
    )
    body += "\n" + table + "\n\n" + hold_table + "\n\n" + reading + hist_note + "\n"
    if not drv.args.no_plot:
        plot_density(run, hold)
        body += (
            "\n![locust-density](img/locust-density.png)\n"
            "![locust-density-hold](img/locust-density-hold.png)\n"
        )
    return body


def _history_series(run: LocustRun, name: str = "Aggregated") -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"t": [], "rps": [], "p50": [], "p99": [], "fail": []}
    t0 = None
    for h in run.history:
        if h.get("Name") != name:
            continue
        with contextlib.suppress(ValueError):
            t = float(h["Timestamp"])
            t0 = t if t0 is None else t0
            out["t"].append(t - t0)
            out["rps"].append(float(h["Requests/s"]))
            out["fail"].append(float(h["Failures/s"]))
            out["p50"].append(float(h["50%"]) if h["50%"] not in ("N/A", "") else float("nan"))
            out["p99"].append(float(h["99%"]) if h["99%"] not in ("N/A", "") else float("nan"))
    return out


def plot_density(run: LocustRun, hold: Hold) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    h = _history_series(run)
    ax = axes[0][0]
    ax.plot(h["t"], h["rps"], label="req/s")
    ax.plot(h["t"], h["fail"], label="failures/s", color="red")
    ax.set_xlabel("s (Locust history)")
    ax.set_ylabel("req/s")
    ax.set_title("density: throughput")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[0][1]
    ax.plot(h["t"], h["p50"], label="p50 (current)")
    ax.plot(h["t"], h["p99"], label="p99 (current)")
    ax.set_yscale("log")
    ax.set_xlabel("s")
    ax.set_ylabel("ms")
    ax.set_title("density: latency over time (Locust history)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1][0]
    t = [m.t for m in run.memory]
    ax.plot(t, [m.instance_pss / MIB for m in run.memory], label="instances PSS (sum)")
    ax.plot(t, [m.gateway_rss / MIB for m in run.memory], label="gateway RSS")
    ax.set_xlabel("s")
    ax.set_ylabel("MiB")
    ax2 = ax.twinx()
    ax2.plot(t, [m.warm for m in run.memory], color="black", ls="--", label="warm instances")
    ax2.set_ylabel("warm instances")
    ax.set_title("density: memory and warm instances")
    ax.legend(loc="lower right")
    ax2.legend(loc="center right")
    ax.grid(alpha=0.3)
    ax = axes[1][1]
    cold = sorted(s["ms"] for s in run.raw if s["name"] == "density cold" and s["ok"])
    if cold:
        ax.hist(cold, bins=30, color="tab:orange")
    ax.set_xlabel("ms")
    ax.set_ylabel("requests")
    ax.set_title(f"density: requests that waited for a cold start (n={len(cold)})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    IMG_DIR.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG_DIR / "locust-density.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    if hold.curve:
        xs = [c[0] for c in hold.curve]
        ax.plot(xs, [c[1] / MIB for c in hold.curve], marker="o", label="instances PSS (sum)")
        ax.plot(xs, [c[2] / MIB for c in hold.curve], marker="s", label="gateway RSS")
    ax.set_xlabel("warm idle instances")
    ax.set_ylabel("MiB")
    ax.set_title("hold N warm idle: memory as instances are woken one by one")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(IMG_DIR / "locust-density-hold.png", dpi=100)
    plt.close(fig)


# -- scenario: previews ----------------------------------------------------------------------------
def scenario_previews(drv: Driver) -> str:
    quick = drv.args.quick
    n_apps, n_branches = (3, 20) if quick else (10, 100)
    rounds, gap, burst_users = (4, 6.0, 10) if quick else (10, 10.0, 20)
    reviewers = 10 if quick else 30
    gw = drv.start_gateway()
    apps = [f"p{i}" for i in range(n_apps)]
    drv.register(apps, idle="20s")
    branches = [f"pr-{i}" for i in range(n_branches)]
    t0 = time.perf_counter()
    for app in apps:
        for br in branches:
            status, body = gw.admin("PUT", f"/v1/apps/{app}/branches/{br}", {"env": {"PR": br}})
            if status not in (200, 201):
                raise RuntimeError(f"PUT branch {app}/{br}: {status} {body}")
    per_branch = (time.perf_counter() - t0) / (n_apps * n_branches)
    # burst targets: branches at the unpopular end of the Zipf list, so they are cold
    rng = random.Random(7)
    targets = [[rng.choice(apps), branches[-1 - k]] for k in range(rounds)]
    cfg = {
        "apps": apps,
        "branches": branches,
        "pages": ["/", "/pulls", "/diff", "/files", "/checks"],
        "burst_users": burst_users,
        "rounds": rounds,
        "gap": gap,
        "start_in": 8.0,
        "burst_targets": targets,
        "zipf_s": 1.0,
        "record_all": True,
    }
    users = burst_users + reviewers
    run_time = 8 + rounds * gap + 20
    print(f"bench.locust_run: previews {n_apps}x{n_branches}, {users} users", file=sys.stderr)
    run = drv.locust(
        "previews",
        "previews.py",
        ["Reviewer", "BurstReviewer"],
        users,
        users,
        run_time,
        cfg,
        sample_memory=True,
    )
    return render_previews(drv, run, n_apps, n_branches, rounds, burst_users, reviewers, per_branch)


def render_previews(
    drv: Driver,
    run: LocustRun,
    n_apps: int,
    n_branches: int,
    rounds: int,
    burst_users: int,
    reviewers: int,
    per_branch: float,
) -> str:
    lines = [
        "| request | n | errors | p50 | p99 | max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    kinds = sorted({s["name"] for s in run.raw})
    for k in kinds:
        vals = [s["ms"] for s in run.raw if s["name"] == k]
        errs = sum(1 for s in run.raw if s["name"] == k and not s["ok"])
        p = pcts(vals)
        lines.append(f"| {k} | {len(vals)} | {errs} | {ms(p[0])} | {ms(p[1])} | {ms(p[2])} |")
    csv_table = stats_table(
        [run], [("previews", "review"), ("previews", "burst"), ("previews", "Aggregated")]
    )
    max_warm = max((m.warm for m in run.memory), default=0)
    peak = max((m.instance_pss for m in run.memory), default=0)
    distinct = len({s["app"] for s in run.raw})
    bc = [s["ms"] for s in run.raw if s["name"] == "burst cold"]
    rc = [s["ms"] for s in run.raw if s["name"] == "review cold"]
    rw = [s["ms"] for s in run.raw if s["name"] == "review warm"]
    errors = sum(1 for s in run.raw if not s["ok"])
    reading = (
        f"{reviewers} reviewers clicked through {distinct} distinct previews of {n_apps} apps x "
        f"{n_branches} branches (Zipf over branches, 0.2-1 s think time, idle timeout 20 s), "
        f"while {rounds} times {burst_users} reviewers opened the same never-opened branch at "
        f"the same moment. A click that waited for its branch to start took {ms(pcts(rc)[0])} "
        f"(p50, p99 {ms(pcts(rc)[1])}), a burst on a cold branch {ms(pcts(bc)[0])} (p50, p99 "
        f"{ms(pcts(bc)[1])}: all {burst_users} share one start), a click on a warm preview "
        f"{ms(pcts(rw)[0])}; {errors} errors. At most {max_warm} preview instances were warm at "
        f"once ({mib(peak)} PSS). Registering a branch through `PUT /v1/apps/{{app}}/branches/"
        f"{{branch}}` took {per_branch * 1000:.1f} ms."
    )
    body = header(
        "previews",
        f"{n_apps} apps with {n_branches} branches each (`PUT /v1/apps/{{app}}/branches/"
        f"{{branch}}`, a per-branch env), reached as `<branch>--<app>.localhost`. `Reviewer`s "
        "pick an app and a Zipf-popular branch and click 3 pages with think time; "
        "`BurstReviewer`s open one fresh branch all at once per round, then click on. Requests "
        "are split by whether the tenant's module was imported after the request was sent "
        "(`cold`: it waited for a start) or not (`warm`).",
        drv,
        [run],
    )
    body += "\n" + "\n".join(lines) + "\n\nLocust's own CSV:\n\n" + csv_table + "\n\n"
    body += reading + "\n"
    if not drv.args.no_plot:
        plot_previews(run)
        body += "\n![locust-previews](img/locust-previews.png)\n"
    return body


def plot_previews(run: LocustRun) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    for k in sorted({s["name"] for s in run.raw}):
        vals = sorted(s["ms"] for s in run.raw if s["name"] == k and s["ok"])
        if vals:
            ax.step(
                vals,
                [(i + 1) / len(vals) for i in range(len(vals))],
                where="post",
                label=f"{k} (n={len(vals)})",
            )
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("latency (ms, log)")
    ax.set_ylabel("fraction ≤ x")
    ax.set_title("previews: latency by kind")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax = axes[1]
    t = [m.t for m in run.memory]
    ax.plot(t, [m.instance_pss / MIB for m in run.memory], label="instances PSS (sum)")
    ax.plot(t, [m.gateway_rss / MIB for m in run.memory], label="gateway RSS")
    ax.set_xlabel("s")
    ax.set_ylabel("MiB")
    ax2 = ax.twinx()
    ax2.plot(t, [m.warm for m in run.memory], color="black", ls="--", label="warm instances")
    ax2.set_ylabel("warm instances")
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    ax.set_title("previews: memory and warm instances")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    IMG_DIR.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG_DIR / "locust-previews.png", dpi=100)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------------
SCENARIOS = {
    "coldstart": scenario_coldstart,
    "density": scenario_density,
    "previews": scenario_previews,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.locust_run", description=__doc__)
    p.add_argument("scenario", choices=[*SCENARIOS, "all"])
    p.add_argument("--quick", action="store_true", help="laptop-sized run")
    p.add_argument("--no-write", action="store_true", help="print, do not edit the docs")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--apps", type=int, default=0, help="density: apps (50 quick, 1000 full)")
    p.add_argument("--users", type=int, default=0, help="density: Locust users (16)")
    p.add_argument("--duration", type=int, default=0, help="density: seconds (30 / 180)")
    p.add_argument("--idle", default="20s", help="density: idle_timeout of the apps")
    p.add_argument("--hold", type=int, default=0, help="hold N warm idle (300 quick, 2500 full)")
    p.add_argument("--hold-time", type=float, default=300.0, help="hold: time bound, s")
    p.add_argument("--min-free", type=float, default=4.0, help="hold: MemAvailable floor, GiB")
    p.add_argument("--quiet-wait", type=float, default=10.0, help="max wait for a quiet machine")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("locust", path=str(Path(sys.executable).parent)) is None:
        print(
            "bench.locust_run: locust is not installed (pip install -e '.[bench]')", file=sys.stderr
        )
        return 2
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    for name in names:
        drv = Driver(args)
        try:
            with sigterm_as_interrupt():
                body = SCENARIOS[name](drv)
        except KeyboardInterrupt:
            print("bench.locust_run: interrupted; cleaning up", file=sys.stderr)
            return 130
        finally:
            drv.close()
        if args.no_write:
            print(body)
        else:
            write_section(f"Locust: {name}", body)
            print(f"bench.locust_run: wrote the 'Locust: {name}' section", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
