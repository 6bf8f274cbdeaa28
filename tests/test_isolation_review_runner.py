"""Adversarial review of the code runner: what one snippet can see or leave for the next one.

Each snippet runs in a fresh sandbox (docs/runner.md); these check, from inside, what the other
runner suites do not: the snippet holds exactly fds 0-2 (no channel of the init's, spawner's or
service's), a snippet that closes its output and keeps running still ends at its time limit, and
nothing of one snippet (files in /tmp or /dev/shm, a daemon that left its session) is there for
the next one, even on the same per-execution uid.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from tests.conftest import Gateway
from tests.test_runner import (
    RUNNER_CONFIG,
    assert_healthy,
    run,
    runner_processes,
    start_runner_gateway,
    stop_gateway,
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the runner needs root: it confines every execution in a sandbox"
)

FDS = """
import json, os
fds = {}
for name in os.listdir('/proc/self/fd'):
    try:
        fds[name] = os.readlink('/proc/self/fd/' + name)
    except OSError:
        pass  # listdir's own directory fd, gone by now
print(json.dumps(fds))
"""

LEAVE = """
import os, time
open('/tmp/left-by-1', 'w').write('secret of snippet 1')
open('/dev/shm/left-by-1', 'w').write('secret of snippet 1')
if os.fork() == 0:
    os.setsid()  # out of the program's session and process group
    if os.fork() == 0:
        os.close(1)
        os.close(2)
        while True:  # a daemon that would write into the next snippet's /tmp
            try:
                open('/tmp/daemon-was-here', 'w').close()
            except OSError:
                pass
            time.sleep(0.01)
    os._exit(0)
print(os.getuid())
"""

LOOK = """
import os
print(os.getuid(), sorted(os.listdir('/tmp')), sorted(os.listdir('/dev/shm')))
print(sorted(p for p in os.listdir('/proc') if p.isdigit()))
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = start_runner_gateway(tmp_path_factory.mktemp("review-runner"), RUNNER_CONFIG)
    yield gateway
    stop_gateway(gateway)
    assert runner_processes() == []


def test_a_snippet_holds_only_its_stdio(gw: Gateway) -> None:
    result = run(gw, "python", FDS)
    assert result["code"] == 0, result
    fds = json.loads(result["stdout"])
    assert set(fds) == {"0", "1", "2"}, fds
    assert all(target.startswith("pipe:") for target in fds.values()), fds
    assert_healthy(gw)


def test_closing_its_output_does_not_outlive_the_time_limit(gw: Gateway) -> None:
    for language, code in (
        ("python", "import os, time\nos.close(1)\nos.close(2)\ntime.sleep(30)"),
        ("bash", "exec >&- 2>&-; sleep 30"),
    ):
        result = run(gw, language, code, run_timeout=1000)
        assert (result["status"], result["signal"]) == ("TO", "SIGKILL"), result
        assert result["message"] == "Time limit exceeded (wall clock)"
        assert result["wall_time"] < 5000
    assert_healthy(gw)


def test_nothing_of_one_snippet_is_there_for_the_next(gw: Gateway) -> None:
    first = run(gw, "python", LEAVE)
    assert first["code"] == 0, first
    second = run(gw, "python", LOOK)
    assert second["code"] == 0, second
    seen, pids = second["stdout"].splitlines()
    uid, listing = seen.split(" ", 1)
    assert listing == "['box'] []", second["stdout"]  # its own work dir only, an empty shm
    assert pids == "['2']"  # itself (its init is hidden): no daemon of the first snippet's
    assert uid.isdigit() and first["stdout"].strip().isdigit()
    assert_healthy(gw)
