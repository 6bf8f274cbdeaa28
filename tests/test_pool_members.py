"""Serving pool members: a claimed member must behave exactly like a sandbox started for the tenant.

What is checked, each through a real sandboxing gateway: the WSGI runtime, ASGI lifespan state,
an app that cannot be imported (a clear error, never a member that looks ready), a lifespan that
fails, the member's own uid (reported, unique, from the pool's quarter of uid_range), a persistent
/data volume, and the tenant's hostname.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from sandboxes import detect_isolation
from tests.conftest import Gateway, readable_app
from tests.test_pools import find_forkserver, start_gateway, wait_pool

LEVEL = detect_isolation()
pytestmark = pytest.mark.skipif(
    LEVEL != "sandbox",
    reason=f"warm pools need sandboxes (root with namespaces and cgroups); this host: {LEVEL}",
)

ASGI = """
import json, os, socket
async def app(scope, receive, send):
    if scope['type'] == 'lifespan':
        while True:
            message = await receive()
            if message['type'] == 'lifespan.startup':
                if os.environ.get('FAIL_STARTUP'):
                    await send({'type': 'lifespan.startup.failed', 'message': 'no database'})
                    return
                scope['state']['greeting'] = 'set at startup'
                await send({'type': 'lifespan.startup.complete'})
            else:
                await send({'type': 'lifespan.shutdown.complete'})
                return
    if scope['path'] == '/write':
        with open('/data/count', 'a') as f:
            f.write('x')
    count = open('/data/count').read() if os.path.exists('/data/count') else ''
    body = json.dumps({
        'state': scope.get('state', {}).get('greeting'),
        'uid': os.getuid(),
        'hostname': socket.gethostname(),
        'etc_hostname': open('/etc/hostname').read(),
        'etc_hosts': open('/etc/hosts').read(),
        'resolves': socket.gethostbyname(socket.gethostname()),
        'count': count,
    })
    await send({'type': 'http.response.start', 'status': 200, 'headers': []})
    await send({'type': 'http.response.body', 'body': body.encode()})
"""

WSGI = """
import os
def app(environ, start_response):
    start_response('200 OK', [('Content-Type', 'text/plain')])
    return [('wsgi ' + environ['PATH_INFO'] + ' ' + os.environ['DORM_APP']).encode()]
"""


@pytest.fixture
def gw(gateway_factory: Any) -> Gateway:
    return start_gateway(gateway_factory)


def last_start(gw: Gateway, app: str) -> dict[str, Any]:
    status, inst = gw.admin("GET", f"/v1/instances/{app}/main")
    assert status == 200, inst
    return dict(inst)


def prime(gw: Gateway, source_dir: str) -> None:
    """Start one python-asgi app so the shape's pool is built, then wait for two members."""
    gw.put_app("primer", {"runtime": "python-asgi", "entry": "main:app", "app_dir": source_dir})
    assert gw.request("/", host="primer.localhost").status == 200
    wait_pool(gw, lambda p: p["idle"] >= 2)


def real_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def test_claimed_member_is_the_tenant(gw: Gateway, tmp_path: Path) -> None:
    asgi = readable_app(tmp_path, "asgi", ASGI)
    prime(gw, asgi)
    gw.put_app("lively", {"runtime": "python-asgi", "entry": "main:app", "app_dir": asgi})
    resp = gw.request("/", host="lively.localhost")
    assert resp.status == 200, resp.body
    seen = json.loads(resp.body)
    inst = last_start(gw, "lively")
    assert inst["last_start"]["path"] == "pool", inst
    assert (
        seen["state"] == "set at startup"
    )  # its lifespan ran at the claim, state reaches requests
    assert seen["hostname"] == "lively"  # set in the member's UTS namespace at the claim
    # ... and in the files a library reads for it (written at the claim: the member was built
    # before its name was known), so the tenant's own name resolves without a DNS lookup.
    assert seen["etc_hostname"] == "lively\n"
    assert "127.0.0.1\tlocalhost lively\n" in seen["etc_hosts"], seen["etc_hosts"]
    assert seen["resolves"] == "127.0.0.1"
    assert seen["uid"] == inst["uid"] == real_uid(inst["pid"])
    first, last = 310000, 311999  # start_gateway's uid_range: members use its top quarter
    assert last - (last - first + 1) // 4 < seen["uid"] <= last
    primer = gw.instance("primer")
    assert primer is not None and primer["uid"] != seen["uid"]


