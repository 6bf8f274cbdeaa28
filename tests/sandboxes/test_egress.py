"""Egress mode: a sandbox reaches a test host living in a network namespace this test creates,
through the bridge and NAT, while link-local (metadata) and every host address stay unroutable.

Traffic goes only to loopback and to that test host; blocked destinations are proven by asking the
kernel for a route (RTM_GETROUTE) from inside the sandbox's netns, never by sending packets there.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sandboxes import libc

from .conftest import PY, Runner

pyroute2 = pytest.importorskip("pyroute2", reason="pyroute2 not installed: egress mode needs it")

from sandboxes import egress  # noqa: E402


@dataclass
class PeerHost:
    netns_fd: int
    veth: str
    host_ip: str
    peer_ip: str


@pytest.fixture
def test_host() -> Iterator[PeerHost]:
    """A network namespace with one veth to the host: 10.251.N.2, host side 10.251.N.1."""
    n = os.getpid() % 200 + 20
    veth = f"dth{os.getpid() % 100000}"
    own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    libc.unshare(libc.CLONE_NEWNET)
    try:
        fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        libc.setns(own, libc.CLONE_NEWNET)
    host_ip, peer_ip = f"10.251.{n}.1", f"10.251.{n}.2"
    with pyroute2.IPRoute() as ipr:
        ipr.link("add", ifname=veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": fd})
        idx = ipr.link_lookup(ifname=veth)[0]
        ipr.addr("add", index=idx, address=host_ip, prefixlen=24)
        ipr.link("set", index=idx, state="up")
    libc.setns(fd, libc.CLONE_NEWNET)
    try:
        with pyroute2.IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
            idx = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=idx, address=peer_ip, prefixlen=24)
            ipr.link("set", index=idx, state="up")
    finally:
        libc.setns(own, libc.CLONE_NEWNET)
    try:
        yield PeerHost(fd, veth, host_ip, peer_ip)
    finally:
        with contextlib.suppress(Exception), pyroute2.IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=veth)
            if idx:
                ipr.link("del", index=idx[0])
        os.close(fd)
        os.close(own)


@pytest.fixture
def egress_host() -> Iterator[None]:
    with open(egress.IP_FORWARD) as f:
        forward_before = f.read()
    yield
    egress.shutdown()
    with pyroute2.IPRoute() as ipr:
        assert ipr.link_lookup(ifname=egress.BRIDGE) == []
    with open(egress.IP_FORWARD) as f:
        assert f.read() == forward_before


def _listen_in(th: PeerHost) -> tuple[socket.socket, int]:
    own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    libc.setns(th.netns_fd, libc.CLONE_NEWNET)
    try:
        srv = socket.socket()  # the socket stays bound to the test host's namespace
        srv.bind((th.peer_ip, 0))
        srv.listen(1)
        srv.settimeout(10)
    finally:
        libc.setns(own, libc.CLONE_NEWNET)
        os.close(own)
    return srv, srv.getsockname()[1]


def test_egress_reaches_test_host_through_nat_and_blocks_the_rest(
    sbx: Runner, test_host: PeerHost, egress_host: None
) -> None:
    srv, port = _listen_in(test_host)
    loop_listener = socket.socket()
    loop_listener.bind(("127.0.0.1", 0))
    loop_listener.listen(1)
    lport = loop_listener.getsockname()[1]
    code = (
        "import errno, socket, time\n"
        f"s = socket.create_connection(({test_host.peer_ip!r}, {port}), timeout=5)\n"
        "print(s.recv(16).decode(), flush=True)\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {lport}), timeout=2); print('HOST-LO')\n"
        "except OSError as e:\n"
        "    print(errno.errorcode.get(e.errno, e), flush=True)\n"
        "time.sleep(30)\n"
    )
    spec = sbx.spec(network="egress")
    sb, out, err = sbx.start([PY, "-I", "-S", "-c", code], spec)
    try:
        conn, peer = srv.accept()
        conn.sendall(b"hello")
        conn.close()
        deadline = time.monotonic() + 10
        while len(out.read_text().split()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert out.read_text().split() == ["hello", "ECONNREFUSED"], err.read_text()
        # NAT: the test host saw the host's address on its link, not the sandbox's 10.250.x.y
        assert peer[0] == test_host.host_ip
        net = sb.egress
        assert net is not None
        verdict = egress.route_verdict
        assert verdict(net.netns_fd, test_host.peer_ip) == "ok"
        assert verdict(net.netns_fd, "169.254.169.254") == os.strerror(13)  # prohibit → EACCES
        assert verdict(net.netns_fd, str(egress.GATEWAY)) == os.strerror(13)
        assert verdict(net.netns_fd, test_host.host_ip) == os.strerror(13)  # a host address
        for addr in egress.host_addresses():
            assert verdict(net.netns_fd, addr) == os.strerror(13), addr
        rules = egress.nat_rules()
        assert len(rules) == 1
        veth = net.veth
    finally:
        srv.close()
        loop_listener.close()
        sbx.finish(sb, out, err, timeout=0)
    with pyroute2.IPRoute() as ipr:
        assert ipr.link_lookup(ifname=veth) == []  # the sandbox's veth went with it
    assert not os.path.exists(os.path.join(egress.STATE_DIR, f"{spec.cgroup_parent}--{spec.name}"))


def test_default_mode_never_imports_pyroute2(cgroup_parent: str, tmp_path: Path) -> None:
    """The cold-start path of network="none" must not pay pyroute2's import."""
    sock = tmp_path / "sock"
    sock.mkdir()
    code = (
        "import os, sys\n"
        "from sandboxes import SandboxSpec, spawn\n"
        f"spec = SandboxSpec(name='nopyroute2', uid=299998, socket_dir={str(sock)!r},"
        f" cgroup_parent={cgroup_parent!r})\n"
        "sb = spawn(spec, ['/bin/true'], {}, stdout_fd=1, stderr_fd=2)\n"
        "status = sb.wait(10); sb.cleanup()\n"
        "print(status, 'pyroute2' in sys.modules)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert r.stdout.split() == ["0", "False"], r.stderr


def test_cleanup_stale_removes_egress_leftovers(cgroup_parent: str, tmp_path: Path) -> None:
    """A crashed gateway leaves egress state files (the veth dies with the netns)."""
    from sandboxes import SandboxSpec, cleanup_stale

    sock = tmp_path / "sock"
    sock.mkdir()
    spec = SandboxSpec(
        name="egress-crash", uid=299997, socket_dir=str(sock), cgroup_parent=cgroup_parent
    )
    try:
        net = egress.setup(spec)  # as spawn would, then "crash" without teardown
        state = net.state_file
        veth = net.veth
        os.close(net.netns_fd)
        assert os.path.exists(state)
        assert cleanup_stale(cgroup_parent) == 1
        assert not os.path.exists(state)
        with pyroute2.IPRoute() as ipr:
            assert ipr.link_lookup(ifname=veth) == []
    finally:
        egress.shutdown()
