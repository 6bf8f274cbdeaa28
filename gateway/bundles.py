"""Bundles: an app's code as an uploaded archive, checked, unpacked and stored by content.

A bundle is a `.tar.gz` or `.zip` with a `dorm.toml` manifest at its root (app-spec keys, TOML)
next to the app's files; Python dependencies may be vendored in `vendor/`. Uploads come from
whoever holds a deploy credential, so an archive is treated as hostile input:

* It is spooled to disk while it is received (never whole in memory), hashed on the way, and
  its size is capped before and while it arrives.
* Extraction does not use `tarfile.extractall`/`zipfile.extractall`. Every entry is checked and
  created by hand: no absolute paths, no `..`, nothing under a symlink, no duplicates; regular
  files, directories, symlinks whose target stays inside the tree, and hard links to files
  already extracted -- devices, fifos, sockets and setuid/setgid/sticky bits are refused. Bytes
  and entries are counted as they are produced (headers are not trusted), and the compression
  ratio is capped, so a bomb stops early.
* The tree is made read-only (files 0444/0555, directories 0555) and only then moved into place
  with one `rename`, so nobody ever sees a half-extracted bundle, and an upload that fails at any
  step leaves nothing behind.

Store layout under `<data_dir>/bundles/`:

    <sha256>/   the extracted tree of the archive whose bytes hash to <sha256> (read-only)
    tmp/        uploads and extractions in progress, and trees being deleted; emptied at start

The manifest of each stored bundle is also kept in the registry (`bundles` table), so the
effective spec of a branch is computed without reading the disk.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import gzip
import hashlib
import logging
import lzma
import os
import secrets
import stat
import struct
import tarfile
import tomllib
import zipfile
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from tarfile import (
    GNUTYPE_LONGLINK,
    GNUTYPE_LONGNAME,
    GNUTYPE_SPARSE,
    SOLARIS_XHDTYPE,
    XGLTYPE,
    XHDTYPE,
)
from typing import IO, Any

from gateway.appspec import is_digest

log = logging.getLogger("dorm.bundles")

MANIFEST = "dorm.toml"
MAX_MANIFEST = 64 * 1024
FORMATS = ("tar.gz", "zip")
# Spooled writes are handed to a thread in pieces of this size; one is written while the next
# is received, so an upload holds at most about two of them in memory.
SPOOL_CHUNK = 1024 * 1024
READ_CHUNK = 256 * 1024
# A path in a bundle leaves room under PATH_MAX (4096) for the store's own directory, and is
# at most MAX_DEPTH directories deep: no app needs more, and whatever walks a stored tree with
# os.walk (one recursion per level in Python 3.11, against a limit of 1000) stays far from the
# limit. remove_tree does not depend on it: a deeper tree stored by an older version goes too.
MAX_NAME = 3072
MAX_DEPTH = 256
MAX_COMPONENT = 255
MAX_LINK_TARGET = 4095
MAX_SYMLINK_HOPS = 40
# A pax or GNU long-name header is read whole by tarfile: bound it before it is read.
MAX_TAR_META = 64 * 1024
# Global pax headers are merged into one dict that tarfile copies into every later member:
# bound them in all (`git archive` writes one of about 50 bytes).
MAX_TAR_GLOBAL_META = 16 * 1024
# zipfile reads a zip's whole central directory into memory, then each entry's name, extra
# field and comment again: bound it by this plus 1 KiB per allowed entry (a real directory
# takes some 100-300 bytes an entry).
ZIP_DIRECTORY_BASE = 16 * 1024**2
DEFAULT_MAX_RATIO = 200
DEFAULT_RATIO_FLOOR = 16 * 1024**2
_SPECIAL_BITS = ((stat.S_ISUID, "setuid"), (stat.S_ISGID, "setgid"), (stat.S_ISVTX, "sticky"))
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
# Out of space (or quota): the upload is refused with 507, not reported as a server fault.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class BundleError(Exception):
    """A refused bundle: HTTP status, the field at fault ("bundle", "manifest", a header...)."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.status = status
        self.field = field
        self.message = message


class DeployError(Exception):
    """A bundle that was stored but would not run (did not start, failed its health check).

    Raised by `InstanceManager.redeploy`; the deploy is then undone and the client told why.
    It lives here, not in the deploy routes, so the instance manager can raise it without
    importing the admin API.
    """


def _refuse(name: str, why: str, status: int = 400) -> BundleError:
    return BundleError(status, "bundle", f"entry {name!r}: {why}")


