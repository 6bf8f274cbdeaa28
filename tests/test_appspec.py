"""App and branch spec validation: every field accepted in its documented forms, and every
rejection names the field (with a dotted path for nested ones)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.appspec import (
    MAX_ENV_BYTES,
    AppSpec,
    Limits,
    SpecError,
    parse_app_spec,
    parse_branch_spec,
)

BASE: dict[str, Any] = {"command": ["python3", "app.py"]}


def spec(**fields: Any) -> AppSpec:
    return parse_app_spec("demo", {**BASE, **fields})


def test_defaults() -> None:
    s = spec()
    assert s.runtime == "command"
    assert s.command == ("python3", "app.py")
    assert (s.idle_timeout, s.startup_timeout, s.stop_timeout) == (300.0, 10.0, 10.0)
    assert (s.max_body, s.max_queue, s.health, s.isolation) == (10 * 1024**2, 100, None, None)
    assert s.limits == Limits()


def test_the_documented_example() -> None:
    s = parse_app_spec(
        "demo",
        {
            "runtime": "command",
            "command": ["python3", "app.py"],
            "env": {"GREETING": "hi"},
            "idle_timeout": 300,
            "startup_timeout": 10,
            "max_body": "10MiB",
            "max_queue": 100,
            "limits": {"memory": "256MiB", "cpu": 1.0, "pids": 64},
        },
    )
    assert s.env == {"GREETING": "hi"}
    assert s.limits == Limits(memory=256 * 1024**2, cpu=1.0, pids=64)


def test_each_field_in_its_forms() -> None:
    assert spec(idle_timeout="5m").idle_timeout == 300.0
    assert spec(startup_timeout=2.5).startup_timeout == 2.5
    assert spec(stop_timeout=0).stop_timeout == 0.0
    assert spec(max_body=1024).max_body == 1024
    assert spec(max_body="1KiB").max_body == 1024
    assert spec(max_queue=1).max_queue == 1
    assert spec(health="/healthz").health == "/healthz"
    assert spec(isolation="sandbox").isolation == "sandbox"
    assert spec(limits={"memory": None, "cpu": None, "pids": None}).limits == Limits(
        None, None, None
    )
    assert spec(limits={"cpu": 2}).limits == Limits(cpu=2.0)
    assert spec(name="demo").name == "demo"


def test_to_json_round_trips() -> None:
    s = spec(env={"A": "1"}, limits={"memory": "1GiB", "cpu": 0.5}, health="/h")
    assert parse_app_spec("demo", s.to_json()) == s
    unlimited = spec(limits={"memory": None})
    assert parse_app_spec("demo", unlimited.to_json()) == unlimited


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"colour": "red"}, "colour"),
        ({"runtime": "Docker!"}, "runtime"),
        ({"runtime": ["command"]}, "runtime"),
        ({"command": []}, "command"),
        ({"command": "python3 app.py"}, "command"),
        ({"command": ["ok", 5]}, "command.1"),
        ({"command": ["a\0b"]}, "command.0"),
        ({"command": ["x"] * 257}, "command"),
        ({"env": ["A=1"]}, "env"),
        ({"env": {"": "x"}}, "env."),
        ({"env": {"A=B": "x"}}, "env.A=B"),
        ({"env": {"A": 1}}, "env.A"),
        ({"env": {"A": "x\0"}}, "env.A"),
        ({"env": {"PORT": "80"}}, "env.PORT"),
        ({"env": {"DORM_SOCKET": "/x"}}, "env.DORM_SOCKET"),
        ({"env": {f"K{i}": "" for i in range(300)}}, "env"),
        ({"env": {"BIG": "x" * MAX_ENV_BYTES}}, "env"),
        ({"idle_timeout": "later"}, "idle_timeout"),
        ({"idle_timeout": 0}, "idle_timeout"),
        ({"startup_timeout": -1}, "startup_timeout"),
        ({"stop_timeout": True}, "stop_timeout"),
        ({"max_body": "huge"}, "max_body"),
        ({"max_body": -1}, "max_body"),
        ({"max_queue": "10"}, "max_queue"),
        ({"max_queue": 1.5}, "max_queue"),
        ({"max_queue": 10**9}, "max_queue"),
        ({"max_queue": True}, "max_queue"),
        ({"health": "healthz"}, "health"),
        ({"health": "/a b"}, "health"),
        ({"health": 5}, "health"),
        ({"isolation": "vm"}, "isolation"),
        ({"limits": 5}, "limits"),
        ({"limits": {"disk": 1}}, "limits.disk"),
        ({"limits": {"memory": "1MiB"}}, "limits.memory"),
        ({"limits": {"memory": "lots"}}, "limits.memory"),
        ({"limits": {"cpu": 0}}, "limits.cpu"),
        ({"limits": {"cpu": "1"}}, "limits.cpu"),
        ({"limits": {"cpu": float("nan")}}, "limits.cpu"),
        ({"limits": {"pids": 0}}, "limits.pids"),
        ({"limits": {"pids": 1.0}}, "limits.pids"),
        ({"name": "other"}, "name"),
    ],
)
def test_rejections_name_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as info:
        spec(**fields)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_command_is_required_and_body_must_be_an_object() -> None:
    with pytest.raises(SpecError) as info:
        parse_app_spec("demo", {"runtime": "command"})
    assert info.value.field == "command"
    with pytest.raises(SpecError) as info:
        parse_app_spec("demo", ["python3"])
    assert info.value.field == "body"


@pytest.mark.parametrize("name", ["Demo", "a--b", "-a", "", "x" * 64])
def test_bad_app_name(name: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_app_spec(name, BASE)
    assert info.value.field == "name"


def test_branch_spec() -> None:
    assert parse_branch_spec("demo", "feat", None).env == {}
    assert parse_branch_spec("demo", "feat", {"env": {"X": "1"}}).to_json() == {
        "app": "demo",
        "name": "feat",
        "env": {"X": "1"},
    }
    for obj, field in (
        ({"colour": 1}, "colour"),
        ([], "body"),
        ({"env": {"PORT": "1"}}, "env.PORT"),
        ({"env": "X=1"}, "env"),
    ):
        with pytest.raises(SpecError) as info:
            parse_branch_spec("demo", "feat", obj)
        assert info.value.field == field
    with pytest.raises(SpecError) as info:
        parse_branch_spec("demo", "Feat", {})
    assert info.value.field == "branch"
