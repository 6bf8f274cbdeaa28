"""The static runtime: path decoding and lookup on their own, then a single-page app deployed as a
bundle and fetched through a real gateway -- content types, validators, ranges, HEAD, refusals,
SPA fallback, a large file to a slow reader, pipelining -- and proof that no process is started."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.static import (
    FILE,
    MISSING,
    REDIRECT,
    BadPath,
    cache_control,
    content_type,
    decode_path,
    hidden,
    lookup,
    parse_range,
)
from tests.conftest import Gateway, make_gateway
from tests.test_bundles import F, M, targz, upload

# -- units: paths, ranges, types -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "rel", "slash"),
    [
        (b"/", "", True),
        (b"/index.html", "index.html", False),
        (b"/docs/", "docs", True),
        (b"/docs", "docs", False),
        (b"//a///b.js", "a/b.js", False),
        (b"/caf%C3%A9.txt", "caf\u00e9.txt", False),
        (b"/a%20b", "a b", False),
        (b"/a+b", "a+b", False),
        (b"/.well-known/security.txt", ".well-known/security.txt", False),
        (b"/sub/dorm.toml", "sub/dorm.toml", False),  # only the root manifest is the manifest
    ],
)
def test_decode_path_accepts(raw: bytes, rel: str, slash: bool) -> None:
    assert decode_path(raw) == (rel, slash)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"/../etc/passwd", 400),
        (b"/a/../../etc/passwd", 400),
        (b"/%2e%2e/etc/passwd", 400),
        (b"/%2E%2E%2Fetc", 400),
        (b"/a%2fb", 400),
        (b"/a%2Fb", 400),
        (b"/a%5cb", 400),
        (b"/a\\b", 400),
        (b"/a%00b", 400),
        (b"/./index.html", 400),
        (b"/%ff", 400),
        (b"*", 400),
        (b"/dorm.toml", 404),
        (b"//dorm.toml", 404),
        (b"/.env", 404),
        (b"/.git/config", 404),
        (b"/%2egit/config", 404),
        (b"/a/.hidden", 404),
        (b"/.well-known/.x", 404),
    ],
)
def test_decode_path_refuses(raw: bytes, status: int) -> None:
    with pytest.raises(BadPath) as info:
        decode_path(raw)
    assert info.value.status == status


def test_hidden_names() -> None:
    assert hidden("dorm.toml")
    assert hidden(".env") and hidden("a/.git/HEAD")
    assert not hidden(".well-known/assetlinks.json")
    assert not hidden("a/dorm.toml") and not hidden("index.html")


@pytest.mark.parametrize(
    ("value", "size", "expected"),
    [
        (b"bytes=0-9", 100, (0, 9)),
        (b"bytes=90-", 100, (90, 99)),
        (b"bytes=90-1000", 100, (90, 99)),
        (b"bytes=-10", 100, (90, 99)),
        (b"bytes=-1000", 100, (0, 99)),
        (b"bytes=100-", 100, False),
        (b"bytes=-0", 100, False),
        (b"bytes=5-2", 100, None),
        (b"bytes=0-1,5-6", 100, None),
        (b"items=0-1", 100, None),
        (b"bytes=x-1", 100, None),
        (b"bytes=0-1", 0, None),
        (b"bytes=+1-2", 100, None),
    ],
)
def test_parse_range(value: bytes, size: int, expected: Any) -> None:
    assert parse_range(value, size) == expected


def test_content_types_and_cache_control() -> None:
    assert content_type("a/index.HTML") == "text/html; charset=utf-8"
    assert content_type("app.js") == "application/javascript; charset=utf-8"
    assert content_type("mod.mjs") == "application/javascript; charset=utf-8"
    assert content_type("style.css") == "text/css; charset=utf-8"
    assert content_type("m.wasm") == "application/wasm"
    assert content_type("site.webmanifest") == "application/manifest+json"
    assert content_type("logo.svg") == "image/svg+xml"
    assert content_type("photo.png") == "image/png"
    assert content_type("font.woff2") == "font/woff2"
    assert content_type("README") == "application/octet-stream"
    assert cache_control("assets/main.3f2a9c1b.js") == b"public, max-age=31536000, immutable"
    assert cache_control("chunk-0a1b2c3d4e5f.css") == b"public, max-age=31536000, immutable"
    assert cache_control("app.js") == b"no-cache"
    assert cache_control("report-20240101.pdf") == b"no-cache"  # a date is not a hash
    assert cache_control("index.html") == b"no-cache"


def test_lookup_stays_inside_the_bundle(tmp_path: Path) -> None:
    root = tmp_path / ("a" * 64)
    (root / "docs").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "index.html").write_text("home")
    (root / "docs" / "index.htm").write_text("docs")
    (root / "dorm.toml").write_text('runtime = "static"')
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink("index.html", root / "alias.html")
    os.symlink("../secret.txt", root / "escape.txt")
    os.symlink("dorm.toml", root / "manifest.txt")
    index = ("index.html", "index.htm")

    def find(rel: str, slash: bool = False, fallback: str | None = None) -> Any:
        return lookup(str(root), root.name, rel, slash, index, fallback, 1024)

    home = find("", True)
    assert home.kind == FILE and home.found.body == b"home" and home.found.rel == "index.html"
    assert find("docs", True).found.body == b"docs"
    assert find("docs").kind == REDIRECT
    assert find("index.html", True).kind == MISSING  # a file is not a directory
    alias = find("alias.html")
    assert alias.kind == FILE and alias.found.rel == "index.html"
    assert alias.found.etag == home.found.etag
    assert find("escape.txt").kind == MISSING
    assert find("manifest.txt").kind == MISSING
    assert find("empty", True).kind == MISSING
    spa = find("nowhere", fallback="index.html")
    assert spa.kind == MISSING and spa.fallback is not None and spa.fallback.body == b"home"
    assert find("nowhere", fallback="missing.html").fallback is None


class _Transport:
    """Records what a real ClientConnection writes; the peer is a loopback address."""

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else None

    def writelines(self, parts: Any) -> None:
        self.out.append(b"".join(bytes(p) for p in parts))

    def write(self, data: bytes) -> None:
        self.out.append(bytes(data))

    def is_closing(self) -> bool:
        return False


def _client() -> Any:
    """A real ClientConnection (the data plane's classes are native when compiled: no stand-in
    passes for one) on a recording transport."""
    from gateway.config import GatewayConfig
    from gateway.instances import InstanceManager
    from gateway.proxy import DataPlane
    from tests.test_fastpath import NoRegistry

    manager = InstanceManager(GatewayConfig(), NoRegistry())  # type: ignore[arg-type]
    client = DataPlane(GatewayConfig(), manager).protocol()
    client.connection_made(_Transport())  # type: ignore[arg-type]
    return client


def _exchange(client: Any, url: bytes) -> Any:
    from gateway.proxy import Exchange

    ex = Exchange(client)
    ex.method, ex.url, ex.request_done = b"GET", url, True
    ex.parts = [b"Host: x\r\n"]
    client.active = ex
    return ex


def test_small_cache_evicts_reloads_and_forgets(tmp_path: Path) -> None:
    """A 1000-byte budget for three 600-byte files: every answer is still right, the budget
    holds, and a site nobody uses any more leaves nothing behind."""
    import asyncio
    import gc

    from gateway.appspec import AppSpec, StaticOptions
    from gateway.static import StaticFiles

    root = tmp_path / ("b" * 64)
    root.mkdir()
    contents = {name: name.encode() * 200 for name in ("a.txt", "b.txt", "c.txt")}
    for name, data in contents.items():
        (root / name).write_bytes(data[:600])

    async def scenario() -> None:
        files = StaticFiles(cache_bytes=1000, max_cached_file=1000)
        spec = AppSpec(name="s", runtime="static", static=StaticOptions())
        site = files.site(root, spec)
        assert files.site(root, spec) is site  # one site (and cache) per bundle and options
        client = _client()
        for _ in range(3):
            for name, data in contents.items():
                ex = _exchange(client, b"/" + name.encode())
                site.serve(ex)
                for _ in range(200):
                    if client.active is None:  # answered: response_done let it go
                        break
                    await asyncio.sleep(0.005)
                assert client.active is None and not client.closed
                assert client.transport.out[-1].endswith(b"\r\n\r\n" + data[:600])
                assert files.cached <= 1000
        assert len(files.bodies) == 1
        del site
        gc.collect()
        assert not files.routes and not files.bodies and files.cached == 0
        files.close()

    asyncio.run(scenario())


# -- a static single-page app through a real gateway -----------------------------------------------

INDEX = (
    b"<!doctype html><html><head><meta charset='utf-8'><title>dorm spa</title>"
    b"<link rel='stylesheet' href='/style.css'></head><body><h1 id='route'>loading</h1>"
    b"<script src='/app.js'></script></body></html>"
)
APP_JS = (
    b"document.getElementById('route').textContent = 'route ' + location.pathname;\n"
    b"document.body.dataset.ready = 'yes';\n"
)
STYLE = b"body { background: #2e7d32; color: white; font: 32px sans-serif; }\n"
BIG = hashlib.shake_256(b"dorm static").digest(8 * 1024 * 1024)  # 8 MiB, not compressible
SPA_MANIFEST = b'runtime = "static"\nstatic = { spa_fallback = "index.html" }\n'


def spa_bundle(app_js: bytes = APP_JS) -> bytes:
    return targz(
        M(SPA_MANIFEST),
        F("index.html", INDEX),
        F("app.js", app_js),
        F("style.css", STYLE),
        F("logo.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>"),
        F("mod.wasm", b"\0asm\1\0\0\0"),
        F("site.webmanifest", b"{}"),
        F("docs/index.html", b"<p>docs</p>"),
        F(".env", b"SECRET=1"),
        F(".well-known/security.txt", b"Contact: mailto:security@example.test\n"),
        F("big.bin", BIG),
        compresslevel=1,
    )


HOST = "spa.localhost"
FEAT = "feat--spa.localhost"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway with the SPA deployed to `main` (creating the app from its manifest) and a
    plain static app without a fallback."""
    gateway = make_gateway(tmp_path_factory.mktemp("static"))
    gateway.data_dir.parent.mkdir(parents=True, exist_ok=True)
    gateway.start()
    try:
        status, body = upload(gateway, "spa", "main", spa_bundle())
        assert status == 201, body
        status, body = upload(
            gateway, "plain", "main", targz(M(b'runtime = "static"\n'), F("index.html", b"hi"))
        )
        assert status == 201, body
        yield gateway
    finally:
        with contextlib.suppress(AssertionError):
            gateway.stop()
        shutil.rmtree(gateway.run_dir, ignore_errors=True)


