"""Cgroups v1 and v2 behind one interface, chosen once by ``detect()``.

Why both: production hosts are mostly pure cgroup v2, but this machine and CI have the memory, cpu
and pids controllers bound to v1 hierarchies (with an empty v2 mount beside them). A controller can
be attached to only one hierarchy, so detection picks whichever version actually holds the
controllers we need.

Layout: every sandbox gets ``<hierarchy>/<our own cgroup>/<parent>/<name>`` where ``<our own
cgroup>`` is the caller's cgroup in that hierarchy (read from /proc/self/cgroup). Nesting under our
own cgroup keeps sandboxes inside whatever limits the service manager put on dorm itself, and makes
crash recovery a directory scan of ``<parent>``.

The expensive parts (mkdir, limit writes, opening ``cgroup.procs``) happen in the fork server
before forking; the child only writes ``0`` into the pre-opened ``cgroup.procs`` descriptors
to join.
"""

from __future__ import annotations

import abc
import contextlib
import os
import signal
import time
from dataclasses import dataclass
from typing import Final

from . import mountinfo
from .errors import CgroupUnavailable

REQUIRED: Final = ("memory", "pids", "cpu")
CFS_PERIOD_US: Final = 100_000
# v2: the leaf dorm's own processes move to when its cgroup starts delegating (see prepare).
SUPERVISOR: Final = "supervisor"


@dataclass(frozen=True, slots=True)
class Limits:
    memory: int | None = None
    memory_high: int | None = None
    cpu: float | None = None
    cpu_weight: int | None = None
    pids: int | None = None


def _mounts() -> list[mountinfo.Mount]:
    """The cgroup hierarchies reachable at their mount points (a covered one would fail every
    start with ENOENT on cgroup.procs). ``super_options`` holds a v1 hierarchy's controllers."""
    return mountinfo.reachable(("cgroup", "cgroup2"))


def _own_cgroups() -> dict[str, str]:
    """Controller name (or '' for v2) → our cgroup path in that hierarchy."""
    own: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            hid, controllers, path = line.rstrip("\n").split(":", 2)
            if hid == "0" and controllers == "":
                own[""] = path
            else:
                for c in controllers.split(","):
                    own[c] = path
    return own


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _read_keyed(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in _read(path).splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[key] = int(value)
    return out


def _read_int(path: str) -> int | None:
    try:
        return int(_read(path).strip())
    except (OSError, ValueError):
        return None


def _procs(directory: str) -> list[int]:
    try:
        return [int(x) for x in _read(os.path.join(directory, "cgroup.procs")).split()]
    except FileNotFoundError:
        return []


def _kill_dirs(dirs: tuple[str, ...], timeout: float) -> None:
    """SIGKILL every process listed in any of ``dirs`` until all are empty (or raise)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = {p for d in dirs for p in _procs(d)}
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes {sorted(pids)} survive SIGKILL in {dirs}")
        time.sleep(0.001)


def _rmdirs(dirs: tuple[str, ...], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for d in dirs:
        while True:
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != 16 or time.monotonic() > deadline:  # EBUSY: last task still exiting
                    raise
                time.sleep(0.001)


class CgroupHandle(abc.ABC):
    """One sandbox's cgroup directory (one per v1 hierarchy, a single one on v2)."""

    version: int = 0

    def __init__(self, dirs: tuple[str, ...]) -> None:
        self.dirs = dirs

    @property
    def path(self) -> str:
        return self.dirs[0]

    def open_join_fds(self) -> list[int]:
        """``cgroup.procs`` opened for writing, so the child joins with one ``write(fd, b"0")``."""
        return [
            os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC) for d in self.dirs
        ]

    def add_pid(self, pid: int) -> None:
        for d in self.dirs:
            _write(os.path.join(d, "cgroup.procs"), str(pid))

    def pids(self) -> set[int]:
        return {p for d in self.dirs for p in _procs(d)}

    def exists(self) -> bool:
        return any(os.path.isdir(d) for d in self.dirs)

    def kill_all(self, timeout: float = 5.0) -> None:
        _kill_dirs(self.dirs, timeout)

    def remove(self, timeout: float = 5.0) -> None:
        """Kill whatever is left, then remove the directories (also after a crash)."""
        self.kill_all(timeout)
        _rmdirs(self.dirs, timeout)

    @abc.abstractmethod
    def oom_killed(self) -> bool: ...

    @abc.abstractmethod
    def stats(self) -> dict[str, int | None]: ...


