"""The fresh-process-per-tenant baseline: `python -m bench.locust.tiny_server PORT`.

What a plain process-per-tenant gateway does on a cold request: start a new interpreter running
the tenant's server and forward the request once it listens. The server is as small as a Python
HTTP server gets (asyncio streams, standard library only), answering like dorm's hello tenant, so
the measured ratio is interpreter start + import + bind against dorm's whole cold path.
"""

from __future__ import annotations

import asyncio
import sys
import time

IMPORTED = time.time()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer every request on the connection with the hello body, until the client closes."""
    try:
        while await reader.readuntil(b"\r\n\r\n"):
            body = b"hello %.6f %.6f" % (IMPORTED, time.time())
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
