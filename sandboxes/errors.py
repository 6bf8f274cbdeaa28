"""Errors raised by the sandboxes package.

``SandboxError`` carries the confinement *step* and the errno observed in the child (or in the
parent while preparing), because "mounts: EPERM" tells an operator what to fix while a bare exit
status of 127 does not.
"""

from __future__ import annotations

import errno as _errno


class SandboxError(RuntimeError):
    """A confinement step failed: ``step`` names it, ``errno`` is the OS error (0 if none)."""

    def __init__(self, step: str, err: int, message: str) -> None:
        name = _errno.errorcode.get(err, str(err)) if err else "no errno"
        super().__init__(f"sandbox step {step!r} failed ({name}): {message}")
        self.step = step
        self.errno = err
        self.message = message


class CgroupUnavailable(RuntimeError):
    """No usable cgroup hierarchy; ``reason`` says what was detected."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