class V1Handle(CgroupHandle):
    version = 1

    def __init__(self, dirs: tuple[str, ...], by_controller: dict[str, str]) -> None:
        super().__init__(dirs)
        self.by_controller = by_controller

    def _f(self, controller: str, name: str) -> str:
        return os.path.join(self.by_controller[controller], name)

    def oom_killed(self) -> bool:
        return _read_keyed(self._f("memory", "memory.oom_control")).get("oom_kill", 0) > 0

    def stats(self) -> dict[str, int | None]:
        usage_ns = (
            _read_int(self._f("cpuacct", "cpuacct.usage"))
            if "cpuacct" in self.by_controller
            else None
        )
        return {
            "memory_current": _read_int(self._f("memory", "memory.usage_in_bytes")),
            "memory_peak": _read_int(self._f("memory", "memory.max_usage_in_bytes")),
            "cpu_usage_usec": None if usage_ns is None else usage_ns // 1000,
            "pids_current": _read_int(self._f("pids", "pids.current")),
            "oom_kills": _read_keyed(self._f("memory", "memory.oom_control")).get("oom_kill", 0),
        }


class V2Handle(CgroupHandle):
    version = 2

    def kill_all(self, timeout: float = 5.0) -> None:
        kill_file = os.path.join(self.path, "cgroup.kill")
        if os.path.exists(kill_file):  # Linux 5.14+: atomic, races no fork
            with contextlib.suppress(FileNotFoundError):
                _write(kill_file, "1")
        _kill_dirs(self.dirs, timeout)

    def oom_killed(self) -> bool:
        return _read_keyed(os.path.join(self.path, "memory.events")).get("oom_kill", 0) > 0

    def oom_kills(self) -> int:
        """How many times the sandbox was OOM-killed.

        Why not simply ``oom_kill``: with ``memory.oom.group`` 1 (which ``apply_limits`` sets) the
        kernel counts the victim twice in ``oom_kill`` (once as the chosen victim, once while
        killing every member of the group), so one OOM of a one-process sandbox reads 2 (seen in
        the cgroup v2 guest, Linux 6.1). ``oom_group_kill`` (5.17+) counts group kills once each;
        without it (older kernels, or oom.group 0) ``oom_kill`` is the count.
        """
        events = _read_keyed(os.path.join(self.path, "memory.events"))
        return events.get("oom_group_kill", 0) or events.get("oom_kill", 0)

    def stats(self) -> dict[str, int | None]:
        cpu = _read_keyed(os.path.join(self.path, "cpu.stat"))
        return {
            "memory_current": _read_int(os.path.join(self.path, "memory.current")),
            "memory_peak": _read_int(os.path.join(self.path, "memory.peak")),
            "cpu_usage_usec": cpu.get("usage_usec"),
            "pids_current": _read_int(os.path.join(self.path, "pids.current")),
            "oom_kills": self.oom_kills(),
        }


