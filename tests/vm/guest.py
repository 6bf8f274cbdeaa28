"""Boot a throwaway qemu guest with a pure cgroup v2 kernel and run pytest inside it.

Why: this host and CI bind memory/pids/cpu to cgroup v1 (the cgroup2 mount beside them is empty),
so ``V2Backend``'s limit, OOM and spawn paths can only run for real under another kernel. The
guest is Debian's ``linux-image-amd64`` booted by ``qemu-system-x86_64`` with ``cgroup_no_v1=all``
(KVM where the host has real KVM, TCG emulation otherwise: see ``accelerator``). Its root is the
*host's* filesystem shared read-only over virtio-9p under an overlay whose upper layer is guest
tmpfs (and fresh tmpfs on /run, /var/tmp, /dev/shm, /tmp), so it runs this very checkout with the
repo's own venv, and nothing in it can write back to the host.

Containment: no network device at all (``-nodefaults -nic none``), no monitor, no display; the
only output is two serial ports written to files in a temp dir (ttyS0 the kernel console, ttyS1
the job's output). The VM has a hard wall-clock limit after which qemu is SIGKILLed (also when
the caller fails or dies), and the temp dir (initramfs, logs) is removed.

Boot: a tiny initramfs made here (host's static busybox, the virtio/9p/overlay modules extracted
by tests/vm/install-packages.sh, an /init script) loads the modules, mounts the 9p root, the
overlay and the tmpfs, mounts cgroup2 at /sys/fs/cgroup with +memory +pids +cpu in the root's
subtree_control, and ``switch_root``-s into it to run the job: pytest from the repo's venv, inside
a non-root cgroup holding processes (like a systemd service), so ``V2Backend.prepare``'s
supervisor-leaf move runs for real too.

``python -m tests.vm.guest [pytest args]`` runs it by hand (``make test-cgroup2``).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import glob
import gzip
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
CACHE = Path(os.environ.get("DORM_VM_CACHE", "/var/cache/dorm-vm"))
QEMU = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"
RC_MARK = "DORM-GUEST-RC="
# Modules the initramfs loads, in dependency order (read from each .ko's modinfo, so a new kernel
# version with a changed dependency list still loads).
WANTED_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
# What `make test` runs in the guest: every cgroup test, and the sandbox tests whose outcome
# depends on the cgroup (limits enforced and reported, pool cgroups, cleanup). The whole sandbox
# suite also runs there (`make test-cgroup2 CGROUP2_ARGS=tests/sandboxes`) but takes minutes
# under emulation, mostly CPU-bound Python start-ups and forks.
DEFAULT_TESTS = (
    "tests/sandboxes/test_cgroups.py",
    "tests/sandboxes/test_hostile.py::test_fork_bomb_hits_pids_limit",
    "tests/sandboxes/test_hostile.py::test_memory_bomb_is_oom_killed_and_reported",
    "tests/sandboxes/test_spawn.py::test_stats_and_kill",
    "tests/sandboxes/test_spawn.py::test_prewarmed_children_serve_exactly_one_sandbox",
    "tests/sandboxes/test_spawn.py::test_without_prewarm_spawn_forks_on_demand",
)


@dataclasses.dataclass
class Kernel:
    vmlinuz: Path
    modules: list[Path]  # load order
    release: str


@dataclasses.dataclass
class GuestResult:
    accel: str  # how the guest ran: "kvm" or "tcg", and why
    rc: int | None  # the inner pytest's exit status; None if the guest never reported one
    output: str  # what the job wrote on ttyS1 (pytest's output)
    console: str  # the kernel console (ttyS0)
    seconds: float
    timed_out: bool
    boot_seconds: float | None = None


def accelerator() -> tuple[str, str]:
    """(qemu accelerator, why): KVM where the host has real KVM, TCG emulation otherwise.

    Why not always KVM when /dev/kvm exists: on this machine (and CI) /dev/kvm is kvm_pvm, a
    *pagetable-based* nested hypervisor that runs only guest kernels built with CONFIG_PVM_GUEST;
    Debian's kernel spins there without printing a line (measured: 30 s of host CPU, no output).
    TCG runs the same real kernel, only slower, so the cgroup code under test is the same.
    """
    if os.path.exists("/sys/module/kvm_pvm"):
        return "tcg", "/dev/kvm is kvm_pvm (boots only PVM guest kernels): TCG emulation"
    if not os.path.exists("/dev/kvm"):
        return "tcg", "no /dev/kvm: TCG emulation"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", f"/dev/kvm not usable by uid {os.geteuid()}: TCG emulation"
    if not any(os.path.exists(f"/sys/module/{m}") for m in ("kvm_intel", "kvm_amd")):
        return "tcg", "no kvm_intel/kvm_amd module loaded: TCG emulation"
    return "kvm", "KVM (kvm_intel/kvm_amd)"


def unavailable_reason() -> str | None:
    """Why the guest cannot run here (None when it can), naming exactly what is missing."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return f"the guest is x86_64 Linux only (this is {sys.platform} {os.uname().machine})"
    missing = []
    if shutil.which(QEMU) is None:
        missing.append(f"{QEMU} (Debian package qemu-system-x86)")
    if not os.access(BUSYBOX, os.X_OK):
        missing.append(f"{BUSYBOX} (Debian package busybox-static)")
    try:
        find_kernel()
    except FileNotFoundError as e:
        missing.append(str(e))
    if missing:
        return (
            "missing " + "; ".join(missing) + " — tests/vm/install-packages.sh installs them "
            "(run by `make test` when root)"
        )
    return None


