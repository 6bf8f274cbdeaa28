"""Hostile bundles and hostile timing, end to end: archives the extractor must refuse (zip
compression methods it cannot read, corrupt compressed data), refusals against a real gateway
whose branch must keep serving the same instance, a bundles directory on a tmpfs too small for
the upload, and deploys racing each other and a delete of their app.

Every refusal is followed by the same checks: the registry and the store are as they were,
nothing is left in `bundles/tmp/`, and the old version still answers."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import gateway.deploy as deploy_module
from gateway.bundles import (
    MAX_DEPTH,
    BundleError,
    BundleLimits,
    DeployError,
    extract,
    remove_tree,
)
from gateway.client import AdminClient
from gateway.registry import Registry
from tests.conftest import Gateway
from tests.test_bundles import (
    BUNDLE_LIMITS,
    MANIFEST,
    E,
    F,
    M,
    state,
    targz,
    upload,
    zeros_targz,
    zipped,
)
from tests.test_deploy import (
    FakeInstances,
    Harness,
    fetch,
    site_bundle,
    site_spec,
    wait_until,
)
from tests.test_runtime_bundles import EXE, UNIX_TOML, put_runtime


# -- archives the extractor cannot read ----------------------------------------------------------
def zip_with_method(method: int) -> bytes:
    """A zip whose second entry claims compression `method` (in both of its headers)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("dorm.toml", MANIFEST)
        zf.writestr("app.py", b"print('hi')\n" * 50)
    data = bytearray(buf.getvalue())
    local = data.index(b"PK\x03\x04", 4)
    data[local + 8 : local + 10] = struct.pack("<H", method)
    central = data.index(b"PK\x01\x02", data.index(b"PK\x01\x02") + 4)
    data[central + 10 : central + 12] = struct.pack("<H", method)
    return bytes(data)


def zip_corrupt(compression: int) -> bytes:
    """A zip whose app.py has its compressed bytes scrambled (headers intact)."""
    payload = os.urandom(2000) * 4
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        zf.writestr("dorm.toml", MANIFEST)
        zf.writestr("app.py", payload)
    data = bytearray(buf.getvalue())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = zf.getinfo("app.py")
    name_len, extra_len = struct.unpack(
        "<2H", data[info.header_offset + 26 : info.header_offset + 30]
    )
    start = info.header_offset + 30 + name_len + extra_len
    for i in range(start, start + min(64, info.compress_size)):
        data[i] ^= 0x5A
    return bytes(data)


