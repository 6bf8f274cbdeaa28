"""favordynmods cannot be turned on: `dynmods.enable` says why, and the gateway starts anyway.

Each case runs in a private mount namespace (`unshare --mount --propagation private`), where
/sys/fs/cgroup is replaced by a tmpfs holding only what the case needs: the host's own mounts,
and its favordynmods setting, stay exactly as they were (the namespace's mounts are private, so
unmounting the cgroup hierarchies there does not propagate). The host already has favordynmods on
(a sandboxing gateway turns it on, and on Linux 6.18+ it lasts until reboot), so "hidden from
view" is the only way to see a host where it is off.

* no root: the v1 hierarchies are visible (none with favordynmods), the process is uid 65534;
* no cgroup hierarchy at all: /sys/fs/cgroup is an empty tmpfs;
* only cgroup v1 hierarchies (no cgroup2 mount): a v1 hierarchy takes favordynmods only when it
  is first mounted, so `enable` says so without trying, and a whole sandboxing gateway logs a
  warning and serves sandboxed apps;
and the remount `enable` makes keeps the mount's own flags (nosuid, nodev, noexec, atime), and
targets only a cgroup2 mount that is reachable at its path (not one another mount covers).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sandboxes import cgroups, detect_isolation, dynmods
from tests.conftest import ROOT, Gateway, echo_spec
from tests.test_pools import app_dir
from tests.test_pools import spec as pool_spec

LEVEL = detect_isolation()
pytestmark = pytest.mark.skipif(
    LEVEL != "sandbox", reason=f"private mount namespaces and cgroups need root; host: {LEVEL}"
)

# What `enable` says, as JSON: {"result": ...} or {"error": type, "message": ...}; `active()` too.
PROBE = """\
import json, os, sys
from sandboxes import dynmods
if sys.argv[1] == "nobody":
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
out = {"euid": os.geteuid(), "active": dynmods.active()}
try:
    out["result"] = dynmods.enable()
except OSError as exc:
    out["error"], out["message"] = type(exc).__name__, str(exc)
print(json.dumps(out))
"""


def v1_hierarchies_without_favordynmods() -> list[tuple[str, str]]:
    """(mount point, super options) of the host's cgroup v1 hierarchies that lack the option."""
    found = []
    for mount in cgroups._mounts():
        if mount.fstype == "cgroup" and "favordynmods" not in mount.super_options:
            options = ",".join(sorted(o for o in mount.super_options if o not in ("rw", "ro")))
            found.append((mount.mountpoint, options))
    return found


def hide_cgroups(keep_v1: bool) -> str:
    """Shell commands for a private mount namespace: an empty tmpfs on /sys/fs/cgroup, and with
    `keep_v1` the host's v1 hierarchies mounted on it again (the same hierarchies: mounting one
    again only makes another mount of it, and changes nothing on the host)."""
    # Unmounted first: a mount covered by another is still listed in mountinfo.
    lines = [
        "set -e",
        "umount -R /sys/fs/cgroup",
        "mount -t tmpfs -o mode=755 dorm-test /sys/fs/cgroup",
    ]
    if keep_v1:
        for mountpoint, options in v1_hierarchies_without_favordynmods():
            path = shlex.quote(mountpoint)
            lines.append(f"mkdir -p {path}")
            lines.append(f"mount -t cgroup -o {shlex.quote(options)} cgroup {path}")
    return "\n".join(lines)


def in_private_namespace(setup: str, *command: str) -> list[str]:
    """`command`, run after `setup` in a private mount namespace of its own."""
    script = setup + '\nexec "$@"'
    unshare = ["unshare", "--mount", "--propagation", "private", "--"]
    return [*unshare, "sh", "-c", script, "sh", *command]


