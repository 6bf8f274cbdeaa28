"""A whole gateway run without root: its tenants are sandboxed through user namespaces.

The gateway, its fork server and its tenants run as uid 65534 (nobody), started from a root test
process with setpriv. This machine's Python lives under /root (mode 0700), which nobody cannot
traverse, so the gateway is started in a private mount namespace in which /root is a tmpfs that
holds only the interpreter's tree, bound at its own path: nothing else of /root is visible, and
nothing outside that namespace changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import Gateway, free_port, write_config

NOBODY = 65534


def _rootless_level() -> str:
    """What isolation nobody gets on this host (probed in a forked child that drops root)."""
    import sandboxes.doctor  # imported while still root

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            level, reasons = sandboxes.doctor.explain_isolation()
            os.write(w, orjson.dumps([level, reasons]))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    level, reasons = orjson.loads(data)
    return "rootless" if level == "rootless" else f"{level}: {'; '.join(reasons)}"


def _untraversable(path: Path) -> list[Path]:
    """The directories on the way to `path` that nobody may not search."""
    return [p for p in reversed(path.parents) if not p.stat().st_mode & 0o001]


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to start a gateway as another uid"
    if not shutil.which("setpriv") or not shutil.which("unshare"):
        return "setpriv and unshare (util-linux) are needed"
    level = _rootless_level()
    if level != "rootless":
        return f"unprivileged user namespaces are not available: {level}"
    prefix = Path(sys.base_prefix).resolve()
    blocked = _untraversable(prefix / "bin")
    if len(blocked) > 1:
        return f"the interpreter sits under {len(blocked)} directories nobody cannot search"
    for needed in (Path(sys.prefix), Path(__file__).resolve().parent.parent):
        if _untraversable(needed / "x") and (not blocked or blocked != _untraversable(needed)):
            return f"{needed} is not readable by nobody"
    return None


SKIP = _skip_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

# Bind the interpreter's tree over a tmpfs on its unsearchable ancestor, then become nobody.
WRAPPER = """set -e
mount --bind "$1" "$2"
mount -t tmpfs -o mode=0755,size=1m dorm-rootless-test "$3"
mkdir -p "$4"
mount --bind "$2" "$4"
shift 4
exec setpriv --reuid=65534 --regid=65534 --clear-groups "$@"
"""

APP = (
    "import json, os, socket\n"
    "def status(field):\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith(field + ':'):\n"
    "            return line.split()[1]\n"
    "def probe(path):\n"
    "    try:\n"
    "        open(path, 'w').close()\n"
    "        return 'written'\n"
    "    except OSError as exc:\n"
    "        return exc.strerror\n"
    "async def app(scope, receive, send):\n"
    "    if scope['type'] != 'http':\n"
    "        return\n"
    "    body = json.dumps({\n"
    "        'uid': os.getuid(), 'pid': os.getpid(), 'hostname': socket.gethostname(),\n"
    "        'cap_eff': status('CapEff'), 'cap_bnd': status('CapBnd'),\n"
    "        'no_new_privs': status('NoNewPrivs'), 'seccomp': status('Seccomp'),\n"
    "        'root': sorted(os.listdir('/')), 'usr': probe('/usr/dorm-probe'),\n"
    "        'app': probe('/app/dorm-probe'), 'tmp': probe('/tmp/dorm-probe'),\n"
    "        'secret': os.path.exists(os.environ['SECRET_PATH']),\n"
    "    })\n"
    "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
    "    await send({'type': 'http.response.body', 'body': body.encode()})\n"
)


@pytest.fixture
def rootless_gw() -> Iterator[Gateway]:
    """A gateway started as nobody, in a directory nobody owns (pytest's tmp is root-only)."""
    base = Path(tempfile.mkdtemp(prefix="dorm-rootless-", dir="/tmp"))
    base.chmod(0o755)
    prefix = Path(sys.base_prefix).resolve()
    blocked = _untraversable(prefix / "bin")
    gw: Gateway | None = None
    try:
        for name in ("data", "run", "app"):
            (base / name).mkdir()
        (base / "app" / "main.py").write_text(APP)
        for sub in ("data", "run"):
            os.chown(base / sub, NOBODY, NOBODY)
        port, admin_port = free_port(), free_port()
        gw = Gateway(
            port=port,
            admin_port=admin_port,
            token="test-token-" + os.urandom(8).hex(),
            data_dir=base / "data",
            run_dir=base / "run",
            config_path=base / "dorm.toml",
        )
        extra = f'isolation = "auto"\ncgroup_parent = "dorm-t{os.urandom(4).hex()}"'
        write_config(gw.config_path, port, admin_port, gw.data_dir, gw.run_dir, gw.token, extra)
        wrapper: list[str] = []
        if blocked:
            top = blocked[0]
            keep = top / prefix.relative_to(top).parts[0]
            stash = base / "interpreter"
            stash.mkdir()
            wrapper = ["unshare", "--mount", "--propagation", "private", "--"]
            wrapper += ["sh", "-c", WRAPPER, "sh", str(keep), str(stash), str(top), str(keep)]
        else:
            wrapper = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        gw.data_dir.parent.mkdir(parents=True, exist_ok=True)
        gw.start({"HOME": "/tmp"}, wrapper=wrapper)
        yield gw
    finally:
        if gw is not None and gw.proc is not None and gw.proc.poll() is None:
            with contextlib.suppress(AssertionError):
                gw.stop(timeout=20)
        shutil.rmtree(base, ignore_errors=True)


def test_gateway_without_root_sandboxes_tenants_in_user_namespaces(rootless_gw: Gateway) -> None:
    gw = rootless_gw
    assert gw.proc is not None
    assert Path(f"/proc/{gw.proc.pid}/status").read_text().count(f"\t{NOBODY}\t") >= 1
    assert "ROOTLESS SANDBOXES" in gw.log() and "no cgroup limits" in gw.log()
    secret = str(gw.config_path)  # holds the admin token: the tenant must not see it
    spec = {
        "runtime": "python-asgi",
        "entry": "main:app",
        "app_dir": str(gw.data_dir.parent / "app"),
        "env": {"SECRET_PATH": secret},
    }
    gw.put_app("nobody", spec)
    resp = gw.request("/", host="nobody.localhost")
    assert resp.status == 200, (resp.body, gw.log())
    seen: dict[str, Any] = json.loads(resp.body)
    assert seen["uid"] == NOBODY  # no per-instance uid without root: the gateway's own
    assert seen["hostname"] == "nobody"
    assert int(seen["cap_eff"], 16) == 0 and int(seen["cap_bnd"], 16) == 0
    assert seen["no_new_privs"] == "1" and seen["seccomp"] == "2"
    assert seen["usr"] == "Read-only file system" and seen["app"] == "Read-only file system"
    assert seen["tmp"] == "written"
    assert not seen["secret"]  # the gateway's files are not in the sandbox's mount namespace
    assert not {"home", "var", "sys"} & set(seen["root"]), seen["root"]  # a minimal root
    inst = gw.instance("nobody")
    assert inst is not None and inst["isolation"] == "sandbox" and inst["rootless"], inst
    host_pid = inst["pid"]
    # Its own user and pid namespaces: not the gateway's.
    for ns in ("user", "pid", "mnt", "net"):
        mine = os.readlink(f"/proc/{gw.proc.pid}/ns/{ns}")
        assert os.readlink(f"/proc/{host_pid}/ns/{ns}") != mine, ns

    status, body = gw.admin("GET", "/v1/pools")
    assert status == 200 and body["enabled"] is False, body  # pools need root

    egress = {**spec, "network": "egress"}
    gw.put_app("outward", egress)
    resp = gw.request("/", host="outward.localhost")
    assert resp.status == 503 and b"rootless sandboxes cannot give" in resp.body, resp.body

    gw.stop()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{host_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{host_pid}").exists()  # the tenant went with the gateway
