"""favordynmods cannot be turned on: `dynmods.enable` says why, and the gateway starts anyway.

Each case runs in a private mount namespace (`unshare --mount --propagation private`), where
/sys/fs/cgroup is replaced by a tmpfs holding only what the case needs: the host's own mounts,
and its favordynmods setting, stay exactly as they were (the namespace's mounts are private, so
unmounting the cgroup hierarchies there does not propagate). The host already has favordynmods on
(a sandboxing gateway turns it on, and on Linux 6.18+ it lasts until reboot), so "hidden from
view" is the only way to see a host where it is off.

* no root: the v1 hierarchies are visible (none with favordynmods), the process is uid 65534;
* no cgroup hierarchy at all: /sys/fs/cgroup is an empty tmpfs;
* root without CAP_SYS_ADMIN (a container, say): the kernel refuses the remount with EPERM, and
  a whole gateway, which still counts as sandbox-capable there, logs a warning and serves.
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

from sandboxes import cgroups, detect_isolation
from tests.conftest import ROOT, Gateway, echo_spec

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
        if mount.fstype == "cgroup" and "favordynmods" not in mount.options:
            options = ",".join(sorted(o for o in mount.options if o not in ("rw", "ro")))
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


def probe(setup: str, who: str) -> dict[str, Any]:
    done = subprocess.run(
        in_private_namespace(setup, sys.executable, "-c", PROBE, who),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


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
def test_gateway_whose_remount_is_refused_warns_and_serves(gateway_factory: Any) -> None:
    # Root, cgroups and seccomp: the gateway counts itself sandbox-capable and tries the
    # remount, which the kernel refuses without CAP_SYS_ADMIN (as in many containers).
    gw: Gateway = gateway_factory('isolation = "auto"', start=False)
    drop = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", "--"]
    gw.start(wrapper=in_private_namespace(hide_cgroups(keep_v1=True), *drop))
    assert gw.proc is not None
    status = Path(f"/proc/{gw.proc.pid}/status").read_text()
    cap_eff = int(
        next(line for line in status.splitlines() if line.startswith("CapEff")).split()[1], 16
    )
    assert not cap_eff & (1 << 21), status  # CAP_SYS_ADMIN (21) is really gone
    log = gw.log()
    assert "cgroup favordynmods not enabled (cgroup joins stay slow)" in log, log
    assert "Operation not permitted" in log, log
    # Still up: the admin API answers and an unconfined app is served.
    gw.put_app("echo", echo_spec(isolation="process"))
    assert gw.request("/", host="echo.localhost").status == 200
    assert os.path.exists(f"/proc/{gw.proc.pid}")
