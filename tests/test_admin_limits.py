"""What a client can hold on the admin API, over real sockets: a head has `header_timeout` from
the accept; a body must average `admin_min_upload_rate` once `admin_upload_grace` has passed
(else 408, closed, nothing left behind); a connection that never sent the token is closed
after its answer and gives its slot up to a newcomer when all are taken; a keep-alive
connection serves at most MAX_REQUESTS_PER_CONNECTION requests; a log stream whose reader
stops reading is cut off. Every deadline is set small here, so no test waits long."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import gateway.admin
import gateway.bundles
from tests.test_admin import SPEC, AdminHarness, _connection_count, _read_all
from tests.test_admin_input import UploadHarness, auth, error_field, split
from tests.test_bundles import F, M, targz
from tests.test_deploy import wait_until

HEAD = 1.0  # header_timeout of the servers under test


def harness(tmp_path: Path, **cfg: Any) -> UploadHarness:
    """An admin server with the deploy routes and app `site`; `cfg` overrides the config."""
    settings: dict[str, Any] = {"header_timeout": HEAD, "body_timeout": 5.0, **cfg}
    h = UploadHarness(tmp_path / "data", **settings)
    h.start()
    with h.client() as client:
        client.call("PUT", "/v1/apps/site", SPEC)
    return h


@pytest.fixture
def paced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[UploadHarness]:
    """A minimum of 64 KiB/s after 0.5 s, and a body_timeout (5 s) the trickles never reach;
    fails the test if anything was logged at ERROR."""
    caplog.set_level(logging.WARNING)
    h = harness(tmp_path, admin_min_upload_rate=64 * 1024, admin_upload_grace=0.5)
    try:
        yield h
        # Let connections still lingering end before the loop goes (else they are collected
        # with the closed loop and warn).
        wait_until(lambda: h.run(_connection_count(h)) == 0, what="every connection to end")
    finally:
        h.stop()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def trickle(sock: socket.socket, data: bytes, piece: int, every: float, limit: float) -> bytes:
    """Send `data` `piece` bytes at a time every `every` seconds until the server answers (or
    `limit` seconds pass); return what it answered, read until it closed."""
    start = time.monotonic()
    sock.settimeout(every)
    answer = b""
    for offset in range(0, len(data), piece):
        try:
            sock.sendall(data[offset : offset + piece])
            answer = sock.recv(65536)
        except TimeoutError:
            pass
        except OSError:
            break
        if answer or time.monotonic() - start > limit:
            break
    sock.settimeout(5)
    return answer + _read_all(sock)


# -- bodies --------------------------------------------------------------------------------------
def test_a_trickled_upload_is_408_and_leaves_nothing(paced: UploadHarness) -> None:
    """100 bytes every 50 ms (2 KB/s): each piece well within body_timeout, so only the
    minimum rate can end it, soon after the grace period; the spooled file is removed."""
    before = paced.state()
    data = targz(M(), F("app.py", os.urandom(200_000)))
    with paced.connect() as sock:
        sock.sendall(
            b"PUT /v1/apps/site/branches/keep/bundle HTTP/1.1\r\nhost: x\r\n"
            + auth(paced)
            + b"content-length: %d\r\n\r\n" % len(data)
        )
        start = time.monotonic()
        raw = trickle(sock, data, 100, 0.05, limit=10)
        elapsed = time.monotonic() - start
    status, headers, body = split(raw)
    assert (status, error_field(body)) == (408, "body"), raw
    message = orjson.loads(body)["error"]["message"]
    assert "too slow" in message and "admin_min_upload_rate" in message, message
    assert headers["connection"] == "close"
    assert 0.5 <= elapsed < 3
    wait_until(lambda: paced.state() == before, what="the trickled upload to be removed")
    assert not any((paced.data_dir / "bundles" / "tmp").iterdir())


def test_a_trickled_json_body_is_408(paced: UploadHarness) -> None:
    """The same minimum for bodies read whole: a chunked one, a byte per chunk."""
    before = paced.state()
    body = orjson.dumps({**SPEC, "env": {"A": "x" * 2000}})
    chunked = b"".join(b"1\r\n%s\r\n" % body[i : i + 1] for i in range(len(body)))
    with paced.connect() as sock:
        sock.sendall(
            b"PUT /v1/apps/site HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
            + auth(paced)
            + b"\r\n"
        )
        raw = trickle(sock, chunked, 12, 0.05, limit=10)
    status, _, answer = split(raw)
    assert (status, error_field(answer)) == (408, "body"), raw
    assert "admin_min_upload_rate" in orjson.loads(answer)["error"]["message"]
    assert paced.state() == before


def test_an_upload_faster_than_the_minimum_is_deployed(paced: UploadHarness) -> None:
    """Paced at about 4x the minimum for longer than the grace period: accepted."""
    data = targz(M(), F("app.py", os.urandom(300_000)), compresslevel=0)
    with paced.connect() as sock:
        sock.sendall(
            b"PUT /v1/apps/site/branches/steady/bundle HTTP/1.1\r\nhost: x\r\n"
            + auth(paced)
            + b"connection: close\r\n"
            + b"content-length: %d\r\n\r\n" % len(data)
        )
        start = time.monotonic()
        for offset in range(0, len(data), 16 * 1024):
            sock.sendall(data[offset : offset + 16 * 1024])
            time.sleep(0.06)  # ~270 KB/s
        assert time.monotonic() - start > 1.0  # past the grace period
        raw = _read_all(sock)
    assert split(raw)[0] == 201, raw


def test_time_the_server_spends_does_not_count_against_the_client(
    paced: UploadHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only waits for the client's bytes count: a server slow to take the pieces (here, a
    spool that takes 0.3 s to write each 16 KiB: about 50 KB/s in all, under the minimum)
    does not make a fast client too slow."""
    original = gateway.bundles._write

    def slow_write(*args: Any) -> None:
        time.sleep(0.3)
        original(*args)

    monkeypatch.setattr(gateway.bundles, "_write", slow_write)
    monkeypatch.setattr(gateway.bundles, "SPOOL_CHUNK", 16 * 1024)
    data = targz(M(), F("app.py", os.urandom(100_000)), compresslevel=0)
    start = time.monotonic()
    with paced.client() as client:
        status, body = client.upload(
            "/v1/apps/site/branches/slowdisk/bundle", io.BytesIO(data), len(data)
        )
    assert status == 201, body
    assert time.monotonic() - start > 1.5  # the spool was that slow


