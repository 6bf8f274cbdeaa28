"""Reactive warm-pool sizing, shared by the gateway's fork server and the code runner's spawners.

As OpenWhisk does it: a pool aims for `target` idle members, `min_idle` at rest; each miss (a
spawn that found no idle member) raises the target by one up to `max_idle`, since a burst that
outran the pool will probably come again; `shrink_after` seconds without a miss set it back. The
owners differ in what a member is (a serving member, a half-confined child) and where bounds come
from (per-runtime overrides, per-layout settings); the accounting is this one class.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

RATE_WINDOW = 60.0  # seconds of builds the reported refill rate is averaged over


@dataclass(kw_only=True)
class PoolSizing:
    """A pool's target and counters (a base of each owner's pool record)."""

    target: int
    claimed: int = 0  # spawns that got an idle member
    misses: int = 0  # spawns that found none
    built: int = 0
    peak: int = 0  # the highest target so far: how far bursts have grown this pool
    build_times: deque[float] = field(default_factory=deque)
    last_miss: float = 0.0

    def count_spawn(self, *, hit: bool, max_idle: int, now: float) -> None:
        """Account a spawn: a claim, or a miss that grows the target."""
        if hit:
            self.claimed += 1
            return
        self.misses += 1
        if self.built:
            # Only a pool that had members can be outrun by demand: a miss before the first
            # build (a new pool, or right after start) says nothing about bursts.
            self.last_miss = now
            self.target = min(max_idle, self.target + 1)
            self.peak = max(self.peak, self.target)

    def count_built(self, count: int, now: float) -> None:
        self.built += count
        self.build_times.extend([now] * count)

    def age(self, now: float, min_idle: int, shrink_after: float) -> bool:
        """Drop builds older than the rate window; True when a grown pool has been quiet for
        `shrink_after` (its target is then back at `min_idle`: the caller dismisses extras)."""
        while self.build_times and now - self.build_times[0] > RATE_WINDOW:
            self.build_times.popleft()
        if self.target > min_idle and now - self.last_miss >= shrink_after:
            self.target = min_idle
            return True
        return False

    @property
    def refill_rate(self) -> float:
        """Members built per second over the last `RATE_WINDOW`."""
        return round(len(self.build_times) / RATE_WINDOW, 3)
