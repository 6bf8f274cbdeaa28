"""A tenant that reports on its own confinement, for the sandboxed end-to-end tests.

Routes: /whoami (ids, pid, hostname, capabilities, seccomp, env keys), /read?path=,
/write?path=, /hog?mb= (allocates until the memory limit kills it). Stdlib only.
"""

import asyncio
import json
import os
import socket


def status_fields() -> dict:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp"):
                out[key] = value.strip()
    return out


def attempt(fn) -> dict:
    try:
        return {"ok": True, "value": fn()}
    except OSError as exc:
        return {"ok": False, "errno": exc.errno, "error": exc.strerror}


def route(path: str, args: dict) -> tuple[int, bytes]:
    if path == "/whoami":
        info = {
            "uid": os.getresuid(),
            "gid": os.getresgid(),
            "groups": os.getgroups(),
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "cwd": os.getcwd(),
            "env": sorted(os.environ),
            "socket": os.environ.get("DORM_SOCKET"),
            **status_fields(),
        }
        return 200, json.dumps(info).encode()
    if path == "/read":

        def read() -> int:
            with open(args["path"], "rb") as fh:
                return len(fh.read())

        result = attempt(read)
        return 200, json.dumps(result).encode()
    if path == "/write":

        def write() -> int:
            with open(args["path"], "w") as fh:
                return fh.write("x")

        return 200, json.dumps(attempt(write)).encode()
    if path == "/hog":
        hoard = []
        for _ in range(int(args.get("mb", "1024"))):
            hoard.append(bytearray(1024 * 1024))
        return 200, b"survived"
    return 200, b"probe\n"


async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1].decode()
            path, _, query = target.partition("?")
            args = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
            status, body = route(path, args)
            head = b"HTTP/1.1 %d OK\r\nContent-Length: %d\r\n\r\n" % (status, len(body))
            writer.write(head + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass


async def main():
    server = await asyncio.start_unix_server(handle, os.environ["DORM_SOCKET"])
    async with server:
        await server.serve_forever()


asyncio.run(main())
