"""Per-start network and UTS setup inside the child: bring ``lo`` up, set the hostname.

Why raw ioctls: a new network namespace has only a down ``lo``. Two ioctls on a throwaway UDP socket
(SIOCGIFFLAGS/SIOCSIFFLAGS) bring it up in microseconds, whereas importing pyroute2 costs ~180 ms
and each netlink round trip through it ~10 ms. pyroute2 is reserved for egress setup
(``egress.py``), which runs in the parent, off this path.
"""

from __future__ import annotations

import fcntl
import socket
import struct
from typing import Final

from . import libc

SIOCGIFFLAGS: Final = 0x8913
SIOCSIFFLAGS: Final = 0x8914
IFF_UP: Final = 0x1
_IFREQ: Final = struct.Struct("16sH14x")


def loopback_up() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        req = fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, _IFREQ.pack(b"lo", 0))
        _, flags = _IFREQ.unpack(req)
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | IFF_UP))
    finally:
        s.close()


def set_hostname(name: bytes) -> None:
    libc.sethostname(name)
