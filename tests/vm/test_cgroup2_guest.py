"""The cgroup v2 code path, tested for real: pytest inside a pure cgroup v2 guest.

Why a guest: this host and CI bind memory/pids/cpu to cgroup v1, so the v2 limit tests in
tests/sandboxes skip here. tests/vm/guest.py boots Debian's kernel with ``cgroup_no_v1=all`` on
the host's root (read-only 9p + tmpfs overlay, no network) and runs them there with this repo's
venv; this test asserts that the inner run passed and that the v2 tests really ran (not skipped).
The packages come from tests/vm/install-packages.sh (run by ``make test``); without them, or off
x86_64 Linux, this skips saying exactly what is missing.
"""

from __future__ import annotations

import os
import re

import pytest

from . import guest

VM_TIMEOUT = 240.0


@pytest.mark.timeout(VM_TIMEOUT + 60)
def test_cgroup_v2_tests_pass_in_a_pure_v2_guest() -> None:
    reason = guest.unavailable_reason()
    if reason is not None:
        pytest.skip(f"cgroup v2 guest cannot run: {reason}")
    if os.geteuid() != 0:
        pytest.skip(f"the sandbox tests inside the guest need root (euid={os.geteuid()})")
    result = guest.run(timeout=VM_TIMEOUT)
    shown = (
        f"guest ({result.accel}) ran {result.seconds:.1f} s, inner pytest status {result.rc}"
        f"{' (killed at the time limit)' if result.timed_out else ''}\n"
        f"--- inner pytest output ---\n{result.output}\n"
        f"--- guest console (tail) ---\n{result.console[-4000:]}"
    )
    assert result.rc == 0, shown
    summary = re.search(r"(\d+) passed", result.output)
    assert summary is not None and int(summary.group(1)) >= 10, shown
    assert "cgroup v2 controllers unavailable" not in result.output, shown
    print(shown)