# -- heads and connections -----------------------------------------------------------------------
def test_the_first_head_has_header_timeout_from_the_accept(paced: UploadHarness) -> None:
    """A client that waits before starting its head does not get a fresh header_timeout."""
    with paced.connect() as sock:
        start = time.monotonic()
        time.sleep(HEAD * 0.7)
        head = b"GET /v1/apps HTTP/1.1\r\nhost: x\r\n" + auth(paced) + b"x-slow: " + b"a" * 100
        raw = trickle(sock, head, 1, 0.05, limit=HEAD * 5)
        elapsed = time.monotonic() - start
    status, _, body = split(raw)
    assert status == 408
    assert orjson.loads(body)["error"]["message"] == "timed out reading the request head"
    assert elapsed < HEAD + 0.6


def test_an_idle_connection_is_closed_after_header_timeout(paced: UploadHarness) -> None:
    with paced.connect() as sock:
        start = time.monotonic()
        assert _read_all(sock) == b""
        assert time.monotonic() - start < HEAD + 0.6


@pytest.mark.parametrize(
    "request_line",
    [b"GET /v1/apps HTTP/1.1", b"GET /v1/health HTTP/1.1", b"GET /v1/nothing HTTP/1.1"],
)
def test_a_connection_without_the_token_is_closed_after_its_answer(
    paced: UploadHarness, request_line: bytes
) -> None:
    """401, 404-as-401 or even the open health check: answered, then closed, so a client
    without the token cannot keep a connection (and its slot) with one request after
    another. With the token, the same requests keep it open."""
    anonymous = request_line + b"\r\nhost: x\r\n\r\n"
    with paced.connect() as sock:
        sock.sendall(anonymous * 2)
        raw = _read_all(sock)
    assert raw.count(b"HTTP/1.1 ") == 1, raw
    assert split(raw)[1]["connection"] == "close"
    with paced.connect() as sock:
        sock.sendall((request_line + b"\r\nhost: x\r\n" + auth(paced) + b"\r\n") * 2)
        sock.settimeout(0.5)
        raw = _read_all(sock)
    assert raw.count(b"HTTP/1.1 ") == 2, raw
    assert b"connection: close" not in raw


