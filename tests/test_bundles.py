"""Bundles: the archive checks one by one (crafted tar.gz and zip archives, raw bytes for broken
gzip), packing, the store, and every refusal through a real gateway's upload endpoint, each
followed by proof that nothing changed: same registry, same store, an empty tmp/."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import http.client
import io
import json
import os
import shutil
import socket
import stat
import tarfile
import warnings
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.bundles import (
    BundleError,
    BundleLimits,
    BundleStore,
    expected_digest,
    extract,
    pack,
    sniff_format,
)
from tests.conftest import Gateway, make_gateway

MANIFEST = b'runtime = "command"\ncommand = ["python3", "app.py"]\n'


# -- building archives ---------------------------------------------------------------------------
@dataclass(frozen=True)
class E:
    """One crafted archive entry. kind: file, dir, sym, hard, chr, blk, fifo, sock."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int | None = None
    target: str = ""


def F(name: str, data: bytes = b"", mode: int = 0o644) -> E:
    return E(name, "file", data, mode)


def M(data: bytes = MANIFEST) -> E:
    return F("dorm.toml", data)


def targz(*entries: E, compresslevel: int = 6) -> bytes:
    """A tar.gz with exactly these entries, as written (nothing is normalized or checked)."""
    buf = io.BytesIO()
    kinds = {
        "dir": tarfile.DIRTYPE,
        "sym": tarfile.SYMTYPE,
        "hard": tarfile.LNKTYPE,
        "chr": tarfile.CHRTYPE,
        "blk": tarfile.BLKTYPE,
        "fifo": tarfile.FIFOTYPE,
    }
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=compresslevel) as gz,
        tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tf,
    ):
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.mode = e.mode if e.mode is not None else (0o755 if e.kind == "dir" else 0o644)
            if e.kind == "file":
                info.size = len(e.data)
                tf.addfile(info, io.BytesIO(e.data))
                continue
            info.type = kinds[e.kind]
            info.linkname = e.target
            tf.addfile(info)
    return buf.getvalue()


def zipped(*entries: E) -> bytes:
    """A zip whose entries carry Unix modes (file type bits included) in external_attr."""
    buf = io.BytesIO()
    types = {
        "file": stat.S_IFREG,
        "dir": stat.S_IFDIR,
        "sym": stat.S_IFLNK,
        "chr": stat.S_IFCHR,
        "blk": stat.S_IFBLK,
        "fifo": stat.S_IFIFO,
        "sock": stat.S_IFSOCK,
    }
    with (
        warnings.catch_warnings(),  # "Duplicate name": crafting that is the point
        zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf,
    ):
        warnings.simplefilter("ignore")
        for e in entries:
            name = e.name + "/" if e.kind == "dir" and not e.name.endswith("/") else e.name
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.create_system = 3
            mode = e.mode if e.mode is not None else (0o755 if e.kind == "dir" else 0o644)
            info.external_attr = (types[e.kind] | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, e.target.encode() if e.kind == "sym" else e.data)
    return buf.getvalue()


