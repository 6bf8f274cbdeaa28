"""[pool] in dorm.toml: defaults, values, DORM_POOL_* overrides and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, PoolConfig, load_config


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "dorm.toml"
    path.write_text(text)
    return str(path)


def test_pool_defaults_and_values(tmp_path: Path) -> None:
    assert load_config(None, environ={}).pool == PoolConfig(2, 8, 1, 30.0)
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
