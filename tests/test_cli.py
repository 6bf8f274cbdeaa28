"""The `dorm` CLI end to end against a real admin server on 127.0.0.1 (in a thread), both
in-process through main() and as a subprocess for exit codes, stderr and Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from gateway.cli import main
from gateway.logs import RotatingLog, log_path
from tests.test_admin import AdminHarness

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def admin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AdminHarness]:
    for var in ("DORM_ADMIN_URL", "DORM_ADMIN_TOKEN", "DORM_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray ./dorm.toml
    harness = AdminHarness(tmp_path / "data").start()
    try:
        yield harness
    finally:
        harness.stop()


def dorm(
    admin: AdminHarness, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str, str]:
    code = main(["--admin-url", admin.url, "--token", admin.token, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_app_lifecycle(admin: AdminHarness, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = dorm(
        admin,
        capsys,
        *("app", "set", "demo", "--command", "python3 'my app.py'", "--env", "A=1"),
        *("--env", "B=x=y", "--idle-timeout", "5m", "--max-body", "1MiB", "--memory", "128MiB"),
        *("--cpu", "0.5", "--pids", "32", "--max-queue", "9", "--health", "/h"),
        "--startup-timeout",
        "3s",
    )
    assert (code, out) == (0, "created app demo\n")
    spec = admin.registry.get_app("demo")
    assert spec is not None
    assert spec.command == ("python3", "my app.py")
    assert spec.env == {"A": "1", "B": "x=y"}
    assert (spec.idle_timeout, spec.startup_timeout, spec.max_body) == (300, 3, 1024**2)
    assert (spec.limits.memory, spec.limits.cpu, spec.limits.pids) == (128 * 1024**2, 0.5, 32)
    assert (spec.max_queue, spec.health) == (9, "/h")
    code, out, _ = dorm(admin, capsys, "app", "set", "demo", "--command", "python3 app.py")
    assert (code, out) == (0, "updated app demo\n")

    code, out, _ = dorm(admin, capsys, "apps")
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:3] == ["NAME", "RUNTIME", "COMMAND"]
    assert row.split()[:4] == ["demo", "command", "python3", "app.py"]
    code, out, _ = dorm(admin, capsys, "apps", "--json")
    assert [a["name"] for a in orjson.loads(out)] == ["demo"]
    code, out, _ = dorm(admin, capsys, "app", "show", "demo")
    assert orjson.loads(out)["command"] == ["python3", "app.py"]

    code, out, _ = dorm(admin, capsys, "rm", "demo")
    assert (code, out) == (0, "removed app demo\n")
    assert admin.registry.get_app("demo") is None


def test_json_spec_file_and_flags_overlay(
    admin: AdminHarness, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_bytes(orjson.dumps({"command": ["a"], "env": {"A": "1"}, "max_queue": 3}))
    code, out, err = dorm(
        admin, capsys, "app", "set", "demo", "--json-spec", str(spec_file), "--env", "B=2", "--json"
    )
    assert code == 0, err
    shown = orjson.loads(out)
    assert (shown["env"], shown["max_queue"]) == ({"A": "1", "B": "2"}, 3)


def test_branches_ps_stop(admin: AdminHarness, capsys: pytest.CaptureFixture[str]) -> None:
    assert dorm(admin, capsys, "app", "set", "demo", "--command", "x")[0] == 0
    code, out, _ = dorm(admin, capsys, "branch", "set", "demo/feat", "--env", "X=1")
    assert (code, out) == (0, "set branch demo/feat\n")
    code, out, _ = dorm(admin, capsys, "branches", "demo")
    rows = [line.split() for line in out.splitlines()[1:]]
    assert rows == [["feat", "-", "-", "-", "X=1"], ["main", "-", "-", "-", "-"]]
    code, out, _ = dorm(admin, capsys, "branches", "demo", "--json")
    assert [b["name"] for b in orjson.loads(out)] == ["feat", "main"]
    assert dorm(admin, capsys, "branch", "rm", "demo/feat")[:2] == (0, "removed branch demo/feat\n")

    admin.instances.items = [
        {
            "app": "demo",
            "branch": "main",
            "state": "ready",
            "pid": 4242,
            "in_flight": 1,
            "upgraded": 0,
            "queued": 0,
            "started_at": time.time() - 30,
            "last_request": time.time() - 5,
            "starts": 1,
            "failures": 0,
            "last_error": None,
        }
    ]
    code, out, _ = dorm(admin, capsys, "ps")
    header, row = out.splitlines()
    assert header.split()[:3] == ["APP", "BRANCH", "STATE"]
    assert row.split()[:4] == ["demo", "main", "ready", "4242"]
    assert "5s ago" in row
    code, out, _ = dorm(admin, capsys, "ps", "--json")
    assert orjson.loads(out)[0]["pid"] == 4242
    assert dorm(admin, capsys, "stop", "demo")[:2] == (0, "stopped 1 instance\n")
    assert dorm(admin, capsys, "stop", "demo/main")[:2] == (0, "stopped 1 instance\n")
    assert admin.instances.calls[-2:] == [("stop", "demo", None), ("stop", "demo", "main")]


def test_logs(admin: AdminHarness, capsys: pytest.CaptureFixture[str]) -> None:
    assert dorm(admin, capsys, "app", "set", "demo", "--command", "x")[0] == 0
    log = RotatingLog(log_path(admin.data_dir, "demo", "feat"), max_bytes=1000, keep=1)
    log.write(b"".join(b"line %d\n" % i for i in range(10)))
    log.close()
    assert dorm(admin, capsys, "logs", "demo/feat", "-n", "2")[:2] == (0, "line 8\nline 9\n")
    assert dorm(admin, capsys, "logs", "demo")[:2] == (0, "")


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["app", "show", "ghost"], 1, "app: no app named 'ghost' (HTTP 404)"),
        (["app", "set", "demo", "--command", "x", "--idle-timeout", "soon"], 1, "idle_timeout:"),
        (["app", "set", "demo", "--command", "x", "--env", "DORM_APP=x"], 1, "env.DORM_APP:"),
        (["app", "set", "Demo", "--command", "x"], 2, "app name:"),
        (["app", "set", "demo"], 2, "--command"),
        (["app", "set", "demo", "--command", "x", "--env", "novalue"], 2, "KEY=VALUE"),
        (["app", "set", "demo", "--command", "'unclosed"], 2, "--command"),
        (["stop", "demo/Bad"], 2, "branch name:"),
        (["branch", "set", "demo"], 2, "APP/BRANCH"),
        (["logs", "demo", "-n", "99999"], 2, "-n"),
        (["stop", "ghost"], 1, "no app named 'ghost'"),
    ],
)
def test_errors_are_one_line(
    admin: AdminHarness,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    code: int,
    needle: str,
) -> None:
    got, out, err = dorm(admin, capsys, *argv)
    assert got == code
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("dorm: ")
    assert needle in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["ps", "--bogus"]) == 2
    assert "usage:" in capsys.readouterr().err


def test_wrong_token_and_unreachable(
    admin: AdminHarness, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--admin-url", admin.url, "--token", "nope", "apps"]) == 1
    assert "authorization: invalid bearer token (HTTP 401)" in capsys.readouterr().err
    assert main(["--admin-url", "http://127.0.0.1:1", "--token", "x", "apps"]) == 1
    assert "cannot reach the admin API" in capsys.readouterr().err


def test_environment_and_flags_after_command(
    admin: AdminHarness, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DORM_ADMIN_URL", admin.url)
    monkeypatch.setenv("DORM_ADMIN_TOKEN", admin.token)
    assert main(["apps", "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out) == []
    monkeypatch.setenv("DORM_ADMIN_TOKEN", "wrong")
    assert main(["apps", "--token", admin.token]) == 0  # the flag wins, even after the command
    capsys.readouterr()


def test_defaults_to_local_config(
    admin: AdminHarness, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = tmp_path / "local"
    data.mkdir()
    (data / "admin.token").write_text(admin.token + "\n")
    config = tmp_path / "dorm.toml"
    config.write_text(f'[gateway]\nadmin_listen = "127.0.0.1:{admin.port}"\ndata_dir = "{data}"\n')
    assert main(["apps", "--json"]) == 0  # ./dorm.toml is found
    assert orjson.loads(capsys.readouterr().out) == []
    (data / "admin.token").unlink()
    assert main(["--config", str(config), "apps"]) == 1
    assert "no admin token" in capsys.readouterr().err
    config.write_text("[gateway]\nlisten_port = 1\n")
    assert main(["apps"]) == 1
    assert "unknown key gateway.listen_port" in capsys.readouterr().err


def test_serve_calls_server_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str | None] = []
    fake = types.ModuleType("gateway.server")

    def serve(config_path: str | None) -> int:
        calls.append(config_path)
        return 7

    fake.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gateway.server", fake)
    assert main(["serve", "--config", "x.toml"]) == 7
    assert main(["serve"]) == 7
    assert calls == ["x.toml", None]


def _subprocess_env(admin: AdminHarness) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DORM_ADMIN_URL=admin.url, DORM_ADMIN_TOKEN=admin.token, PYTHONPATH=str(ROOT))
    return env


def test_subprocess_exit_codes(admin: AdminHarness) -> None:
    env = _subprocess_env(admin)
    cli = [sys.executable, "-m", "gateway.cli"]
    ok = subprocess.run([*cli, "apps"], env=env, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0
    assert ok.stdout.startswith("NAME")
    bad = subprocess.run(
        [*cli, "app", "show", "ghost"], env=env, capture_output=True, text=True, timeout=30
    )
    assert bad.returncode == 1
    assert bad.stderr == "dorm: app: no app named 'ghost' (HTTP 404)\n"


def test_logs_follow_and_ctrl_c(admin: AdminHarness) -> None:
    assert admin.run(_put_app(admin)) is None
    path = log_path(admin.data_dir, "demo", "main")
    log = RotatingLog(path, max_bytes=10_000, keep=1)
    log.write(b"before\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "logs", "demo", "-f"],
        env=_subprocess_env(admin),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"before\n"
        log.write(b"after\n")
        assert proc.stdout.readline() == b"after\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 130
        assert err == b""
    finally:
        log.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


async def _put_app(admin: AdminHarness) -> None:
    from gateway.appspec import parse_app_spec

    await admin.registry.put_app(parse_app_spec("demo", {"command": ["x"]}))


def test_doctor_reports_this_host(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--json"]) == 0
    report = orjson.loads(capsys.readouterr().out)
    assert report["root"] == (os.geteuid() == 0)
    assert report["isolation"] in ("sandbox", "rootless", "process")
    assert report["cgroup"]["version"] in (1, 2, None)
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert f"isolation         {report['isolation']}" in text


def test_doctor_says_when_the_config_does_not_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The host facts still print, but the broken config is named and the exit is non-zero:
    otherwise the volume probe would quietly describe the default data dir."""
    config = tmp_path / "dorm.toml"
    config.write_text('[gateway]\ndata_dirr = "/srv/dorm"\n')
    assert main(["doctor", "--json", "--config", str(config)]) == 1
    report = orjson.loads(capsys.readouterr().out)
    assert report["config_error"] == f"{config}: unknown key gateway.data_dirr"
    assert report["isolation"] in ("sandbox", "rootless", "process")
    assert main(["doctor", "--config", str(config)]) == 1
    text = capsys.readouterr().out
    assert f"config            not loaded: {config}: unknown key gateway.data_dirr" in text
    assert "probed under the default /var/lib/dorm" in text
    assert main(["doctor", "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out)["config_error"] is None
