"""The static runtime: files from a bundle, answered by the gateway itself; no process is started.

Bundles are immutable and content-addressed (a bundle directory is named by the sha256 of its
archive), so every answer about a path can be cached for as long as the bundle is served, and
nothing is ever revalidated against the disk. A warm request is a dict lookup and one `writelines`
of precomputed bytes: it never leaves the event loop. A cold one is resolved in a small thread pool
(stat, realpath, and reading the file if it is small), because file I/O on the loop would stall
every other connection of the gateway; concurrent misses on one path share a single lookup.

Decisions:

* Paths: percent-decoded once; `..` and `.` segments, NUL, backslashes, an encoded `/` or `\\`,
  and invalid UTF-8 are refused with 400. Repeated slashes collapse (as nginx's merge_slashes).
  Dotfiles and dot-directories are 404, except under `/.well-known/`; so is `dorm.toml`, the
  manifest. Refused and hidden paths never get the SPA fallback, so probing them never looks like
  success. The resolved real path must stay inside the bundle directory (symlinks were checked
  at extraction; this is the second line of defence), and the real path is checked for dotfiles
  and the manifest too, so a symlink cannot publish them.
* A directory requested without its trailing slash is redirected (301) to the slash form, so
  relative links in its index file resolve; with the slash, the first existing `static.index`
  file is served. There are no directory listings.
* SPA fallback: a GET/HEAD for a path matching nothing gets `static.spa_fallback` with 200 when
  the path looks like a client-side route: its last segment has no `.` (`/settings/profile`), or
  the client accepts `text/html` (a browser navigating to `/blog/v1.2`). `/missing.png` fetched
  by an `<img>` stays a 404, which keeps broken asset links visible.
* Validators: a strong ETag from the content hash for files small enough to be cached (so an
  unchanged file keeps its ETag across deploys and browsers keep getting 304s), and from bundle
  digest + path + size for larger ones. Last-Modified is the file's mtime, which is when the bundle
  was extracted (extraction does not restore archive mtimes, and `dorm deploy` packs mtime 0); a
  file with mtime 0 gets no Last-Modified. If-None-Match wins over If-Modified-Since (RFC 9110
  §13.2.2).
* Cache-Control: `no-cache` (revalidate every time, cheap with the ETag) for everything, except
  names carrying a hex content hash (`main.3f2a9c1b.js`), which get a year and `immutable`. A
  preview branch must never show a stale asset after a redeploy.
* Range: one `bytes=` range → 206; unsatisfiable → 416 with `Content-Range: bytes */size`; several
  ranges, a malformed header, or a stale If-Range → the whole file (200), which RFC 9110 allows.
* Files up to MAX_CACHED_FILE are kept in memory (an LRU bounded by CACHE_BYTES in total); larger
  ones are streamed in CHUNK pieces read in the pool: the next piece is read while the previous
  one drains, and it waits (at most one piece per download) while the client's write buffer is
  above its high-water mark. A response from memory waits there too before the next pipelined
  request starts, so a client that never reads cannot make the gateway buffer without bound.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import logging
import mimetypes
import os
import re
import stat
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote_to_bytes

from gateway.appspec import AppSpec
from gateway.http11 import reason
from gateway.proxy import BUFFER_LIMIT

if TYPE_CHECKING:
    from gateway.proxy import Exchange

log = logging.getLogger("dorm.static")

CACHE_BYTES = 64 * 1024**2  # file contents kept in memory, all static sites together
MAX_CACHED_FILE = 1024**2  # larger files are streamed from disk
MAX_ROUTES = 16_384  # remembered answers (file, redirect, not found) for request paths
CHUNK = 256 * 1024  # streamed files are read in pieces of this size
WORKERS = 4
MANIFEST = "dorm.toml"
IMMUTABLE = b"public, max-age=31536000, immutable"
REVALIDATE = b"no-cache"

_GET, _HEAD = b"GET", b"HEAD"
_STATUS = {
    s: b"HTTP/1.1 %d %s\r\n" % (s, reason(s)) for s in (200, 206, 301, 304, 400, 404, 405, 416)
}
_STATUS_200 = _STATUS[200]
_KEEP_11 = b"\r\n"
_KEEP_10 = b"Connection: keep-alive\r\n\r\n"
_CLOSE = b"Connection: close\r\n\r\n"
_NOSNIFF = b"X-Content-Type-Options: nosniff\r\n"
_HASHED = re.compile(r"[.-](?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{8,}\.[A-Za-z0-9]+$")

# Content types from Python's built-in table (not /etc/mime.types, which differs between hosts),
# with the web's current names where the table is old or silent.
_MIME = mimetypes.MimeTypes()
_TYPES: dict[str, str] = {
    ".js": "application/javascript",
    ".mjs": "application/javascript",
    ".cjs": "application/javascript",
    ".wasm": "application/wasm",
    ".webmanifest": "application/manifest+json",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".map": "application/json",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".otf": "font/otf",
    ".webp": "image/webp",
    ".avif": "image/avif",
    ".ico": "image/x-icon",
    ".md": "text/markdown",
    ".txt": "text/plain",
}


def content_type(name: str) -> str:
    """The Content-Type for a file name; text gets `charset=utf-8`, unknown is octet-stream."""
    ext = os.path.splitext(name)[1].lower()
    ctype = _TYPES.get(ext) or _MIME.types_map[True].get(ext) or "application/octet-stream"
    if ctype.startswith("text/") or ctype == "application/javascript":
        ctype += "; charset=utf-8"
    return ctype


def cache_control(name: str) -> bytes:
    """`immutable` only for names that carry a hex content hash; everything else revalidates."""
    return IMMUTABLE if _HASHED.search(name.rsplit("/", 1)[-1]) else REVALIDATE


class _Clock:
    """The Date header, formatted once a second rather than once a request."""

    second = -1
    line = b""

    @classmethod
    def date(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second = now
            cls.line = b"Date: " + email.utils.formatdate(now, usegmt=True).encode() + b"\r\n"
        return cls.line


# -- request paths ---------------------------------------------------------------------------------
class BadPath(Exception):
    """A request path that is refused before any lookup: (status, message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decode_path(raw: bytes) -> tuple[str, bool]:
    """(relative path inside the bundle, whether the URL ended in "/") for a request path.

    Raises BadPath: 400 for anything that could step outside the tree or mean two things (dot
    segments, NUL, backslash, an encoded slash, invalid UTF-8), 404 for names that exist but are
    never served (dotfiles outside /.well-known/, the manifest).
    """
    if raw[:1] != b"/":
        raise BadPath(400, "the request target must be a path")
    if b"%" in raw:
        low = raw.lower()
        if b"%2f" in low or b"%5c" in low:
            raise BadPath(400, "encoded '/' or '\\' in the path")
        raw = unquote_to_bytes(raw)
    if b"\\" in raw or b"\0" in raw:
        raise BadPath(400, "backslash or NUL in the path")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadPath(400, "the path is not UTF-8") from None
    parts = [p for p in text.split("/") if p]
    for i, part in enumerate(parts):
        if part in (".", ".."):
            raise BadPath(400, "'.' or '..' in the path")
        if part[0] == "." and not (i == 0 and part == ".well-known"):
            raise BadPath(404, "not found")
    rel = "/".join(parts)
    if rel == MANIFEST:
        raise BadPath(404, "not found")
    return rel, text.endswith("/")


def hidden(rel: str) -> bool:
    """Never served, whatever the request spelled: the manifest and dotfiles (but .well-known)."""
    if rel == MANIFEST:
        return True
    parts = rel.split("/")
    return any(p[:1] == "." and not (i == 0 and p == ".well-known") for i, p in enumerate(parts))


# -- answers ---------------------------------------------------------------------------------------
class FileInfo:
    """One servable file and everything about its responses that does not depend on the request."""

    __slots__ = (
        "body",
        "etag",
        "fields",
        "fields_200",
        "fields_304",
        "head_keep",
        "last_modified",
        "mtime",
        "path",
        "size",
    )

    def __init__(
        self, path: str, rel: str, size: int, mtime: int, etag: bytes, body: bytes | None
    ) -> None:
        self.path = path
        self.size = size
        self.mtime = mtime
        self.etag = etag
        self.body = body
        self.last_modified = (
            email.utils.formatdate(mtime, usegmt=True).encode() if mtime > 0 else b""
        )
        validators = b"ETag: " + etag + b"\r\n"
        if self.last_modified:
            validators += b"Last-Modified: " + self.last_modified + b"\r\n"
        validators += b"Cache-Control: " + cache_control(rel) + b"\r\n" + _NOSNIFF
        # Content-Type, validators and Accept-Ranges; Content-Length is added per status.
        self.fields_304 = validators
        self.fields = (
            b"Content-Type: "
            + content_type(rel).encode()
            + b"\r\n"
            + validators
            + b"Accept-Ranges: bytes\r\n"
        )
        # The usual answer, a 200 to an HTTP/1.1 keep-alive request, needs no work per request.
        self.fields_200 = self.fields + b"Content-Length: %d\r\n" % size
        self.head_keep = self.fields_200 + _KEEP_11


FILE, MISSING, REDIRECT, REFUSED = range(4)


class Route:
    """What a request path resolves to; cached per (site, raw path)."""

    __slots__ = ("info", "kind", "location", "message", "route_like", "status")

    def __init__(
        self,
        kind: int,
        info: FileInfo | None = None,
        *,
        location: bytes = b"",
        status: int = 404,
        message: str = "not found",
        route_like: bool = False,
    ) -> None:
        self.kind = kind
        self.info = info
        self.location = location
        self.status = status
        self.message = message
        self.route_like = route_like


@dataclass(frozen=True, slots=True)
class Found:
    """A lookup's result from the pool: a regular file inside the bundle (body if small)."""

    path: str
    rel: str
    size: int
    mtime: int
    etag: bytes
    body: bytes | None


def _etag_for(digest: str, rel: str, size: int, body: bytes | None) -> bytes:
    if body is not None:
        tag = hashlib.blake2b(body, digest_size=12).hexdigest()
    else:
        tag = hashlib.blake2b(f"{digest}\0{rel}".encode(), digest_size=12).hexdigest()
    return b'"%s-%x"' % (tag.encode(), size)


def find_file(root: str, digest: str, rel: str, max_cached: int) -> Found | None:
    """A regular file at `rel` under `root` (the real path of a bundle), or None. Blocking.

    The real path must stay inside `root` and must not be hidden; the body is read when it is at
    most `max_cached` bytes, and its hash becomes the ETag.
    """
    path = os.path.join(root, rel) if rel else root
    try:
        real = os.path.realpath(path, strict=True)
    except (OSError, ValueError):
        return None
    if not real.startswith(root + "/"):
        if real != root:
            log.warning("static path %r resolves outside its bundle %s", rel, root)
        return None
    real_rel = real[len(root) + 1 :]
    if hidden(real_rel):
        return None
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        body = None
        if st.st_size <= max_cached:
            body = _read_all(fd, st.st_size)
            if body is None:
                return None
    finally:
        os.close(fd)
    etag = _etag_for(digest, real_rel, st.st_size, body)
    return Found(real, real_rel, st.st_size, int(st.st_mtime), etag, body)


def _read_all(fd: int, size: int) -> bytes | None:
    chunks = []
    left = size
    while left > 0:
        data = os.read(fd, left)
        if not data:
            return None  # shorter than it said: bundles are immutable, so something is wrong
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


@dataclass(frozen=True, slots=True)
class Lookup:
    """Everything a cold request path needs from the disk, gathered in one trip to the pool."""

    kind: int
    found: Found | None = None
    fallback: Found | None = None


def lookup(
    bundle_dir: str,
    digest: str,
    rel: str,
    slash: bool,
    index: tuple[str, ...],
    fallback: str | None,
    max_cached: int,
) -> Lookup:
    """Resolve a decoded request path against a bundle. Blocking: runs in the pool."""
    root = os.path.realpath(bundle_dir)
    path = os.path.join(root, rel) if rel else root
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        if not slash:
            return Lookup(REDIRECT)
        for name in index:
            found = find_file(root, digest, f"{rel}/{name}" if rel else name, max_cached)
            if found is not None:
                return Lookup(FILE, found)
    elif st is not None and not slash:
        found = find_file(root, digest, rel, max_cached)
        if found is not None:
            return Lookup(FILE, found)
    spa = find_file(root, digest, fallback, max_cached) if fallback else None
    return Lookup(MISSING, fallback=spa)


def read_range(path: str, offset: int, size: int) -> bytes:
    """Up to `size` bytes of `path` from `offset`. Blocking: runs in the pool.

    The file is opened per piece, so a download abandoned while it waits for the client holds no
    descriptor.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def read_body(path: str, size: int) -> bytes | None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return _read_all(fd, size)
    finally:
        os.close(fd)


# -- request headers -------------------------------------------------------------------------------
def _header_value(part: bytes) -> bytes:
    return part[part.index(b":") + 1 :].strip()


def parse_range(value: bytes, size: int) -> tuple[int, int] | bool | None:
    """A single `bytes=` range as (first, last) inclusive; False if unsatisfiable; None to ignore
    (malformed, several ranges, another unit, or an empty file)."""
    unit, _, spec = value.partition(b"=")
    if unit.strip().lower() != b"bytes" or b"," in spec or size == 0:
        return None
    first_s, dash, last_s = spec.strip().partition(b"-")
    if not dash or not (first_s or last_s):
        return None
    if (first_s and not first_s.isdigit()) or (last_s and not last_s.isdigit()):
        return None
    if not first_s:  # a suffix: the last N bytes
        n = int(last_s)
        return False if n == 0 else (max(0, size - n), size - 1)
    first = int(first_s)
    if last_s and int(last_s) < first:
        return None  # invalid, so the header is ignored (RFC 9110 §14.1.1)
    if first >= size:
        return False
    return (first, min(int(last_s), size - 1) if last_s else size - 1)


def _etag_matches(header: bytes, etag: bytes) -> bool:
    """If-None-Match: weak comparison over a list of tags, or `*`."""
    if header == b"*":
        return True
    for tag in header.split(b","):
        tag = tag.strip()
        if tag[:2] == b"W/":
            tag = tag[2:]
        if tag == etag:
            return True
    return False


def _not_modified_since(header: bytes, info: FileInfo) -> bool:
    if not info.last_modified:
        return False
    if header == info.last_modified:
        return True
    try:
        since = email.utils.parsedate_to_datetime(header.decode("latin-1")).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return False
    return info.mtime <= since


def _accepts_html(parts: list[bytes]) -> bool:
    for p in parts:
        if p[:7].lower() == b"accept:":
            return b"text/html" in p.lower()
    return False


# -- serving ---------------------------------------------------------------------------------------
class StaticFiles:
    """Shared by every static site: the pool, the route cache and the byte-bounded file cache.

    One object per gateway (`server.py` sets `InstanceManager.static_site = files.site`). Sites
    for the same bundle and options share one StaticSite, so an instance rebuilt after a spec or
    branch change keeps a warm cache.
    """

    def __init__(
        self,
        cache_bytes: int = CACHE_BYTES,
        max_cached_file: int = MAX_CACHED_FILE,
        max_routes: int = MAX_ROUTES,
        workers: int = WORKERS,
    ) -> None:
        self.cache_bytes = cache_bytes
        self.max_cached_file = min(max_cached_file, cache_bytes)
        self.max_routes = max_routes
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dorm-static")
        self.routes: OrderedDict[tuple[int, bytes], Route] = OrderedDict()
        self.bodies: OrderedDict[FileInfo, int] = OrderedDict()  # FileInfo → site id
        self.cached = 0
        self.serving = False  # re-entrancy guard: see StaticSite.serve
        self.sites: weakref.WeakValueDictionary[tuple[Any, ...], StaticSite] = (
            weakref.WeakValueDictionary()
        )
        self._ids = 0

    def site(self, bundle_dir: Path, spec: AppSpec) -> StaticSite:
        """The factory InstanceManager calls for an app whose runtime is `static`."""
        key = (str(bundle_dir), spec.static.index, spec.static.spa_fallback)
        site = self.sites.get(key)
        if site is None:
            self._ids += 1
            site = StaticSite(
                self, self._ids, bundle_dir, spec.static.index, spec.static.spa_fallback
            )
            self.sites[key] = site
            weakref.finalize(site, self._forget, self._ids)
        return site

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any] | None:
        """`fn(*args)` in the pool, completing on the loop; None once the pool is shut down."""
        try:
            return asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        except RuntimeError:
            return None

    # -- caches (loop thread only) -----------------------------------------------------------------
    def remember(self, key: tuple[int, bytes], route: Route) -> None:
        routes = self.routes
        routes[key] = route
        if len(routes) > self.max_routes:
            routes.popitem(last=False)

    def keep_body(self, info: FileInfo, body: bytes, site_id: int) -> None:
        """Cache `body` for `info` if it fits the budget, evicting least recently used bodies."""
        size = len(body)
        bodies = self.bodies
        if size > self.max_cached_file or info in bodies:
            return  # too large, or loaded meanwhile by another path to the same file
        while self.cached + size > self.cache_bytes and bodies:
            old, _ = bodies.popitem(last=False)
            self.cached -= old.size
            old.body = None
        info.body = body
        bodies[info] = site_id
        self.cached += size

    def _forget(self, site_id: int) -> None:
        """A site is gone (its instance was replaced): drop its routes and cached bodies."""
        for key in [k for k in self.routes if k[0] == site_id]:
            del self.routes[key]
        for info in [i for i, s in self.bodies.items() if s == site_id]:
            del self.bodies[info]
            self.cached -= info.size
            info.body = None


class StaticSite:
    """One bundle served as files (the `StaticSite` protocol of gateway/instances.py)."""

    def __init__(
        self,
        files: StaticFiles,
        site_id: int,
        bundle_dir: Path,
        index: tuple[str, ...],
        spa_fallback: str | None,
    ) -> None:
        self.files = files
        self.id = site_id
        self.bundle_dir = str(bundle_dir)
        self.digest = bundle_dir.name
        self.index = index
        self.spa_fallback = spa_fallback
        self.found: dict[str, FileInfo] = {}  # real relative path → info (one per file)
        self.fallback: FileInfo | None = None
        self.loading: dict[Any, list[Exchange]] = {}  # a lookup in the pool → who waits for it

    # -- entry -------------------------------------------------------------------------------------
    def serve(self, ex: Exchange) -> None:
        """Answer `ex` completely (or start streaming it).

        Answering one request can start the next pipelined one synchronously (response_done →
        next_exchange → serve), so a client pipelining thousands of cached requests would
        recurse that deep: a nested call is deferred to the next loop iteration instead.
        """
        files = self.files
        if files.serving:
            asyncio.get_running_loop().call_soon(self._serve_later, ex)
            return
        files.serving = True
        try:
            self._serve(ex)
        finally:
            files.serving = False

    def _serve_later(self, ex: Exchange) -> None:
        if ex.client.active is ex and not ex.client.closed:
            self.serve(ex)

    def _serve(self, ex: Exchange) -> None:
        method = ex.method
        if method != _GET and method != _HEAD:
            self._text(ex, 405, "only GET and HEAD are allowed", b"Allow: GET, HEAD\r\n")
            return
        url = ex.url
        q = url.find(b"?")
        raw = url if q < 0 else url[:q]
        key = (self.id, raw)
        routes = self.files.routes
        route = routes.get(key)
        if route is None:
            self._miss(ex, key, raw)
            return
        routes.move_to_end(key)
        if route.kind == FILE:
            self._file(ex, route.info)  # type: ignore[arg-type]
        else:
            self._answer(ex, route)

    def _answer(self, ex: Exchange, route: Route) -> None:
        kind = route.kind
        if kind == FILE:
            assert route.info is not None
            self._file(ex, route.info)
        elif kind == MISSING:
            spa = self.fallback
            if spa is not None and (route.route_like or _accepts_html(ex.parts)):
                self._file(ex, spa)
            else:
                self._text(ex, 404, "not found")
        elif kind == REDIRECT:
            url = ex.url
            q = url.find(b"?")
            location = route.location + (url[q:] if q >= 0 else b"")
            self._text(ex, 301, "moved permanently", b"Location: " + location + b"\r\n")
        else:
            self._text(ex, route.status, route.message)

    # -- cold paths --------------------------------------------------------------------------------
    def _miss(self, ex: Exchange, key: tuple[int, bytes], raw: bytes) -> None:
        try:
            rel, slash = decode_path(raw)
        except BadPath as exc:
            route = Route(REFUSED, status=exc.status, message=exc.message)
            self.files.remember(key, route)
            self._answer(ex, route)
            return
        waiting = self.loading.get(key)
        if waiting is not None:
            waiting.append(ex)
            return
        self.loading[key] = [ex]
        future = self.files.run(
            lookup,
            self.bundle_dir,
            self.digest,
            rel,
            slash,
            self.index,
            self.spa_fallback,
            self.files.max_cached_file,
        )
        if future is None:
            self._unavailable(self.loading.pop(key))
            return
        future.add_done_callback(lambda f: self._looked_up(key, rel, f))

    @staticmethod
    def _unavailable(waiting: list[Exchange]) -> None:
        for ex in waiting:
            if ex.client.active is ex and not ex.client.closed:
                ex.fail(503, "the file could not be read")

    def _looked_up(self, key: tuple[int, bytes], rel: str, future: asyncio.Future[Lookup]) -> None:
        waiting = self.loading.pop(key, [])
        try:
            result = future.result()
        except Exception as exc:  # the disk failed, or the pool was shut down
            log.warning("static lookup of %r failed: %s", rel, exc)
            self._unavailable(waiting)
            return
        if result.kind == FILE:
            assert result.found is not None
            route = Route(FILE, self._info(result.found))
        elif result.kind == REDIRECT:
            location = b"/" + quote(rel).encode() + b"/"
            route = Route(REDIRECT, location=location)
        else:
            if result.fallback is not None and self.fallback is None:
                self.fallback = self._info(result.fallback)
            last = rel.rsplit("/", 1)[-1]
            route = Route(MISSING, route_like="." not in last)
        self.files.remember(key, route)
        self._resume(waiting, lambda ex: self._answer(ex, route))

    def _resume(self, waiting: list[Exchange], answer: Callable[[Exchange], None]) -> None:
        """Answer requests that waited for the pool (each deferred if we are nested)."""
        files = self.files
        for ex in waiting:
            if ex.client.active is not ex or ex.client.closed:
                continue
            if files.serving:
                asyncio.get_running_loop().call_soon(self._resume, [ex], answer)
                continue
            files.serving = True
            try:
                answer(ex)
            finally:
                files.serving = False

    def _info(self, found: Found) -> FileInfo:
        """The one FileInfo for a file (shared by every path that leads to it)."""
        info = self.found.get(found.rel)
        if info is None:
            info = FileInfo(found.path, found.rel, found.size, found.mtime, found.etag, None)
            self.found[found.rel] = info
        if found.body is not None and info.body is None:
            self.files.keep_body(info, found.body, self.id)
        return info

    def _load(self, ex: Exchange, info: FileInfo) -> None:
        """A small file whose body was evicted: read it again in the pool, then answer."""
        waiting = self.loading.get(info)
        if waiting is not None:
            waiting.append(ex)
            return
        self.loading[info] = [ex]
        future = self.files.run(read_body, info.path, info.size)
        if future is None:
            self._unavailable(self.loading.pop(info))
            return
        future.add_done_callback(lambda f: self._loaded(info, f))

    def _loaded(self, info: FileInfo, future: asyncio.Future[bytes | None]) -> None:
        waiting = self.loading.pop(info, [])
        try:
            body = future.result()
        except Exception as exc:
            log.warning("static read of %s failed: %s", info.path, exc)
            body = None
        if body is None:
            self._unavailable(waiting)
            return
        self.files.keep_body(info, body, self.id)
        # Answered from this body even if the cache has already evicted it again.
        self._resume(waiting, lambda ex: self._file(ex, info, body))

    # -- responses ---------------------------------------------------------------------------------
    def _file(self, ex: Exchange, info: FileInfo, body: bytes | None = None) -> None:
        """200, 206, 304 or 416 for a file, from memory or streamed from disk."""
        inm = ims = rng = if_range = None
        for p in ex.parts:
            c = p[0] | 0x20
            if c == 0x69 or c == 0x72:  # "i" or "r": the only headers that matter here
                name = p[: p.index(b":")].lower()
                if name == b"if-none-match":
                    inm = _header_value(p)
                elif name == b"if-modified-since":
                    ims = _header_value(p)
                elif name == b"range":
                    rng = _header_value(p)
                elif name == b"if-range":
                    if_range = _header_value(p)
        if body is None:
            body = info.body
        if inm is None and ims is None and rng is None and body is not None and ex.method == _GET:
            # The hot path: a plain GET of a cached file.
            client = ex.client
            keep = (
                ex.keep_alive
                and (ex.request_done or not (ex.chunked or ex.content_length))
                and not ex.upgrade
                and not client.plane.draining
            )
            if keep and not ex.http10:
                client.transport.writelines((_STATUS_200, _Clock.date(), info.head_keep, body))
            else:
                client.transport.writelines(
                    (_STATUS_200, _Clock.date(), info.fields_200, _tail(ex, keep), body)
                )
            finish(ex, keep)
            return
        self._conditional(ex, info, body, inm, ims, rng, if_range)

    def _conditional(
        self,
        ex: Exchange,
        info: FileInfo,
        body: bytes | None,
        inm: bytes | None,
        ims: bytes | None,
        rng: bytes | None,
        if_range: bytes | None,
    ) -> None:
        """Everything but a plain GET from memory: validators, ranges, HEAD, disk."""
        head_only = ex.method == _HEAD
        span: tuple[int, int] | bool | None = None
        if inm is not None:
            if _etag_matches(inm, info.etag):
                self._head(ex, 304, info.fields_304)
                return
        elif ims is not None and _not_modified_since(ims, info):
            self._head(ex, 304, info.fields_304)
            return
        if (
            rng is not None
            and not head_only
            and (if_range is None or if_range in (info.etag, info.last_modified))
        ):
            span = parse_range(rng, info.size)
            if span is False:
                self._text(
                    ex, 416, "range not satisfiable", b"Content-Range: bytes */%d\r\n" % info.size
                )
                return
        if span:
            first, last = span  # type: ignore[misc]
            status = 206
            length = last - first + 1
            fields = info.fields + b"Content-Range: bytes %d-%d/%d\r\n" % (first, last, info.size)
        else:
            first, status, length, fields = 0, 200, info.size, info.fields
        fields += b"Content-Length: %d\r\n" % length
        if head_only or not length:
            self._head(ex, status, fields)
        elif body is not None:
            keep = self._keep(ex)
            ex.client.transport.writelines(
                (
                    _STATUS[status],
                    _Clock.date(),
                    fields,
                    _tail(ex, keep),
                    body if length == info.size else memoryview(body)[first : first + length],
                )
            )
            self._finish(ex, keep)
        elif info.size <= self.files.max_cached_file:
            self._load(ex, info)
        else:
            keep = self._keep(ex)
            ex.client.transport.writelines(
                (_STATUS[status], _Clock.date(), fields, _tail(ex, keep))
            )
            ex.head_sent = True
            _Stream(self.files, ex, info.path, first, first + length, keep).start()

    def _head(self, ex: Exchange, status: int, fields: bytes) -> None:
        keep = self._keep(ex)
        ex.client.transport.writelines((_STATUS[status], _Clock.date(), fields, _tail(ex, keep)))
        self._finish(ex, keep)

    def _text(self, ex: Exchange, status: int, message: str, extra: bytes = b"") -> None:
        body = message.encode() + b"\n"
        keep = self._keep(ex)
        parts = [
            _STATUS[status],
            _Clock.date(),
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % len(body),
            b"Cache-Control: no-cache\r\n" if status == 301 else b"Cache-Control: no-store\r\n",
            _NOSNIFF,
            extra,
            _tail(ex, keep),
        ]
        if ex.method != _HEAD:
            parts.append(body)
        ex.client.transport.writelines(parts)
        self._finish(ex, keep)

    @staticmethod
    def _keep(ex: Exchange) -> bool:
        return ex.keep_alive and _body_read(ex) and not ex.upgrade and not ex.client.plane.draining

    @staticmethod
    def _finish(ex: Exchange, keep: bool) -> None:
        finish(ex, keep)


def _body_read(ex: Exchange) -> bool:
    """The request's body will not stand in the way of the next request on this connection.

    A cached answer is written from inside the parser's on_headers_complete, before request_done
    is set: a request without a body is complete then. A small body with a known length that
    is still arriving is read (and discarded) by the parser after the response, within its
    buffer limit; a chunked or larger body, or a client waiting for 100 Continue, means closing.
    """
    if ex.request_done or not (ex.chunked or ex.content_length):
        return True
    return not ex.chunked and not ex.expect_continue and (ex.content_length or 0) <= BUFFER_LIMIT


def _tail(ex: Exchange, keep: bool) -> bytes:
    if not keep:
        return _CLOSE
    return _KEEP_10 if ex.http10 else _KEEP_11


def finish(ex: Exchange, keep: bool) -> None:
    """The response is written: hand the connection on, once the client has room for more.

    A response from memory is written whole; waiting for the client to drain before starting
    the next pipelined request is what keeps a client that pipelines and never reads from
    making the gateway buffer without bound.
    """
    client = ex.client
    ex.head_sent = True
    ex.keep_client = keep
    if not keep and not ex.request_done and (ex.chunked or ex.content_length):
        client.close_lingering()  # the client is still sending a body nobody will read
    elif keep and client.write_paused:
        ex.on_drain = lambda: _drained(ex)
    else:
        client.response_done(ex)


def _drained(ex: Exchange) -> None:
    ex.on_drain = None
    ex.client.response_done(ex)


class _Stream:
    """A large file (or range) sent in CHUNK pieces read in the pool, with back-pressure.

    The next piece is read while the previous one drains; a piece that arrives while the client's
    buffer is above its high-water mark waits for resume_writing (Exchange.on_drain).
    """

    __slots__ = ("end", "ex", "files", "keep", "offset", "path", "stash")

    def __init__(
        self, files: StaticFiles, ex: Exchange, path: str, start: int, end: int, keep: bool
    ) -> None:
        self.files = files
        self.ex = ex
        self.path = path
        self.offset = start
        self.end = end
        self.keep = keep
        self.stash: bytes | None = None

    def start(self) -> None:
        self._read()

    def _alive(self) -> bool:
        client = self.ex.client
        return client.active is self.ex and not client.closed

    def _read(self) -> None:
        size = min(CHUNK, self.end - self.offset)
        future = self.files.run(read_range, self.path, self.offset, size)
        if future is None:  # the pool is shut down: the gateway is stopping
            self.ex.client.abort()
            return
        future.add_done_callback(self._on_data)

    def _on_data(self, future: asyncio.Future[bytes]) -> None:
        if not self._alive():
            return
        try:
            data = future.result()
        except Exception as exc:
            log.warning("static read of %s failed: %s", self.path, exc)
            data = b""
        if not data:  # the head promised more bytes than there are: cut the connection
            self.ex.client.abort()
            return
        if self.ex.client.write_paused:
            self.stash = data
            self.ex.on_drain = self._drained
            return
        self._write(data)

    def _drained(self) -> None:
        self.ex.on_drain = None
        data, self.stash = self.stash, None
        if data is not None and self._alive():
            self._write(data)

    def _write(self, data: bytes) -> None:
        ex = self.ex
        client = ex.client
        data = data[: self.end - self.offset]
        client.transport.write(data)
        self.offset += len(data)
        client.deadline = time.monotonic() + client.plane.cfg.upstream_timeout
        if self.offset >= self.end:
            finish(ex, self.keep)
        else:
            self._read()
