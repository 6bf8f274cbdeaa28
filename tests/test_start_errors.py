"""Error branches of a start that no other suite reaches, driven with real processes.

* A start on the zygote path that dies before it is ready, but only once the startup deadline has
  passed: there is no time left for a fresh interpreter, so the request gets the failure at once.
* A fork server that dies during a start and cannot be started again: the waiting start fails
  with the reason when its deadline passes, and the gateway recovers once the host does.

Nothing here is mocked: the deadlines pass because real processes take that long, and the fork
server cannot come back because its interpreter cannot be executed in the gateway's own mount
namespace (a private one: nothing outside it changes).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sandboxes import detect_isolation
from tests.conftest import ECHO_APP, Gateway, Response, echo_spec
from tests.test_pools import find_forkserver

# Imported on the zygote path (a fork of the fork server): it binds the instance's socket
# itself and forks a holder that accepts the gateway's readiness probe and health check and
# never answers; once the health check is in, the instance exits with code 3. The gateway's
# health check waits its full 2 s for an answer, so it learns of the exit (reported at once:
# the holder is in its own session, outside the process group the fork server kills, and does
# not hold the log pipe) only after the 1 s startup deadline has passed.
DIES_AFTER_DEADLINE = """\
import os, socket, time
server = socket.socket(socket.AF_UNIX)
server.bind(os.environ["DORM_SOCKET"])
server.listen(8)
ready_r, ready_w = os.pipe()
if os.fork() == 0:
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    with open(os.environ["HOLDER_PIDFILE"], "w") as fh:
        fh.write(str(os.getpid()))
    held = []
    server.settimeout(0.2)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            conn, _ = server.accept()
        except OSError:
            continue
        held.append(conn)
        if len(held) == 2:  # the readiness probe's connection, then the health check's
            os.write(ready_w, b"x")
    os._exit(0)
