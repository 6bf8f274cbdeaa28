"""Sandboxed instances end to end: the default isolation as root, confinement seen from inside
the tenant, OOM kills reported to the client, and nothing left behind by a killed gateway."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sandboxes import detect_isolation
from tests.conftest import ROOT, Gateway

APPS = str(ROOT / "tests" / "apps")
LEVEL = detect_isolation()
pytestmark = pytest.mark.skipif(
    LEVEL != "sandbox",
    reason=f"sandboxes need root with namespaces and cgroups; this host: {LEVEL}",
)
CGROUP_ROOT = Path("/sys/fs/cgroup")


def probe_spec(**extra: Any) -> dict[str, Any]:
    return {"runtime": "command", "command": [sys.executable, "probe.py"], "app_dir": APPS, **extra}


@pytest.fixture
def sandboxed(gateway_factory: Any) -> Gateway:
    """A gateway with the default isolation ("auto": sandbox, as tests run as root)."""
    gw: Gateway = gateway_factory('isolation = "auto"\nuid_range = "300000-300999"', start=False)
    gw.start(extra_env={"DORM_ADMIN_TOKEN": gw.token})  # a secret in the gateway's environment
    gw.put_app("probe", probe_spec())
    return gw


def whoami(gw: Gateway, host: str = "probe.localhost") -> dict[str, Any]:
    resp = gw.request("/whoami", host=host)
    assert resp.status == 200, resp.body
    return json.loads(resp.body)


def cgroup_parent(gw: Gateway) -> str:
    return gw.config_path.read_text().split('cgroup_parent = "')[1].split('"')[0]


def test_default_isolation_as_root_is_a_full_sandbox(sandboxed: Gateway) -> None:
    me = whoami(sandboxed)
    assert me["pid"] == 1  # its own pid namespace
    assert me["uid"][0] == me["uid"][1] == me["uid"][2]
    assert 300000 <= me["uid"][0] <= 300999 and me["gid"][0] == me["uid"][0]
    assert me["groups"] == []
    assert me["CapEff"] == me["CapPrm"] == me["CapBnd"] == me["CapAmb"] == "0000000000000000"
    assert me["NoNewPrivs"] == "1" and me["Seccomp"] == "2"
    assert me["hostname"] == "probe" and me["cwd"] == "/app"
    assert me["socket"] == "/run/dorm/http.sock"
    # Only what dorm allowlists: no DORM_ADMIN_TOKEN, nothing else from the gateway's env.
    assert "DORM_ADMIN_TOKEN" not in me["env"]
    assert set(me["env"]) <= {
        "PATH",
        "LANG",
        "HOME",
        "DORM_SOCKET",
        "DORM_APP",
        "DORM_BRANCH",
        "PYTHONPATH",
        "LC_CTYPE",
    }
    inst = sandboxed.instance("probe")
    assert inst is not None and inst["isolation"] == "sandbox" and inst["uid"] == me["uid"][0]


def test_tenant_cannot_read_secrets_or_write_its_code(sandboxed: Gateway) -> None:
    def read(path: str) -> dict[str, Any]:
        return json.loads(sandboxed.request(f"/read?path={path}", host="probe.localhost").body)

    assert read("/etc/shadow")["ok"] is False
    assert read(str(sandboxed.data_dir / "admin.token"))["ok"] is False
    assert read(str(sandboxed.data_dir / "dorm.sqlite"))["ok"] is False
    assert read("/proc/1/environ")["ok"] is True  # its own init: itself, nothing of the host's
    assert read("/app/probe.py")["ok"] is True
    write = json.loads(sandboxed.request("/write?path=/app/probe.py", host="probe.localhost").body)
    assert write == {"ok": False, "errno": 30, "error": "Read-only file system"}
    tmp = json.loads(sandboxed.request("/write?path=/tmp/x", host="probe.localhost").body)
    assert tmp["ok"] is True


def test_out_of_memory_is_a_502_that_says_so(sandboxed: Gateway) -> None:
    sandboxed.put_app("hog", probe_spec(limits={"memory": "64MiB"}))
    resp = sandboxed.request("/hog?mb=512", host="hog.localhost")
    assert resp.status == 502
    assert b"ran out of memory" in resp.body
    inst = sandboxed.wait_state("hog", "cold")
    assert "ran out of memory" in inst["last_error"]
    log = (sandboxed.data_dir / "logs" / "hog" / "main" / "instance.log").read_text()
    assert "out of memory" in log
    assert sandboxed.request("/whoami", host="hog.localhost").status == 200  # and it restarts


def test_stop_of_a_tenant_without_sigterm_handler_is_immediate(sandboxed: Gateway) -> None:
    sandboxed.put_app("quick", probe_spec(stop_timeout="20s"))
    assert whoami(sandboxed, "quick.localhost")["pid"] == 1
    started = time.monotonic()
    assert sandboxed.admin("POST", "/v1/apps/quick/stop")[0] == 200
    sandboxed.wait_state("quick", "cold")
    assert time.monotonic() - started < 5  # not the 20 s grace: pid 1 ignores SIGTERM


def test_killed_gateway_leaves_nothing_after_next_start(sandboxed: Gateway) -> None:
    uid = whoami(sandboxed)["uid"][0]
    parent = cgroup_parent(sandboxed)
    assert sandboxed.proc is not None
    sandboxed.proc.kill()
    sandboxed.proc.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _processes_of(uid):
        time.sleep(0.05)
    assert _processes_of(uid) == []  # the tenant died with the gateway
    sandboxed.start()
    assert sandboxed.request("/", host="probe.localhost").status == 200
    for controller in ("memory", "pids", "cpu"):
        base = CGROUP_ROOT / controller / parent
        if base.is_dir():
            groups = [p.name for p in base.iterdir() if p.is_dir()]
            # The new instance, and idle pre-confined children the fork server keeps ready.
            assert len([g for g in groups if not g.startswith("idle-")]) == 1, groups
    assert sandboxed.stop() == 0
    for controller in ("memory", "pids", "cpu"):
        base = CGROUP_ROOT / controller / parent
        if base.is_dir():
            assert [p for p in base.iterdir() if p.is_dir()] == []


def _processes_of(uid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    out.append(int(entry.name))
            except OSError:
                pass
    return out


@pytest.mark.parametrize("start", ["zygote", "fresh"])
def test_python_runtime_in_a_sandbox(sandboxed: Gateway, start: str, tmp_path: Path) -> None:
    app = tmp_path / "asgi"
    app.mkdir()
    (app / "main.py").write_text(
        "import os\n"
        "async def app(scope, receive, send):\n"
        "    if scope['type'] != 'http':\n"
        "        return\n"
        "    body = f'{os.getuid()} {os.getpid()} {os.getcwd()}'.encode()\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    await send({'type': 'http.response.body', 'body': body})\n"
    )
    os.chmod(tmp_path, 0o755)
    os.chmod(app, 0o755)
    sandboxed.put_app(
        "py", {"runtime": "python-asgi", "entry": "main:app", "app_dir": str(app), "start": start}
    )
    resp = sandboxed.request("/", host="py.localhost")
    assert resp.status == 200, resp.body
    uid, pid, cwd = resp.body.decode().split()
    assert 300000 <= int(uid) <= 300999 and pid == "1" and cwd == "/app"


def test_uid_range_exhausted_is_503_until_one_is_free(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory('isolation = "auto"\nuid_range = "301000-301000"')
    gw.put_app("one", probe_spec())
    gw.put_app("two", probe_spec())
    assert gw.request("/whoami", host="one.localhost").status == 200
    refused = gw.request("/whoami", host="two.localhost")
    assert refused.status == 503 and b"no free sandbox uid" in refused.body
    assert gw.admin("POST", "/v1/apps/one/stop")[0] == 200
    gw.wait_state("one", "cold")
    assert whoami(gw, "two.localhost")["uid"][0] == 301000  # the uid went back to the range
