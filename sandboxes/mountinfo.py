"""/proc/self/mountinfo, parsed once for everyone who needs it (cgroups, dynmods, idmap).

Why one parser: mountinfo escapes space, tab, newline and backslash in paths as ``\\ooo``, and it
also lists mounts that a later mount covers (a tmpfs mounted over /sys/fs/cgroup keeps every
hierarchy under it in the list). A mount point whose path now leads elsewhere is useless to
anyone acting by path, so `reachable` leaves such mounts out, by comparing the device its path
leads to with the mount's own.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class Mount:
    fstype: str
    mountpoint: str
    mount_options: frozenset[str]  # this mount's own flags (ro, nosuid, relatime...)
    super_options: frozenset[str]  # the filesystem's (for cgroups: controllers, favordynmods...)


def unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def reachable(
    fstypes: Iterable[str] | None = None, path: str = "/proc/self/mountinfo"
) -> list[Mount]:
    """The mounts of `fstypes` (None: all) that their mount point leads to now."""
    wanted = None if fstypes is None else frozenset(fstypes)
    found: list[Mount] = []
    with open(path) as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) < 6 or len(rfields) < 3:
                continue
            if wanted is not None and rfields[0] not in wanted:
                continue
            mountpoint = unescape(fields[4])
            major, _, minor = fields[2].partition(":")
            try:
                if os.stat(mountpoint).st_dev != os.makedev(int(major), int(minor)):
                    continue  # covered by a later mount
            except (OSError, ValueError):
                continue
            found.append(
                Mount(
                    rfields[0],
                    mountpoint,
                    frozenset(fields[5].split(",")),
                    frozenset(rfields[2].split(",")),
                )
            )
    return found
