"""The SQLite-backed registry: writes are durable before they are visible, reads are in memory,
and everything survives a restart (a new Registry on the same file)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.appspec import BranchSpec, parse_app_spec
from gateway.registry import SHARED_POOL_LIMIT, Registry, _Shared


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


def test_equal_spec_values_are_one_object_and_specs_keep_their_values(tmp_path: Path) -> None:
    """100,000 registered apps fit in little memory because equal values are shared: written
    through the API or loaded at start. Sharing must never change a spec (1 is not 1.0)."""
    db = tmp_path / "dorm.db"
    fields = {"runtime": "python-asgi", "entry": "main:app", "app_dir": "/srv/a", "max_queue": 900}

    def check_shared(reg: Registry) -> None:
        a, b = reg.get_app("a"), reg.get_app("b")
        assert a is not None and b is not None
        for name in ("runtime", "entry", "app_dir", "command", "limits", "static", "max_body"):
            assert getattr(a, name) is getattr(b, name), name
        assert a.max_queue is b.max_queue  # 900: not one of CPython's cached small ints
        assert a.idle_timeout is b.idle_timeout

    async def first(reg: Registry) -> None:
        await reg.put_app(parse_app_spec("a", {**fields, "idle_timeout": "5m"}))
        await reg.put_app(parse_app_spec("b", {**fields, "idle_timeout": 300}))
        await reg.put_app(parse_app_spec("c", {**fields, "limits": {"cpu": 2}}))
        await reg.put_app(parse_app_spec("d", {**fields, "limits": {"cpu": 2.0}}))
        check_shared(reg)

    async def second(reg: Registry) -> None:
        check_shared(reg)
        for name in "ab":
            assert reg.get_app(name) == parse_app_spec(name, {**fields, "idle_timeout": "5m"})
        for name, cpu in (("c", 2), ("d", 2.0)):
            got = reg.get_app(name)
            want = parse_app_spec(name, {**fields, "limits": {"cpu": cpu}})
            assert got is not None and got == want
            assert orjson.dumps(got.to_json()) == orjson.dumps(want.to_json())

    run(first, db)
    run(second, db)


def test_shared_values_keep_their_type_and_the_pool_is_bounded() -> None:
    shared = _Shared()
    assert shared.value(300) is shared.value(int("300"))
    assert type(shared.value(300.0)) is float  # equal to 300, hashed alike, still a float
    assert shared.value(300.0) is not shared.value(300)
    assert shared.value(True) is True and shared.value(None) is None
    assert shared.value(-0.0) is not shared.value(0.0)
    for i in range(SHARED_POOL_LIMIT + 10):
        shared.value(1000 + i)
    assert len(shared.pool) <= SHARED_POOL_LIMIT


def test_a_loaded_app_costs_little_memory(tmp_path: Path) -> None:
    """What one registered python-asgi app holds in the registry after a start: 3,000 rows
    written as the API writes them, loaded under tracemalloc. It was ≈ 1.1 KiB before values
    were shared, ≈ 0.4 KiB after; the bound leaves room for a new field or two."""
    db = tmp_path / "dorm.db"
    run(lambda reg: asyncio.sleep(0), db)  # create the schema
    n = 3000
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO apps(name, spec, created, updated) VALUES (?, ?, 0, 0)",
            [
                (
                    f"app{i}",
                    orjson.dumps(
                        parse_app_spec(
                            f"app{i}",
                            {"runtime": "python-asgi", "entry": "main:app", "app_dir": "/srv/a"},
                        ).to_json()
                    ),
                )
                for i in range(n)
            ],
        )

    tracemalloc.start()
    try:

        async def body() -> int:
            reg = Registry(db)
            before = tracemalloc.get_traced_memory()[0]
            await reg.open()
            used = tracemalloc.get_traced_memory()[0] - before
            assert len(reg.apps) == n
            await reg.close()
            return used

        used = asyncio.run(asyncio.wait_for(body(), 60))
    finally:
        tracemalloc.stop()
    assert used / n < 600, f"{used / n:.0f} bytes per loaded app"


def test_open_logs_what_it_loaded_and_how_long_it_took(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "dorm.db"

    async def fill(reg: Registry) -> None:
        await reg.put_app(app("a"))
        await reg.put_app(app("b"))
        await reg.put_branch(BranchSpec("a", "feat"))

    run(fill, db)
    with caplog.at_level(logging.INFO, logger="dorm.registry"):
        run(lambda reg: asyncio.sleep(0), db)
    loaded = [r.getMessage() for r in caplog.records if "registry: loaded" in r.getMessage()]
    assert len(loaded) == 1 and loaded[0].startswith(
        "registry: loaded 2 apps, 1 branches, 0 bundles in "
    )


def test_deleting_an_app_forgets_exactly_its_branches_and_activity(tmp_path: Path) -> None:
    db = tmp_path / "dorm.db"

    async def first(reg: Registry) -> None:
        for name in ("a", "b"):
            await reg.put_app(app(name))
            await reg.put_branch(BranchSpec(name, "feat"))
            reg.touch(name, "main", 100.0)
            reg.touch(name, "feat", 200.0)
        reg.touch("a", "gone", 50.0)  # activity of a branch that has no row (main-only apps)
        assert await reg.flush_activity() == 5
        assert [b.name for b in reg.branches_of("a")] == ["feat", "main"]

    async def second(reg: Registry) -> None:  # the index is rebuilt from SQLite
        assert [b.name for b in reg.branches_of("a")] == ["feat", "main"]
        assert reg.last_request("a", "feat") == 200.0
        await reg.delete_app("a")
        assert reg.branches_of("a") == []
        assert reg.last_request("a", "main") is None and reg.last_request("a", "gone") is None
        assert ("a", "feat") not in reg.branches
        assert [b.name for b in reg.branches_of("b")] == ["feat", "main"]
        assert reg.last_request("b", "feat") == 200.0
        await reg.delete_branch("b", "feat")
        assert [b.name for b in reg.branches_of("b")] == ["main"]
        await reg.put_app(app("a"))  # recreated: nothing of the old app comes back
        assert [b.name for b in reg.branches_of("a")] == ["main"]
        assert reg.last_request("a", "main") is None

    async def third(reg: Registry) -> None:
        assert reg.last_request("a", "main") is None
        assert reg.last_request("b", "main") == 100.0
        assert [b.name for b in reg.branches_of("b")] == ["main"]

    run(first, db)
    run(second, db)
    run(third, db)


def test_deleting_an_app_does_not_visit_every_other_apps_activity(tmp_path: Path) -> None:
    """Deleting one app used to scan every (app, branch) key of every app with activity, on the
    event loop: 150,000 of them (loaded at start, so in two tables) made 100 deletes take ≈ 1 s
    on the 2-CPU bench machine; with the per-app index they take ≈ 0.02 s. The bound leaves a
    wide margin for a busy machine and still fails the scan."""
    db = tmp_path / "dorm.db"

    async def doomed(reg: Registry) -> None:
        for i in range(100):
            await reg.put_app(app(f"doomed{i}"))
            reg.touch(f"doomed{i}", "main", 1.0)
        await reg.flush_activity()

    run(doomed, db)
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO activity(app, branch, last_request) VALUES (?, 'main', 1.0)",
            [(f"busy{i}",) for i in range(150_000)],
        )

    async def scenario(reg: Registry) -> float:
        assert len(reg.last_requests) == 150_100
        t0 = time.perf_counter()
        for i in range(100):
            await reg.delete_app(f"doomed{i}")
        elapsed = time.perf_counter() - t0
        assert len(reg.last_requests) == 150_000
        return elapsed

    elapsed = run(scenario, db)
    assert elapsed < 0.3, f"100 deletes took {elapsed:.2f}s"