def _modinfo_depends(ko: Path) -> list[str]:
    data = ko.read_bytes()
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
    return [d for d in m.group(1).decode().split(",") if d] if m else []


def find_kernel() -> Kernel:
    """The extracted kernel in CACHE and the module files for WANTED_MODULES, deps first."""
    images = sorted(glob.glob(str(CACHE / "kernel" / "boot" / "vmlinuz-*")))
    if not images:
        raise FileNotFoundError(f"no kernel image under {CACHE}/kernel/boot (linux-image-amd64)")
    vmlinuz = Path(images[-1])
    release = vmlinuz.name.removeprefix("vmlinuz-")
    by_name: dict[str, Path] = {}
    for ko in (CACHE / "kernel" / "lib" / "modules" / release).rglob("*.ko"):
        by_name[ko.stem.replace("-", "_")] = ko
    order: list[Path] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        key = name.replace("-", "_")
        if key in chain:
            raise RuntimeError(f"module dependency cycle: {' -> '.join((*chain, key))}")
        ko = by_name.get(key)
        if ko is None:
            raise FileNotFoundError(f"module {name}.ko for {release} not under {CACHE}/kernel")
        if ko in order:
            return
        for dep in _modinfo_depends(ko):
            visit(dep, (*chain, key))
        order.append(ko)

    for name in WANTED_MODULES:
        visit(name, ())
    return Kernel(vmlinuz, order, release)


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive (the initramfs format) of (path, mode, data): dirs have no data."""
    out = io.BytesIO()

    def put(name: str, mode: int, data: bytes, ino: int) -> None:
        nb = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0)
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + nb)
        out.write(b"\0" * (-(110 + len(nb)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))

    for ino, (name, mode, data) in enumerate(entries, start=1):
        put(name, mode, data, ino)
    put("TRAILER!!!", 0, b"", 0)
    return out.getvalue()


INIT = r"""#!/bin/busybox sh
# Guest pid 1 inside the initramfs: modules, 9p root (read-only), tmpfs, cgroup2, switch_root.
B=/bin/busybox
fail() { echo "DORM-GUEST-INIT-FAILED: $*" >/dev/ttyS1; $B sleep 0.2; $B reboot -f; }
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
for m in $($B cat /modules.order); do $B insmod "/modules/$m" || fail "insmod $m"; done
$B mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=524288,cache=loose hostroot /lower \
    || fail "mount 9p root"
# Writable everywhere, host untouched: an overlay whose upper layer is guest memory.
$B mount -t tmpfs -o mode=0755,size=1g upper /upper && $B mkdir /upper/data /upper/work \
    || fail "tmpfs for the overlay"
$B mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /newroot \
    || fail "mount overlay root"
for d in {tmpfs_dirs}; do
    $B mount -t tmpfs -o mode=1777,size=1g tmpfs "/newroot/$d" || fail "tmpfs /$d"
