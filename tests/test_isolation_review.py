"""Adversarial review of tenant isolation: attacks run by real tenants in real sandboxes.

Each test is one attack from inside a tenant (an app served through a real sandboxing gateway)
against the host side: what the gateway or the fork server does as root in a place the tenant
can write must never reach a host file or a host socket. What is checked here and not elsewhere:

* the tenant's socket dir is its own: it can replace ``/run/dorm/http.sock`` with a symlink to
  any path (the host path of the dir is in its /proc/self/mountinfo, so it can also aim at
  another tenant's socket). The gateway, as root, must never connect through it: a symlink is
  refused like a missing socket (502), and the host socket it aimed at sees nothing.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandboxes import detect_isolation
from tests.conftest import SERVE_ON_DORM_SOCKET, Gateway, readable_app

LEVEL = detect_isolation()
pytestmark = pytest.mark.skipif(
    LEVEL != "sandbox",
    reason=f"the attacks need real sandboxes (root, namespaces and cgroups); this host: {LEVEL}",
)

# A tenant that, asked to, swaps its own socket for a symlink to `to` (a host path) and closes
# the gateway's connection, so the gateway's next request opens a new one by path.
SWAPPER = """
import asyncio, os, sys
SOCK = os.environ["DORM_SOCKET"]

async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\\r\\n\\r\\n")
            target = head.split(b" ", 2)[1].decode()
            path, _, query = target.partition("?")
            close = False
            body = b"tenant"
            if path == "/swap":
                os.unlink(SOCK)
                os.symlink(query.split("=", 1)[1], SOCK)
                body, close = b"swapped", True
            extra = b"Connection: close\\r\\n" if close else b""
            head = b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n%s\\r\\n"
            writer.write(head % (len(body), extra) + body)
            await writer.drain()
            if close:
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()

async def main():
    server = await asyncio.start_unix_server(handle, SOCK)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


class Decoy:
    """A host Unix socket only root can reach (in a 0700 dir), answering HTTP: stands for
    /var/run/docker.sock, another tenant's socket or an internal service's."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.accepted = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\ndecoy")
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def decoy(tmp_path: Path) -> Iterator[Decoy]:
    host = tmp_path / "host-only"
    host.mkdir(mode=0o700)
    d = Decoy(host / "decoy.sock")
    yield d
    d.close()


def sandboxed_gateway(factory: Any, uids: str = "320000-320999", extra: str = "") -> Gateway:
    gw: Gateway = factory(f'isolation = "auto"\nuid_range = "{uids}"', start=False)
    if extra:
        with gw.config_path.open("a") as fh:
            fh.write("\n" + extra)
    gw.start()
    return gw


def command_app(tmp_path: Path, name: str, source: str, **extra: Any) -> dict[str, Any]:
    code = readable_app(tmp_path, name, source)
    return {"runtime": "command", "command": [sys.executable, "main.py"], "app_dir": code, **extra}


def test_socket_symlink_never_redirects_the_gateway(
    gateway_factory: Any, tmp_path: Path, decoy: Decoy
) -> None:
    gw = sandboxed_gateway(gateway_factory)
    gw.put_app("swapper", command_app(tmp_path, "swapper", SWAPPER))
    first = gw.request("/", host="swapper.localhost")
    assert (first.status, first.body) == (200, b"tenant")
    # (The host path of its socket dir is no secret to the tenant: its mountinfo shows it.)
    swapped = gw.request(f"/swap?to={decoy.path}", host="swapper.localhost")
    assert (swapped.status, swapped.body) == (200, b"swapped")
    after = gw.request("/", host="swapper.localhost")
    assert after.body != b"decoy"
    assert after.status == 502, (after.status, after.body)
    assert decoy.accepted == 0


# -- /data volumes chowned per start (no idmapped mounts) ------------------------------------------
_LIBC = ctypes.CDLL(None, use_errno=True)
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def _swap_forever(volume: Path, uid: int) -> int:
    """Fork a process with a tenant's uid that atomically swaps the volume's directory `d0` and
    its symlink `s` (to a host directory) until killed: a tenant of the same branch still running
    while the fork server chows the volume for the next start."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the attacker
        try:
            os.chdir(volume)  # the tenant sees its volume at /data, not the host's path to it
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            while True:
                _LIBC.renameat2(AT_FDCWD, b"d0", AT_FDCWD, b"s", RENAME_EXCHANGE)
        finally:
            os._exit(0)
    return pid