def _no_space(exc: BaseException, field: str, what: str) -> BundleError | None:
    """The 507 for an OSError that says the disk is full, else None."""
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return BundleError(507, field, f"not enough disk space to {what}: {exc.strerror}")
    return None


@dataclass(frozen=True, slots=True)
class BundleLimits:
    """How big a bundle may be: as uploaded, once unpacked, in entries, and in expansion."""

    max_size: int = 512 * 1024**2
    max_unpacked: int = 2 * 1024**3
    max_files: int = 20_000
    max_ratio: int = DEFAULT_MAX_RATIO
    # Below this many unpacked bytes the ratio is not checked: small, very compressible files
    # (a page of zeros, a repetitive fixture) are legitimate and harmless.
    ratio_floor: int = DEFAULT_RATIO_FLOOR


@dataclass(frozen=True, slots=True)
class Spooled:
    """An upload received in full: where it is, its sha256 (hex) and size."""

    path: Path
    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class Extracted:
    """A bundle unpacked into a private temporary directory, not yet activated."""

    path: Path
    files: int
    unpacked: int
    manifest: dict[str, Any]


# -- digests and formats -------------------------------------------------------------------------
_FORMAT_ALIASES = {"tar.gz": "tar.gz", "tgz": "tar.gz", "zip": "zip"}


def upload_format(query: dict[str, str]) -> str | None:
    """The archive format an upload names with `?format=`, or None to sniff it."""
    if "format" not in query:
        return None
    fmt = _FORMAT_ALIASES.get(query["format"].lower())
    if fmt is None:
        raise BundleError(400, "format", f"expected one of {', '.join(FORMATS)}")
    return fmt


_SINGLE_HEADERS = ("content-type", "x-content-sha256", "digest", "content-digest")


def upload_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """An upload's headers by lower-cased name. The ones an upload is checked by (its digest,
    its content type) may be given once: which of two would count is ambiguous."""
    headers: dict[str, str] = {}
    for key, value in raw:
        name = key.decode("latin-1").lower()
        if name in headers and name in _SINGLE_HEADERS:
            raise BundleError(400, name, "given more than once")
        headers[name] = value.decode("latin-1")
    return headers


def check_content_type(headers: dict[str, str]) -> None:
    """Refuse an archive sent as a form (curl -F, an HTML form): the body must be the archive's
    bytes. Any other Content-Type is not consulted, since the format is named or sniffed
    (`curl --data-binary` labels the archive application/x-www-form-urlencoded)."""
    kind = headers.get("content-type", "").split(";")[0].strip().lower()
    if kind.startswith("multipart/"):
        raise BundleError(
            415,
            "content-type",
            f"{kind} is not accepted: send the archive itself as the request body "
            "(curl --data-binary @app.tar.gz, or `dorm deploy`)",
        )


def expected_digest(headers: dict[str, str]) -> tuple[str, str] | None:
    """The sha256 a client announced, as (header name, hex), from `Digest: sha-256=<base64>`,
    `Content-Digest: sha-256=:<base64>:` or `X-Content-SHA256: <hex>`; None if none was sent.

    Raises BundleError naming the header if it is present but unreadable: a client that asked
    for verification must not silently get none.
    """
    hex_value = headers.get("x-content-sha256")
    if hex_value is not None:
        value = hex_value.strip().lower()
        if not is_digest(value):
            raise BundleError(400, "x-content-sha256", "expected 64 hexadecimal digits")
        return "x-content-sha256", value
    for name in ("content-digest", "digest"):
        raw = headers.get(name)
        if raw is None:
            continue
        for item in raw.split(","):
            algo, sep, value = item.strip().partition("=")
            if not sep or algo.strip().lower() != "sha-256":
                continue
            value = value.strip().strip(":")
            try:
                decoded = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                decoded = b""
            if len(decoded) != 32:
                raise BundleError(400, name, "sha-256 value is not 32 bytes of base64")
            return name, decoded.hex()
        raise BundleError(400, name, "no sha-256 value (send sha-256=<base64>)")
    return None


def sniff_format(head: bytes) -> str | None:
    """The archive format from its first bytes: gzip (taken as tar.gz) or zip."""
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    return None


