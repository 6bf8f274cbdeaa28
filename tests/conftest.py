"""Shared fixtures: a real `dorm serve` process on loopback ports, with real instance processes.

Nothing here mocks the gateway: tests talk to it over TCP exactly as clients do, and register apps
through its admin API.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import ports

ROOT = Path(__file__).resolve().parent.parent
ECHO_APP = str(ROOT / "tests" / "apps" / "echo.py")


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to test a compiled relay older than its source (gateway/compiled.py): the tests
    would pass or fail for code that is not what the tree says."""
    from gateway import compiled

    if stale := compiled.stale():
        pytest.exit(
            "stale compiled modules: "
            + "; ".join(stale)
            + ". Rebuild with `make test` (or `.venv/bin/pip install -e .`).",
            returncode=2,
        )


# The end of a test app's source (a string a test writes to main.py) that serves its
# `async def handle(reader, writer)` on the instance's socket, as a command app must.
SERVE_ON_DORM_SOCKET = """
async def main():
    server = await asyncio.start_unix_server(handle, os.environ["DORM_SOCKET"])
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


def free_port() -> int:
    """A loopback port reserved for this test process (see tests/ports.py: concurrent test runs
    on one machine are never handed the same one, and no outgoing connection can take it)."""
    return ports.free_port()


def echo_spec(**overrides: Any) -> dict[str, Any]:
    """An app spec running tests/apps/echo.py."""
    spec: dict[str, Any] = {"runtime": "command", "command": [sys.executable, ECHO_APP]}
    spec.update(overrides)
    return spec


def readable_app(tmp_path: Path, name: str, source: str) -> str:
    """`source` as <tmp_path>/<name>/main.py, readable by the sandboxes' uids (an app_dir)."""
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    (d / "main.py").write_text(source)
    os.chmod(tmp_path, 0o755)
    os.chmod(d, 0o755)
    return str(d)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Gateway:
    """A running gateway and helpers to talk to it."""

    port: int
    admin_port: int
    token: str
    data_dir: Path
    run_dir: Path
    config_path: Path
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)

    def cli(self, *args: str) -> str:
        """Run `dorm ARGS` against this gateway's admin API; its stdout (raises if it fails)."""
        env = {**os.environ, "DORM_ADMIN_URL": f"http://127.0.0.1:{self.admin_port}"}
        env["DORM_ADMIN_TOKEN"] = self.token
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout

    # -- data plane ----------------------------------------------------------------------------
    def request(
        self,
        path: str = "/",
        host: str = "echo.localhost",
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 15.0,
    ) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def raw(self, data: bytes, timeout: float = 5.0, *, shut: bool = False) -> bytes:
        """Send raw bytes; read until the gateway closes the connection or `timeout` passes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(data)
            if shut:
                sock.shutdown(socket.SHUT_WR)
            return read_until_close(sock, timeout)

    def connect(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    # -- admin API ------------------------------------------------------------------------------
    def admin(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=15)
        headers = {"Authorization": f"Bearer {self.token if token is None else token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
        finally:
            conn.close()

    def put_app(self, name: str, spec: dict[str, Any]) -> None:
        status, body = self.admin("PUT", f"/v1/apps/{name}", spec)
        assert status in (200, 201), body

    def instance(self, app: str, branch: str = "main") -> dict[str, Any] | None:
        status, body = self.admin("GET", "/v1/instances")
        assert status == 200, body
        items = body["instances"] if isinstance(body, dict) else body
        return next((i for i in items if i["app"] == app and i["branch"] == branch), None)

    def wait_state(
        self, app: str, state: str, branch: str = "main", timeout: float = 15.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            inst = self.instance(app, branch)
            if inst is not None and inst["state"] == state:
                return inst
            if time.monotonic() > deadline:
                raise AssertionError(f"{app}/{branch} never reached {state}: {inst}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- process ------------------------------------------------------------------------------
    def start(
        self, extra_env: dict[str, str] | None = None, wrapper: list[str] | None = None
    ) -> None:
        """Start the gateway (`wrapper`: a command line it is started through, which execs it)."""
        self.log_path = self.data_dir.parent / "gateway.log"
        env = {**os.environ, "DORM_LOG_LEVEL": "INFO", **(extra_env or {})}
        self.proc = subprocess.Popen(
            [
                *(wrapper or []),
                sys.executable,
                "-c",
                "import sys; from gateway.server import serve; sys.exit(serve(sys.argv[1]))",
                str(self.config_path),
            ],
            stdout=open(self.log_path, "ab"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited early:\n{self.log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.admin_port), 0.2),
            ):
                return
            time.sleep(0.05)
        raise AssertionError(f"gateway did not start:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"gateway did not stop within {timeout}s:\n{self.log()}") from None


def read_until_close(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def write_config(
    path: Path,
    port: int,
    admin_port: int,
    data_dir: Path,
    run_dir: Path,
    token: str,
    extra: str = "",
) -> None:
    path.write_text(
        f"""[gateway]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
