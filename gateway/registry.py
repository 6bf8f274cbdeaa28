"""The app registry: apps and their branches, persisted in SQLite, served from memory.

The data plane looks apps up on every request, so reads are plain dict lookups on in-memory copies.
Writes go to SQLite first (on a single dedicated thread, so the event loop never blocks on disk and
the connection is never shared between threads) and only then change memory: what a client was told
was saved survives a restart, and a failed write changes nothing.

Many apps, little memory: a gateway holds every registered app in memory (100,000 is a target),
and most of them are cold. Specs that come from JSON (an admin request, a row loaded at start)
would each hold their own copies of the same values ("python-asgi", "zygote", the default limits,
the same `app_dir`); `_Shared` makes equal values one object, which halves what an app costs.

Branches also carry the bundle they run (and the one before it, for rollback); bundle manifests
live in a `bundles` table and in memory, so the effective spec of a branch (`effective_spec`) is
computed without touching the disk. The time of a branch's last request is written to memory on
the hot path (`touch`) and persisted in batches (`flush_activity`), never once per request.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import orjson

from gateway.appspec import (
    AppSpec,
    BranchSpec,
    SpecError,
    is_uploaded_runtime,
    overlay_spec,
    parse_app_spec,
    parse_branch_spec,
)
from gateway.runtimespec import (
    RuntimeRecord,
    check_app,
    parse_runtime_def,
    resolve_app,
)

log = logging.getLogger("dorm.registry")

DEFAULT_BRANCH = "main"
_MAIN = (DEFAULT_BRANCH,)
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS apps (
    name TEXT PRIMARY KEY,
    spec BLOB NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS branches (
    app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    spec BLOB NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (app, name)
);
CREATE TABLE IF NOT EXISTS bundles (
    digest TEXT PRIMARY KEY,
    manifest BLOB NOT NULL,
    size INTEGER NOT NULL,
    files INTEGER NOT NULL,
    unpacked INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runtimes (
    name TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    definition BLOB NOT NULL,
    size INTEGER NOT NULL,
    files INTEGER NOT NULL,
    unpacked INTEGER NOT NULL,
    uploaded REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS activity (
    app TEXT NOT NULL,
    branch TEXT NOT NULL,
    last_request REAL NOT NULL,
    PRIMARY KEY (app, branch)
);
"""
# Columns added to `branches` after the first release: added in place to older databases.
_BRANCH_COLUMNS = {"bundle": "TEXT", "previous_bundle": "TEXT", "deployed_at": "REAL"}


# AppSpec fields whose values are shared between equal specs: all but the name (the registry's
# key, already one object with it) and `env` (a dict: mutable, so never shared).
_SHARED_FIELDS = tuple(f.name for f in fields(AppSpec) if f.name not in ("name", "env"))
# Distinct non-string values remembered at most; past this the pool starts over (values already
# shared stay shared), so a churn of unique values (commands, app_dirs) cannot grow it forever.
SHARED_POOL_LIMIT = 65_536


class _Shared:
    """Equal field values of app specs become one object.

    Strings go through `sys.intern` (in 3.11 an interned string is freed with its last user).
    Other values (floats, big ints, tuples, Limits, StaticOptions: all immutable) are pooled by
    type and `repr`, never by `==`: `1 == 1.0 == True` and `Limits(cpu=1) == Limits(cpu=1.0)`,
    but a spec must keep the value it was given, or its JSON would change.
    """

    __slots__ = ("pool",)

    def __init__(self) -> None:
        self.pool: dict[tuple[type, str], object] = {}

    def value(self, value: object) -> object:
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str):
            return sys.intern(value)
        if isinstance(value, int) and -5 <= value <= 256:
            return value  # CPython's small ints are shared already
        key = (type(value), repr(value))
        found = self.pool.get(key)
        if found is None:
            if len(self.pool) >= SHARED_POOL_LIMIT:
                self.pool.clear()
            self.pool[key] = found = value
        return found

    def spec(self, spec: AppSpec) -> AppSpec:
        """`spec`, its field values now shared with every other spec's; returned for chaining.

        Changed in place, although AppSpec is frozen: each value is swapped for one of the same
        type and repr, and all of them are immutable, so no holder of `spec` can tell. Building
        a new AppSpec instead (`dataclasses.replace`) would cost a second 20-field construction
        per app, a third of a 100,000-app load.
        """
        for name in _SHARED_FIELDS:
            value = getattr(spec, name)
            shared = self.value(value)
            if shared is not value:
                object.__setattr__(spec, name, shared)
        return spec


