"""Proxy benchmark: wrk through dorm vs through nginx vs the backend directly, interleaved rounds.

    python -m bench.proxy [--quick] [--rounds N] [--duration S] [--connections C] [--pin MODE]

One backend process (bench/backend.py) is started *by dorm* as a warm `command` app and also
listens on a second Unix socket for nginx and on a TCP port for the direct baseline, so every
path ends at the same process. A fourth path, "minimal", is a ~80-line uvloop + httptools proxy
(`MinimalProxy` below, the one DESIGN.md measured at 1.04x nginx): what a Python proxy that parses
with httptools callbacks costs on this machine, so a gap between dorm and nginx can be split into
"Python" and "dorm's own work" (dorm's plain-head checks in C can take it below that line).
Each round runs wrk against the targets in a rotating order, so drift of the machine (thermal,
noisy neighbours, page cache) hits every target alike; the report gives medians across
rounds and the ratios measured in this same run.

CPU per request is the proxy process's utime+stime (from /proc/<pid>/stat) over the run divided by
the requests wrk completed: the dorm gateway process, or nginx's single worker. The backend's CPU
per request is reported too, as a check that the backends did equal work.

All traffic stays on 127.0.0.1; every process started here is stopped at the end, on error or
Ctrl-C too. Results (and, if py-spy is installed, a profile of dorm under the same load) go to the
`## Proxy` section of docs/benchmarks.md; other sections are left alone.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import http.client
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from httptools import HttpParserError, HttpRequestParser, HttpResponseParser

from bench.common import (
    REPO,
    WrkResult,
    child_pids,
    children_cpu,
    command_line,
    cpu_seconds,
    free_port,
    git_revision,
    kill_pid,
    machine_cpu,
    machine_info,
    median,
    now_utc,
    pin,
    run_wrk,
    sigterm_as_interrupt,
    stop_process,
    wait_for,
    write_section,
)
from gateway import compiled

HOST = "bench.localhost"
BODY = b"hello, world\n"
SECTION = "Proxy"
# Targets in the order of the first round; later rounds rotate it.
TARGETS = ("dorm", "nginx", "minimal", "direct")
WARMUP_SECONDS = 2.0
# A run during which other processes used more than this share of the machine's CPU is repeated,
# at most MAX_REPEATS times (then kept, and the "other load" column shows it).
DISTURBED = 0.10
MAX_REPEATS = 2
START_TIMEOUT = 30.0

NGINX_CONF = """\
# Written by bench/proxy.py: nginx as a reverse proxy doing the same work as dorm.
worker_processes 1;
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
{user}
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    # nginx's default closes a keep-alive connection after 1000 requests; dorm does not, so give
    # nginx the same (its best case) on both sides.
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream backend {{
        server unix:{sock};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            # dorm adds these three on every request; so does nginx here, for equal work.
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""


# -- the reference Python proxy ------------------------------------------------------------------
class _MinimalUpstream(asyncio.Protocol):
    """One pooled keep-alive connection to the backend; relays one response at a time."""

    def __init__(self, proxy: MinimalProxy) -> None:
        self.proxy = proxy
        self.parser = HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: _MinimalClient | None = None
        self.out: list[bytes] = []
        self.parts: list[bytes] = []
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        client = self.client
        if client is not None and self.out:
            client.write(b"".join(self.out))
        self.out.clear()
        if self.done:
            self.done = False
            self.client = None
            self.proxy.idle.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.proxy.idle:
            self.proxy.idle.remove(self)
        if self.client is not None:
            self.client.close()

    def on_message_begin(self) -> None:
        self.parts = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.parts.append(name + b": " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        self.out.append(b"HTTP/1.1 %d OK\r\n" % status + b"".join(self.parts) + b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.out.append(body)

    def on_message_complete(self) -> None:
        self.done = True


class _MinimalClient(asyncio.Protocol):
    """One client connection: parse a request head, forward it on a pooled upstream connection."""

    def __init__(self, proxy: MinimalProxy) -> None:
        self.proxy = proxy
        self.parser = HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.parts: list[bytes] = []
        self.peer = b"127.0.0.1"
        self.upstream: _MinimalUpstream | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = peer[0].encode()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except HttpParserError:
            self.close()

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.parts = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.parts.append(name + b": " + value + b"\r\n")
        if name.lower() == b"host":
            self.parts.append(b"X-Forwarded-Host: " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        # The same three X-Forwarded-* headers dorm and the nginx config add: equal work.
        head = b"".join(
            [
                self.parser.get_method(),
                b" ",
                self.url,
                b" HTTP/1.1\r\n",
                *self.parts,
                b"X-Forwarded-For: " + self.peer + b"\r\nX-Forwarded-Proto: http\r\n\r\n",
            ]
        )
        idle = self.proxy.idle
        if idle:
            up = idle.pop()
            up.client = self
            assert up.transport is not None
            up.transport.write(head)
        else:
            self.proxy.connect(self, head)


class MinimalProxy:
    """DESIGN.md's "minimal uvloop + httptools proxy", as a reference point; not dorm.

    It does only what this benchmark needs (GET, Content-Length responses, no timeouts, no
    routing, no limits): its cost is the least any Python proxy on uvloop + httptools pays.
    """

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.idle: list[_MinimalUpstream] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def connect(self, client: _MinimalClient, head: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self._connect(client, head))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _connect(self, client: _MinimalClient, head: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_unix_connection(
                lambda: _MinimalUpstream(self), self.socket_path
            )
        except OSError:
            client.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        up.client = client
        assert up.transport is not None
        up.transport.write(head)

    async def serve(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _MinimalClient(self), "127.0.0.1", port, backlog=4096
        )
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()


@dataclass(slots=True)
class Target:
    """One path wrk measures: its URL and the processes whose CPU we account."""

    name: str
    port: int
    proxy_pid: int | None  # None for the direct path: there is no proxy
    runs: list[Run] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


@dataclass(slots=True)
class Run:
    """One wrk run against one target, with the CPU the proxy and the backend spent on it."""

    wrk: WrkResult
    proxy_user: float | None
    proxy_sys: float | None
    backend_cpu: float
    other_cpu: float  # share of the machine's CPU used by processes not in this benchmark
    steal: float  # share of the machine's CPU the hypervisor gave to other guests

    @property
    def proxy_us(self) -> float | None:
        if self.proxy_user is None or self.proxy_sys is None:
            return None
        return (self.proxy_user + self.proxy_sys) / self.wrk.requests * 1e6

    @property
    def proxy_sys_share(self) -> float | None:
        if self.proxy_user is None or self.proxy_sys is None:
            return None
        total = self.proxy_user + self.proxy_sys
        return self.proxy_sys / total if total else None

    @property
    def backend_us(self) -> float:
        return self.backend_cpu / self.wrk.requests * 1e6


def _cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) in seconds; cpu_seconds() gives the sum, here we want the kernel share."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


# -- the setup -----------------------------------------------------------------------------------
class Bench:
    """Owns every process and file of one benchmark run; `close()` undoes all of it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        # Short: dorm's run_dir must leave room for "<instance id>/http.sock" in 108 bytes.
        self.tmp = Path(tempfile.mkdtemp(prefix="dorm-bench-", dir="/tmp"))
        self.tmp.chmod(0o755)  # nginx's worker may run as another user and must reach the socket
        self.sock = self.tmp / "backend.sock"
        self.pid_file = self.tmp / "backend.pid"
        self.gateway: subprocess.Popen[bytes] | None = None
        self.nginx: subprocess.Popen[bytes] | None = None
        self.minimal: subprocess.Popen[bytes] | None = None
        self.backend_pid: int | None = None
        self.nginx_worker: int | None = None
        self.ports = {"dorm": free_port(), "admin": free_port(), "nginx": free_port()}
        self.ports["minimal"] = free_port()
        self.ports["direct"] = free_port()
        self.pinning = "none"

    # -- dorm --------------------------------------------------------------------------------------
    def write_dorm_config(self) -> Path:
        cfg = self.tmp / "dorm.toml"
        backend = REPO / "bench" / "backend.py"
        cfg.write_text(
            "[gateway]\n"
            f'listen = "127.0.0.1:{self.ports["dorm"]}"\n'
            f'admin_listen = "127.0.0.1:{self.ports["admin"]}"\n'
            'domains = ["localhost"]\n'
            f'data_dir = "{self.tmp}/data"\n'
            f'run_dir = "{self.tmp}/run"\n'
            f'admin_token = "bench-{secrets.token_hex(16)}"\n'
            'isolation = "process"\n'
            "\n[apps.bench]\n"
            'runtime = "command"\n'
            f'command = ["{sys.executable}", "{backend}"]\n'
            'idle_timeout = "1h"\n'
            'isolation = "process"\n'
            f'env = {{ BENCH_SOCKET = "{self.sock}", BENCH_TCP_PORT = "{self.ports["direct"]}", '
            f'BENCH_PID_FILE = "{self.pid_file}" }}\n'
        )
        return cfg

    def start_dorm(self, wrap: Sequence[str] = (), timeout: float = START_TIMEOUT) -> None:
        """Start the gateway as `dorm serve --config` does, then wake the app with one request.
        `wrap` prefixes the command (bench/proxy_profile.py runs it under valgrind)."""
        cfg = self.write_dorm_config()
        log = open(self.tmp / "gateway.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.gateway = subprocess.Popen(
            [
                *wrap,
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
            env={**os.environ, "DORM_LOG_LEVEL": "WARNING"},
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.gateway.poll() is not None:
                raise RuntimeError(
                    f"dorm exited with {self.gateway.returncode}\n{self.tail('gateway.log')}"
                )
            try:
                check_response(self.ports["dorm"], timeout=timeout)
                break
            except (ConnectionRefusedError, ConnectionResetError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        wait_for(self.sock.exists, START_TIMEOUT, f"the backend's socket {self.sock}")
        wait_for(self.pid_file.exists, START_TIMEOUT, "the backend's pid file")
        self.backend_pid = int(self.pid_file.read_text())

    # -- nginx -------------------------------------------------------------------------------------
    def start_nginx(self) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        conf = self.tmp / "nginx.conf"
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(
            NGINX_CONF.format(tmp=self.tmp, sock=self.sock, port=self.ports["nginx"], user=user)
        )
        self.nginx = subprocess.Popen(
            [nginx, "-p", str(self.tmp), "-c", str(conf), "-e", str(self.tmp / "nginx-error.log")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.tmp / "nginx-stderr.log", "wb"),  # noqa: SIM115
            start_new_session=True,
        )

        def worker_up() -> bool:
            assert self.nginx is not None
            if self.nginx.poll() is not None:
                raise RuntimeError(
                    f"nginx exited with {self.nginx.returncode}\n"
                    + self.tail("nginx-stderr.log")
                    + self.tail("nginx-error.log")
                )
            kids = child_pids(self.nginx.pid)
            if kids:
                self.nginx_worker = kids[0]
            return bool(kids)

        wait_for(worker_up, START_TIMEOUT, "nginx's worker")
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                check_response(self.ports["nginx"], timeout=5)
                return
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # -- the minimal reference proxy ---------------------------------------------------------------
    def start_minimal(self, wrap: Sequence[str] = (), timeout: float = START_TIMEOUT) -> None:
        self.minimal = subprocess.Popen(
            [
                *wrap,
                sys.executable,
                "-m",
                "bench.proxy",
                "--serve-minimal",
                str(self.ports["minimal"]),
                str(self.sock),
            ],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.tmp / "minimal.log", "wb"),  # noqa: SIM115
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.minimal.poll() is not None:
                raise RuntimeError(f"the minimal proxy exited\n{self.tail('minimal.log')}")
            try:
                check_response(self.ports["minimal"], timeout=timeout)
                return
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # -- pinning -----------------------------------------------------------------------------------
    def apply_pinning(self, mode: str) -> set[int] | None:
        """Pin the proxies (and maybe the backend) away from wrk; returns wrk's CPU set.

        With two CPUs, wrk, the proxy and the backend share them; without pinning the scheduler
        moves them around and one run can differ from the next by whole percent. Modes:
        none; split (wrk on the first CPU, the proxy on the second, the backend floating);
        split3 (wrk on the first CPU, proxy and backend together on the second).

        The default is none: on the 2-vCPU VM this was written on, split made both Python
        proxies lose far more to nginx than unpinned runs did (the minimal proxy went from about
        1.0x to 0.7x nginx), i.e. pinning measured the scheduler, not the proxies; split3 was
        worse still. The ratios between paths, measured in the same rounds, are what we report.
        """
        cpus = sorted(os.sched_getaffinity(0))
        if mode == "none" or len(cpus) < 2:
            self.pinning = "none" if mode == "none" else "none (fewer than 2 CPUs)"
            return None
        wrk_cpu, proxy_cpu = {cpus[0]}, {cpus[1]}
        assert self.gateway and self.nginx_worker and self.minimal
        for pid in (self.gateway.pid, self.nginx_worker, self.minimal.pid):
            pin(pid, proxy_cpu)
        if mode == "split3":
            assert self.backend_pid is not None
            pin(self.backend_pid, proxy_cpu)
            self.pinning = (
                f"wrk on CPU {cpus[0]}; each proxy and the backend on CPU {cpus[1]} "
                "(taskset / sched_setaffinity)"
            )
        else:
            self.pinning = (
                f"wrk on CPU {cpus[0]}; each proxy on CPU {cpus[1]}; backend unpinned "
                "(taskset / sched_setaffinity)"
            )
        return wrk_cpu

    # -- measuring ---------------------------------------------------------------------------------
    def measure(self, target: Target, duration: float, wrk_cpus: set[int] | None) -> Run:
        assert self.backend_pid is not None
        pid = target.proxy_pid
        before = _cpu_split(pid) if pid else None
        backend_before = cpu_seconds(self.backend_pid)
        busy_before, steal_before = machine_cpu()
        wrk_before = children_cpu()
        started = time.monotonic()
        result = run_wrk(
            target.url,
            duration=duration,
            connections=self.args.connections,
            headers=[f"Host: {HOST}"],
            cpus=wrk_cpus,
        )
        elapsed = time.monotonic() - started
        backend_cpu = cpu_seconds(self.backend_pid) - backend_before
        busy_after, steal_after = machine_cpu()
        wrk_cpu = children_cpu() - wrk_before
        user: float | None = None
        sys_: float | None = None
        if pid and before:
            after = _cpu_split(pid)
            user, sys_ = after[0] - before[0], after[1] - before[1]
        self.check_alive()
        ours = (user or 0.0) + (sys_ or 0.0) + backend_cpu + wrk_cpu
        capacity = elapsed * len(os.sched_getaffinity(0))
        return Run(
            wrk=result,
            proxy_user=user,
            proxy_sys=sys_,
            backend_cpu=backend_cpu,
            other_cpu=max(0.0, (busy_after - busy_before - ours) / capacity),
            steal=(steal_after - steal_before) / capacity,
        )

    def check_alive(self) -> None:
        if self.gateway is not None and self.gateway.poll() is not None:
            raise RuntimeError(f"dorm died during the benchmark\n{self.tail('gateway.log')}")
        if self.nginx is not None and self.nginx.poll() is not None:
            raise RuntimeError(f"nginx died during the benchmark\n{self.tail('nginx-error.log')}")
        if self.minimal is not None and self.minimal.poll() is not None:
            raise RuntimeError(f"the minimal proxy died\n{self.tail('minimal.log')}")

    def tail(self, name: str, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.tmp / name).read_text(errors="replace").splitlines()[-lines:])
        return ""

    def close(self) -> None:
        """Stop everything we started, however we got here."""
        if self.nginx is not None:
            stop_process(self.nginx, signal.SIGTERM, grace=5)
        if self.minimal is not None:
            stop_process(self.minimal, signal.SIGTERM, grace=5)
        if self.gateway is not None:
            stop_process(self.gateway, signal.SIGTERM, grace=15)
        # dorm stops its instances on SIGTERM; if it could not, the backend (its own session)
        # is still ours to end.
        kill_pid(self.backend_pid)
        shutil.rmtree(self.tmp, ignore_errors=True)


def check_response(port: int, timeout: float) -> None:
    """One GET through `port`; raises unless it is the backend's 200 and body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Host": HOST})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200 or body != BODY:
        raise RuntimeError(f"port {port}: expected 200 {BODY!r}, got {resp.status} {body[:200]!r}")


# -- profiling -----------------------------------------------------------------------------------
Profile = tuple[collections.Counter[str], collections.Counter[str], int]


def find_py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def profile_dorm(
    py_spy: str, bench: Bench, target: Target, duration: float, wrk_cpus: set[int] | None
) -> Profile | str:
    """Sample dorm's event-loop thread with py-spy while wrk loads it.

    Runs after the measured rounds, so py-spy's overhead (it stops the process for every sample)
    never touches the reported numbers. Returns (self, inclusive, samples) per function and line,
    or a string saying why there is no profile.
    """
    assert bench.gateway is not None
    raw = bench.tmp / "profile.txt"
    spy = subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(bench.gateway.pid),
            "--duration",
            str(int(duration)),
            "--rate",
            "250",
            "--threads",
            "--format",
            "raw",
            "--output",
            str(raw),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        time.sleep(0.5)  # let py-spy attach before the load starts
        run_wrk(
            target.url,
            duration=duration,
            connections=bench.args.connections,
            headers=[f"Host: {HOST}"],
            cpus=wrk_cpus,
        )
        _, err = spy.communicate(timeout=duration + 30)
    except BaseException:
        stop_process(spy, signal.SIGINT, grace=5)
        raise
    if spy.returncode != 0 or not raw.exists():
        return f"py-spy failed ({spy.returncode}): {err.decode(errors='replace').strip()[-300:]}"
    return fold_profile(raw.read_text())


def _frame_key(frame: str) -> str:
    """'data_received (/work/x/gateway/proxy.py:251)' → 'data_received (gateway/proxy.py:251)'."""
    name, _, where = frame.partition(" (")
    path, _, line = where.rstrip(")").rpartition(":")
    if not path:
        return frame
    with contextlib.suppress(ValueError):
        path = str(Path(path).resolve().relative_to(REPO))
    if "/site-packages/" in path or "/lib/python" in path:
        path = path.split("/")[-1]
    return f"{name} ({path}:{line})"


def fold_profile(text: str) -> Profile:
    """Fold py-spy's raw stacks of the main (event-loop) thread into per-line sample counts.

    Self counts are by leaf line; inclusive counts by function. Only MainThread is kept: dorm's
    worker threads (SQLite, executors) sleep in C calls py-spy cannot always tell from work, and
    would otherwise look like half the profile.
    """
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        if frames and frames[0].startswith("thread "):
            if "MainThread" not in frames[0]:
                continue
            frames = frames[1:]
        if not frames:
            continue
        count = int(count_text)
        total += count
        keys = [_frame_key(f) for f in frames]
        own[keys[-1]] += count
        for func in {k.rsplit(":", 1)[0] for k in keys}:
            incl[func] += count
    return own, incl, total


def render_profile(prof: Profile | str | None, limit: int = 12) -> str:
    """Markdown for the docs' Profile subsection (also printed)."""
    if prof is None:
        return (
            "Not profiled: --profile no, or py-spy is not installed "
            "(`.venv/bin/pip install py-spy`)."
        )
    if isinstance(prof, str):
        return f"Not profiled: {prof}"
    own, incl, total = prof
    if not total:
        return "Not profiled: py-spy collected no samples."
    lines = [
        f"py-spy, 250 Hz, {total} samples of dorm's event-loop thread under the same wrk load "
        "(after the measured rounds). Self time by line: time in C (uvloop, httptools, the "
        "kernel) is charged to the Python line that called into it, so `transport.write` lines "
        "stand for the send syscalls and `Runner.run` for uvloop's own loop (epoll, reads, "
        "callback dispatch). py-spy stops the process to sample it, which over-weights lines "
        "that sit in syscalls; the Python-only share is larger than it looks here.",
        "",
        "| line | self | function inclusive |",
        "|---|---:|---:|",
    ]
    for key, count in own.most_common(limit):
        func = key.rsplit(":", 1)[0]
        lines.append(f"| `{key}` | {count / total:.1%} | {incl[func] / total:.1%} |")
    return "\n".join(lines)


# -- in-process cost (no syscalls) ----------------------------------------------------------------
_REQ = b"GET / HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n\r\n"  # what wrk sends
_RESP = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (
    len(BODY),
    BODY,
)


class _NullTransport:
    """Swallows writes: what is left of a request's cost is the proxy's own Python."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default


def _time_loop(loop: Callable[[int], None], batches: int = 40, n: int = 10_000) -> float:
    """Best CPU µs per request over many short batches: robust to other load on the machine."""
    loop(1000)
    best = float("inf")
    for _ in range(batches):
        t = time.process_time()
        loop(n)
        best = min(best, (time.process_time() - t) / n * 1e6)
    return best


def _minimal_loop() -> Callable[[int], None]:
    proxy = MinimalProxy("unused")
    client, up = _MinimalClient(proxy), _MinimalUpstream(proxy)
    client.connection_made(_NullTransport())  # type: ignore[arg-type]
    up.connection_made(_NullTransport())  # type: ignore[arg-type]
    proxy.idle.append(up)
    c, u = client.data_received, up.data_received

    def loop(n: int) -> None:
        for _ in range(n):
            c(_REQ)
            u(_RESP)

    return loop


def _dorm_loop() -> Callable[[int], None]:
    """dorm's DataPlane with a READY instance and one pooled upstream, on null transports.

    Reaches into gateway internals (Instance, State, DataPlane, UpstreamConnection), which
    change; callers treat any exception as "not measurable with this version of the gateway".
    """
    from gateway.appspec import BranchSpec, parse_app_spec
    from gateway.config import GatewayConfig
    from gateway.instance import Instance, State
    from gateway.instances import InstanceManager
    from gateway.proxy import DataPlane
    from gateway.upstream import UpstreamConnection

    # A real manager (the classes are native when compiled: no stand-in passes for one); it
    # starts nothing until start(), and its registry is only asked for runtimes.
    no_registry = type("NoRegistry", (), {"runtimes": {}})()
    manager = InstanceManager(GatewayConfig(), no_registry)
    app = parse_app_spec("bench", {"command": ["true"]})
    inst = Instance(manager, app, BranchSpec(app="bench", name="main"))
    inst.state = State.READY
    manager.instances[("bench", "main")] = inst  # what every Host routes to
    up = UpstreamConnection(inst)
    up_t, client_t = _NullTransport(), _NullTransport()
    up.connection_made(up_t)  # type: ignore[arg-type]
    inst.idle.append(up)
    inst.connections = 1
    plane = DataPlane(GatewayConfig(), manager)
    client = plane.protocol()
    client.connection_made(client_t)  # type: ignore[arg-type]
    c, u = client.data_received, up.data_received

    def loop(n: int) -> None:
        for _ in range(n):
            c(_REQ)
            u(_RESP)

    loop(10)
    if client_t.writes != 10 or up_t.writes != 10:
        raise RuntimeError(f"{client_t.writes} responses and {up_t.writes} requests for 10")
    return loop


def inprocess_costs() -> tuple[float | None, float, str]:
    """(dorm µs/request or None, minimal µs/request, note) with syscalls and the loop removed."""
    minimal = _time_loop(_minimal_loop())
    try:
        dorm = _time_loop(_dorm_loop())
    except Exception as exc:  # the gateway's internals moved: report, do not fail the bench
        return None, minimal, f"{type(exc).__name__}: {exc}"
    return dorm, minimal, ""


def render_inprocess(costs: tuple[float | None, float, str]) -> str:
    dorm, minimal, note = costs
    head = (
        "In-process cost of one request, Python and httptools only (no syscalls, no event "
        "loop: both proxies' protocol objects driven with null transports, best of 40 "
        "batches of CPU time, so other load barely moves it): "
    )
    if dorm is None:
        return head + f"minimal {minimal:.2f} µs; dorm not measurable ({note})."
    if dorm >= minimal:
        return (
            head + f"dorm {dorm:.2f} µs, minimal {minimal:.2f} µs: dorm's own per-request work "
            f"is {dorm - minimal:.2f} µs of Python before any syscall."
        )
    return (
        head + f"dorm {dorm:.2f} µs, minimal {minimal:.2f} µs: before any syscall dorm's "
        f"request costs {minimal - dorm:.2f} µs less than the minimal proxy's (its plain-head "
        "checks in C replace the per-header callbacks"
        + (", and its relay is compiled)." if compiled.is_compiled("gateway.proxy") else ").")
    )


# Instruction counts from earlier versions of the data plane (python -m bench.proxy_profile at
# the commit named), kept here so the rewritten section still shows where the number came from.
CALLGRIND_HISTORY = (
    "Before the plain-head fast path (at 864b097: per-header httptools callbacks on every "
    "request, two regex scans per response head) dorm took 60.3k instructions per request and "
    "the minimal proxy 29.5k; the fast path for plain request heads, one scan per response head "
    "and a leaner attach/response_done (60a0277, 57f364f and the commit after) brought dorm to "
    "40.3k, and reading the clock once in acquire/release (cfb1248) to 38.4k. Classifying plain "
    "request and response heads in one C call each (gateway/_heads.c: strict validation, Host, "
    "Content-Length and the forwarded head in one pass, instead of two regex scans and two "
    "llhttp runs) with both fast paths inlined into data_received (e8d6c5c and the commits "
    "after) brought it to 16.4k (17.2k before __slots__ on Instance); the clock read twice a "
    "request instead of four times (02966de) and the pooled connection checked out without the "
    "acquire -> attach call (b3eb6d6) to 15.0k, and compiling the relay and the instance "
    "bookkeeping with mypyc (f354074, d51b64d, then gateway/instance.py: native classes, no "
    "bytecode per request; setup.py) to the count above (16.3k when the same code runs "
    "interpreted, DORM_INTERPRETED=1). Counted over the whole gateway process under wrk "
    "instead (`python -m bench.proxy_profile --live`: uvloop, libuv and the transports too, "
    "user space only), the last two of those steps took it from 21.05k to 19.58k instructions "
    "per request and the mypyc build from 19.7k to 10.4k."
)


def callgrind_costs() -> tuple[float, float] | None:
    """(dorm, minimal) instructions per request from bench.proxy_profile; None without valgrind."""
    if shutil.which("valgrind") is None:
        return None
    from bench.proxy_profile import per_request

    with tempfile.TemporaryDirectory(prefix="dorm-callgrind-") as tmp:
        try:
            dorm, _ = per_request("dorm", Path(tmp))
            minimal, _ = per_request("minimal", Path(tmp))
        except (subprocess.CalledProcessError, RuntimeError) as exc:
            print(f"bench.proxy: callgrind failed: {exc}", file=sys.stderr)
            return None
    return dorm, minimal


def render_callgrind(counted: tuple[float, float] | None) -> str:
    head = (
        "Instructions per request under valgrind's callgrind, the same in-process harness "
        "(`python -m bench.proxy_profile`: N and 2N requests, the difference over N; "
        "repeatable to a few hundred instructions where CPU time on this shared VM moves by "
        "tens of percent): "
    )
    if counted is None:
        return head + "not measured (valgrind is not installed). " + CALLGRIND_HISTORY
    dorm, minimal = counted
    return (
        head + f"dorm {dorm / 1000:.1f}k, minimal {minimal / 1000:.1f}k "
        f"({dorm / minimal:.2f}x). " + CALLGRIND_HISTORY
    )


# -- reporting -----------------------------------------------------------------------------------
def fmt_ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.2f} ms"


def fmt_us(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


Summary = dict[str, dict[str, float | None]]


def summarize(targets: dict[str, Target]) -> Summary:
    """Medians across rounds, per target."""
    out: Summary = {}
    for name, t in targets.items():
        proxy = [r.proxy_us for r in t.runs if r.proxy_us is not None]
        share = [r.proxy_sys_share for r in t.runs if r.proxy_sys_share is not None]
        out[name] = {
            "rps": median(r.wrk.rps for r in t.runs),
            "rps_min": min(r.wrk.rps for r in t.runs),
            "rps_max": max(r.wrk.rps for r in t.runs),
            "p50": median(r.wrk.p50 for r in t.runs),
            "p99": median(r.wrk.p99 for r in t.runs),
            "proxy_us": median(proxy) if proxy else None,
            "sys_share": median(share) if share else None,
            "backend_us": median(r.backend_us for r in t.runs),
            "errors": sum(r.wrk.errors + r.wrk.non_2xx for r in t.runs),
            "other": median(r.other_cpu for r in t.runs),
            "other_max": max(r.other_cpu for r in t.runs),
            "steal": median(r.steal for r in t.runs),
        }
    return out


def paired_ratios(targets: dict[str, Target], a: str, b: str, metric: str = "rps") -> list[float]:
    """Round-by-round ratio a/b of one wrk figure (req/s, p99): each pair ran in the same round,
    so drift of the machine mostly cancels."""
    return [
        getattr(x.wrk, metric) / getattr(y.wrk, metric)
        for x, y in zip(targets[a].runs, targets[b].runs, strict=True)
    ]


def median_interval(
    values: list[float], level: float = 0.95, draws: int = 4000
) -> tuple[float, float]:
    """A bootstrap interval for the median of `values` (seeded: the same data, the same
    interval), to say how far the round-by-round ratios pin the ratio down."""
    rng = random.Random(0)
    n = len(values)
    medians = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(draws))
    tail = (1 - level) / 2
    return medians[int(tail * draws)], medians[min(draws - 1, int((1 - tail) * draws))]


def _ratio(a: float | None, b: float | None, spec: str = ".2f") -> str:
    return "—" if a is None or b is None or not b else f"{a / b:{spec}}x"


def render_table(s: Summary) -> str:
    rows = [
        "| path | req/s (median) | req/s (min-max) | p50 | p99 | proxy CPU µs/req "
        "(kernel share) | backend CPU µs/req | errors | other load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in TARGETS:
        m = s[name]
        share = m["sys_share"]
        cpu = fmt_us(m["proxy_us"]) + ("" if share is None else f" ({share:.0%})")
        rows.append(
            f"| {name} | {m['rps'] or 0:,.0f} | {m['rps_min'] or 0:,.0f}-{m['rps_max'] or 0:,.0f} "
            f"| {fmt_ms(m['p50'])} | {fmt_ms(m['p99'])} | {cpu} "
            f"| {fmt_us(m['backend_us'])} | {m['errors'] or 0:.0f} | {m['other'] or 0:.1%} |"
        )
    for a, b, bold in (
        ("dorm", "nginx", True),
        ("minimal", "nginx", False),
        ("dorm", "direct", False),
    ):
        x, y = s[a], s[b]
        cells = [
            _ratio(x["rps"], y["rps"], ".3f"),
            "",
            _ratio(x["p50"], y["p50"]),
            _ratio(x["p99"], y["p99"]),
            _ratio(x["proxy_us"], y["proxy_us"]),
            _ratio(x["backend_us"], y["backend_us"]),
            "",
            "",
        ]
        if bold:
            cells = [f"**{c}**" if c and i in (0, 3) else c for i, c in enumerate(cells)]
        label = f"**{a} / {b}**" if bold else f"{a} / {b}"
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def reading(
    s: Summary, pairs: list[float], p99_pairs: list[float], rounds: int, quick: bool
) -> str:
    """A paragraph that says what the numbers mean, generated from the numbers themselves.

    The verdict compares the medians across rounds, as the table shows them; the round-by-round
    ratios and their bootstrap intervals say how firmly this run pins each comparison down (a
    p99 on this shared VM moves by tens of percent from one 5 s run to the next)."""
    d, n, m, x = s["dorm"], s["nginx"], s["minimal"], s["direct"]
    assert d["rps"] and n["rps"] and m["rps"] and x["rps"] and d["p99"] and n["p99"]
    ratio = d["rps"] / n["rps"]
    p99_ok = d["p99"] <= n["p99"]
    met = ratio >= 1.0 and p99_ok
    low, high = median_interval(pairs)
    p99_low, p99_high = median_interval(p99_pairs)
    p99_wins = sum(r <= 1.0 for r in p99_pairs)
    text = (
        f"dorm served {ratio:.3f}x nginx's requests per second (round-by-round "
        f"{min(pairs):.3f}-{max(pairs):.3f}x over {rounds} rounds, median "
        f"{median(pairs):.3f}x, 95% bootstrap interval {low:.3f}-{high:.3f}x) with a p99 of "
        f"{fmt_ms(d['p99'])} against nginx's {fmt_ms(n['p99'])} (round-by-round p99 ratio "
        f"{min(p99_pairs):.2f}-{max(p99_pairs):.2f}x, median {median(p99_pairs):.3f}x, 95% "
        f"bootstrap interval {p99_low:.3f}-{p99_high:.3f}x; dorm's p99 no higher in {p99_wins} "
        f"of {rounds} rounds), so the issue's target (≥ 1.0x nginx's req/s, p99 no worse, "
        f"medians across rounds) is **{'met' if met else 'not met'}**"
    )
    if not met:
        why = []
        if ratio < 1.0:
            why.append(f"throughput {1 - ratio:.1%} short")
        if not p99_ok:
            why.append(f"p99 {d['p99'] / n['p99'] - 1:.1%} worse")
        text += " (" + ", ".join(why) + ")"
    parts = [text + "."]
    if d["proxy_us"] and n["proxy_us"] and m["proxy_us"]:
        parts.append(
            f"Per request dorm's gateway process spent {d['proxy_us']:.1f} µs of CPU "
            f"({d['sys_share']:.0%} in the kernel), nginx's worker {n['proxy_us']:.1f} µs "
            f"({n['sys_share']:.0%} kernel) and the minimal Python proxy {m['proxy_us']:.1f} µs "
            f"({m['sys_share']:.0%} kernel): dorm {d['proxy_us'] - n['proxy_us']:+.1f} µs and "
            f"the minimal proxy {m['proxy_us'] - n['proxy_us']:+.1f} µs against nginx, dorm "
            f"{d['proxy_us'] - m['proxy_us']:+.1f} µs against the minimal proxy (dorm's routing, "
            "deadlines, pooling and accounting, less what its plain-head checks in C save over "
            "the minimal proxy's per-header callbacks)."
        )
    parts.append(
        f"The minimal proxy reached {m['rps'] / n['rps']:.3f}x nginx in the same run: what a "
        "Python proxy on uvloop + httptools with per-header callbacks reaches on this machine."
    )
    if d["backend_us"] and n["backend_us"]:
        parts.append(
            f"The backend spent {d['backend_us']:.1f} µs per request behind dorm and "
            f"{n['backend_us']:.1f} µs behind nginx."
        )
    parts.append(
        f"The backend alone (direct, TCP) did {x['rps']:,.0f} req/s; with two CPUs shared by "
        "wrk, the proxy and the backend, throughput is bounded by the sum of their CPU per "
        "request, so every µs the proxy saves shows up in req/s."
    )
    other = max(float(v["other_max"] or 0) for v in s.values())
    steal = max(float(v["steal"] or 0) for v in s.values())
    if other > 0.05 or steal > 0.05:
        parts.append(
            f"Caution: other processes used up to {other:.0%} of the machine's CPU during a run "
            f"(median steal by the hypervisor up to {steal:.0%}); the machine was not quiet, "
            "so absolute numbers are low and noisy, and only the interleaved ratios are fair."
        )
    if quick:
        parts.append("This was a --quick run: short rounds; read the ratios loosely.")
    return " ".join(parts)


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.proxy", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 rounds of 3 s (default 30 x 5 s)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 30; --quick 3)")
    p.add_argument("--duration", type=float, help="seconds per wrk run (default 5; --quick 3)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    p.add_argument(
        "--pin",
        choices=("none", "split", "split3"),
        default="none",
        help="CPU pinning: none (default), split (wrk on CPU 0, proxies on CPU 1, backend "
        "floating) or split3 (backend on CPU 1 too); see Bench.apply_pinning",
    )
    p.add_argument(
        "--profile",
        choices=("auto", "yes", "no"),
        default="auto",
        help="profile dorm with py-spy after the rounds (auto: if py-spy is installed)",
    )
    p.add_argument("--no-write", action="store_true", help="print only; leave the docs alone")
    args = p.parse_args(argv)
    # Many short rounds rather than few long ones: on a shared 2-vCPU VM the host's share drifts
    # by ±10% over minutes, and 7 rounds of 10 s gave medians of paired ratios from 0.97x to
    # 1.14x between whole runs; 15 interleaved pairs 5 s apart follow the drift more closely.
    # 30: two 15-round runs of the same compiled relay gave 1.104x (p99 0.90x) and 0.988x (p99
    # 1.01x), too coarse for a target at parity; twice the rounds narrow the medians' intervals.
    args.rounds = args.rounds or (3 if args.quick else 30)
    args.duration = args.duration or (3.0 if args.quick else 5.0)
    if args.rounds < 1 or args.duration < 1 or args.connections < 1:
        p.error("--rounds, --duration and --connections must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-minimal"]:  # internal: the reference proxy's own process
        import uvloop

        uvloop.run(MinimalProxy(argv[2]).serve(int(argv[1])))
        return 0
    args = parse_args(argv)
    missing = [t for t in ("wrk", "taskset") if shutil.which(t) is None]
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        missing.append("nginx")
    if missing:
        print(
            f"bench.proxy: {', '.join(missing)} not found; run bash bench/install-baselines.sh",
            file=sys.stderr,
        )
        return 1
    py_spy = find_py_spy() if args.profile != "no" else None
    if args.profile == "yes" and py_spy is None:
        print("bench.proxy: --profile yes but py-spy is not installed", file=sys.stderr)
        return 1
    cmd = command_line()
    bench = Bench(args)
    with sigterm_as_interrupt():
        try:
            return run(bench, args, cmd, py_spy)
        except KeyboardInterrupt:
            print("\nbench.proxy: interrupted", file=sys.stderr)
            return 130
        finally:
            bench.close()


def run(bench: Bench, args: argparse.Namespace, cmd: str, py_spy: str | None) -> int:
    started = now_utc()
    revision = git_revision()
    print(f"bench.proxy: setting up in {bench.tmp}", file=sys.stderr)
    bench.start_dorm()
    bench.start_nginx()
    bench.start_minimal()
    check_response(bench.ports["direct"], timeout=5)
    assert bench.gateway is not None and bench.minimal is not None
    wrk_cpus = bench.apply_pinning(args.pin)
    targets = {
        "dorm": Target("dorm", bench.ports["dorm"], bench.gateway.pid),
        "nginx": Target("nginx", bench.ports["nginx"], bench.nginx_worker),
        "minimal": Target("minimal", bench.ports["minimal"], bench.minimal.pid),
        "direct": Target("direct", bench.ports["direct"], None),
    }
    print(f"bench.proxy: pinning: {bench.pinning}", file=sys.stderr)
    for t in targets.values():  # fill pools and caches; not recorded
        bench.measure(t, WARMUP_SECONDS, wrk_cpus)
    order = list(TARGETS)
    repeated = 0
    for rnd in range(args.rounds):
        for name in order:
            result = bench.measure(targets[name], args.duration, wrk_cpus)
            for _ in range(MAX_REPEATS):
                if result.other_cpu <= DISTURBED:
                    break
                # Other processes (tests, other benchmarks) took CPU in this run: on a 2-CPU
                # machine that alone moves req/s by tens of percent, so measure it again.
                repeated += 1
                print(
                    f"round {rnd + 1}/{args.rounds} {name:7} disturbed: {result.other_cpu:.0%} "
                    "of the machine's CPU went to other processes; repeating",
                    file=sys.stderr,
                )
                result = bench.measure(targets[name], args.duration, wrk_cpus)
            targets[name].runs.append(result)
            w = result.wrk
            print(
                f"round {rnd + 1}/{args.rounds} {name:7} {w.rps:10,.0f} req/s  "
                f"p50 {fmt_ms(w.p50)}  p99 {fmt_ms(w.p99)}  "
                f"proxy {fmt_us(result.proxy_us)} µs/req  backend {result.backend_us:.1f} µs/req"
                + (f"  ERRORS {w.errors} non-2xx {w.non_2xx}" if w.errors or w.non_2xx else ""),
                file=sys.stderr,
            )
        order = order[1:] + order[:1]
    costs = inprocess_costs()
    print("bench.proxy: counting instructions per request with callgrind", file=sys.stderr)
    counted = callgrind_costs()
    prof: Profile | str | None = None
    if py_spy is not None and compiled.is_compiled("gateway.proxy"):
        prof = (
            "dorm's relay is compiled by mypyc (setup.py), and py-spy sees no Python frames in "
            "it; `python -m bench.proxy_profile --live --annotate` shows where its instructions go."
        )
    elif py_spy is not None:
        print("bench.proxy: profiling dorm with py-spy", file=sys.stderr)
        prof = profile_dorm(py_spy, bench, targets["dorm"], args.duration, wrk_cpus)
    bench.check_alive()

    s = summarize(targets)
    table = render_table(s)
    para = reading(
        s,
        paired_ratios(targets, "dorm", "nginx"),
        paired_ratios(targets, "dorm", "nginx", "p99"),
        args.rounds,
        args.quick,
    )
    prof_md = (
        render_inprocess(costs) + "\n\n" + render_callgrind(counted) + "\n\n" + render_profile(prof)
    )
    print(f"\n{table}\n\n{para}\n\n{prof_md}")
    if not args.no_write:
        section = render_section(
            started,
            revision,
            machine_info(),
            cmd,
            args,
            bench.pinning,
            repeated,
            table,
            para,
            prof_md,
        )
        write_section(SECTION, section)
        print(f"\nbench.proxy: wrote '## {SECTION}' in docs/benchmarks.md", file=sys.stderr)
    errors = sum(int(m["errors"] or 0) for m in s.values())
    if errors:
        print(f"bench.proxy: {errors} wrk socket errors or non-2xx responses", file=sys.stderr)
    return 0


def render_section(
    started: str,
    revision: str,
    info: dict[str, str],
    cmd: str,
    args: argparse.Namespace,
    pinning: str,
    repeated: int,
    table: str,
    para: str,
    prof_md: str,
) -> str:
    return f"""## {SECTION}

wrk through dorm, through nginx and through a minimal Python proxy, and to the backend directly.
One backend process (`bench/backend.py`: uvloop + httptools, 13-byte body) serves all four paths:
the proxies reach it over Unix sockets with pooled keep-alive connections, the direct path over
TCP loopback. Interleaved rounds (the order rotates each round); medians across rounds.

- **Date:** {started}; dorm at commit {revision}
- **Machine:** {info["cpus"]} CPUs ({info["cpu_model"]}), kernel {info["kernel"]}
- **Software:** Python {info["python"]}, uvloop {info["uvloop"]}, httptools {info["httptools"]},
  nginx {info["nginx"]}, wrk {info["wrk"]}; dorm's {info["relay"]}
- **Command:** `make bench-proxy`, i.e. `{cmd}`
- **Load:** `wrk -t1 -c{args.connections} -d{args.duration:g}s --latency -H "Host: {HOST}"`;
  {args.rounds} rounds x {len(TARGETS)} paths after an unrecorded {WARMUP_SECONDS:g} s warm-up
  of each; a run during which other processes took over {DISTURBED:.0%} of the CPU is repeated
  (at most {MAX_REPEATS} times): {repeated} run(s) were repeated here
- **Pinning:** {pinning}
- **nginx:** 1 worker, `access_log off`, upstream `server unix:…; keepalive 64`,
  `proxy_http_version 1.1`, `Connection ""`, Host passed through, X-Forwarded-For/-Host/-Proto
  set as dorm sets them, `keepalive_requests` raised on both sides (dorm has no such limit)
- **minimal:** `MinimalProxy` in `bench/proxy.py`, the ~80-line uvloop + httptools proxy
  DESIGN.md measured at 1.04x nginx: no routing, timeouts or limits, httptools callbacks
- **CPU/request:** utime+stime of dorm's gateway process, nginx's worker or the minimal proxy
  (`/proc/<pid>/stat`) over a run, divided by the requests wrk completed in it
- **Other load:** the machine's busy CPU (`/proc/stat`) during a run minus what the proxy, the
  backend and wrk used, as a share of all CPUs (median per path): work by other processes

{table}

{para}

### Profile

{prof_md}
"""


if __name__ == "__main__":
    sys.exit(main())