def test_volume_chown_fallback_never_follows_a_swapped_in_symlink(tmp_path: Path) -> None:
    from gateway.forkserver import _own_tree

    host = tmp_path / "host-dir"  # stands for /etc: root's files, which must stay root's
    host.mkdir()
    for i in range(20):
        (host / f"h{i}").write_text("host")
    volume = tmp_path / "volume"
    volume.mkdir()
    for i in range(30):
        (volume / f"d{i}").mkdir()
        for j in range(3):
            (volume / f"d{i}" / f"f{j}").write_text("tenant")
    (volume / "s").symlink_to(host)
    volume.chmod(0o777)  # the tenant owns its volume's root and may open it to any uid
    attacker = _swap_forever(volume, 330999)
    try:
        for n in range(400):  # the path walk this replaced lost this race within ~20 walks
            _own_tree(str(volume), 330000 + n % 2)
            owners = {p.stat().st_uid for p in (host, *host.iterdir())}
            assert owners == {0}, f"a host file was chowned at walk {n}"
    finally:
        os.kill(attacker, 9)
        os.waitpid(attacker, 0)


def test_volume_chown_fallback_has_no_depth_limit(tmp_path: Path) -> None:
    """A tenant's 3,000-deep directory chain in its volume is chowned whole for the next start
    (os.fwalk raised RecursionError there, and the start failed), a symlink in it is not
    followed, and no fd is left open."""
    from gateway.forkserver import _own_tree, remove_tree

    def chain(volume: Path, visit: Any) -> None:
        """`visit(dir fd)` for each directory of the chain under `volume`, by fds (its path
        is longer than PATH_MAX, and os.makedirs recurses)."""
        fd = os.open(volume, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for _ in range(3000):
                visit(fd)
                nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = nxt
            visit(fd)
        finally:
            os.close(fd)

    host = tmp_path / "host-dir"
    host.mkdir()
    (host / "h").write_text("host")
    volume = tmp_path / "volume"
    (volume / "wide").mkdir(parents=True)
    for i in range(50):
        (volume / "wide" / f"w{i}").mkdir()
    (volume / "wide" / "s").symlink_to(host)
    try:
        chain(volume, lambda fd: os.mkdir("d", dir_fd=fd))
        fds = len(os.listdir("/proc/self/fd"))
        _own_tree(str(volume), 330123)
        assert len(os.listdir("/proc/self/fd")) == fds
        owners = {p.lstat().st_uid for p in (volume, volume / "wide", *(volume / "wide").iterdir())}
        chain(volume, lambda fd: owners.add(os.stat("d", dir_fd=fd, follow_symlinks=False).st_uid))
        assert owners == {330123}
    finally:
        remove_tree(volume)  # pytest's own clean-up recurses
    assert {p.stat().st_uid for p in (host, *host.iterdir())} == {0}


def served(source: str) -> str:
    """An app's source whose `handle` ends having made `body`: it answers `body` and serves
    `handle` on the instance's socket (the end every app below shares)."""
    return source + SERVED


SERVED = (
    """\
    writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body) + body)
    await writer.drain()
    writer.close()
"""
    + SERVE_ON_DORM_SOCKET
)


# -- what a tenant leaves in its socket dir ---------------------------------------------------
# A tenant that leaves a chain of nested directories in its socket dir (`mkdir d; cd d`), as
# deep as it can: 3,000 levels (past Python's recursion limit) when the dir was a directory of
# the host's filesystem; its inode cap stops it at a few hundred now, but the removal must not
# depend on that (rootless sandboxes get a plain directory; volumes have no cap).
DEEP = served("""
import asyncio, os

def dig():
    os.chdir("/run/dorm")
    depth = 0
    try:
        for _ in range(int(os.environ["DEPTH"])):
            os.mkdir("d")
            os.symlink("/etc", "etc")  # in the host's view, the host's /etc: never followed
            os.chdir("d")
            depth += 1
    except OSError:
        pass  # the socket dir's inode cap (sandboxes.prepare_socket_dir) stops it first
    os.chdir("/")
    return str(depth).encode()

async def handle(reader, writer):
    await reader.readuntil(b"\\r\\n\\r\\n")
    body = dig()
""")


def test_remove_tree_has_no_depth_limit_and_follows_no_symlink(tmp_path: Path) -> None:
    from gateway.forkserver import remove_tree

    host = tmp_path / "host"
    host.mkdir()
    (host / "keep").write_text("host")
    tree = tmp_path / "tree"
    tree.mkdir()
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        level = fd
        for i in range(3000):
            os.mkdir("d", dir_fd=level)
            os.symlink(host, "link", dir_fd=level)
            if i % 500 == 0:
                os.mkdir("x", dir_fd=level)
                os.mkdir("x/y", dir_fd=level)
                os.symlink(host / "keep", "x/y/l", dir_fd=level)
                os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=level))
            deeper = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=level)
            if level != fd:
                os.close(level)
            level = deeper
        os.close(level)
    finally:
        os.close(fd)
    remove_tree(tree)
    assert not tree.exists()
    assert [p.name for p in host.iterdir()] == ["keep"]
    assert (host / "keep").read_text() == "host"
    link = tmp_path / "link"
    link.symlink_to(host)
    remove_tree(link)  # a symlink is removed as a name
    assert not link.is_symlink() and (host / "keep").read_text() == "host"
    remove_tree(tmp_path / "missing")  # nothing there: nothing to do