def run_json(setup: str, script: str, *args: str) -> dict[str, Any]:
    """What Python `script` (with `args`) prints as JSON, run after `setup` in a private mount
    namespace of its own."""
    done = subprocess.run(
        in_private_namespace(setup, sys.executable, "-c", script, *args),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def probe(setup: str, who: str) -> dict[str, Any]:
    return run_json(setup, PROBE, who)


@pytest.mark.skipif(
    not v1_hierarchies_without_favordynmods(),
    reason="no cgroup v1 hierarchy without favordynmods here to show an unprivileged process",
)
def test_without_root_enable_refuses_saying_so() -> None:
    out = probe(hide_cgroups(keep_v1=True), "nobody")
    assert out["euid"] == 65534 and out["active"] is None, out  # there is something to turn on
    assert out.get("error") == "PermissionError", out
    assert out["message"] == "remounting a cgroup hierarchy needs root", out


def test_without_any_cgroup_hierarchy_enable_says_none_is_mounted() -> None:
    out = probe(hide_cgroups(keep_v1=False), "root")
    assert out["euid"] == 0 and out["active"] is None, out
    assert out.get("error") == "FileNotFoundError", out
    assert out["message"] == "no cgroup hierarchy is mounted", out


COVERED_PROBE = """\
import json
from sandboxes import cgroups
backend, reason, _ = cgroups.probe()
mounts = [m.mountpoint for m in cgroups._mounts()]
print(json.dumps({"mounts": mounts, "backend": backend is not None, "reason": reason}))
"""


def test_cgroup_mounts_covered_by_another_mount_are_not_used() -> None:
    """A tmpfs mounted over /sys/fs/cgroup without unmounting anything: mountinfo still lists
    every hierarchy under it, but none is reachable there, so no backend is built on them (one
    was, and every sandboxed start then failed with ENOENT on cgroup.procs). Their paths exist
    again on the tmpfs, as plain directories: only the device tells them apart."""
    dirs = " ".join(shlex.quote(m.mountpoint) for m in cgroups._mounts())
    setup = f"set -e\nmount -t tmpfs -o mode=755 dorm-test /sys/fs/cgroup\nmkdir -p {dirs}"
    out = run_json(setup, COVERED_PROBE)
    assert not any(m.startswith("/sys/fs/cgroup") for m in out["mounts"]), out
    assert out["backend"] is False and "no cgroup version" in out["reason"], out
    assert cgroups._mounts()  # out here, the host's hierarchies are all still listed


def test_gateway_without_cgroups_still_starts_and_serves(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory('isolation = "auto"', start=False)
    gw.start(wrapper=in_private_namespace(hide_cgroups(keep_v1=False)))
    gw.put_app("echo", echo_spec())
    assert gw.request("/", host="echo.localhost").status == 200
    log = gw.log()
    assert "ISOLATION IS OFF" in log and "no usable cgroups" in log, log
    assert "favordynmods" not in log  # nothing to remount: not even tried


@pytest.mark.skipif(
    not v1_hierarchies_without_favordynmods(),
    reason="needs cgroup v1 hierarchies without favordynmods to offer the gateway",
)
def test_gateway_on_a_v1_only_host_warns_and_serves_sandboxed(
    gateway_factory: Any, tmp_path: Path
) -> None:
    # Root, v1 cgroups and seccomp: sandbox-capable, so the gateway tries; a v1 hierarchy cannot
    # take the option on a remount, which it is told instead of trying one that always fails.
    gw: Gateway = gateway_factory('isolation = "auto"', start=False)
    gw.start(wrapper=in_private_namespace(hide_cgroups(keep_v1=True)))
    log = gw.log()
    assert "cgroup favordynmods not enabled (cgroup joins stay slow)" in log, log
    assert "a cgroup v1 hierarchy takes favordynmods only when it is first mounted" in log, log
    assert "instances run sandboxed" in log, log
    gw.put_app("boxed", pool_spec(app_dir(tmp_path)))
    resp = gw.request("/", host="boxed.localhost")
    assert resp.status == 200, resp
    inst = gw.instance("boxed")
    assert inst is not None and inst["isolation"] == "sandbox", inst


def test_a_v1_hierarchy_refuses_favordynmods_on_a_remount(tmp_path: Path) -> None:
    """Why enable() does not try v1: the kernel refuses it. Shown on a v1 hierarchy of the
    test's own (named, no controllers, mounted in a private namespace and gone with it), so no
    hierarchy the host uses is touched."""
    name = f"dorm-test-{os.getpid()}"
    where = tmp_path / "v1"
    where.mkdir()
    script = (
        f"mount -t cgroup -o none,name={name} cgroup {where}\n"
        f"mount -o remount,none,name={name},favordynmods {where} 2>&1 || echo REFUSED\n"
        f"grep ' {where} ' /proc/self/mountinfo"
    )
    done = subprocess.run(
        in_private_namespace(script), capture_output=True, text=True, timeout=30, check=True
    )
    assert "REFUSED" in done.stdout, done.stdout
    assert "favordynmods" not in done.stdout.splitlines()[-1], done.stdout


# Mounts a tmpfs with per-mount flags dynmods keeps (nosuid, nodev, noexec, noatime), remounts
# it with the flags remount_arguments computes (tmpfs's own data instead of favordynmods), and
# prints mountinfo's options before and after, and after a remount with no flags at all.
KEEPS_FLAGS = """import json, sys
from sandboxes import dynmods, libc
path = sys.argv[1]
def options():
    for line in open("/proc/self/mountinfo"):
        fields = line.split(" - ")[0].split()
        if fields[4] == path:
            return sorted(fields[5].split(","))
libc.mount(b"dorm-test", path.encode(), b"tmpfs", 0, b"size=1m")
libc.mount(None, path.encode(), None,
           libc.MS_REMOUNT | libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC | 0x400, b"size=1m")
before = options()
mount = dynmods.Cgroup2Mount(path, frozenset(before), frozenset({"rw"}))
flags, _ = dynmods.remount_arguments(mount)
libc.mount(None, path.encode(), None, flags, b"size=2m")
bare = dynmods.Cgroup2Mount(path, frozenset({"rw"}), frozenset({"rw"}))
after = options()
libc.mount(None, path.encode(), None, dynmods.remount_arguments(bare)[0], b"size=2m")
print(json.dumps({"before": before, "after": after, "bare": options()}))
"""


def test_the_remount_keeps_the_mounts_own_flags(tmp_path: Path) -> None:
    where = tmp_path / "scratch"
    where.mkdir()
    out = run_json("true", KEEPS_FLAGS, str(where))
    assert {"nosuid", "nodev", "noexec", "noatime"} <= set(out["before"]), out
    assert out["after"] == out["before"], out  # remounted, and nothing about the mount changed
    # What a remount with no flags does, as enable() did before: these are gone (the kernel
    # keeps the atime setting when none is passed).
    assert not {"nosuid", "nodev", "noexec"} & set(out["bare"]), out


def test_only_a_reachable_cgroup2_mount_is_a_target(tmp_path: Path) -> None:
    """mountinfo also lists mounts something else covers: a remount by path would hit the
    cover. Real mount points, with the device they really have and with another one."""
    mounts = [m for m in cgroups._mounts() if m.fstype == "cgroup2"]
    if not mounts:
        pytest.skip("no cgroup2 mount here")
    real = mounts[0].mountpoint
    dev = os.stat(real).st_dev
    major, minor = os.major(dev), os.minor(dev)
    line = "40 31 {dev} / {where} rw,nosuid,relatime shared:9 - cgroup2 cgroup2 {sup}\n"
    info = tmp_path / "mountinfo"
    info.write_text(
        line.format(dev=f"{major}:{minor}", where=real, sup="ro,nsdelegate")
        + line.format(dev=f"{major}:{minor + 1000}", where=real, sup="rw")  # covered
        + line.format(dev=f"{major}:{minor}", where=tmp_path / "nowhere", sup="rw")  # gone
    )
    found = dynmods.cgroup2_mounts(str(info))
    assert len(found) == 1, found
    assert found[0].mountpoint == real and found[0].read_only, found
    assert found[0].mount_options == {"rw", "nosuid", "relatime"}, found
    flags, data = dynmods.remount_arguments(found[0])
    assert data == b"nsdelegate,favordynmods", data
    assert flags & 0x2 and flags & 0x200000 and not flags & 0x1, hex(flags)
