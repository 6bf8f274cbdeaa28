"""host_report / detect_isolation, and rootless mode run for real by a process that dropped root."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from sandboxes import (
    SandboxError,
    SandboxSpec,
    detect_isolation,
    doctor,
    host_report,
    seccomp,
    spawn,
)
from sandboxes import cgroups as cg

from .conftest import ENV

NOBODY = 65534


def test_host_report_facts() -> None:
    report = host_report()
    json.dumps(report)  # plain data, printable by `dorm doctor`
    assert report["root"] is True
    assert report["cgroup"]["version"] in (1, 2)
    assert set(report["cgroup"]["controllers"]) >= {"memory", "pids", "cpu"}
    assert report["seccomp"]["libseccomp"] == seccomp.library().version
    assert report["seccomp"]["filter_instructions"] > 0
    assert isinstance(report["overlayfs"], bool)
    assert report["pidfd"] is True
    assert report["user_namespaces"]["available"] in (True, False)
    assert report["isolation"] == "sandbox"


def test_detect_isolation_as_root_is_sandbox() -> None:
    level, reasons = doctor.explain_isolation()
    assert detect_isolation() == level == "sandbox"
    backend, reason, _ = cg.probe()
    assert backend is not None and reason in reasons[0]


def _as_nobody(fn_result_path: Path, socket_dir: str) -> None:
    """In a forked child: drop root for good, then report isolation and run a rootless sandbox."""
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)
    out: dict[str, object] = {"isolation": doctor.explain_isolation()}
    if out["isolation"][0] == "rootless":  # type: ignore[index]
        r, w = os.pipe()
        spec = SandboxSpec(name="rootless", uid=200123, socket_dir=socket_dir)
        code = (
            "id -u; grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; "
            "echo $$; (echo x > /usr/dorm-x) 2>/dev/null || echo ro"
        )
        try:
            sb = spawn(spec, ["/bin/sh", "-c", code], ENV, stdout_fd=w, stderr_fd=w)
            os.close(w)
            status = sb.wait(10)
            sb.cleanup()
            out["status"] = status
            out["output"] = os.read(r, 4096).decode()
        except SandboxError as e:
            out["error"] = f"{e.step}: {e}"
    fn_result_path.write_text(json.dumps(out))


def test_rootless_mode_confines_without_root() -> None:
    # pytest's tmp_path lives under a 0700 root-owned dir the unprivileged child cannot traverse
    tmp_path = Path(tempfile.mkdtemp(prefix="dorm-rootless-"))
    try:
        _rootless(tmp_path)
    finally:
        shutil.rmtree(tmp_path)


def _rootless(tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    result = tmp_path / "result.json"
    sock = tmp_path / "sock"
    sock.mkdir()
    os.chown(sock, NOBODY, NOBODY)
    seccomp.compiled_filter()  # warm everything the unprivileged child needs before it drops root
    pid = os.fork()
    if pid == 0:
        try:
            _as_nobody(result, str(sock))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    out = json.loads(result.read_text())
    level, reasons = out["isolation"]
    assert any("not root" in r for r in reasons)
    if level != "rootless":
        assert level == "process"
        assert len(reasons) > 1  # says why user namespaces are unusable here
        return
    assert any("no cgroup limits" in r for r in reasons)  # says plainly what is missing
    assert "error" not in out, out.get("error")
    assert os.waitstatus_to_exitcode(out["status"]) == 0
    lines = out["output"].split()
    assert lines[0] == str(NOBODY)  # the only mapped uid: the caller's own
    fields = dict(zip(lines[1:9:2], lines[2:9:2], strict=True))
    assert fields == {
        "CapEff:": "0000000000000000",
        "CapBnd:": "0000000000000000",
        "NoNewPrivs:": "1",
        "Seccomp:": "2",
    }
    assert lines[9] == "1"  # the shell is pid 1 of its own pid namespace
    assert lines[10] == "ro"


def test_rootless_reports_missing_protections() -> None:
    missing = doctor.missing_protections()
    assert any("cgroup" in m for m in missing)
    assert any("uid" in m for m in missing)
