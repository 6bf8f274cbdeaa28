"""Helpers shared by dorm's benchmarks: ports, processes, CPU accounting, wrk, machine facts, docs.

Benchmarks are run by hand or by `make bench-*`, not by the test suite, and their numbers end up in
docs/benchmarks.md. Everything that could make a number wrong in a silent way (a wrk run with socket
errors, a CPU counter read from the wrong process, a section of the docs clobbered) is handled here
once, so every benchmark gets it right the same way.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import FrameType

from gateway import compiled

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
DOCS_TITLE = "# Benchmarks"
DOCS_INTRO = (
    "Measured numbers only: each section is rewritten by the benchmark it is named after, with\n"
    "the command that produced it. Run them on an otherwise idle machine.\n"
)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- ports and processes --------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1, reserved for this process until it exits.

    The same reservation as the test suite's (tests/ports.py), so a benchmark and a test run on
    one machine, or two benchmarks, are never handed the same port, and an outgoing connection
    (wrk opens hundreds) can never take one between the choice and the server's bind."""
    from tests.ports import free_port as reserved_port

    return reserved_port()


def wait_for(predicate: object, timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll `predicate()` until it is true; a benchmark must never hang on a dead dependency."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():  # type: ignore[operator]
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 10.0
) -> None:
    """Signal a process we started, wait `grace` seconds, then SIGKILL it and its process group.

    Our children are started with start_new_session=True, so the process group holds everything
    they started (unless a grandchild made its own session: callers kill those by pid).
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def kill_pid(pid: int | None, grace: float = 3.0) -> None:
    """SIGTERM then SIGKILL one pid we know we caused (e.g. an app instance the gateway started)."""
    if pid is None or not pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc/<pid>/task/*/children)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += [
                    int(x) for x in Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                ]
    return out


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of `pid` to `cpus` (sched_setaffinity is per thread, not per process)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task), cpus)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, summed over CPUs, from /proc/stat.

    Benchmarks subtract their own processes' CPU from the busy delta to see how much *other*
    work ran meanwhile: on a shared machine (tests, other benchmarks) that is the first suspect
    when numbers move.
    """
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


def children_cpu() -> float:
    """CPU seconds of this process's waited-for children (e.g. every finished wrk run)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# -- wrk -----------------------------------------------------------------------------------------
@dataclass(slots=True)
class WrkResult:
    """What one wrk run reports, in seconds and requests."""

    requests: int
    duration: float
    rps: float
    p50: float
    p99: float
    errors: int
    non_2xx: int
    raw: str = field(repr=False, default="")


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _seconds(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"unexpected wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> WrkResult:
    """Parse `wrk --latency` output; raises ValueError if a field is missing."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    total = re.search(r"^\s*(\d+) requests in ([\d.]+\w+),", out, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (rps and total and p50 and p99):
        raise ValueError(f"could not parse wrk output:\n{out}")
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors = sum(int(x) for x in sock.groups())
    non = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return WrkResult(
        requests=int(total.group(1)),
        duration=_seconds(total.group(2)),
        rps=float(rps.group(1)),
        p50=_seconds(p50.group(1)),
        p99=_seconds(p99.group(1)),
        errors=errors,
        non_2xx=int(non.group(1)) if non else 0,
        raw=out,
    )


def run_wrk(
    url: str,
    *,
    duration: float,
    connections: int,
    threads: int = 1,
    headers: Sequence[str] = (),
    cpus: set[int] | None = None,
) -> WrkResult:
    """Run wrk (optionally pinned with taskset) with a hard timeout, and parse its report."""
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration:g}s",
        "--latency",
        "--timeout",
        "5s",
    ]
    for h in headers:
        cmd += ["-H", h]
    cmd.append(url)
    if cpus:
        cmd = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    return parse_wrk(proc.stdout)


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


