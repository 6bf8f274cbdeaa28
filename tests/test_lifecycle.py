"""Instance lifecycle end to end: wake, queueing, timeouts, eviction, crashes and shutdown."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import Gateway, echo_spec, read_until_close


def instance_pids(run_dir: Path) -> list[int]:
    """Live processes whose DORM_SOCKET lies under `run_dir`: the gateway's instances."""
    marker = f"DORM_SOCKET={run_dir}/".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ:
            found.append(int(entry.name))
    return found


def test_concurrent_first_requests_share_one_start(gateway: Gateway) -> None:
    gateway.put_app("slow", echo_spec(env={"ECHO_STARTUP_DELAY": "0.5"}))
    with ThreadPoolExecutor(100) as pool:
        results = list(
            pool.map(lambda _: gateway.request("/pid", host="slow.localhost"), range(100))
        )
    assert [r.status for r in results] == [200] * 100
    assert len({r.body for r in results}) == 1  # one process answered them all
    inst = gateway.instance("slow")
    assert inst is not None and inst["starts"] == 1 and inst["state"] == "ready"


def test_queue_full_is_503_with_retry_after(gateway: Gateway) -> None:
    gateway.put_app("q", echo_spec(env={"ECHO_STARTUP_DELAY": "1"}, max_queue=2))
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: gateway.request("/", host="q.localhost"), range(6)))
    statuses = sorted(r.status for r in results)
    assert statuses.count(200) == 2 and statuses.count(503) == 4
    refused = next(r for r in results if r.status == 503)
    assert refused.headers["retry-after"] == "1"
    assert b"already queued" in refused.body


def test_start_timeout_is_504_and_process_killed(gateway: Gateway) -> None:
    gateway.put_app(
        "late",
        echo_spec(env={"ECHO_STARTUP_DELAY": "30", "MARK": "late-marker"}, startup_timeout="0.5s"),
    )
    started = time.monotonic()
    resp = gateway.request("/", host="late.localhost")
    assert resp.status == 504
    assert b"did not become ready within 0.5s" in resp.body
    assert time.monotonic() - started < 5
    inst = gateway.wait_state("late", "cold")
    assert inst["failures"] == 1 and "not ready" in inst["last_error"]


def test_exit_during_startup_is_502_with_reason(gateway: Gateway) -> None:
    gateway.put_app("dies", echo_spec(env={"ECHO_EXIT_AT_START": "7"}))
    resp = gateway.request("/", host="dies.localhost")
    assert resp.status == 502
    assert b"exited with code 7 during startup" in resp.body
    logs = (gateway.data_dir / "logs" / "dies" / "main" / "instance.log").read_text()
    assert "exiting at start as asked" in logs and "exited with code 7" in logs


def test_bad_command_is_502_naming_the_problem(gateway: Gateway) -> None:
    gateway.put_app("nocmd", {"runtime": "command", "command": ["/nonexistent/binary"]})
    resp = gateway.request("/", host="nocmd.localhost")
    assert resp.status == 502
    assert b"No such file or directory" in resp.body


def test_idle_instance_is_evicted_and_woken_again(gateway: Gateway) -> None:
    gateway.put_app("idle", echo_spec(idle_timeout="0.5s"))
    first = gateway.request("/pid", host="idle.localhost")
    assert first.status == 200
    pid = int(first.body)
    gateway.wait_state("idle", "cold", timeout=10)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    second = gateway.request("/pid", host="idle.localhost")
    assert second.status == 200 and int(second.body) != pid


def test_long_stream_is_not_evicted_mid_way(gateway: Gateway) -> None:
    gateway.put_app("streamer", echo_spec(idle_timeout="0.3s"))
    resp = gateway.request("/stream?n=8&delay=0.25", host="streamer.localhost")
    assert resp.status == 200
    assert resp.body == b"".join(b"chunk %d\n" % i for i in range(8))
    inst = gateway.instance("streamer")
    assert inst is not None and inst["starts"] == 1


