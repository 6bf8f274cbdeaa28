"""spawn_call(): zygote mode, the confined child calls preloaded tenant code instead of execve."""

from __future__ import annotations

import json
import os
import select
import signal

import pytest

from sandboxes import SandboxError, SandboxSpecError, prefork_for, spawn_call, start_call

from . import targets
from .conftest import Runner

assert targets.report  # preloaded in the "fork server" before any fork


def _call(sbx: Runner, target: str, argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    spec = sbx.spec()
    n = len(sbx.live) + len(sbx.finished)
    out, err = sbx.workdir / f"zout{n}", sbx.workdir / f"zerr{n}"
    fo = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    fe = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        sb = spawn_call(spec, target, argv, env, stdout_fd=fo, stderr_fd=fe)
    finally:
        os.close(fo)
        os.close(fe)
    sbx.live.append((sb, spec.uid))
    r = sbx.finish(sb, out, err)
    assert r.exit_code is not None, f"killed by signal {r.signal}"
    return r.exit_code, r.out, r.err


def test_called_target_is_fully_confined(sbx: Runner) -> None:
    code, out, err = _call(sbx, f"{targets.__name__}:report", ["app", "--x"], {"ONLY": "this"})
    assert code == 3, err
    info = json.loads(out)
    assert info["pid"] == 1
    assert info["uid"][0] == info["uid"][1] == info["uid"][2] >= 300000
    assert info["env"] == {"ONLY": "this"}
    assert info["argv"] == ["app", "--x"]
    assert info["fds"] in ([0, 1, 2], [0, 1, 2, 3])  # 3: listdir's own directory fd
    assert info["cwd"] == "/app"
    assert info["status"] == {
        "CapPrm": "0000000000000000",
        "CapEff": "0000000000000000",
        "CapBnd": "0000000000000000",
        "CapAmb": "0000000000000000",
        "NoNewPrivs": "1",
        "Seccomp": "2",
    }


def test_exit_codes_and_tracebacks(sbx: Runner) -> None:
    code, _, err = _call(sbx, f"{targets.__name__}:exit_with_message", ["a"], {})
    assert (code, err.strip()) == (1, "tenant said goodbye")
    code, _, err = _call(sbx, f"{targets.__name__}:crash", ["a"], {})
    assert code == 1 and "RuntimeError: tenant bug" in err


def test_unknown_target_fails_at_resolve(sbx: Runner) -> None:
    with pytest.raises(SandboxError) as info:
        _call(sbx, f"{targets.__name__}:nope", ["a"], {})
    assert info.value.step == "resolve"
    with pytest.raises(SandboxSpecError):
        _call(sbx, "no-colon", ["a"], {})


def _readable(fd: int, timeout: float = 10.0) -> None:
    p = select.poll()
    p.register(fd, select.POLLIN)
    assert p.poll(int(timeout * 1000)), "nothing to read in time"


def test_start_call_without_blocking(sbx: Runner) -> None:
    """prefork_for + complete_ready + start_call + finish: spawn_call in the halves a
    single-threaded caller drives from its own poll loop (the fork server's member builds)."""
    spec = sbx.spec()
    out = sbx.workdir / "nbout"
    fo = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        idle = prefork_for(spec)
        _readable(idle.sock.fileno())
        idle.complete_ready()
        pending = start_call(
            spec,
            f"{targets.__name__}:report",
            ["nb"],
            {"A": "b"},
            stdout_fd=fo,
            stderr_fd=fo,
            idle=idle,
        )
    finally:
        os.close(fo)
    _readable(pending.fileno())
    sb = pending.finish()
    sbx.live.append((sb, spec.uid))
    r = sbx.finish(sb, out, out)
    assert r.exit_code == 3, r.out
    info = json.loads(r.out)
    assert info["pid"] == 1 and info["argv"] == ["nb"] and info["env"] == {"A": "b"}
    assert info["status"]["Seccomp"] == "2" and info["status"]["CapEff"] == "0000000000000000"


def test_start_call_failures_name_the_step_and_leave_nothing(sbx: Runner) -> None:
    spec = sbx.spec()
    idle = prefork_for(spec)
    _readable(idle.sock.fileno())
    idle.complete_ready()
    pending = start_call(
        spec, "no_such_module_here:main", ["x"], {}, stdout_fd=2, stderr_fd=2, idle=idle
    )
    _readable(pending.fileno())
    with pytest.raises(SandboxError) as caught:
        pending.finish()
    assert caught.value.step == "resolve"
    assert pending.fileno() == -1  # everything released
    # A pre-forked child that dies before it is ready: complete_ready says so. Killed at once
    # it almost always is not ready yet; one that was (a busy machine can order it so) is
    # discarded and the next one tried, a bounded number of times.
    for _ in range(20):
        other = prefork_for(sbx.spec())
        os.kill(other.pid, signal.SIGKILL)
        _readable(other.sock.fileno())
        try:
            other.complete_ready()
        except OSError as exc:
            assert "exited during setup" in str(exc), exc
            break
        finally:
            other.discard()
    else:
        raise AssertionError("20 pre-forked children were all ready before SIGKILL reached them")
    with pytest.raises(SandboxSpecError):
        start_call(sbx.spec(), "no-colon", [], {}, stdout_fd=2, stderr_fd=2, idle=other)
