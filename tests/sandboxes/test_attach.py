"""sandboxes.attach: a confined, unprivileged sandbox gets its tenant's directories from outside."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from sandboxes import attach
from sandboxes.mounts import RO_ATTRS, RW_ATTRS, create_name_files, fill_name_files

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


def test_name_files_are_made_fresh_and_rewritten_through_their_fds(tmp_path: Path) -> None:
    """A member's name files: new regular files (never an entry that was already there, a
    symlink least of all: EEXIST, nothing opened), then rewritten at the claim to exactly the
    tenant's name, shorter or longer than what was there."""
    target = tmp_path / "elsewhere"
    target.write_text("untouched")
    trap = tmp_path / "trap"
    trap.mkdir()
    (trap / "hostname").symlink_to(target)
    fds_before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(FileExistsError):
        create_name_files(str(trap))
    assert sorted(os.listdir("/proc/self/fd")) == fds_before  # none left open
    assert target.read_text() == "untouched"

    fds = create_name_files(str(tmp_path))
    try:
        fill_name_files(fds, "a-rather-long-tenant-name")
        fill_name_files(fds, "short")
    finally:
        for fd in fds:
            os.close(fd)
    assert (tmp_path / "hostname").read_text() == "short\n"
    assert "127.0.0.1\tlocalhost short\n" in (tmp_path / "hosts").read_text()
    assert "long" not in (tmp_path / "hosts").read_text()
