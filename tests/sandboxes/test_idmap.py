"""Idmapped /data volumes (sandboxes/idmap.py): real kernel, real sandboxes, no mocks.

What is checked: a volume of 2,000 files stays owned by the storage owner on disk while two
instances with different uids (one started by the C launcher, one by the Python child) each see
every file as their own, read and write them, and create files that land on disk as the storage
owner; nothing else is mapped (other owners show as overflow, chown is refused, setuid grants
nothing); the late-binding ``attach`` of pool members idmaps too; a volume of the old scheme is
adopted once; a filesystem without idmapped mounts is detected with a reason.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxes import (
    SandboxSpecError,
    attach,
    doctor,
    idmap,
    launcher,
    libc,
    mounts,
    prefork,
    prewarm,
)
from sandboxes.idmap import STORAGE_GID, STORAGE_UID
from sandboxes.mounts import RO_ATTRS, RW_ATTRS

from .conftest import PY, Runner

S = STORAGE_UID
OVERFLOW = int(Path("/proc/sys/kernel/overflowuid").read_text())

# Run inside: what /data looks like to the tenant, and what it may do there.
INSIDE = r"""
import json, os
uid, gid = os.getuid(), os.getgid()
seen, foreign = 0, []
for root, dirs, files in os.walk('/data'):
    for name in dirs + files:
        st = os.lstat(os.path.join(root, name))
        seen += 1
        if (st.st_uid, st.st_gid) != (uid, gid):
            foreign.append([name, st.st_uid, st.st_gid])
with open('/data/d3/f7') as f:
    before = f.read()
with open('/data/d3/f7', 'a') as f:
    f.write('+')
with open(f'/data/made-by-{uid}', 'w') as f:
    f.write('mine')
os.mkdir(f'/data/dir-by-{uid}')
made = os.stat(f'/data/made-by-{uid}')
errors = {}
for target in (0, uid + 1):
    try:
        os.chown(f'/data/made-by-{uid}', target, target)
        errors[target] = 0
    except OSError as e:
        errors[target] = e.errno