class Conn:
    """A raw keep-alive connection that reads responses one by one (HEAD-aware)."""

    def __init__(self, gw: Gateway, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(15)
        self.sock.connect(("127.0.0.1", gw.port))
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by the gateway")
        self.buf += data

    def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head_only or status == 304 else int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def closed_by_peer(self) -> bool:
        self.sock.settimeout(2)
        try:
            return self.sock.recv(1) == b""
        except (TimeoutError, ConnectionResetError):
            return False

    def close(self) -> None:
        self.sock.close()


def get(path: str, host: str = HOST, method: str = "GET", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_files_with_their_content_types(gw: Gateway) -> None:
    cases = {
        "/": ("text/html; charset=utf-8", INDEX),
        "/index.html": ("text/html; charset=utf-8", INDEX),
        "/app.js": ("application/javascript; charset=utf-8", APP_JS),
        "/style.css": ("text/css; charset=utf-8", STYLE),
        "/logo.svg": ("image/svg+xml", None),
        "/mod.wasm": ("application/wasm", None),
        "/site.webmanifest": ("application/manifest+json", None),
        "/docs/": ("text/html; charset=utf-8", b"<p>docs</p>"),
        "/.well-known/security.txt": ("text/plain; charset=utf-8", None),
    }
    for path, (ctype, body) in cases.items():
        for _ in range(2):  # cold (looked up in the pool), then warm (from memory)
            resp = gw.request(path, host=HOST)
            assert resp.status == 200, (path, resp.body)
            assert resp.headers["content-type"] == ctype, path
            assert resp.headers["x-content-type-options"] == "nosniff"
            assert resp.headers["accept-ranges"] == "bytes"
            assert resp.headers["cache-control"] == "no-cache"
            assert "date" in resp.headers
            if body is not None:
                assert resp.body == body, path


def test_etag_and_last_modified_revalidation(gw: Gateway) -> None:
    first = gw.request("/app.js", host=HOST)
    etag, modified = first.headers["etag"], first.headers["last-modified"]
    assert etag.startswith('"') and etag.endswith('"')
    assert gw.request("/app.js", host=HOST).headers["etag"] == etag  # stable
    for inm in (etag, f'"x", W/{etag}', "*"):
        resp = gw.request("/app.js", host=HOST, headers={"If-None-Match": inm})
        assert resp.status == 304, inm
        assert resp.body == b"" and resp.headers["etag"] == etag
        assert resp.headers["last-modified"] == modified
        assert "content-length" not in resp.headers
    resp = gw.request("/app.js", host=HOST, headers={"If-None-Match": '"other"'})
    assert resp.status == 200 and resp.body == APP_JS
    # If-Modified-Since: the exact value, a later date, an earlier one.
    assert gw.request("/app.js", host=HOST, headers={"If-Modified-Since": modified}).status == 304
    later = "Fri, 01 Jan 2100 00:00:00 GMT"
    assert gw.request("/app.js", host=HOST, headers={"If-Modified-Since": later}).status == 304
    earlier = "Thu, 01 Jan 1970 00:00:01 GMT"
    assert gw.request("/app.js", host=HOST, headers={"If-Modified-Since": earlier}).status == 200
    junk = gw.request("/app.js", host=HOST, headers={"If-Modified-Since": "yesterday"})
    assert junk.status == 200
    # If-None-Match takes precedence over If-Modified-Since.
    both = gw.request(
        "/app.js", host=HOST, headers={"If-None-Match": '"other"', "If-Modified-Since": later}
    )
    assert both.status == 200
    # Last-Modified is when the bundle was extracted (not the archive's mtime 0).
    stamp = time.mktime(time.strptime(modified, "%a, %d %b %Y %H:%M:%S GMT")) - time.timezone
    assert abs(stamp - time.time()) < 3600


def test_ranges(gw: Gateway) -> None:
    resp = gw.request("/app.js", host=HOST, headers={"Range": "bytes=0-7"})
    assert resp.status == 206 and resp.body == APP_JS[:8]
    assert resp.headers["content-range"] == f"bytes 0-7/{len(APP_JS)}"
    assert resp.headers["content-length"] == "8"
    resp = gw.request("/app.js", host=HOST, headers={"Range": "bytes=-5"})
    assert resp.status == 206 and resp.body == APP_JS[-5:]
    resp = gw.request("/app.js", host=HOST, headers={"Range": "bytes=10-"})
    assert resp.status == 206 and resp.body == APP_JS[10:]
    resp = gw.request("/app.js", host=HOST, headers={"Range": f"bytes={len(APP_JS)}-"})
    assert resp.status == 416 and resp.headers["content-range"] == f"bytes */{len(APP_JS)}"
    resp = gw.request("/app.js", host=HOST, headers={"Range": "bytes=0-1,4-5"})
    assert resp.status == 200 and resp.body == APP_JS  # several ranges: the whole file
    etag = resp.headers["etag"]
    resp = gw.request("/app.js", host=HOST, headers={"Range": "bytes=0-1", "If-Range": etag})
    assert resp.status == 206 and resp.body == APP_JS[:2]
    resp = gw.request("/app.js", host=HOST, headers={"Range": "bytes=0-1", "If-Range": '"old"'})
    assert resp.status == 200 and resp.body == APP_JS
    # A range of the large (streamed, uncached) file.
    resp = gw.request("/big.bin", host=HOST, headers={"Range": "bytes=1000000-2999999"})
    assert resp.status == 206 and resp.body == BIG[1000000:3000000]
    resp = gw.request("/big.bin", host=HOST, headers={"Range": "bytes=-100"})
    assert resp.status == 206 and resp.body == BIG[-100:]


def test_head_and_methods(gw: Gateway) -> None:
    conn = Conn(gw)
    try:
        conn.send(get("/app.js", method="HEAD") + get("/big.bin", method="HEAD"))
        status, headers, body = conn.response(head_only=True)
        assert status == 200 and headers["content-length"] == str(len(APP_JS)) and body == b""
        status, headers, _ = conn.response(head_only=True)
        assert status == 200 and headers["content-length"] == str(len(BIG))
        # A HEAD ignores Range (RFC 9110 §14.2) and leaves no body bytes on the wire.
        conn.send(get("/app.js", method="HEAD", Range="bytes=0-1") + get("/style.css"))
        status, headers, _ = conn.response(head_only=True)
        assert status == 200 and headers["content-length"] == str(len(APP_JS))
        status, _, body = conn.response()
        assert status == 200 and body == STYLE
        for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
            head = f"{method} /app.js HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 3\r\n\r\n"
            conn.send(head.encode() + b"abc")
            status, headers, body = conn.response()
            assert status == 405, method
            assert headers["allow"] == "GET, HEAD"
        conn.send(get("/style.css"))
        assert conn.response()[2] == STYLE  # the connection is still in step
    finally:
        conn.close()
    # Bodies the parser would have to hold (too large, chunked, or awaited with 100-continue)
    # are not waited for: the answer says Connection: close, and the close is clean.
    big = 200 * 1024
    for extra in (
        f"Content-Length: {big}\r\n\r\n".encode() + b"x" * 1000,
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"Content-Length: 10\r\nExpect: 100-continue\r\n\r\n",
    ):
        conn = Conn(gw)
        try:
            conn.send(b"POST /app.js HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n" + extra)
            status, headers, _ = conn.response()
            assert status == 405 and headers["connection"] == "close", extra[:40]
            assert conn.closed_by_peer()
        finally:
            conn.close()


def test_refused_paths_never_leak(gw: Gateway) -> None:
    targets = [
        b"/../dorm.toml",
        b"/%2e%2e/dorm.toml",
        b"/%2e%2e%2fdorm.toml",
        b"/docs/..%2f..%2fdorm.toml",
        b"/docs%2f..%2fdorm.toml",
        b"/..%5cdorm.toml",
        b"/%00",
        b"/index.html%00.png",
        b"/dorm.toml",
        b"//dorm.toml",
        b"/.env",
        b"/%2eenv",
        b"/../../../../etc/passwd",
    ]
    for target in targets:
        conn = Conn(gw)
        try:
            conn.send(b"GET " + target + b" HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n\r\n")
            status, _, body = conn.response()
        finally:
            conn.close()
        assert status in (400, 404), target
        assert b"runtime" not in body and b"SECRET" not in body and b"root:" not in body, target
        assert b"<!doctype" not in body, target  # refused paths get no SPA fallback


def test_spa_fallback_and_real_404s(gw: Gateway) -> None:
    for path in ("/settings/profile", "/settings/profile/", "/users/42"):
        resp = gw.request(path, host=HOST)
        assert resp.status == 200, path
        assert resp.body == INDEX and resp.headers["content-type"].startswith("text/html")
    missing = gw.request("/missing.png", host=HOST, headers={"Accept": "image/avif,image/*"})
    assert missing.status == 404 and b"<!doctype" not in missing.body
    assert gw.request("/assets/missing.js", host=HOST).status == 404
    # A navigation (Accept: text/html) to a dotted route still loads the app.
    nav = gw.request("/blog/v1.2", host=HOST, headers={"Accept": "text/html,*/*;q=0.8"})
    assert nav.status == 200 and nav.body == INDEX
    # Without a fallback, a route is a 404.
    assert gw.request("/settings/profile", host="plain.localhost").status == 404
    assert gw.request("/", host="plain.localhost").body == b"hi"
    # A directory without its slash is redirected, keeping the query.
    conn = Conn(gw)
    try:
        conn.send(get("/docs?tab=1") + get("/docs/"))
        status, headers, _ = conn.response()
        assert status == 301 and headers["location"] == "/docs/?tab=1"
        assert conn.response()[2] == b"<p>docs</p>"
    finally:
        conn.close()


def test_a_large_file_reaches_a_slow_reader_intact(gw: Gateway) -> None:
    conn = Conn(gw, rcvbuf=32 * 1024)
    try:
        conn.send(get("/big.bin") + get("/app.js"))
        while b"\r\n\r\n" not in conn.buf:
            conn._fill()
        received = len(conn.buf.split(b"\r\n\r\n", 1)[1])
        deadline = time.monotonic() + 60
        while received < len(BIG) // 4:  # the first quarter slowly, with pauses
            time.sleep(0.02)
            conn._fill()
            received = len(conn.buf.split(b"\r\n\r\n", 1)[1])
            assert time.monotonic() < deadline
        status, headers, body = conn.response()
        assert status == 200 and headers["content-length"] == str(len(BIG))
        assert headers["content-type"] == "application/octet-stream"
        assert hashlib.sha256(body).digest() == hashlib.sha256(BIG).digest()
        assert conn.response()[2] == APP_JS  # the pipelined request after it
    finally:
        conn.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_stalled_downloads_are_not_buffered(gw: Gateway) -> None:
    """Four clients that ask for 8 MiB and read nothing: back-pressure keeps the gateway from
    reading the files into memory."""
    assert gw.proc is not None
    gw.request("/big.bin", host=HOST, headers={"Range": "bytes=0-0"})
    before = _rss_kib(gw.proc.pid)
    conns = [Conn(gw, rcvbuf=16 * 1024) for _ in range(4)]
    try:
        for conn in conns:
            conn.send(get("/big.bin"))
        time.sleep(1.5)
        grown = _rss_kib(gw.proc.pid) - before
        assert grown < 12 * 1024, f"the gateway grew by {grown} KiB for 32 MiB of stalled downloads"
        assert gw.request("/app.js", host=HOST).body == APP_JS  # others are unaffected
    finally:
        for conn in conns:
            conn.close()


def test_keep_alive_and_pipelining_across_static_responses(gw: Gateway) -> None:
    etag = gw.request("/style.css", host=HOST).headers["etag"]
    batch = [
        (get("/app.js"), 200, APP_JS, False),
        (get("/style.css", If_None_Match=etag), 304, b"", False),
        (get("/nope.png"), 404, None, False),
        (get("/app.js", Range="bytes=0-3"), 206, APP_JS[:4], False),
        (get("/index.html", method="HEAD"), 200, b"", True),
        (get("/settings/x"), 200, INDEX, False),
        (get("/docs"), 301, None, False),
        (get("/big.bin", Range="bytes=5-9"), 206, BIG[5:10], False),
        (b"DELETE /app.js HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n\r\n", 405, None, False),
        (get("/style.css"), 200, STYLE, False),
    ]
    conn = Conn(gw)
    try:
        for _ in range(3):
            conn.send(b"".join(item[0] for item in batch))
            for _, status, body, head_only in batch:
                got_status, headers, got_body = conn.response(head_only=head_only)
                assert got_status == status
                assert "connection" not in headers  # kept alive
                if body is not None:
                    assert got_body == body
        # Many pipelined requests in one write: answered in order, without deep recursion.
        conn.send(b"".join(get(f"/app.js?n={i}") for i in range(2000)))
        for _ in range(2000):
            assert conn.response()[2] == APP_JS
        conn.send(get("/app.js", Connection="close"))
        status, headers, body = conn.response()
        assert status == 200 and headers["connection"] == "close" and body == APP_JS
        assert conn.closed_by_peer()
    finally:
        conn.close()


def test_http10_keep_alive(gw: Gateway) -> None:
    conn = Conn(gw)
    try:
        req = f"GET /app.js HTTP/1.0\r\nHost: {HOST}\r\nConnection: keep-alive\r\n\r\n".encode()
        conn.send(req + req)
        for _ in range(2):
            status, headers, body = conn.response()
            assert status == 200 and body == APP_JS
            assert headers["connection"].lower() == "keep-alive"
        conn.send(f"GET /app.js HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode())
        assert conn.response()[2] == APP_JS
        assert conn.closed_by_peer()
    finally:
        conn.close()


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def test_no_process_is_started(gw: Gateway) -> None:
    assert gw.proc is not None
    before = _descendants(gw.proc.pid)
    for path in ("/", "/app.js", "/settings/profile", "/big.bin", "/missing.png"):
        assert gw.request(path, host=HOST).status in (200, 404)
    assert gw.request("/", host=FEAT).status == 404  # no such branch
    inst = gw.instance("spa")
    assert inst is not None
    assert inst["state"] == "cold" and inst["pid"] is None and inst["starts"] == 0
    assert inst["last_request"] is not None
    # "Evicting" a static app is a no-op; it still answers at once.
    status, _ = gw.admin("POST", "/v1/apps/spa/stop")
    assert status in (200, 202)
    assert gw.request("/app.js", host=HOST).body == APP_JS
    assert _descendants(gw.proc.pid) == before
    assert gw.instance("spa")["starts"] == 0  # type: ignore[index]


def test_redeploy_serves_the_new_bundle_at_once(gw: Gateway) -> None:
    old_js = gw.request("/app.js", host=FEAT)
    assert old_js.status == 404  # the branch does not exist yet
    status, body = upload(gw, "spa", "feat", spa_bundle())
    assert status == 201, body
    first = gw.request("/app.js", host=FEAT)
    css = gw.request("/style.css", host=FEAT).headers["etag"]
    assert first.body == APP_JS
    status, body = upload(gw, "spa", "feat", spa_bundle(APP_JS + b"// v2\n"))
    assert status == 200, body
    second = gw.request("/app.js", host=FEAT)
    assert second.body == APP_JS + b"// v2\n"
    assert second.headers["etag"] != first.headers["etag"]
    stale = gw.request("/app.js", host=FEAT, headers={"If-None-Match": first.headers["etag"]})
    assert stale.status == 200
    # An unchanged file keeps its ETag across deploys, so browsers keep their copy.
    assert gw.request("/style.css", host=FEAT).headers["etag"] == css
    assert gw.request("/app.js", host=HOST).body == APP_JS  # main is untouched


def test_headless_chromium_renders_a_client_side_route(gw: Gateway, tmp_path: Path) -> None:
    """The real thing: a browser loads /settings/profile, gets the app, runs app.js, styles."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    profile = tempfile.mkdtemp(prefix="dorm-chromium-")
    try:
        out = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}",
                f"--host-resolver-rules=MAP {HOST} 127.0.0.1",
                "--virtual-time-budget=3000",
                "--dump-dom",
                f"http://{HOST}:{gw.port}/settings/profile",
            ],
            capture_output=True,
            timeout=60,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    dom = out.stdout.decode(errors="replace")
    assert "route /settings/profile" in dom, (dom[-2000:], out.stderr[-2000:])
    assert 'data-ready="yes"' in dom
