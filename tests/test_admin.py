"""The admin API over real sockets: an in-process server on 127.0.0.1, a real Registry on disk,
and a fake of our own InstanceManager protocol that records what it was asked to do."""

from __future__ import annotations

import asyncio
import hmac
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway import auth
from gateway.admin import MAX_BODY, Request, Response, Route, json_response, start_admin_server
from gateway.client import AdminClient, AdminError
from gateway.config import GatewayConfig
from gateway.logs import RotatingLog, log_path
from gateway.registry import Registry

SPEC = {"command": ["python3", "app.py"], "env": {"A": "1"}, "idle_timeout": "5m"}


class FakeInstances:
    """A stand-in for gateway.instances.InstanceManager: records calls, serves a snapshot."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.items: list[dict[str, Any]] = []

    def snapshot(self) -> list[dict[str, Any]]:
        return [dict(item) for item in self.items]

    async def stop(self, app: str, branch: str | None) -> int:
        self.calls.append(("stop", app, branch))
        return sum(
            1
            for item in self.items
            if item["app"] == app and (branch is None or item["branch"] == branch)
        )

    async def app_changed(self, app: str) -> None:
        self.calls.append(("changed", app))

    async def app_removed(self, app: str) -> None:
        self.calls.append(("removed", app))

    async def branch_changed(self, app: str, branch: str) -> None:
        self.calls.append(("branch changed", app, branch))

    async def redeploy(self, app: str, branch: str) -> None:
        self.calls.append(("redeploy", app, branch))

    def activity(self) -> list[tuple[str, str, float]]:
        return []

    def busy(self, app: str, branch: str) -> bool:
        return False


class AdminHarness:
    """The admin server on its own event loop thread, so tests can use blocking clients."""

    def __init__(self, data_dir: Path, extra_routes: tuple[Route, ...] = (), **cfg: Any) -> None:
        self.data_dir = data_dir
        self.cfg = GatewayConfig(admin_listen="127.0.0.1:0", data_dir=str(data_dir), **cfg)
        self.token = "tok-" + secrets.token_urlsafe(16)
        self.instances = FakeInstances()
        self.extra_routes = extra_routes
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> AdminHarness:
        self.thread.start()
        self.run(self._start())
        return self

    async def _start(self) -> None:
        self.registry = Registry(self.data_dir / "dorm.db")
        await self.registry.open()
        self.server = await start_admin_server(
            self.cfg, self.registry, self.instances, self.token, extra_routes=self.extra_routes
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()
        await self.registry.close()

    def stop(self) -> None:
        self.run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, token: str | None = "") -> AdminClient:
        return AdminClient(self.url, self.token if token == "" else token, timeout=5)

    def raw(self, data: bytes, *, timeout: float = 5.0) -> bytes:
        """Send raw bytes, read until the server closes (or the timeout), return what came."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(data)
            return _read_all(sock)


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            return out
        if not chunk:
            return out
        out += chunk


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[AdminHarness]:
    harness = AdminHarness(tmp_path, header_timeout=1.0, body_timeout=1.0).start()
    try:
        yield harness
    finally:
        harness.stop()


def error_of(answer: Any) -> tuple[Any, str]:
    err = answer["error"]
    return err["field"], err["message"]


# -- auth ------------------------------------------------------------------------------------------
def test_health_needs_no_token(admin: AdminHarness) -> None:
    with admin.client(token=None) as client:
        assert client.request("GET", "/v1/health") == (200, {"status": "ok"})


