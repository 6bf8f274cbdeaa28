"""Validation of app and branch names.

Names become DNS labels in preview URLs (`<branch>--<app>.<domain>`), directory names on disk and
cgroup names, so they are held to the strictest of those: lowercase RFC 1123 labels. An app name may
not contain "--", which keeps `<branch>--<app>` unambiguous (we split at the last "--").
"""

from __future__ import annotations

import re

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
MAX_LABEL = 63


class InvalidName(ValueError):
    """An invalid app or branch name; the message says which rule it broke."""


def check_branch_name(name: object) -> str:
    """Return `name` if it is a valid branch name (a lowercase DNS label), else raise."""
    if not isinstance(name, str):
        raise InvalidName("must be a string")
    if not _LABEL.fullmatch(name):
        raise InvalidName(
            f"{name[:80]!r} is not a DNS label: use 1-63 characters a-z, 0-9 and '-', "
            "starting and ending with a letter or digit"
        )
    return name


def check_app_name(name: object) -> str:
    """Return `name` if it is a valid app name (a DNS label without "--"), else raise."""
    check_branch_name(name)
    assert isinstance(name, str)
    if "--" in name:
        raise InvalidName(f"{name!r} contains '--', which separates branch from app in host names")
    return name
