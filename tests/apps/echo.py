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
  /then-drop        answers, then closes this connection when the next request arrives
  /hop              a response carrying hop-by-hop headers (Connection, Keep-Alive)
  /overlong         a body longer than its Content-Length says
  /bad-head?kind=   a malformed response head (see BAD_HEADS)
  /env?name=        the value of an environment variable ("" when unset)
  /status?code=     an empty response with that status (no Content-Length for 1xx/204/304)
  /garbage          bytes that are not HTTP, then close
  /mark/<name>      records <name> in this process; /marks returns the recorded names as JSON
  /wsecho           a real RFC 6455 WebSocket echo (text, binary, ping → pong, close)
Env: ECHO_STARTUP_DELAY (seconds before listening), ECHO_EXIT_AT_START=code,
ECHO_IGNORE_TERM=1 (ignore SIGTERM, so only SIGKILL stops it).
"""

import asyncio
import base64
import hashlib
import json
import os
import sys
import time


async def read_head(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ", 2)
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if line:
            k, v = line.split(":", 1)
            headers.setdefault(k.strip().lower(), []).append(v.strip())
    return method, target, version, headers


async def read_body(reader, headers):
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"][0]))
    if headers.get("transfer-encoding", [""])[0].lower().endswith("chunked"):
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


MARKS: list[str] = []
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_frame(first: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes([first, n]) + payload
    if n < 65536:
        return bytes([first, 126]) + n.to_bytes(2, "big") + payload
    return bytes([first, 127]) + n.to_bytes(8, "big") + payload


async def websocket_echo(reader, writer, headers):
    key = headers["sec-websocket-key"][0]
    accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
    writer.write(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode()
    )
    await writer.drain()
    while True:
        first, second = await reader.readexactly(2)
        n = second & 0x7F
        if n == 126:
            n = int.from_bytes(await reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await reader.readexactly(8), "big")
        mask = await reader.readexactly(4) if second & 0x80 else b"\0\0\0\0"
        data = bytes(c ^ mask[i % 4] for i, c in enumerate(await reader.readexactly(n)))
        opcode = first & 0x0F
        if opcode == 8:  # close: echo it and end
            writer.write(ws_frame(0x88, data[:2]))
            await writer.drain()
            writer.close()
            return
        writer.write(ws_frame(0x8A if opcode == 9 else first, data))
        await writer.drain()


def respond(writer, status, body, ctype="text/plain", extra=""):
    writer.write(
        f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n".encode()
        + body
    )


# Response heads llhttp's strict mode refuses; a proxy that relays them lets an app desync clients.
BAD_HEADS = {
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length : 50\r\nContent-Length: 5\r\n\r\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n 7\r\n\r\n",
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 5\r\n\r\n",
    "nul": b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 5\r\n\r\n",
    "bad-name": b"HTTP/1.1 200 OK\r\nX(y): 1\r\nContent-Length: 5\r\n\r\n",
    # Reason phrases with bytes RFC 9112 does not allow there (HTAB, SP, VCHAR, obs-text only).
    "reason-nul": b"HTTP/1.1 200 O\x00K\r\nContent-Length: 5\r\n\r\n",
    "reason-ctl": b"HTTP/1.1 200 O\x01K\r\nContent-Length: 5\r\n\r\n",
    "reason-del": b"HTTP/1.1 200 O\x7fK\r\nContent-Length: 5\r\n\r\n",
    "reason-cr": b"HTTP/1.1 200 O\rK\r\nContent-Length: 5\r\n\r\n",
    "reason-lf": b"HTTP/1.1 200 O\nK\r\nContent-Length: 5\r\n\r\n",
}


async def handle(reader, writer):
    drop_next = False
    try:
        while True:
            try:
                _method, target, _version, headers = await read_head(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if drop_next:  # a keep-alive connection the app closes just as it is reused
                writer.close()
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
                writer.write(
                    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nclose-delimited body"
                )
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
            elif path == "/hop":
                respond(
                    writer, 200, b"hop", extra="Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
                )
            elif path == "/bad-head":
                writer.write(BAD_HEADS[args.get("kind", "")] + b"hello")
            elif path == "/overlong":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef")
            elif path == "/then-drop":
                drop_next = True
                respond(writer, 200, b"ok")
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
                writer.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\n\r\n"
                )
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                writer.close()
                return
            elif path == "/env":
                respond(writer, 200, os.environ.get(args.get("name", ""), "").encode())
            elif path == "/status":
                code = int(args.get("code", "204"))
                if code < 200 or code in (204, 304):
                    writer.write(b"HTTP/1.1 %d X\r\nX-Status: %d\r\n\r\n" % (code, code))
                else:
                    respond(writer, code, b"")
            elif path == "/garbage":
                writer.write(b"THIS IS NOT HTTP\x00\x01\r\n\r\nat all\r\n")
                await writer.drain()
                writer.close()
                return
            elif path.startswith("/mark/"):
                MARKS.append(path[len("/mark/") :])
                respond(writer, 200, b"marked")
            elif path == "/marks":
                respond(writer, 200, json.dumps(MARKS).encode(), "application/json")
            elif path == "/wsecho":
                await websocket_echo(reader, writer, headers)
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