@pytest.mark.parametrize("token", [None, "wrong", "tok-"])
def test_missing_or_wrong_token_is_401(admin: AdminHarness, token: str | None) -> None:
    for path in ("/v1/apps", "/v1/instances", "/v1/no/such/route"):
        with admin.client(token=token) as client:
            status, answer = client.request("GET", path)
        assert status == 401
        assert error_of(answer)[0] == "authorization"
    raw = admin.raw(b"GET /v1/apps HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert b'www-authenticate: bearer realm="dorm"' in raw.lower()


def test_right_token_and_scheme_case(admin: AdminHarness) -> None:
    with admin.client() as client:
        assert client.request("GET", "/v1/apps") == (200, {"apps": []})
    raw = admin.raw(
        b"GET /v1/apps HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
        b"authorization: bearer " + admin.token.encode() + b"\r\n\r\n"
    )
    assert raw.startswith(b"HTTP/1.1 200")


def test_bearer_check_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert auth.check_bearer(b"Bearer s3cret", "s3cret")
    assert not auth.check_bearer(b"Bearer s3cre", "s3cret")
    assert not auth.check_bearer(b"Basic s3cret", "s3cret")
    assert not auth.check_bearer(None, "s3cret")
    assert not auth.check_bearer(b"Bearer ", "s3cret")
    assert len(seen) == 3  # every credential comparison went through hmac.compare_digest


def test_unauthenticated_body_is_not_read(admin: AdminHarness) -> None:
    big = b"x" * (MAX_BODY // 2)
    raw = admin.raw(
        b"PUT /v1/apps/demo HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(big) + big
    )
    assert raw.startswith(b"HTTP/1.1 401")
    assert b"connection: close" in raw.lower()


# -- apps ------------------------------------------------------------------------------------------
def test_app_crud(admin: AdminHarness) -> None:
    with admin.client() as client:
        status, answer = client.request("PUT", "/v1/apps/demo", SPEC)
        assert status == 201
        assert answer["command"] == ["python3", "app.py"]
        assert answer["idle_timeout"] == 300.0
        status, answer = client.request("PUT", "/v1/apps/demo", {**SPEC, "max_queue": 7})
        assert (status, answer["max_queue"]) == (200, 7)
        # The spec as shown can be sent back unchanged.
        status, shown = client.request("GET", "/v1/apps/demo")
        assert status == 200
        assert client.request("PUT", "/v1/apps/demo", shown) == (200, shown)
        status, listing = client.request("GET", "/v1/apps")
        assert [a["name"] for a in listing["apps"]] == ["demo"]
        assert client.request("DELETE", "/v1/apps/demo") == (200, {"deleted": "demo"})
        status, answer = client.request("DELETE", "/v1/apps/demo")
        assert (status, error_of(answer)[0]) == (404, "app")
        status, answer = client.request("GET", "/v1/apps/demo")
        assert status == 404
    assert admin.instances.calls == [
        ("changed", "demo"),
        ("changed", "demo"),
        ("changed", "demo"),
        ("removed", "demo"),
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "body"),
        (b"", "body"),
        (b"[1, 2]", "body"),
        (b'{"command": ["x"], "colour": "red"}', "colour"),
        (b'{"runtime": "command"}', "command"),
        (b'{"command": "python3 app.py"}', "command"),
        (b'{"command": ["x"], "idle_timeout": "soon"}', "idle_timeout"),
        (b'{"command": ["x"], "max_body": "lots"}', "max_body"),
        (b'{"command": ["x"], "max_queue": -1}', "max_queue"),
        (b'{"command": ["x"], "env": {"DORM_SOCKET": "/x"}}', "env.DORM_SOCKET"),
        (b'{"command": ["x"], "limits": {"memory": "1KiB"}}', "limits.memory"),
        (b'{"command": ["x"], "limits": {"gpu": 1}}', "limits.gpu"),
        (b'{"command": ["x"], "health": "nope"}', "health"),
        (b'{"command": ["x"], "name": "other"}', "name"),
    ],
)
def test_bad_app_spec_names_the_field(admin: AdminHarness, body: bytes, field: str) -> None:
    raw = admin.raw(
        b"PUT /v1/apps/demo HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
        b"authorization: Bearer %s\r\ncontent-length: %d\r\n\r\n%s"
        % (admin.token.encode(), len(body), body)
    )
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), raw
    assert b"application/json" in head
    assert error_of(orjson.loads(payload))[0] == field
    assert admin.registry.get_app("demo") is None
    assert admin.instances.calls == []


