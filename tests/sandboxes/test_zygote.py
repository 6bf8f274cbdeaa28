"""spawn_call(): zygote mode, the confined child calls preloaded tenant code instead of execve."""

from __future__ import annotations

import json
import os

import pytest

from sandboxes import SandboxError, SandboxSpecError, spawn_call

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