def test_lru_cap_evicts_least_recently_used_idle(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = gateway_factory("max_warm_instances = 2")
    for name in ("a1", "a2", "a3"):
        gw.put_app(name, echo_spec())
    assert gw.request("/", host="a1.localhost").status == 200
    time.sleep(0.05)
    assert gw.request("/", host="a2.localhost").status == 200
    assert gw.request("/", host="a1.localhost").status == 200  # a2 is now least recently used
    assert gw.request("/", host="a3.localhost").status == 200
    gw.wait_state("a2", "cold")
    assert gw.instance("a1")["state"] == "ready"  # type: ignore[index]
    assert gw.instance("a3")["state"] == "ready"  # type: ignore[index]


def test_cap_with_no_idle_instance_is_503(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = gateway_factory("max_warm_instances = 1")
    gw.put_app("busy", echo_spec())
    gw.put_app("other", echo_spec())
    holder = threading.Thread(
        target=gw.request, args=("/sleep?s=2",), kwargs={"host": "busy.localhost"}
    )
    holder.start()
    try:
        gw.wait_state("busy", "ready")
        time.sleep(0.2)
        resp = gw.request("/", host="other.localhost")
        assert resp.status == 503 and b"at capacity" in resp.body
    finally:
        holder.join(10)


def test_crash_restarts_with_backoff_then_crash_loop_fails(gateway: Gateway) -> None:
    gateway.put_app("crashy", echo_spec())
    assert gateway.request("/crash", host="crashy.localhost").status == 502
    inst = gateway.wait_state("crashy", "cold")
    assert inst["failures"] == 1 and "exited with code 3" in inst["last_error"]
    # The next request restarts it (after a short backoff) and is served.
    assert gateway.request("/", host="crashy.localhost").status == 200
    for _ in range(4):
        assert gateway.request("/crash", host="crashy.localhost").status == 502
        time.sleep(0.05)
        resp = gateway.request("/", host="crashy.localhost")
        if resp.status == 503:
            break
        gateway.wait_state("crashy", "ready")
    resp = gateway.request("/", host="crashy.localhost")
    assert resp.status == 503
    assert b"is failing" in resp.body and b"exited with code 3" in resp.body
    assert int(resp.headers["retry-after"]) > 0
    assert gateway.instance("crashy")["state"] == "failed"  # type: ignore[index]


def test_admin_stop_then_next_request_wakes(gateway: Gateway) -> None:
    pid = int(gateway.request("/pid").body)
    status, body = gateway.admin("POST", "/v1/apps/echo/branches/main/stop")
    assert status == 200, body
    gateway.wait_state("echo", "cold")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert int(gateway.request("/pid").body) != pid


def test_app_change_restarts_with_new_spec(gateway: Gateway) -> None:
    assert gateway.request("/headers").status == 200
    gateway.put_app("echo", echo_spec(env={"GREETING": "v2"}))
    resp = gateway.request("/")
    assert resp.status == 200
    inst = gateway.instance("echo")
    assert inst is not None and inst["starts"] == 1  # a fresh instance for the new spec


def test_graceful_shutdown_drains_in_flight_requests(gateway: Gateway) -> None:
    gateway.put_app("sleeper", echo_spec(env={"MARK": "sleeper-marker-xyz"}))
    assert gateway.request("/", host="sleeper.localhost").status == 200
    result: dict[str, object] = {}

    def slow() -> None:
        result["resp"] = gateway.request("/sleep?s=1.5", host="sleeper.localhost")

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.3)
    assert len(instance_pids(gateway.run_dir)) == 1
    assert gateway.stop(signal.SIGTERM) == 0
    t.join(10)
    resp = result["resp"]
    assert resp.status == 200 and resp.body == b"slept"  # type: ignore[attr-defined]
    assert instance_pids(gateway.run_dir) == []


def test_sigkilled_gateway_leaves_no_instance_behind(gateway: Gateway) -> None:
    pid = int(gateway.request("/pid").body)
    assert gateway.proc is not None
    gateway.proc.kill()
    gateway.proc.wait(10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"instance {pid} outlived the gateway")
    # The next start cleans the stale instance directory and serves again.
    gateway.start()
    assert gateway.request("/").status == 200
    assert len(list(gateway.run_dir.iterdir())) == 1


def test_restart_keeps_apps(gateway: Gateway) -> None:
    gateway.put_app("kept", echo_spec(idle_timeout="7m"))
    assert gateway.stop() == 0
    gateway.start()
    status, body = gateway.admin("GET", "/v1/apps/kept")
    assert status == 200 and body["idle_timeout"] == 420
    assert gateway.request("/", host="kept.localhost").body == b"hello from kept/main\n"


def test_stop_escalates_to_sigkill_after_grace(gateway: Gateway) -> None:
    gateway.put_app("stubborn", echo_spec(env={"ECHO_IGNORE_TERM": "1"}, stop_timeout="0.5s"))
    pid = int(gateway.request("/pid", host="stubborn.localhost").body)
    started = time.monotonic()
    status, _ = gateway.admin("POST", "/v1/apps/stubborn/stop")
    assert status == 200
    gateway.wait_state("stubborn", "cold")
    assert 0.4 < time.monotonic() - started < 5
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    log = (gateway.data_dir / "logs" / "stubborn" / "main" / "instance.log").read_text()
    assert "killed by signal SIGKILL" in log


def test_instance_output_reaches_logs_api(gateway: Gateway) -> None:
    assert gateway.request("/").status == 200
    conn_status, _ = gateway.admin("GET", "/v1/apps/echo")
    assert conn_status == 200
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", gateway.admin_port, timeout=10)
    conn.request(
        "GET",
        "/v1/apps/echo/logs?branch=main&tail=10",
        headers={"Authorization": f"Bearer {gateway.token}"},
    )
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    assert resp.status == 200
    assert "[dorm] started pid" in text and "echo app listening on" in text


def test_dead_fork_server_is_restarted(gateway: Gateway) -> None:
    pid = int(gateway.request("/pid").body)
    assert gateway.proc is not None
    children = (
        Path(f"/proc/{gateway.proc.pid}/task/{gateway.proc.pid}/children").read_text().split()
    )
    forkservers = [
        int(c) for c in children if b"gateway.forkserver" in Path(f"/proc/{c}/cmdline").read_bytes()
    ]
    assert len(forkservers) == 1
    os.kill(forkservers[0], signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("instance outlived its fork server")
    gateway.wait_state("echo", "cold")
    resp = gateway.request("/pid")
    assert resp.status == 200 and int(resp.body) != pid


def _forkserver_of(gateway: Gateway, not_pid: int = 0, timeout: float = 10.0) -> int:
    """The gateway's fork server (waiting for one that is not `not_pid`)."""
    assert gateway.proc is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{gateway.proc.pid}/task/{gateway.proc.pid}/children").read_text()
        for child in children.split():
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                if b"gateway.forkserver" in cmdline and int(child) != not_pid:
                    return int(child)
        time.sleep(0.02)
    raise AssertionError("no (new) fork server")


def test_fork_server_dying_right_after_start_is_restarted_ever_more_slowly(
    gateway: Gateway,
) -> None:
    pid = _forkserver_of(gateway)
    for _ in range(3):  # each one dies within a moment of its start
        os.kill(pid, signal.SIGKILL)
        pid = _forkserver_of(gateway, not_pid=pid)
    log = gateway.log()
    delays = [float(d) for d in re.findall(r"restarting the fork server in ([0-9.]+)s", log)]
    assert len(delays) >= 2 and delays == sorted(delays) and delays[-1] > delays[0], log
    assert gateway.request("/pid").status == 200  # and it serves again


def test_spec_change_lets_in_flight_finish_on_old_instance(gateway: Gateway) -> None:
    old_pid = int(gateway.request("/pid").body)
    result: dict[str, object] = {}
    t = threading.Thread(target=lambda: result.update(resp=gateway.request("/sleep?s=1")))
    t.start()
    time.sleep(0.2)
    gateway.put_app("echo", echo_spec(env={"VERSION": "2"}))
    new_pid = int(gateway.request("/pid").body)
    t.join(10)
    assert new_pid != old_pid
    assert result["resp"].status == 200 and result["resp"].body == b"slept"  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(old_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the old instance was never stopped")


def test_shutdown_closes_open_tunnels_without_waiting_out_the_drain(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = gateway_factory('shutdown_timeout = "20s"')
    gw.put_app("echo", echo_spec())
    with gw.connect() as sock:
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: echo.localhost\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\n\r\n"
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 101 ")
        sock.sendall(b"ping")
        assert sock.recv(4096) == b"ping"
        started = time.monotonic()
        assert gw.stop() == 0
        assert time.monotonic() - started < 5
        assert sock.recv(4096) == b""  # the tunnel was closed, not left hanging


def test_internal_service_is_routable_and_never_evicted(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    """add_internal, exercised in-process against real instances through a real event loop."""
    import asyncio

    from gateway.appspec import parse_app_spec
    from gateway.config import GatewayConfig
    from gateway.instances import InstanceManager
    from gateway.registry import Registry
    from gateway.upstream import UpstreamConnection

    gw: Gateway = gateway_factory(start=False)

    async def scenario() -> None:
        cfg = GatewayConfig(data_dir=str(gw.data_dir), run_dir=str(gw.run_dir), isolation="process")
        registry = Registry(gw.data_dir / "dorm.sqlite")
        await registry.open()
        manager = InstanceManager(cfg, registry)
        manager.upstream_factory = UpstreamConnection
        await manager.start()
        try:
            spec = parse_app_spec("svc", echo_spec(idle_timeout="0.1s"))
            inst = manager.add_internal(spec)
            assert manager.get("svc", "main") is inst
            manager.wake(inst)
            deadline = time.monotonic() + 10
            while inst.state.value != "ready" and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert inst.state.value == "ready"
            await asyncio.sleep(0.8)  # far beyond its idle_timeout
            assert inst.state.value == "ready"
            await manager.app_changed("svc")  # an operator's app of the same name
            assert manager.get("svc", "main") is inst
        finally:
            await manager.shutdown(timeout=2)
            await registry.close()

    asyncio.run(scenario())


def test_connections_beyond_max_connections_get_503_and_are_closed(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = gateway_factory("max_connections = 2")
    gw.put_app("echo", echo_spec())
    first, second = gw.connect(), gw.connect()
    try:
        time.sleep(0.2)  # both accepted
        with gw.connect() as third:
            answer = read_until_close(third, 5)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"too many connections" in answer
        assert b"Retry-After: 1" in answer
    finally:
        first.close()
        second.close()
    time.sleep(0.2)
    assert gw.request("/").status == 200  # room again once others closed
