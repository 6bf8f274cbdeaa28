"""The python-asgi and python-wsgi runtimes with real frameworks, deployed as bundles.

Each app's dependencies are vendored into its bundle's vendor/ directory, as an operator's CI
would, and the app is woken through the gateway, evicted and woken again.
"""

from __future__ import annotations

import importlib.util
import io
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect as ws_connect

from tests.conftest import Gateway
from tests.test_bundles import upload

STARLETTE_APP = b"""
import os
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute

async def home(request):
    return PlainTextResponse(f"starlette {os.environ['DORM_BRANCH']} {os.getpid()}")

async def info(request):
    import starlette
    return JSONResponse({"starlette_from": starlette.__file__, "cwd": os.getcwd(),
                         "path": request.url.path, "query": dict(request.query_params)})

async def echo(websocket):
    await websocket.accept()
    async for message in websocket.iter_text():
        await websocket.send_text(f"echo: {message}")

app = Starlette(routes=[Route("/", home), Route("/info", info), WebSocketRoute("/ws", echo)])
"""

FLASK_APP = b"""
import os
from flask import Flask, request

app = Flask(__name__)

@app.get("/")
def home():
    return f"flask {os.environ['DORM_BRANCH']} {os.getpid()}"

@app.post("/form")
def form():
    return {"name": request.form.get("name"), "length": request.content_length}
"""

BROKEN_APP = b"raise RuntimeError('this app cannot even be imported')\n"


def _package_dirs(*names: str) -> list[Path]:
    out = []
    for name in names:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        origin = Path(spec.origin)
        out.append(origin.parent if origin.name == "__init__.py" else origin)
    return out


def bundle(manifest: str, files: dict[str, bytes], vendor: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))

        add("dorm.toml", manifest.encode())
        for name, data in files.items():
            add(name, data)
        for path in _package_dirs(*vendor):
            arcname = f"vendor/{path.name}"
            tar.add(path, arcname=arcname, filter=lambda t: None if "__pycache__" in t.name else t)
    return buf.getvalue()


def _deploy(gw: Gateway, app: str, data: bytes, branch: str = "main") -> dict[str, Any]:
    status, body = upload(gw, app, branch, data)
    assert status in (200, 201), body
    return body


@pytest.mark.parametrize("start", ["zygote", "fresh"])
def test_starlette_app_with_websocket(gateway_factory: Any, start: str) -> None:
    gw: Gateway = gateway_factory()
    manifest = (
        f'runtime = "python-asgi"\nentry = "main:app"\nstart = "{start}"\nidle_timeout = "1s"\n'
    )
    data = bundle(
        manifest,
        {"main.py": STARLETTE_APP},
        vendor=("starlette", "anyio", "idna", "typing_extensions"),
    )
    _deploy(gw, "star", data, "feat")
    first = gw.request("/", host="feat--star.localhost")
    assert first.status == 200, first.body
    assert first.body.startswith(b"starlette feat ")
    info = gw.request("/info?x=1", host="feat--star.localhost")
    assert info.status == 200
    details = __import__("json").loads(info.body)
    assert "/vendor/starlette/" in details["starlette_from"]  # the bundle's copy, not the host's
    assert details["query"] == {"x": "1"}
    with ws_connect(
        f"ws://feat--star.localhost:{gw.port}/ws", sock=gw.connect(), open_timeout=10
    ) as ws:
        for word in ("one", "two", "three"):
            ws.send(word)
            assert ws.recv(timeout=5) == f"echo: {word}"
        time.sleep(1.5)  # longer than idle_timeout: an open WebSocket keeps the instance
        assert gw.instance("star", "feat")["state"] == "ready"  # type: ignore[index]
        ws.send("still here")
        assert ws.recv(timeout=5) == "echo: still here"
    gw.wait_state("star", "cold", branch="feat", timeout=15)
    again = gw.request("/", host="feat--star.localhost")
    assert again.status == 200 and again.body != first.body  # a new process


def test_flask_app_on_wsgi(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory()
    manifest = 'runtime = "python-wsgi"\nentry = "main:app"\nidle_timeout = "1s"\n'
    vendor = ("flask", "werkzeug", "jinja2", "markupsafe", "itsdangerous", "click", "blinker")
    _deploy(gw, "flk", bundle(manifest, {"main.py": FLASK_APP}, vendor=vendor))
    first = gw.request("/", host="flk.localhost")
    assert first.status == 200 and first.body.startswith(b"flask main ")
    form = gw.request(
        "/form",
        host="flk.localhost",
        method="POST",
        body=b"name=dorm",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert form.status == 200
    assert __import__("json").loads(form.body) == {"name": "dorm", "length": 9}
    gw.wait_state("flk", "cold", timeout=15)
    again = gw.request("/", host="flk.localhost")
    assert again.status == 200 and again.body != first.body


def test_app_that_fails_to_import_is_a_502_with_its_traceback_logged(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory()
    gw.put_app("bad", {"runtime": "python-asgi", "entry": "main:app"})
    _deploy(
        gw, "bad", bundle('runtime = "python-asgi"\nentry = "main:app"\n', {"main.py": BROKEN_APP})
    )
    resp = gw.request("/", host="bad.localhost")
    assert resp.status == 502
    assert b"exited with code 1 during startup" in resp.body
    log = (gw.data_dir / "logs" / "bad" / "main" / "instance.log").read_text()
    assert "this app cannot even be imported" in log


def test_replace_environment_reaches_c_python_and_children_while_threads_read_it() -> None:
    """A claimed member installs its tenant's environment with one store to `environ` (see
    runtimes.python.replace_environment): getenv() in C, os.environ and a child process all see
    exactly the new environment, and threads calling getenv() meanwhile keep running."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    script = (
        "import ctypes, os, subprocess, sys, threading\n"
        "from runtimes.python import replace_environment\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.getenv.restype = ctypes.c_char_p\n"
        "stop = False\n"
        "def reader():\n"
        "    while not stop:\n"
        "        libc.getenv(b'PATH'); libc.getenv(b'MISSING')\n"
        "threads = [threading.Thread(target=reader) for _ in range(4)]\n"
        "[t.start() for t in threads]\n"
        "for i in range(2000):\n"
        "    replace_environment({'PATH': '/usr/bin:/bin', 'ROUND': str(i), 'X': 'y' * (i % 50)})\n"
        "stop = True\n"
        "[t.join() for t in threads]\n"
        "assert libc.getenv(b'ROUND') == b'1999' and libc.getenv(b'HOME') is None\n"
        "assert dict(os.environ) == {'PATH': '/usr/bin:/bin', 'ROUND': '1999', 'X': 'y' * 49}\n"
        "out = subprocess.run(['env'], capture_output=True, text=True).stdout.split()\n"
        "assert sorted(out) == ['PATH=/usr/bin:/bin', 'ROUND=1999', 'X=' + 'y' * 49], out\n"
        "os.environ['LATER'] = '1'\n"
        "assert libc.getenv(b'LATER') == b'1' and libc.getenv(b'ROUND') == b'1999'\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout == "ok\n", (done.stdout, done.stderr)
