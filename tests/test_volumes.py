"""Persistent /data volumes through a real sandboxing gateway: idmapped, never re-chowned.

What is checked: a volume of 2,000 files (left by the older chown-per-start scheme, owned by an
old instance uid) is adopted by the storage owner once, then two successive instances with
different uids (zygote/fresh starts, and pool-member claims) read and write it, see every file as
their own uid, and leave every file's owner (and ctime: no chown) untouched on disk; files they
create land as the storage owner. On a filesystem without idmapped mounts (ramfs) the gateway
falls back to chowning to each instance's uid, says so once in its log, and still works.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandboxes import detect_isolation, libc
from sandboxes.idmap import STORAGE_GID, STORAGE_UID
from tests.conftest import Gateway, readable_app
from tests.sandboxes.test_idmap import host_owners, make_volume
from tests.test_pools import start_gateway, wait_pool

LEVEL = detect_isolation()
pytestmark = pytest.mark.skipif(
    LEVEL != "sandbox",
    reason=f"idmapped volumes need root sandboxes (namespaces and cgroups); this host: {LEVEL}",
)
S = STORAGE_UID
FILES = 2000

APP = """
import json, os
async def app(scope, receive, send):
    if scope['type'] != 'http':
        return
    uid, gid = os.getuid(), os.getgid()
    if scope['path'] == '/ping':  # no volume needed
        await send({'type': 'http.response.start', 'status': 200, 'headers': []})
        await send({'type': 'http.response.body', 'body': b'pong'})
        return
    if scope['path'] == '/write':
        with open('/data/d0/f0', 'a') as f:
            f.write('+')
        with open(f'/data/made-by-{uid}', 'w') as f:
            f.write('mine')
    seen, foreign = 0, 0
    for root, dirs, files in os.walk('/data'):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            seen += 1
            foreign += (st.st_uid, st.st_gid) != (uid, gid)
    body = json.dumps({'uid': uid, 'seen': seen, 'foreign': foreign,
                       'f0': open('/data/d0/f0').read()})
    await send({'type': 'http.response.start', 'status': 200, 'headers': []})
    await send({'type': 'http.response.body', 'body': body.encode()})
"""

NO_POOL = "[pool]\nmin_idle = 0\nmax_idle = 0\n"


def code_dir(tmp_path: Path) -> str:
    return readable_app(tmp_path, "code", APP)


def _spec(code: str) -> dict[str, Any]:
    return {"runtime": "python-asgi", "entry": "main:app", "app_dir": code}


def volume(gw: Gateway, app: str) -> Path:
    return gw.data_dir / "volumes" / app / "main"


def fill(vol: Path, owner: int) -> None:
    """FILES files in 20 directories, owned by ``owner`` (an old instance uid, say)."""
    vol.parent.mkdir(parents=True, exist_ok=True)
    make_volume(vol, per_dir=FILES // 20, owner=owner)


def hit(gw: Gateway, app: str, path: str = "/write") -> dict[str, Any]:
    resp = gw.request(path, host=f"{app}.localhost", timeout=30)
    assert resp.status == 200, (resp.status, resp.body, gw.log()[-3000:])
    seen: dict[str, Any] = json.loads(resp.body)
    return seen


def stop(gw: Gateway, app: str) -> None:
    status, body = gw.admin("POST", f"/v1/apps/{app}/stop")
    assert status == 200, body
    gw.wait_state(app, "cold")


def last_path(gw: Gateway, app: str) -> str:
    status, inst = gw.admin("GET", f"/v1/instances/{app}/main")
    assert status == 200, inst
    return str(inst["last_start"]["path"])


def check_instance(seen: dict[str, Any], n: int, extra: int) -> None:
    """The tenant saw every file as its own, its writes and the earlier instances' included."""
    assert seen["foreign"] == 0, seen
    assert seen["seen"] == FILES + 20 + extra, seen
    assert seen["f0"] == "0/0" + "+" * n, seen  # d0/f0, as make_volume wrote it


def test_volume_is_adopted_once_then_never_chowned(gateway_factory: Any, tmp_path: Path) -> None:
    gw = start_gateway(gateway_factory, NO_POOL)
    code = code_dir(tmp_path)
    fill(volume(gw, "keeper"), owner=310500)  # the older scheme's last instance uid
    for name in ("keeper", "other"):
        gw.put_app(name, {**_spec(code), "volume": True})
    first = hit(gw, "keeper")
    check_instance(first, 1, extra=1)
    assert last_path(gw, "keeper") in ("zygote", "fresh")
    adopted = host_owners(volume(gw, "keeper"))
    assert {o[:2] for o in adopted.values()} == {(S, STORAGE_GID)}  # migrated once
    assert "attached idmapped" in gw.log()
    # No other host user can reach a volume (nor a setuid file a tenant left there).
    assert os.stat(volume(gw, "keeper").parent).st_mode & 0o777 == 0o700
    stop(gw, "keeper")
    fill(volume(gw, "other"), owner=S)
    hit(gw, "other")  # takes the uid keeper just gave back (the free list is LIFO)
    second = hit(gw, "keeper")
    assert second["uid"] != first["uid"]
    check_instance(second, 2, extra=2)
    after = host_owners(volume(gw, "keeper"))
    assert {o[:2] for o in after.values()} == {(S, STORAGE_GID)}
    touched = {k for k in adopted if after[k][2] != adopted[k][2]}
    assert touched <= {"d0/f0", "d0"}, sorted(touched)[:5]  # no chown: ctimes unchanged
    assert f"made-by-{second['uid']}" in after
    assert gw.log().count("attached idmapped") == 1  # said once per filesystem


