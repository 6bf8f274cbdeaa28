"""Instructions per request through the proxy's Python, counted by valgrind's callgrind.

    python -m bench.proxy_profile [--target dorm|minimal|both] [--annotate] [--live]

Wall-clock and CPU timings on a shared, loaded VM move by tens of percent from run to run (steal
time counts as CPU), so per-request work is measured in instructions instead: the in-process
harness of bench/proxy.py (`_dorm_loop` / `_minimal_loop`: the protocol objects driven with null
transports, no syscalls, no event loop) runs N and 2N requests under `valgrind --tool=callgrind`,
and the difference divided by N is the cost of one request, free of start-up and import costs.
Start-up objects are frozen out of the garbage collector's view first (a full collection that
falls in one run and not the other would otherwise move the result by thousands), so the count
repeats to within about a hundred instructions and a change of a few hundred per request shows.

With --live, the whole proxy process runs under callgrind instead, with real sockets and its real
event loop (uvloop, libuv, the transports): the benchmark's backend serves natively, the counters
are zeroed after a warm-up, wrk drives the proxy for a few seconds over loopback, and the
user-space instructions of the proxy process are divided by the requests wrk completed. That
counts what the in-process harness leaves out (epoll dispatch, transport writes, timers), but not
the kernel's share. Under valgrind the proxy is the bottleneck, so more events arrive per loop
iteration than in a real run: compare variants with it, not with nginx.

With --annotate, `callgrind_annotate` of the 2N run (or the live run) is printed (inclusive costs,
top functions), to see where the instructions go. Needs valgrind on PATH; nothing leaves the
process (--live: nor the machine: wrk and the backend run on loopback and a Unix socket).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

N = 2000


def _child(target: str, n: int) -> None:
    """Run `n` requests of `target` once (called inside valgrind)."""
    from bench.proxy import _dorm_loop, _minimal_loop

    loop = _dorm_loop() if target == "dorm" else _minimal_loop()
    # Everything allocated so far (imports, the harness) leaves the collector's view: otherwise
    # a full collection that happens to fall in one run and not the other moves the difference
    # by thousands of instructions per request. Young-generation collections still count.
    gc.collect()
    gc.freeze()
    loop(n)


def count(target: str, n: int, out: Path) -> int:
    """Total instructions (Ir) of one process that runs `n` requests of `target`."""
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-m",
            "bench.proxy_profile",
            "--child",
            target,
            str(n),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    for line in out.read_text().splitlines():
        if line.startswith("summary:") or line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no instruction total in {out}")


def per_request(target: str, tmp: Path) -> tuple[float, Path]:
    a = count(target, N, tmp / f"{target}-{N}.out")
    b_out = tmp / f"{target}-{2 * N}.out"
    b = count(target, 2 * N, b_out)
    return (b - a) / N, b_out


LIVE_SECONDS = 8.0
LIVE_CONNECTIONS = 16
VALGRIND_START = 240.0  # imports under valgrind take tens of seconds


def live(target: str, tmp: Path) -> tuple[float, Path]:
    """Instructions per request of the whole `target` proxy process under real load."""
    from bench.common import run_wrk
    from bench.proxy import HOST, Bench

    out = tmp / f"{target}-live"
    wrap = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        "--dump-instr=no",
    ]
    bench = Bench(argparse.Namespace(connections=LIVE_CONNECTIONS))
    try:
        if target == "dorm":
            bench.start_dorm(wrap=wrap, timeout=VALGRIND_START)
            proc = bench.gateway
        else:
            bench.start_dorm()  # the backend is dorm's app; the minimal proxy reaches it too
            bench.start_minimal(wrap=wrap, timeout=VALGRIND_START)
            proc = bench.minimal
        assert proc is not None
        url = f"http://127.0.0.1:{bench.ports[target]}/"
        run_wrk(url, duration=2, connections=LIVE_CONNECTIONS, headers=[f"Host: {HOST}"])
        control = ["callgrind_control"]
        subprocess.run([*control, "-z", str(proc.pid)], check=True, timeout=60, capture_output=True)
        done = run_wrk(
            url, duration=LIVE_SECONDS, connections=LIVE_CONNECTIONS, headers=[f"Host: {HOST}"]
        )
        subprocess.run([*control, "-d", str(proc.pid)], check=True, timeout=60, capture_output=True)
        if done.errors or done.non_2xx:
            raise RuntimeError(f"wrk saw errors through {target}: {done.raw}")
        dumps = sorted(tmp.glob(f"{out.name}.*"), key=lambda p: p.stat().st_mtime)
        if not dumps:
            raise RuntimeError(f"callgrind wrote no dump for {target}")
        dump = dumps[-1]
        for line in dump.read_text().splitlines():
            if line.startswith("summary:") or line.startswith("totals:"):
                return int(line.split()[1]) / done.requests, dump
        raise RuntimeError(f"no instruction total in {dump}")
    finally:
        bench.close()


def annotate(path: Path, limit: int = 40) -> str:
    text = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    lines = [ln for ln in text.splitlines() if re.match(r"^\s*[0-9,]+ \(", ln)]
    return "\n".join(lines[:limit])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child(argv[1], int(argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", choices=("dorm", "minimal", "both"), default="both")
    ap.add_argument("--annotate", action="store_true", help="print where the instructions go")
    ap.add_argument(
        "--live", action="store_true", help="the whole proxy process under wrk, not the harness"
    )
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed", file=sys.stderr)
        return 2
    targets = ("dorm", "minimal") if args.target == "both" else (args.target,)
    with tempfile.TemporaryDirectory(prefix="dorm-callgrind-") as tmp:
        for target in targets:
            ir, out = live(target, Path(tmp)) if args.live else per_request(target, Path(tmp))
            what = (
                "user-space instructions/request, whole process"
                if args.live
                else ("instructions/request")
            )
            print(f"{target}: {ir:,.0f} {what}")
            if args.annotate:
                print(annotate(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