domains = ["localhost", "example.test"]
data_dir = "{data_dir}"
run_dir = "{run_dir}"
admin_token = "{token}"
{extra}
"""
    )


def make_gateway(tmp_path: Path, extra_config: str = "") -> Gateway:
    """A gateway config on free ports. Unless the test asks otherwise, instances run with
    `isolation = "process"` (these suites test the gateway, and identify instances by pid; the
    sandboxed path has its own suites), and every gateway gets its own cgroup subtree so that
    gateways running side by side never clean up each other's sandboxes."""
    if "isolation" not in extra_config:
        extra_config += '\nisolation = "process"'
    extra_config += f'\ncgroup_parent = "dorm-t{os.urandom(4).hex()}"'
    port, admin_port = free_port(), free_port()
    run_dir = Path(tempfile.mkdtemp(prefix="dorm-", dir="/tmp"))
    gw = Gateway(
        port=port,
        admin_port=admin_port,
        token="test-token-" + os.urandom(8).hex(),
        data_dir=tmp_path / "data",
        run_dir=run_dir,
        config_path=tmp_path / "dorm.toml",
    )
    write_config(gw.config_path, port, admin_port, gw.data_dir, run_dir, gw.token, extra_config)
    return gw


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Any]:
    """Make (and always clean up) gateways with extra [gateway] config lines."""
    made: list[Gateway] = []

    def factory(extra_config: str = "", start: bool = True) -> Gateway:
        gw = (
            make_gateway(tmp_path / f"gw{len(made)}", extra_config)
            if made
            else make_gateway(tmp_path, extra_config)
        )
        gw.data_dir.parent.mkdir(parents=True, exist_ok=True)
        made.append(gw)
        if start:
            gw.start()
        return gw

    yield factory
    for gw in made:
        if gw.proc is not None and gw.proc.poll() is None:
            with contextlib.suppress(AssertionError):
                gw.stop(timeout=20)
        shutil.rmtree(gw.run_dir, ignore_errors=True)
        sweep_cgroups(gw)


def sweep_cgroups(gw: Gateway) -> None:
    """Remove the cgroup subtrees a test gateway used (its own and its code runner's), so a test
    run leaves no cgroup directory behind even where a process died too abruptly to clean up."""
    parent = gw.config_path.read_text().split('cgroup_parent = "')[1].split('"')[0]
    try:
        from sandboxes import cgroups, cleanup_stale

        backend = cgroups.detect()
    except Exception:
        return  # no cgroups here: nothing was created
    names = {parent}
    for controller in ("pids", "memory"):
        base = Path("/sys/fs/cgroup") / controller
        if base.is_dir():
            names |= {p.name for p in base.glob(f"{parent}-runner-*")}
    for name in names:
        with contextlib.suppress(Exception):
            cleanup_stale(name)
            backend.remove_parent(name)


@pytest.fixture
def gateway(gateway_factory: Any) -> Gateway:
    """A running gateway with the echo app registered as `echo`."""
    gw: Gateway = gateway_factory()
    gw.put_app("echo", echo_spec())
    return gw