class CgroupBackend(abc.ABC):
    """Creates, finds and limits sandbox cgroups for one cgroup version."""

    version: int = 0
    reason: str = ""

    def create(self, parent: str, name: str, limits: Limits) -> CgroupHandle:
        """mkdir + limits; the caller then moves a process in."""
        handle = self.make(parent, name)
        try:
            self.apply_limits(handle, limits)
        except BaseException:
            with contextlib.suppress(OSError):
                _rmdirs(handle.dirs, 1.0)
            raise
        return handle

    @abc.abstractmethod
    def make(self, parent: str, name: str) -> CgroupHandle:
        """Create an empty, unlimited cgroup (a pre-forked child waits in it)."""
        ...

    @abc.abstractmethod
    def apply_limits(
        self, handle: CgroupHandle, limits: Limits, reset: frozenset[str] = frozenset()
    ) -> None:
        """Write every limit that is set; ``reset`` names fields (of ``Limits``) that are None in
        ``limits`` but were written before, and are put back to the kernel's "unlimited"."""
        ...

    @staticmethod
    def _to_reset(limits: Limits, applied: Limits | None) -> frozenset[str]:
        """Fields ``applied`` (at prewarm) set that ``limits`` leaves unlimited.

        Why: an idle child pre-limited for one spec can be taken by a spawn of another ("any idle
        child will do"); skipping a None field would leave the prewarm's value in force, e.g. a
        256 MiB memory.max on a sandbox asked to be unlimited.
        """
        if applied is None:
            return frozenset()
        return frozenset(
            f
            for f in ("memory", "memory_high", "cpu", "cpu_weight", "pids")
            if getattr(limits, f) is None and getattr(applied, f) is not None
        )

    @abc.abstractmethod
    def activate(
        self, handle: CgroupHandle, name: str, limits: Limits, applied: Limits | None = None
    ) -> CgroupHandle:
        """Turn a pre-joined idle cgroup into the instance's: name it (where the kernel allows
        renaming, i.e. v1) and write the limits (unless ``applied`` at prewarm already equals
        them), before any tenant code runs.

        Why not simply move the child in now: a cgroup migration takes the threadgroup rwsem for
        writing, which waits for an RCU grace period; after an idle spell that measured 5-20 ms
        here, on every cold start. Joining ahead of time and renaming keeps it off the path.
        """
        ...

    @abc.abstractmethod
    def handle(self, parent: str, name: str) -> CgroupHandle: ...

    @abc.abstractmethod
    def list_children(self, parent: str) -> list[str]: ...

    @abc.abstractmethod
    def remove_parent(self, parent: str) -> None:
        """Remove ``parent`` itself once empty (tests use throwaway parents)."""
        ...

    @abc.abstractmethod
    def describe(self) -> dict[str, object]: ...


