"""Runtime bundles: root filesystems operators upload, which apps then name as their runtime.

    PUT    /v1/runtimes/{name}   upload (streamed) a tar.gz/zip: runtime.toml + rootfs/
    GET    /v1/runtimes          built-ins and uploaded runtimes (digest, size, upload time)
    GET    /v1/runtimes/{name}   one runtime, with the apps and branches using it
    DELETE /v1/runtimes/{name}   409 while an app or a deployed branch uses it

An upload goes through the same staged path as an app bundle (gateway/deploy.py), so a refusal at
any step changes nothing: spool to `tmp/` with hashing and a size cap, verify an announced digest,
extract with every entry checked (no traversal, links out of the tree, devices, setuid bits,
bombs), read and validate `runtime.toml`, check that `rootfs/` holds the command's program, then
rename the tree into the content-addressed bundle store and record it in the registry's
`runtimes` table. Runtime trees share the store with app bundles: `Registry.referenced_bundles`
names them, so the bundle GC keeps a runtime's tree exactly as long as the runtime exists.

Replacing a runtime restarts (drains, then stops) the instances of the apps using it; the next
request starts them on the new root filesystem.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from gateway.admin import (
    ApiError,
    InstanceManager,
    Request,
    Response,
    Route,
    disk_full,
    json_response,
    registry_full,
)
from gateway.appspec import RUNTIMES, SpecError
from gateway.bundles import (
    BundleError,
    BundleStore,
    Extracted,
    check_content_type,
    upload_format,
    upload_headers,
)
from gateway.names import InvalidName, check_branch_name
from gateway.registry import Registry
from gateway.runtimespec import ROOTFS_DIR, RUNTIME_TOML, RuntimeRecord, parse_runtime_def
from sandboxes.mounts import ROOTFS_SKIP

log = logging.getLogger("dorm.runtimes")

BUILTIN_DESCRIPTIONS = {
    "command": "any executable serving HTTP on $DORM_SOCKET (or 127.0.0.1:$PORT with `port`)",
    "python-asgi": "an ASGI app (`entry`) served by granian, forked from a zygote",
    "python-wsgi": "a WSGI app (`entry`) served by granian, forked from a zygote",
    "static": "the bundle's files, served by the gateway without starting a process",
}


def check_runtime_name(name: str) -> str:
    """A name an operator may upload a runtime under: a DNS label that is not a built-in."""
    try:
        check_branch_name(name)
    except InvalidName as exc:
        raise ApiError(400, "name", str(exc)) from None
    if name in RUNTIMES:
        raise ApiError(400, "name", f"{name!r} is a built-in runtime and cannot be replaced")
    return name


def check_rootfs(tree: Path, program: str) -> None:
    """Check an extracted runtime bundle holds `rootfs/` with an executable `program` in it.

    The sandbox binds rootfs/'s top-level entries (except the directories it provides itself,
    such as /tmp and /run), so a program under one of those would never be found; saying so at
    upload beats an exec failure at the first request. Symlinks are followed: extraction has
    already refused every link that resolves outside the tree. Blocking: run on a thread.
    """
    root = tree / ROOTFS_DIR
    try:
        info = os.lstat(root)
    except FileNotFoundError:
        info = None
    if info is None or not stat.S_ISDIR(info.st_mode):
        raise BundleError(
            400,
            "bundle",
            f"a runtime bundle holds its root filesystem in {ROOTFS_DIR}/, "
            f"next to {RUNTIME_TOML}; there is no {ROOTFS_DIR}/ directory",
        )
    parts = [p for p in program.split("/") if p]
    if parts and parts[0] in ROOTFS_SKIP:
        raise BundleError(
            400,
            "manifest.command.0",
            f"{program} is under /{parts[0]}, which the sandbox "
            f"provides itself (not from {ROOTFS_DIR}/)",
        )
    real = os.path.realpath(root.joinpath(*parts))
    inside = real.startswith(str(root.resolve()) + os.sep)
    if not inside or not os.path.isfile(real) or not os.stat(real).st_mode & 0o111:
        raise BundleError(
            400, "manifest.command.0", f"{program} is not an executable file in {ROOTFS_DIR}/"
        )


class RuntimeApi:
    """The runtime endpoints for one gateway; trees go to the shared bundle store."""

    def __init__(
        self,
        registry: Registry,
        instances: InstanceManager,
        store: BundleStore,
        request_gc: Callable[[], None],
    ) -> None:
        self.registry = registry
        self.instances = instances
        self.store = store
        self.request_gc = request_gc
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def routes(self) -> list[Route]:
        one = "/v1/runtimes/{name}"
        return [
            Route(
                "PUT",
                one,
                self.upload,
                max_body=self.store.limits.max_size,
                query=frozenset({"format"}),
                stream_body=True,
            ),
            Route("GET", "/v1/runtimes", self.list_runtimes),
            Route("GET", one, self.get_runtime),
            Route("DELETE", one, self.delete_runtime),
        ]

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    # -- reads -----------------------------------------------------------------------------------
    @staticmethod
    def _builtin_json(name: str) -> dict[str, object]:
        return {"name": name, "builtin": True, "description": BUILTIN_DESCRIPTIONS.get(name, "")}

    def _record_json(self, record: RuntimeRecord) -> dict[str, object]:
        return {**record.to_json(), "used_by": self.registry.runtime_users(record.name)}

    async def list_runtimes(self, req: Request) -> Response:
        items: list[dict[str, object]] = [self._builtin_json(name) for name in RUNTIMES]
        runtimes = self.registry.runtimes
        items.extend(self._record_json(runtimes[name]) for name in sorted(runtimes))
        for name, digest in sorted(self.registry.invalid_runtimes.items()):
            reason = self.registry.invalid.get(f"runtime {name}", "")
            items.append({"name": name, "builtin": False, "digest": digest, "error": reason})
        return json_response(200, {"runtimes": items})

    async def get_runtime(self, req: Request) -> Response:
        name = req.params["name"]
        if name in RUNTIMES:
            return json_response(200, self._builtin_json(name))
        record = self.registry.runtimes.get(name)
        if record is None:
            raise ApiError(404, "name", f"no runtime named {name!r}")
        return json_response(200, self._record_json(record))

    # -- upload ----------------------------------------------------------------------------------
    async def upload(self, req: Request) -> Response:
        """Receive a runtime bundle, validate it, and make it the runtime `name`."""
        name = check_runtime_name(req.params["name"])
        assert req.stream is not None
        extracted: Extracted | None = None
        try:
            headers = upload_headers(req.headers)
            check_content_type(headers)
            fmt = upload_format(req.query)
            spooled = await self.store.receive(req.stream, headers)
            try:
                extracted = await self.store.unpack(spooled, fmt, RUNTIME_TOML)
            finally:
                await self.store.discard(spooled.path)
            try:
                definition = parse_runtime_def(extracted.manifest)
            except SpecError as exc:
                raise BundleError(400, f"manifest.{exc.field}", exc.message) from None
            await asyncio.to_thread(check_rootfs, extracted.path, definition.command[0])
        except BundleError as exc:
            if extracted is not None:
                await self.store.discard(extracted.path)
            raise ApiError(exc.status, exc.field, exc.message) from None
        except BaseException:
            if extracted is not None:
                await self.store.discard(extracted.path)
            raise
        assert extracted is not None
        record = RuntimeRecord(
            name,
            spooled.digest,
            definition,
            spooled.size,
            extracted.files,
            extracted.unpacked,
            time.time(),
        )
        async with self._lock(name):
            try:
                with self.store.pinned(record.digest):
                    async with self.store.lock:
                        await self.store.activate(extracted, record.digest)
                    created = await self.registry.put_runtime(record)
            except BaseException as exc:
                await self.store.discard(extracted.path)  # gone already if it was activated
                self.request_gc()  # if it was, nothing records it
                if disk_full(exc):
                    raise registry_full("the runtime") from None
                raise
            users = self.registry.runtime_users(name)
            if not created:
                # Instances running on the old tree drain and stop; the next request starts
                # them on the new one.
                for app in sorted({user.partition("/")[0] for user in users}):
                    await self.instances.app_changed(app)
        self.request_gc()  # a replaced runtime's old tree is unreferenced now
        log.info("runtime %s %s (%s)", name, "uploaded" if created else "replaced", record.digest)
        return json_response(201 if created else 200, self._record_json(record))

    # -- removal ---------------------------------------------------------------------------------
    async def delete_runtime(self, req: Request) -> Response:
        name = req.params["name"]
        if name in RUNTIMES:
            raise ApiError(400, "name", f"{name!r} is a built-in runtime and cannot be removed")
        async with self._lock(name):
            if name not in self.registry.runtimes and name not in self.registry.invalid_runtimes:
                raise ApiError(404, "name", f"no runtime named {name!r}")
            users = self.registry.runtime_users(name)
            if users:
                raise ApiError(
                    409,
                    "runtime",
                    f"runtime {name!r} is in use by {', '.join(users)}; change or remove "
                    "those apps first",
                )
            await self.registry.delete_runtime(name)
        self.request_gc()
        log.info("runtime %s removed", name)
        return json_response(200, {"deleted": name})


__all__ = ["BUILTIN_DESCRIPTIONS", "RuntimeApi", "check_rootfs", "check_runtime_name"]
