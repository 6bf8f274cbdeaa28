"""The code runner's warm pools through the gateway's pool API: real gateway, runner, spawners.

The runner's pools live in its spawner processes; `GET /v1/pools` must show them (summed over the
spawners) next to the fork server's, and `PUT /v1/pools/{language}` must move their bounds at run
time — idle sandboxes are built or dismissed, which is observed here through the counts, and the
pre-forked children themselves are counted in the process table. Every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway
from tests.test_runner import RUNNER_HOST, execute, start_runner_gateway, stop_gateway

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the runner needs root: it confines every execution in a sandbox"
)

POOL_CONFIG = """
[runner]
rate_per_minute = 0
max_per_client = 0
spawners = 2
min_idle = 2
max_idle = 4
shrink_after = "2s"
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = start_runner_gateway(tmp_path_factory.mktemp("runner-pools"), POOL_CONFIG)
    yield gateway
    stop_gateway(gateway)


def listing(gw: Gateway) -> dict[str, Any]:
    status, body = gw.admin("GET", "/v1/pools")
    assert status == 200, body
    return dict(body)


def runner_pool(gw: Gateway, name: str = "default") -> dict[str, Any]:
    found = [p for p in listing(gw)["pools"] if p.get("kind") == "runner" and p["pool"] == name]
    assert len(found) == 1, found
    return found[0]


