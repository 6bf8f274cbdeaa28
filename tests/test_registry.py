"""The SQLite-backed registry: writes are durable before they are visible, reads are in memory,
and everything survives a restart (a new Registry on the same file)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.appspec import BranchSpec, parse_app_spec
from gateway.registry import Registry


def run(fn: Callable[[Registry], Awaitable[Any]], path: Path) -> Any:
    """Open a registry at `path`, run `fn` with it, close it; all within a time limit."""

    async def body() -> Any:
        reg = Registry(path)
        await reg.open()
        try:
            return await fn(reg)
        finally:
            await reg.close()

    return asyncio.run(asyncio.wait_for(body(), 10))


def app(name: str, **fields: Any) -> Any:
    return parse_app_spec(name, {"command": ["python3", "app.py"], **fields})


def test_put_get_replace_delete(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "dorm.db"

    async def scenario(reg: Registry) -> None:
        assert await reg.put_app(app("demo")) is True
        assert await reg.put_app(app("demo", max_queue=5)) is False
        got = reg.get_app("demo")
        assert got is not None and got.max_queue == 5
        assert reg.get_app("ghost") is None
        assert await reg.delete_app("demo") is True
        assert await reg.delete_app("demo") is False
        assert reg.get_app("demo") is None

    run(scenario, db)


def test_branches_and_implicit_main(tmp_path: Path) -> None:
    async def scenario(reg: Registry) -> None:
        assert reg.get_branch("demo", "main") is None  # no app, no main
        await reg.put_app(app("demo"))
        assert reg.get_branch("demo", "main") == BranchSpec("demo", "main")
        assert reg.get_branch("demo", "feat") is None
        await reg.put_branch(BranchSpec("demo", "feat", {"X": "1"}))
        await reg.put_branch(BranchSpec("demo", "feat", {"X": "2"}))
        assert reg.get_branch("demo", "feat") == BranchSpec("demo", "feat", {"X": "2"})
        assert [b.name for b in reg.branches_of("demo")] == ["feat", "main"]
        await reg.put_branch(BranchSpec("demo", "main", {"M": "1"}))
        assert [b.env for b in reg.branches_of("demo")] == [{"X": "2"}, {"M": "1"}]
        assert await reg.delete_branch("demo", "feat") is True
        assert await reg.delete_branch("demo", "feat") is False
        assert [b.name for b in reg.branches_of("demo")] == ["main"]

    run(scenario, tmp_path / "dorm.db")


def test_branch_of_missing_app_is_refused(tmp_path: Path) -> None:
    async def scenario(reg: Registry) -> None:
        with pytest.raises(sqlite3.IntegrityError):
            await reg.put_branch(BranchSpec("ghost", "feat"))
        assert reg.get_branch("ghost", "feat") is None

    run(scenario, tmp_path / "dorm.db")


def test_restart_keeps_apps_and_branches_and_delete_cascades(tmp_path: Path) -> None:
    db = tmp_path / "dorm.db"

    async def first(reg: Registry) -> None:
        await reg.put_app(app("demo", env={"A": "1"}, limits={"memory": None}))
        await reg.put_app(app("other"))
        await reg.put_branch(BranchSpec("demo", "feat", {"X": "1"}))
        await reg.put_branch(BranchSpec("other", "dev"))

    async def second(reg: Registry) -> None:
        assert reg.get_app("demo") == app("demo", env={"A": "1"}, limits={"memory": None})
        assert reg.get_branch("demo", "feat") == BranchSpec("demo", "feat", {"X": "1"})
        await reg.delete_app("other")

    async def third(reg: Registry) -> None:
        assert sorted(reg.apps) == ["demo"]
        assert ("other", "dev") not in reg.branches
        await reg.put_app(app("other"))
        assert reg.get_branch("other", "dev") is None  # the branch went with its app

    run(first, db)
    run(second, db)
    run(third, db)


def test_rows_that_no_longer_validate_are_skipped(tmp_path: Path) -> None:
    db = tmp_path / "dorm.db"
    run(lambda reg: reg.put_app(app("good")), db)
    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT INTO apps(name, spec, created, updated) VALUES (?, ?, 0, 0)",
            ("stale", orjson.dumps({"command": ["x"], "retired_field": 1})),
        )

    async def check(reg: Registry) -> None:
        assert sorted(reg.apps) == ["good"]
        assert "retired_field" in reg.invalid["stale"]
        await reg.put_app(app("stale"))  # a corrected spec replaces the stale row
        assert "stale" not in reg.invalid

    run(check, db)
    assert sorted(run(lambda reg: asyncio.sleep(0, sorted(reg.apps)), db)) == ["good", "stale"]
