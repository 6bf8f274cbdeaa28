"""A warm-pool member whose /tmp is not writable still takes its claim and serves.

While idle, a member warms its import path by importing a throwaway module written under /tmp
(`runtimes.python._warm_import`). In a sandbox /tmp is the instance's own writable tmpfs, but a
member must never depend on it: with no scratch space the warm-up is skipped, and the claim
pays the first import's costs instead.

The member here is the real one (`runtimes.python.member_main`, granian and all), run the way
the fork server runs it minus the confinement: fd 0 is the claim channel, the app is at /app and
the socket directory at /run/dorm. It runs chrooted into an overlay of the host's root in a
private mount namespace, which is what gives it an /app without touching the host, and there
/tmp is a read-only tmpfs, so even root cannot write to it (EROFS).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import ROOT, read_until_close

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces and chroot need root")

APP = """\
import json, os, sys
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = json.dumps({
        "tmp_writable": os.access("/tmp", os.W_OK),
        "warm_left_in_path": [p for p in sys.path if ".dorm-warm" in p],
        "warm_module_loaded": "_dorm_warm_import" in sys.modules,
    })
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body.encode()})
"""

# In a private mount namespace: the host's root as a writable overlay (on a tmpfs), with /proc,
# /dev, the app at /app, the socket directory at /run/dorm and a read-only /tmp; then the member.
# KEEP (colon-separated) are host dirs under /tmp that must stay visible there: this checkout
# and its virtualenv when they live under /tmp (a CI clone, say), bound back before /tmp is
# made read-only.
SETUP = """\
set -e
W="$1"; APP="$2"; SOCKETS="$3"; KEEP="$4"; shift 4
mount -t tmpfs dorm-test "$W"
mkdir "$W/upper" "$W/work" "$W/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$W/upper,workdir=$W/work" "$W/root"
mount --rbind /proc "$W/root/proc"
mount --rbind /dev "$W/root/dev"
mkdir -p "$W/root/app" "$W/root/run/dorm"
mount --bind "$APP" "$W/root/app"
mount --bind "$SOCKETS" "$W/root/run/dorm"
mount -t tmpfs dorm-readonly-tmp "$W/root/tmp"
IFS=:
for dir in $KEEP; do
    mkdir -p "$W/root$dir"
    mount --rbind "$dir" "$W/root$dir"
done
unset IFS
mount -o remount,ro "$W/root/tmp"
exec chroot "$W/root" "$@"
"""


def kept_under_tmp() -> str:
    """The dirs under /tmp the member needs to run (this checkout, its interpreter), as KEEP."""
    wanted = {os.path.realpath(p) for p in (ROOT, sys.prefix, sys.base_prefix)}
    return ":".join(sorted(p for p in wanted if p.startswith("/tmp/")))


MEMBER = "import sys; from runtimes.python import member_main; sys.exit(member_main())"


@pytest.fixture
def workspace() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="dorm-warm-test-", dir="/tmp"))
    try:
        for name in ("ns", "app", "sockets"):
            (base / name).mkdir()
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the member exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_member_with_a_read_only_tmp_takes_its_claim_and_serves(workspace: Path) -> None:
    (workspace / "app" / "main.py").write_text(APP)
    sockets = workspace / "sockets"
    log_path = workspace / "instance.log"
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "DORM_SOCKET": "/run/dorm/http.sock",
    }
    places = [str(workspace / "ns"), str(workspace / "app"), str(sockets), kept_under_tmp()]
    unshare = ["unshare", "--mount", "--propagation", "private", "--"]
    proc = subprocess.Popen(
        [*unshare, "sh", "-c", SETUP, "sh", *places, sys.executable, "-c", MEMBER],
        stdin=theirs.fileno(),
        env=env,
        cwd="/",
    )
    theirs.close()
    try:
        # Serving its empty app on the hidden name: it got past the warm import.
        wait_for(sockets / ".member.sock", proc, 30)
        with open(log_path, "wb") as log:
            claim = {
                "env": {
                    **env,
                    "DORM_ENTRY": "main:app",
                    "DORM_INTERFACE": "asgi",
                    "DORM_APP": "warm",
                },
                "argv": ["dorm-python", "main:app"],
            }
            socket.send_fds(ours, [orjson.dumps(claim)], [log.fileno()])
        ours.settimeout(30)
        live = ours.recv(64)
        assert live.startswith(b"L"), (live, log_path.read_text())
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(str(sockets / "http.sock"))
            client.sendall(b"GET / HTTP/1.1\r\nHost: warm\r\nConnection: close\r\n\r\n")
            answer = read_until_close(client, 10)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), answer
        seen = json.loads(body)
        assert seen["tmp_writable"] is False, seen  # the case at hand: no scratch space
        assert seen["warm_left_in_path"] == [] and seen["warm_module_loaded"] is False, seen
        assert "claimed; app loaded in" in log_path.read_text()
    finally:
        ours.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
