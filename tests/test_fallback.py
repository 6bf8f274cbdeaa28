"""The start fallback chain end to end: pool member or zygote fork, then a fresh interpreter, and a
start the fork server's death interrupted tried again once it is back.

"Never fail a request that a slower path could serve": each test has an app, or an event, that
the fast path cannot serve and asserts that the request is answered anyway, by which path, and
why (`last_start.fallback`, the instance's log, `GET /v1/stats`).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway, Response
from tests.test_pools import (
    LEVEL,
    POOL,
    app_dir,
    find_forkserver,
    forkserver_pid,
    hit,
    spec,
    start_gateway,
    wait_pool,
)

pytestmark = pytest.mark.skipif(
    LEVEL != "sandbox",
    reason=f"the fallback chain starts from sandboxed pools; this host: {LEVEL}",
)

# Stands for every app a process forked from dorm's zygote cannot run (a C extension that is not
# fork-safe, an app that re-executes its own command line): it insists on an interpreter that
# was started to run it, which a fresh start is and a zygote fork (or pool member) is not.
OWN_INTERPRETER = (
    "import json, sys\n"
    "if 'runtimes.python' not in sys.orig_argv:\n"
    "    raise SystemExit(f'needs an interpreter of its own, not {sys.orig_argv[:3]}')\n"
    "async def app(scope, receive, send):\n"
    "    if scope['type'] != 'http':\n"
    "        return\n"
    "    body = json.dumps({'argv': sys.orig_argv, 'hash_randomization': "
    "sys.flags.hash_randomization})\n"
    "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
    "    await send({'type': 'http.response.body', 'body': body.encode()})\n"
)

# A plain app whose module is a package called `gateway`, like dorm's own: a zygote child must
# import the tenant's, not the fork server's.
NAMED_GATEWAY = (
    "import os\n"
    "async def app(scope, receive, send):\n"
    "    if scope['type'] != 'http':\n"
    "        return\n"
    "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
    "    await send({'type': 'http.response.body', 'body': __file__.encode()})\n"
)

SLOW_IMPORT = (
    "import time\n"
    "time.sleep(1.5)\n"
    "async def app(scope, receive, send):\n"
    "    if scope['type'] != 'http':\n"
    "        return\n"
    "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
    "    await send({'type': 'http.response.body', 'body': b'slow but sure'})\n"
)


@pytest.fixture
def gw(gateway_factory: Any) -> Gateway:
    return start_gateway(gateway_factory)


def code_dir(tmp_path: Path, name: str, files: dict[str, str]) -> str:
    """An app directory readable by the sandbox uids, with `files` (relative path → text)."""
    root = tmp_path / name
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    os.chmod(tmp_path, 0o755)
    for dirpath, _dirs, _files in os.walk(root):
        os.chmod(dirpath, 0o755)
    return str(root)


def python_app(code: str, entry: str = "main:app", **extra: Any) -> dict[str, Any]:
    return {"runtime": "python-asgi", "entry": entry, "app_dir": code, **extra}


def last_start(gw: Gateway, app: str) -> dict[str, Any]:
    status, inst = gw.admin("GET", f"/v1/instances/{app}/main")
    assert status == 200, inst
    start: dict[str, Any] = inst["last_start"]
    return start


def instance_log(gw: Gateway, app: str) -> str:
    path = gw.data_dir / "logs" / app / "main" / "instance.log"
    return path.read_text(errors="replace")


def cold_stats(gw: Gateway) -> dict[str, Any]:
    status, body = gw.admin("GET", "/v1/stats")
    assert status == 200, body
    stats: dict[str, Any] = body["cold_starts"]
    return stats


def test_app_the_zygote_cannot_run_is_served_by_a_fresh_interpreter(
    gw: Gateway, tmp_path: Path
) -> None:
    gw.put_app("first", spec(app_dir(tmp_path)))  # makes the pool's shape known...
    hit(gw, "first")
    wait_pool(gw, lambda p: p["idle"] == 2)  # ...so the next start claims a serving member
    gw.put_app("own", python_app(code_dir(tmp_path, "own", {"main.py": OWN_INTERPRETER})))
    resp = gw.request("/", host="own.localhost")
    assert resp.status == 200, resp.body
    assert "runtimes.python" in json.loads(resp.body)["argv"]
    start = last_start(gw, "own")
    assert start["path"] == "fresh", start
    assert "forked from the zygote exited with code" in start["fallback"], start
    log = instance_log(gw, "own")
    assert "(sandboxed, pool)" in log  # the claimed member failed the app...
    assert "(sandboxed, fresh)" in log  # ...and a fresh interpreter served it
    assert "needs an interpreter of its own" in log  # the zygote-path attempt, in its log
    assert "started in a fresh interpreter: a start forked from the zygote" in log
    stats = cold_stats(gw)
    assert stats["fresh"]["count"] == 1 and stats["fresh"]["fallbacks"] == 1, stats
    status, inst = gw.admin("GET", "/v1/instances/own/main")
    assert inst["failures"] == 0, inst  # served: the failed attempt is not a crash

    # Learned: the next start of the same spec goes straight to a fresh interpreter.
    status, body = gw.admin("POST", "/v1/apps/own/stop")
    assert status == 200, body
    gw.wait_state("own", "cold")
    assert gw.request("/", host="own.localhost").status == 200
    start = last_start(gw, "own")
    assert start["path"] == "fresh" and "learned earlier" in start["fallback"], start
    assert instance_log(gw, "own").count("needs an interpreter of its own") == 1


def test_a_crash_on_the_zygote_path_is_not_learned(gw: Gateway, tmp_path: Path) -> None:
    # Killed by a signal (a crash may be a one-off) rather than exiting: served by a fresh
    # interpreter this time, and the next start tries the zygote path again.
    crashing = (
        "import ctypes, json, sys\n"
        "if 'runtimes.python' not in sys.orig_argv:\n"
        "    ctypes.string_at(0)  # a real fault: pid 1 of a namespace ignores kill(self)\n"
        + OWN_INTERPRETER.split("\n", 3)[3]
    )
    gw.put_app("crashy", python_app(code_dir(tmp_path, "crashy", {"main.py": crashing})))
    for _ in range(2):
        assert gw.request("/", host="crashy.localhost").status == 200
        start = last_start(gw, "crashy")
        assert start["path"] == "fresh", start
        assert "forked from the zygote was killed by signal 11" in start["fallback"], start
        status, body = gw.admin("POST", "/v1/apps/crashy/stop")
        assert status == 200, body
        gw.wait_state("crashy", "cold")
    assert instance_log(gw, "crashy").count("killed by signal SIGSEGV") == 2


def test_app_broken_everywhere_fails_once_with_its_reason(gw: Gateway, tmp_path: Path) -> None:
    broken = "raise RuntimeError('the app is broken')\n"
    gw.put_app("broken", python_app(code_dir(tmp_path, "broken", {"main.py": broken})))
    resp = gw.request("/", host="broken.localhost")
    assert resp.status == 502, resp.body
    assert b"exited with code" in resp.body and b"during startup" in resp.body
    inst = gw.instance("broken")
    assert inst is not None and inst["failures"] == 1, inst  # one start, one failure
    log = instance_log(gw, "broken")
    # Both paths were tried: the zygote fork (or pool member), then a fresh interpreter.
    assert log.count("RuntimeError: the app is broken") == 2, log
    assert "started in a fresh interpreter" in log


def test_python_startup_variables_get_a_fresh_interpreter(gw: Gateway, tmp_path: Path) -> None:
    code = code_dir(tmp_path, "seeded", {"main.py": OWN_INTERPRETER})
    gw.put_app("seeded", python_app(code, env={"PYTHONHASHSEED": "0"}))
    resp = gw.request("/", host="seeded.localhost")
    assert resp.status == 200, resp.body
    assert json.loads(resp.body)["hash_randomization"] == 0  # the variable took effect
    start = last_start(gw, "seeded")
    assert start["path"] == "fresh" and "PYTHONHASHSEED" in start["fallback"], start
    assert "needs an interpreter of its own" not in instance_log(gw, "seeded")  # no wasted try


def test_tenant_package_named_like_dorms_own_loads_from_the_pool(
    gw: Gateway, tmp_path: Path
) -> None:
    files = {"gateway/__init__.py": NAMED_GATEWAY, "sandboxes.py": "VALUE = 1\n"}
    gw.put_app("named", python_app(code_dir(tmp_path, "named", files), entry="gateway:app"))
    resp = gw.request("/", host="named.localhost")
    assert resp.status == 200, resp.body
    assert resp.body == b"/app/gateway/__init__.py"  # the tenant's package, not dorm's
    assert last_start(gw, "named")["path"] in ("pool", "zygote")


def test_start_interrupted_by_forkserver_death_is_tried_again(
    gateway_factory: Any, tmp_path: Path
) -> None:
    gw = start_gateway(gateway_factory, POOL)
    code = code_dir(tmp_path, "slow", {"main.py": SLOW_IMPORT})
    gw.put_app("slow", python_app(code, startup_timeout=20))
    answer: list[Response] = []
    client = threading.Thread(
        target=lambda: answer.append(gw.request("/", host="slow.localhost", timeout=30))
    )
    client.start()
    inst = gw.wait_state("slow", "starting")
    deadline = time.monotonic() + 10
    while inst["pid"] is None and time.monotonic() < deadline:  # spawned, importing
        time.sleep(0.02)
        inst = gw.wait_state("slow", "starting")
    assert inst["pid"] is not None, inst
    old = forkserver_pid(gw)
    os.kill(old, signal.SIGKILL)
    client.join(30)
    assert answer and answer[0].status == 200, answer
    assert answer[0].body == b"slow but sure"
    assert find_forkserver(gw) not in (None, old)
    start = last_start(gw, "slow")
    assert "the fork server died while starting it" in start["fallback"], start
    assert start["total_ms"] > 1500  # it waited for the restart and the import, twice
    assert "started again: the fork server died while starting it" in instance_log(gw, "slow")