def zeros_zip(size: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("dorm.toml", MANIFEST)
        with zf.open("zeros", "w") as out:
            for _ in range(size // (1 << 20)):
                out.write(bytes(1 << 20))
    return buf.getvalue()


def zeros_targz(size: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("dorm.toml")
        info.size = len(MANIFEST)
        tf.addfile(info, io.BytesIO(MANIFEST))
        info = tarfile.TarInfo("zeros")
        info.size = size
        tf.addfile(info, io.BytesIO(bytes(size)))
    return buf.getvalue()


# Refusals common to tar.gz and zip: (entries, error substring).
REFUSED_ENTRIES: dict[str, tuple[tuple[E, ...], str]] = {
    "traversal": ((M(), F("../evil", b"x")), "'..'"),
    "traversal-deep": ((M(), F("a/../../evil", b"x")), "'..'"),
    "absolute": ((M(), F("/tmp/evil", b"x")), "absolute"),
    "symlink-up": ((M(), E("l", "sym", target="../../etc")), "resolves outside"),
    "symlink-absolute": ((M(), E("l", "sym", target="/etc/passwd")), "absolute path"),
    "symlink-chain": (
        (M(), E("d/up", "sym", target=".."), E("x", "sym", target="d/up/..")),
        "resolves outside",
    ),
    "write-through-symlink": ((M(), E("l", "sym", target="."), F("l/x", b"x")), "is a symlink"),
    "chr-device": ((M(), E("null", "chr")), "device"),
    "blk-device": ((M(), E("sda", "blk")), "device"),
    "fifo": ((M(), E("pipe", "fifo")), "fifo"),
    "setuid": ((M(), F("run", b"#!/bin/sh\n", 0o4755)), "setuid"),
    "setgid": ((M(), F("run", b"#!/bin/sh\n", 0o2755)), "setgid"),
    "sticky-dir": ((M(), E("d", "dir", mode=0o1777)), "sticky"),
    "duplicate": ((M(), F("a", b"1"), F("a", b"2")), "twice"),
    "duplicate-spelled-differently": ((M(), F("a", b"1"), F("./a", b"2")), "twice"),
    "file-then-dir": ((M(), F("a", b"1"), E("a", "dir")), "twice"),
    "dir-then-file": ((M(), E("a", "dir"), F("a", b"1")), "twice"),
    "file-then-child": ((M(), F("a", b"1"), F("a/b", b"2")), "its parent 'a' is a file"),
    "symlink-then-dir": ((M(), E("a", "sym", target="."), E("a", "dir")), "twice"),
    "manifest-twice": ((M(), M(b'runtime = "static"\n')), "twice"),
    # Deep trees could not be removed again (os.walk and shutil.rmtree recurse per level; 1500
    # levels fit in the name length), and long names would pass PATH_MAX under the store.
    "too-deep": ((M(), F("a/" * 300 + "f", b"x")), "levels deep"),
    "too-long": ((M(), F(("d" * 250 + "/") * 13 + "f", b"x")), "over-long"),
}
TAR_ONLY: dict[str, tuple[tuple[E, ...], str]] = {
    "hardlink-outside": ((M(), E("h", "hard", target="../../etc/passwd")), "leaves the bundle"),
    "hardlink-absolute": ((M(), E("h", "hard", target="/etc/passwd")), "leaves the bundle"),
    "hardlink-forward": (
        (M(), E("h", "hard", target="later"), F("later", b"x")),
        "not a file extracted before it",
    ),
    "hardlink-to-dir": ((M(), E("d", "dir"), E("h", "hard", target="d")), "not a file"),
    "hardlink-to-symlink": (
        (M(), F("f", b"x"), E("l", "sym", target="f"), E("h", "hard", target="l")),
        "not a file",
    ),
}
ZIP_ONLY: dict[str, tuple[tuple[E, ...], str]] = {
    "socket": ((M(), E("s", "sock")), "socket"),
}


# -- extraction units ------------------------------------------------------------------------------
def run_extract(tmp_path: Path, data: bytes, fmt: str, **limits: Any) -> Any:
    archive = tmp_path / "archive"
    archive.write_bytes(data)
    return extract(archive, fmt, tmp_path / "out", BundleLimits(**limits))


def test_a_good_bundle_is_extracted_read_only(tmp_path: Path) -> None:
    data = targz(
        M(),
        F("app.py", b"print('hi')\n"),
        F("bin/run", b"#!/bin/sh\n", 0o755),
        E("static", "dir"),
        F("static/index.html", b"<h1>hi</h1>"),
        E("static/home.html", "sym", target="index.html"),
        E("docs", "sym", target="static"),
        E("copy.py", "hard", target="app.py"),
        F("vendor/lib/__init__.py", b"X = 1\n"),
    )
    result = run_extract(tmp_path, data, "tar.gz")
    root = tmp_path / "out"
    assert result.path == root
    assert result.manifest == {"runtime": "command", "command": ["python3", "app.py"]}
    assert (root / "static" / "home.html").read_bytes() == b"<h1>hi</h1>"
    assert os.readlink(root / "docs") == "static"
    assert (root / "copy.py").stat().st_ino == (root / "app.py").stat().st_ino
    assert stat.S_IMODE((root / "app.py").stat().st_mode) == 0o444
    assert stat.S_IMODE((root / "bin" / "run").stat().st_mode) == 0o555
    for d in (root, root / "bin", root / "static", root / "vendor" / "lib"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o555
    # 9 entries plus the implicit directories bin, vendor and vendor/lib
    assert (result.files, result.unpacked) == (12, len(MANIFEST) + 12 + 10 + 11 + 6)


def test_a_good_zip_is_extracted(tmp_path: Path) -> None:
    data = zipped(
        M(),
        F("app.py", b"x = 1\n"),
        F("run.sh", b"#!/bin/sh\n", 0o755),
        E("link", "sym", target="app.py"),
        E("empty", "dir"),
    )
    result = run_extract(tmp_path, data, "zip")
    root = tmp_path / "out"
    assert result.manifest["runtime"] == "command"
    assert os.readlink(root / "link") == "app.py"
    assert stat.S_IMODE((root / "run.sh").stat().st_mode) == 0o555
    assert (root / "empty").is_dir()


@pytest.mark.parametrize("case", sorted({**REFUSED_ENTRIES, **TAR_ONLY}))
def test_tar_refusals(tmp_path: Path, case: str) -> None:
    entries, message = {**REFUSED_ENTRIES, **TAR_ONLY}[case]
    with pytest.raises(BundleError) as info:
        run_extract(tmp_path, targz(*entries), "tar.gz")
    assert (info.value.status, info.value.field) == (400, "bundle")
    assert message in info.value.message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", sorted({**REFUSED_ENTRIES, **ZIP_ONLY}))
def test_zip_refusals(tmp_path: Path, case: str) -> None:
    entries, message = {**REFUSED_ENTRIES, **ZIP_ONLY}[case]
    with pytest.raises(BundleError) as info:
        run_extract(tmp_path, zipped(*entries), "zip")
    assert (info.value.status, info.value.field) == (400, "bundle")
    assert message in info.value.message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("data", "fmt", "limits", "message"),
    [
        (zeros_targz(3 << 20), "tar.gz", {"max_unpacked": 2 << 20}, "more than 2097152 bytes"),
        (zeros_zip(3 << 20), "zip", {"max_unpacked": 2 << 20}, "more than 2097152 bytes"),
        (zeros_targz(8 << 20), "tar.gz", {"ratio_floor": 1 << 20}, "compression ratio"),
        (zeros_zip(8 << 20), "zip", {"ratio_floor": 1 << 20}, "compression ratio"),
        (targz(M(), *(F(f"f{i}") for i in range(30))), "tar.gz", {"max_files": 20}, "20 entries"),
        (zipped(M(), *(F(f"f{i}") for i in range(30))), "zip", {"max_files": 20}, "20 entries"),
        (targz(M(), F("deep/a/b/c/d/e")), "tar.gz", {"max_files": 4}, "4 entries"),
    ],
    ids=["tar-bomb", "zip-bomb", "tar-ratio", "zip-ratio", "tar-count", "zip-count", "implicit"],
)
def test_size_and_count_limits(
    tmp_path: Path, data: bytes, fmt: str, limits: dict[str, int], message: str
) -> None:
    with pytest.raises(BundleError) as info:
        run_extract(tmp_path, data, fmt, **limits)
    assert info.value.status == 413
    assert message in info.value.message
    assert not (tmp_path / "out").exists()


def test_huge_pax_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = 1 << 30  # never read: refused from the header block alone
    raw = header.tobuf(tarfile.USTAR_FORMAT)
    with pytest.raises(BundleError) as info:
        run_extract(tmp_path, gzip.compress(raw + bytes(4096)), "tar.gz")
    assert "metadata header larger" in info.value.message


def test_truncated_and_corrupt_gzip(tmp_path: Path) -> None:
    good = targz(M(), F("app.py", os.urandom(50_000)))
    for data in (good[: len(good) // 2], good[:-4], good[:12]):
        with pytest.raises(BundleError) as info:
            run_extract(tmp_path, data, "tar.gz")
        assert info.value.status == 400
        assert "truncated or corrupt" in info.value.message
        assert not (tmp_path / "out").exists()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    with pytest.raises(BundleError):
        run_extract(tmp_path, bytes(flipped), "tar.gz")
    with pytest.raises(BundleError) as info:
        run_extract(tmp_path, zipped(M(), F("a", b"x" * 1000))[:-30], "zip")
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ((F("app.py"),), "no dorm.toml"),
        ((F("sub/dorm.toml", MANIFEST),), "no dorm.toml"),
        ((M(b"runtime = [unclosed"),), "not valid TOML"),
        ((M(b"\xff\xfe"),), "not UTF-8"),
        ((F("real", MANIFEST), E("dorm.toml", "sym", target="real")), "regular file"),
        ((E("dorm.toml", "dir"),), "regular file"),
        ((M(b"#" * 70_000),), "larger than"),
    ],
    ids=["missing", "not-at-root", "bad-toml", "not-utf8", "symlink", "directory", "huge"],
)
def test_manifest_refusals(tmp_path: Path, entries: tuple[E, ...], message: str) -> None:
    with pytest.raises(BundleError) as info:
        run_extract(tmp_path, targz(*entries), "tar.gz")
    assert (info.value.status, info.value.field) == (400, "manifest")
    assert message in info.value.message
    assert not (tmp_path / "out").exists()


def test_sniff_and_digest_headers() -> None:
    assert sniff_format(targz(M())) == "tar.gz"
    assert sniff_format(zipped(M())) == "zip"
    assert sniff_format(b"Rar!\x1a\x07") is None
    digest = hashlib.sha256(b"abc").digest()
    b64 = base64.b64encode(digest).decode()
    assert expected_digest({"digest": f"md5=xyz, SHA-256={b64}"}) == ("digest", digest.hex())
    assert expected_digest({"content-digest": f"sha-256=:{b64}:"}) == (
        "content-digest",
        digest.hex(),
    )
    assert expected_digest({"x-content-sha256": digest.hex().upper()}) == (
        "x-content-sha256",
        digest.hex(),
    )
    assert expected_digest({}) is None
    for headers, field in (
        ({"digest": "sha-256=!!!"}, "digest"),
        ({"digest": "md5=abc"}, "digest"),
        ({"x-content-sha256": "abc"}, "x-content-sha256"),
    ):
        with pytest.raises(BundleError) as info:
            expected_digest(headers)
        assert info.value.field == field


def test_pack_is_deterministic_and_skips_junk(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "pkg" / "__pycache__").mkdir(parents=True)
    (src / ".git").mkdir()
    (src / ".venv" / "bin").mkdir(parents=True)
    (src / "dorm.toml").write_bytes(MANIFEST)
    (src / "pkg" / "mod.py").write_text("X = 1\n")
    (src / "pkg" / "__pycache__" / "mod.pyc").write_bytes(b"junk")
    (src / ".git" / "HEAD").write_text("ref")
    (src / "run.sh").write_text("#!/bin/sh\n")
    (src / "run.sh").chmod(0o750)
    (src / "link").symlink_to("pkg/mod.py")
    os.mkfifo(src / "fifo")
    warnings: list[str] = []
    first, second = io.BytesIO(), io.BytesIO()
    pack(src, first, warn=warnings.append)
    os.utime(src / "pkg" / "mod.py", (1, 1))  # times are not part of the archive
    pack(src, second)
    assert first.getvalue() == second.getvalue()
    assert warnings == ["skipping fifo: not a regular file, directory or symlink"]
    with tarfile.open(fileobj=io.BytesIO(first.getvalue())) as tf:
        members = {m.name: m for m in tf.getmembers()}
    assert sorted(members) == ["dorm.toml", "link", "pkg", "pkg/mod.py", "run.sh"]
    assert members["run.sh"].mode == 0o755 and members["pkg/mod.py"].mode == 0o644
    assert {(m.uid, m.gid, m.mtime, m.uname) for m in members.values()} == {(0, 0, 0, "")}
    (tmp_path / "a.tgz").write_bytes(first.getvalue())
    result = extract(tmp_path / "a.tgz", "tar.gz", tmp_path / "out", BundleLimits())
    assert (tmp_path / "out" / "link").read_text() == "X = 1\n"
    assert result.files == 5


# -- the store -------------------------------------------------------------------------------------
async def chunks_of(data: bytes, size: int = 100_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        await asyncio.sleep(0)
        yield data[i : i + size]


def test_store_spool_unpack_activate_gc(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = BundleStore(tmp_path / "bundles", BundleLimits(max_size=4 << 20))
        store.prepare()
        data = targz(M(), F("app.py", os.urandom(3 << 20)), compresslevel=1)
        spooled = await store.spool(chunks_of(data))
        assert spooled.digest == hashlib.sha256(data).hexdigest()
        assert spooled.size == len(data)
        extracted = await store.unpack(spooled, None)
        await store.discard(spooled.path)
        async with store.lock:
            assert await store.activate(extracted, spooled.digest) is True
        assert store.path(spooled.digest).is_dir()
        # The same content again: the store keeps its copy and drops the new one.
        again = await store.unpack(await store.spool(chunks_of(data)), "tar.gz")
        async with store.lock:
            assert await store.activate(again, spooled.digest) is False
        assert not again.path.exists()
        # Too large while streaming: refused, and the partial file is gone.
        with pytest.raises(BundleError) as info:
            await store.spool(chunks_of(os.urandom(5 << 20)))
        assert (info.value.status, info.value.field) == (413, "body")
        leftovers = [p.name for p in store.tmp.iterdir() if p.name.startswith("upload-")]
        assert len(leftovers) == 1  # only the spooled copy of `again`, not yet discarded
        for p in store.tmp.iterdir():
            await store.discard(p)
        # GC: a pinned or referenced bundle stays; otherwise it goes and is forgotten.
        forgotten: list[set[str]] = []

        async def forget(doomed: set[str]) -> None:
            forgotten.append(doomed)

        with store.pinned(spooled.digest):
            assert await store.gc(set, forget) == []
        assert await store.gc(lambda: {spooled.digest}) == []
        assert await store.gc(set, forget) == [spooled.digest]
        assert forgotten == [set(), {spooled.digest}]
        assert not store.path(spooled.digest).exists()
        assert list(store.tmp.iterdir()) == []
        store.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_prepare_empties_tmp(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "bundles")
    stale = store.tmp / "tree-dead" / "sub"
    stale.mkdir(parents=True)
    (stale / "f").write_text("x")
    stale.chmod(0o555)
    store.prepare()
    assert list(store.tmp.iterdir()) == []
    with pytest.raises(ValueError):
        store.path("../etc")
    store.close()


# -- refusals through the gateway ------------------------------------------------------------------
BUNDLE_LIMITS = 'max_bundle_size = "1MiB"\nmax_bundle_unpacked = "2MiB"\nmax_bundle_files = 40\n'


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway for all refusal cases (they change nothing, which is the point), with small
    bundle limits; an app `site` with one deployed branch, so there is state to keep."""
    gateway = make_gateway(tmp_path_factory.mktemp("bundles"), BUNDLE_LIMITS)
    gateway.data_dir.parent.mkdir(parents=True, exist_ok=True)
    gateway.start()
    try:
        gateway.put_app("site", {"runtime": "command", "command": ["python3", "app.py"]})
        status, body = upload(gateway, "site", "keep", targz(M(), F("app.py", b"v1")))
        assert status == 201, body
        yield gateway
    finally:
        with contextlib.suppress(AssertionError):
            gateway.stop()
        shutil.rmtree(gateway.run_dir, ignore_errors=True)


def upload(
    gw: Gateway,
    app: str,
    branch: str,
    data: bytes,
    *,
    query: str = "",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.admin_port, timeout=30)
    try:
        conn.request(
            "PUT",
            f"/v1/apps/{app}/branches/{branch}/bundle{query}",
            body=data,
            headers={"Authorization": f"Bearer {gw.token}", **(headers or {})},
        )
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def state(gw: Gateway) -> dict[str, Any]:
    """Everything an upload could change: apps, branches, stored bundles, staging area."""
    status, apps = gw.admin("GET", "/v1/apps")
    assert status == 200
    branches = {}
    for spec in apps["apps"]:
        status, listing = gw.admin("GET", f"/v1/apps/{spec['name']}/branches")
        assert status == 200
        branches[spec["name"]] = listing
    bundles = gw.data_dir / "bundles"
    return {
        "apps": apps,
        "branches": branches,
        "stored": sorted(p.name for p in bundles.iterdir() if p.name != "tmp"),
        "tmp": sorted(p.name for p in (bundles / "tmp").iterdir()),
    }


def assert_refused(
    gw: Gateway,
    answer: tuple[int, Any],
    before: dict[str, Any],
    status: int,
    field: str,
    message: str,
) -> None:
    code, body = answer
    assert code == status, body
    assert body["error"]["field"] == field, body
    assert message in body["error"]["message"], body
    after = state(gw)
    assert after == before
    assert after["tmp"] == []


HTTP_CASES: dict[str, tuple[bytes, int, str, str]] = {
    **{f"tar-{k}": (targz(*e), 400, "bundle", m) for k, (e, m) in REFUSED_ENTRIES.items()},
    **{f"tar-{k}": (targz(*e), 400, "bundle", m) for k, (e, m) in TAR_ONLY.items()},
    **{f"zip-{k}": (zipped(*e), 400, "bundle", m) for k, (e, m) in REFUSED_ENTRIES.items()},
    **{f"zip-{k}": (zipped(*e), 400, "bundle", m) for k, (e, m) in ZIP_ONLY.items()},
    "tar-bomb": (zeros_targz(3 << 20), 413, "bundle", "more than 2097152 bytes"),
    "zip-bomb": (zeros_zip(3 << 20), 413, "bundle", "more than 2097152 bytes"),
    "tar-too-many-files": (targz(M(), *(F(f"f{i}") for i in range(45))), 413, "bundle", "40"),
    "zip-too-many-files": (zipped(M(), *(F(f"f{i}") for i in range(45))), 413, "bundle", "40"),
    "too-large": (os.urandom((1 << 20) + 1), 413, "body", "larger than 1048576"),
    "truncated-gzip": (
        targz(M(), F("a", os.urandom(20_000)))[:9_000],
        400,
        "bundle",
        "truncated or corrupt",
    ),
    "not-an-archive": (b"just some text\n" * 10, 400, "format", "not a gzip"),
    "no-manifest": (targz(F("app.py", b"x")), 400, "manifest", "no dorm.toml"),
    "bad-toml": (targz(M(b"runtime = ")), 400, "manifest", "not valid TOML"),
    "manifest-runtime": (targz(M(b'runtime = "docker"\n')), 400, "manifest.runtime", "docker"),
    "manifest-unknown-key": (
        targz(M(MANIFEST + b'colour = "red"\n')),
        400,
        "manifest.colour",
        "unknown field",
    ),
    "manifest-env": (
        targz(M(MANIFEST + b'env = { PORT = "1" }\n')),
        400,
        "manifest.env.PORT",
        "set by the gateway",
    ),
    "manifest-entry": (
        targz(M(b'runtime = "python-asgi"\n')),
        400,
        "manifest.entry",
        "required",
    ),
    "manifest-name": (targz(M(MANIFEST + b'name = "other"\n')), 400, "manifest.name", "match"),
}


@pytest.mark.parametrize("case", sorted(HTTP_CASES))
def test_refused_uploads_change_nothing(gw: Gateway, case: str) -> None:
    data, status, field, message = HTTP_CASES[case]
    before = state(gw)
    assert_refused(gw, upload(gw, "site", "keep", data), before, status, field, message)
    # A refused first deploy must not create the branch, nor the app.
    assert_refused(gw, upload(gw, "site", "fresh", data), before, status, field, message)
    assert_refused(gw, upload(gw, "newapp", "main", data), before, status, field, message)


def test_refused_headers_and_queries_change_nothing(gw: Gateway) -> None:
    data = targz(M(), F("app.py", b"v2"))
    wrong = hashlib.sha256(b"something else").digest()
    before = state(gw)
    cases: list[tuple[dict[str, str], str, int, str, str]] = [
        ({"X-Content-SHA256": wrong.hex()}, "", 400, "x-content-sha256", "does not match"),
        ({"X-Content-SHA256": "zz"}, "", 400, "x-content-sha256", "hexadecimal"),
        (
            {"Digest": "sha-256=" + base64.b64encode(wrong).decode()},
            "",
            400,
            "digest",
            "does not match",
        ),
        ({"Digest": "sha-256=%%%"}, "", 400, "digest", "base64"),
        ({}, "?format=rar", 400, "format", "expected one of"),
        ({}, "?format=zip", 400, "bundle", "zip"),
        ({}, "?colour=red", 400, "colour", "unknown query parameter"),
    ]
    for headers, query, status, field, message in cases:
        answer = upload(gw, "site", "keep", data, query=query, headers=headers)
        assert_refused(gw, answer, before, status, field, message)


def test_chunked_upload_over_the_limit(gw: Gateway) -> None:
    """No Content-Length to refuse up front: the cap applies while the body streams in."""
    before = state(gw)
    with socket.create_connection(("127.0.0.1", gw.admin_port), timeout=10) as sock:
        sock.sendall(
            b"PUT /v1/apps/site/branches/keep/bundle HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {gw.token}\r\n".encode()
            + b"Transfer-Encoding: chunked\r\n\r\n"
        )
        piece = os.urandom(64 * 1024)
        answer = b""
        with contextlib.suppress(OSError):
            for _ in range(40):  # 2.5 MiB offered; the server stops reading at 1 MiB
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        sock.settimeout(10)
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:200]
    assert json.loads(body)["error"]["field"] == "body"
    assert state(gw) == before


def test_digest_headers_that_match_are_accepted(gw: Gateway) -> None:
    data = targz(M(), F("app.py", b"digest-checked"))
    digest = hashlib.sha256(data).digest()
    for headers in (
        {"X-Content-SHA256": digest.hex()},
        {"Digest": "sha-256=" + base64.b64encode(digest).decode()},
        {"Content-Digest": "sha-256=:" + base64.b64encode(digest).decode() + ":"},
    ):
        status, body = upload(gw, "site", "digests", data, headers=headers)
        assert status in (200, 201), body
        assert body["bundle"] == digest.hex()
    status, body = gw.admin("DELETE", "/v1/apps/site/branches/digests")
    assert status == 200, body
