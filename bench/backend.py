"""The benchmark's app: a minimal, fast HTTP/1.1 keep-alive server (uvloop + httptools).

It answers every request with the same 13-byte body, so the numbers measure the proxies in front of
it, not the app. One process serves on up to three listeners at once, so dorm, nginx and wrk
(directly) all reach the *same* backend process and its cost is identical in each path:

- `$DORM_SOCKET`   — the Unix socket dorm gives every instance of the `command` runtime;
- `$BENCH_SOCKET`  — a second Unix socket, for nginx's upstream (mode 0666: nginx's worker may run
                     as another user);
- `$BENCH_TCP_PORT` — a 127.0.0.1 TCP port for the "direct" baseline (wrk cannot speak to Unix
                     sockets).

`$BENCH_PID_FILE`, if set, receives the pid, so the benchmark can account the backend's CPU and make
sure it is gone at the end. Run as a script (`python bench/backend.py`): dorm starts it that way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

import uvloop
from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

BODY = b"hello, world\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (
    len(BODY),
    BODY,
)
HEAD_RESPONSE = RESPONSE[: -len(BODY)]
CLOSE_RESPONSE = RESPONSE.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)


class Server(asyncio.Protocol):
    """One connection; answers each request when its message completes (so in pipeline order)."""

    __slots__ = ("parser", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = HttpRequestParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade):
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()

    def on_message_complete(self) -> None:
        transport = self.transport
        assert transport is not None
        if not self.parser.should_keep_alive():
            transport.write(CLOSE_RESPONSE)
            transport.close()
        elif self.parser.get_method() == b"HEAD":
            transport.write(HEAD_RESPONSE)
        else:
            transport.write(RESPONSE)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def main() -> int:
    loop = asyncio.get_running_loop()
    servers: list[asyncio.AbstractServer] = []
    paths = [p for p in (os.environ.get("DORM_SOCKET"), os.environ.get("BENCH_SOCKET")) if p]
    for path in paths:
        _unlink(path)  # a stale socket from an earlier run would make bind fail
        servers.append(await loop.create_unix_server(Server, path, backlog=4096))
    if os.environ.get("BENCH_SOCKET"):
        os.chmod(os.environ["BENCH_SOCKET"], 0o666)
    port = os.environ.get("BENCH_TCP_PORT")
    if port:
        servers.append(await loop.create_server(Server, "127.0.0.1", int(port), backlog=4096))
    if not servers:
        print("backend: set DORM_SOCKET, BENCH_SOCKET or BENCH_TCP_PORT", file=sys.stderr)
        return 2
    pid_file = os.environ.get("BENCH_PID_FILE")
    if pid_file:
        with open(pid_file + ".tmp", "w") as fh:
            fh.write(f"{os.getpid()}\n")
        os.replace(pid_file + ".tmp", pid_file)  # readers never see a half-written file
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()
    for path in paths:
        _unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(uvloop.run(main()))