@pytest.mark.parametrize(
    ("method", "path", "field"),
    [
        ("PUT", "/v1/apps/Bad_Name", "app"),
        ("PUT", "/v1/apps/a--b", "app"),
        ("GET", "/v1/apps/demo/branches/-x", "branch"),
        ("GET", "/v1/apps/demo/logs?tail=lots", "tail"),
        ("GET", "/v1/apps/demo/logs?tail=10001", "tail"),
        ("GET", "/v1/apps/demo/logs?follow=maybe", "follow"),
        ("GET", "/v1/apps/demo/logs?branch=UP", "branch"),
        ("GET", "/v1/apps/demo/logs?colour=red", "colour"),
        ("GET", "/v1/apps/demo/logs?tail=1&tail=2", "tail"),
        ("GET", "/v1/instances?app=No", "app"),
    ],
)
def test_bad_names_and_queries_name_the_field(
    admin: AdminHarness, method: str, path: str, field: str
) -> None:
    with admin.client() as client:
        client.call("PUT", "/v1/apps/demo", SPEC)
        status, answer = client.request(method, path, SPEC if method == "PUT" else None)
    assert status == 400
    assert error_of(answer)[0] == field


def test_unknown_route_and_method(admin: AdminHarness) -> None:
    with admin.client() as client:
        status, answer = client.request("GET", "/v2/apps")
        assert (status, error_of(answer)[0]) == (404, "path")
        status, answer = client.request("POST", "/v1/apps")
        assert (status, error_of(answer)[0]) == (405, "method")
        # Keep-alive survives error answers.
        assert client.request("GET", "/v1/health")[0] == 200
    raw = admin.raw(
        b"PATCH /v1/apps/x HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
        b"authorization: Bearer " + admin.token.encode() + b"\r\n\r\n"
    )
    assert raw.startswith(b"HTTP/1.1 405")
    assert b"allow: get, put, delete" in raw.lower()


def test_oversized_body_is_413(admin: AdminHarness) -> None:
    auth_line = b"authorization: Bearer " + admin.token.encode() + b"\r\n"
    raw = admin.raw(
        b"PUT /v1/apps/demo HTTP/1.1\r\nhost: x\r\n"
        + auth_line
        + b"content-length: %d\r\n\r\n" % (MAX_BODY + 1)
    )
    assert raw.startswith(b"HTTP/1.1 413")
    assert error_of(orjson.loads(raw.partition(b"\r\n\r\n")[2]))[0] == "body"
    # Chunked bodies are counted as they arrive.
    chunk = b"x" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(17)) + b"0\r\n\r\n"
    raw = admin.raw(
        b"PUT /v1/apps/demo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
        + auth_line
        + b"\r\n"
        + body
    )
    assert raw.startswith(b"HTTP/1.1 413")


