"""Warm pools and cold-start timing end to end: a real gateway, real sandboxes.

What is checked: every start is timed stage by stage (and the path it took is reported); pool
members carry nothing of a tenant before their claim and are never reused after it; bursts beyond
the pool still answer; a pool member or the fork server dying is repaired.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from sandboxes import detect_isolation
from tests.conftest import Gateway

LEVEL = detect_isolation()
pytestmark = pytest.mark.skipif(
    LEVEL != "sandbox",
    reason=f"warm pools need sandboxes (root with namespaces and cgroups); this host: {LEVEL}",
)

APP = (
    "import json, os\n"
    "async def app(scope, receive, send):\n"
    "    if scope['type'] != 'http':\n"
    "        return\n"
    "    body = json.dumps([os.environ.get('DORM_APP'), os.getpid(), sorted(os.listdir('/tmp'))])\n"
    "    if scope['path'] == '/touch':\n"
    "        open('/tmp/left-behind', 'w').write('secret')\n"
    "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
    "    await send({'type': 'http.response.body', 'body': body.encode()})\n"
)


def app_dir(tmp_path: Path) -> str:
    """A raw ASGI app readable by the sandbox uids."""
    app = tmp_path / "asgi"
    app.mkdir(exist_ok=True)
    (app / "main.py").write_text(APP)
    os.chmod(tmp_path, 0o755)
    os.chmod(app, 0o755)
    return str(app)


def spec(code: str, **extra: Any) -> dict[str, Any]:
    return {"runtime": "python-asgi", "entry": "main:app", "app_dir": code, **extra}


@pytest.fixture
def gw(gateway_factory: Any, tmp_path: Path) -> Gateway:
    gateway: Gateway = gateway_factory('isolation = "auto"\nuid_range = "310000-310999"')
    return gateway


def hit(gw: Gateway, app: str, path: str = "/") -> tuple[str, int, list[str]]:
    resp = gw.request(path, host=f"{app}.localhost")
    assert resp.status == 200, resp.body
    name, pid, tmp = json.loads(resp.body)
    return name, pid, tmp


def test_every_start_is_timed_by_stage(gw: Gateway, tmp_path: Path) -> None:
    code = app_dir(tmp_path)
    gw.put_app("timed", spec(code))
    assert hit(gw, "timed")[0] == "timed"
    status, inst = gw.admin("GET", "/v1/instances/timed/main")
    assert status == 200, inst
    start = inst["last_start"]
    assert start["path"] in ("pool", "zygote")
    for stage in ("queue_ms", "spawn_ms", "claim_ms", "confine_ms", "app_ms", "total_ms"):
        assert start[stage] is not None and start[stage] >= 0, (stage, start)
    assert start["first_byte_ms"] is not None and start["first_byte_ms"] >= 0
    assert start["total_ms"] >= start["app_ms"]
    status, stats = gw.admin("GET", "/v1/stats")
    assert status == 200
    summary = stats["cold_starts"][start["path"]]
    assert summary["count"] == 1
    assert set(summary["stages"]) >= {"queue", "claim", "confine", "app", "first_byte"}
    assert gw.admin("GET", "/v1/instances/nope/main")[0] == 404
    # The fork server writes the instance's log; the note may land just after the response.
    wanted = f"({start['path']}: claim"
    deadline = time.monotonic() + 5
    text = ""
    while wanted not in text and time.monotonic() < deadline:
        text = "".join(p.read_text(errors="replace") for p in (gw.data_dir / "logs").rglob("*.log"))
        time.sleep(0.02)
    assert "ready in" in text and wanted in text, text
    print(json.dumps(start))