# -- extraction --------------------------------------------------------------------------------
class _LimitedReader:
    """Reads decompressed bytes from `inner`, refusing more than `limit` in total.

    Sits between gzip and tarfile, so padding, headers and anything tarfile reads count too.
    """

    def __init__(self, inner: Any, limit: int) -> None:
        self.inner = inner
        self.limit = limit
        self.total = 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = READ_CHUNK
        data = self.inner.read(min(size, READ_CHUNK))
        self.total += len(data)
        if self.total > self.limit:
            raise BundleError(413, "bundle", f"the archive unpacks to more than {self.limit} bytes")
        return data

    def readable(self) -> bool:
        return True


class _GuardedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses oversized metadata headers and sparse files before tarfile reads
    them: a pax header claiming a gigabyte would otherwise be read into memory in one piece."""

    def _proc_member(self, tarfile: Any) -> Any:
        if self.type == GNUTYPE_SPARSE:
            raise _refuse(self.name, "sparse files are not supported")
        meta = (GNUTYPE_LONGNAME, GNUTYPE_LONGLINK, XHDTYPE, XGLTYPE, SOLARIS_XHDTYPE)
        if self.type in meta and self.size > MAX_TAR_META:
            raise _refuse(self.name, f"metadata header larger than {MAX_TAR_META} bytes")
        if self.type == XGLTYPE:
            seen = getattr(tarfile, "dorm_global_meta", 0) + self.size
            tarfile.dorm_global_meta = seen
            if seen > MAX_TAR_GLOBAL_META:
                raise _refuse(
                    self.name, f"global metadata headers larger than {MAX_TAR_GLOBAL_META} bytes"
                )
        return super()._proc_member(tarfile)  # type: ignore[misc]


class _Tree:
    """A bundle tree being built in `root`: what was created, and the limits it must keep.

    Every path is checked against this model before anything touches the disk: each parent
    must be a directory created here (never a symlink), so no entry can be written through a
    link, and files are opened with O_EXCL|O_NOFOLLOW as a second line of defence.
    """

    def __init__(self, root: Path, limits: BundleLimits, archive_size: int) -> None:
        self.root = root
        self.limits = limits
        self.archive_size = max(archive_size, 1)
        self.kinds: dict[str, str] = {}  # relative path → "dir" | "file" | "link"
        self.links: dict[str, str] = {}  # symlink → target
        self.dir_modes: dict[str, int] = {}
        self.files = 0
        self.unpacked = 0

    # -- checks ----------------------------------------------------------------------------------
    def name(self, raw: str, *, is_dir: bool = False) -> str:
        """The normalized relative path of an entry, or BundleError saying what is wrong."""
        if not raw or "\0" in raw or len(raw.encode("utf-8", "surrogateescape")) > MAX_NAME:
            raise _refuse(raw[:200], f"empty, over-long (over {MAX_NAME} bytes) or NUL in the path")
        if raw.startswith("/"):
            raise _refuse(raw, "absolute paths are not allowed")
        parts = [p for p in raw.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise _refuse(raw, "'..' in a path is not allowed")
        if any(len(p.encode("utf-8", "surrogateescape")) > MAX_COMPONENT for p in parts):
            raise _refuse(raw, f"a path component is longer than {MAX_COMPONENT} bytes")
        if len(parts) > MAX_DEPTH:
            raise _refuse(raw[:200], f"more than {MAX_DEPTH} levels deep")
        if not parts:
            if is_dir:
                return ""
            raise _refuse(raw, "names the bundle root")
        return "/".join(parts)

    def _count(self, name: str) -> None:
        self.files += 1
        if self.files > self.limits.max_files:
            raise BundleError(
                413, "bundle", f"more than {self.limits.max_files} entries (at {name!r})"
            )

    def _grow(self, name: str, size: int) -> None:
        self.unpacked += size
        if self.unpacked > self.limits.max_unpacked:
            raise BundleError(
                413,
                "bundle",
                f"unpacks to more than {self.limits.max_unpacked} bytes (at {name!r})",
            )
        ratio = self.unpacked / self.archive_size
        if self.unpacked > self.limits.ratio_floor and ratio > self.limits.max_ratio:
            raise BundleError(
                413,
                "bundle",
                f"compression ratio above {self.limits.max_ratio}:1 (at {name!r}): "
                "refused as a possible archive bomb",
            )

    @staticmethod
    def _mode(name: str, mode: int) -> None:
        for bit, what in _SPECIAL_BITS:
            if mode & bit:
                raise _refuse(name, f"{what} bit set (mode {mode & 0o7777:o})")

    def _parents(self, name: str) -> None:
        """Make sure every parent of `name` is a directory of ours, creating missing ones."""
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            kind = self.kinds.get(parent)
            if kind == "dir":
                continue
            if kind is not None:
                what = "a symlink" if kind == "link" else "a file"
                raise _refuse(name, f"its parent {parent!r} is {what}")
            self._count(parent)
            os.mkdir(self.root / parent, 0o700)
            self.kinds[parent] = "dir"
            self.dir_modes[parent] = 0o555

    def _new(self, name: str) -> None:
        if name in self.kinds:
            raise _refuse(name, "appears twice in the archive")
        self._parents(name)
        self._count(name)

    # -- entries ---------------------------------------------------------------------------------
    def add_dir(self, name: str, mode: int) -> None:
        self._mode(name, mode)
        if name == "" or self.kinds.get(name) == "dir":
            return  # the root, or a directory already created as some file's parent
        self._new(name)
        os.mkdir(self.root / name, 0o700)
        self.kinds[name] = "dir"
        self.dir_modes[name] = 0o555

    def add_file(self, name: str, mode: int, read: Callable[[int], bytes]) -> None:
        """Create a file from `read(n)` calls until it returns b"", counting every byte."""
        self._mode(name, mode)
        self._new(name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.root / name, flags, 0o600)
        self.kinds[name] = "file"
        try:
            while True:
                data = read(READ_CHUNK)
                if not data:
                    break
                self._grow(name, len(data))
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            os.fchmod(fd, 0o555 if mode & 0o111 else 0o444)
        finally:
            os.close(fd)

    def add_symlink(self, name: str, target: str, mode: int = 0o777) -> None:
        """Record a symlink; it is checked and created in `finish`, once every entry is known."""
        self._mode(name, mode)
        if not target or "\0" in target or len(target) > MAX_LINK_TARGET:
            raise _refuse(name, "empty, over-long or NUL in the symlink target")
        if target.startswith("/"):
            raise _refuse(name, f"symlink to the absolute path {target!r} leaves the bundle")
        self._new(name)
        self.kinds[name] = "link"
        self.links[name] = target

    def add_hardlink(self, name: str, target_raw: str) -> None:
        try:
            target = self.name(target_raw)
        except BundleError:
            raise _refuse(name, f"hard link to {target_raw!r} leaves the bundle") from None
        if self.kinds.get(target) != "file":
            raise _refuse(
                name, f"hard link to {target_raw!r}, which is not a file extracted before it"
            )
        self._new(name)
        os.link(self.root / target, self.root / name, follow_symlinks=False)
        self.kinds[name] = "file"

    # -- completion ------------------------------------------------------------------------------
    def _stays_inside(self, link: str) -> bool:
        """Resolve `link` through the tree model like the kernel would; False if it leaves."""
        current = link.split("/")[:-1]
        todo = list(reversed(self.links[link].split("/")))
        hops = 0
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if not current:
                    return False
                current.pop()
                continue
            candidate = "/".join([*current, part])
            if self.kinds.get(candidate) == "link":
                hops += 1
                target = self.links[candidate]
                if hops > MAX_SYMLINK_HOPS or target.startswith("/"):
                    return False
                todo.extend(reversed(target.split("/")))
                continue
            current.append(part)
        return True

    def finish(self) -> None:
        """Check and create the symlinks, then make directories read-only, deepest first."""
        for link, target in self.links.items():
            if not self._stays_inside(link):
                raise _refuse(link, f"symlink to {target!r} resolves outside the bundle")
        for link, target in self.links.items():
            os.symlink(target, self.root / link)
        for name in sorted(self.dir_modes, key=lambda n: n.count("/"), reverse=True):
            os.chmod(self.root / name, self.dir_modes[name])
        os.chmod(self.root, 0o555)


def _extract_tar(archive: Path, tree: _Tree, limits: BundleLimits) -> None:
    # Headers, padding and metadata count against the cap as well as file contents.
    cap = limits.max_unpacked + (limits.max_files + 16) * 2048
    with open(archive, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
        reader = _LimitedReader(gz, cap)
        stream: Any = reader  # tarfile only calls read(); the stubs want a full file object
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_GuardedTarInfo, errorlevel=2) as tf:
            while (member := tf.next()) is not None:
                # tarfile keeps every member it has read, pax headers and all (hundreds of MB
                # from an archive of a few hundred KB); extraction needs only the current one.
                tf.members.clear()  # type: ignore[attr-defined]
                _tar_member(tf, member, tree)
        # Read to the end of the gzip stream: a truncated or corrupt archive must fail even
        # when the damage is after the tar end marker.
        while reader.read(READ_CHUNK):
            pass


def _tar_member(tf: tarfile.TarFile, member: tarfile.TarInfo, tree: _Tree) -> None:
    raw = member.name
    if member.isdir():
        tree.add_dir(tree.name(raw, is_dir=True), member.mode)
        return
    name = tree.name(raw)
    if member.issym():
        tree.add_symlink(name, member.linkname, member.mode)
    elif member.islnk():
        tree.add_hardlink(name, member.linkname)
    elif member.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
        source = tf.extractfile(member)
        assert source is not None
        tree.add_file(name, member.mode, source.read)
    elif member.ischr() or member.isblk():
        raise _refuse(raw, "device nodes are not allowed")
    elif member.isfifo():
        raise _refuse(raw, "fifos are not allowed")
    else:
        raise _refuse(raw, f"unsupported entry type {member.type!r}")


def _zip_count(fp: IO[bytes], limits: BundleLimits) -> None:
    """Count the central directory's entries before zipfile loads them all into memory."""
    end = zipfile._EndRecData(fp)  # type: ignore[attr-defined]
    if end is None:
        raise BundleError(400, "bundle", "not a valid zip archive (no end of central directory)")
    size_cd, offset_cd = end[zipfile._ECD_SIZE], end[zipfile._ECD_OFFSET]  # type: ignore[attr-defined]
    start = end[zipfile._ECD_LOCATION] - size_cd  # type: ignore[attr-defined]
    if end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:  # type: ignore[attr-defined]
        start -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator  # type: ignore[attr-defined]
    if start < 0 or offset_cd < 0:
        raise BundleError(400, "bundle", "not a valid zip archive (bad central directory)")
    max_directory = ZIP_DIRECTORY_BASE + limits.max_files * 1024
    if size_cd > max_directory:
        raise BundleError(
            413, "bundle", f"the zip's central directory is larger than {max_directory} bytes"
        )
    fp.seek(start)
    seen = count = 0
    header = zipfile.sizeCentralDir  # type: ignore[attr-defined]
    while seen < size_cd:
        record = fp.read(header)
        if len(record) != header or record[:4] != b"PK\x01\x02":
            raise BundleError(400, "bundle", "not a valid zip archive (bad central directory)")
        name_len, extra_len, comment_len = struct.unpack("<3H", record[28:34])
        count += 1
        if count > limits.max_files:
            raise BundleError(413, "bundle", f"more than {limits.max_files} entries")
        skip = name_len + extra_len + comment_len
        fp.seek(skip, os.SEEK_CUR)
        seen += header + skip