UNREADABLE = {
    "zip-method-99": (zip_with_method(99), "compression method 99"),
    "zip-method-implode": (zip_with_method(6), "compression method 6"),
    "zip-corrupt-deflate": (zip_corrupt(zipfile.ZIP_DEFLATED), "corrupt"),
    "zip-corrupt-bzip2": (zip_corrupt(zipfile.ZIP_BZIP2), "corrupt"),
    "zip-corrupt-lzma": (zip_corrupt(zipfile.ZIP_LZMA), "corrupt"),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_unreadable_zip_entries_are_400(tmp_path: Path, case: str) -> None:
    data, message = UNREADABLE[case]
    (tmp_path / "archive").write_bytes(data)
    with pytest.raises(BundleError) as info:
        extract(tmp_path / "archive", "zip", tmp_path / "out", BundleLimits())
    assert (info.value.status, info.value.field) == (400, "bundle")
    assert message in info.value.message
    assert sorted(os.listdir(tmp_path)) == ["archive"]


def test_other_zip_compression_methods_are_read(tmp_path: Path) -> None:
    for method in (zipfile.ZIP_STORED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=method) as zf:
            zf.writestr("dorm.toml", MANIFEST)
            zf.writestr("app.py", b"x = 1\n" * 100)
        archive, out = tmp_path / f"a{method}", tmp_path / f"out{method}"
        archive.write_bytes(buf.getvalue())
        extract(archive, "zip", out, BundleLimits())
        assert (out / "app.py").read_bytes() == b"x = 1\n" * 100


def test_the_deepest_tree_allowed_is_extracted_and_removed(tmp_path: Path) -> None:
    name = "a/" * (MAX_DEPTH - 1) + "f"
    (tmp_path / "archive").write_bytes(targz(M(), F(name, b"deep")))
    extract(tmp_path / "archive", "tar.gz", tmp_path / "out", BundleLimits())
    assert (tmp_path / "out" / name).read_bytes() == b"deep"
    remove_tree(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["archive"]


# A store tree deeper than today's MAX_DEPTH (an older version stored up to ~1,200 levels) with
# read-only directories and files, as the store keeps its trees; built by dir fd, then removed.
DEEP_READ_ONLY_TREE = """
import os, sys
sys.path.insert(0, sys.argv[3])
from pathlib import Path
from gateway.bundles import remove_tree
import gateway.forkserver  # imported while root: this interpreter may live under /root (0700)
if int(sys.argv[2]):
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
top = Path(sys.argv[1]) / "tree"
top.mkdir()
level = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
for _ in range(1200):
    os.mkdir("d", dir_fd=level)
    fd = os.open("f", os.O_CREAT | os.O_WRONLY, 0o444, dir_fd=level)
    os.close(fd)
    deeper = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=level)
    os.fchmod(level, 0o555)
    os.close(level)
    level = deeper
os.fchmod(level, 0o555)
os.close(level)
remove_tree(top)
print("gone" if not top.exists() else "left")
"""


@pytest.mark.parametrize("unprivileged", [False, True], ids=["root", "not-root"])
def test_a_stored_tree_deeper_than_the_cap_is_still_removed(unprivileged: bool) -> None:
    """os.walk and shutil.rmtree recurse once per level: a 1,200-level tree raised
    RecursionError, so GC could never remove it. A gateway that is not root must also make
    the read-only directories writable first (as its own uid: nobody, here)."""
    work = Path(tempfile.mkdtemp(prefix="dorm-deep-store-"))  # reachable by uid 65534
    try:
        os.chown(work, 65534, 65534)
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                DEEP_READ_ONLY_TREE,
                str(work),
                str(int(unprivileged)),
                str(Path(__file__).resolve().parent.parent),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert (done.returncode, done.stdout.strip()) == (0, "gone"), done.stderr[-2000:]
        assert os.listdir(work) == []
    finally:
        from gateway.forkserver import remove_tree as remove_any_depth

        remove_any_depth(work)


def pax_heavy_targz(members: int, header: int) -> bytes:
    """A tar.gz of `members` empty files, each with a pax comment of `header` bytes (which
    compress to almost nothing)."""
    buf = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9) as gz,
        tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tf,
    ):
        info = tarfile.TarInfo("dorm.toml")
        info.size = len(MANIFEST)
        tf.addfile(info, io.BytesIO(MANIFEST))
        for i in range(members):
            info = tarfile.TarInfo(f"f{i}")
            info.pax_headers = {"comment": "a" * header}
            tf.addfile(info)
    return buf.getvalue()


MEASURE = """
import sys
from pathlib import Path
from gateway.bundles import BundleLimits, extract

def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

before = peak_kib()
extract(Path(sys.argv[1]), "tar.gz", Path(sys.argv[2]), BundleLimits())
print((peak_kib() - before) // 1024)
"""


def test_tar_metadata_is_not_kept_in_memory(tmp_path: Path) -> None:
    """300 members with 60 KB pax headers each: 18 MB of metadata from an archive of a few
    hundred KB (with 1 MB headers, 300 MB). tarfile keeps every member it read (pax headers
    included) unless told not to; the extraction must hold about one at a time."""
    data = pax_heavy_targz(300, 60_000)
    assert len(data) < 1 << 20
    (tmp_path / "archive").write_bytes(data)
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path / "archive"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) < 8, f"peak RSS grew by {out.stdout.strip()} MiB"