root = os.stat('/data')
print(json.dumps({
    'uid': uid, 'seen': seen, 'foreign': foreign, 'before': before,
    'made': [made.st_uid, made.st_gid], 'root': [root.st_uid, root.st_gid],
    'chown': [errors[0], errors[uid + 1]],
}))
"""


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    yield
    idmap.clear()


def make_volume(path: Path, dirs: int = 20, per_dir: int = 100, owner: int = S) -> None:
    """dirs x per_dir small files (2,000 by default), all owned by ``owner``, private modes."""
    path.mkdir(mode=0o700)
    for d in range(dirs):
        sub = path / f"d{d}"
        sub.mkdir(mode=0o700)
        for f in range(per_dir):
            p = sub / f"f{f}"
            p.write_text(f"{d}/{f}")
            os.chmod(p, 0o600)
            os.chown(p, owner, owner)
        os.chown(sub, owner, owner)
    os.chown(path, owner, owner)


def host_owners(path: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry's (uid, gid, ctime_ns) on disk; a chown would change the ctime."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), path)] = (
                st.st_uid,
                st.st_gid,
                st.st_ctime_ns,
            )
    return out


def kinds() -> list[bool]:
    """The idle-child kinds to start instances with: C launcher (if buildable) and Python."""
    return [True, False] if launcher.available() else [False]


def test_volume_keeps_its_storage_owner_across_instances(sbx: Runner, tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    make_volume(vol)
    before = host_owners(vol)
    assert len(before) == 2020 and {o[:2] for o in before.values()} == {(S, S)}
    uids = []
    for n, exec_only in enumerate(kinds() * (3 - len(kinds()))):  # two instances, two uids
        spec = sbx.spec(data_dir=str(vol), data_idmap=True)
        uids.append(spec.uid)
        prefork.POOL.clear()
        assert prewarm(spec, 1, exec_only=exec_only) == 1
        r = sbx.run([PY, "-I", "-S", "-c", INSIDE], spec, timeout=30)
        assert r.exit_code == 0, r.err
        assert prefork.POOL.idle_pids() == []  # the child of that kind served it
        seen = json.loads(r.out)
        assert seen["uid"] == spec.uid
        assert seen["seen"] == 2020 + 2 * n  # and what the earlier instance made
        assert seen["foreign"] == []  # every file is its own, including the previous uid's
        assert seen["root"] == [spec.uid, spec.uid]
        assert seen["before"] == "3/7" + "+" * n
        assert seen["made"] == [spec.uid, spec.uid]
        # No other id is reachable: it has no mapping on this mount (EOVERFLOW), and no
        # capability to chown anyway (EPERM).
        assert set(seen["chown"]) <= {errno.EOVERFLOW, errno.EPERM}, seen["chown"]
        after = host_owners(vol)
        # On disk: all still the storage owner's, nothing was chowned (ctime untouched except
        # for the file written to), and what the tenant made is the storage owner's too.
        assert {o[:2] for o in after.values()} == {(S, S)}
        changed = {k for k in before if after[k][2] != before[k][2]}
        assert changed <= {"d3/f7", "d3"}, sorted(changed)[:5]
        assert f"made-by-{spec.uid}" in after and f"dir-by-{spec.uid}" in after
        assert (vol / "d3" / "f7").read_text() == "3/7" + "+" * (n + 1)
        st = os.stat(vol)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (S, S, 0o700)
    assert uids[0] != uids[1]


def test_other_owners_stay_foreign_and_setuid_grants_nothing(
    sbx: Runner, tmp_path: Path, cbin: Path
) -> None:
    vol = tmp_path / "vol"
    make_volume(vol, dirs=1, per_dir=1)
    (vol / "roots").write_text("host")
    os.chmod(vol / "roots", 0o644)  # root's, copied in by an admin: readable, never writable
    shutil.copy(cbin / "euid", vol / "suid-root")
    os.chmod(vol / "suid-root", 0o4755)  # setuid root on disk
    shutil.copy(cbin / "euid", vol / "suid-own")
    os.chown(vol / "suid-own", S, S)
    os.chmod(vol / "suid-own", 0o4755)  # setuid "own" (the storage owner on disk)
    spec = sbx.spec(data_dir=str(vol), data_idmap=True)
    code = (
        "import os\n"
        "st = os.stat('/data/roots')\n"
        "print(st.st_uid, st.st_gid, open('/data/roots').read())\n"
        "try:\n"
        "    open('/data/roots', 'a')\n"
        "except OSError as e:\n"
        "    print(e.errno)\n"
    )
    r = sbx.py(code, spec)
    assert r.exit_code == 0, r.err
    assert r.lines() == [f"{OVERFLOW} {OVERFLOW} host", str(errno.EACCES)]
    for name in ("suid-root", "suid-own"):
        r = sbx.run([f"/data/{name}"], sbx.spec(data_dir=str(vol), data_idmap=True))
        assert r.exit_code == 0, r.err
        uid = r.sandbox.spec.uid
        assert r.out.split() == [str(uid), str(uid)], name  # nosuid: real and effective stay
    assert os.stat(vol / "roots").st_uid == 0  # not adopted by anything here


def test_attach_idmaps_a_pool_members_data(sbx: Runner, tmp_path: Path) -> None:
    """The claim path: a confined, running sandbox gets /data attached from outside, idmapped."""
    app, vol = tmp_path / "app", tmp_path / "vol"
    app.mkdir()
    (app / "hello").write_text("tenant code")
    for d in (tmp_path, app):
        os.chmod(d, 0o755)
    make_volume(vol, dirs=2, per_dir=10)
    watch = (
        "import json, os, time\n"
        "deadline = time.monotonic() + 10\n"
        "while not os.path.exists('/app/hello') and time.monotonic() < deadline:\n"
        "    time.sleep(0.002)\n"
        "open('/data/from-member', 'w').write('m')\n"
        "owners = {(s.st_uid, s.st_gid) for s in (os.stat('/data/d1/f9'), os.stat('/data'),"
        " os.stat('/data/from-member'))}\n"
        "print(json.dumps([os.getuid(), sorted(owners)]))\n"
    )
    spec = sbx.spec()
    sb, out, err = sbx.start([PY, "-I", "-S", "-c", watch], spec)
    time.sleep(0.05)
    attach(
        sb.pid,
        [
            (str(app).encode(), b"/app", RO_ATTRS),
            (str(vol).encode(), b"/data", RW_ATTRS | libc.MOUNT_ATTR_IDMAP),
        ],
        b"member",
        ids=(spec.uid, spec.uid),
    )
    r = sbx.finish(sb, out, err)
    assert r.exit_code == 0, r.err
    assert json.loads(r.out) == [spec.uid, [[spec.uid, spec.uid]]]
    st = os.stat(vol / "from-member")
    assert (st.st_uid, st.st_gid) == (S, S)


def test_attach_refuses_an_idmapped_bind_without_ids(tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    with pytest.raises(OSError) as info:
        mounts.open_bind(str(vol).encode(), RW_ATTRS | libc.MOUNT_ATTR_IDMAP)
    assert info.value.errno == errno.EINVAL


def test_adopt_migrates_an_old_volume_once(tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    make_volume(vol, dirs=5, per_dir=40, owner=300123)  # chowned to an old instance uid
    os.symlink("/etc/passwd", vol / "d0" / "link")  # adopted itself, never followed
    passwd = os.stat("/etc/passwd")
    assert idmap.adopt(str(vol)) == 5 * 40 + 5 + 1 + 1
    after = host_owners(vol)
    assert {o[:2] for o in after.values()} == {(S, S)}
    assert os.stat(vol).st_uid == S
    assert os.stat("/etc/passwd") == passwd
    assert idmap.adopt(str(vol)) == 0  # then never again: nothing is even walked
    assert host_owners(vol) == after


def test_probe_finds_support_and_names_what_lacks_it(tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    assert idmap.probe(str(vol), 300124, 300124) is None  # ext4 (or tmpfs) here
    ram = tmp_path / "ram"
    ram.mkdir()
    libc.mount(b"ramfs", str(ram).encode(), b"ramfs", 0, None)
    try:
        reason = idmap.probe(str(ram), 300124, 300124)
    finally:
        libc.umount2(str(ram).encode(), libc.MNT_DETACH)
    assert reason is not None and "ramfs" in reason and "EINVAL" in reason, reason


def children() -> set[str]:
    return {
        c
        for t in os.listdir("/proc/self/task")
        for c in Path(f"/proc/self/task/{t}/children").read_text().split()
    }


def test_user_namespaces_are_cached_bounded_and_leave_no_child() -> None:
    kids = children()
    fd = idmap.userns_fd(300125, 300126)
    assert idmap.userns_fd(300125, 300126) == fd
    first = os.readlink(f"/proc/self/fd/{fd}")
    assert first.startswith("user:[")
    assert children() == kids  # its helper child was killed and reaped (by pid)
    assert idmap.userns_fd(300125, 300127) != fd
    with pytest.raises(ValueError, match="storage owner"):
        idmap.userns_fd(STORAGE_UID, 300125)  # an instance may never run as it
    for uid in range(300200, 300200 + idmap.CACHE_SIZE + 3):
        idmap.prepare(uid, uid)
    assert idmap.cached() == idmap.CACHE_SIZE
    held = {os.readlink(f"/proc/self/fd/{f}") for f in idmap._userns.values()}
    assert len(held) == idmap.CACHE_SIZE  # one namespace each, the least recently used closed
    assert (300125, 300126) not in idmap._userns and (300200 + 3, 300200 + 3) in idmap._userns
    idmap.forget(300200 + 5, 300200 + 5)
    assert idmap.cached() == idmap.CACHE_SIZE - 1
    idmap.clear()
    assert idmap.cached() == 0


def test_spec_needs_a_data_dir_for_idmap(sbx: Runner) -> None:
    with pytest.raises(SandboxSpecError) as info:
        sbx.spec(data_idmap=True)
    assert info.value.field == "data_idmap"
    assert STORAGE_GID == STORAGE_UID


def test_doctor_says_which_ownership_volumes_get(tmp_path: Path) -> None:
    found = doctor.volume_ownership(str(tmp_path / "data" / "volumes"))  # not there yet
    assert found["mode"] == "idmap" and found["storage_uid"] == S, found
    assert found["probed"] == str(tmp_path)
    ram = tmp_path / "ram"
    ram.mkdir()
    libc.mount(b"ramfs", str(ram).encode(), b"ramfs", 0, None)
    try:
        found = doctor.volume_ownership(str(ram / "volumes"))
    finally:
        libc.umount2(str(ram).encode(), libc.MNT_DETACH)
    assert found["mode"] == "chown" and "ramfs" in found["reason"], found
    assert idmap.cached() == 0  # the probe's namespace is not kept


def test_doctor_without_root_keeps_the_chown_path(tmp_path: Path) -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # drop root for good, then ask
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            found = doctor.volume_ownership(str(tmp_path / "volumes"))
            os.write(w, json.dumps(found).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as fh:
        found = json.loads(fh.read() or "{}")
    os.waitpid(pid, 0)
    assert found["mode"] == "chown" and found["reason"].startswith("not root"), found


def test_namespace_helper_child_runs_nothing_and_is_reaped() -> None:
    """libc.clone_paused: a CLONE_VM child in its own user namespace, deaf to every signal but
    SIGKILL and SIGSTOP (and glibc's two internal ones, which nothing sends it), gone (reaped by
    pid) once released."""
    pid = libc.clone_paused(libc.CLONE_NEWUSER)
    try:
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        unblockable = (1 << 8) | (1 << 18)  # SIGKILL, SIGSTOP
        glibc_internal = (1 << 31) | (1 << 32)  # signals 32 and 33
        assert int(status["SigBlk"], 16) | unblockable | glibc_internal == (1 << 64) - 1
        assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
        os.kill(pid, signal.SIGTERM)  # blocked: it stays asleep, and no handler of ours runs
        time.sleep(0.02)
        assert Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] == "S"
    finally:
        libc.release_paused(pid)
    assert str(pid) not in children()
    assert not Path(f"/proc/{pid}").exists()  # reaped, not a zombie