def name_file_fds(pid: int) -> int:
    """How many of a fork server's fds are members' /etc/hostname or /etc/hosts files."""
    fd_dir = Path(f"/proc/{pid}/fd")
    targets = []
    for fd in os.listdir(fd_dir):
        try:
            targets.append(os.readlink(fd_dir / fd))
        except OSError:
            continue  # closed meanwhile
    return sum(1 for t in targets if t.endswith(("/hostname", "/hosts")))


def test_name_files_are_held_only_for_idle_members(gw: Gateway, tmp_path: Path) -> None:
    """The fork server keeps two fds per idle member (its name files, filled at the claim) and
    none once a member is claimed or gone: starts do not leak them."""
    asgi = readable_app(tmp_path, "asgi", ASGI)
    prime(gw, asgi)
    for name in ("one", "two", "three"):
        gw.put_app(name, {"runtime": "python-asgi", "entry": "main:app", "app_dir": asgi})
        resp = gw.request("/", host=f"{name}.localhost")
        assert resp.status == 200, resp.body
        assert json.loads(resp.body)["resolves"] == "127.0.0.1"
    pool = wait_pool(gw, lambda p: p["idle"] >= 2 and not p.get("forking"))
    forkserver = find_forkserver(gw)
    assert forkserver is not None
    assert name_file_fds(forkserver) == 2 * pool["idle"], pool


def test_wsgi_app_from_the_pool(gw: Gateway, tmp_path: Path) -> None:
    # Members do not know their interface before the claim: one pool serves asgi and wsgi apps
    # of the same sandbox shape.
    prime(gw, readable_app(tmp_path, "asgi", ASGI))
    wsgi = readable_app(tmp_path, "wsgi", WSGI)
    gw.put_app("classic", {"runtime": "python-wsgi", "entry": "main:app", "app_dir": wsgi})
    resp = gw.request("/hello", host="classic.localhost")
    assert resp.status == 200 and resp.body == b"wsgi /hello classic", resp.body
    assert last_start(gw, "classic")["last_start"]["path"] == "pool"
    # The member timed its own import of the app (reported with "live", maybe after "ready").
    deadline = time.monotonic() + 5
    while (start := last_start(gw, "classic")["last_start"])["import_ms"] is None:
        assert time.monotonic() < deadline, start
        time.sleep(0.02)
    assert 0 < start["import_ms"] < start["total_ms"], start  # the import is inside the start


def test_volume_survives_and_belongs_to_the_member_uid(gw: Gateway, tmp_path: Path) -> None:
    asgi = readable_app(tmp_path, "asgi", ASGI)
    prime(gw, asgi)
    gw.put_app(
        "keeper", {"runtime": "python-asgi", "entry": "main:app", "app_dir": asgi, "volume": True}
    )
    assert json.loads(gw.request("/write", host="keeper.localhost").body)["count"] == "x"
    assert last_start(gw, "keeper")["last_start"]["path"] == "pool"
    status, _ = gw.admin("POST", "/v1/apps/keeper/stop")
    assert status == 200
    gw.wait_state("keeper", "cold")
    wait_pool(gw, lambda p: p["idle"] >= 1)
    seen = json.loads(gw.request("/write", host="keeper.localhost").body)
    assert seen["count"] == "xx"  # the new member (another uid) owns the volume now
    assert last_start(gw, "keeper")["last_start"]["path"] == "pool"