def test_anonymous_connections_give_their_slots_to_newcomers(tmp_path: Path) -> None:
    """All slots taken by connections that never sent the token: a newcomer is served, and
    the oldest of them is closed. Taken by authenticated connections: 503 with Retry-After,
    until one goes."""
    h = harness(tmp_path, header_timeout=30.0, keepalive_timeout=30.0, admin_max_connections=4)
    try:
        # The setup's own (authenticated) connection must be gone first: still counted when the
        # fourth anonymous one arrives, it would make that one evict the first.
        wait_until(lambda: h.run(_connection_count(h)) == 0, what="the setup's connection to end")
        anonymous = [h.connect(timeout=5) for _ in range(4)]
        wait_until(lambda: h.run(_admin_slots(h)) == 4, what="the 4 connections to be admitted")
        with h.client() as client:
            assert client.call("GET", "/v1/apps")["apps"]
        anonymous[0].settimeout(2)
        assert anonymous[0].recv(100) == b""  # the oldest gave its slot up (a timeout if not)
        wait_until(lambda: h.run(_admin_slots(h)) == 3, what="the newcomer to go")
        for sock in anonymous:
            sock.close()
        authenticated = []
        for _ in range(4):
            sock = h.connect(timeout=5)
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nhost: x\r\n" + auth(h) + b"\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            authenticated.append(sock)
        wait_until(lambda: h.run(_admin_slots(h)) == 4, what="the anonymous ones to go")
        raw = h.raw(b"GET /v1/apps HTTP/1.1\r\nhost: x\r\n" + auth(h) + b"\r\n")
        status, headers, body = split(raw)
        assert (status, headers["retry-after"]) == (503, "1"), raw
        assert "too many admin connections" in orjson.loads(body)["error"]["message"]
        authenticated.pop().close()
        again = b"GET /v1/apps HTTP/1.1\r\nhost: x\r\nconnection: close\r\n" + auth(h) + b"\r\n"
        wait_until(lambda: h.raw(again).startswith(b"HTTP/1.1 200 "), what="a free slot")
        for sock in authenticated:
            sock.close()
        wait_until(lambda: h.run(_connection_count(h)) == 0, what="every connection to end")
    finally:
        h.stop()


async def _admin_slots(h: UploadHarness) -> int:
    """Connections holding a slot of the server under test (read off the AdminServer that
    a connection task belongs to), or 0 if it has none open."""
    for task in asyncio.all_tasks():
        coro: Any = task.get_coro()
        if getattr(coro, "__qualname__", "") == "AdminServer.handle_connection":
            admin: gateway.admin.AdminServer = coro.cr_frame.f_locals["self"]
            return admin.connections
    return 0


def test_a_keepalive_connection_serves_a_bounded_number_of_requests(
    paced: UploadHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway.admin, "MAX_REQUESTS_PER_CONNECTION", 3)
    request = b"GET /v1/apps HTTP/1.1\r\nhost: x\r\n" + auth(paced) + b"\r\n"
    with paced.connect() as sock:
        sock.sendall(request * 5)
        raw = _read_all(sock)
    assert raw.count(b"HTTP/1.1 200 ") == 3, raw
    last = raw[raw.rindex(b"HTTP/1.1 ") :]
    assert split(last)[1]["connection"] == "close"


# -- logs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tail", [b"%C2%B2", b"0" * 5000, b"1e3", b"-1", b""])
def test_odd_tail_values_are_400_naming_tail(paced: UploadHarness, tail: bytes) -> None:
    """`²` passes str.isdigit() and 5000 digits pass it too; int() refused both (a 500)."""
    raw = paced.raw(
        b"GET /v1/apps/site/logs?tail="
        + tail
        + b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
        + auth(paced)
        + b"\r\n"
    )
    status, _, body = split(raw)
    assert (status, error_field(body)) == (400, "tail"), raw


