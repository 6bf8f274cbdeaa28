"""Deploys: bundle uploads, rollbacks, branch previews with their lifetimes, and bundle GC.

The admin routes here turn an uploaded archive into a branch's running code:

    PUT    /v1/apps/{app}/branches/{branch}/bundle     upload (streamed) and deploy
    POST   /v1/apps/{app}/branches/{branch}/rollback   back to the previous bundle
    GET    /v1/apps/{app}/branches[/{branch}]          with bundle, deploy and request times
    DELETE /v1/apps/{app}/branches/{branch}            with its instance, bundle refs and data
    DELETE /v1/apps/{app}                              likewise for every branch

A deploy is staged so that a failure at any step changes nothing: spool the body to `tmp/`,
verify its digest, extract and validate it in `tmp/`, check the manifest against the app, rename
the tree into the store, record it in the registry in one transaction, then ask the instance
manager to switch over. If the new bundle does not start, the registry goes back to what it was
and the client gets 422 with the reason. Deploys to one branch are serialized (uploads and
extraction still run in parallel); a GC never removes a bundle a deploy in progress may need.

A housekeeping task persists last-request times, deletes branches past their app's `ttl`, and
collects bundles no branch references (as current or previous).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from gateway.admin import (
    ApiError,
    InstanceManager,
    Request,
    Response,
    Route,
    disk_full,
    json_response,
    locks_of,
    registry_full,
)
from gateway.appspec import AppSpec, BranchSpec, SpecError, overlay_spec, parse_app_spec
from gateway.bundles import (
    BundleError,
    BundleStore,
    DeployError,
    Extracted,
    check_content_type,
    upload_format,
    upload_headers,
)
from gateway.config import GatewayConfig, split_host_port
from gateway.forkserver import remove_tree
from gateway.registry import DEFAULT_BRANCH, BundleRecord, Registry

log = logging.getLogger("dorm.deploy")

FLUSH_INTERVAL = 30.0  # last-request times reach SQLite at least this often
GC_INTERVAL = 600.0  # bundles are also collected on this period, besides after changes
HOUSEKEEPING_MAX = 5.0
HOUSEKEEPING_MIN = 0.25


class DeployApi:
    """The deploy endpoints and the housekeeping behind them, for one gateway."""

    def __init__(
        self,
        cfg: GatewayConfig,
        registry: Registry,
        instances: InstanceManager,
        store: BundleStore,
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.instances = instances
        self.store = store
        self.volumes = Path(cfg.data_dir) / "volumes"
        self.locks = locks_of(registry)
        self._gc_task: asyncio.Task[None] | None = None
        self._gc_wanted = False
        self._housekeeper: asyncio.Task[None] | None = None

    def routes(self) -> list[Route]:
        branch = "/v1/apps/{app}/branches/{branch}"
        return [
            Route(
                "PUT",
                branch + "/bundle",
                self.upload,
                max_body=self.store.limits.max_size,
                query=frozenset({"format"}),
                stream_body=True,
            ),
            Route("POST", branch + "/rollback", self.rollback),
            Route("GET", "/v1/apps/{app}/branches", self.list_branches),
            Route("GET", branch, self.get_branch),
            Route("DELETE", branch, self.delete_branch),
            Route("DELETE", "/v1/apps/{app}", self.delete_app),
        ]

    # -- helpers ---------------------------------------------------------------------------------
    def _app(self, req: Request) -> str:
        app = req.params["app"]
        if self.registry.get_app(app) is None:
            raise ApiError(404, "app", f"no app named {app!r}")
        return app

    def url(self, app: str, branch: str) -> str:
        """The public URL of a branch under the first configured domain."""
        _, port = split_host_port(self.cfg.listen, "listen")
        label = app if branch == DEFAULT_BRANCH else f"{branch}--{app}"
        authority = f"{label}.{self.cfg.domains[0]}" + ("" if port == 80 else f":{port}")
        return f"http://{authority}/"

    def _sync_activity(self) -> None:
        """Fold the instances' last requests into the registry's wall-clock record."""
        for app, branch, when in self.instances.activity():
            known = self.registry.last_request(app, branch)
            if known is None or when > known + 0.001:
                self.registry.touch(app, branch, when)

    def _branch_json(self, branch: BranchSpec) -> dict[str, Any]:
        out = branch.deploy_json(self.registry.last_request(branch.app, branch.name))
        out["url"] = self.url(branch.app, branch.name)
        return out

    # -- upload and deploy -------------------------------------------------------------------------
    async def upload(self, req: Request) -> Response:
        """Receive an archive, validate it, and make it the branch's current bundle."""
        app, branch = req.params["app"], req.params["branch"]
        assert req.stream is not None
        try:
            headers = upload_headers(req.headers)
            check_content_type(headers)
            fmt = upload_format(req.query)
            spooled = await self.store.receive(req.stream, headers)
            try:
                record = self.registry.bundles.get(spooled.digest)
                extracted: Extracted | None = None
                if record is None or not self.store.path(spooled.digest).is_dir():
                    extracted = await self.store.unpack(spooled, fmt)
            finally:
                await self.store.discard(spooled.path)
        except BundleError as exc:
            raise ApiError(exc.status, exc.field, exc.message) from None
        try:
            if record is None or extracted is not None:
                assert extracted is not None
                manifest = extracted.manifest
                self._check_manifest(app, manifest)
                record = BundleRecord(
                    spooled.digest,
                    manifest,
                    spooled.size,
                    extracted.files,
                    extracted.unpacked,
                    time.time(),
                )
            else:
                self._check_manifest(app, record.manifest)
            created, previous = await self._commit(app, branch, record, extracted)
        except BaseException:
            if extracted is not None:
                await self.store.discard(extracted.path)
            raise
        self.request_gc()
        log.info("deployed %s to %s/%s", record.digest[:12], app, branch)
        return json_response(
            201 if created else 200,
            {
                "app": app,
                "branch": branch,
                "bundle": record.digest,
                "previous_bundle": previous,
                "size": record.size,
                "files": record.files,
                "url": self.url(app, branch),
            },
        )

    def _check_manifest(self, app: str, manifest: dict[str, Any]) -> AppSpec | None:
        """Check the manifest fits the app (or can create it). Returns the app spec to create,
        if the app does not exist yet; ApiError naming `manifest.<field>` if it does not fit."""
        try:
            base = self.registry.get_app(app)
            create: AppSpec | None = None
            if base is not None:
                effective = overlay_spec(base, manifest)
            else:
                # A new app: its operator-level spec comes from the manifest, with default
                # limits (a bundle may lower limits, never choose its own ceiling).
                parse_app_spec(app, manifest)
                create = parse_app_spec(app, {k: v for k, v in manifest.items() if k != "limits"})
                effective = overlay_spec(create, manifest)
        except SpecError as exc:
            field = "manifest" if exc.field == "body" else f"manifest.{exc.field}"
            raise ApiError(400, field, exc.message) from None
        try:
            self.registry.check_runtime(effective)  # an uploaded runtime must exist
        except SpecError as exc:
            field = f"manifest.{exc.field}" if exc.field in manifest else exc.field
            raise ApiError(400, field, exc.message) from None
        return create

    async def _commit(
        self, app: str, branch: str, record: BundleRecord, extracted: Extracted | None
    ) -> tuple[bool, str | None]:
        """Activate the bundle and switch the branch to it. Returns (branch created, previous).

        A deploy that creates the app holds it exclusively: if its bundle does not start, the
        undo deletes the app, which must not take a concurrent deploy's branch with it.
        """
        lock = self.locks.app(app)
        while True:
            creates = self.registry.get_app(app) is None
            async with lock.hold(exclusive=creates):
                if not creates and self.registry.get_app(app) is None:
                    continue  # deleted while this deploy waited: it creates the app now
                async with self.locks.branch(app, branch):
                    return await self._commit_locked(app, branch, record, extracted)

    async def _commit_locked(
        self, app: str, branch: str, record: BundleRecord, extracted: Extracted | None
    ) -> tuple[bool, str | None]:
        """`_commit` with the app (shared, or exclusive if it is created) and branch locked."""
        old = self.registry.branches.get((app, branch))
        pins = (record.digest, *(old.bundles if old is not None else ()))
        with self.store.pinned(*pins):
            async with self.store.lock:
                if extracted is not None:
                    await self.store.activate(extracted, record.digest)
                elif not self.store.path(record.digest).is_dir():
                    raise ApiError(
                        409, "bundle", "the bundle was collected meanwhile; upload it again"
                    )
            create = self._check_manifest(app, record.manifest)  # the app may have changed
            base = old if old is not None else BranchSpec(app, branch)
            previous = base.bundle if base.bundle != record.digest else base.previous_bundle
            new = replace(
                base, bundle=record.digest, previous_bundle=previous, deployed_at=time.time()
            )
            known = record.digest in self.registry.bundles
            await self._record(new, bundle=None if known else record, app=create)
            await self._switch(app, branch, old, created_app=create is not None)
        return old is None, previous

    async def _record(
        self, branch: BranchSpec, *, bundle: BundleRecord | None = None, app: AppSpec | None = None
    ) -> None:
        """`registry.set_branch`, failing with 507 when the registry's disk is full. On any
        failure the registry is as it was, and a tree activated for this deploy is collected."""
        try:
            await self.registry.set_branch(branch, bundle=bundle, app=app)
        except Exception as exc:
            self.request_gc()
            if disk_full(exc):
                raise registry_full("the deploy") from None
            raise

    async def _switch(
        self, app: str, branch: str, old: BranchSpec | None, *, created_app: bool
    ) -> None:
        """Move the branch's traffic to what the registry now says; on failure put the registry
        back as it was (`old`) and answer 422 with the reason."""
        try:
            await self.instances.redeploy(app, branch)
        except Exception as exc:
            expected = isinstance(exc, DeployError)
            if not expected:
                log.exception("switching %s/%s to its new bundle failed", app, branch)
            if created_app:
                await self.registry.delete_app(app)
            elif old is None:
                await self.registry.delete_branch(app, branch)
            else:
                await self.registry.set_branch(old)
            self.request_gc()  # the new bundle was stored; nothing references it now
            if expected:
                raise ApiError(422, "bundle", f"the new bundle did not start: {exc}") from None
            raise ApiError(
                500, None, "internal error switching bundles; see the gateway log"
            ) from exc

    async def rollback(self, req: Request) -> Response:
        """Make the previous bundle current again (and the current one previous)."""
        app = self._app(req)
        branch = req.params["branch"]
        async with self.locks.branch_locked(app, branch):
            if self.registry.get_app(app) is None:
                raise ApiError(404, "app", f"no app named {app!r}")
            old = self.registry.branches.get((app, branch))
            if old is None:
                raise ApiError(404, "branch", f"app {app!r} has no deployed branch {branch!r}")
            target = old.previous_bundle
            if target is None:
                raise ApiError(409, "bundle", f"{app}/{branch} has no previous bundle")
            if target not in self.registry.bundles or not self.store.path(target).is_dir():
                raise ApiError(409, "bundle", f"the previous bundle {target[:12]} is gone")
            record = self.registry.bundles[target]
            self._check_manifest(app, record.manifest)
            with self.store.pinned(*old.bundles):
                new = replace(
                    old, bundle=target, previous_bundle=old.bundle, deployed_at=time.time()
                )
                await self._record(new)
                await self._switch(app, branch, old, created_app=False)
        log.info("rolled %s/%s back to %s", app, branch, target[:12])
        return json_response(
            200,
            {
                "app": app,
                "branch": branch,
                "bundle": target,
                "previous_bundle": old.bundle,
                "url": self.url(app, branch),
            },
        )

    # -- branches ----------------------------------------------------------------------------------
    async def list_branches(self, req: Request) -> Response:
        app = self._app(req)
        self._sync_activity()
        items = [self._branch_json(b) for b in self.registry.branches_of(app)]
        return json_response(200, {"branches": items})

    async def get_branch(self, req: Request) -> Response:
        app = self._app(req)
        branch = self.registry.get_branch(app, req.params["branch"])
        if branch is None:
            raise ApiError(404, "branch", f"app {app!r} has no branch {req.params['branch']!r}")
        self._sync_activity()
        out = self._branch_json(branch)
        try:
            spec = self.registry.effective_spec(app, branch.name)
            out["spec"] = None if spec is None else spec.to_json()
        except SpecError as exc:
            out["spec"] = None
            out["spec_error"] = {"field": exc.field, "message": exc.message}
        return json_response(200, out)

    async def delete_branch(self, req: Request) -> Response:
        app = self._app(req)
        branch = req.params["branch"]
        async with self.locks.branch_locked(app, branch):
            if (app, branch) not in self.registry.branches:
                what = "overrides to remove" if branch == DEFAULT_BRANCH else "such branch"
                raise ApiError(404, "branch", f"app {app!r} branch {branch!r}: no {what}")
            await self._remove_branch(app, branch)
        return json_response(200, {"deleted": f"{app}/{branch}"})

    async def _remove_branch(self, app: str, branch: str) -> None:
        """Forget the branch, stop its instance, delete its data; its bundles go at the next GC.
        The caller holds the branch's lock."""
        await self.registry.delete_branch(app, branch)
        await self.instances.branch_changed(app, branch)
        await asyncio.to_thread(remove_tree, self.volumes / app / branch)  # any depth
        self.request_gc()

    async def delete_app(self, req: Request) -> Response:
        app = self._app(req)
        # After the deploys, rollbacks and branch deletes in progress (they finish first), and
        # before any that arrive later.
        async with self.locks.app(app).hold(exclusive=True):
            if self.registry.get_app(app) is None:
                raise ApiError(404, "app", f"no app named {app!r}")
            # Forget it first so no new request is routed to it, then stop what is running.
            await self.registry.delete_app(app)
            await self.instances.app_removed(app)
            # Still locked: a deploy that re-creates the app waits, and never finds (or has
            # removed under it) the old tenant's data.
            await asyncio.to_thread(remove_tree, self.volumes / app)  # any depth
        self.request_gc()
        return json_response(200, {"deleted": app})

    # -- housekeeping ------------------------------------------------------------------------------
    async def expire(self, now: float | None = None) -> list[str]:
        """Delete every branch (but `main`) whose app has a `ttl` and that has had no deploy
        and no request for that long. Returns the "app/branch" names deleted."""
        now = time.time() if now is None else now
        self._sync_activity()
        deleted: list[str] = []
        for (app, name), branch in list(self.registry.branches.items()):
            if name == DEFAULT_BRANCH or not self._expired(app, name, branch, now):
                continue
            async with self.locks.branch_locked(app, name):
                current = self.registry.branches.get((app, name))
                if current is None or not self._expired(app, name, current, now):
                    continue
                log.info("deleting %s/%s: unused for longer than its app's ttl", app, name)
                await self._remove_branch(app, name)
                deleted.append(f"{app}/{name}")
        return deleted

    def _expired(self, app: str, name: str, branch: BranchSpec, now: float) -> bool:
        spec = self.registry.get_app(app)
        if spec is None or spec.ttl is None:
            return False
        times = [t for t in (branch.last_active(), self.registry.last_request(app, name)) if t]
        if times and now - max(times) < spec.ttl:
            return False
        return not self.instances.busy(app, name)  # an open stream is use, whatever the clock

    def request_gc(self) -> None:
        """Collect unreferenced bundles soon, in the background; requests coalesce."""
        self._gc_wanted = True
        if self._gc_task is None or self._gc_task.done():
            self._gc_task = asyncio.get_running_loop().create_task(self._gc_loop())

    async def _gc_loop(self) -> None:
        while self._gc_wanted:
            self._gc_wanted = False
            try:
                await self.collect()
            except Exception:
                log.exception("bundle gc failed")

    async def collect(self) -> list[str]:
        """Remove stored bundles no branch references (current or previous) and forget them."""

        async def forget(doomed: set[str]) -> None:
            keep = self.registry.referenced_bundles() | set(self.store.pins)
            await self.registry.forget_bundles(doomed | (set(self.registry.bundles) - keep))

        return await self.store.gc(self.registry.referenced_bundles, forget)

    def _tick(self) -> float:
        ttls = [s.ttl for s in self.registry.apps.values() if s.ttl is not None]
        if not ttls:
            return HOUSEKEEPING_MAX
        return max(HOUSEKEEPING_MIN, min(HOUSEKEEPING_MAX, min(ttls) / 4))

    async def _housekeeping(self) -> None:
        last_flush = last_gc = time.monotonic()
        while True:
            await asyncio.sleep(self._tick())
            try:
                await self.expire()
                now = time.monotonic()
                if now - last_flush >= FLUSH_INTERVAL:
                    last_flush = now
                    await self.registry.flush_activity()
                if now - last_gc >= GC_INTERVAL:
                    last_gc = now
                    self.request_gc()
            except Exception:
                log.exception("deploy housekeeping failed")

    async def start(self) -> None:
        """Prepare the store (emptying `tmp/`), collect what a previous run left, start the
        housekeeping task."""
        await asyncio.to_thread(self.store.prepare)
        await self.collect()
        self._housekeeper = asyncio.get_running_loop().create_task(self._housekeeping())

    async def close(self) -> None:
        """Stop housekeeping, finish a GC in progress and persist last-request times."""
        if self._housekeeper is not None:
            self._housekeeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeper
        self._gc_wanted = False
        if self._gc_task is not None:
            with contextlib.suppress(Exception):
                await self._gc_task
        self._sync_activity()
        with contextlib.suppress(Exception):
            await self.registry.flush_activity()
        await asyncio.to_thread(self.store.close)
