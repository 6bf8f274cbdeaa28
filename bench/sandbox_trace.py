"""Where one prewarmed sandbox start goes: per-phase medians from an ftrace of every start.

    python -m bench.sandbox_trace [--starts N] [--gap-ms G] [--python-children]

Why ftrace and not timestamps in the code: the phases that matter are the kernel's (the child's
wake-up, execve, the exit until the parent can see it) and they happen in processes that run no
Python (the C launcher, the tenant). This records sched_switch/wakeup, sched_process_exec/exit
and every syscall entry/exit in a private tracefs instance (``dorm-sandbox-trace``, removed
afterwards) while it starts ``/bin/true`` N times, then splits the trace at markers written from
here. Tracing every syscall slows both sides a little, so compare runs of this script with each
other (e.g. two worktrees, interleaved), not with bench.sandbox's untraced totals.

Needs root and tracefs at /sys/kernel/tracing. Writes nothing but the report on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from sandboxes import SandboxSpec, cgroups, cleanup_stale, prefork, prewarm, spawn

TRACEFS = "/sys/kernel/tracing"
INSTANCE = "dorm-sandbox-trace"
EVENTS = (
    "sched:sched_switch",
    "sched:sched_wakeup",
    "sched:sched_process_exec",
    "sched:sched_process_exit",
    "raw_syscalls:sys_enter",
    "raw_syscalls:sys_exit",
)
UID = 200001
CGROUP_PARENT = "dorm-bench-trace"
NR_SENDMSG, NR_EXECVE, NR_SECCOMP = 46, 59, 317  # x86_64
LINE = re.compile(r"\s*.+?-(\d+)\s+\[\d+\]\s+\S+\s+([\d.]+): (\w+): (.*)")

Event = tuple[int, float, str, str]  # pid, µs, event name, rest of the line


class Instance:
    """A private ftrace instance, so other users of tracefs are not disturbed."""

    def __init__(self) -> None:
        self.dir = os.path.join(TRACEFS, "instances", INSTANCE)
        os.makedirs(self.dir, exist_ok=True)
        self.write("tracing_on", "0")
        self.write("buffer_size_kb", "16384")
        self.write("trace_clock", "mono")
        self.write("set_event", "")
        for ev in EVENTS:
            self.write("set_event", ev + "\n", append=True)
        self.marker = -1

    def write(self, name: str, text: str, *, append: bool = False) -> None:
        # os-level writes: tracefs files refuse the seek that Python's append mode does
        flags = os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC)
        fd = os.open(os.path.join(self.dir, name), flags)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def start(self) -> None:
        self.write("trace", "")
        self.write("tracing_on", "1")
        self.marker = os.open(os.path.join(self.dir, "trace_marker"), os.O_WRONLY)

    def mark(self, text: str) -> None:
        os.write(self.marker, text.encode() + b"\n")

    def stop(self) -> list[Event]:
        self.write("tracing_on", "0")
        os.close(self.marker)
        out: list[Event] = []
        with open(os.path.join(self.dir, "trace")) as f:
            for line in f:
                m = LINE.match(line)
                if m:
                    out.append((int(m[1]), float(m[2]) * 1e6, m[3], m[4]))
        return out

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.write("set_event", "")
            os.rmdir(self.dir)


def _first(events: list[Event], pred: object) -> float:
    return next(e[1] for e in events if pred(e))  # type: ignore[operator]


def phases(run: list[Event], me: int) -> dict[str, float]:
    """Phase durations (µs) of one start, from its slice of the trace."""
    t0 = run[0][1]
    child = int(next(e[3].split()[1] for e in run if e[0] == me and e[3].startswith("SPAWNED")))
    reaped = _first(run, lambda e: e[0] == me and e[3].startswith("REAPED"))
    send = _first(run, lambda e: e[0] == me and e[2] == "sys_enter" and _nr(e) == NR_SENDMSG)
    execve = _first(run, lambda e: e[0] == child and e[2] == "sys_enter" and _nr(e) == NR_EXECVE)
    # the child first runs after the send (time it is preempted on the way counts as its steps)
    ins = [
        e[1]
        for e in run
        if e[2] == "sched_switch" and f"next_pid={child} " in e[3] and send <= e[1] <= execve
    ]
    ran = ins[0] if ins else send
    execd = _first(run, lambda e: e[2] == "sched_process_exec" and f"pid={child} " in e[3])
    exited = _first(run, lambda e: e[2] == "sched_process_exit" and f"pid={child} " in e[3])
    zombie = _first(
        run,
        lambda e: (
            e[2] == "sched_switch" and f"prev_pid={child} " in e[3] and "prev_state=Z" in e[3]
        ),
    )
    sec = [e[1] for e in run if e[0] == child and e[2].startswith("sys_") and _nr(e) == NR_SECCOMP]
    out = {
        "parent: request -> plan sent": send - t0,
        "wake-up of the idle child": ran - send,
        "child: per-start steps up to execve": execve - ran,
        "execve of the tenant": execd - execve,
        "tenant: exec -> exit": exited - execd,
        "exit until zombie": zombie - exited,
        "zombie -> reaped": reaped - zombie,
        "total": reaped - t0,
    }
    if len(sec) >= 2:
        out["  (seccomp load)"] = sec[1] - sec[0]
    return out


def _nr(e: Event) -> int:
    parts = e[3].split()
    return int(parts[1]) if len(parts) > 1 and parts[0] == "NR" else -1


def run(starts: int, gap: float, exec_only: bool) -> str:
    if os.geteuid() != 0:
        raise SystemExit("bench.sandbox_trace needs root (sandboxes, tracefs)")
    if not os.path.isdir(os.path.join(TRACEFS, "instances")):
        raise SystemExit(f"bench.sandbox_trace needs tracefs at {TRACEFS}")
    workdir = Path(tempfile.mkdtemp(prefix="dorm-sandbox-trace-"))
    workdir.chmod(0o755)
    sock = workdir / "sock"
    sock.mkdir()
    os.chown(sock, UID, UID)
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    inst = Instance()
    me = os.getpid()
    try:
        inst.start()
        for i in range(starts + 3):  # three untimed warm-ups
            spec = SandboxSpec(
                name=f"trace-{me}-{i}",
                uid=UID,
                socket_dir=str(sock),
                cgroup_parent=CGROUP_PARENT,
                memory=256 << 20,
                pids=64,
                cpu=1.0,
            )
            prewarm(spec, 1, exec_only=exec_only)
            time.sleep(gap)
            inst.mark(f"START {i}")
            sb = spawn(
                spec, ["/bin/true"], {"PATH": "/usr/bin:/bin"}, stdout_fd=devnull, stderr_fd=devnull
            )
            inst.mark(f"SPAWNED {sb.pid}")
            try:
                status = sb.wait(10)
            finally:
                inst.mark("REAPED")
                sb.cleanup()
            if status != 0:
                raise RuntimeError(f"/bin/true exited with status {status}")
        events = inst.stop()
    finally:
        inst.remove()
        prefork.POOL.clear()
        cleanup_stale(CGROUP_PARENT)
        with contextlib.suppress(OSError):
            cgroups.detect().remove_parent(CGROUP_PARENT)
        os.close(devnull)
        shutil.rmtree(workdir, ignore_errors=True)
    runs: list[list[Event]] = []
    for e in events:
        if e[0] == me and e[2] == "tracing_mark_write" and e[3].startswith("START"):
            runs.append([e])
        elif runs:
            runs[-1].append(e)
    table: dict[str, list[float]] = {}
    skipped = 0
    for r in runs[3:]:
        try:
            got = phases(r, me)
        except StopIteration:  # an event lost or reordered across CPUs
            skipped += 1
            continue
        for k, v in got.items():
            table.setdefault(k, []).append(v)
    kind = "launcher" if exec_only else "Python"
    lines = [
        f"{len(runs) - 3 - skipped} prewarmed /bin/true starts ({kind} children), "
        f"{gap * 1000:g} ms idle gap, load {os.getloadavg()[0]:.2f}; µs",
        "",
        "| phase | p50 | min |",
        "|---|---:|---:|",
    ]
    lines += [f"| {k} | {statistics.median(v):.0f} | {min(v):.0f} |" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--starts", type=int, default=30)
    ap.add_argument("--gap-ms", type=float, default=20.0)
    ap.add_argument(
        "--python-children", action="store_true", help="forked Python children, not the launcher"
    )
    args = ap.parse_args()
    print(
        run(max(1, min(args.starts, 500)), max(0.0, args.gap_ms) / 1000, not args.python_children)
    )


if __name__ == "__main__":
    main()