done
$B chmod 0755 /newroot/run
for d in proc sys dev; do $B mount --move "/$d" "/newroot/$d" || fail "move /$d"; done
$B mkdir -p /newroot/dev/shm && $B mount -t tmpfs -o mode=1777,nosuid,nodev shm /newroot/dev/shm \
    || fail "tmpfs /dev/shm"
$B mount -t cgroup2 -o nsdelegate cgroup2 /newroot/sys/fs/cgroup || fail "mount cgroup2"
echo "+memory +pids +cpu" >/newroot/sys/fs/cgroup/cgroup.subtree_control \
    || fail "enable memory pids cpu in the cgroup2 root"
$B mkdir -p /newroot/run/dorm-vm && $B cp /job.sh /newroot/run/dorm-vm/job.sh || fail "copy job"
exec $B switch_root /newroot /bin/sh /run/dorm-vm/job.sh
"""

JOB = r"""#!/bin/sh
# The guest's job, run from the host's root (read-only 9p) after switch_root.
exec >/dev/ttyS1 2>&1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp LANG=C.UTF-8
export PYTHONDONTWRITEBYTECODE=1 TMPDIR=/tmp
echo "guest: $(uname -r), cgroup2 root controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
# Like a systemd service: our own cgroup is not the root and holds our processes.
mkdir /sys/fs/cgroup/dorm.service && echo $$ >/sys/fs/cgroup/dorm.service/cgroup.procs
cd {repo} || exit 1
echo "guest: clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
echo "guest: pytest starts at $(cut -d" " -f1 /proc/uptime) s of uptime"
timeout -s KILL {inner_timeout} {python} -m pytest -p no:cacheprovider --color=no {args}
echo "{mark}$?"
sleep 0.3
/bin/busybox reboot -f
"""


def tmpfs_dirs(*needed: str) -> list[str]:
    """Guest dirs that get a fresh tmpfs (host content hidden), skipping any that holds a path the
    job needs: a CI clone under /tmp must stay visible (the overlay keeps it writable anyway).

    Why fresh ones at all: host state under /run (egress state files, sockets) must not look like
    the guest's own to ``cleanup_stale`` and friends.
    """
    out = []
    for d in ("tmp", "run", "var/tmp"):
        top = "/" + d
        if not any(p == top or p.startswith(top + "/") for p in map(os.path.realpath, needed)):
            out.append(d)
    return out


def build_initramfs(kernel: Kernel, job: str, fresh: list[str]) -> bytes:
    entries: list[tuple[str, int, bytes]] = [
        (d, 0o40755, b"")
        for d in ("bin", "dev", "proc", "sys", "newroot", "lower", "upper", "modules")
    ]
    entries.append(("bin/busybox", 0o100755, Path(BUSYBOX).read_bytes()))
    entries.append(("init", 0o100755, INIT.replace("{tmpfs_dirs}", " ".join(fresh)).encode()))
    entries.append(("job.sh", 0o100755, job.encode()))
    names = [ko.name for ko in kernel.modules]
    for ko in kernel.modules:
        entries.append((f"modules/{ko.name}", 0o100644, ko.read_bytes()))
    entries.append(("modules.order", 0o100644, "\n".join(names).encode() + b"\n"))
    return gzip.compress(_cpio_newc(entries), compresslevel=1)


def _die_with_parent() -> None:
    """In the forked qemu before exec: SIGKILL it if its parent dies, so a caller killed outright
    (SIGTERM/SIGKILL skip every ``finally``) leaves no VM running."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def run(
    pytest_args: list[str] | None = None,
    *,
    timeout: float = 240.0,
    memory_mib: int = 2048,
    cpus: int | None = None,
    cpu_model: str | None = None,
) -> GuestResult:
    """Boot the guest, run ``pytest <args>`` in it, and return its status and output.

    ``timeout`` bounds the whole VM (boot + tests); qemu is SIGKILLed past it.
    """
    kernel = find_kernel()
    args = ["-q"] if pytest_args is None else list(pytest_args)
    if all(a.startswith("-") for a in args):  # options only: the default selection
        args += DEFAULT_TESTS
    python = ROOT / ".venv" / "bin" / "python"
    if not python.exists():
        python = Path(sys.executable)
    job = JOB.format(
        repo=shlex.quote(str(ROOT)),
        python=shlex.quote(str(python)),
        args=" ".join(shlex.quote(a) for a in args),
        inner_timeout=max(10, int(timeout) - 20),
        mark=RC_MARK,
    )
    tmp = Path(tempfile.mkdtemp(prefix="dorm-vm-"))
    try:
        initrd = tmp / "initramfs.cpio.gz"
        fresh = tmpfs_dirs(str(ROOT), str(python), sys.base_prefix)
        initrd.write_bytes(build_initramfs(kernel, job, fresh))
        console, out = tmp / "console.log", tmp / "out.log"
        cmdline = " ".join(
            (
                "console=ttyS0",
                "cgroup_no_v1=all",  # every controller on the v2 hierarchy: pure v2
                "systemd.unified_cgroup_hierarchy=1",
                "rdinit=/init",
                "panic=-1",  # a dead init reboots, which -no-reboot turns into qemu exiting
                "quiet",
                "loglevel=4",
                "8250.nr_uarts=2",
                # TCG: without this the kernel falls back to the hpet clocksource, whose emulated
                # reads make CLOCK_MONOTONIC and the scheduler's clock disagree wildly (a 0.6 s
                # busy loop measured 1.2 s of CPU time), which breaks any CPU-quota measurement.
                *os.environ.get("DORM_VM_CMDLINE", "").split(),
            )
        )
        n = cpus or min(2, os.cpu_count() or 1)
        accel, _ = accelerator()
        # TCG: qemu64 (SSE2 only), not "max": with max's AVX2 glibc picks vector string functions
        # that TCG runs through slow helpers; measured ~2x faster here (python -c pass 0.9 s
        # against 2.9 s, importing pytest 3.8 s against 8.1 s).
        tcg_cpu = "qemu64"
        cpu = cpu_model or os.environ.get("DORM_VM_CPU") or ("host" if accel == "kvm" else tcg_cpu)
        argv = [
            QEMU,
            *("-machine", f"q35,accel={accel}", "-cpu", cpu, "-smp", str(n), "-m", str(memory_mib)),
            *("-nodefaults", "-no-user-config", "-nic", "none", "-display", "none"),
            *("-monitor", "none", "-no-reboot"),
            *("-serial", f"file:{console}", "-serial", f"file:{out}"),
            *("-kernel", str(kernel.vmlinuz), "-initrd", str(initrd), "-append", cmdline),
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ]
        t0 = time.monotonic()
        timed_out = False
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        boot: float | None = None  # host seconds until the job's first line (boot cost)
        deadline = t0 + timeout
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if boot is None and out.exists() and out.stat().st_size > 0:
                    boot = time.monotonic() - t0
                time.sleep(0.1)
            timed_out = proc.poll() is None
        finally:
            # Also on any exception here (pytest-timeout, ^C): no VM outlives its caller.
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            qemu_out, _ = proc.communicate()  # stdout is only qemu's own error messages
        seconds = time.monotonic() - t0
        text = out.read_text(errors="replace") if out.exists() else ""
        cons = console.read_text(errors="replace") if console.exists() else ""
        if qemu_out:
            cons += "\n[qemu] " + qemu_out.decode(errors="replace")
        if proc.returncode not in (0, None) and not timed_out:
            cons += f"\n[qemu exited with status {proc.returncode}]"
        rc: int | None = None
        for line in text.splitlines():
            if line.startswith(RC_MARK):
                with contextlib.suppress(ValueError):
                    rc = int(line[len(RC_MARK) :].strip())
        return GuestResult(accelerator()[1], rc, text, cons, seconds, timed_out, boot)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str]) -> int:
    reason = unavailable_reason()
    if reason is not None:
        print(f"cgroup v2 guest cannot run: {reason}", file=sys.stderr)
        return 2
    result = run(argv or None, timeout=float(os.environ.get("DORM_VM_TIMEOUT", "240")))
    sys.stdout.write(result.output)
    if result.rc is None:
        sys.stdout.write("\n--- guest console ---\n" + result.console[-6000:])
    boot = "?" if result.boot_seconds is None else f"{result.boot_seconds:.1f}"
    print(
        f"\nguest ({result.accel}): {result.seconds:.1f} s, job started after {boot} s,"
        f" inner pytest status {result.rc}"
        + (" (VM killed at its time limit)" if result.timed_out else "")
    )
    return 1 if result.rc is None else result.rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