@dataclass(frozen=True, slots=True)
class BundleRecord:
    """An activated bundle: its digest, its parsed `dorm.toml` manifest and what it unpacked to."""

    digest: str
    manifest: dict[str, Any]
    size: int  # archive bytes
    files: int  # entries extracted (files, directories and links)
    unpacked: int  # bytes of file content
    created: float

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "manifest": self.manifest,
            "size": self.size,
            "files": self.files,
            "unpacked": self.unpacked,
            "created": self.created,
        }


class Registry:
    """Apps and branches. Reads are synchronous and O(1); writes are async and durable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.apps: dict[str, AppSpec] = {}
        self.branches: dict[tuple[str, str], BranchSpec] = {}
        # Stored rows that failed validation when loaded: name (or app/branch) → reason.
        self.invalid: dict[str, str] = {}
        self.bundles: dict[str, BundleRecord] = {}
        # Operator-uploaded runtimes by name; their trees live in the bundle store too.
        self.runtimes: dict[str, RuntimeRecord] = {}
        # (app, branch) → Unix time of the last request: written by the data plane (`touch`),
        # and what of it is already on disk.
        self.last_requests: dict[tuple[str, str], float] = {}
        self._flushed: dict[tuple[str, str], float] = {}
        # app → names of its branches that have a key in `branches`, `last_requests` or
        # `_flushed`: deleting an app or listing its branches visits only its own keys, not
        # every key of every app (with 100,000 apps that was milliseconds of event loop each).
        # Tuples, not sets: most apps have one or two names, and an empty set alone is 216 bytes.
        self._branch_names: dict[str, tuple[str, ...]] = {}
        # Stored runtimes whose definition no longer validates: name → digest (tree kept).
        self.invalid_runtimes: dict[str, str] = {}
        self._shared = _Shared()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dorm-registry")
        self._db: sqlite3.Connection | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def open(self) -> None:
        """Open (creating if needed) the database and load every app and branch into memory.

        Logs how many were loaded and how long it took: with many apps this is most of a
        restart (the listeners open after it), so an operator should see it.
        """
        t0 = time.perf_counter()
        await self._run(self._open_sync)
        log.info(
            "registry: loaded %d apps, %d branches, %d bundles in %.2fs",
            len(self.apps),
            len(self.branches),
            len(self.bundles),
            time.perf_counter() - t0,
        )

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(_SCHEMA)
        have = {row[1] for row in db.execute("PRAGMA table_info(branches)")}
        for column, kind in _BRANCH_COLUMNS.items():
            if column not in have:
                db.execute(f"ALTER TABLE branches ADD COLUMN {column} {kind}")
        self._db = db
        for digest, manifest, size, files, unpacked, created in db.execute(
            "SELECT digest, manifest, size, files, unpacked, created FROM bundles"
        ):
            self.bundles[digest] = BundleRecord(
                digest, orjson.loads(manifest), size, files, unpacked, created
            )
        for row in db.execute(
            "SELECT name, digest, definition, size, files, unpacked, uploaded FROM runtimes"
        ):
            name, digest, definition, size, files, unpacked, uploaded = row
            try:
                rd = parse_runtime_def(orjson.loads(definition))
            except (SpecError, orjson.JSONDecodeError) as exc:
                # Its tree stays referenced (below) so a corrected upload or a DELETE decides.
                self.invalid[f"runtime {name}"] = str(exc)
                log.error("registry: runtime %r is not valid any more, skipped: %s", name, exc)
                self.invalid_runtimes[name] = digest
                continue
            self.runtimes[name] = RuntimeRecord(name, digest, rd, size, files, unpacked, uploaded)
        for app, branch, when in db.execute("SELECT app, branch, last_request FROM activity"):
            self.last_requests[(app, branch)] = self._flushed[(app, branch)] = when
            self._index(app, branch)
        # A row that no longer validates (the rules tightened since it was stored) must not keep
        # the gateway from starting: it is skipped with an error in the log, and left on disk
        # so a corrected spec can be PUT over it.
        for name, spec in db.execute("SELECT name, spec FROM apps"):
            try:
                self.apps[name] = self._shared.spec(parse_app_spec(name, orjson.loads(spec)))
            except (SpecError, orjson.JSONDecodeError) as exc:
                self.invalid[name] = str(exc)
                log.error("registry: app %r is not valid any more, skipped: %s", name, exc)
        rows = db.execute(
            "SELECT app, name, spec, created, bundle, previous_bundle, deployed_at FROM branches"
        )
        for app, name, spec, created, bundle, previous, deployed_at in rows:
            if app not in self.apps:
                continue
            try:
                self._index(app, name)
                self.branches[(app, name)] = replace(
                    parse_branch_spec(app, name, orjson.loads(spec)),
                    bundle=bundle,
                    previous_bundle=previous,
                    deployed_at=deployed_at,
                    created=created,
                    last_request=self._flushed.get((app, name)),
                )
            except (SpecError, orjson.JSONDecodeError) as exc:
                self.invalid[f"{app}/{name}"] = str(exc)
                log.error(
                    "registry: branch %s/%s is not valid any more, skipped: %s", app, name, exc
                )

    async def close(self) -> None:
        def close_sync() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(close_sync)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- reads (hot path) ----------------------------------------------------------------------
    def get_app(self, name: str) -> AppSpec | None:
        return self.apps.get(name)

    def get_branch(self, app: str, branch: str) -> BranchSpec | None:
        """The branch, if the app has it. `main` exists for every app without being created."""
        found = self.branches.get((app, branch))
        if found is None and branch == DEFAULT_BRANCH and app in self.apps:
            return BranchSpec(app=app, name=DEFAULT_BRANCH)
        return found

    def effective_spec(self, app: str, branch: str) -> AppSpec | None:
        """The spec the branch runs: the app's, overlaid with its bundle's manifest, if any.

        None if the app or branch does not exist. Raises SpecError (field prefixed "manifest.")
        if the app spec was changed since the deploy in a way the manifest no longer fits.
        """
        spec = self.apps.get(app)
        found = self.get_branch(app, branch)
        if spec is None or found is None:
            return None
        if found.bundle is not None:
            record = self.bundles.get(found.bundle)
            if record is None:
                raise SpecError("bundle", f"bundle {found.bundle} is not in the registry")
            try:
                spec = overlay_spec(spec, record.manifest)
            except SpecError as exc:
                raise SpecError(f"manifest.{exc.field}", exc.message) from None
        if is_uploaded_runtime(spec.runtime):
            runtime = self.runtimes.get(spec.runtime)
            check_app(spec, runtime)
            assert runtime is not None
            spec = resolve_app(spec, runtime.definition)
        return spec

    def check_runtime(self, spec: AppSpec) -> None:
        """Raise SpecError naming the field if `spec` names an uploaded runtime it cannot run on
        (none by that name, or the runtime needs an `entry` the spec lacks). Built-ins pass."""
        if is_uploaded_runtime(spec.runtime):
            check_app(spec, self.runtimes.get(spec.runtime))

    def runtime_users(self, name: str) -> list[str]:
        """Apps (and "app/branch" for branches whose bundle asks for it) using runtime `name`."""
        users = [app for app, spec in sorted(self.apps.items()) if spec.runtime == name]
        for (app, branch), found in sorted(self.branches.items()):
            record = self.bundles.get(found.bundle) if found.bundle is not None else None
            if record is not None and record.manifest.get("runtime") == name:
                users.append(f"{app}/{branch}")
        return users

    def last_request(self, app: str, branch: str) -> float | None:
        """When the branch last served a request (Unix time), as far as the registry knows."""
        return self.last_requests.get((app, branch))

    def referenced_bundles(self) -> set[str]:
        """Every bundle some branch runs or can roll back to, and every uploaded runtime's tree;
        the rest may be collected."""
        refs = {digest for b in self.branches.values() for digest in b.bundles}
        refs.update(r.digest for r in self.runtimes.values())
        refs.update(self.invalid_runtimes.values())
        return refs

    def _index(self, app: str, branch: str) -> None:
        names = self._branch_names.get(app, ())
        if branch not in names:
            # Most apps only ever have `main`: they all share one tuple.
            self._branch_names[app] = (
                (*names, branch) if names or branch != DEFAULT_BRANCH else _MAIN
            )

    def branches_of(self, app: str) -> list[BranchSpec]:
        branches = self.branches
        out = [
            branches[(app, name)]
            for name in self._branch_names.get(app, ())
            if (app, name) in branches
        ]
        if app in self.apps and (app, DEFAULT_BRANCH) not in self.branches:
            out.append(BranchSpec(app=app, name=DEFAULT_BRANCH))
        return sorted(out, key=lambda b: b.name)

    # -- writes ---------------------------------------------------------------------------------
    async def put_app(self, spec: AppSpec) -> bool:
        """Create or replace an app. Returns True if it was created."""
        blob = orjson.dumps(spec.to_json())

        def write() -> bool:
            assert self._db is not None
            now = time.time()
            with self._db:
                created = self._db.execute(
                    "INSERT INTO apps(name, spec, created, updated) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET spec=excluded.spec, updated=excluded.updated "
                    "RETURNING created = updated",
                    (spec.name, blob, now, now),
                ).fetchone()[0]
            return bool(created)

        created = await self._run(write)
        self.apps[spec.name] = self._shared.spec(spec)
        self.invalid.pop(spec.name, None)
        return created

    async def delete_app(self, name: str) -> bool:
        def write() -> bool:
            assert self._db is not None
            with self._db:
                self._db.execute("DELETE FROM activity WHERE app = ?", (name,))
                return self._db.execute("DELETE FROM apps WHERE name = ?", (name,)).rowcount > 0

        deleted = await self._run(write)
        self.apps.pop(name, None)
        for branch in self._branch_names.pop(name, ()):
            key = (name, branch)
            self.branches.pop(key, None)
            self.last_requests.pop(key, None)
            self._flushed.pop(key, None)
        return deleted

    async def put_branch(self, branch: BranchSpec) -> None:
        """Create a branch or replace its overrides (`env`); its bundles are left as they are."""
        blob = orjson.dumps({"env": branch.env})
        now = time.time()

        def write() -> None:
            assert self._db is not None
            with self._db:
                self._db.execute(
                    "INSERT INTO branches(app, name, spec, created) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(app, name) DO UPDATE SET spec=excluded.spec",
                    (branch.app, branch.name, blob, now),
                )

        await self._run(write)
        key = (branch.app, branch.name)
        old = self.branches.get(key)
        if old is None:
            self._index(branch.app, branch.name)
            self.branches[key] = replace(
                branch,
                bundle=None,
                previous_bundle=None,
                deployed_at=None,
                created=now,
                last_request=self._flushed.get(key),
            )
        else:
            self.branches[key] = replace(old, env=branch.env)

    async def set_branch(
        self,
        branch: BranchSpec,
        *,
        bundle: BundleRecord | None = None,
        app: AppSpec | None = None,
    ) -> None:
        """Write a branch as a whole (env and bundles) in one transaction.

        `bundle` is recorded first if given (a deploy of a new bundle), and `app` is created if
        given (a deploy to an app that did not exist), so a deploy is one atomic change.
        """
        blob = orjson.dumps({"env": branch.env})
        created = branch.created if branch.created is not None else time.time()
        row = (
            branch.app,
            branch.name,
            blob,
            created,
            branch.bundle,
            branch.previous_bundle,
            branch.deployed_at,
        )

        def write() -> None:
            assert self._db is not None
            with self._db:
                if app is not None:
                    now = time.time()
                    self._db.execute(
                        "INSERT INTO apps(name, spec, created, updated) VALUES (?, ?, ?, ?)",
                        (app.name, orjson.dumps(app.to_json()), now, now),
                    )
                if bundle is not None:
                    self._db.execute(
                        "INSERT OR IGNORE INTO bundles(digest, manifest, size, files, unpacked, "
                        "created) VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            bundle.digest,
                            orjson.dumps(bundle.manifest),
                            bundle.size,
                            bundle.files,
                            bundle.unpacked,
                            bundle.created,
                        ),
                    )
                self._db.execute(
                    "INSERT INTO branches(app, name, spec, created, bundle, previous_bundle, "
                    "deployed_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(app, name) DO UPDATE "
                    "SET spec=excluded.spec, bundle=excluded.bundle, "
                    "previous_bundle=excluded.previous_bundle, deployed_at=excluded.deployed_at",
                    row,
                )

        await self._run(write)
        if app is not None:
            self.apps[app.name] = self._shared.spec(app)
            self.invalid.pop(app.name, None)
        if bundle is not None and bundle.digest not in self.bundles:
            self.bundles[bundle.digest] = bundle
        key = (branch.app, branch.name)
        self._index(branch.app, branch.name)
        self.branches[key] = replace(branch, created=created, last_request=self._flushed.get(key))

    async def forget_bundles(self, digests: Iterable[str]) -> None:
        """Drop the records of bundles that were garbage-collected."""
        doomed = [d for d in digests if d in self.bundles]
        if not doomed:
            return

        def write() -> None:
            assert self._db is not None
            with self._db:
                self._db.executemany("DELETE FROM bundles WHERE digest = ?", [(d,) for d in doomed])

        await self._run(write)
        for digest in doomed:
            self.bundles.pop(digest, None)

    async def put_runtime(self, record: RuntimeRecord) -> bool:
        """Create or replace an uploaded runtime. Returns True if it was created."""
        row = (
            record.name,
            record.digest,
            orjson.dumps(record.definition.to_json()),
            record.size,
            record.files,
            record.unpacked,
            record.uploaded,
        )

        def write() -> None:
            assert self._db is not None
            with self._db:
                self._db.execute(
                    "INSERT INTO runtimes(name, digest, definition, size, files, unpacked, "
                    "uploaded) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                    "digest=excluded.digest, definition=excluded.definition, size=excluded.size, "
                    "files=excluded.files, unpacked=excluded.unpacked, uploaded=excluded.uploaded",
                    row,
                )

        await self._run(write)
        created = record.name not in self.runtimes
        self.runtimes[record.name] = record
        self.invalid.pop(f"runtime {record.name}", None)
        self.invalid_runtimes.pop(record.name, None)
        return created

    async def delete_runtime(self, name: str) -> bool:
        """Forget an uploaded runtime; its tree goes at the next bundle GC."""

        def write() -> bool:
            assert self._db is not None
            with self._db:
                return self._db.execute("DELETE FROM runtimes WHERE name = ?", (name,)).rowcount > 0

        deleted = await self._run(write)
        self.runtimes.pop(name, None)
        self.invalid.pop(f"runtime {name}", None)
        self.invalid_runtimes.pop(name, None)
        return deleted

    def touch(self, app: str, branch: str, when: float) -> None:
        """Record a request to (app, branch) at Unix time `when`: a dict write (and, the first
        time, an index entry); `flush_activity` persists it later."""
        key = (app, branch)
        if key not in self.last_requests:
            self._index(app, branch)
        self.last_requests[key] = when

    async def flush_activity(self) -> int:
        """Persist last-request times recorded since the previous flush. Returns how many."""
        pending = {
            key: when
            for key, when in list(self.last_requests.items())
            if self._flushed.get(key) != when and key[0] in self.apps
        }
        if not pending:
            return 0

        def write() -> None:
            assert self._db is not None
            with self._db:
                self._db.executemany(
                    "INSERT INTO activity(app, branch, last_request) VALUES (?, ?, ?) "
                    "ON CONFLICT(app, branch) DO UPDATE SET last_request=excluded.last_request",
                    [(app, branch, when) for (app, branch), when in pending.items()],
                )

        await self._run(write)
        self._flushed.update(pending)
        for key, when in pending.items():
            found = self.branches.get(key)
            if found is not None:
                self.branches[key] = replace(found, last_request=when)
        return len(pending)

    async def delete_branch(self, app: str, name: str) -> bool:
        def write() -> bool:
            assert self._db is not None
            with self._db:
                self._db.execute("DELETE FROM activity WHERE app = ? AND branch = ?", (app, name))
                return (
                    self._db.execute(
                        "DELETE FROM branches WHERE app = ? AND name = ?", (app, name)
                    ).rowcount
                    > 0
                )

        deleted = await self._run(write)
        self.branches.pop((app, name), None)
        self.last_requests.pop((app, name), None)
        self._flushed.pop((app, name), None)
        rest = tuple(n for n in self._branch_names.pop(app, ()) if n != name)
        if rest:
            self._branch_names[app] = rest
        return deleted
