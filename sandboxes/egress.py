"""Opt-in egress: a per-sandbox network namespace wired to a host bridge with NAT (pyroute2).

This module is imported only for ``network="egress"`` specs; the default ``none`` mode never loads
pyroute2 (≈180 ms import, ≈10 ms per netlink round trip), keeping it off the cold-start path.

Topology::

    sandbox netns                         host
    eth0 10.250.X.Y/32  ── veth ──  dv-<hash>  ── bridge dorm-br0 10.250.0.1/16 ── NAT ── uplink

What the sandbox can reach is decided by routes *inside its own netns*, which the tenant cannot
change (no CAP_NET_ADMIN there; netlink writes need it):

* default route via 10.250.0.1 ``onlink`` (the gateway is a next hop, not a destination)
* ``prohibit`` routes (route lookup fails with EACCES, no packet leaves) for 169.254.0.0/16
  (cloud metadata), 10.250.0.0/16 (the bridge subnet: other sandboxes and the gateway address
  itself), 224.0.0.0/4, 0.0.0.0/8, and every IPv4 address configured on the host at setup time
  (so the admin API and any other host listener on 0.0.0.0 are unreachable through any host IP)
* IPv6 disabled in the sandbox netns; the bridge port is ``isolated`` so sandboxes cannot talk to
  each other at layer 2 either; AF_PACKET/raw sockets are unavailable (no CAP_NET_RAW, seccomp).

The host side needs ``net.ipv4.ip_forward=1`` (set on first use, restored by ``shutdown``) and an
nftables ``ip dorm`` table with a postrouting masquerade for 10.250.0.0/16.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any, Final

from . import libc, netns

STATE_DIR: Final = "/run/dorm-egress"
BRIDGE: Final = "dorm-br0"
SUBNET: Final = ipaddress.IPv4Network("10.250.0.0/16")
GATEWAY: Final = ipaddress.IPv4Address("10.250.0.1")
NFT_TABLE: Final = "dorm"
BLOCKED: Final = ("169.254.0.0/16", "224.0.0.0/4", "0.0.0.0/8", str(SUBNET))
RTN_PROHIBIT: Final = 8
IP_FORWARD: Final = "/proc/sys/net/ipv4/ip_forward"


@dataclass(slots=True)
class EgressNet:
    """One sandbox's network: its netns fd (the child setns-es into it) and host-side names."""

    name: str
    state_file: str
    veth: str
    address: str
    netns_fd: int
    blocked: tuple[str, ...] = field(default=())

    def teardown(self) -> None:
        """Delete the veth (its peer goes with it) and the state file; close the netns fd."""
        with contextlib.suppress(Exception):
            _delete_link(self.veth)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.state_file)
        if self.netns_fd >= 0:
            os.close(self.netns_fd)
            self.netns_fd = -1


def _ipr() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


def _delete_link(ifname: str) -> None:
    with _ipr() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if idx:
            ipr.link("del", index=idx[0])


_forward_before: str | None = None


def ensure_host() -> None:
    """Bridge, its address, ip_forward and the NAT table (idempotent)."""
    global _forward_before
    with _ipr() as ipr:
        if not ipr.link_lookup(ifname=BRIDGE):
            ipr.link("add", ifname=BRIDGE, kind="bridge")
        idx = ipr.link_lookup(ifname=BRIDGE)[0]
        have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx, family=2)}
        if str(GATEWAY) not in have:
            ipr.addr("add", index=idx, address=str(GATEWAY), prefixlen=SUBNET.prefixlen)
        ipr.link("set", index=idx, state="up")
    with open(IP_FORWARD) as f:
        current = f.read().strip()
    if current != "1":
        if _forward_before is None:
            _forward_before = current
        with open(IP_FORWARD, "w") as f:
            f.write("1")
    _ensure_nat()


def _ensure_nat() -> None:
    from pyroute2.nftables.expressions import ipv4addr, masq
    from pyroute2.nftables.main import NFTables

    with NFTables(nfgen_family=2) as nft:
        if any(t.get_attr("NFTA_TABLE_NAME") == NFT_TABLE for t in nft.get_tables()):
            return
        nft.table("add", name=NFT_TABLE)
        nft.chain(
            "add", table=NFT_TABLE, name="postrouting", hook="postrouting", type="nat", priority=100
        )
        nft.rule(
            "add",
            table=NFT_TABLE,
            chain="postrouting",
            expressions=(ipv4addr(src=str(SUBNET)), masq()),
        )


def nat_rules() -> list[Any]:
    """The rules of dorm's NAT table (for ``dorm doctor`` and tests)."""
    from pyroute2.nftables.main import NFTables

    with NFTables(nfgen_family=2) as nft:
        return [r for r in nft.get_rules() if r.get_attr("NFTA_RULE_TABLE") == NFT_TABLE]


def shutdown() -> None:
    """Remove the bridge and NAT table and restore ip_forward (when no egress sandbox remains)."""
    global _forward_before
    with contextlib.suppress(Exception):
        _delete_link(BRIDGE)
    with contextlib.suppress(Exception):
        from pyroute2.nftables.main import NFTables

        with NFTables(nfgen_family=2) as nft:
            nft.table("del", name=NFT_TABLE)
    if _forward_before is not None:
        with open(IP_FORWARD, "w") as f:
            f.write(_forward_before)
        _forward_before = None


