"""SandboxSpec validation: every invalid field is rejected with an error that names it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sandboxes import Rlimits, SandboxSpec, SandboxSpecError
from sandboxes.spec import validate_argv, validate_env


@pytest.fixture
def base(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "sock").mkdir()
    return {"name": "app--main--1", "uid": 200001, "socket_dir": str(tmp_path / "sock")}


def test_valid_spec_has_safe_defaults(base: dict[str, Any]) -> None:
    spec = SandboxSpec(**base)
    assert spec.network == "none"
    assert spec.rlimits.core == 0
    assert spec.effective_gid == 200001
    assert spec.memory is not None and spec.pids is not None and spec.cpu is not None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "App"),
        ("name", "-x"),
        ("name", "a/b"),
        ("name", ""),
        ("uid", 0),
        ("uid", 999),
        ("uid", 2**32 - 1),
        ("uid", True),
        ("gid", 0),
        ("socket_dir", "relative/dir"),
        ("socket_dir", "/nonexistent/dorm-sock"),
        ("socket_dir", "/tmp/../etc"),
        ("app_dir", "/nonexistent/dorm-app"),
        ("data_dir", "x"),
        ("rootfs", "/nonexistent/rootfs"),
        ("cwd", "app"),
        ("hostname", "has space"),
        ("hostname", "a" * 64),
        ("memory", 1024),
        ("memory", -1),
        ("memory_high", 1),
        ("cpu", 0),
        ("cpu", "1"),
        ("cpu", 5000.0),
        ("pids", 0),
        ("cpu_weight", 0),
        ("cpu_weight", 10001),
        ("tmp_size", 10),
        ("shm_size", 0),
        ("network", "host"),
        ("rlimits", {"nofile": 10}),
        ("extra_ro_binds", ["/usr"]),
        ("cgroup_parent", "../escape"),
    ],
)
def test_bad_field_is_named(base: dict[str, Any], field: str, value: object) -> None:
    with pytest.raises(SandboxSpecError) as info:
        SandboxSpec(**{**base, field: value})
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_memory_high_above_memory_is_rejected(base: dict[str, Any]) -> None:
    with pytest.raises(SandboxSpecError) as info:
        SandboxSpec(**base, memory=64 << 20, memory_high=128 << 20)
    assert info.value.field == "memory_high"


@pytest.mark.parametrize("path", ["/app", "/proc/self", "/etc", "/tmp/x", "/"])
def test_extra_bind_may_not_shadow_reserved_paths(base: dict[str, Any], path: str) -> None:
    with pytest.raises(SandboxSpecError) as info:
        SandboxSpec(**base, extra_ro_binds=(path,))
    assert info.value.field == "extra_ro_binds[0]"


def test_extra_bind_must_exist(base: dict[str, Any]) -> None:
    with pytest.raises(SandboxSpecError) as info:
        SandboxSpec(**base, extra_ro_binds=("/usr", "/nonexistent-dorm"))
    assert info.value.field == "extra_ro_binds[1]"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"nofile": 4}, "rlimits.nofile"),
        ({"core": -1}, "rlimits.core"),
        ({"fsize": -5}, "rlimits.fsize"),
        ({"nproc": 0}, "rlimits.nproc"),
        ({"stack": "big"}, "rlimits.stack"),
    ],
)
def test_bad_rlimit_is_named(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(SandboxSpecError) as info:
        Rlimits(**kwargs)
    assert info.value.field == field


def test_spec_is_immutable(base: dict[str, Any]) -> None:
    spec = SandboxSpec(**base)
    with pytest.raises(AttributeError):
        spec.uid = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"1BAD": "x"}, "invalid variable name"),
        ({"A": "x\0y"}, "NUL-free"),
        ({"A=B": "x"}, "invalid"),
    ],
)
def test_env_validation(env: dict[str, str], message: str) -> None:
    with pytest.raises(SandboxSpecError) as info:
        validate_env(env)
    assert info.value.field == "env" and message in info.value.message


@pytest.mark.parametrize(("argv", "field"), [([], "argv"), (["a", "b\0"], "argv[1]")])
def test_argv_validation(argv: list[str], field: str) -> None:
    with pytest.raises(SandboxSpecError) as info:
        validate_argv(argv)
    assert info.value.field == field