class V1Backend(CgroupBackend):
    """cgroup v1: one directory per controller hierarchy (memory, cpu, pids; cpuacct for stats)."""

    version = 1

    def __init__(self, hierarchies: dict[str, str], own: dict[str, str]) -> None:
        # controller → absolute directory of *our own* cgroup in that hierarchy
        self.own_dirs = {
            c: os.path.join(m, own.get(c, "/").lstrip("/")) for c, m in hierarchies.items()
        }
        self.reason = "cgroup v1 controllers: " + ", ".join(
            f"{c} at {m}" for c, m in sorted(hierarchies.items())
        )

    def _dirs(self, parent: str, name: str | None) -> dict[str, str]:
        out: dict[str, str] = {}
        for c, own in self.own_dirs.items():
            out[c] = os.path.join(own, parent) if name is None else os.path.join(own, parent, name)
        return out

    def _handle(self, by_controller: dict[str, str]) -> V1Handle:
        unique = tuple(dict.fromkeys(by_controller.values()))
        return V1Handle(unique, by_controller)

    def make(self, parent: str, name: str) -> CgroupHandle:
        handle = self._handle(self._dirs(parent, name))
        for d in self._dirs(parent, None).values():
            os.makedirs(d, exist_ok=True)
        made: list[str] = []
        try:
            for d in handle.dirs:
                os.mkdir(d)
                made.append(d)
        except BaseException:
            for d in made:
                with contextlib.suppress(OSError):
                    os.rmdir(d)
            raise
        return handle

    def apply_limits(
        self, handle: CgroupHandle, limits: Limits, reset: frozenset[str] = frozenset()
    ) -> None:
        assert isinstance(handle, V1Handle)
        by_controller = handle.by_controller
        mem = by_controller["memory"]
        if limits.memory is not None or "memory" in reset:
            limit = os.path.join(mem, "memory.limit_in_bytes")
            memsw = os.path.join(mem, "memory.memsw.limit_in_bytes")
            value = -1 if limits.memory is None else limits.memory  # -1: unlimited
            if not os.path.exists(memsw):
                _write(limit, str(value))
            else:
                # swap accounting on: memory+swap == memory → no swap. v1 requires
                # memsw >= limit at every moment, so a raise writes memsw first, a cut limit first.
                with open(limit) as fh:
                    raising = value == -1 or value > int(fh.read())
                order = (memsw, limit) if raising else (limit, memsw)
                for path in order:
                    _write(path, str(value))
        _write(os.path.join(mem, "memory.swappiness"), "0")
        if limits.pids is not None or "pids" in reset:
            value_s = "max" if limits.pids is None else str(limits.pids)
            _write(os.path.join(by_controller["pids"], "pids.max"), value_s)
        cpu = by_controller["cpu"]
        if limits.cpu is not None:
            _write(os.path.join(cpu, "cpu.cfs_period_us"), str(CFS_PERIOD_US))
            _write(os.path.join(cpu, "cpu.cfs_quota_us"), str(int(limits.cpu * CFS_PERIOD_US)))
        elif "cpu" in reset:
            _write(os.path.join(cpu, "cpu.cfs_quota_us"), "-1")
        if limits.cpu_weight is not None:
            # v2 weight 100 == v1 shares 1024 (the same mapping systemd and runc use)
            shares = max(2, min(262144, limits.cpu_weight * 1024 // 100))
            _write(os.path.join(cpu, "cpu.shares"), str(shares))
        elif "cpu_weight" in reset:
            _write(os.path.join(cpu, "cpu.shares"), "1024")

    def activate(
        self, handle: CgroupHandle, name: str, limits: Limits, applied: Limits | None = None
    ) -> CgroupHandle:
        assert isinstance(handle, V1Handle)
        renamed: dict[str, str] = {}
        moved: dict[str, str] = {}
        for c, d in handle.by_controller.items():
            if d not in moved:
                moved[d] = os.path.join(os.path.dirname(d), name)
                os.rename(d, moved[d])
            renamed[c] = moved[d]
        new = self._handle(renamed)
        if applied != limits:
            self.apply_limits(new, limits, self._to_reset(limits, applied))
        return new

    def handle(self, parent: str, name: str) -> CgroupHandle:
        return self._handle(self._dirs(parent, name))

    def list_children(self, parent: str) -> list[str]:
        names: set[str] = set()
        for d in self._dirs(parent, None).values():
            with contextlib.suppress(FileNotFoundError):
                names.update(e.name for e in os.scandir(d) if e.is_dir())
        return sorted(names)

    def remove_parent(self, parent: str) -> None:
        _rmdirs(tuple(dict.fromkeys(self._dirs(parent, None).values())), 1.0)

    def describe(self) -> dict[str, object]:
        return {"version": 1, "controllers": sorted(self.own_dirs), "reason": self.reason}


class V2Backend(CgroupBackend):
    """cgroup v2: one directory; controllers enabled top-down through ``cgroup.subtree_control``.

    v2 forbids processes in a cgroup that delegates controllers to children ("no internal
    processes"). If our own cgroup is not the root and holds processes (the usual systemd service
    case), ``prepare`` moves them into a ``<own>/supervisor`` leaf first, as container runtimes
    do.
    """

    version = 2

    def __init__(self, mountpoint: str, own: str, controllers: frozenset[str]) -> None:
        self.mountpoint = mountpoint
        self.own_dir = os.path.join(mountpoint, _v2_own(mountpoint, own).lstrip("/"))
        self.controllers = controllers
        self.reason = f"cgroup v2 at {mountpoint} with controllers {', '.join(sorted(controllers))}"
        self._prepared: set[str] = set()

    def _enable(self, directory: str) -> None:
        wanted = [c for c in REQUIRED if c in self.controllers]
        if not wanted:
            return
        _write(os.path.join(directory, "cgroup.subtree_control"), " ".join(f"+{c}" for c in wanted))

    def prepare(self, parent: str) -> str:
        base = os.path.join(self.own_dir, parent)
        if base in self._prepared:
            return base
        if os.path.realpath(self.own_dir) != os.path.realpath(self.mountpoint):
            try:
                self._enable(self.own_dir)
            except OSError as e:
                if e.errno != 16:  # EBUSY: we are an inner node holding processes
                    raise
                leaf = os.path.join(self.own_dir, SUPERVISOR)
                os.makedirs(leaf, exist_ok=True)
                for pid in _procs(self.own_dir):
                    with contextlib.suppress(ProcessLookupError):
                        _write(os.path.join(leaf, "cgroup.procs"), str(pid))
                self._enable(self.own_dir)
        else:
            self._enable(self.own_dir)
        os.makedirs(base, exist_ok=True)
        self._enable(base)
        self._prepared.add(base)
        return base

    def make(self, parent: str, name: str) -> CgroupHandle:
        base = self.prepare(parent)
        d = os.path.join(base, name)
        os.mkdir(d)
        return V2Handle((d,))

    def apply_limits(
        self, handle: CgroupHandle, limits: Limits, reset: frozenset[str] = frozenset()
    ) -> None:
        d = handle.path
        has = self.controllers
        if "memory" in has:
            # Absent when the kernel does no swap accounting (built without it): then swap cannot
            # be limited here, as on v1 without memsw (v1 skips it too).
            swap = os.path.join(d, "memory.swap.max")
            if limits.memory is not None:
                _write(os.path.join(d, "memory.max"), str(limits.memory))
                if os.path.exists(swap):
                    _write(swap, "0")
                if os.path.exists(os.path.join(d, "memory.oom.group")):
                    _write(os.path.join(d, "memory.oom.group"), "1")
            elif "memory" in reset:
                _write(os.path.join(d, "memory.max"), "max")
                if os.path.exists(swap):
                    _write(swap, "max")
            if limits.memory_high is not None:
                _write(os.path.join(d, "memory.high"), str(limits.memory_high))
            elif "memory_high" in reset:
                _write(os.path.join(d, "memory.high"), "max")
        if "pids" in has and (limits.pids is not None or "pids" in reset):
            _write(os.path.join(d, "pids.max"), "max" if limits.pids is None else str(limits.pids))
        if "cpu" in has:
            if limits.cpu is not None:
                _write(
                    os.path.join(d, "cpu.max"),
                    f"{int(limits.cpu * CFS_PERIOD_US)} {CFS_PERIOD_US}",
                )
            elif "cpu" in reset:
                _write(os.path.join(d, "cpu.max"), f"max {CFS_PERIOD_US}")
            if limits.cpu_weight is not None:
                _write(os.path.join(d, "cpu.weight"), str(limits.cpu_weight))
            elif "cpu_weight" in reset:
                _write(os.path.join(d, "cpu.weight"), "100")  # the kernel's default

    def activate(
        self, handle: CgroupHandle, name: str, limits: Limits, applied: Limits | None = None
    ) -> CgroupHandle:
        # cgroup2 directories cannot be renamed (no kernfs rename op): the pool-generated name
        # stays; the Sandbox handle carries the path.
        if applied != limits:
            self.apply_limits(handle, limits, self._to_reset(limits, applied))
        return handle

    def handle(self, parent: str, name: str) -> CgroupHandle:
        return V2Handle((os.path.join(self.own_dir, parent, name),))

    def list_children(self, parent: str) -> list[str]:
        with contextlib.suppress(FileNotFoundError):
            return sorted(
                e.name for e in os.scandir(os.path.join(self.own_dir, parent)) if e.is_dir()
            )
        return []

    def remove_parent(self, parent: str) -> None:
        _rmdirs((os.path.join(self.own_dir, parent),), 1.0)
        self._prepared.discard(os.path.join(self.own_dir, parent))

    def describe(self) -> dict[str, object]:
        return {
            "version": 2,
            "controllers": sorted(self.controllers),
            "mountpoint": self.mountpoint,
            "reason": self.reason,
        }


def _v2_own(mountpoint: str, own: str) -> str:
    """dorm's own v2 cgroup for a process whose /proc/self/cgroup says ``own``.

    Why: ``V2Backend.prepare`` moves every process of dorm's cgroup into ``<own>/supervisor``.
    Processes started after that (a restarted fork server, the runner's spawner) inherit the
    leaf; taking it as their own cgroup would nest their sandboxes under it (where
    ``cleanup_stale`` of the first layout never looks) and move everyone one level deeper on
    each start. A ``supervisor`` leaf whose parent delegates controllers is ours: use the parent.
    """
    head, tail = os.path.split(own.rstrip("/"))
    if tail != SUPERVISOR:
        return own
    try:
        delegating = _read(
            os.path.join(mountpoint, head.lstrip("/"), "cgroup.subtree_control")
        ).split()
    except OSError:
        return own
    return head or "/" if delegating else own


def _v2_controllers(mountpoint: str, own: str) -> frozenset[str]:
    try:
        text = _read(os.path.join(mountpoint, own.lstrip("/"), "cgroup.controllers"))
    except OSError:
        try:
            text = _read(os.path.join(mountpoint, "cgroup.controllers"))
        except OSError:
            return frozenset()
    return frozenset(text.split())


def probe() -> tuple[CgroupBackend | None, str, dict[str, object]]:
    """Inspect the host: (backend or None, reason, raw facts for ``dorm doctor``)."""
    mounts = _mounts()
    own = _own_cgroups()
    v1: dict[str, str] = {}
    v2_mounts: list[str] = []
    for m in mounts:
        if m.fstype == "cgroup":
            for c in ("memory", "pids", "cpu", "cpuacct"):
                if c in m.super_options and c not in v1:
                    v1[c] = m.mountpoint
        elif m.fstype == "cgroup2":
            v2_mounts.append(m.mountpoint)
    v2_info: dict[str, list[str]] = {}
    for mp in v2_mounts:
        v2_info[mp] = sorted(_v2_controllers(mp, own.get("", "/")))
    facts: dict[str, object] = {"v1_hierarchies": dict(v1), "v2_mounts": v2_info}
    for mp in v2_mounts:
        have = frozenset(v2_info[mp])
        if all(c in have for c in REQUIRED):
            backend: CgroupBackend = V2Backend(mp, own.get("", "/"), have)
            return backend, backend.reason, facts
    if all(c in v1 for c in REQUIRED):
        backend = V1Backend(v1, own)
        return backend, backend.reason, facts
    parts = []
    for mp, ctrls in v2_info.items():
        parts.append(f"cgroup2 at {mp} has controllers [{', '.join(ctrls)}]")
    parts.append(f"cgroup v1 hierarchies for [{', '.join(sorted(v1))}]")
    missing = [c for c in REQUIRED if c not in v1]
    reason = (
        "no cgroup version holds all of memory, pids, cpu: "
        + "; ".join(parts)
        + (f"; v1 lacks {', '.join(missing)}" if v1 else "")
    )
    return None, reason, facts


def v2_unavailable_reason() -> str | None:
    """Why the v2 backend cannot be tested with controllers here (None when it can)."""
    mounts = [m.mountpoint for m in _mounts() if m.fstype == "cgroup2"]
    if not mounts:
        return "no cgroup2 filesystem is mounted"
    own = _own_cgroups().get("", "/")
    for mp in mounts:
        ctrls = _v2_controllers(mp, own)
        if all(c in ctrls for c in REQUIRED):
            return None
    return "; ".join(
        f"cgroup2 at {mp} offers controllers [{', '.join(sorted(_v2_controllers(mp, own)))}]"
        f" (memory, pids and cpu are bound to cgroup v1 hierarchies)"
        for mp in mounts
    )


_backend: CgroupBackend | None = None


def detect() -> CgroupBackend:
    """The backend for this host (cached: detection reads /proc once per process)."""
    global _backend
    if _backend is None:
        backend, reason, _ = probe()
        if backend is None:
            raise CgroupUnavailable(reason)
        _backend = backend
    return _backend
