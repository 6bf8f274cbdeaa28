"""sandboxes.attach: a confined, unprivileged sandbox gets its tenant's directories from outside."""

from __future__ import annotations

import os
import time
from pathlib import Path

from sandboxes import attach
from sandboxes.mounts import RO_ATTRS, RW_ATTRS

from .conftest import PY, Runner

# Waits (bounded) for /app/hello to appear, then reports what it sees and what it may do there.
WATCH = """
import os, socket, time
deadline = time.monotonic() + 10
while not os.path.exists('/app/hello') and time.monotonic() < deadline:
    time.sleep(0.002)
print(open('/app/hello').read())
print(socket.gethostname())
for path in ('/app/x', '/data/x'):
    try:
        open(path, 'w').write('w')
        print('rw', path)
    except OSError as e:
        print('denied', path, e.errno)
print(os.getuid())
"""


def test_attach_gives_a_running_sandbox_its_tenant_dirs(sbx: Runner, tmp_path: Path) -> None:
    app = tmp_path / "app"
    data = tmp_path / "data"
    app.mkdir()
    data.mkdir()
    (app / "hello").write_text("tenant code")
    spec = sbx.spec()
    os.chown(data, spec.uid, spec.uid)
    for d in (tmp_path, app):
        os.chmod(d, 0o755)
    before = (os.getcwd(), os.readlink("/proc/self/ns/mnt"), os.readlink("/proc/self/ns/uts"))
    sb, out, err = sbx.start([PY, "-I", "-S", "-c", WATCH], spec)
    time.sleep(0.05)  # it is confined and polling an empty /app
    attach(
        sb.pid,
        [(str(app).encode(), b"/app", RO_ATTRS), (str(data).encode(), b"/data", RW_ATTRS)],
        b"tenant",
    )
    result = sbx.finish(sb, out, err)
    assert result.exit_code == 0, result.err
    assert result.lines() == [
        "tenant code",
        "tenant",
        "denied /app/x 30",  # EROFS: the bundle is read-only
        "rw /data/x",
        str(spec.uid),
    ]
    assert (data / "x").read_text() == "w"
    # we are back in our own namespaces, and cwd
    after = (os.getcwd(), os.readlink("/proc/self/ns/mnt"), os.readlink("/proc/self/ns/uts"))
    assert after == before
    assert os.uname().nodename != "tenant"