def test_deep_tree_left_in_the_socket_dir_kills_nothing(
    gateway_factory: Any, tmp_path: Path
) -> None:
    from tests.test_pools import find_forkserver

    gw = sandboxed_gateway(gateway_factory)
    apps = Path(__file__).parent / "apps"
    gw.put_app(
        "bystander",
        {"runtime": "command", "command": [sys.executable, "echo.py"], "app_dir": str(apps)},
    )
    assert gw.request("/", host="bystander.localhost").status == 200
    bystander = gw.instance("bystander")
    forkserver = find_forkserver(gw)
    assert bystander is not None and forkserver is not None
    before = set(os.listdir(gw.run_dir))
    gw.put_app("deep", command_app(tmp_path, "deep", DEEP, env={"DEPTH": "3000"}))
    try:
        resp = gw.request("/", host="deep.localhost", timeout=60)
        assert resp.status == 200, resp.body
        assert 100 <= int(resp.body) < 3000  # as deep as the socket dir's inode cap allows
        assert len(set(os.listdir(gw.run_dir)) - before) == 1
        assert gw.admin("POST", "/v1/apps/deep/stop")[0] == 200
        gw.wait_state("deep", "cold")
        # Its run dir is removed, and the fork server (with every other tenant) is still there.
        deadline = time.monotonic() + 30
        while set(os.listdir(gw.run_dir)) != before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(os.listdir(gw.run_dir)) == before
        assert find_forkserver(gw) == forkserver
        after = gw.instance("bystander")
        assert after is not None and after["state"] == "ready" and after["pid"] == bystander["pid"]
        assert gw.request("/", host="bystander.localhost").status == 200
        assert "fork server died" not in gw.log()
    finally:
        from gateway.forkserver import remove_tree

        for entry in set(os.listdir(gw.run_dir)) - before:  # what the gateway did not remove
            remove_tree(gw.run_dir / entry)


