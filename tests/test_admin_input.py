"""Hostile and malformed input to the admin API, over real sockets: the HTTP framing (bodies
without a length, chunked, oversized, cut short, stalled, `Expect: 100-continue`, pipelining,
slow heads, oversized heads, odd paths and methods), every shape of bad bearer credentials,
and JSON that is not what it should be. Each must get a 4xx JSON answer naming the problem
(never a traceback) and change nothing.

The server is the in-process admin server of tests/test_admin.py with the deploy routes of
gateway/deploy.py mounted, so uploads are covered too; bundle contents are in
tests/test_bundle_input.py."""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.admin import MAX_BODY, MAX_CONNECTIONS, start_admin_server
from gateway.bundles import BundleLimits, BundleStore
from gateway.client import AdminClient, AdminError
from gateway.deploy import DeployApi
from gateway.registry import Registry
from tests.test_admin import SPEC, AdminHarness, _read_all
from tests.test_bundles import F, M, targz
from tests.test_deploy import wait_until

LIMITS = BundleLimits(max_size=1 << 20, max_unpacked=2 << 20, max_files=40)
TIMEOUT = 1.0  # header_timeout and body_timeout of the server under test


class UploadHarness(AdminHarness):
    """The admin server with the deploy routes and a bundle store with small limits."""

    async def _start(self) -> None:
        self.registry = Registry(self.data_dir / "dorm.db")
        await self.registry.open()
        self.store = BundleStore(self.data_dir / "bundles", LIMITS)
        self.api = DeployApi(self.cfg, self.registry, self.instances, self.store)
        await self.api.start()
        self.server = await start_admin_server(
            self.cfg, self.registry, self.instances, self.token, extra_routes=self.api.routes()
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()
        await self.api.close()
        await self.registry.close()

    def connect(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def state(self) -> dict[str, Any]:
        """Everything a refused request could change: the registry and every path on disk."""
        files = sorted(
            str(p.relative_to(self.data_dir))
            for p in self.data_dir.rglob("*")
            if not p.name.startswith("dorm.db")  # SQLite's own journal files come and go
        )
        return {
            "apps": {name: spec.to_json() for name, spec in self.registry.apps.items()},
            "branches": {
                f"{a}/{b}": (s.bundle, s.previous_bundle, s.env)
                for (a, b), s in self.registry.branches.items()
            },
            "bundles": sorted(self.registry.bundles),
            "files": files,
        }


@pytest.fixture
def srv(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[UploadHarness]:
    """A server with app `site` and a deployed `site/keep`; fails the test if anything was
    logged at ERROR (a traceback means some input was not handled)."""
    caplog.set_level(logging.WARNING)
    h = UploadHarness(tmp_path / "data", header_timeout=TIMEOUT, body_timeout=TIMEOUT)
    h.start()
    try:
        with h.client() as client:
            client.call("PUT", "/v1/apps/site", SPEC)
            bundle = targz(M(), F("app.py", b"v1"))
            status, body = client.upload(
                "/v1/apps/site/branches/keep/bundle", io.BytesIO(bundle), len(bundle)
            )
            assert status == 201, body
        yield h
    finally:
        h.stop()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def auth(h: AdminHarness) -> bytes:
    return b"authorization: Bearer " + h.token.encode() + b"\r\n"


def split(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of the first response in `raw`."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), raw[:300]
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    return int(lines[0].split()[1]), headers, rest[:length]


def error_field(body: bytes) -> Any:
    return orjson.loads(body)["error"]["field"]


UPLOAD = b"PUT /v1/apps/site/branches/keep/bundle HTTP/1.1\r\nhost: x\r\n"


# -- bodies --------------------------------------------------------------------------------------
def test_put_without_a_body_is_400_naming_the_body(srv: UploadHarness) -> None:
    before = srv.state()
    raw = srv.raw(
        b"PUT /v1/apps/site HTTP/1.1\r\nhost: x\r\nconnection: close\r\n" + auth(srv) + b"\r\n"
    )
    status, _, body = split(raw)
    assert (status, error_field(body)) == (400, "body")
    raw = srv.raw(UPLOAD + b"connection: close\r\n" + auth(srv) + b"\r\n")
    status, _, body = split(raw)
    assert (status, error_field(body)) == (400, "format")
    assert srv.state() == before


def test_chunked_upload_is_accepted(srv: UploadHarness) -> None:
    data = targz(M(), F("app.py", os.urandom(100_000)))
    pieces = [data[i : i + 7000] for i in range(0, len(data), 7000)]
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    raw = srv.raw(
        b"PUT /v1/apps/site/branches/chunked/bundle HTTP/1.1\r\nhost: x\r\n"
        b"transfer-encoding: chunked\r\nconnection: close\r\n" + auth(srv) + b"\r\n" + body
    )
    status, _, answer = split(raw)
    assert status == 201, answer
    assert srv.registry.branches[("site", "chunked")].bundle == orjson.loads(answer)["bundle"]


@pytest.mark.parametrize("expect", [False, True])
def test_declared_length_over_the_limit_is_413_before_the_body(
    srv: UploadHarness, expect: bool
) -> None:
    before = srv.state()
    with srv.connect() as sock:
        sock.sendall(
            UPLOAD
            + auth(srv)
            + (b"expect: 100-continue\r\n" if expect else b"")
            + b"content-length: %d\r\n\r\n" % (10 * 1024**3)
        )
        # Nothing of the body was sent: the answer cannot depend on reading it.
        raw = _read_all(sock)
    status, headers, body = split(raw)
    assert (status, error_field(body)) == (413, "body")
    assert headers["content-type"] == "application/json"
    assert b"100 Continue" not in raw
    assert srv.state() == before


def test_body_cut_short_then_stalled_times_out_and_stores_nothing(srv: UploadHarness) -> None:
    before = srv.state()
    data = targz(M(), F("app.py", os.urandom(200_000)))
    with srv.connect() as sock:
        sock.sendall(UPLOAD + auth(srv) + b"content-length: %d\r\n\r\n" % len(data))
        sock.sendall(data[: len(data) // 2])
        tmp = srv.data_dir / "bundles" / "tmp"
        wait_until(lambda: any(tmp.iterdir()), what="the upload to start spooling")
        start = time.monotonic()
        raw = _read_all(sock)  # the client stalls; the server must answer and close
        waited = time.monotonic() - start
    status, _, body = split(raw)
    assert (status, error_field(body)) == (408, "body")
    assert waited < TIMEOUT + 5
    wait_until(lambda: srv.state() == before, what="the stalled upload to be cleaned up")


def test_upload_with_expect_100_continue(srv: UploadHarness) -> None:
    data = targz(M(), F("app.py", b"v100"))
    with srv.connect() as sock:
        sock.sendall(
            b"PUT /v1/apps/site/branches/cont/bundle HTTP/1.1\r\nhost: x\r\n"
            b"expect: 100-continue\r\nconnection: close\r\n"
            + auth(srv)
            + b"content-length: %d\r\n\r\n" % len(data)
        )
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 100 "), first
        sock.sendall(data)
        raw = _read_all(sock)
    assert split(raw)[0] == 201


def test_pipelined_upload_and_reads(srv: UploadHarness) -> None:
    data = targz(M(), F("app.py", b"piped"))
    requests = (
        b"PUT /v1/apps/site/branches/piped/bundle HTTP/1.1\r\nhost: x\r\n"
        + auth(srv)
        + b"content-length: %d\r\n\r\n" % len(data)
        + data
        + b"GET /v1/apps/site/branches/piped HTTP/1.1\r\nhost: x\r\n"
        + auth(srv)
        + b"\r\n"
        + b"GET /v1/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    raw = srv.raw(requests)
    assert raw.count(b"HTTP/1.1 ") == 3, raw
    status, _, body = split(raw)
    assert status == 201
    digest = orjson.loads(body)["bundle"]
    second = raw[raw.index(b"HTTP/1.1 ", 1) :]
    status, _, body = split(second)
    assert (status, orjson.loads(body)["bundle"]) == (200, digest)


# -- heads ---------------------------------------------------------------------------------------
def test_slow_loris_head_is_cut_off(srv: UploadHarness) -> None:
    """One byte at a time, never finishing: the head has `header_timeout` in all, not per byte."""
    head = b"GET /v1/apps HTTP/1.1\r\nhost: x\r\n" + auth(srv) + b"x-slow: " + b"a" * 1000
    with srv.connect() as sock:
        start = time.monotonic()
        answer = b""
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.05)
            if time.monotonic() - start > TIMEOUT * 10:
                break
        sock.settimeout(5)
        answer = _read_all(sock)
        elapsed = time.monotonic() - start
    status, _, body = split(answer)
    assert status == 408
    assert orjson.loads(body)["error"]["message"] == "timed out reading the request head"
    assert elapsed < TIMEOUT * 10


def test_too_many_headers_and_a_huge_url_are_431(srv: UploadHarness) -> None:
    many = b"".join(b"x-h%d: v\r\n" % i for i in range(3000))
    for request in (
        b"GET /v1/apps HTTP/1.1\r\nhost: x\r\n" + auth(srv) + many + b"\r\n",
        b"GET /v1/apps/" + b"a" * 20_000 + b" HTTP/1.1\r\nhost: x\r\n" + auth(srv) + b"\r\n",
    ):
        status, headers, body = split(srv.raw(request))
        assert status == 431
        assert headers["content-type"] == "application/json"
        assert "error" in orjson.loads(body)


@pytest.mark.parametrize(
    ("target", "status", "field"),
    [
        (b"/v1/apps/site/branches/..", 400, "branch"),
        (b"/v1/apps/site/branches/%2e%2e", 400, "branch"),
        (b"/v1/apps/%2E%2E/branches", 400, "app"),
        (b"/v1/apps/..%2F..%2Fetc", 400, "app"),
        (b"/v1/apps/site%2Fbranches%2Fkeep", 400, "app"),
        (b"/v1/apps/site/branches/a%2Fb", 400, "branch"),
        (b"/v1/apps/%C3%A9t%C3%A9", 400, "app"),
        (b"/v1/apps/%ff%fe", 400, "app"),
        (b"/v1/apps/si%00te", 400, "app"),
        (b"/v1/apps/SITE", 400, "app"),
        (b"/v1/apps/\xc3\xa9t\xc3\xa9", 400, "request"),
        (b"/v1/apps/a" + b"b" * 5000, 400, "app"),
        (b"*", 400, "path"),
        (b"/v1//apps", 404, "path"),
    ],
)
def test_odd_paths_name_the_segment(
    srv: UploadHarness, target: bytes, status: int, field: str
) -> None:
    before = srv.state()
    raw = srv.raw(
        b"GET " + target + b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\n" + auth(srv) + b"\r\n"
    )
    got, headers, body = split(raw)
    assert (got, error_field(body)) == (status, field), body
    assert headers["content-type"] == "application/json"
    assert srv.state() == before


def test_trailing_slashes_reach_the_same_route(srv: UploadHarness) -> None:
    with srv.client() as client:
        assert client.call("GET", "/v1/apps/") == client.call("GET", "/v1/apps")
        assert client.call("GET", "/v1/apps/site/") == client.call("GET", "/v1/apps/site")


# -- methods -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [b"HEAD", b"OPTIONS", b"FROB", b"get"])
def test_other_methods_are_405_with_allow(srv: UploadHarness, method: bytes) -> None:
    """The answer is complete and the connection stays usable: a pipelined request after it is
    answered. A HEAD answer carries no body (its Content-Length is that of the GET's)."""
    raw = srv.raw(
        method
        + b" /v1/apps/site HTTP/1.1\r\nhost: x\r\n"
        + auth(srv)
        + b"\r\nGET /v1/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    status, headers, body = split(raw)
    assert status == 405
    assert sorted(headers["allow"].split(", ")) == ["DELETE", "GET", "PUT"]
    rest = raw.partition(b"\r\n\r\n")[2]
    if method == b"HEAD":
        assert rest.startswith(b"HTTP/1.1 200 "), raw
    else:
        assert error_field(body) == "method"
        assert rest[len(body) :].startswith(b"HTTP/1.1 200 "), raw


def test_head_without_a_token_is_401_without_a_body(srv: UploadHarness) -> None:
    """The head says how long the body would be, and none follows. The connection is closed
    after it, as after every answer to a request without the token (the pipelined request
    after it is not answered)."""
    raw = srv.raw(
        b"HEAD /v1/apps HTTP/1.1\r\nhost: x\r\n\r\n"
        b"GET /v1/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    status, headers, _ = split(raw)
    assert status == 401
    assert int(headers["content-length"]) > 0
    assert headers["www-authenticate"] == 'Bearer realm="dorm"'
    assert headers["connection"] == "close"
    assert raw.partition(b"\r\n\r\n")[2] == b"", raw


def test_content_type_is_not_consulted_except_multipart_uploads(srv: UploadHarness) -> None:
    """JSON routes read JSON whatever the Content-Type says (curl -d sends a form type); an
    archive sent as a multipart form is refused with a hint to send it as the raw body."""
    body = orjson.dumps({**SPEC, "max_queue": 9})
    raw = srv.raw(
        b"PUT /v1/apps/site HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
        b"content-type: application/x-www-form-urlencoded\r\n"
        + auth(srv)
        + b"content-length: %d\r\n\r\n" % len(body)
        + body
    )
    assert split(raw)[0] == 200
    before = srv.state()
    data = b"--xyz\r\ncontent-disposition: form-data; name=f\r\n\r\n" + targz(M()) + b"\r\n--xyz--"
    raw = srv.raw(
        UPLOAD
        + b"connection: close\r\ncontent-type: multipart/form-data; boundary=xyz\r\n"
        + auth(srv)
        + b"content-length: %d\r\n\r\n" % len(data)
        + data
    )
    status, _, answer = split(raw)
    assert (status, error_field(answer)) == (415, "content-type")
    assert "--data-binary" in orjson.loads(answer)["error"]["message"]
    assert srv.state() == before


# -- credentials ---------------------------------------------------------------------------------
BAD_CREDENTIALS = {
    "missing": None,
    "empty": b"",
    "scheme-only": b"Bearer",
    "scheme-and-space": b"Bearer ",
    "other-scheme": b"Basic dG9rOnRvaw==",
    "token-as-scheme": b"TOKEN",
    "tab-separated": b"Bearer\tTOKEN",
    "shorter": b"Bearer TOKEN"[:-1],
    "longer": b"Bearer TOKENx",
    "different-length": b"Bearer x",
    "token-twice": b"Bearer TOKEN TOKEN",
    "quoted": b'Bearer "TOKEN"',
    "prefix": b"Bearer TOKEN,",
}


@pytest.mark.parametrize("case", sorted(BAD_CREDENTIALS))
def test_bad_credentials_are_401_json(srv: UploadHarness, case: str) -> None:
    value = BAD_CREDENTIALS[case]
    header = b"" if value is None else b"authorization: " + value + b"\r\n"
    header = header.replace(b"TOKEN", srv.token.encode())
    before = srv.state()
    data = targz(M(), F("app.py", b"x"))
    for request in (
        b"GET /v1/apps HTTP/1.1\r\nhost: x\r\n" + header + b"connection: close\r\n\r\n",
        b"PUT /v1/apps/evil HTTP/1.1\r\nhost: x\r\n" + header + b"content-length: 2\r\n\r\n{}",
        UPLOAD + header + b"content-length: %d\r\n\r\n" % len(data) + data,
    ):
        status, headers, body = split(srv.raw(request))
        assert status == 401
        assert headers["www-authenticate"] == 'Bearer realm="dorm"'
        assert headers["content-type"] == "application/json"
        assert error_field(body) == "authorization"
    assert srv.state() == before


@pytest.mark.parametrize("spelling", [b"bearer", b"BEARER", b"Bearer  ", b"Bearer \t"])
def test_scheme_case_and_spaces_around_the_token(srv: UploadHarness, spelling: bytes) -> None:
    """RFC 9110: the scheme is case-insensitive and 1*SP may precede the credentials; h11
    removes whitespace around the header value."""
    raw = srv.raw(
        b"GET /v1/apps HTTP/1.1\r\nhost: x\r\nconnection: close\r\nauthorization: "
        + spelling.rstrip(b"\t")
        + (b" " if not spelling.endswith(b" ") else b"")
        + srv.token.encode()
        + b"  \r\n\r\n"
    )
    assert split(raw)[0] == 200


def test_two_authorization_headers_are_refused(srv: UploadHarness) -> None:
    """Which of two credentials counts is ambiguous (a proxy may check the other): neither."""
    good = b"authorization: Bearer " + srv.token.encode() + b"\r\n"
    bad = b"authorization: Bearer nope\r\n"
    for pair in (good + bad, bad + good, good + good):
        raw = srv.raw(b"GET /v1/apps HTTP/1.1\r\nhost: x\r\nconnection: close\r\n" + pair + b"\r\n")
        status, _, body = split(raw)
        assert (status, error_field(body)) == (401, "authorization")


def test_token_with_a_trailing_newline(srv: UploadHarness) -> None:
    """A raw LF ends a header line, so it cannot be part of a token; the client strips one that
    came from a file or an environment variable, and refuses other unsendable tokens clearly."""
    raw = srv.raw(
        b"GET /v1/apps HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
        + srv.token.encode()
        + b"\n\r\n\r\n"
    )
    assert split(raw)[0] == 200  # h11 takes a bare LF as the end of the line
    with AdminClient(srv.url, srv.token + "\n") as client:
        assert client.call("GET", "/v1/apps")["apps"][0]["name"] == "site"
    with pytest.raises(AdminError) as info:
        AdminClient(srv.url, "tok\nen")
    assert "token" in str(info.value)


# -- JSON ----------------------------------------------------------------------------------------
def put_json(h: UploadHarness, path: bytes, body: bytes) -> tuple[int, Any]:
    raw = h.raw(
        b"PUT " + path + b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
        b"content-type: application/json\r\n"
        + auth(h)
        + b"content-length: %d\r\n\r\n" % len(body)
        + body
    )
    status, headers, answer = split(raw)
    assert headers["content-type"] == "application/json"
    return status, orjson.loads(answer)


BAD_JSON: dict[str, tuple[bytes, str]] = {
    "invalid-utf8": (b'{"command": ["python3\xff"]}', "body"),
    "utf8-bom": (b'\xef\xbb\xbf{"command": ["x"]}', "body"),
    "lone-surrogate": (b'{"command": ["\\udcff"]}', "body"),
    "duplicate-key": (b'{"command": ["x"], "idle_timeout": 5, "idle_timeout": 6}', "idle_timeout"),
    "duplicate-nested-key": (
        b'{"command": ["x"], "limits": {"memory": "64MiB", "memory": "1GiB"}}',
        "limits.memory",
    ),
    "duplicate-env-key": (b'{"command": ["x"], "env": {"A": "1", "A": "2"}}', "env.A"),
    "nested-100k": (b"[" * 100_000 + b"]" * 100_000, "body"),
    "nested-objects": (b'{"env": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001, "body"),
    "nan": (b'{"command": ["x"], "idle_timeout": NaN}', "body"),
    "infinity": (b'{"command": ["x"], "idle_timeout": Infinity}', "body"),
    "overflowing-float": (b'{"command": ["x"], "idle_timeout": 1e999}', "body"),
    "huge-int": (b'{"command": ["x"], "max_queue": 1' + b"0" * 40 + b"}", "max_queue"),
    "huge-size-string": (b'{"command": ["x"], "max_body": "' + b"9" * 400 + b'GiB"}', "max_body"),
    "huge-size-number": (b'{"command": ["x"], "max_body": 1e300}', "max_body"),
    "huge-memory": (
        b'{"command": ["x"], "limits": {"memory": "99999999999999999999999GiB"}}',
        "limits.memory",
    ),
    "huge-pids": (b'{"command": ["x"], "limits": {"pids": 99999999999999999999}}', "limits.pids"),
    "null-body": (b"null", "body"),
    "array-body": (b"[]", "body"),
    "string-body": (b'"command"', "body"),
    "whitespace-body": (b"  \n ", "body"),
    "trailing-garbage": (b'{"command": ["x"]} {}', "body"),
    "null-env": (b'{"command": ["x"], "env": null}', "env"),
    "null-command": (b'{"command": null}', "command"),
    "null-static": (b'{"runtime": "static", "static": null}', "static"),
    "list-limits": (b'{"command": ["x"], "limits": []}', "limits"),
    "string-command": (b'{"command": "python3 app.py"}', "command"),
    "int-in-command": (b'{"command": ["x", 1]}', "command.1"),
    "int-env-value": (b'{"command": ["x"], "env": {"A": 1}}', "env.A"),
    "bool-idle-timeout": (b'{"command": ["x"], "idle_timeout": true}', "idle_timeout"),
    "string-port": (b'{"command": ["x"], "port": "80"}', "port"),
    "string-volume": (b'{"command": ["x"], "volume": "yes"}', "volume"),
    "int-runtime": (b'{"runtime": 1}', "runtime"),
    "unknown-field": (b'{"command": ["x"], "replicas": 3}', "replicas"),
    "unknown-limit": (b'{"command": ["x"], "limits": {"disk": "1GiB"}}', "limits.disk"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_bad_json_is_400_naming_the_field(srv: UploadHarness, case: str) -> None:
    body, field = BAD_JSON[case]
    before = srv.state()
    status, answer = put_json(srv, b"/v1/apps/site", body)
    assert (status, answer["error"]["field"]) == (400, field), answer
    status, answer = put_json(srv, b"/v1/apps/fresh", body)
    assert (status, answer["error"]["field"]) == (400, field), answer
    assert srv.state() == before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"env": {"A": "1"}, "env": {}}', "env"),
        (b'{"env": {"A": "1", "A": "2"}}', "env.A"),
        (b'{"env": null}', "env"),
        (b'{"env": []}', "env"),
        (b'{"bundle": "' + b"0" * 64 + b'"}', "bundle"),
        (b"[]", "body"),
        (b'{"env": {"A": "1"}}x', "body"),
    ],
)
def test_bad_branch_json_is_400_naming_the_field(
    srv: UploadHarness, body: bytes, field: str
) -> None:
    before = srv.state()
    for branch in (b"keep", b"other"):
        status, answer = put_json(srv, b"/v1/apps/site/branches/" + branch, body)
        assert (status, answer["error"]["field"]) == (400, field), answer
    assert srv.state() == before


def test_json_body_over_the_limit_while_streaming(srv: UploadHarness) -> None:
    """A chunked JSON body has no length to refuse up front: counted as it arrives."""
    before = srv.state()
    piece = b" " * 65536
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(MAX_BODY // 65536 + 2))
    raw = srv.raw(
        b"PUT /v1/apps/site HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
        + auth(srv)
        + b"\r\n"
        + chunks
        + b"0\r\n\r\n"
    )
    status, _, body = split(raw)
    assert (status, error_field(body)) == (413, "body")
    assert srv.state() == before


def test_connection_limit_answers_503_and_recovers(tmp_path: Path) -> None:
    """Past MAX_CONNECTIONS open authenticated connections a new one gets a 503 JSON with
    Retry-After and is closed; once they are gone, connections are served again. (Idle
    connections that never sent the token do not count: tests/test_admin_limits.py.)"""
    h = AdminHarness(tmp_path / "data", keepalive_timeout=60.0)
    h.start()
    health = b"GET /v1/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    idle: list[socket.socket] = []
    try:
        for _ in range(MAX_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", h.port), timeout=10)
            idle.append(sock)
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nhost: x\r\n" + auth(h) + b"\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        # The server counts a connection once it has accepted it: poll until it has all.
        raw = wait_until(
            lambda: (r := h.raw(health)).startswith(b"HTTP/1.1 503") and r,
            what="a connection past the limit to be refused",
        )
        _, headers, body = split(raw)
        assert headers["content-type"] == "application/json"
        assert headers["retry-after"] == "1"
        assert "too many" in orjson.loads(body)["error"]["message"]
    finally:
        for sock in idle:
            sock.close()
    try:
        wait_until(lambda: h.raw(health).startswith(b"HTTP/1.1 200"), what="recovery")
    finally:
        h.stop()


def test_content_length_with_transfer_encoding_is_refused(srv: UploadHarness) -> None:
    """Both framings at once is the request-smuggling shape: a proxy in front may use the
    other one. Refused before anything is read, and the connection is closed."""
    before = srv.state()
    body = orjson.dumps({**SPEC, "max_queue": 3})
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    raw = srv.raw(
        b"PUT /v1/apps/site HTTP/1.1\r\nhost: x\r\n"
        + auth(srv)
        + b"content-length: %d\r\ntransfer-encoding: chunked\r\n\r\n" % len(chunked)
        + chunked
        + b"GET /v1/health HTTP/1.1\r\nhost: x\r\n\r\n"
    )
    status, headers, answer = split(raw)
    assert (status, error_field(answer)) == (400, "request")
    assert headers["connection"] == "close"
    assert raw.count(b"HTTP/1.1 ") == 1
    assert srv.state() == before


@pytest.mark.parametrize("name", [b"x-content-sha256", b"digest", b"content-type"])
def test_an_upload_header_given_twice_is_refused(srv: UploadHarness, name: bytes) -> None:
    """Which of two digests (or content types) counts would be ambiguous: neither does."""
    data = targz(M(), F("app.py", b"twice"))
    digest = hashlib.sha256(data).digest()
    value = {
        b"x-content-sha256": digest.hex().encode(),
        b"digest": b"sha-256=" + base64.b64encode(digest),
        b"content-type": b"application/gzip",
    }[name]
    before = srv.state()
    raw = srv.raw(
        UPLOAD
        + b"connection: close\r\n"
        + auth(srv)
        + name
        + b": "
        + value
        + b"\r\n"
        + name
        + b": "
        + value
        + b"\r\n"
        + b"content-length: %d\r\n\r\n" % len(data)
        + data
    )
    status, _, body = split(raw)
    assert (status, error_field(body)) == (400, name.decode()), body
    assert "more than once" in orjson.loads(body)["error"]["message"]
    assert srv.state() == before
