"""tests/ports.py: test ports are reserved across processes, outside the ephemeral range.

The processes here are real ones asking at the same time, through a private lock file (so other
test runs on this machine neither disturb these tests nor are disturbed by them).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests import ports
from tests.conftest import ROOT

# A child that reserves N ports, prints them, and holds them until its stdin closes.
ASKER = (
    "import sys\n"
    "from tests.ports import free_port\n"
    "got = []\n"
    "for _ in range(int(sys.argv[1])):\n"
    "    try:\n"
    "        got.append(free_port())\n"
    "    except RuntimeError as exc:\n"
    "        print('ERROR', exc, flush=True)\n"
    "        break\n"
    "print(' '.join(map(str, got)), flush=True)\n"
    "sys.stdin.read()\n"
)


def free_span(size: int) -> tuple[int, int]:
    """`size` consecutive ports below the ephemeral range that are bindable right now."""
    span = ports.port_range()
    run: list[int] = []
    for port in span:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                run = []
                continue
        run.append(port)
        if len(run) == size:
            return run[0], run[-1]
    raise AssertionError(f"no {size} consecutive free ports in {span}")


def asker(count: int, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", ASKER, str(count)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def read_ports(proc: subprocess.Popen[str]) -> list[int]:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert not line.startswith("ERROR"), line
    return [int(p) for p in line.split()] if line else []


def finish(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(10)


@pytest.fixture
def private_env(tmp_path: Path) -> dict[str, str]:
    low, high = free_span(24)
    return {
        **os.environ,
        "DORM_TEST_PORT_DIR": str(tmp_path / "locks"),
        "DORM_TEST_PORT_RANGE": f"{low}-{high}",
    }


def test_default_span_is_below_the_ephemeral_range() -> None:
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    span = ports.port_range()
    assert len(span) >= 1000
    assert span.stop <= low or span.start > high  # never where the kernel picks local ports


def test_two_processes_asking_at_once_never_share_a_port(private_env: dict[str, str]) -> None:
    # 2 x 12 ports out of 24: with any overlap, one of them would come up short.
    first, second = asker(12, private_env), asker(12, private_env)
    try:
        a, b = read_ports(first), read_ports(second)
        assert len(a) == 12 and len(b) == 12, (a, b)
        assert not set(a) & set(b), (a, b)
        low, high = map(int, private_env["DORM_TEST_PORT_RANGE"].split("-"))
        assert set(a) | set(b) == set(range(low, high + 1))
        # While both hold theirs, a third process is refused, saying why, rather than sharing.
        third = subprocess.run(
            [sys.executable, "-c", ASKER, "1"],
            cwd=ROOT,
            env=private_env,
            input="",
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert third.stdout.startswith("ERROR no free test port"), third.stdout
        assert "reserved by a running test process" in third.stdout
    finally:
        finish(first)
        finish(second)
    # The reservations end with the process, however it ends: the span is free again.
    again = asker(24, private_env)
    try:
        assert len(read_ports(again)) == 24
    finally:
        finish(again)


def test_a_port_something_else_listens_on_is_skipped(private_env: dict[str, str]) -> None:
    low, high = map(int, private_env["DORM_TEST_PORT_RANGE"].split("-"))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", low))
        squatter.listen()
        proc = asker(high - low, private_env)
        try:
            got = read_ports(proc)
        finally:
            finish(proc)
    assert sorted(got) == list(range(low + 1, high + 1))  # every other port, once each


def test_one_process_is_never_handed_the_same_port_twice(
    private_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("DORM_TEST_PORT_DIR", "DORM_TEST_PORT_RANGE"):
        monkeypatch.setenv(name, private_env[name])
    got = [ports.free_port() for _ in range(24)]
    assert len(set(got)) == 24
    with pytest.raises(RuntimeError, match="no free test port"):
        ports.free_port()