# -- what a zygote child inherits ---------------------------------------------------------------
# A python-asgi tenant that counts how often a string occurs in its own anonymous memory (heap,
# arenas, stacks): what it inherited from the fork server, of which it is a fork, included. The
# needles arrive reversed in the query, so the request itself never holds them.
SCANNER = """
import ctypes, json
from urllib.parse import parse_qs

def count(needles):
    found = dict.fromkeys(needles, 0)
    with open("/proc/self/maps") as fh:
        regions = fh.read().splitlines()
    for line in regions:
        parts = line.split()
        anonymous = parts[4] == "0" and parts[-1] not in ("[vvar]", "[vsyscall]")
        if not parts[1].startswith("rw") or not anonymous:
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        data = ctypes.string_at(lo, hi - lo)
        for needle in needles:
            found[needle] += data.count(needle)
    return found

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    query = parse_qs(scope["query_string"].decode())
    needles = [v[::-1].encode() for v in query["n"]]
    counts = count(needles)
    body = json.dumps([counts[n] for n in needles]).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})
"""


def test_no_tenant_inherits_another_tenants_environment(
    gateway_factory: Any, tmp_path: Path
) -> None:
    from tests.test_pools import POOL, wait_pool

    gw = sandboxed_gateway(gateway_factory, "321000-322999", POOL)
    code = readable_app(tmp_path, "scanner", SCANNER)
    secrets = {name: f"pw-{name}-{os.urandom(12).hex()}" for name in ("pooled", "exec")}
    control = f"pw-none-{os.urandom(12).hex()}"  # never given to anyone: the baseline
    spec = {"runtime": "python-asgi", "entry": "main:app", "app_dir": code}
    # The victims: one exec'd (the C launcher), one a zygote fork or a pool member.
    apps = str(Path(__file__).parent / "apps")
    gw.put_app(
        "victim-exec",
        {
            "runtime": "command",
            "command": [sys.executable, "echo.py"],
            "app_dir": apps,
            "env": {"DB_PASSWORD": secrets["exec"]},
            "limits": {"memory": "200MiB"},  # a shape of its own, never a serving pool's
        },
    )
    assert gw.request("/", host="victim-exec.localhost").status == 200
    gw.put_app("victim", {**spec, "env": {"DB_PASSWORD": secrets["pooled"]}})
    query = "&".join(f"n={s[::-1]}" for s in (*secrets.values(), control))
    own = gw.request(f"/?{query}", host="victim.localhost")
    assert own.status == 200, own.body
    assert json.loads(own.body)[0] >= 1  # the victim does hold its own password
    # Every member built from here on is a fork of a fork server that spawned both victims.
    wait_pool(gw, lambda p: p["idle"] >= 2)
    paths = set()
    for i in range(4):  # pool members, then zygote forks once the pool is empty
        gw.put_app(f"thief{i}", spec)
        resp = gw.request(f"/?{query}", host=f"thief{i}.localhost")
        assert resp.status == 200, resp.body
        *found, baseline = json.loads(resp.body)
        assert found == [baseline, baseline], f"thief{i} found another tenant's password"
        inst = gw.instance(f"thief{i}")
        assert inst is not None and inst["last_start"] is not None
        paths.add(inst["last_start"]["path"])
    assert "pool" in paths


