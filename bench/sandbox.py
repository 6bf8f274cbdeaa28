"""Sandbox start-up benchmark: dorm's spawn vs bubblewrap vs util-linux unshare, interleaved.

    python -m bench.sandbox [--rounds N] [--gap-ms G] [--write]

Two workloads, each measured per round for every contender in a shuffled order (so machine drift
and noisy neighbours hit all alike):

* ``true``   — start-to-exit of a sandboxed ``/bin/true`` (spawn call → child reaped).
* ``server`` — start-to-first-response of a minimal Python HTTP server (``python3 -I -S``) on a
  Unix socket in the sandbox's socket dir: start → server up → one request answered.

Contenders:

* ``dorm (prewarmed)`` — ``sandboxes.prewarm(spec, 1, exec_only=True)`` before each round (not
  timed), as the fork server does when idle (an exec-only idle child is the C launcher, see
  sandboxes/launcher.py); the timed part is ``spawn`` + wait: cgroup rename + limits,
  per-instance mounts, identity, privileges, seccomp, exec, the tenant's run and exit.
* ``dorm (cold)`` — no idle child: spawn builds namespaces and starts a launcher on demand.
* ``dorm zygote (prewarmed)`` — ``sandboxes.spawn_call``: same confinement, but the child calls
  preloaded code (a no-op, or the same one-request server) instead of execve: no exec, no
  interpreter start-up. This is what a runtime zygote gets.
* ``bwrap`` — bubblewrap with the closest equivalent flags: all namespaces, ro /usr + python
  prefix, /proc, /dev, tmpfs /tmp, the socket dir at /run/dorm, uid 200001, --cap-drop ALL,
  --new-session, --die-with-parent, --clearenv, and dorm's own seccomp BPF via ``--seccomp``.
  No cgroups (bubblewrap has none).
* ``unshare`` — util-linux ``unshare -m -u -i -n -p -f --mount-proc``: namespaces only, no new
  root, no seccomp, no cgroups. For ``true`` it drops to uid 200001 (-S/-G); for ``server`` it
  stays root because the Python prefix under /root is not readable by that uid on the host view.

Runs are bounded (``--rounds``, capped at 500, and every wait has a timeout). Nothing is written
except, with ``--write``, the "Benchmark" section of docs/sandboxes.md. Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import write_section
from sandboxes import (
    SandboxSpec,
    cgroups,
    cleanup_stale,
    prefork,
    prewarm,
    seccomp,
    spawn,
    spawn_call,
)

REPO = Path(__file__).resolve().parent.parent
UID = 200001
PY = os.path.join(sys.base_prefix, "bin", "python3")
CGROUP_PARENT = "dorm-bench"
SERVER = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_UNIX)\n"
    "s.bind(sys.argv[1])\n"
    "s.listen(1)\n"
    "c, _ = s.accept()\n"
    "c.recv(1024)\n"
    "c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok')\n"
    "c.close()\n"
)
ENV = {"PATH": "/usr/bin:/bin"}
TIMEOUT = 10.0


def noop() -> int:
    """Zygote-mode tenant for the ``true`` workload."""
    return 0


def serve_once() -> int:
    """Zygote-mode tenant for the ``server`` workload: the same server as SERVER, preloaded."""
    s = socket.socket(socket.AF_UNIX)
    s.bind(sys.argv[1])
    s.listen(1)
    c, _ = s.accept()
    c.recv(1024)
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    c.close()
    return 0


class Bench:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sock = workdir / "sock"
        self.sock.mkdir()
        os.chown(self.sock, UID, UID)
        # bwrap maps its sandbox uid onto the caller's (root, capabilities dropped), so it could
        # not create the socket in a 0755 dir owned by UID; open it for everyone in this bench.
        self.sock.chmod(0o777)
        self.n = 0
        self.devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        r, w = os.pipe()
        prog = seccomp.compiled_filter().program
        os.write(w, prog)  # < pipe capacity: bwrap reads it with --seccomp
        os.close(w)
        self._seccomp_bytes = prog
        os.close(r)

    def spec(self) -> SandboxSpec:
        self.n += 1
        return SandboxSpec(
            name=f"bench-{os.getpid()}-{self.n}",
            uid=UID,
            socket_dir=str(self.sock),
            cgroup_parent=CGROUP_PARENT,
            memory=256 << 20,
            pids=64,
            cpu=1.0,
        )

    def clear_socket(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.sock / "app.sock").unlink()

    # -- workloads -------------------------------------------------------------------------
    def _request(self, started: float) -> float:
        path = str(self.sock / "app.sock")
        deadline = started + TIMEOUT
        while True:
            try:
                c = socket.socket(socket.AF_UNIX)
                c.settimeout(TIMEOUT)
                c.connect(path)
                break
            except OSError:
                c.close()
                if time.monotonic() > deadline:
                    raise TimeoutError("server did not come up") from None
                time.sleep(0.0002)
        with c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            data = c.recv(1024)
        elapsed = time.perf_counter() - started
        if not data.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"bad response {data[:40]!r}")
        return elapsed * 1000

    def dorm_zygote(self, workload: str) -> float:
        """Zygote mode (``spawn_call``): the confined child calls preloaded code, no execve and no
        interpreter start-up: ``noop`` for ``true``, ``serve_once`` for ``server``."""
        spec = self.spec()
        prewarm(spec, 1, exec_only=False)  # zygote calls need a Python child
        time.sleep(0.005)
        self.clear_socket()
        target, argv = (
            (f"{__name__}:noop", ["noop"])
            if workload == "true"
            else (f"{__name__}:serve_once", ["serve_once", "/run/dorm/app.sock"])
        )
        t = time.perf_counter()
        sb = spawn_call(spec, target, argv, ENV, stdout_fd=self.devnull, stderr_fd=self.devnull)
        try:
            if workload == "server":
                ms = self._request(t)
                status = sb.wait(TIMEOUT)
            else:
                status = sb.wait(TIMEOUT)
                ms = (time.perf_counter() - t) * 1000
            if status != 0:
                raise RuntimeError(f"dorm zygote {target} exited with status {status}")
        finally:
            with contextlib.suppress(TimeoutError):
                sb.kill()
                sb.wait(TIMEOUT)
            sb.cleanup()
        return ms

    def dorm(self, workload: str, warm: bool) -> float:
        spec = self.spec()
        if warm:
            prewarm(spec, 1, exec_only=True)
            time.sleep(0.005)
        else:
            prefork.POOL.clear()
        self.clear_socket()
        argv = (
            ["/bin/true"]
            if workload == "true"
            else [PY, "-I", "-S", "-c", SERVER, "/run/dorm/app.sock"]
        )
        t = time.perf_counter()
        sb = spawn(spec, argv, ENV, stdout_fd=self.devnull, stderr_fd=self.devnull)
        try:
            if workload == "server":
                ms = self._request(t)
                sb.wait(TIMEOUT)
            else:
                status = sb.wait(TIMEOUT)
                ms = (time.perf_counter() - t) * 1000
                if status != 0:
                    raise RuntimeError(f"dorm /bin/true exited with status {status}")
        finally:
            with contextlib.suppress(TimeoutError):
                sb.kill()
                sb.wait(TIMEOUT)
            sb.cleanup()
        return ms

    def _external(self, argv: list[str], workload: str, **kw: object) -> float:
        self.clear_socket()
        t = time.perf_counter()
        p = subprocess.Popen(argv, stdout=self.devnull, stderr=self.devnull, **kw)  # type: ignore[call-overload]
        try:
            if workload == "server":
                ms = self._request(t)
                p.wait(TIMEOUT)
            else:
                rc = p.wait(TIMEOUT)
                ms = (time.perf_counter() - t) * 1000
                if rc != 0:
                    raise RuntimeError(f"{argv[0]} exited with {rc}")
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(TIMEOUT)
        return ms

    def bwrap(self, workload: str) -> float:
        r, w = os.pipe()
        os.write(w, self._seccomp_bytes)
        os.close(w)
        prefix = os.path.realpath(sys.base_prefix)
        argv = ["bwrap", "--unshare-all", "--unshare-user", "--uid", str(UID), "--gid", str(UID)]
        for top in ("bin", "sbin", "lib", "lib64"):
            host = "/" + top
            if os.path.islink(host):
                argv += ["--symlink", os.readlink(host), host]
        argv += ["--ro-bind", "/usr", "/usr", "--ro-bind", prefix, prefix]
        argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
        argv += ["--bind", str(self.sock), "/run/dorm", "--hostname", "dorm", "--chdir", "/"]
        argv += ["--cap-drop", "ALL", "--new-session", "--die-with-parent", "--clearenv"]
        argv += ["--setenv", "PATH", ENV["PATH"], "--seccomp", str(r), "--"]
        argv += (
            ["/bin/true"]
            if workload == "true"
            else [PY, "-I", "-S", "-c", SERVER, "/run/dorm/app.sock"]
        )
        try:
            return self._external(argv, workload, pass_fds=(r,))
        finally:
            os.close(r)

    def unshare(self, workload: str) -> float:
        argv = ["unshare", "-m", "-u", "-i", "-n", "-p", "-f", "--mount-proc", "--kill-child"]
        if workload == "true":
            argv += ["-S", str(UID), "-G", str(UID), "/bin/true"]
        else:
            argv += [PY, "-I", "-S", "-c", SERVER, str(self.sock / "app.sock")]
        return self._external(argv, workload, env=ENV)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def machine() -> dict[str, str]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    bwrap_v = subprocess.run(["bwrap", "--version"], capture_output=True, text=True).stdout
    unshare_v = subprocess.run(["unshare", "--version"], capture_output=True, text=True).stdout
    return {
        "kernel": platform.release(),
        "cpu": f"{model} x {os.cpu_count()}",
        "python": platform.python_version(),
        "bwrap": bwrap_v.strip(),
        "unshare": unshare_v.strip(),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def run(rounds: int, gap: float) -> str:
    if os.geteuid() != 0:
        raise SystemExit("bench.sandbox needs root (namespaces, cgroups, bubblewrap as root)")
    if shutil.which("bwrap") is None or shutil.which("unshare") is None:
        raise SystemExit("bench.sandbox needs bwrap and unshare (util-linux) installed")
    seccomp.compiled_filter()
    workdir = Path(tempfile.mkdtemp(prefix="dorm-bench-sandbox-"))
    workdir.chmod(0o755)
    info = machine()
    b = Bench(workdir)
    contenders: dict[str, Callable[[str], float]] = {
        "dorm (prewarmed)": lambda w: b.dorm(w, warm=True),
        "dorm (cold)": lambda w: b.dorm(w, warm=False),
        "dorm zygote (prewarmed)": b.dorm_zygote,
        "bwrap": b.bwrap,
        "unshare": b.unshare,
    }
    results: dict[tuple[str, str], list[float]] = {}
    try:
        for workload in ("true", "server"):
            for fn in contenders.values():  # one untimed warm-up each
                fn(workload)
            for _ in range(rounds):
                order = list(contenders)
                random.shuffle(order)
                for name in order:
                    time.sleep(gap)
                    results.setdefault((workload, name), []).append(contenders[name](workload))
    finally:
        prefork.POOL.clear()
        cleanup_stale(CGROUP_PARENT)
        with contextlib.suppress(OSError):
            cgroups.detect().remove_parent(CGROUP_PARENT)
        shutil.rmtree(workdir, ignore_errors=True)
    lines = [
        f"Command: `python -m bench.sandbox --rounds {rounds} --gap-ms {gap * 1000:g}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"Machine: {info['cpu']}, Linux {info['kernel']}, Python {info['python']}, "
        f"{info['bwrap']}, {info['unshare']}; load average at start {info['load']}.",
        "",
        "| workload | contender | p50 ms | p99 ms | min ms | runs |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for workload, name in sorted(
        results, key=lambda k: (k[0] != "true", list(contenders).index(k[1]))
    ):
        xs = results[(workload, name)]
        lines.append(
            f"| {workload} | {name} | {statistics.median(xs):.2f} | {pct(xs, 99):.2f} | "
            f"{min(xs):.2f} | {len(xs)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--gap-ms", type=float, default=20.0, help="idle gap before each start")
    ap.add_argument("--quick", action="store_true", help="10 rounds (a laptop-sized run)")
    ap.add_argument(
        "--write", action="store_true", help="rewrite the Sandbox section of docs/benchmarks.md"
    )
    args = ap.parse_args()
    rounds = 10 if args.quick else max(1, min(args.rounds, 500))
    body = run(rounds, max(0.0, args.gap_ms) / 1000)
    print(body)
    if args.write:
        write_section("Sandbox", body)


if __name__ == "__main__":
    main()