def pooled_with_volume(factory: Any, tmp_path: Path, app: str) -> Gateway:
    """A pooling gateway with `app` (a /data volume) and "primer" (none) on the same code; the
    primer has been woken, so the shape's pool is being built."""
    gw = start_gateway(factory)
    code = code_dir(tmp_path)
    gw.put_app("primer", _spec(code))
    gw.put_app(app, {**_spec(code), "volume": True})
    assert gw.request("/ping", host="primer.localhost").status == 200
    return gw


def test_pool_member_claims_attach_the_volume_idmapped(
    gateway_factory: Any, tmp_path: Path
) -> None:
    gw = pooled_with_volume(gateway_factory, tmp_path, "keeper")
    fill(volume(gw, "keeper"), owner=S)
    before = host_owners(volume(gw, "keeper"))
    uids = []
    for n in (1, 2):
        wait_pool(gw, lambda p: p["idle"] >= 1)
        seen = hit(gw, "keeper")
        assert last_path(gw, "keeper") == "pool"
        check_instance(seen, n, extra=n)
        uids.append(seen["uid"])
        stop(gw, "keeper")
        after = host_owners(volume(gw, "keeper"))
        assert {o[:2] for o in after.values()} == {(S, STORAGE_GID)}
        touched = {k for k in before if after[k][2] != before[k][2]}
        assert touched <= {"d0/f0", "d0"}, sorted(touched)[:5]
    assert uids[0] != uids[1]  # members are never reused: a new uid each claim


@pytest.fixture
def ramfs_volumes(tmp_path: Path) -> Iterator[Path]:
    """A ramfs (no idmapped mounts) where the next gateway keeps its volumes."""
    where = tmp_path / "data" / "volumes"  # the first gateway_factory gateway's
    where.mkdir(parents=True)
    libc.mount(b"ramfs", str(where).encode(), b"ramfs", 0, b"mode=0700")
    try:
        yield where
    finally:
        libc.umount2(str(where).encode(), libc.MNT_DETACH)


def test_without_idmap_support_each_start_chowns(
    gateway_factory: Any, tmp_path: Path, ramfs_volumes: Path
) -> None:
    gw = start_gateway(gateway_factory, NO_POOL)
    assert volume(gw, "keeper").parent.parent == ramfs_volumes
    code = code_dir(tmp_path)
    gw.put_app("keeper", {**_spec(code), "volume": True})
    gw.put_app("other", {**_spec(code), "volume": True})
    fill(volume(gw, "keeper"), owner=S)
    fill(volume(gw, "other"), owner=S)
    first = hit(gw, "keeper")
    check_instance(first, 1, extra=1)
    owners = {o[:2] for o in host_owners(volume(gw, "keeper")).values()}
    assert owners == {(first["uid"], first["uid"])}  # the older scheme: chowned to the instance
    log = gw.log()
    assert "cannot be idmapped" in log and "ramfs" in log, log[-2000:]
    stop(gw, "keeper")
    hit(gw, "other")
    second = hit(gw, "keeper")
    assert second["uid"] != first["uid"]
    check_instance(second, 2, extra=2)
    owners = {o[:2] for o in host_owners(volume(gw, "keeper")).values()}
    assert owners == {(second["uid"], second["uid"])}
    assert gw.log().count("cannot be idmapped") == 1


def test_doctor_shows_the_volume_ownership_in_use(
    tmp_path: Path, ramfs_volumes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    (tmp_path / "elsewhere").mkdir()  # probed itself: no ramfs mounted below it
    for data, mode in ((tmp_path / "elsewhere", "idmap"), (ramfs_volumes.parent, "chown")):
        config = tmp_path / f"{mode}.toml"
        config.write_text(f'[gateway]\ndata_dir = "{data}"\n')
        assert main(["doctor", "--json", "--config", str(config)]) == 0
        volumes = json.loads(capsys.readouterr().out)["volumes"]
        assert volumes["mode"] == mode, volumes
        assert main(["doctor", "--config", str(config)]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("/data"))
        wanted = "idmapped mounts (owned by 2147483646" if mode == "idmap" else "ramfs"
        assert wanted in line, line


def test_a_volume_that_cannot_be_made_ready_fails_the_start_and_keeps_the_pool(
    gateway_factory: Any, tmp_path: Path
) -> None:
    """Not the member's fault: the start fails saying why, and no idle member is spent on it."""
    gw = pooled_with_volume(gateway_factory, tmp_path, "broken")
    before = wait_pool(gw, lambda p: p["idle"] >= 2 and not p.get("forking"))
    members = set(before["idle_pids"])
    vol = volume(gw, "broken")
    vol.mkdir(parents=True)  # root's: the claim would adopt it, and cannot (read-only)
    subprocess.run(["mount", "--bind", str(vol), str(vol)], check=True, timeout=10)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(vol)], check=True, timeout=10)
        resp = gw.request("/", host="broken.localhost")
        assert resp.status == 502, resp.body
        assert b"Read-only file system" in resp.body, resp.body
        after = wait_pool(gw, lambda p: True)
        assert set(after["idle_pids"]) == members, (before, after)  # the same ones, all idle
    finally:
        subprocess.run(["umount", str(vol)], check=True, timeout=10)
