"""Code runner benchmark: end-to-end latency and throughput of `POST /api/v2/execute`.

Starts a real `dorm serve` (sandboxed, as root) on free loopback ports and sends Piston requests
through the public listener (`Host: run.localhost`), as a client would: Python `print(1)`
sequentially and at concurrency 2/8/32 (one keep-alive connection per client thread), a bash and a
C example, and Python in both modes (zygote: forked from a pre-imported interpreter; fresh: a new
interpreter exec'd). Per-client limits are switched off so the only bounds are the runner's own
(executions at once = CPUs x 2, the rest queue). The client threads share the machine with the
gateway, so on 2 CPUs the numbers include their cost.

    python -m bench.runner [--quick]      # writes the "Runner" section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    command_line,
    free_port,
    git_revision,
    machine_info,
    now_utc,
    percentile,
    stop_process,
    wait_for,
    write_section,
)

HOST = "run.localhost"
PY = {"language": "python", "version": "*", "files": [{"content": "print(1)"}]}
BASH = {"language": "bash", "version": "*", "files": [{"content": "echo 1"}]}
C = {
    "language": "c",
    "version": "*",
    "files": [{"name": "main.c", "content": '#include <stdio.h>\nint main(){puts("1");}\n'}],
}


class Gateway:
    """A throw-away gateway with the runner configured for benchmarking."""

    def __init__(self, python_mode: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dorm-bench-runner-"))
        self.port, self.admin_port = free_port(), free_port()
        run_dir = tempfile.mkdtemp(prefix="dorm-br-", dir="/tmp")
        self.run_dir = run_dir
        (self.dir / "dorm.toml").write_text(
            f"""[gateway]
listen = "127.0.0.1:{self.port}"
admin_listen = "127.0.0.1:{self.admin_port}"
domains = ["localhost"]
data_dir = "{self.dir / "data"}"
run_dir = "{run_dir}"
admin_token = "bench-{os.urandom(8).hex()}"
isolation = "auto"
cgroup_parent = "dorm-bench-{os.urandom(3).hex()}"

[runner]
rate_per_minute = 0
max_per_client = 0
queue = 1000
python_mode = "{python_mode}"
"""
        )
        self.log = open(self.dir / "gateway.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(self.dir / "dorm.toml")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "DORM_LOG_LEVEL": "WARNING"},
        )
        wait_for(lambda: self._up(), 30, "the gateway to listen")
        execute(self.port, PY, timeout=60)  # wakes the runner service

    def _up(self) -> bool:
        try:
            http.client.HTTPConnection("127.0.0.1", self.port, timeout=1).connect()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def execute(
    port: int, body: dict[str, Any], conn: http.client.HTTPConnection | None = None, timeout=30.0
) -> dict[str, Any]:
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(
            "POST",
            "/api/v2/execute",
            body=json.dumps(body),
            headers={"Host": HOST, "Content-Type": "application/json"},
        )
        resp = c.getresponse()
        data = json.loads(resp.read())
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data}")
        return data
    finally:
        if own:
            c.close()


def measure(port: int, body: dict[str, Any], clients: int, total: int) -> dict[str, float]:
    """`total` executions spread over `clients` threads; latency percentiles and executions/s."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    per_client = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]

    def worker(count: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            for _ in range(count):
                t0 = time.perf_counter()
                result = execute(port, body, conn)
                dt = time.perf_counter() - t0
                out = result["run"]
                with lock:
                    if out["stdout"] != "1\n" or out["code"] != 0:
                        errors.append(json.dumps(out)[:200])
                    latencies.append(dt)
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in per_client]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} wrong results, e.g. {errors[0]}")
    return {
        "p50": percentile(latencies, 50) * 1000,
        "p99": percentile(latencies, 99) * 1000,
        "rate": len(latencies) / elapsed,
        "n": len(latencies),
    }


def run(quick: bool) -> str:
    scale = 0.25 if quick else 1.0

    def n(x: int) -> int:
        return max(8, int(x * scale))

    rows: list[tuple[str, str, dict[str, float]]] = []

    def row(what: str, conc: str, fn: Callable[[], dict[str, float]]) -> None:
        res = fn()
        rows.append((what, conc, res))
        print(
            f"{what:28} {conc:>4}  p50 {res['p50']:7.2f} ms  p99 {res['p99']:7.2f} ms  "
            f"{res['rate']:7.1f}/s  (n={res['n']:.0f})",
            flush=True,
        )

    gw = Gateway("zygote")
    try:
        measure(gw.port, PY, 1, n(40))  # warm-up
        row("python print(1), zygote", "1", lambda: measure(gw.port, PY, 1, n(300)))
        for clients in (2, 8, 32):
            row(
                "python print(1), zygote",
                str(clients),
                lambda c=clients: measure(gw.port, PY, c, n(150 * c if c < 8 else 800)),
            )
        row("bash echo 1", "1", lambda: measure(gw.port, BASH, 1, n(200)))
        row("bash echo 1", "8", lambda: measure(gw.port, BASH, 8, n(600)))
        row("c hello (compile + run)", "1", lambda: measure(gw.port, C, 1, n(30)))
    finally:
        gw.stop()
    gw = Gateway("fresh")
    try:
        measure(gw.port, PY, 1, n(20))
        row("python print(1), fresh", "1", lambda: measure(gw.port, PY, 1, n(100)))
        row("python print(1), fresh", "8", lambda: measure(gw.port, PY, 8, n(300)))
    finally:
        gw.stop()
    info = machine_info()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        "## Runner",
        "",
        f"Command: `{command_line()}` ({now_utc()}, {git_revision(['runtimes', 'gateway'])})",
        "",
        f"Machine: {info['cpu_model']} x {info['cpus']}, Linux {info['kernel']}, "
        f"Python {info['python']}; load average at end {load} (a shared machine: other "
        "benchmarks and test suites ran at the same time).",
        "",
        "End to end through the gateway's public listener (`Host: run.localhost`, keep-alive), "
        "one fresh sandbox per execution (per stage for C), default limits, per-client limits "
        "off; executions at once = CPUs x 2, the rest queue in the runner. Client threads run on "
        "the same machine.",
        "",
        "| workload | clients | p50 ms | p99 ms | executions/s | n |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for what, conc, res in rows:
        lines.append(
            f"| {what} | {conc} | {res['p50']:.2f} | {res['p99']:.2f} | {res['rate']:.1f} | "
            f"{res['n']:.0f} |"
        )
    lines += [
        "",
        "Targets: Python p50 ≤ 10 ms, ≥ 150 executions/s. For scale on this machine: isolate "
        "alone takes 4.4 ms to run `/bin/true`, a fresh `python3 -c pass` 13 ms.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer executions (a smoke run)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench.runner: needs root (the runner confines every execution)", file=sys.stderr)
        return 1
    body = run(args.quick)
    print(body)
    if not args.no_write:
        write_section("Runner", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
