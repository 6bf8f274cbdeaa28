"""Which isolation the gateway picks, and that it says why when it is not a sandbox."""

from __future__ import annotations

import os

import orjson
import pytest

from gateway.config import ConfigError
from gateway.instances import resolve_isolation
from sandboxes import detect_isolation


def test_process_is_taken_at_its_word() -> None:
    assert resolve_isolation("process") == ("process", ['isolation = "process" in the config'])


@pytest.mark.skipif(detect_isolation() != "sandbox", reason=f"host: {detect_isolation()}")
def test_auto_as_root_is_sandbox() -> None:
    assert resolve_isolation("auto")[0] == "sandbox"
    assert resolve_isolation("sandbox")[0] == "sandbox"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")
def test_without_root_auto_is_rootless_sandbox_or_process_and_says_why() -> None:
    """Without root, "auto" gives sandboxes through user namespaces where the kernel allows
    them (the reasons list what is missing), else unconfined processes, with the reasons."""
    import sandboxes.doctor  # imported while still root

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setegid(65534)
            os.seteuid(65534)
            level, reasons = resolve_isolation("auto")
            detected = sandboxes.doctor.explain_isolation()[0]
            try:
                resolve_isolation("sandbox")
                refused = ""
            except ConfigError as exc:
                refused = str(exc)
            found = {"level": level, "reasons": reasons, "refused": refused, "detected": detected}
            os.write(w, orjson.dumps(found))
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    result = orjson.loads(data)
    assert any("not root" in reason for reason in result["reasons"]), result
    if result["detected"] == "rootless":
        assert result["level"] == "sandbox" and result["refused"] == "", result
        assert any("no cgroup limits" in reason for reason in result["reasons"]), result
    else:
        assert result["level"] == "process", result
        assert result["refused"].startswith("isolation: sandbox is not available here")
