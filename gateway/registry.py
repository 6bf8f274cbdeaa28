"""The app registry: apps and their branches, persisted in SQLite, served from memory.

The data plane looks apps up on every request, so reads are plain dict lookups on in-memory copies.
Writes go to SQLite first (on a single dedicated thread, so the event loop never blocks on disk and
the connection is never shared between threads) and only then change memory: what a client was told
was saved survives a restart, and a failed write changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from gateway.appspec import AppSpec, BranchSpec, SpecError, parse_app_spec, parse_branch_spec

log = logging.getLogger("dorm.registry")

DEFAULT_BRANCH = "main"
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
"""


class Registry:
    """Apps and branches. Reads are synchronous and O(1); writes are async and durable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.apps: dict[str, AppSpec] = {}
        self.branches: dict[tuple[str, str], BranchSpec] = {}
        # Stored rows that failed validation when loaded: name (or app/branch) → reason.
        self.invalid: dict[str, str] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dorm-registry")
        self._db: sqlite3.Connection | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def open(self) -> None:
        """Open (creating if needed) the database and load every app and branch into memory."""
        await self._run(self._open_sync)

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(_SCHEMA)
        self._db = db
        # A row that no longer validates (the rules tightened since it was stored) must not keep
        # the gateway from starting: it is skipped with an error in the log, and left on disk
        # so a corrected spec can be PUT over it.
        for name, spec in db.execute("SELECT name, spec FROM apps"):
            try:
                self.apps[name] = parse_app_spec(name, orjson.loads(spec))
            except (SpecError, orjson.JSONDecodeError) as exc:
                self.invalid[name] = str(exc)
                log.error("registry: app %r is not valid any more, skipped: %s", name, exc)
        for app, name, spec in db.execute("SELECT app, name, spec FROM branches"):
            if app not in self.apps:
                continue
            try:
                self.branches[(app, name)] = parse_branch_spec(app, name, orjson.loads(spec))
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

    def branches_of(self, app: str) -> list[BranchSpec]:
        out = [b for (a, _), b in self.branches.items() if a == app]
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
        self.apps[spec.name] = spec
        self.invalid.pop(spec.name, None)
        return created

    async def delete_app(self, name: str) -> bool:
        def write() -> bool:
            assert self._db is not None
            with self._db:
                return self._db.execute("DELETE FROM apps WHERE name = ?", (name,)).rowcount > 0

        deleted = await self._run(write)
        self.apps.pop(name, None)
        for key in [k for k in self.branches if k[0] == name]:
            del self.branches[key]
        return deleted

    async def put_branch(self, branch: BranchSpec) -> None:
        blob = orjson.dumps({"env": branch.env})

        def write() -> None:
            assert self._db is not None
            with self._db:
                self._db.execute(
                    "INSERT INTO branches(app, name, spec, created) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(app, name) DO UPDATE SET spec=excluded.spec",
                    (branch.app, branch.name, blob, time.time()),
                )

        await self._run(write)
        self.branches[(branch.app, branch.name)] = branch

    async def delete_branch(self, app: str, name: str) -> bool:
        def write() -> bool:
            assert self._db is not None
            with self._db:
                return (
                    self._db.execute(
                        "DELETE FROM branches WHERE app = ? AND name = ?", (app, name)
                    ).rowcount
                    > 0
                )

        deleted = await self._run(write)
        self.branches.pop((app, name), None)
        return deleted
