"""Callables run by spawn_call() in zygote-mode tests. Imported by the test module, i.e. by the
"fork server" (the pytest process) before it forks, exactly as a runtime zygote would preload."""

from __future__ import annotations

import json
import os
import sys


def report() -> int:
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp"):
                status[key] = value.strip()
    print(
        json.dumps(
            {
                "pid": os.getpid(),
                "uid": os.getresuid(),
                "env": dict(os.environ),
                "argv": sys.argv,
                "fds": sorted(int(f) for f in os.listdir("/proc/self/fd")),
                "status": status,
                "cwd": os.getcwd(),
            }
        )
    )
    return 3


def exit_with_message() -> None:
    sys.exit("tenant said goodbye")


def crash() -> None:
    raise RuntimeError("tenant bug")
