"""The demo tenant `make demo` registers: a dependency-free HTTP app on $DORM_SOCKET.

It is deliberately tiny (stdlib asyncio only) so the demo shows dorm, not a framework: it greets
with its app and branch, shows a per-process id (so you can watch eviction give you a new
process), and
streams a few chunks on /stream.
"""

from __future__ import annotations

import asyncio
import os

# Which process answered: a new one after every wake (a sandboxed app is always pid 1).
INSTANCE = os.urandom(4).hex()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode("latin-1")
            if path == "/stream":
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n"
                )
                for i in range(5):
                    line = f"tick {i}\n".encode()
                    writer.write(b"%x\r\n%s\r\n" % (len(line), line))
                    await writer.drain()
                    await asyncio.sleep(0.5)
                writer.write(b"0\r\n\r\n")
            else:
                app, branch = os.environ["DORM_APP"], os.environ["DORM_BRANCH"]
                body = (
                    f"hello from {app}, branch {branch}, instance {INSTANCE}\n"
                    f"greeting: {os.environ.get('GREETING', 'hi')}\n"
                ).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    server = await asyncio.start_unix_server(handle, os.environ["DORM_SOCKET"])
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
