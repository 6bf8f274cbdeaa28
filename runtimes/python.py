"""The python-asgi and python-wsgi runtimes: the app served by granian on the instance's socket.

Two ways in, one code path:
  * zygote (default): the fork server imported this module, and with it granian and uvloop, at
    boot; an instance is a fork of it that calls `main()`, so the first response costs a fork and
    the app's own import (milliseconds) instead of an interpreter start (~100 ms).
  * fresh: `python -m runtimes.python`, for runtimes the zygote cannot serve (another Python, a
    runtime bundle's rootfs) and for measuring what the zygote saves.
Both read the same environment: DORM_SOCKET (where to listen), DORM_ENTRY ("module:attr"),
DORM_INTERFACE ("asgi" or "wsgi"); the app's code is in the working directory (/app in a sandbox),
its vendored dependencies in ./vendor.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

import uvloop
from granian.constants import Interfaces
from granian.server.embed import Server

INTERFACES = ("asgi", "wsgi")


class EntryError(Exception):
    """DORM_ENTRY does not name a loadable app; the message says which part failed."""


def load_app(entry: str, interface: str) -> Any:
    """Import "module:attr" (attr may be dotted) from the app's directory and vendor/."""
    module_name, sep, attr = entry.partition(":")
    if not sep or not module_name or not attr:
        raise EntryError(f"entry {entry!r} must look like 'module:attribute'")
    here = os.getcwd()
    for path in (os.path.join(here, "vendor"), here):
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise EntryError(f"cannot import {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise EntryError(f"module {module_name!r} has no attribute {attr!r}") from None
    if interface == "wsgi":
        from a2wsgi import WSGIMiddleware

        target = _coroutine_channels(WSGIMiddleware(target))
    return target


def _coroutine_channels(app: Any) -> Any:
    """Give `app` coroutine receive/send callables.

    granian's are awaitables implemented in Rust, and a2wsgi hands `receive()` to
    `asyncio.run_coroutine_threadsafe`, which accepts only real coroutines.
    """

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        async def receive_coro() -> Any:
            return await receive()

        async def send_coro(message: Any) -> None:
            await send(message)

        await app(scope, receive_coro, send_coro)

    return asgi


def serve(app: Any, socket_path: str) -> None:
    """Run granian's embedded server on `socket_path` until SIGTERM/SIGINT."""
    server = Server(
        app,
        uds=Path(socket_path),
        interface=Interfaces.ASGI,
        websockets=True,
        runtime_threads=1,
        blocking_threads=1,
        backlog=1024,
        log_enabled=True,
        log_access=False,
    )
    uvloop.run(server.serve())


def main() -> int:
    """Entry point for both paths: load the app named by the environment and serve it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # granian installs its own once serving
    interface = os.environ.get("DORM_INTERFACE", "asgi")
    if interface not in INTERFACES:
        print(
            f"dorm python runtime: DORM_INTERFACE must be asgi or wsgi, not {interface!r}",
            file=sys.stderr,
        )
        return 2
    try:
        app = load_app(os.environ.get("DORM_ENTRY", ""), interface)
    except EntryError as exc:
        print(f"dorm python runtime: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(asyncio.CancelledError):
        serve(app, os.environ["DORM_SOCKET"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
