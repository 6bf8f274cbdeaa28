"""A small HTTP/1.1 app for the tests: serves on $DORM_SOCKET with plain asyncio streams.

Routes (each exists to exercise one gateway behaviour):
  /                 "hello from <app>/<branch>"
  /echo             echoes the request body (Content-Length or chunked) and selected headers
  /headers          the request headers as JSON
  /stream?n=&delay= a chunked response of n chunks, `delay` seconds apart
  /close            a close-delimited HTTP/1.0-style response
  /sleep?s=         answers after s seconds
  /crash            exits the process at once (mid-request)
  /half             sends a head with Content-Length 100 and 10 bytes, then exits
  /ws               a WebSocket-ish upgrade: answers 101 then echoes raw bytes
  /pid              the process id
Env: ECHO_STARTUP_DELAY (seconds before listening), ECHO_EXIT_AT_START=code,
ECHO_IGNORE_TERM=1 (ignore SIGTERM, so only SIGKILL stops it).
"""

import asyncio
import json
import os
import sys
import time


async def read_head(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if line:
            k, v = line.split(":", 1)
            headers.setdefault(k.strip().lower(), []).append(v.strip())
    return method, target, version, headers


async def read_body(reader, headers):
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"][0]))
    if headers.get("transfer-encoding", [""])[0].lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass
                return body
            body += await reader.readexactly(size)
            await reader.readline()
    return b""


def respond(writer, status, body, ctype="text/plain", extra=""):
    writer.write(
        f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode()
        + body
    )


async def handle(reader, writer):
    try:
        while True:
            try:
                method, target, version, headers = await read_head(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            path, _, query = target.partition("?")
            args = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
            body = await read_body(reader, headers)
            if path == "/echo":
                respond(writer, 200, body, extra=f"X-Echo-Length: {len(body)}\r\n")
            elif path == "/headers":
                respond(writer, 200, json.dumps(headers).encode(), "application/json")
            elif path == "/stream":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for i in range(int(args.get("n", "3"))):
                    data = f"chunk {i}\n".encode()
                    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                    await writer.drain()
                    await asyncio.sleep(float(args.get("delay", "0")))
                writer.write(b"0\r\n\r\n")
            elif path == "/close":
                writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nclose-delimited body")
                await writer.drain()
                writer.close()
                return
            elif path == "/sleep":
                await asyncio.sleep(float(args.get("s", "1")))
                respond(writer, 200, b"slept")
            elif path == "/crash":
                os._exit(3)
            elif path == "/half":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                await writer.drain()
                os._exit(4)
            elif path == "/pid":
                respond(writer, 200, str(os.getpid()).encode())
            elif path == "/big":
                n = int(args.get("n", "1048576"))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
                block = b"x" * 65536
                sent = 0
                while sent < n:
                    part = block[: min(65536, n - sent)]
                    writer.write(part)
                    sent += len(part)
                    await writer.drain()
            elif path == "/ws":
                writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                writer.close()
                return
            else:
                app = os.environ.get("DORM_APP", "?")
                branch = os.environ.get("DORM_BRANCH", "?")
                respond(writer, 200, f"hello from {app}/{branch}\n".encode())
            await writer.drain()
            if headers.get("connection", [""])[0].lower() == "close":
                writer.close()
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        pass


async def main():
    if "ECHO_EXIT_AT_START" in os.environ:
        print("exiting at start as asked", flush=True)
        sys.exit(int(os.environ["ECHO_EXIT_AT_START"]))
    if os.environ.get("ECHO_IGNORE_TERM"):
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(float(os.environ.get("ECHO_STARTUP_DELAY", "0")))
    server = await asyncio.start_unix_server(handle, os.environ["DORM_SOCKET"])
    print(f"echo app listening on {os.environ['DORM_SOCKET']}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