def test_oversized_tar_metadata_is_refused(tmp_path: Path) -> None:
    """One pax header over 64 KiB, or global pax headers (which tarfile merges and copies
    into every member) over 16 KiB in all."""
    manifest = tarfile.TarInfo("dorm.toml")
    manifest.size = len(MANIFEST)
    member = manifest.tobuf(tarfile.PAX_FORMAT) + MANIFEST + bytes(512 - len(MANIFEST) % 512)
    globals_ = b"".join(
        tarfile.TarInfo._create_pax_generic_header(  # type: ignore[attr-defined]
            {f"k{i}": "v" * 5000}, tarfile.XGLTYPE, "utf-8"
        )
        for i in range(4)
    )
    cases = {
        "one big pax header": pax_heavy_targz(1, 70_000),
        "global headers": gzip.compress(member + globals_ + bytes(1024)),
    }
    for case, data in cases.items():
        (tmp_path / "archive").write_bytes(data)
        with pytest.raises(BundleError) as info:
            extract(tmp_path / "archive", "tar.gz", tmp_path / "out", BundleLimits())
        assert info.value.status == 400, case
        assert "metadata" in info.value.message, case
        assert sorted(os.listdir(tmp_path)) == ["archive"], case
    # A single small global header, as `git archive` writes, is fine.
    one = tarfile.TarInfo._create_pax_generic_header(  # type: ignore[attr-defined]
        {"comment": "0" * 40}, tarfile.XGLTYPE, "utf-8"
    )
    (tmp_path / "archive").write_bytes(gzip.compress(one + member + bytes(1024)))
    extract(tmp_path / "archive", "tar.gz", tmp_path / "out", BundleLimits())
    assert (tmp_path / "out" / "dorm.toml").read_bytes() == MANIFEST


def test_an_oversized_zip_central_directory_is_refused(tmp_path: Path) -> None:
    """zipfile reads the whole central directory into memory, and then each entry's comment
    and extra field again: a directory of 60 KB comments is refused by its size, before that."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("dorm.toml", MANIFEST)
        for i in range(300):
            entry = zipfile.ZipInfo(f"f{i}")
            entry.comment = b"c" * 60_000
            zf.writestr(entry, b"")
    (tmp_path / "archive").write_bytes(buf.getvalue())
    limits = BundleLimits(max_files=400)
    with pytest.raises(BundleError) as info:
        extract(tmp_path / "archive", "zip", tmp_path / "out", limits)
    assert info.value.status == 413
    assert "central directory is larger than" in info.value.message
    assert sorted(os.listdir(tmp_path)) == ["archive"]


# -- refusals against a serving branch -----------------------------------------------------------
REFUSALS: dict[str, tuple[bytes, int, str]] = {
    "traversal": (targz(M(), F("../../evil", b"x")), 400, "bundle"),
    "absolute": (targz(M(), F("/etc/evil", b"x")), 400, "bundle"),
    "symlink-outside": (targz(M(), E("l", "sym", target="../../../etc")), 400, "bundle"),
    "hardlink-outside": (targz(M(), E("h", "hard", target="/etc/passwd")), 400, "bundle"),
    "device": (targz(M(), E("null", "chr")), 400, "bundle"),
    "fifo": (zipped(M(), E("p", "fifo")), 400, "bundle"),
    "setuid": (targz(M(), F("run", b"#!/bin/sh\n", 0o4755)), 400, "bundle"),
    "duplicate": (zipped(M(), F("a", b"1"), F("a", b"2")), 400, "bundle"),
    "file-then-dir": (targz(M(), F("a", b"1"), E("a", "dir")), 400, "bundle"),
    "too-many-files": (targz(M(), *(F(f"f{i}") for i in range(45))), 413, "bundle"),
    "bomb": (zeros_targz(3 << 20), 413, "bundle"),
    "truncated": (targz(M(), F("a", os.urandom(20_000)))[:9_000], 400, "bundle"),
    "zip-method": (zip_with_method(99), 400, "bundle"),
    "bad-toml": (targz(M(b"runtime = [")), 400, "manifest"),
    "unknown-manifest-key": (targz(M(MANIFEST + b"replicas = 3\n")), 400, "manifest.replicas"),
}


def data_files(gw: Gateway) -> list[str]:
    """Every path in the data dir but the instance logs and SQLite's files, which change."""
    return sorted(
        str(p.relative_to(gw.data_dir))
        for p in gw.data_dir.rglob("*")
        if not p.name.startswith("dorm.sqlite") and "logs" not in p.relative_to(gw.data_dir).parts
    )