def test_oversized_head_is_431(admin: AdminHarness) -> None:
    raw = admin.raw(b"GET /v1/health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 40000 + b"\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 431")


def test_malformed_request_is_400(admin: AdminHarness) -> None:
    raw = admin.raw(b"GET /v1/health HTTP/1.1\r\nhost: x\r\nbad header\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400")
    assert b'"error"' in raw


def test_slow_client_times_out(admin: AdminHarness) -> None:
    with socket.create_connection(("127.0.0.1", admin.port), timeout=5) as sock:
        sock.sendall(b"GET /v1/health HTTP/1.1\r\n")
        start = time.monotonic()
        raw = _read_all(sock)
        assert time.monotonic() - start < 4
    assert raw.startswith(b"HTTP/1.1 408")
    # A slow body also times out.
    with socket.create_connection(("127.0.0.1", admin.port), timeout=5) as sock:
        sock.sendall(
            b"PUT /v1/apps/demo HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n"
            b"authorization: Bearer " + admin.token.encode() + b"\r\n\r\n{"
        )
        raw = _read_all(sock)
    assert raw.startswith(b"HTTP/1.1 408")
    # An idle connection is closed quietly.
    with socket.create_connection(("127.0.0.1", admin.port), timeout=5) as sock:
        assert _read_all(sock) == b""


def test_keepalive_and_pipelining(admin: AdminHarness) -> None:
    """With the token: only an authenticated request keeps its connection open."""
    token = b"authorization: Bearer " + admin.token.encode() + b"\r\n"
    req = b"GET /v1/health HTTP/1.1\r\nhost: x\r\n" + token + b"\r\n"
    with socket.create_connection(("127.0.0.1", admin.port), timeout=5) as sock:
        sock.sendall(req * 3)
        data = b""
        deadline = time.monotonic() + 5
        while data.count(b"HTTP/1.1 200") < 3 and time.monotonic() < deadline:
            data += sock.recv(65536)
    assert data.count(b"HTTP/1.1 200") == 3


def test_expect_100_continue(admin: AdminHarness) -> None:
    body = orjson.dumps(SPEC)
    with socket.create_connection(("127.0.0.1", admin.port), timeout=5) as sock:
        sock.sendall(
            b"PUT /v1/apps/demo HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
            b"authorization: Bearer %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (admin.token.encode(), len(body))
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 100")
        sock.sendall(body)
        assert _read_all(sock).startswith(b"HTTP/1.1 201")


# -- branches, instances, stop --------------------------------------------------------------------
def test_branches(admin: AdminHarness) -> None:
    with admin.client() as client:
        status, answer = client.request("PUT", "/v1/apps/demo/branches/feat", {"env": {"X": "1"}})
        assert (status, error_of(answer)[0]) == (404, "app")
        client.call("PUT", "/v1/apps/demo", SPEC)
        assert client.call("GET", "/v1/apps/demo/branches") == {
            "branches": [{"app": "demo", "name": "main", "env": {}}]
        }
        status, answer = client.request("PUT", "/v1/apps/demo/branches/feat", {"env": {"X": "1"}})
        assert (status, answer["env"]) == (201, {"X": "1"})
        status, answer = client.request("PUT", "/v1/apps/demo/branches/feat")
        assert (status, answer["env"]) == (200, {})
        status, answer = client.request("PUT", "/v1/apps/demo/branches/feat", {"envs": {}})
        assert (status, error_of(answer)[0]) == (400, "envs")
        names = [b["name"] for b in client.call("GET", "/v1/apps/demo/branches")["branches"]]
        assert names == ["feat", "main"]
        assert client.call("GET", "/v1/apps/demo/branches/feat")["name"] == "feat"
        assert client.call("DELETE", "/v1/apps/demo/branches/feat")["deleted"] == "demo/feat"
        status, answer = client.request("DELETE", "/v1/apps/demo/branches/feat")
        assert (status, error_of(answer)[0]) == (404, "branch")
    assert admin.instances.calls.count(("branch changed", "demo", "feat")) == 3


def test_instances_and_stop(admin: AdminHarness) -> None:
    admin.instances.items = [
        {"app": "demo", "branch": "main", "state": "ready", "pid": 10},
        {"app": "demo", "branch": "feat", "state": "starting", "pid": 11},
        {"app": "other", "branch": "main", "state": "cold", "pid": None},
    ]
    with admin.client() as client:
        client.call("PUT", "/v1/apps/demo", SPEC)
        client.call("PUT", "/v1/apps/demo/branches/feat")
        assert len(client.call("GET", "/v1/instances")["instances"]) == 3
        assert len(client.call("GET", "/v1/instances?app=demo")["instances"]) == 2
        assert client.call("POST", "/v1/apps/demo/branches/main/stop") == {"stopped": 1}
        assert client.call("POST", "/v1/apps/demo/stop") == {"stopped": 2}
        status, answer = client.request("POST", "/v1/apps/demo/branches/nope/stop")
        assert (status, error_of(answer)[0]) == (404, "branch")
        status, answer = client.request("POST", "/v1/apps/ghost/stop")
        assert (status, error_of(answer)[0]) == (404, "app")
    assert admin.instances.calls[-2:] == [("stop", "demo", "main"), ("stop", "demo", None)]


def test_restart_keeps_apps_and_branches(tmp_path: Path) -> None:
    first = AdminHarness(tmp_path).start()
    try:
        with first.client() as client:
            client.call("PUT", "/v1/apps/demo", SPEC)
            client.call("PUT", "/v1/apps/demo/branches/feat", {"env": {"X": "1"}})
            before = client.call("GET", "/v1/apps/demo")
    finally:
        first.stop()
    second = AdminHarness(tmp_path).start()
    try:
        with second.client() as client:
            assert client.call("GET", "/v1/apps/demo") == before
            branches = client.call("GET", "/v1/apps/demo/branches")["branches"]
            assert {"app": "demo", "name": "feat", "env": {"X": "1"}} in branches
    finally:
        second.stop()


def test_extra_routes_share_auth_and_errors(tmp_path: Path) -> None:
    async def hello(req: Request) -> Response:
        return json_response(200, {"hello": req.params["app"], "got": req.json()})

    harness = AdminHarness(tmp_path, extra_routes=(Route("POST", "/v1/apps/{app}/hello", hello),))
    harness.start()
    try:
        with harness.client() as client:
            assert client.call("POST", "/v1/apps/demo/hello", {"a": 1}) == {
                "hello": "demo",
                "got": {"a": 1},
            }
            status, answer = client.request("POST", "/v1/apps/BAD/hello", {})
            assert (status, error_of(answer)[0]) == (400, "app")
        with harness.client(token=None) as client:
            assert client.request("POST", "/v1/apps/demo/hello", {})[0] == 401
    finally:
        harness.stop()


def test_handler_crash_is_json_500_without_traceback(tmp_path: Path) -> None:
    async def boom(req: Request) -> Response:
        raise RuntimeError("secret internals")

    harness = AdminHarness(tmp_path, extra_routes=(Route("GET", "/v1/boom", boom),)).start()
    try:
        with harness.client() as client:
            status, answer = client.request("GET", "/v1/boom")
        assert status == 500
        assert "secret" not in answer["error"]["message"]
        assert "Traceback" not in str(answer)
    finally:
        harness.stop()


# -- logs ------------------------------------------------------------------------------------------
def test_logs_tail(admin: AdminHarness) -> None:
    log = RotatingLog(log_path(admin.data_dir, "demo", "main"), max_bytes=100, keep=3)
    for i in range(30):
        log.write(b"line %d\n" % i)
    log.close()
    with admin.client() as client:
        client.call("PUT", "/v1/apps/demo", SPEC)
        assert client.call("GET", "/v1/apps/demo/logs?tail=3") == "line 27\nline 28\nline 29\n"
        assert client.call("GET", "/v1/apps/demo/logs?tail=0") is None
        assert client.call("GET", "/v1/apps/demo/logs?branch=feat") is None
        status, answer = client.request("GET", "/v1/apps/ghost/logs")
        assert (status, error_of(answer)[0]) == (404, "app")


def test_logs_follow_across_rotation(admin: AdminHarness) -> None:
    path = log_path(admin.data_dir, "demo", "feat")
    log = RotatingLog(path, max_bytes=64, keep=5)  # rotations outpace polling, within keep
    log.write(b"old 1\nold 2\n")
    with admin.client() as client:
        client.call("PUT", "/v1/apps/demo", SPEC)
    client = admin.client()
    stream = client.stream("/v1/apps/demo/logs?branch=feat&tail=1&follow=1", idle_timeout=5)
    got = b""
    deadline = time.monotonic() + 10
    expected = b"old 2\n" + b"".join(b"new %02d ..........\n" % i for i in range(12))
    writer_done = threading.Event()

    def write_more() -> None:
        for i in range(12):
            log.write(b"new %02d ..........\n" % i)  # 20 bytes: rotates every 3 lines
            time.sleep(0.02)
        writer_done.set()

    try:
        got = next(stream)  # the tail, sent before anything new is written
        assert got == b"old 2\n"
        threading.Thread(target=write_more, daemon=True).start()
        for chunk in stream:
            got += chunk
            if got == expected or time.monotonic() > deadline or len(got) > len(expected):
                break
    except AdminError:
        pass  # idle timeout: the assertion below shows what arrived
    finally:
        stream.close()  # type: ignore[attr-defined]
    log.close()
    assert writer_done.wait(5)
    assert got == expected
    assert os.path.exists(f"{path}.2")


def test_logs_follow_ends_when_client_leaves(admin: AdminHarness) -> None:
    with admin.client() as client:
        client.call("PUT", "/v1/apps/demo", SPEC)
    with socket.create_connection(("127.0.0.1", admin.port), timeout=5) as sock:
        sock.sendall(
            b"GET /v1/apps/demo/logs?follow=1 HTTP/1.1\r\nhost: x\r\n"
            b"authorization: Bearer " + admin.token.encode() + b"\r\n\r\n"
        )
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200")
        assert b"transfer-encoding: chunked" in head.lower()
    deadline = time.monotonic() + 5
    while admin.run(_connection_count(admin)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert admin.run(_connection_count(admin)) == 0


async def _connection_count(admin: AdminHarness) -> int:
    """Connections the admin server is still serving (one task each)."""
    return sum(
        1
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "") == "AdminServer.handle_connection"
    )


def test_server_close_ends_follow_streams(tmp_path: Path) -> None:
    harness = AdminHarness(tmp_path).start()
    with harness.client() as client:
        client.call("PUT", "/v1/apps/demo", SPEC)
    sock = socket.create_connection(("127.0.0.1", harness.port), timeout=5)
    try:
        sock.sendall(
            b"GET /v1/apps/demo/logs?follow=1 HTTP/1.1\r\nhost: x\r\n"
            b"authorization: Bearer " + harness.token.encode() + b"\r\n\r\n"
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        harness.run(_close_only(harness))
        start = time.monotonic()
        rest = _read_all(sock)
        assert time.monotonic() - start < 3
        assert rest.endswith(b"0\r\n\r\n")  # the chunked stream was ended properly
    finally:
        sock.close()
        harness.stop()


async def _close_only(harness: AdminHarness) -> None:
    harness.server.close()


def test_client_errors_are_one_line(admin: AdminHarness) -> None:
    with admin.client() as client, pytest.raises(AdminError) as info:
        client.call("GET", "/v1/apps/ghost")
    assert str(info.value) == "app: no app named 'ghost' (HTTP 404)"
    assert info.value.status == 404
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    with pytest.raises(AdminError, match="cannot reach the admin API"):
        AdminClient(f"http://127.0.0.1:{free_port}", "x", timeout=2).request("GET", "/v1/health")
    with pytest.raises(AdminError, match="only http"):
        AdminClient("https://127.0.0.1:1", "x")


def test_client_reconnects_after_server_closed_idle_connection(tmp_path: Path) -> None:
    harness = AdminHarness(tmp_path, keepalive_timeout=0.2).start()
    try:
        with harness.client() as client:
            assert client.request("GET", "/v1/health")[0] == 200
            time.sleep(0.6)  # the server closes the idle keep-alive connection
            assert client.request("GET", "/v1/apps")[0] == 200
    finally:
        harness.stop()