def test_a_follow_whose_reader_stops_reading_is_cut_off(tmp_path: Path) -> None:
    """The log keeps growing and the client reads nothing: the stream waits for it (nothing
    piles up in the server) and is closed after body_timeout, not kept forever."""
    h = AdminHarness(tmp_path, body_timeout=1.0)
    h.start()
    stop = threading.Event()
    try:
        with h.client() as client:
            client.call("PUT", "/v1/apps/demo", SPEC)
        path = h.data_dir / "logs" / "demo" / "main" / "instance.log"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")

        def grow() -> None:  # ~6 MB/s, up to 64 MiB
            line = b"x" * 1023 + b"\n"
            with open(path, "ab") as fh:
                while not stop.is_set() and fh.tell() < 64 * 1024**2:
                    fh.write(line * 64)
                    fh.flush()
                    time.sleep(0.01)

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", h.port))
        with sock:
            follow = b"GET /v1/apps/demo/logs?follow=1&tail=0 HTTP/1.1\r\nhost: x\r\n"
            sock.sendall(follow + auth(h) + b"\r\n")
            assert sock.recv(1024).startswith(b"HTTP/1.1 200 ")
            (server_side,) = h.run(_server_sockets(h, sock))
            threading.Thread(target=grow, daemon=True).start()
            start = time.monotonic()
            wait_until(
                lambda: h.run(_connection_count(h)) == 0,
                timeout=8,
                what="the stalled follow to be closed",
            )
            elapsed = time.monotonic() - start
            # The socket is closed too, not left open to flush what was buffered to a reader
            # that never reads.
            wait_until(lambda: server_side.fileno() == -1, timeout=3, what="the socket to close")
        assert elapsed < 6
        assert path.stat().st_size < 64 * 1024**2  # it was still growing when cut off
    finally:
        stop.set()
        h.stop()


def test_connections_probe_a_vanished_peer(paced: UploadHarness) -> None:
    """A follow of a quiet log sends nothing, so only TCP keep-alive probes can tell that the
    peer is gone without a FIN (a dropped link): they are on for every admin connection."""
    with paced.connect() as sock:
        wait_until(lambda: paced.run(_server_sockets(paced, sock)), what="the connection")
        (server_side,) = paced.run(_server_sockets(paced, sock))
        assert server_side.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        options = [socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT]
        got = tuple(server_side.getsockopt(socket.IPPROTO_TCP, opt) for opt in options)
        assert got == gateway.admin._TCP_KEEPALIVE
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0  # ours: untouched


async def _server_sockets(h: AdminHarness, client: socket.socket) -> list[Any]:
    """The server-side socket of `client`'s connection, if it is being served (a list of
    it, or an empty one)."""
    out = []
    for task in asyncio.all_tasks():
        coro: Any = task.get_coro()
        if getattr(coro, "__qualname__", "") == "AdminServer.handle_connection":
            server_side = coro.cr_frame.f_locals["writer"].get_extra_info("socket")
            with contextlib.suppress(OSError):
                if server_side.getpeername() == client.getsockname():
                    out.append(server_side)
    return out


def test_a_reader_slower_than_the_minimum_is_cut_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 10 MiB log tail read at ~20 KB/s, under a 256 KiB/s minimum: closed once it falls
    below (body_timeout, 5 s, is never reached: the reader never stops). The server-side
    send buffer is made small, as on a real network, so the kernel does not soak up MiBs."""
    caplog.set_level(logging.INFO, logger="dorm.admin")
    h = AdminHarness(
        tmp_path, body_timeout=5.0, admin_min_upload_rate=256 * 1024, admin_upload_grace=0.5
    )
    h.start()
    try:
        with h.client() as client:
            client.call("PUT", "/v1/apps/demo", SPEC)
        path = h.data_dir / "logs" / "demo" / "main" / "instance.log"
        path.parent.mkdir(parents=True)
        path.write_bytes((b"x" * 1023 + b"\n") * 10_000)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", h.port))
        with sock:
            wait_until(lambda: h.run(_server_sockets(h, sock)), what="the connection")
            (server_side,) = h.run(_server_sockets(h, sock))
            server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            sock.sendall(b"GET /v1/apps/demo/logs?tail=10000 HTTP/1.1\r\nhost: x\r\n" + auth(h))
            sock.sendall(b"\r\n")
            start, got = time.monotonic(), 0
            while time.monotonic() - start < 15:
                try:
                    data = sock.recv(1024)
                except ConnectionResetError:
                    break
                if not data:
                    break
                got += len(data)
                time.sleep(0.05)
            elapsed = time.monotonic() - start
        # Cut off within ~1 s of the grace period, plus 1 s for the close to flush (it
        # cannot: what was buffered is dropped).
        assert elapsed < 4, (elapsed, got)
        assert got < 1024**2
        assert any("too slow" in r.getMessage() for r in caplog.records)
        wait_until(lambda: h.run(_connection_count(h)) == 0, what="the connection to end")
    finally:
        h.stop()