def host_addresses() -> list[str]:
    """Every IPv4 address on the host (except loopback), blocked as a destination."""
    with _ipr() as ipr:
        out = []
        for a in ipr.get_addr(family=2):
            addr = a.get_attr("IFA_ADDRESS")
            if addr and not ipaddress.IPv4Address(addr).is_loopback:
                out.append(addr)
    return sorted(set(out))


def _address_for(key: str) -> ipaddress.IPv4Address:
    used = set()
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(STATE_DIR):
            with contextlib.suppress(OSError), open(os.path.join(STATE_DIR, entry)) as f:
                used.add(f.read().split()[1])
    start = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")
    size = SUBNET.num_addresses
    for i in range(size):
        offset = (start + i) % size
        addr = SUBNET.network_address + offset
        if offset in (0, 1, size - 1) or str(addr) in used:
            continue
        return addr
    raise OSError(28, "egress address pool exhausted")


def resolv_conf() -> bytes:
    """Host nameservers, minus loopback ones (unreachable from the sandbox netns)."""
    lines = []
    with contextlib.suppress(OSError), open("/etc/resolv.conf") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    if not ipaddress.ip_address(parts[1]).is_loopback:
                        lines.append(f"nameserver {parts[1]}")
    return ("\n".join(lines) + "\n").encode() if lines else b"# no usable host nameserver\n"


def _in_netns(fd: int, own: int, fn: Any) -> Any:
    libc.setns(fd, libc.CLONE_NEWNET)
    try:
        return fn()
    finally:
        libc.setns(own, libc.CLONE_NEWNET)


def setup(spec: Any) -> EgressNet:
    """Create the sandbox's netns and wire it up (runs in the fork server, before forking)."""
    ensure_host()
    os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
    key = f"{spec.cgroup_parent}--{spec.name}"
    veth = "dv-" + hashlib.sha256(key.encode()).hexdigest()[:10]
    address = _address_for(key)
    blocked = (*BLOCKED, *(f"{a}/32" for a in host_addresses()))
    state_file = os.path.join(STATE_DIR, key)
    with open(state_file, "w") as f:
        f.write(f"{veth} {address}\n")
    own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    fd = -1
    try:
        libc.unshare(libc.CLONE_NEWNET)
        try:
            fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            netns.loopback_up()
            with open("/proc/sys/net/ipv6/conf/all/disable_ipv6", "w") as f:
                f.write("1")
        finally:
            libc.setns(own, libc.CLONE_NEWNET)
        net = EgressNet(spec.name, state_file, veth, str(address), fd, blocked)
        with _ipr() as ipr:
            ipr.link("add", ifname=veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": fd})
            host_idx = ipr.link_lookup(ifname=veth)[0]
            bridge_idx = ipr.link_lookup(ifname=BRIDGE)[0]
            ipr.link("set", index=host_idx, master=bridge_idx)
            ipr.link("set", index=host_idx, state="up")
            with contextlib.suppress(Exception):
                ipr.brport("set", index=host_idx, isolated=1)

        def inside() -> None:
            with _ipr() as ipr:
                idx = ipr.link_lookup(ifname="eth0")[0]
                ipr.addr("add", index=idx, address=str(address), prefixlen=32)
                ipr.link("set", index=idx, state="up")
                ipr.route("add", dst="0.0.0.0/0", gateway=str(GATEWAY), oif=idx, flags=4)  # onlink
                for dst in blocked:
                    ipr.route("add", dst=dst, type=RTN_PROHIBIT)

        _in_netns(fd, own, inside)
        return net
    except BaseException:
        with contextlib.suppress(Exception):
            _delete_link(veth)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state_file)
        if fd >= 0:
            os.close(fd)
        raise
    finally:
        os.close(own)


def route_verdict(netns_fd: int, dst: str) -> str:
    """How the sandbox netns would route ``dst``: "ok" or the errno name of the failed lookup.

    Asks the kernel (RTM_GETROUTE) without sending any packet; tests use it to prove the metadata
    address and host addresses are blocked.
    """
    from pyroute2.netlink.exceptions import NetlinkError

    own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:

        def lookup() -> str:
            with _ipr() as ipr:
                try:
                    ipr.route("get", dst=dst)
                except NetlinkError as e:
                    return os.strerror(e.code) if e.code else "error"
                return "ok"

        return str(_in_netns(netns_fd, own, lookup))
    finally:
        os.close(own)


def cleanup_stale(cgroup_parent: str) -> int:
    """Remove veths and state files left by a crashed gateway; returns how many were found."""
    found = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(STATE_DIR):
            if not entry.startswith(cgroup_parent + "--"):
                continue
            path = os.path.join(STATE_DIR, entry)
            with contextlib.suppress(OSError), open(path) as f:
                veth = f.read().split()[0]
                with contextlib.suppress(Exception):
                    _delete_link(veth)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            found += 1
    return found