# -- machine facts -------------------------------------------------------------------------------
def _cmd_version(cmd: Sequence[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (p.stdout + p.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


def _pkg_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, str]:
    """The facts a reader needs to judge a number: CPUs, kernel, runtimes, tool versions."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": str(os.cpu_count()),
        "affinity": ",".join(map(str, sorted(os.sched_getaffinity(0)))),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": _pkg_version("uvloop"),
        "httptools": _pkg_version("httptools"),
        "nginx": _cmd_version([shutil.which("nginx") or "/usr/sbin/nginx", "-v"])
        .removeprefix("nginx version: ")
        .removeprefix("nginx/"),
        "wrk": _cmd_version(["wrk", "-v"]).split(" [")[0].removeprefix("wrk "),
        "relay": compiled.describe(),
    }


def now_utc() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def command_line() -> str:
    """How this benchmark was invoked, as a user would type it."""
    args = " ".join(sys.argv[1:])
    mod = Path(sys.argv[0]).stem
    return f"python -m bench.{mod}" + (f" {args}" if args else "")


# -- docs/benchmarks.md ----------------------------------------------------------------------------
def replace_section(text: str, title: str, body: str) -> str:
    """Replace the `## <title>` section of `text` (up to the next `## ` heading) with `body`.

    Other sections are kept byte for byte: several benchmarks share one file and each owns only
    its own section. A missing section is appended. Headings inside ``` fences are ignored.
    """
    lines = text.splitlines(keepends=True)
    heading = f"## {title}"
    start = end = None
    fenced = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        if fenced:
            continue
        if start is None and line.rstrip() == heading:
            start = i
        elif start is not None and line.startswith("## "):
            end = i
            break
    section = body.rstrip("\n") + "\n"
    if not section.startswith(heading):
        section = f"{heading}\n\n{section}"
    if start is None:
        prefix = text.rstrip("\n")
        return (prefix + "\n\n" if prefix else "") + section
    before = "".join(lines[:start])
    after = "".join(lines[end:]) if end is not None else ""
    return before + section + ("\n" + after if after else "")


def write_section(title: str, body: str, path: Path = DOCS) -> None:
    """Rewrite one section of docs/benchmarks.md in place (atomically), creating the file if new."""
    text = path.read_text() if path.exists() else f"{DOCS_TITLE}\n\n{DOCS_INTRO}"
    new = replace_section(text, title, body)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new)
    tmp.replace(path)


def git_revision(paths: Sequence[str] = ("gateway",)) -> str:
    """The commit measured, plus a note if `paths` had uncommitted changes (others edit live)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *paths],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    if dirty:
        return f"{head} + uncommitted changes in {', '.join(paths)}"
    return head


# -- process trees and memory ---------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    """`pid` and all its live descendants, parents first (an instance may fork workers)."""
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < 10_000:  # bounded: a fork bomb must not hang a benchmark
        p = todo.pop()
        if not pid_alive(p):
            continue
        out.append(p)
        todo += child_pids(p)
    return out


def smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/<pid>/smaps_rollup in bytes (Rss, Pss, Private_Dirty, …); {} if the process is gone.

    PSS is the honest per-process share of memory when pages are shared (forked children of a
    zygote share its pages with it and with each other); Private_* is what killing it frees.
    """
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
                out[key.strip()] = int(parts[0]) * 1024
    return out


def tree_memory(pid: int) -> dict[str, int]:
    """smaps_rollup summed over `pid` and its descendants, plus `processes` (how many)."""
    total: dict[str, int] = {"processes": 0}
    for p in process_tree(pid):
        roll = smaps_rollup(p)
        if not roll:
            continue
        total["processes"] += 1
        for key, value in roll.items():
            total[key] = total.get(key, 0) + value
    return total


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid`'s live tree plus everything its members have reaped (cutime/cstime).

    A benchmark that starts and stops many short-lived children under one long-lived parent
    (dorm's fork server) accounts their CPU this way even after they are gone.
    """
    total = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK_TCK
    return total


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; with few samples p99 is ~ the max."""
    if not values:
        raise ValueError("percentile of no values")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def pkg_version(name: str) -> str:
    """An installed distribution's version, or "not installed" (for the Software line)."""
    return _pkg_version(name)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (e.g. from a CI timeout) unwinds like Ctrl-C, so the cleanup still runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old: Callable[[int, FrameType | None], object] | int | None = signal.signal(
        signal.SIGTERM, handler
    )
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot, /proc/<pid>/stat field 22); None if gone.

    A pid names a process only while it lives: once it exits the kernel may hand the number to
    anyone's new process. (pid, start time) names one process for good.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def kill_pid_if_same(pid: int, started: int | None, grace: float = 3.0) -> None:
    """`kill_pid`, but only the process that is `pid` and started at `started`.

    For belt-and-braces cleanup of processes we saw but did not start ourselves (app instances a
    gateway started and has since stopped): after thousands of them exit, their pids are reused
    by other people's processes on a shared machine, and a plain kill by pid would hit those. A
    pidfd opened first and then checked against the start time names exactly that process, and
    signals through it cannot reach a later owner of the number.
    """
    if started is None:
        return
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return  # gone
    try:
        if start_time(pid) != started:
            return  # the number belongs to someone else's process now
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
            try:
                signal.pidfd_send_signal(fd, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and start_time(pid) == started:
                time.sleep(0.05)
            if start_time(pid) != started:
                return
    finally:
        os.close(fd)
