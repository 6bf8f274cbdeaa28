"""Loopback TCP ports for test gateways that no other test run on this machine holds.

Why not "bind port 0, close, return the number": the kernel picks that number from the ephemeral
range, so (1) two test runs on one machine (several people run suites side by side here) can be
handed the same port, and (2) between the close and the gateway's bind, any outgoing connection
on the machine may take the port as its local port. Both showed up as a gateway failing to start
with EADDRINUSE, or a test talking to another run's gateway.

What this does instead:
  * ports come from a span just *below* the ephemeral range (read from
    /proc/sys/net/ipv4/ip_local_port_range), where the kernel never picks a local port for an
    outgoing connection or a bind to port 0;
  * each port handed out is reserved for the life of the process that asked for it, with an
    exclusive `fcntl` record lock on byte `port` of one shared lock file
    (`/tmp/dorm-test-ports/ports.lock`). Another process asking skips every locked byte; the
    kernel drops the locks when the process exits, however it exits, so nothing is ever left
    reserved by a crashed run. One file and one descriptor for every port: a long run that asks
    for a thousand ports does not hold a thousand descriptors;
  * a port that is locked by nobody is still checked to be bindable on 127.0.0.1 (a process
    that is not a dorm test may listen there), without SO_REUSEADDR, so a port with connections
    in TIME_WAIT is skipped too.

POSIX record locks belong to the process, and closing *any* descriptor of the lock file drops
all of them: so the file is opened once, here, and never elsewhere. They are not inherited by
children, which is right: the test process is the one that owns its gateways' ports.

`DORM_TEST_PORT_DIR` moves the lock file (tests of this module use a private one) and
`DORM_TEST_PORT_RANGE` ("low-high", inclusive) overrides the span.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import socket
import threading
from pathlib import Path

DEFAULT_DIR = "/tmp/dorm-test-ports"
LOCK_NAME = "ports.lock"
SPAN = 10_000  # ports taken from just below the ephemeral range
FLOOR = 10_000  # never below this: well-known and registered services cluster down there

_mutex = threading.Lock()  # threads of one process: the record lock cannot tell them apart
# (lock file, port) for every port this process was handed; its lock is held until exit.
_held: set[tuple[Path, int]] = set()
_files: dict[Path, int] = {}  # lock file → its one descriptor in this process, never closed


def port_range() -> range:
    """The ports to hand out: `SPAN` ports below the kernel's ephemeral range, or above it when
    there is not enough room below (a host whose ephemeral range starts low)."""
    override = os.environ.get("DORM_TEST_PORT_RANGE")
    if override:
        low_text, _, high_text = override.partition("-")
        return range(int(low_text), int(high_text) + 1)
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        low, high = int(text[0]), int(text[1])
    except (OSError, ValueError, IndexError):
        low, high = 32768, 60999  # Linux's default
    below = range(max(FLOOR, low - SPAN), low)
    above = range(high + 1, min(65536, high + 1 + SPAN))
    return below if len(below) >= len(above) else above


def _lock_file() -> tuple[Path, int]:
    """The shared lock file and its descriptor, opened once per process (see the module
    docstring: closing it would drop every reservation).

    The directory is sticky and world-writable, so runs as other users share it; the file is
    opened without O_CREAT when it exists, since O_CREAT on another user's file in a sticky
    directory is refused where fs.protected_regular is set."""
    directory = Path(os.environ.get("DORM_TEST_PORT_DIR", DEFAULT_DIR))
    path = directory / LOCK_NAME
    if path in _files:
        return path, _files[path]
    try:
        directory.mkdir(mode=0o1777)
        os.chmod(directory, 0o1777)  # mkdir's mode is masked by the umask
    except FileExistsError:
        pass
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
    while True:
        try:
            fd = os.open(path, flags)
            break
        except FileNotFoundError:
            pass
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue  # another process created it a moment ago: open that one
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o666)  # the umask again
        break
    _files[path] = fd
    return path, fd


def _try_lock(fd: int, port: int) -> bool:
    """Take the exclusive lock on byte `port` without waiting; False if another process has it."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, port, os.SEEK_SET)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    return True


def _unlock(fd: int, port: int) -> None:
    fcntl.lockf(fd, fcntl.LOCK_UN, 1, port, os.SEEK_SET)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is bindable now and reserved for this process until it
    exits: no other process using this function is handed it meanwhile, and no outgoing
    connection takes it (it is outside the ephemeral range)."""
    with _mutex:
        path, fd = _lock_file()
        ports = port_range()
        # A random start spreads concurrent runs over the span, so they rarely probe the same
        # locked bytes one after the other.
        start = random.randrange(len(ports))
        for i in range(len(ports)):
            port = ports[(start + i) % len(ports)]
            if (path, port) in _held or not _try_lock(fd, port):
                continue
            if _bindable(port):
                _held.add((path, port))
                return port
            _unlock(fd, port)  # in use by something else: leave it for a later look
    raise RuntimeError(
        f"no free test port in {ports.start}-{ports.stop - 1}: every one is reserved by a "
        f"running test process ({path}) or bound by something else"
    )
