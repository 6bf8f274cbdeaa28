"""Host → (app, branch) routing.

Three host forms under each configured domain suffix:
  <app>.<domain>             → branch "main"
  <branch>--<app>.<domain>   → one DNS label, so one wildcard certificate covers every preview
  <branch>.<app>.<domain>
Parsing is a few string splits, never a regex; the result is cached per Host value, so a warm host
costs one dict lookup. The cache is bounded and dropped whenever apps or branches change.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.names import InvalidName, check_app_name, check_branch_name
from gateway.registry import DEFAULT_BRANCH

MAX_CACHE = 65_536


@dataclass(frozen=True, slots=True)
class Route:
    app: str
    branch: str


def parse_host(host: str, suffixes: tuple[str, ...]) -> Route | None:
    """The (app, branch) a Host header names, or None when it names none of ours.

    `suffixes` are ".domain" strings, longest first, so "a.b.example.com" matches "b.example.com"
    before "example.com".
    """
    host = host.strip().lower()
    if host.startswith("["):  # an IPv6 literal is never an app
        return None
    name, _, port = host.partition(":")
    if port and not port.isdigit():
        return None
    name = name.rstrip(".")
    for suffix in suffixes:
        if not name.endswith(suffix):
            continue
        labels = name[: -len(suffix)].split(".")
        if len(labels) == 1:
            branch, sep, app = labels[0].rpartition("--")
            if not sep:
                branch = DEFAULT_BRANCH
        elif len(labels) == 2:
            branch, app = labels
        else:
            return None
        try:
            check_app_name(app)
            check_branch_name(branch)
        except InvalidName:
            return None
        return Route(app, branch)
    return None


class HostCache:
    """A bounded dict from raw Host header bytes to a routing result of any type."""

    __slots__ = ("_limit", "entries")

    def __init__(self, limit: int = MAX_CACHE) -> None:
        self.entries: dict[bytes, object] = {}  # the data plane reads this dict directly
        self._limit = limit

    def put(self, host: bytes, value: object) -> None:
        if len(self.entries) >= self._limit:
            # Random hosts from a scanner must not grow memory without bound; dropping
            # everything is simpler than LRU bookkeeping on the hot path and refills in µs.
            # (Cleared in place: the data plane holds a reference to this very dict.)
            self.entries.clear()
        self.entries[host] = value

    def clear(self) -> None:
        self.entries.clear()
