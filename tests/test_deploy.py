"""Deploys end to end: upload a bundle to a branch, reach its preview host, redeploy, roll back,
delete, expire by TTL, collect unreferenced bundles; concurrent and cut-off uploads; memory
during a large upload; the CLI; and (with a stand-in instance manager) a bundle that will not
start, which must leave everything as it was."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import sqlite3
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.admin import start_admin_server
from gateway.appspec import BranchSpec, Limits, SpecError, overlay_spec, parse_app_spec
from gateway.bundles import BundleStore, DeployError
from gateway.cli import main
from gateway.client import AdminClient
from gateway.config import GatewayConfig
from gateway.deploy import DeployApi
from gateway.registry import BundleRecord, Registry
from tests.conftest import SERVE_ON_DORM_SOCKET, Gateway
from tests.test_bundles import F, M, state, targz, upload

# The tenant: a stdlib HTTP server on $DORM_SOCKET answering "<version> <branch> <pid>", where
# the version comes from a file in its bundle.
APP_PY = b"""
import asyncio, os
HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "version.txt")) as fh:
    VERSION = fh.read().strip()

async def handle(reader, writer):
    try:
        while True:
            await reader.readuntil(b"\\r\\n\\r\\n")
            body = f"{VERSION} {os.environ['DORM_BRANCH']} {os.getpid()}\\n".encode()
            head = b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body)
            writer.write(head + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
""" + SERVE_ON_DORM_SOCKET.encode()


def toml_value(value: Any) -> str:
    """A TOML literal: JSON spelling for scalars and lists, inline tables for dicts."""
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
        )
    return json.dumps(value)


def manifest(**extra: Any) -> bytes:
    lines = ['runtime = "command"', f'command = [{json.dumps(sys.executable)}, "app.py"]']
    lines += [f"{key} = {toml_value(value)}" for key, value in extra.items()]
    return ("\n".join(lines) + "\n").encode()


def site_bundle(version: str, padding: bytes = b"", **extra: Any) -> bytes:
    entries = [M(manifest(**extra)), F("app.py", APP_PY), F("version.txt", version.encode())]
    if padding:
        entries.append(F("padding.bin", padding))
    return targz(*entries, compresslevel=1)


def site_spec(gw: Gateway, **extra: Any) -> dict[str, Any]:
    return {
        "runtime": "command",
        "command": [sys.executable, "app.py"],  # the bundle's manifest says the same
        "startup_timeout": 10,
        **extra,
    }


def wait_until(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def branches(gw: Gateway, app: str) -> dict[str, dict[str, Any]]:
    status, body = gw.admin("GET", f"/v1/apps/{app}/branches")
    assert status == 200, body
    return {b["name"]: b for b in body["branches"]}


def stored(gw: Gateway) -> set[str]:
    return {p.name for p in (gw.data_dir / "bundles").iterdir() if p.name != "tmp"}


def fetch(gw: Gateway, host: str) -> str:
    resp = gw.request("/", host=host)
    assert resp.status == 200, resp.body
    return resp.body.decode()


@pytest.fixture
def site(gateway_factory: Any) -> Gateway:
    gw: Gateway = gateway_factory()
    gw.put_app("site", site_spec(gw))
    return gw


# -- deploy, redeploy, rollback --------------------------------------------------------------------
def test_deploy_redeploy_rollback(site: Gateway) -> None:
    gw = site
    status, first = upload(gw, "site", "feat", site_bundle("v1"))
    assert status == 201, first
    assert first["url"] == f"http://feat--site.localhost:{gw.port}/"
    assert first["previous_bundle"] is None
    assert fetch(gw, "feat--site.localhost").startswith("v1 feat ")
    assert fetch(gw, "feat.site.example.test").startswith("v1 feat ")

    status, second = upload(gw, "site", "feat", site_bundle("v2"))
    assert status == 200, second
    assert second["previous_bundle"] == first["bundle"]
    assert fetch(gw, "feat--site.localhost").startswith("v2 feat ")
    feat = branches(gw, "site")["feat"]
    assert (feat["bundle"], feat["previous_bundle"]) == (second["bundle"], first["bundle"])
    assert feat["deployed_at"] > time.time() - 60
    assert feat["last_request"] is not None and feat["last_request"] >= feat["deployed_at"] - 1
    assert feat["url"] == first["url"]

    status, back = gw.admin("POST", "/v1/apps/site/branches/feat/rollback")
    assert status == 200, back
    assert (back["bundle"], back["previous_bundle"]) == (first["bundle"], second["bundle"])
    assert fetch(gw, "feat--site.localhost").startswith("v1 feat ")
    status, forth = gw.admin("POST", "/v1/apps/site/branches/feat/rollback")
    assert (status, forth["bundle"]) == (200, second["bundle"])
    assert fetch(gw, "feat--site.localhost").startswith("v2 feat ")

    # Deploying what is already current keeps the rollback target.
    status, same = upload(gw, "site", "feat", site_bundle("v2"))
    assert (status, same["previous_bundle"]) == (200, first["bundle"])
    status, body = gw.admin("POST", "/v1/apps/site/branches/main/rollback")
    assert (status, body["error"]["field"]) == (404, "branch")
    status, _ = upload(gw, "site", "other", site_bundle("v9"))
    status, body = gw.admin("POST", "/v1/apps/site/branches/other/rollback")
    assert (status, body["error"]["field"]) == (409, "bundle")
    status, body = gw.admin("POST", "/v1/apps/ghost/branches/x/rollback")
    assert (status, body["error"]["field"]) == (404, "app")


def test_main_branch_url_and_details(site: Gateway) -> None:
    gw = site
    status, body = upload(gw, "site", "main", site_bundle("m1", env={"GREETING": "hi"}))
    assert status == 201, body
    assert body["url"] == f"http://site.localhost:{gw.port}/"
    assert fetch(gw, "site.localhost").startswith("m1 main ")
    status, detail = gw.admin("GET", "/v1/apps/site/branches/main")
    assert status == 200, detail
    assert detail["bundle"] == body["bundle"]
    assert detail["spec"]["command"] == [sys.executable, "app.py"]
    assert detail["spec"]["env"] == {"GREETING": "hi"}


def test_deploy_creates_the_app_and_bundles_only_lower_limits(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory()
    data = site_bundle(
        "v1", env={"A": "1"}, ttl="14d", limits={"memory": "64MiB", "cpu": 4, "pids": 1000}
    )
    status, body = upload(gw, "fresh", "main", data)
    assert status == 201, body
    status, app = gw.admin("GET", "/v1/apps/fresh")
    assert status == 200
    assert app["command"] == [sys.executable, "app.py"]
    assert app["ttl"] == 14 * 86400
    assert app["limits"] == {"memory": "256MiB", "cpu": 1.0, "pids": 64}  # not the bundle's
    status, main_branch = gw.admin("GET", "/v1/apps/fresh/branches/main")
    assert main_branch["spec"]["limits"] == {"memory": "64MiB", "cpu": 1.0, "pids": 64}

    gw.put_app("capped", site_spec(gw, env={"A": "0", "B": "2"}, limits={"memory": "128MiB"}))
    status, _ = upload(
        gw, "capped", "x", site_bundle("v1", env={"A": "1"}, limits={"memory": "1GiB"})
    )
    assert status == 201
    status, detail = gw.admin("GET", "/v1/apps/capped/branches/x")
    assert detail["spec"]["limits"]["memory"] == "128MiB"
    assert detail["spec"]["env"] == {"A": "1", "B": "2"}

    gw.put_app("boxed", site_spec(gw, isolation="sandbox"))
    before = state(gw)
    status, body = upload(gw, "boxed", "x", site_bundle("v1", isolation="process"))
    assert (status, body["error"]["field"]) == (400, "manifest.isolation")
    assert state(gw) == before


# -- branch removal, TTL, GC -----------------------------------------------------------------------
def test_branch_rm_deletes_instance_bundle_refs_and_data(site: Gateway) -> None:
    gw = site
    status, body = upload(gw, "site", "feat", site_bundle("v1"))
    assert status == 201
    digest = body["bundle"]
    assert fetch(gw, "feat--site.localhost").startswith("v1")
    assert gw.wait_state("site", "ready", branch="feat")
    data = gw.data_dir / "volumes" / "site" / "feat"
    data.mkdir(parents=True)
    (data / "db.sqlite").write_text("state")
    keep = gw.data_dir / "volumes" / "site" / "main"
    keep.mkdir(parents=True)

    status, body = gw.admin("DELETE", "/v1/apps/site/branches/feat")
    assert (status, body) == (200, {"deleted": "site/feat"})
    assert gw.instance("site", "feat") is None
    assert gw.request("/", host="feat--site.localhost").status == 404
    assert not data.exists() and keep.exists()
    assert "feat" not in branches(gw, "site")
    wait_until(lambda: digest not in stored(gw), what="the bundle to be collected")
    status, body = gw.admin("DELETE", "/v1/apps/site/branches/feat")
    assert (status, body["error"]["field"]) == (404, "branch")

    status, body = upload(gw, "site", "gone", site_bundle("v1"))
    assert status == 201
    status, _ = gw.admin("DELETE", "/v1/apps/site")
    assert status == 200
    assert not (gw.data_dir / "volumes" / "site").exists()
    wait_until(lambda: stored(gw) == set(), what="every bundle of the app to be collected")


def test_gc_keeps_current_and_previous(site: Gateway) -> None:
    gw = site
    digests = []
    for version in ("v1", "v2", "v3"):
        status, body = upload(gw, "site", "feat", site_bundle(version))
        assert status in (200, 201), body
        digests.append(body["bundle"])
    wait_until(lambda: stored(gw) == set(digests[1:]), what="v1 to be collected")
    assert (gw.data_dir / "bundles" / digests[2] / "version.txt").read_text() == "v3"
    # A collected bundle can be deployed again: it is simply extracted afresh.
    status, body = upload(gw, "site", "other", site_bundle("v1"))
    assert (status, body["bundle"]) == (201, digests[0])
    assert fetch(gw, "other--site.localhost").startswith("v1 other")


def test_ttl_deletes_branches_without_deploys_or_requests(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory()
    gw.put_app("site", site_spec(gw, ttl="2s"))
    for branch in ("main", "idle", "used"):
        status, body = upload(gw, "site", branch, site_bundle("v1"))
        assert status == 201, body
    stop = threading.Event()

    def keep_using() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                gw.request("/", host="used--site.localhost", timeout=5)
            stop.wait(0.3)

    user = threading.Thread(target=keep_using, daemon=True)
    user.start()
    try:
        wait_until(lambda: "idle" not in branches(gw, "site"), timeout=15, what="idle to expire")
        time.sleep(1.0)
        names = branches(gw, "site")
        assert "used" in names and names["main"]["bundle"] is not None
    finally:
        stop.set()
        user.join(10)
    assert gw.request("/", host="idle--site.localhost").status == 404
    wait_until(lambda: "used" not in branches(gw, "site"), timeout=15, what="used to expire")
    assert "main" in branches(gw, "site")


# -- concurrency, cut-off uploads, memory ----------------------------------------------------------
def test_concurrent_uploads_to_one_branch(site: Gateway) -> None:
    gw = site
    bundles = [site_bundle(v, padding=os.urandom(3 << 20)) for v in ("a", "b")]
    answers: list[tuple[int, Any]] = [(0, None), (0, None)]

    def send(i: int) -> None:
        answers[i] = upload(gw, "site", "feat", bundles[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(status for status, _ in answers) == [200, 201], answers
    digests = {body["bundle"] for _, body in answers}
    feat = branches(gw, "site")["feat"]
    assert {feat["bundle"], feat["previous_bundle"]} == digests
    for digest in digests:
        assert (gw.data_dir / "bundles" / digest / "padding.bin").stat().st_size == 3 << 20
    assert list((gw.data_dir / "bundles" / "tmp").iterdir()) == []
    version = (gw.data_dir / "bundles" / feat["bundle"] / "version.txt").read_text()
    assert fetch(gw, "feat--site.localhost").startswith(f"{version} feat")


def test_upload_cut_off_mid_stream_changes_nothing(site: Gateway) -> None:
    gw = site
    status, _ = upload(gw, "site", "feat", site_bundle("v1"))
    assert status == 201
    before = state(gw)
    data = site_bundle("v2", padding=os.urandom(4 << 20))
    with socket.create_connection(("127.0.0.1", gw.admin_port), timeout=10) as sock:
        sock.sendall(
            b"PUT /v1/apps/site/branches/feat/bundle HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {gw.token}\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            + data[: len(data) // 2]
        )
        tmp = gw.data_dir / "bundles" / "tmp"
        wait_until(lambda: any(tmp.iterdir()), what="the upload to start spooling")
    wait_until(lambda: state(gw) == before, what="the cut-off upload to be cleaned up")
    assert list((gw.data_dir / "bundles" / "tmp").iterdir()) == []
    assert fetch(gw, "feat--site.localhost").startswith("v1 feat")


def _memory_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} for pid {pid}")


def test_a_large_upload_is_streamed_not_buffered(site: Gateway, tmp_path: Path) -> None:
    gw = site
    assert gw.proc is not None
    archive = tmp_path / "big.tar.gz"
    archive.write_bytes(site_bundle("big", padding=os.urandom(64 << 20)))
    size = archive.stat().st_size
    assert size > 64 << 20
    rss_before = _memory_kib(gw.proc.pid, "VmRSS")
    with (
        AdminClient(f"http://127.0.0.1:{gw.admin_port}", gw.token) as client,
        open(archive, "rb") as fh,
    ):
        status, body = client.upload("/v1/apps/site/branches/big/bundle", fh, size, timeout=120)
    assert status == 201, body
    peak = _memory_kib(gw.proc.pid, "VmHWM")
    grown_mib = (peak - rss_before) / 1024
    assert grown_mib < 24, f"gateway peak RSS grew by {grown_mib:.1f} MiB for a 64 MiB upload"
    stored_file = gw.data_dir / "bundles" / body["bundle"] / "padding.bin"
    assert stored_file.stat().st_size == 64 << 20


# -- the CLI ---------------------------------------------------------------------------------------
def test_cli_deploy_branches_rollback(
    site: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = site
    flags = ["--admin-url", f"http://127.0.0.1:{gw.admin_port}", "--token", gw.token]
    src = tmp_path / "src"
    (src / "__pycache__").mkdir(parents=True)
    (src / "dorm.toml").write_bytes(manifest())
    (src / "app.py").write_bytes(APP_PY)
    (src / "version.txt").write_text("c1")
    (src / "__pycache__" / "junk.pyc").write_bytes(b"x")

    code = main([*flags, "deploy", str(src), "--app", "site", "--branch", "cli", "--wait"])
    out, err = capsys.readouterr()
    assert code == 0, err
    first_line, url = out.splitlines()
    assert first_line.startswith("deployed ") and first_line.endswith(" to site/cli")
    assert url == f"http://cli--site.localhost:{gw.port}/"
    first = branches(gw, "site")["cli"]["bundle"]
    assert not (gw.data_dir / "bundles" / first / "__pycache__").exists()
    # Packing is deterministic: the same tree is the same bundle.
    assert main([*flags, "deploy", str(src), "--app", "site", "--branch", "cli", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bundle"] == first

    assert main([*flags, "rollback", "site/cli"]) == 1
    assert "no previous bundle" in capsys.readouterr().err

    archive = tmp_path / "c2.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("dorm.toml", manifest())
        zf.writestr("app.py", APP_PY)
        zf.writestr("version.txt", "c2")
    assert main([*flags, "deploy", str(archive), "--app", "site", "--branch", "cli"]) == 0
    capsys.readouterr()
    assert fetch(gw, "cli--site.localhost").startswith("c2 cli")

    assert main([*flags, "branches", "site"]) == 0
    out = capsys.readouterr().out
    header, *rows = out.splitlines()
    assert header.split() == ["BRANCH", "BUNDLE", "DEPLOYED", "LAST_REQUEST", "ENV"]
    cli_row = next(r.split() for r in rows if r.startswith("cli "))
    assert cli_row[1] == branches(gw, "site")["cli"]["bundle"][:12]

    assert main([*flags, "rollback", "site/cli"]) == 0
    assert capsys.readouterr().out.startswith(f"rolled site/cli back to {first[:12]}")
    assert fetch(gw, "cli--site.localhost").startswith("c1 cli")

    assert main([*flags, "deploy", str(tmp_path / "nothing"), "--app", "site"]) == 2
    (src / "dorm.toml").unlink()
    assert main([*flags, "deploy", str(src), "--app", "site"]) == 2
    assert "no dorm.toml" in capsys.readouterr().err


# -- a bundle that will not start (stand-in instance manager) --------------------------------------
class FakeInstances:
    """Implements the instance manager's part of the deploy protocol, `redeploy` included."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.fail: Exception | None = None

    def snapshot(self) -> list[dict[str, Any]]:
        return []

    async def stop(self, app: str, branch: str | None) -> int:
        return 0

    async def app_changed(self, app: str) -> None:
        self.calls.append(("app_changed", app))

    async def app_removed(self, app: str) -> None:
        self.calls.append(("app_removed", app))

    async def branch_changed(self, app: str, branch: str) -> None:
        self.calls.append(("branch_changed", app, branch))

    async def redeploy(self, app: str, branch: str) -> None:
        self.calls.append(("redeploy", app, branch))
        if self.fail is not None:
            raise self.fail

    def activity(self) -> list[tuple[str, str, float]]:
        return []

    def busy(self, app: str, branch: str) -> bool:
        return False


class Harness:
    """Registry, store, deploy routes and admin server on an event loop in a thread."""

    def __init__(self, data_dir: Path, instances: FakeInstances | None = None) -> None:
        self.data_dir = data_dir
        self.cfg = GatewayConfig(admin_listen="127.0.0.1:0", data_dir=str(data_dir))
        self.instances = instances if instances is not None else FakeInstances()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def run(self, coro: Any, timeout: float = 20.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> Harness:
        self.thread.start()
        self.run(self._start())
        return self

    async def _start(self) -> None:
        self.registry = Registry(self.data_dir / "dorm.sqlite")
        await self.registry.open()
        self.store = BundleStore(self.data_dir / "bundles")
        self.api = DeployApi(self.cfg, self.registry, self.instances, self.store)
        await self.api.start()
        self.server = await start_admin_server(
            self.cfg, self.registry, self.instances, "tok", extra_routes=self.api.routes()
        )
        self.port = self.server.sockets[0].getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self.server.close()
            await self.api.close()
            await self.registry.close()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def client(self) -> AdminClient:
        return AdminClient(f"http://127.0.0.1:{self.port}", "tok")

    def listing(self) -> Any:
        stored = sorted(p.name for p in (self.data_dir / "bundles").iterdir() if p.name != "tmp")
        return (
            {k: (b.bundle, b.previous_bundle) for k, b in self.registry.branches.items()},
            sorted(self.registry.apps),
            stored,
        )


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    with Harness(tmp_path / "data") as h:
        yield h


def _put(h: Harness, app: str, branch: str, data: bytes) -> tuple[int, Any]:
    with h.client() as client:
        return client.upload(
            f"/v1/apps/{app}/branches/{branch}/bundle", io.BytesIO(data), len(data)
        )


def test_a_bundle_that_will_not_start_is_undone(harness: Harness) -> None:
    h = harness
    status, first = _put(h, "demo", "main", site_bundle("v1"))
    assert status == 201, first
    assert h.instances.calls[-1] == ("redeploy", "demo", "main")
    before = h.listing()

    h.instances.fail = DeployError("exited with code 3 before it was ready")
    status, body = _put(h, "demo", "main", site_bundle("v2"))
    assert status == 422, body
    assert body["error"]["field"] == "bundle"
    assert "exited with code 3" in body["error"]["message"]
    wait_until(lambda: h.listing() == before, what="the failed bundle to be collected")

    status, body = _put(h, "newapp", "main", site_bundle("v1"))
    assert status == 422 and "newapp" not in h.registry.apps
    status, body = _put(h, "demo", "feat", site_bundle("v3"))
    assert status == 422 and ("demo", "feat") not in h.registry.branches

    h.instances.fail = RuntimeError("a bug")
    status, body = _put(h, "demo", "main", site_bundle("v2"))
    assert status == 500, body
    wait_until(lambda: h.listing() == before, what="the failed bundle to be collected")

    h.instances.fail = None
    status, second = _put(h, "demo", "main", site_bundle("v2"))
    assert status == 200, second
    h.instances.fail = DeployError("health check failed")
    with h.client() as client:
        status, body = client.request("POST", "/v1/apps/demo/branches/main/rollback")
    assert (status, body["error"]["field"]) == (422, "bundle")
    branch = h.registry.branches[("demo", "main")]
    assert (branch.bundle, branch.previous_bundle) == (second["bundle"], first["bundle"])


def test_ttl_and_activity_with_a_controlled_clock(harness: Harness) -> None:
    h = harness
    with h.client() as client:
        client.call("PUT", "/v1/apps/demo", {"command": ["x"], "ttl": "1h"})
    for branch in ("main", "a", "b"):
        assert _put(h, "demo", branch, site_bundle("v1"))[0] == 201
    now = time.time()
    h.registry.touch("demo", "b", now + 3000)
    assert h.run(h.registry.flush_activity()) == 1
    assert h.run(h.registry.flush_activity()) == 0
    assert h.run(h.api.expire(now + 1800)) == []
    assert h.run(h.api.expire(now + 3700)) == ["demo/a"]
    assert h.run(h.api.expire(now + 3000 + 3700)) == ["demo/b"]
    assert ("demo", "main") in h.registry.branches
    # Activity survives a restart of the registry (it was flushed).
    h.registry.touch("demo", "main", now + 5)
    h.run(h.registry.flush_activity())
    assert h.registry.branches[("demo", "main")].last_request == now + 5


# -- effective spec and the registry's deploy state -----------------------------------------------
def test_overlay_spec_rules() -> None:
    base = parse_app_spec(
        "demo",
        {
            "command": ["python3", "serve.py"],
            "env": {"A": "app", "B": "app"},
            "idle_timeout": "1m",
            "limits": {"memory": "256MiB", "cpu": None, "pids": 64},
        },
    )
    spec = overlay_spec(
        base,
        {
            "runtime": "python-asgi",
            "entry": "app:app",
            "env": {"B": "bundle", "C": "bundle"},
            "limits": {"memory": "1GiB", "cpu": 0.5},
            "static": {"spa_fallback": "index.html"},
        },
    )
    assert (spec.runtime, spec.entry, spec.idle_timeout) == ("python-asgi", "app:app", 60.0)
    assert spec.env == {"A": "app", "B": "bundle", "C": "bundle"}
    assert spec.limits == Limits(memory=256 * 1024**2, cpu=0.5, pids=64)
    assert spec.static.spa_fallback == "index.html"
    assert overlay_spec(base, {}) == base
    for manifest, field in (
        ({"runtime": "python-wsgi"}, "entry"),
        ({"entry": "not an entry"}, "entry"),
        ({"limits": {"memory": "lots"}}, "limits.memory"),
        ({"static": {"index": ["a/b"]}}, "static.index.0"),
        ({"static": {"spa_fallback": "../x"}}, "static.spa_fallback"),
        ({"ttl": "0s"}, "ttl"),
    ):
        with pytest.raises(SpecError) as info:
            overlay_spec(base, manifest)
        assert info.value.field == field
    boxed = parse_app_spec("demo", {"command": ["x"], "isolation": "sandbox"})
    with pytest.raises(SpecError) as info:
        overlay_spec(boxed, {"isolation": "process"})
    assert info.value.field == "isolation"
    assert overlay_spec(base, {"isolation": "sandbox"}).isolation == "sandbox"


def test_registry_deploy_state_survives_restart(tmp_path: Path) -> None:
    db = tmp_path / "dorm.sqlite"
    # A database from before bundles existed: the new columns are added in place.
    old = sqlite3.connect(db)
    old.executescript(
        "CREATE TABLE apps (name TEXT PRIMARY KEY, spec BLOB NOT NULL, created REAL NOT NULL,"
        " updated REAL NOT NULL);"
        "CREATE TABLE branches (app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,"
        " name TEXT NOT NULL, spec BLOB NOT NULL, created REAL NOT NULL,"
        " PRIMARY KEY (app, name));"
        """INSERT INTO apps VALUES ('demo', '{"command": ["x"]}', 1, 1);"""
        """INSERT INTO branches VALUES ('demo', 'old', '{"env": {"X": "1"}}', 5);"""
    )
    old.commit()
    old.close()
    digest_a, digest_b = "a" * 64, "b" * 64

    async def first() -> None:
        reg = Registry(db)
        await reg.open()
        assert reg.get_branch("demo", "old") == BranchSpec("demo", "old", {"X": "1"})
        record = BundleRecord(digest_a, {"env": {"Y": "2"}}, 10, 1, 5, time.time())
        branch = BranchSpec("demo", "feat", bundle=digest_a, deployed_at=100.0)
        await reg.set_branch(branch, bundle=record)
        spec = reg.effective_spec("demo", "feat")
        assert spec is not None and spec.env == {"Y": "2"}
        assert reg.effective_spec("demo", "old") == reg.get_app("demo")
        assert reg.effective_spec("demo", "ghost") is None
        # `branch set` replaces the overrides, never the bundles.
        await reg.put_branch(BranchSpec("demo", "feat", {"Z": "3"}))
        feat = reg.get_branch("demo", "feat")
        assert feat is not None and (feat.env, feat.bundle) == ({"Z": "3"}, digest_a)
        await reg.set_branch(
            BranchSpec("demo", "feat", {"Z": "3"}, digest_b, digest_a, 200.0),
            bundle=BundleRecord(digest_b, {"colour": "red"}, 1, 1, 1, 0.0),
        )
        with pytest.raises(SpecError) as info:
            reg.effective_spec("demo", "feat")
        assert info.value.field == "manifest.colour"
        assert reg.referenced_bundles() == {digest_a, digest_b}
        reg.touch("demo", "feat", 300.0)
        reg.touch("ghost", "main", 300.0)  # an app that does not exist is not persisted
        assert await reg.flush_activity() == 1
        await reg.set_branch(
            BranchSpec("new", "main"), app=parse_app_spec("new", {"command": ["y"]})
        )
        assert reg.get_app("new") is not None
        await reg.close()

    async def second() -> None:
        reg = Registry(db)
        await reg.open()
        feat = reg.get_branch("demo", "feat")
        assert feat is not None
        assert (feat.bundle, feat.previous_bundle, feat.deployed_at) == (digest_b, digest_a, 200.0)
        assert feat.last_request == 300.0 and feat.created is not None
        assert set(reg.bundles) == {digest_a, digest_b}
        assert reg.get_app("new") is not None
        await reg.forget_bundles([digest_a, "c" * 64])
        assert set(reg.bundles) == {digest_b}
        assert await reg.delete_branch("demo", "feat")
        assert reg.last_request("demo", "feat") is None
        await reg.close()

    asyncio.run(asyncio.wait_for(first(), 20))
    asyncio.run(asyncio.wait_for(second(), 20))