# -- file descriptors ---------------------------------------------------------------------------
FD_APP = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
"""


def _fd_targets(pid: int) -> dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
    return out


def _host_unix_sockets() -> set[str]:
    """ "socket:[inode]" of every unnamed Unix socket of the host's (this test's) network
    namespace: socketpair ends and clients. (A connection a tenant accepted is in the
    connecting side's namespace too, but it carries the name of the tenant's listener.)"""
    out = subprocess.run(["ss", "-xaH"], capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines()]
    return {f"socket:[{row[5]}]" for row in rows if len(row) > 5 and row[4] == "*"}


def test_no_tenant_shares_an_open_file_with_the_gateway_or_fork_server(
    gateway_factory: Any, tmp_path: Path
) -> None:
    """Seen from the host, by open file: a tenant started on each path (pool member after its
    claim, zygote fork, fresh interpreter, exec'd command) shares no socket, pipe or file with
    the gateway or the fork server but its log pipe (fds 1 and 2, whose other end the fork
    server reads): no listener, control channel, claim channel, name file or database."""
    from tests.test_pools import POOL, find_forkserver, wait_pool

    gw = sandboxed_gateway(gateway_factory, "323000-324999", POOL)
    code = readable_app(tmp_path, "fds", FD_APP)
    spec = {"runtime": "python-asgi", "entry": "main:app", "app_dir": code}
    apps = str(Path(__file__).parent / "apps")
    gw.put_app("first", spec)
    assert gw.request("/", host="first.localhost").status == 200
    wait_pool(gw, lambda p: p["idle"] >= 1)
    gw.put_app("pooled", spec)
    gw.put_app("fresh", {**spec, "start": "fresh"})
    gw.put_app(
        "cmd", {"runtime": "command", "command": [sys.executable, "echo.py"], "app_dir": apps}
    )
    paths = {}
    for app in ("first", "pooled", "fresh", "cmd"):
        assert gw.request("/", host=f"{app}.localhost").status == 200
        inst = gw.instance(app)
        assert inst is not None and inst["pid"] and inst["last_start"] is not None
        paths[app] = inst["last_start"]["path"]
        forkserver = find_forkserver(gw)
        assert forkserver is not None and gw.proc is not None
        theirs = set(_fd_targets(forkserver).values()) | set(_fd_targets(gw.proc.pid).values())
        mine = _fd_targets(inst["pid"])
        shared = {
            fd: target
            for fd, target in mine.items()
            if target in theirs and target.startswith(("socket:", "pipe:"))  # by inode
        }
        assert set(shared) <= {1, 2}, (app, shared)
        assert all(t.startswith("pipe:") for t in shared.values()), (app, shared)
        # A socketpair end (a claim channel, a control channel) has another inode than its
        # peer, but it was made in the host's network namespace, unnamed; the tenant's own
        # sockets are in its own namespace or named after its listener.
        host_sockets = _host_unix_sockets()
        leaked = {fd: t for fd, t in mine.items() if t in host_sockets}
        assert leaked == {}, (app, leaked)
        files = {t for t in mine.values() if t.startswith("/")}
        assert files <= {"/dev/null"}, (app, files)  # its own /dev/null, nothing of the host
    assert paths["pooled"] == "pool" and paths["fresh"] == "fresh", paths


# -- /data volumes deleted with their app -----------------------------------------------------
DEEP_VOLUME = served("""
import asyncio, os

async def handle(reader, writer):
    head = await reader.readuntil(b"\\r\\n\\r\\n")
    if b"GET /fill " in head:
        open("/data/secret", "w").write("the first tenant's data")
        os.chdir("/data")
        for _ in range(3000):
            os.mkdir("d")
            os.chdir("d")
        os.chdir("/")
    body = str(sorted(os.listdir("/data"))).encode()
""")


def test_deleting_an_app_deletes_a_deep_volume(gateway_factory: Any, tmp_path: Path) -> None:
    """A tenant's volume holds whatever it wrote, a 3,000-deep directory chain included: deleting
    the app must delete it all, so a new app of the same name starts with an empty /data."""
    from gateway.forkserver import remove_tree

    gw = sandboxed_gateway(gateway_factory)
    spec = command_app(tmp_path, "vol", DEEP_VOLUME, volume=True)
    gw.put_app("reused", spec)
    volume = gw.data_dir / "volumes" / "reused"
    try:
        filled = gw.request("/fill", host="reused.localhost", timeout=60)
        assert (filled.status, filled.body) == (200, b"['d', 'secret']")
        status, body = gw.admin("DELETE", "/v1/apps/reused")
        assert status == 200, body
        assert not volume.exists()
        gw.put_app("reused", spec)  # someone else's app, by the same name
        fresh = gw.request("/", host="reused.localhost")
        assert (fresh.status, fresh.body) == (200, b"[]")
    finally:
        remove_tree(volume)


# -- log flooding ---------------------------------------------------------------------------------
FLOOD = """
import asyncio, os, threading

def flood():
    line = b"x" * 4095 + b"\\n"
    while True:
        os.write(1, line * 16)

async def handle(reader, writer):
    await reader.readuntil(b"\\r\\n\\r\\n")
    writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 5\\r\\n\\r\\nflood")
    await writer.drain()
    writer.close()

async def main():
    server = await asyncio.start_unix_server(handle, os.environ["DORM_SOCKET"])
    threading.Thread(target=flood, daemon=True).start()
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


def test_a_flooded_log_stays_within_its_cap_and_others_still_start(
    gateway_factory: Any, tmp_path: Path
) -> None:
    gw: Gateway = gateway_factory(
        'isolation = "auto"\nuid_range = "325000-325999"\nlog_max_bytes = "64KiB"\nlog_keep = 2'
    )
    gw.put_app("flood", command_app(tmp_path, "flood", FLOOD))
    assert gw.request("/", host="flood.localhost").status == 200
    logs = gw.data_dir / "logs" / "flood" / "main"
    deadline = time.monotonic() + 30
    while not (logs / "instance.log.2").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (logs / "instance.log.2").exists()  # it has rotated through all it may keep
    apps = str(Path(__file__).parent / "apps")
    for n in range(3):  # the fork server that pumps the flood still starts other tenants
        gw.put_app(
            f"calm{n}",
            {"runtime": "command", "command": [sys.executable, "echo.py"], "app_dir": apps},
        )
        assert gw.request("/", host=f"calm{n}.localhost", timeout=30).status == 200
    assert gw.admin("POST", "/v1/apps/flood/stop")[0] == 200
    gw.wait_state("flood", "cold")  # the log is still now: measure it
    files = list(logs.iterdir())
    assert {p.name for p in files} <= {"instance.log", "instance.log.1", "instance.log.2"}
    assert sum(p.stat().st_size for p in files) <= 3 * 64 * 1024


# -- disk: the socket dir ------------------------------------------------------------------------
FILL_RUN = served("""
import asyncio, errno, os

def fill():
    written = 0
    try:
        for n in range(64):  # 64 files of 4 MiB: far over the cap, far under RLIMIT_FSIZE
            with open(f"/run/dorm/fill{n}", "wb") as fh:
                for _ in range(4):
                    fh.write(b"x" * (1 << 20))
                    fh.flush()
                    written += 1 << 20
    except OSError as exc:
        return written, errno.errorcode[exc.errno]
    return written, None

async def handle(reader, writer):
    await reader.readuntil(b"\\r\\n\\r\\n")
    written, error = fill()
    body = f"{written} {error}".encode()
""")


def test_the_socket_dir_cannot_fill_the_hosts_disk(gateway_factory: Any, tmp_path: Path) -> None:
    """/run/dorm is the tenant's to write, on the host's side of a bind: capped, never the host's
    filesystem (here the same disk as data_dir, the registry and the logs)."""
    gw = sandboxed_gateway(gateway_factory)
    gw.put_app("filler", command_app(tmp_path, "filler", FILL_RUN, limits={"memory": "512MiB"}))
    resp = gw.request("/", host="filler.localhost", timeout=60)
    assert resp.status == 200, resp.body
    written, error = resp.body.decode().split()
    assert error == "ENOSPC" and int(written) <= 2 << 20, resp.body
    assert gw.admin("POST", "/v1/apps/filler/stop")[0] == 200
    gw.wait_state("filler", "cold")
    deadline = time.monotonic() + 15  # its run dir (a mount of its own) is gone with it
    while os.listdir(gw.run_dir) != ["pool"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [e for e in os.listdir(gw.run_dir) if e != "pool"] == []
    assert str(gw.run_dir) not in Path("/proc/self/mountinfo").read_text()