def test_refusals_leave_the_old_version_serving(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory(BUNDLE_LIMITS)
    gw.put_app("site", site_spec(gw))
    status, body = upload(gw, "site", "feat", site_bundle("v1"))
    assert status == 201, body
    serving = fetch(gw, "feat--site.localhost")
    assert serving.startswith("v1 feat ")
    before = state(gw)
    files = data_files(gw)
    for case, (data, code, field) in REFUSALS.items():
        status, answer = upload(gw, "site", "feat", data)
        assert (status, answer["error"]["field"]) == (code, field), (case, answer)
        assert state(gw) == before, case
        assert data_files(gw) == files, case
    form = {"Content-Type": "multipart/form-data; boundary=x"}
    status, answer = upload(gw, "site", "feat", site_bundle("v2"), headers=form)
    assert (status, answer["error"]["field"]) == (415, "content-type"), answer
    status, answer = put_runtime(gw, "rt", targz(M()), headers=form)
    assert (status, answer["error"]["field"]) == (415, "content-type"), answer
    assert state(gw) == before
    # The same instance (same pid) answers: nothing was restarted, let alone replaced.
    assert fetch(gw, "feat--site.localhost") == serving
    assert "Traceback" not in gw.log()


# -- a bundles directory with no room ------------------------------------------------------------
@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


@contextlib.contextmanager
def serving_site(gw: Gateway) -> Iterator[str]:
    """Start `gw` with app "site" deployed to branch feat; yields what feat--site answers (its
    instance's pid included). The gateway is stopped on leaving (before a tmpfs under it goes)."""
    try:
        gw.start()
        gw.put_app("site", site_spec(gw))
        status, body = upload(gw, "site", "feat", site_bundle("v1"))
        assert status == 201, body
        yield fetch(gw, "feat--site.localhost")
    finally:
        if gw.proc is not None and gw.proc.poll() is None:
            gw.stop()
        shutil.rmtree(gw.run_dir, ignore_errors=True)


@pytest.mark.parametrize("where", ["bundles", "data"])
def test_a_full_disk_is_507_and_changes_nothing(gateway_factory: Any, where: str) -> None:
    """The bundles dir, or the whole data dir (SQLite and logs included), on a small tmpfs."""
    gw: Gateway = gateway_factory(start=False)
    mount = gw.data_dir / "bundles" if where == "bundles" else gw.data_dir
    with small_tmpfs(mount, "3m"), serving_site(gw) as serving:
        before = state(gw)
        # Does not fit while it is received (random bytes do not compress).
        status, answer = upload(gw, "site", "feat", site_bundle("v2", os.urandom(4 << 20)))
        assert (status, answer["error"]["field"]) == (507, "body"), answer
        assert "space" in answer["error"]["message"]
        assert state(gw) == before
        # Fits as an archive, not once unpacked.
        status, answer = upload(gw, "site", "feat", site_bundle("v3", bytes(5 << 20)))
        assert (status, answer["error"]["field"]) == (507, "bundle"), answer
        assert state(gw) == before
        # A runtime bundle goes through the same store.
        runtime = targz(
            F("runtime.toml", UNIX_TOML),
            E("rootfs", "dir"),
            F("rootfs/bin/server", EXE, 0o755),
            F("rootfs/big", os.urandom(4 << 20)),
        )
        status, answer = put_runtime(gw, "big", runtime)
        assert (status, answer["error"]["field"]) == (507, "body"), answer
        assert state(gw) == before
        assert fetch(gw, "feat--site.localhost") == serving
        assert gw.admin("GET", "/v1/health") == (200, {"status": "ok"})
        # The gateway is healthy: a bundle that fits deploys.
        status, body = upload(gw, "site", "feat", site_bundle("v4"))
        assert status == 200, body
        assert fetch(gw, "feat--site.localhost").startswith("v4 feat ")
        assert "Traceback" not in gw.log()


# -- deploys racing each other and deletes (stand-in instance manager) ---------------------------
class GatedInstances(FakeInstances):
    """`redeploy` of a branch named in `gates` waits for that event, then fails if the branch
    is in `failing`."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[str, asyncio.Event] = {}
        self.entered: dict[str, threading.Event] = {}
        self.failing: set[str] = set()

    async def redeploy(self, app: str, branch: str) -> None:
        self.calls.append(("redeploy", app, branch))
        if branch in self.entered:
            self.entered[branch].set()
        if branch in self.gates:
            await self.gates[branch].wait()
        if branch in self.failing:
            raise DeployError(f"{branch} did not start")


class RaceHarness(Harness):
    """test_deploy's Harness with `GatedInstances`: a switch-over can be held mid-deploy."""

    instances: GatedInstances

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir, GatedInstances())

    def __enter__(self) -> RaceHarness:
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        async def open_gates() -> None:
            for gate in self.instances.gates.values():
                gate.set()

        self.run(open_gates())
        super().__exit__(*exc)

    def gate(self, branch: str) -> threading.Event:
        """Hold `branch`'s next switch-over until `release(branch)`; returns an event set
        once the switch-over has begun."""
        self.instances.gates[branch] = asyncio.Event()
        self.instances.entered[branch] = threading.Event()
        return self.instances.entered[branch]

    def release(self, branch: str) -> None:
        self.loop.call_soon_threadsafe(self.instances.gates[branch].set)

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        with AdminClient(f"http://127.0.0.1:{self.port}", "tok") as client:
            return client.request(method, path, body)

    def deploy(self, app: str, branch: str, data: bytes) -> tuple[int, Any]:
        with AdminClient(f"http://127.0.0.1:{self.port}", "tok", timeout=30) as client:
            return client.upload(
                f"/v1/apps/{app}/branches/{branch}/bundle", io.BytesIO(data), len(data)
            )

    def in_background(self, fn: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
        out: list[Any] = []
        thread = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
        thread.start()
        return thread, out

    def overlap(
        self, branch: str, first: tuple[Any, ...], second: tuple[Any, ...]
    ) -> tuple[tuple[int, Any], tuple[int, Any]]:
        """Run `first` (a call and its arguments) until `branch`'s switch-over has begun and
        hold it there; start `second`, give it time to arrive (it may wait for the first), then
        let both finish. Returns their answers, (status, body) each."""
        entered = self.gate(branch)
        one, first_out = self.in_background(*first)
        assert entered.wait(10)
        two, second_out = self.in_background(*second)
        two.join(2)  # it may wait for the first; either way it has arrived by now
        self.release(branch)
        one.join(30)
        two.join(30)
        return first_out[0], second_out[0]

    def coherent(self) -> dict[str, Any]:
        """The registry in memory and on disk agree, and every branch belongs to an app and
        names stored bundles."""
        reopened = Registry(self.data_dir / "dorm.sqlite")
        self.run(reopened.open())
        try:
            on_disk = (sorted(reopened.apps), sorted(reopened.branches))
        finally:
            self.run(reopened.close())
        assert on_disk == (sorted(self.registry.apps), sorted(self.registry.branches))
        stored = {p.name for p in (self.data_dir / "bundles").iterdir() if p.name != "tmp"}
        for (app, _), branch in self.registry.branches.items():
            assert app in self.registry.apps
            assert {d for d in branch.bundles if d} <= stored
        return {
            "apps": sorted(self.registry.apps),
            "branches": {f"{a}/{b}": s.bundle for (a, b), s in self.registry.branches.items()},
        }


@pytest.fixture
def race(tmp_path: Path) -> Iterator[RaceHarness]:
    with RaceHarness(tmp_path / "data") as h:
        yield h


def test_a_failed_first_deploy_does_not_undo_a_concurrent_one(race: RaceHarness) -> None:
    """Two first deploys to a new app: the one that created the app fails to start after the
    other succeeded. Undoing it must not delete the app the other deploy was answered 201 for."""
    race.instances.failing.add("one")
    first, (status, body) = race.overlap(
        "one",
        (race.deploy, "new", "one", site_bundle("a")),
        (race.deploy, "new", "two", site_bundle("b")),
    )
    assert first[0] == 422, first
    assert status == 201, body
    assert race.coherent() == {"apps": ["new"], "branches": {"new/two": body["bundle"]}}


def test_deleting_the_app_during_a_deploy(race: RaceHarness) -> None:
    """A delete of the app while a redeploy is switching over: the end state is one or the
    other (the app with the new bundle, or no app), never a branch without its app; and the
    failed switch-over's undo must not bring the deleted branch back."""
    for failing in (False, True):
        for branch in ("main", "feat"):
            status, body = race.deploy("site", branch, site_bundle(f"v1-{failing}"))
            assert status in (200, 201), body
        if failing:
            race.instances.failing.add("feat")
        deployed, deleted = race.overlap(
            "feat",
            (race.deploy, "site", "feat", site_bundle("v2")),
            (race.call, "DELETE", "/v1/apps/site"),
        )
        assert deployed[0] == (422 if failing else 200), deployed
        assert deleted[0] == 200, deleted
        assert race.coherent() == {"apps": [], "branches": {}}, failing
        race.instances.failing.discard("feat")


def test_a_deploy_recreating_a_deleted_app_waits_for_its_volume_to_go(
    race: RaceHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleting an app removes its volumes before a deploy may create the app again: one that
    arrives meanwhile waits, and its tenant never finds the old tenant's data (nor has its own
    removed under it)."""
    status, body = race.deploy("site", "main", site_bundle("v1"))
    assert status == 201, body
    volume = race.data_dir / "volumes" / "site" / "main"
    volume.mkdir(parents=True)
    (volume / "secret").write_text("the old tenant's")
    events: list[str] = []
    removing = threading.Event()
    remove = deploy_module.remove_tree

    def slow_remove(path: Path) -> None:
        removing.set()
        time.sleep(0.5)  # long enough for the re-creating deploy to arrive meanwhile
        remove(path)
        events.append("removed")

    monkeypatch.setattr(deploy_module, "remove_tree", slow_remove)
    delete, deleted = race.in_background(race.call, "DELETE", "/v1/apps/site")
    assert removing.wait(10)
    status, body = race.deploy("site", "main", site_bundle("v2"))
    events.append("deployed")
    delete.join(30)
    assert deleted[0][0] == 200, deleted
    assert status == 201, body
    assert events == ["removed", "deployed"]
    assert not volume.exists()


def test_deleting_the_branch_during_a_deploy(race: RaceHarness) -> None:
    status, body = race.deploy("site", "main", site_bundle("v1"))
    assert status == 201, body
    deployed, deleted = race.overlap(
        "feat",
        (race.deploy, "site", "feat", site_bundle("v2")),
        (race.call, "DELETE", "/v1/apps/site/branches/feat"),
    )
    assert deployed[0] == 201, deployed
    assert deleted[0] == 200, deleted  # it waited for the deploy, then deleted what it made
    assert race.coherent()["branches"] == {"site/main": body["bundle"]}


def test_one_bundle_deployed_to_many_branches_at_once(race: RaceHarness) -> None:
    data = site_bundle("same")
    status, body = race.deploy("site", "main", site_bundle("v1"))
    assert status == 201, body
    runs = [race.in_background(race.deploy, "site", f"b{i}", data) for i in range(6)]
    for thread, _ in runs:
        thread.join(30)
    answers = [out[0] for _, out in runs]
    assert [status for status, _ in answers] == [201] * 6, answers
    digests = {body["bundle"] for _, body in answers}
    assert len(digests) == 1
    end = race.coherent()
    assert {end["branches"][f"site/b{i}"] for i in range(6)} == digests
    assert list((race.data_dir / "bundles" / "tmp").iterdir()) == []


def test_rollback_racing_a_delete_of_its_app(race: RaceHarness) -> None:
    for version in ("v1", "v2"):
        status, body = race.deploy("site", "feat", site_bundle(version))
        assert status in (200, 201), body
    rolled, deleted = race.overlap(
        "feat",
        (race.call, "POST", "/v1/apps/site/branches/feat/rollback"),
        (race.call, "DELETE", "/v1/apps/site"),
    )
    assert rolled[0] == 200, rolled
    assert deleted[0] == 200, deleted
    assert race.coherent() == {"apps": [], "branches": {}}


def test_a_full_registry_disk_is_507_and_changes_nothing(gateway_factory: Any) -> None:
    """The bundle fits (the store is on its own tmpfs) but the registry cannot record it: 507,
    the registry as it was, and the tree activated for it collected again; likewise for a
    runtime bundle and an app spec."""
    gw: Gateway = gateway_factory(start=False)
    with (
        small_tmpfs(gw.data_dir, "1m"),
        small_tmpfs(gw.data_dir / "bundles", "8m"),
        serving_site(gw) as serving,
    ):
        before = state(gw)
        filler = gw.data_dir / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, bytes(65536))
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"x")
        finally:
            os.close(fd)
        for branch in ("feat", "new"):
            status, answer = upload(gw, "site", branch, site_bundle("v2"))
            assert (status, answer["error"]["field"]) == (507, "registry"), answer
            assert "space" in answer["error"]["message"]
            wait_until(lambda: state(gw) == before, what="the unrecorded tree to go")
        # The other writes say the same, naming no field: the data dir as a whole is full.
        status, answer = gw.admin("PUT", "/v1/apps/other", site_spec(gw))
        assert (status, answer["error"]["field"]) == (507, None), answer
        runtime = targz(
            F("runtime.toml", UNIX_TOML), E("rootfs", "dir"), F("rootfs/bin/server", EXE, 0o755)
        )
        status, answer = put_runtime(gw, "rt", runtime)
        assert (status, answer["error"]["field"]) == (507, "registry"), answer
        wait_until(lambda: state(gw) == before, what="the unrecorded runtime tree to go")
        assert gw.admin("GET", "/v1/runtimes/rt")[0] == 404
        assert fetch(gw, "feat--site.localhost") == serving
        filler.unlink()
        status, body = upload(gw, "site", "feat", site_bundle("v2"))
        assert status == 200, body
        assert fetch(gw, "feat--site.localhost").startswith("v2 feat ")
        assert "Traceback" not in gw.log()


def test_branch_env_set_during_a_failed_deploy_is_kept(race: RaceHarness) -> None:
    """PUT of a branch's env while a deploy to it is switching over: the deploy's undo must
    not put back the env from before (a lost update); the PUT waits for the deploy."""
    status, body = race.deploy("site", "feat", site_bundle("v1"))
    assert status == 201, body
    race.instances.failing.add("feat")
    deployed, answered = race.overlap(
        "feat",
        (race.deploy, "site", "feat", site_bundle("v2")),
        (race.call, "PUT", "/v1/apps/site/branches/feat", {"env": {"X": "1"}}),
    )
    assert deployed[0] == 422, deployed
    assert answered[0] == 200, answered
    feat = race.registry.branches[("site", "feat")]
    assert (feat.env, feat.bundle) == ({"X": "1"}, body["bundle"])
    race.coherent()


def test_app_spec_put_during_a_creating_deploy(race: RaceHarness) -> None:
    """PUT of the app while a deploy that creates it is switching over: one after the other,
    never a 500 from both creating it."""
    deployed, answered = race.overlap(
        "main",
        (race.deploy, "fresh", "main", site_bundle("v1")),
        (race.call, "PUT", "/v1/apps/fresh", {"command": ["python3", "app.py"]}),
    )
    assert deployed[0] == 201, deployed
    assert answered[0] == 200, answered  # it found the app the deploy created
    assert race.coherent()["apps"] == ["fresh"]


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"network": "egress"}, "manifest.network"),
        ({"volume": True}, "manifest.volume"),
        ({"app_dir": "/etc"}, "manifest.app_dir"),
        ({"isolation": "process"}, "manifest.isolation"),
    ],
)
def test_a_deploy_cannot_create_an_app_with_operator_grants(
    race: RaceHarness, extra: dict[str, Any], field: str
) -> None:
    """A first deploy creates the app from its manifest, but never with what only an operator
    may grant (egress, a volume, a host directory, no sandbox). (Limits above the defaults
    are not refused but capped: tests/test_deploy.py pins that.)"""
    status, body = race.deploy("new", "main", site_bundle("v1", **extra))
    assert (status, body["error"]["field"]) == (400, field), body
    assert race.coherent() == {"apps": [], "branches": {}}
    assert list((race.data_dir / "bundles" / "tmp").iterdir()) == []