def wait_pool(gw: Gateway, check: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> Any:
    """Poll until the runner's default pool satisfies `check` (bounded)."""
    deadline = time.monotonic() + timeout
    pool: dict[str, Any] = {}
    while time.monotonic() < deadline:
        pool = runner_pool(gw)
        if check(pool):
            return pool
        time.sleep(0.05)
    raise AssertionError(f"the runner pool never got there: {pool}")


def run_python(gw: Gateway, code: str) -> dict[str, Any]:
    status, body, _ = execute(
        gw, {"language": "python", "version": "*", "files": [{"content": code}]}
    )
    assert status == 200, body
    assert body["run"]["status"] is None, body
    return dict(body["run"])


def test_runner_pools_are_listed_with_their_languages(gw: Gateway) -> None:
    body = listing(gw)
    assert body["runner"]["state"] == "ready"
    config = body["runner"]["config"]
    assert config["min_idle"] == 2 and config["max_idle"] == 4 and config["spawners"] == 2
    assert config["refill_concurrency"] == 1 and config["shrink_after"] == 2.0
    # The fork server's pools are still there, marked as runtime pools.
    assert all(p["kind"] in ("runtime", "runner") for p in body["pools"])
    pool = wait_pool(gw, lambda p: p["idle"] == 2 and p["forking"] == 0)
    # The built-in languages use host toolchains and no binds: one layout, one pool for all.
    assert {"python", "bash"} <= set(pool["languages"]), pool
    assert pool["runtime"] == "runner" and pool["shape"]["binds"] == []
    assert pool["min_idle"] == 2 and pool["max_idle"] == 4 and pool["answered"] == 2
    # Two spawners, one idle sandbox each (the total is split evenly).
    assert [s["idle"] for s in pool["spawners"]] == [1, 1], pool
    assert pool["built"] >= 2 and pool["refill_rate"] > 0 and pool["errors"] == []


def test_executions_claim_members_and_the_pool_refills(gw: Gateway) -> None:
    before = wait_pool(gw, lambda p: p["idle"] == 2 and p["forking"] == 0)
    for n in range(4):
        assert run_python(gw, f"print({n} * 7)")["stdout"] == f"{n * 7}\n"
    # Python runs in one sandbox per execution (no compile stage): four spawns, each either a
    # claim of an idle child or a miss; sequential executions on a refilled pool mostly claim.
    after = wait_pool(gw, lambda p: p["idle"] == 2 and p["forking"] == 0)
    spawned = (after["claimed"] - before["claimed"]) + (after["misses"] - before["misses"])
    assert spawned == 4, (before, after)
    assert after["claimed"] > before["claimed"], (before, after)
    # Each claimed child was replaced: the pool built at least that many new ones.
    assert after["built"] - before["built"] >= after["claimed"] - before["claimed"]


def runner_sandbox_roots(gw: Gateway) -> int:
    """Processes that are pid 1 of a pid namespace inside the runner's cgroups: with no
    execution running, exactly the idle pre-forked children (counted by the kernel, not dorm)."""
    parent = gw.config_path.read_text().split('cgroup_parent = "')[1].split('"')[0]
    found = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cgroup = (proc / "cgroup").read_text()
            status = (proc / "status").read_text()
        except OSError:
            continue
        nspid = next((line for line in status.splitlines() if line.startswith("NSpid:")), "")
        if f"/{parent}-runner-" in cgroup and nspid.split()[-1:] == ["1"]:
            found += 1
    return found


def wait_roots(gw: Gateway, wanted: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    seen = -1
    while time.monotonic() < deadline:
        seen = runner_sandbox_roots(gw)
        if seen == wanted:
            return
        time.sleep(0.05)
    raise AssertionError(f"{seen} idle runner sandboxes in the process table, wanted {wanted}")


def test_put_grows_and_shrinks_a_language_pool(gw: Gateway) -> None:
    wait_pool(gw, lambda p: p["idle"] == 2 and p["forking"] == 0)
    status, body = gw.admin("PUT", "/v1/pools/python", {"min_idle": 5, "max_idle": 6})
    assert status == 200, body
    assert body["runtime"] == "runner" and body["pool"] == "default"
    assert "bash" in body["languages"] and body["min_idle"] == 5 and body["max_idle"] == 6
    grown = wait_pool(gw, lambda p: p["idle"] == 5)
    assert grown["min_idle"] == 5 and grown["max_idle"] == 6
    assert sorted(s["idle"] for s in grown["spawners"]) == [2, 3], grown  # 5 over 2 spawners
    wait_roots(gw, 5)
    # An alias names the same pool (bash's "sh"); lowering dismisses the extra children.
    status, body = gw.admin("PUT", "/v1/pools/sh", {"min_idle": 1, "max_idle": 1})
    assert status == 200 and body["pool"] == "default", body
    shrunk = wait_pool(gw, lambda p: p["idle"] == 1 and p["max_idle"] == 1)
    assert shrunk["target"] == 1
    wait_roots(gw, 1)
    assert run_python(gw, "print('still runs')")["stdout"] == "still runs\n"
    overrides = listing(gw)["runner"]["config"]["overrides"]
    assert overrides == {"default": {"min_idle": 1, "max_idle": 1}}
    status, body = gw.admin("PUT", "/v1/pools/c%2B%2B", {"min_idle": 2, "max_idle": 4})
    assert status == 200 and body["pool"] == "default", body
    wait_pool(gw, lambda p: p["idle"] == 2)


@pytest.mark.parametrize(
    ("name", "body", "status", "field"),
    [
        ("python", {"min_idle": 5, "max_idle": 1}, 400, "max_idle"),
        ("python", {"min_idle": 1}, 400, "max_idle"),
        ("python", {"min_idle": -1, "max_idle": 1}, 400, "min_idle"),
        ("python", {"min_idle": 1, "max_idle": 2, "spare": 1}, 400, "spare"),
        ("python", {"min_idle": True, "max_idle": 2}, 400, "min_idle"),
        ("python", [1, 2], 400, None),
        ("cobol", {"min_idle": 1, "max_idle": 2}, 404, "runtime"),
    ],
)
def test_bad_runner_pool_bodies(
    gw: Gateway, name: str, body: Any, status: int, field: str | None
) -> None:
    got, answer = gw.admin("PUT", f"/v1/pools/{name}", body)
    assert got == status, answer
    assert answer["error"]["field"] == field, answer
    assert answer["error"]["message"]


def test_the_runner_keeps_admin_bounds_across_its_restart(gw: Gateway) -> None:
    status, body = gw.admin("PUT", "/v1/pools/bash", {"min_idle": 3, "max_idle": 3})
    assert status == 200, body
    wait_pool(gw, lambda p: p["idle"] == 3)
    status, inst = gw.admin("GET", "/v1/instances/run/main")
    assert status == 200 and inst["pid"], inst
    os.kill(inst["pid"], signal.SIGKILL)  # the service; its spawners follow (parent death)
    gw.wait_state("run", "cold", timeout=15)
    cold = listing(gw)["runner"]
    assert cold == {"state": "cold", "config": None}, cold  # no pools while it is down
    assert run_python(gw, "print(1)")["stdout"] == "1\n"  # the next execution starts it again
    status, now = gw.admin("GET", "/v1/instances/run/main")
    assert now["pid"] not in (None, inst["pid"]), now
    pool = wait_pool(gw, lambda p: p["idle"] == 3)
    assert pool["min_idle"] == 3 and pool["max_idle"] == 3
    status, body = gw.admin("PUT", "/v1/pools/bash", {"min_idle": 2, "max_idle": 4})
    assert status == 200, body


def test_admin_bounds_survive_a_gateway_restart(tmp_path: Path) -> None:
    """Like the app runtimes' bounds (<data_dir>/pool-overrides.json), an operator's PUT for a
    runner language is kept in the data dir: a restarted gateway's runner starts with it, not
    with the config's bounds."""
    gateway = start_runner_gateway(tmp_path, POOL_CONFIG)
    try:
        status, body = gateway.admin("PUT", "/v1/pools/bash", {"min_idle": 1, "max_idle": 3})
        assert status == 200, body
        saved = gateway.data_dir / "runner-pool-overrides.json"
        assert saved.exists()
        stop_gateway(gateway)
        gateway.start()
        assert run_python(gateway, "print(2)")["stdout"] == "2\n"  # wakes the runner
        pool = wait_pool(gateway, lambda p: p["min_idle"] == 1)
        assert pool["max_idle"] == 3, pool
    finally:
        stop_gateway(gateway)


def test_dorm_pools_shows_the_runner(gw: Gateway) -> None:
    out = gw.cli("pools")
    row = next((line for line in out.splitlines() if line.startswith("runner:default")), None)
    assert row is not None, out
    assert "python" in out and "bash" in out, out
    set_out = gw.cli("pools", "--set", "2:5", "--runtime", "bash")
    assert '"pool": "default"' in set_out, set_out
    assert runner_pool(gw)["max_idle"] == 5


def test_the_internal_pool_endpoint_is_not_public(gw: Gateway) -> None:
    """`/dorm/pools` answers only requests carrying the per-start token (the admin listener's)."""
    for method, body in (("GET", None), ("PUT", b'{"min_idle": 0, "max_idle": 0}')):
        resp = gw.request("/dorm/pools/python", host=RUNNER_HOST, method=method, body=body)
        assert resp.status == 404, resp.body
    resp = gw.request(
        "/dorm/pools",
        host=RUNNER_HOST,
        headers={"X-Dorm-Runner-Internal": "guess"},
    )
    assert resp.status == 404, resp.body
    assert runner_pool(gw)["min_idle"] != 0


def test_a_burst_grows_the_pool_and_quiet_shrinks_it(gw: Gateway) -> None:
    status, body = gw.admin("PUT", "/v1/pools/python", {"min_idle": 2, "max_idle": 4})
    assert status == 200, body
    before = wait_pool(gw, lambda p: p["idle"] == 2 and p["target"] == 2)
    burst = 12
    with ThreadPoolExecutor(burst) as pool:
        outs = list(pool.map(lambda n: run_python(gw, f"print({n})")["stdout"], range(burst)))
    assert outs == [f"{n}\n" for n in range(burst)]
    after = runner_pool(gw)
    spawned = (after["claimed"] - before["claimed"]) + (after["misses"] - before["misses"])
    assert spawned == burst, (before, after)
    # Two idle children cannot serve twelve sandboxes: some spawns missed, and a miss on a pool
    # that had members raises its target (up to max_idle, 4 over the two spawners).
    assert after["misses"] > before["misses"], after
    assert 2 < after["peak_target"] <= 4, after
    # shrink_after = 2s without a miss: back to min_idle, the extra children dismissed.
    shrunk = wait_pool(gw, lambda p: p["target"] == 2 and p["idle"] == 2, timeout=15)
    assert shrunk["max_idle"] == 4
    wait_roots(gw, 2)


def spawner_pids(service_pid: int) -> list[int]:
    """The runner service's spawner processes (its children running runtimes.runner.spawner)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == service_pid and b"runtimes.runner.spawner" in cmdline:
            out.append(int(proc.name))
    return sorted(out)


def test_a_stuck_runner_is_a_bounded_503_and_a_stuck_spawner_is_left_out(gw: Gateway) -> None:
    wait_pool(gw, lambda p: p["answered"] == 2 and p["forking"] == 0)
    status, inst = gw.admin("GET", "/v1/instances/run/main")
    assert status == 200 and inst["state"] == "ready", inst
    spawners = spawner_pids(inst["pid"])
    assert len(spawners) == 2, spawners
    # One spawner stopped: the service waits 2 s for it, then lists what the other said.
    os.kill(spawners[1], signal.SIGSTOP)
    try:
        started = time.monotonic()
        pool = runner_pool(gw)
        assert time.monotonic() - started < 4.5
        assert pool["answered"] == 1 and {"spawner": 1, "answered": False} in pool["spawners"]
    finally:
        os.kill(spawners[1], signal.SIGCONT)
    # The service itself stopped: the gateway waits 5 s, then answers 503 saying why.
    os.kill(inst["pid"], signal.SIGSTOP)
    try:
        started = time.monotonic()
        status, body = gw.admin("GET", "/v1/pools")
        waited = time.monotonic() - started
    finally:
        os.kill(inst["pid"], signal.SIGCONT)
    assert status == 503, body
    assert "the code runner did not answer" in body["error"]["message"], body
    assert waited < 10, waited
    assert runner_pool(gw)["answered"] == 2  # and all is well again