@pytest.mark.parametrize(
    ("entry", "env", "wanted"),
    [
        ("nowhere:app", {}, "cannot import 'nowhere'"),
        ("main:missing", {}, "has no attribute 'missing'"),
        ("main:app", {"FAIL_STARTUP": "1"}, "lifespan startup failed"),
    ],
)
def test_a_claim_that_fails_is_a_clear_error(
    gw: Gateway, tmp_path: Path, entry: str, env: dict[str, str], wanted: str
) -> None:
    asgi = readable_app(tmp_path, "asgi", ASGI)
    prime(gw, asgi)
    spec = {"runtime": "python-asgi", "entry": entry, "app_dir": asgi, "env": env}
    gw.put_app("broken", spec)
    resp = gw.request("/", host="broken.localhost", timeout=30)
    assert resp.status == 502, resp.body
    # The member exits 2; then a fresh interpreter fails the same app (granian: code 1).
    assert re.search(r"exited with code \d during startup", resp.body.decode()), resp.body
    logs = "".join(
        p.read_text(errors="replace") for p in (gw.data_dir / "logs" / "broken").rglob("*.log")
    )
    assert wanted in logs, logs  # the instance's log says why
    assert "started in a fresh interpreter" in logs, logs
    inst = last_start(gw, "broken")
    assert inst["state"] in ("cold", "failed") and inst["pid"] is None, inst


def test_pool_bounds_set_through_the_api_survive_a_restart(gw: Gateway, tmp_path: Path) -> None:
    prime(gw, readable_app(tmp_path, "asgi", ASGI))
    status, body = gw.admin("PUT", "/v1/pools/python-asgi", {"min_idle": 3, "max_idle": 5})
    assert status == 200, body
    saved = json.loads((gw.data_dir / "pool-overrides.json").read_text())
    assert saved == {"python-asgi": {"min_idle": 3, "max_idle": 5}}
    gw.stop()
    gw.start()
    config = gw.admin("GET", "/v1/pools")[1]["config"]
    assert config["overrides"]["python-asgi"] == {"min_idle": 3, "max_idle": 5}
    assert gw.request("/", host="primer.localhost").status == 200
    wait_pool(gw, lambda p: p["idle"] == 3 and p["max_idle"] == 5)  # the saved bounds apply
    # A damaged file is ignored (the defaults apply), never a gateway that will not start.
    gw.stop()
    (gw.data_dir / "pool-overrides.json").write_text("{not json")
    gw.start()
    assert gw.admin("GET", "/v1/pools")[1]["config"]["overrides"] == {}


def test_an_exhausted_member_uid_range_falls_back_and_recovers(
    gateway_factory: Any, tmp_path: Path
) -> None:
    """Four uids: one (the top quarter) for pool members, three for instances. A pool that wants
    two members gets one; while its uid is lent to an instance, starts fork from the zygote."""
    gw: Gateway = gateway_factory('isolation = "auto"\nuid_range = "310000-310003"', start=False)
    with gw.config_path.open("a") as fh:
        fh.write("\n[pool]\nmin_idle = 2\nmax_idle = 2\n")
    gw.start()
    asgi = readable_app(tmp_path, "asgi", ASGI)
    for name in ("first", "second", "third"):
        gw.put_app(name, {"runtime": "python-asgi", "entry": "main:app", "app_dir": asgi})
    assert gw.request("/", host="first.localhost").status == 200
    wait_pool(gw, lambda p: p["idle"] == 1)
    time.sleep(1.5)  # builds back off after the failed one; still one member, not two
    assert wait_pool(gw, lambda p: True)["idle"] == 1
    seen = json.loads(gw.request("/", host="second.localhost").body)
    assert last_start(gw, "second")["last_start"]["path"] == "pool"
    assert seen["uid"] == 310003  # the only member uid
    resp = gw.request("/", host="third.localhost")  # no member, no uid to build one: zygote
    assert resp.status == 200, resp.body
    assert last_start(gw, "third")["last_start"]["path"] == "zygote"
    assert json.loads(resp.body)["uid"] < 310003
    status, _ = gw.admin("POST", "/v1/apps/second/stop")
    assert status == 200
    wait_pool(gw, lambda p: p["idle"] == 1, timeout=20)  # its uid came back: rebuilt
