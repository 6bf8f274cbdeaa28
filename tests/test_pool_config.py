"""[pool] in dorm.toml (defaults, values, DORM_POOL_* overrides, errors that name the key), and
the pool and timing endpoints where instances are plain processes (any host)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, PoolConfig, load_config
from tests.conftest import echo_spec


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "dorm.toml"
    path.write_text(text)
    return str(path)


def test_pool_defaults_and_values(tmp_path: Path) -> None:
    assert load_config(None, environ={}).pool == PoolConfig(2, 8, 2, 30.0)
    path = write(
        tmp_path,
        '[pool]\nmin_idle = 1\nmax_idle = 4\nrefill_concurrency = 2\nshrink_after = "1m"\n',
    )
    cfg = load_config(path, environ={"DORM_POOL_MAX_IDLE": "5"})
    assert cfg.pool == PoolConfig(min_idle=1, max_idle=5, refill_concurrency=2, shrink_after=60.0)
    assert cfg.pool.settings()["max_idle"] == 5


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[pool]\nmin_idle = 1\nidle = 2\n", "unknown key pool.idle"),
        ("[pool]\nmin_idle = -1\n", "pool.min_idle"),
        ("[pool]\nmin_idle = 4\nmax_idle = 2\n", "pool.max_idle must be >= pool.min_idle"),
        ("[pool]\nrefill_concurrency = 0\n", "pool.refill_concurrency"),
        ('[pool]\nshrink_after = "soon"\n', "pool.shrink_after"),
        ("[gateway]\nprewarm = 2\n", "gateway.prewarm is now [pool] min_idle"),
        ("[pools]\nmin_idle = 1\n", "unknown section [pools]"),
    ],
)
def test_bad_pool_config_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_config(write(tmp_path, text), environ={})


def test_bad_pool_environment_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="DORM_POOL_MIN_IDLE"):
        load_config(None, environ={"DORM_POOL_MIN_IDLE": "many"})


def test_without_sandboxes_there_are_no_pools_but_starts_are_timed(
    gateway_factory: Any, tmp_path: Path
) -> None:
    gw = gateway_factory()  # isolation = "process": nothing to pre-confine
    status, body = gw.admin("GET", "/v1/pools")
    assert status == 200 and body["enabled"] is False and body["pools"] == []
    gw.put_app("echo", echo_spec())
    assert gw.request("/", host="echo.localhost").status == 200
    status, inst = gw.admin("GET", "/v1/instances/echo/main")
    assert status == 200 and inst["last_start"]["path"] == "fresh", inst
    assert inst["last_start"]["claim_ms"] >= 0 and inst["last_start"]["app_ms"] > 0
    stats = gw.admin("GET", "/v1/stats")[1]["cold_starts"]
    assert stats["fresh"]["count"] == 1 and stats["pool"]["count"] == 0
