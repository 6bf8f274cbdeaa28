"""`make demo` is half of the README's quick start: the gateway it runs (`python -m gateway.demo`)
must come up, wake its app on the first request, and do what the guide it prints says.

The demo listens on fixed ports (8080, 8081) and keeps its state in ./demo-data; here every
`[gateway]` key it writes that would touch the machine is overridden through `DORM_*`, as any
key can be, and it runs in a directory of its own.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import ROOT, free_port


def _get(port: int, host: str, path: str = "/") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _wait_for_output(proc: subprocess.Popen[str], marker: str, timeout: float) -> str:
    """The demo's stdout up to the line containing `marker` (it prints its guide, then serves)."""
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the demo exited ({proc.poll()}):\n{''.join(seen)}")
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"no {marker!r} from the demo within {timeout}s:\n{''.join(seen)}")


def _wait_listening(port: int, proc: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the demo exited with {proc.returncode}"
        try:
            _get(port, "health.invalid")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_make_demo_serves_its_app_and_the_guide_works(tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    run_dir = tempfile.mkdtemp(prefix="dorm-demo-test-")  # short: socket paths are 108 bytes
    env = {
        **os.environ,
        "DORM_LISTEN": f"127.0.0.1:{port}",
        "DORM_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        "DORM_RUN_DIR": run_dir,
        "DORM_CGROUP_PARENT": f"dorm-demo-test-{os.getpid()}",
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.demo"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        guide = _wait_for_output(proc, "Stop with Ctrl-C", timeout=60)
        assert "curl http://hello.localhost:8080/" in guide
        token_file = tmp_path / "demo-data" / "data" / "admin.token"
        assert f"$(cat {token_file})" in guide
        _wait_listening(port, proc, timeout=60)

        status, body = _get(port, "hello.localhost")  # asleep until now: a cold start
        assert status == 200, body
        assert b"hello from hello, branch main" in body
        assert b"greeting: welcome to dorm" in body
        status, body = _get(port, "hello.localhost", "/stream")
        assert status == 200
        assert body.decode().splitlines() == [f"tick {i}" for i in range(5)]

        # The guide's branch preview, as printed: PUT the branch with its env, then visit it.
        token = token_file.read_text().strip()
        conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=30)
        try:
            conn.request(
                "PUT",
                "/v1/apps/hello/branches/feature-x",
                body=json.dumps({"env": {"GREETING": "preview"}}),
                headers={"Authorization": f"Bearer {token}"},
            )
            resp = conn.getresponse()
            assert resp.status in (200, 201), resp.read()
            resp.read()
        finally:
            conn.close()
        status, body = _get(port, "feature-x--hello.localhost")
        assert status == 200, body
        assert b"branch feature-x" in body and b"greeting: preview" in body

        # `dorm ps`, as the guide says, finds the gateway through DORM_ADMIN_URL/TOKEN.
        ps = subprocess.run(
            [sys.executable, "-m", "gateway", "ps", "--json"],
            env={
                **env,
                "DORM_ADMIN_URL": f"http://127.0.0.1:{admin_port}",
                "DORM_ADMIN_TOKEN": token,
            },
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert ps.returncode == 0, ps.stderr
        warm = {(i["app"], i["branch"]) for i in json.loads(ps.stdout) if i["state"] == "ready"}
        assert warm == {("hello", "main"), ("hello", "feature-x")}, ps.stdout

        proc.send_signal(signal.SIGINT)  # Ctrl-C: drain, stop both instances, exit cleanly
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
        subprocess.run(["rm", "-rf", "--one-file-system", run_dir], check=False, timeout=60)
