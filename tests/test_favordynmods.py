"""favordynmods: dorm turns on fast cgroup joins at start, and says so (see sandboxes/dynmods.py).

Turning it on is host-wide and, on Linux 6.18+, lasts until reboot; a sandboxing gateway does it
by default, so these tests do only what any sandboxed test gateway already does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from sandboxes import detect_isolation, dynmods
from tests.conftest import ROOT

LEVEL = detect_isolation()
pytestmark = pytest.mark.skipif(
    LEVEL != "sandbox", reason=f"remounting a cgroup hierarchy needs root; this host: {LEVEL}"
)


def mountinfo_options(mountpoint: str) -> set[str]:
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            if left.split()[4] == mountpoint:
                return set(right.split()[2].split(","))
    raise AssertionError(f"{mountpoint} is not mounted")


def test_enable_is_idempotent_and_visible_in_mountinfo() -> None:
    first = dynmods.enable()
    where = dynmods.active()
    assert where is not None, first
    assert "favordynmods" in mountinfo_options(where)
    assert dynmods.enable() == f"already on ({where})"


def test_gateway_turns_it_on_and_doctor_reports_it(gateway_factory: Any) -> None:
    gw = gateway_factory('isolation = "auto"')
    assert "cgroup favordynmods" in gw.log() and "skip an RCU wait" in gw.log(), gw.log()
    report = subprocess.run(
        [sys.executable, "-m", "gateway", "doctor", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={**os.environ},
    )
    assert json.loads(report.stdout)["favordynmods"] == dynmods.active()