os.read(ready_r, 1)
print("dies after the gateway's deadline", flush=True)
os._exit(3)
"""


def kill_holder(pidfile: Path) -> None:
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        os.kill(int(pidfile.read_text()), signal.SIGKILL)


def request_in_thread(gw: Gateway, host: str, timeout: float) -> tuple[threading.Thread, list[Any]]:
    answer: list[Any] = []

    def ask() -> None:
        started = time.monotonic()
        try:
            answer.append((gw.request("/", host=host, timeout=timeout), time.monotonic() - started))
        except Exception as exc:  # the assertion below shows it
            answer.append((exc, time.monotonic() - started))

    thread = threading.Thread(target=ask)
    thread.start()
    return thread, answer


def test_zygote_start_dying_after_the_deadline_gets_no_fresh_retry(
    gateway_factory: Any, tmp_path: Path
) -> None:
    gw: Gateway = gateway_factory()  # isolation "process": a python app still forks the zygote
    code = tmp_path / "late"
    code.mkdir()
    (code / "main.py").write_text(DIES_AFTER_DEADLINE)
    pidfile = tmp_path / "holder.pid"
    gw.put_app(
        "late",
        {
            "runtime": "python-asgi",
            "entry": "main:app",
            "app_dir": str(code),
            "health": "/healthz",
            "startup_timeout": "1s",
            "env": {"HOLDER_PIDFILE": str(pidfile)},
        },
    )
    try:
        started = time.monotonic()
        resp = gw.request("/", host="late.localhost", timeout=20)
        took = time.monotonic() - started
        # The request was queued when the start began, so the queue's own limit (the startup
        # timeout) answers it, at ~1 s, while the start is still in the health check.
        assert resp.status == 504, resp
        assert b"did not answer within 1s" in resp.body, resp.body
        assert took < 2.0, took
        # The start ends when the health check gives up (2 s) and finds the exit: too late
        # for a fresh interpreter, so it fails with the exit as its reason, once.
        inst = gw.wait_state("late", "cold", timeout=10)
    finally:
        kill_holder(pidfile)
    assert inst["starts"] == 1 and inst["failures"] == 1, inst
    assert "exited with code 3" in str(inst.get("last_error")), inst  # the exit, not "not ready"
    log = (gw.data_dir / "logs" / "late" / "main" / "instance.log").read_text()
    assert log.count("[dorm] started pid") == 1 and "(unconfined, zygote)" in log, log
    assert log.count("dies after the gateway's deadline") == 1, log
    assert "fresh interpreter" not in log, log  # no retry was made...
    assert "trying a fresh interpreter" not in gw.log()  # ...nor announced


def _interpreter() -> str:
    return os.path.realpath(sys.executable)


def _in_mount_ns(pid: int, *command: str) -> None:
    subprocess.run(["nsenter", "-t", str(pid), "-m", *command], check=True, timeout=10)


@pytest.mark.skipif(os.geteuid() != 0, reason="a private mount namespace needs root")
def test_start_waiting_for_a_fork_server_that_never_comes_back_fails_with_the_reason(
    gateway_factory: Any,
) -> None:
    gw: Gateway = gateway_factory(start=False)
    gw.start(wrapper=["unshare", "--mount", "--propagation", "private", "--"])
    assert gw.proc is not None
    gw.put_app(
        "slow",
        {
            "runtime": "command",
            "command": [sys.executable, ECHO_APP],
            "env": {"ECHO_STARTUP_DELAY": "1.0"},
            "startup_timeout": "3s",
        },
    )
    thread, answer = request_in_thread(gw, "slow.localhost", 20)
    blocked = False
    try:
        deadline = time.monotonic() + 10
        inst = gw.wait_state("slow", "starting")
        while inst["pid"] is None and time.monotonic() < deadline:  # spawned, not yet ready
            time.sleep(0.02)
            inst = gw.wait_state("slow", "starting")
        forkserver = find_forkserver(gw)
        assert forkserver is not None
        # From now on, in the gateway's namespace only, its interpreter cannot be executed: a
        # fork server started again fails at exec, as on a host whose Python was just removed.
        _in_mount_ns(gw.proc.pid, "mount", "--bind", "/dev/null", _interpreter())
        blocked = True
        os.kill(forkserver, signal.SIGKILL)
        thread.join(15)
        assert not thread.is_alive(), "the start hung"
        resp, took = answer[0]
        assert isinstance(resp, Response), resp
        assert resp.status == 502, resp
        assert b"the fork server died while starting it" in resp.body, resp.body
        assert took < 3.0 + 2.0, took  # within the startup timeout (plus slack), not a hang
        assert find_forkserver(gw) is None  # it really did not come back
        # Each failed try to start it again comes later; once the next is due after a new
        # start's deadline, that start fails at once, saying why, rather than at its deadline.
        deadline = time.monotonic() + 15
        while "restarting the fork server in 5.0s" not in gw.log():
            assert time.monotonic() < deadline, gw.log()
            time.sleep(0.05)
        started = time.monotonic()
        resp = gw.request("/", host="slow.localhost", timeout=20)
        assert resp.status == 502, resp
        assert b"the fork server is not running (starting it failed:" in resp.body, resp.body
        assert b"Permission denied" in resp.body, resp.body  # the exec the host refused
        assert time.monotonic() - started < 1.0
    finally:
        if blocked:
            _in_mount_ns(gw.proc.pid, "umount", _interpreter())
        thread.join(15)
    # The host is whole again: the gateway starts a fork server without being restarted itself.
    deadline = time.monotonic() + 15
    while find_forkserver(gw) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert find_forkserver(gw) is not None, gw.log()
    resp = gw.request("/", host="slow.localhost", timeout=20)
    assert resp.status == 200, resp
    assert "could not start the fork server" in gw.log(), gw.log()


def test_start_stops_waiting_for_a_stuck_fork_server_at_its_deadline(
    gateway_factory: Any,
) -> None:
    gw: Gateway = gateway_factory()
    gw.put_app("stuck", {**echo_spec(), "startup_timeout": "1s"})
    forkserver = find_forkserver(gw)
    assert forkserver is not None
    os.kill(forkserver, signal.SIGSTOP)  # alive, answering nothing
    try:
        started = time.monotonic()
        resp = gw.request("/", host="stuck.localhost", timeout=20)
        # The start gives up at its deadline, saying why (not the queue's bare 504 while the
        # start waits on for 30 s with every new request for the app queued behind it).
        assert resp.status == 502, resp
        assert b"the fork server did not answer in time" in resp.body, resp.body
        assert time.monotonic() - started < 2.0
        inst = gw.instance("stuck")
        assert inst is not None and inst["state"] == "cold", inst
    finally:
        os.kill(forkserver, signal.SIGCONT)


@pytest.mark.skipif(
    detect_isolation() != "sandbox", reason="uids are handed out only to sandboxed instances"
)
def test_a_given_up_spawns_uid_is_not_handed_out_until_it_has_ended(
    gateway_factory: Any,
) -> None:
    """A start that stopped waiting for a stuck fork server keeps its uid out of circulation:
    the fork server, once it runs again, still starts that instance (as that uid) before it is
    killed, and another tenant must not be running as the same uid meanwhile."""
    gw: Gateway = gateway_factory('isolation = "auto"')
    apps = str(Path(ECHO_APP).parent)  # bound at /app: the sandbox sees nothing else of ours
    spec = {"runtime": "command", "command": [sys.executable, "echo.py"], "app_dir": apps}
    for name in ("first", "stuck", "next"):
        gw.put_app(name, {**spec, "startup_timeout": "1s"})
    assert gw.request("/", host="first.localhost").status == 200
    first = gw.instance("first")
    assert first is not None and first["uid"], first
    status, body = gw.admin("POST", "/v1/apps/first/branches/main/stop")
    assert status == 200, body
    gw.wait_state("first", "cold")  # its uid is back on top of the (LIFO) free list
    forkserver = find_forkserver(gw)
    assert forkserver is not None
    os.kill(forkserver, signal.SIGSTOP)
    try:
        resp = gw.request("/", host="stuck.localhost", timeout=20)  # takes first's uid
        assert resp.status == 502, resp
    finally:
        os.kill(forkserver, signal.SIGCONT)
    # The fork server now starts "stuck" (killed as late) and then "next".
    assert gw.request("/", host="next.localhost", timeout=20).status == 200
    after = gw.instance("next")
    assert after is not None and after["uid"] and after["uid"] != first["uid"], (first, after)