def _extract_zip(archive: Path, tree: _Tree, limits: BundleLimits) -> None:
    with open(archive, "rb") as fp:
        _zip_count(fp, limits)
        fp.seek(0)
        with zipfile.ZipFile(fp) as zf:
            for info in zf.infolist():
                _zip_member(zf, info, tree)


def _zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, tree: _Tree) -> None:
    raw = info.filename
    if info.flag_bits & 0x1:
        raise _refuse(raw, "encrypted entries are not supported")
    mode = (info.external_attr >> 16) if info.create_system == 3 else 0
    kind = stat.S_IFMT(mode)
    perms = stat.S_IMODE(mode)
    if info.is_dir() or kind == stat.S_IFDIR:
        tree.add_dir(tree.name(raw, is_dir=True), perms)
        return
    name = tree.name(raw)
    if info.compress_type not in _ZIP_METHODS:
        raise _refuse(
            raw,
            f"compression method {info.compress_type} is not supported "
            "(use stored, deflate, bzip2 or lzma)",
        )
    if kind == stat.S_IFLNK:
        with zf.open(info) as src:
            target = _zip_reader(raw, src)(MAX_LINK_TARGET + 1)
        tree.add_symlink(name, target.decode("utf-8", "surrogateescape"), perms)
    elif kind in (0, stat.S_IFREG):
        with zf.open(info) as src:
            tree.add_file(name, perms or 0o644, _zip_reader(raw, src))
    elif kind in (stat.S_IFCHR, stat.S_IFBLK):
        raise _refuse(raw, "device nodes are not allowed")
    elif kind == stat.S_IFIFO:
        raise _refuse(raw, "fifos are not allowed")
    elif kind == stat.S_IFSOCK:
        raise _refuse(raw, "sockets are not allowed")
    else:
        raise _refuse(raw, f"unsupported file type {kind:o}")


def _zip_reader(raw: str, src: IO[bytes]) -> Callable[[int], bytes]:
    """`src.read`, with the decompressors' own errors (bz2 raises a bare OSError, lzma its
    LZMAError) turned into a refusal of the entry. Only reading is wrapped, so a write that
    fails (a full disk) is not mistaken for corrupt data."""

    def read(size: int) -> bytes:
        try:
            return src.read(size)
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
            raise _refuse(raw, f"corrupt compressed data: {exc}") from None

    return read


def read_manifest(root: Path, name: str = MANIFEST) -> dict[str, Any]:
    """The parsed manifest (`dorm.toml`, or a runtime bundle's `runtime.toml`) at the bundle
    root, or BundleError naming `manifest`."""
    path = root / name
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise BundleError(400, "manifest", f"the bundle has no {name} at its root") from None
    if not stat.S_ISREG(info.st_mode):
        raise BundleError(400, "manifest", f"{name} must be a regular file")
    if info.st_size > MAX_MANIFEST:
        raise BundleError(400, "manifest", f"{name} is larger than {MAX_MANIFEST} bytes")
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise BundleError(400, "manifest", f"{name} is not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise BundleError(400, "manifest", f"{name} is not valid TOML: {exc}") from None


def extract(
    archive: Path, fmt: str, dest: Path, limits: BundleLimits, manifest: str = MANIFEST
) -> Extracted:
    """Unpack `archive` into the new directory `dest` and read its manifest (file `manifest`
    at its root), or raise BundleError; `dest` is removed on any failure. Blocking: run it on a
    thread."""
    size = archive.stat().st_size
    try:
        os.mkdir(dest, 0o700)
    except OSError as exc:
        raise _no_space(exc, "bundle", "unpack the bundle") or exc from None
    try:
        tree = _Tree(dest, limits, size)
        try:
            if fmt == "tar.gz":
                _extract_tar(archive, tree, limits)
            elif fmt == "zip":
                _extract_zip(archive, tree, limits)
            else:
                raise BundleError(400, "format", f"expected one of {', '.join(FORMATS)}")
        except BundleError:
            raise
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise BundleError(400, "bundle", f"truncated or corrupt {fmt} archive: {e}") from None
        except (UnicodeError, ValueError, struct.error) as exc:
            raise BundleError(400, "bundle", f"corrupt {fmt} archive: {exc}") from None
        tree.finish()
        parsed = read_manifest(dest, manifest)
        return Extracted(dest, tree.files, tree.unpacked, parsed)
    except OSError as exc:
        remove_tree(dest)
        full = _no_space(exc, "bundle", "unpack the bundle")
        if full is not None:
            raise full from None
        raise
    except BaseException:
        remove_tree(dest)
        raise


def remove_tree(path: Path) -> None:
    """Delete a (possibly read-only) tree of the store: links are never followed, missing paths
    are fine, and any depth goes (a tree an older version stored beyond today's MAX_DEPTH
    included). The removal itself is the fork server's, which walks by directory fds without
    recursing; this adds only what a gateway that is not root needs first, write permission on
    the store's read-only directories (root deletes from them regardless)."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink():
        if os.geteuid() != 0:
            _make_writable(path)
        from gateway.forkserver import remove_tree as remove_any_depth  # not for the CLI's import

        remove_any_depth(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _make_writable(top: Path) -> None:
    """chmod 0700 every directory under `top` (never through a symlink), with a list of paths to
    visit rather than os.walk, which recurses once per level in Python 3.11. By path: the
    store's trees are written by this module, never by a tenant."""
    pending = [str(top)]
    while pending:
        directory = pending.pop()
        with contextlib.suppress(OSError):
            os.chmod(directory, 0o700)
            with os.scandir(directory) as entries:
                pending += [e.path for e in entries if e.is_dir(follow_symlinks=False)]


# -- packing (the CLI side) ---------------------------------------------------------------------
PACK_SKIP = frozenset({".git", "__pycache__", ".venv"})


def pack(source: Path, out: IO[bytes], *, warn: Callable[[str], None] = lambda _: None) -> int:
    """Write `source` (a directory) to `out` as a deterministic tar.gz; returns the entry count.

    The same tree always gives the same bytes, hence the same digest: entries sorted, mtime 0,
    owner 0:0 without names, modes reduced to 0755/0644, gzip header without name or time.
    `.git`, `__pycache__` and `.venv` directories are skipped, and so (with a warning) are
    sockets, fifos and devices, which a bundle may not hold.
    """
    count = 0
    with (
        gzip.GzipFile(filename="", fileobj=out, mode="wb", mtime=0, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tf,
    ):
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames[:] = sorted(d for d in dirnames if d not in PACK_SKIP)
            base = Path(dirpath)
            entries = sorted([*filenames, *(d for d in dirnames if (base / d).is_symlink())])
            for d in dirnames:
                if not (base / d).is_symlink():
                    _pack_entry(tf, source, base / d, warn)
                    count += 1
            for name in entries:
                count += _pack_entry(tf, source, base / name, warn)
            dirnames[:] = [d for d in dirnames if not (base / d).is_symlink()]
    return count


def _pack_entry(tf: tarfile.TarFile, source: Path, path: Path, warn: Callable[[str], None]) -> int:
    info = tarfile.TarInfo(path.relative_to(source).as_posix())
    st = os.lstat(path)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    if stat.S_ISLNK(st.st_mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(path)
        info.mode = 0o777
        tf.addfile(info)
    elif stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tf.addfile(info)
    elif stat.S_ISREG(st.st_mode):
        info.size = st.st_size
        info.mode = 0o755 if st.st_mode & stat.S_IXUSR else 0o644
        with open(path, "rb") as fh:
            tf.addfile(info, fh)
    else:
        warn(f"skipping {info.name}: not a regular file, directory or symlink")
        return 0
    return 1


# -- the store ---------------------------------------------------------------------------------
class BundleStore:
    """Content-addressed bundle trees under `root`, with uploads staged in `root/tmp`.

    `lock` orders activation against garbage collection, and `pins` name bundles that are in
    use by a deploy in progress, so GC never removes a tree between its activation and the
    registry recording it (or while a failed deploy may still restore the one before).
    """

    def __init__(self, root: Path, limits: BundleLimits | None = None) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.limits = limits or BundleLimits()
        self.lock = asyncio.Lock()
        self.pins: Counter[str] = Counter()
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dorm-bundles")

    def path(self, digest: str) -> Path:
        """Where the tree of bundle `digest` lives (mounted as /app for its instances)."""
        if not is_digest(digest):
            raise ValueError(f"not a bundle digest: {digest!r}")
        return self.root / digest

    def prepare(self) -> None:
        """Create the store and empty `tmp/` (uploads cut short by a crash). Blocking."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists():
            for entry in self.tmp.iterdir():
                remove_tree(entry)
        self.tmp.mkdir(mode=0o700, exist_ok=True)

    def stored(self) -> set[str]:
        """Digests of every tree in the store. Blocking."""
        return {p.name for p in self.root.iterdir() if is_digest(p.name) and p.is_dir()}

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @contextlib.contextmanager
    def pinned(self, *digests: str | None) -> Iterator[None]:
        """Keep `digests` from garbage collection for the duration."""
        held = [d for d in digests if d is not None]
        self.pins.update(held)
        try:
            yield
        finally:
            self.pins.subtract(held)
            for d in held:
                if self.pins[d] <= 0:
                    del self.pins[d]

    # -- receiving -------------------------------------------------------------------------------
    async def receive(self, chunks: AsyncIterator[bytes], headers: dict[str, str]) -> Spooled:
        """Spool an upload and check it against the digest the client sent, if any.

        On a mismatch nothing is kept and the error names the header that disagreed.
        """
        expected = expected_digest(headers)
        spooled = await self.spool(chunks)
        if expected is not None and expected[1] != spooled.digest:
            await self.discard(spooled.path)
            raise BundleError(
                400, expected[0], f"does not match the upload (its sha256 is {spooled.digest})"
            )
        return spooled

    async def spool(self, chunks: AsyncIterator[bytes]) -> Spooled:
        """Write an upload to a file in `tmp/`, hashing it, and refusing it past `max_size`.

        Writes and hashing happen on a thread; one piece is written while the next is received,
        so back-pressure reaches the client and memory stays at a couple of pieces. The file is
        removed if anything fails, including the client going away.
        """
        path = self.tmp / f"upload-{secrets.token_hex(8)}"
        hasher = hashlib.sha256()
        try:
            fh: IO[bytes] = await self._run(_open_new, path)
        except OSError as exc:
            raise _no_space(exc, "body", "receive the bundle") or exc from None
        pending: asyncio.Future[None] | None = None
        size = 0
        buf = bytearray()
        loop = asyncio.get_running_loop()
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > self.limits.max_size:
                    raise BundleError(
                        413, "body", f"the bundle is larger than {self.limits.max_size} bytes"
                    )
                buf += chunk
                if len(buf) >= SPOOL_CHUNK:
                    if pending is not None:
                        await pending
                    data, buf = bytes(buf), bytearray()
                    pending = loop.run_in_executor(self._executor, _write, fh, hasher, data)
            if pending is not None:
                await pending
                pending = None
            await self._run(_write, fh, hasher, bytes(buf))
            await self._run(fh.close)
        except BaseException as exc:
            await asyncio.shield(self._discard_upload(fh, path, pending))
            full = _no_space(exc, "body", "receive the bundle")
            if full is not None:
                raise full from None
            raise
        return Spooled(path, hasher.hexdigest(), size)

    async def _discard_upload(
        self, fh: IO[bytes], path: Path, pending: asyncio.Future[None] | None
    ) -> None:
        if pending is not None:
            await asyncio.wait([pending])
        await self._run(_close_and_unlink, fh, path)

    async def discard(self, path: Path) -> None:
        """Remove a spooled file or an extracted tree that will not be activated."""
        await asyncio.shield(self._run(remove_tree, path))

    async def unpack(
        self, spooled: Spooled, fmt: str | None, manifest: str = MANIFEST
    ) -> Extracted:
        """Extract a spooled upload into a fresh directory in `tmp/` (see `extract`); runtime
        bundles pass `manifest="runtime.toml"`."""
        if fmt is None:
            head: bytes = await self._run(_head, spooled.path)
            fmt = sniff_format(head)
            if fmt is None:
                raise BundleError(
                    400, "format", "not a gzip-compressed tar or a zip archive (by its first bytes)"
                )
        dest = self.tmp / f"tree-{secrets.token_hex(8)}"
        future = asyncio.get_running_loop().run_in_executor(
            self._executor, extract, spooled.path, fmt, dest, self.limits, manifest
        )
        try:
            result: Extracted = await asyncio.shield(future)
        except asyncio.CancelledError:
            # The thread finishes regardless; whatever it produced must not stay in tmp/.
            future.add_done_callback(lambda _: self._executor.submit(remove_tree, dest))
            raise
        return result

    async def activate(self, extracted: Extracted, digest: str) -> bool:
        """Move an extracted tree to its place (one rename). Returns False if the store already
        had this bundle, in which case the new copy is dropped. Hold `lock` and pin `digest`."""
        target = self.path(digest)
        moved: bool = await self._run(_rename_or_drop, extracted.path, target)
        return moved

    # -- garbage collection --------------------------------------------------------------------
    async def gc(
        self,
        referenced: Callable[[], set[str]],
        forget: Callable[[set[str]], Awaitable[None]] | None = None,
    ) -> list[str]:
        """Remove every stored tree that `referenced()` does not name and nobody has pinned.

        Under `lock` the doomed trees are renamed into `tmp/` (fast, atomic) and `forget` drops
        their records; the slow deletion happens after the lock is released.
        """
        trash = self.tmp / f"gc-{secrets.token_hex(8)}"
        async with self.lock:
            keep = referenced() | set(self.pins)
            stored: set[str] = await self._run(self.stored)
            doomed = sorted(stored - keep)
            if doomed:
                await self._run(_move_all, [self.root / d for d in doomed], trash)
            if forget is not None:
                await forget(set(doomed))
        if doomed:
            await self._run(remove_tree, trash)
            log.info("bundle gc: removed %d unreferenced bundle(s)", len(doomed))
        return doomed


def _open_new(path: Path) -> IO[bytes]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "wb")


def _write(fh: IO[bytes], hasher: Any, data: bytes) -> None:
    if data:
        hasher.update(data)
        fh.write(data)


def _close_and_unlink(fh: IO[bytes], path: Path) -> None:
    with contextlib.suppress(OSError):
        fh.close()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(8)


def _rename_or_drop(source: Path, target: Path) -> bool:
    try:
        os.rename(source, target)
        return True
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not target.is_dir():
            remove_tree(source)
            raise
    remove_tree(source)
    return False


def _move_all(paths: list[Path], trash: Path) -> None:
    trash.mkdir(mode=0o700)
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, trash / path.name)


__all__ = [
    "FORMATS",
    "MANIFEST",
    "BundleError",
    "BundleLimits",
    "BundleStore",
    "DeployError",
    "Extracted",
    "Spooled",
    "check_content_type",
    "expected_digest",
    "extract",
    "read_manifest",
    "remove_tree",
    "sniff_format",
    "upload_format",
    "upload_headers",
]
