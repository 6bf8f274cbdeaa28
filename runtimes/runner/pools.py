"""The runner's warm pools: which exist, how their bounds are split, and how state is summed.

Why pools are per *sandbox layout* and not per language: a pre-forked child already sits in its
mount namespace, and that namespace depends only on which host directories are bound into it.
The built-in languages (python, bash, c, c++, javascript) all use host toolchains and no extra
binds, so they share one layout — one pool ("default") serves them all; a language whose
definition has `binds` gets a pool of its own (named after it). Asking for a language's pool
(`PUT /v1/pools/bash`) therefore sets the bounds of the pool that language is served from, and
every answer says which languages that pool serves.

Bounds are totals over the runner's spawner processes (an operator thinks "keep six sandboxes
warm", not "two per spawner"); each spawner gets an even share, the first ones the remainder.
Per-pool overrides set through the admin API are written to a small JSON file, so a restarted
runner service (or spawner) comes back with them instead of the config's values.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any

from runtimes.runner.languages import Language

DEFAULT_POOL = "default"
MAX_IDLE_LIMIT = 1000  # the largest bound the admin API accepts (as for the gateway's pools)


@dataclass(slots=True)
class PoolDef:
    """One pool of the runner: a sandbox layout, the languages it serves, its total bounds."""

    name: str
    binds: tuple[str, ...]
    languages: tuple[str, ...]
    min_idle: int
    max_idle: int

    def share(self, spawners: int, index: int) -> tuple[int, int]:
        """This spawner's part of (min_idle, max_idle)."""
        return split(self.min_idle, spawners, index), split(self.max_idle, spawners, index)

    def spawner_settings(self, spawners: int, index: int) -> dict[str, Any]:
        low, high = self.share(spawners, index)
        return {"name": self.name, "binds": list(self.binds), "min_idle": low, "max_idle": high}


def split(total: int, parts: int, index: int) -> int:
    """An even split of `total` over `parts`, the first `total % parts` getting one more."""
    base, extra = divmod(total, max(1, parts))
    return base + (1 if index < extra else 0)


def layouts(languages: list[Language], min_idle: int, max_idle: int) -> list[PoolDef]:
    """One pool per distinct set of binds, in the order the languages come."""
    by_binds: dict[tuple[str, ...], list[str]] = {}
    for lang in languages:
        by_binds.setdefault(tuple(lang.binds), []).append(lang.name)
    out: list[PoolDef] = []
    used: set[str] = set()
    for binds, names in by_binds.items():
        name = DEFAULT_POOL if not binds else sorted(names)[0]
        base, n = name, 1
        while name in used:
            n += 1
            name = f"{base}-{n}"
        used.add(name)
        out.append(PoolDef(name, binds, tuple(names), min_idle, max_idle))
    return out


def pool_for(defs: list[PoolDef], languages: list[Language], name: str) -> PoolDef | None:
    """The pool a language (by name or alias) is served from, or the pool of that name."""
    lowered = name.lower()
    for lang in languages:
        if lowered in lang.names():
            return next((d for d in defs if lang.name in d.languages), None)
    return next((d for d in defs if d.name == name), None)


def load_overrides(path: str) -> dict[str, tuple[int, int]]:
    """Bounds set through the admin API before this start (missing or bad file: none)."""
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    out: dict[str, tuple[int, int]] = {}
    if isinstance(data, dict):
        for name, bounds in data.items():
            with contextlib.suppress(KeyError, TypeError, ValueError):
                low, high = int(bounds["min_idle"]), int(bounds["max_idle"])
                if 0 <= low <= high <= MAX_IDLE_LIMIT:
                    out[str(name)] = (low, high)
    return out


def save_overrides(path: str, overrides: dict[str, tuple[int, int]]) -> None:
    """Write the overrides atomically (a crash mid-write must not lose the older ones)."""
    if not path:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    data = {k: {"min_idle": lo, "max_idle": hi} for k, (lo, hi) in overrides.items()}
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


SUMMED = ("idle", "target", "claimed", "misses", "built", "forking")


def aggregate(
    defs: list[PoolDef],
    answers: list[dict[str, Any] | None],
    shape: dict[str, Any],
) -> list[dict[str, Any]]:
    """Per pool: the spawners' counters summed, the total bounds, and each spawner's part.

    `answers[i]` is spawner i's `pools` event (None: it did not answer in time, or is down);
    `answered` says how many spawners the sums cover."""
    out = []
    for d in defs:
        entry: dict[str, Any] = {
            "runtime": "runner",
            "kind": "runner",
            "pool": d.name,
            "languages": list(d.languages),
            "shape": {**shape, "binds": list(d.binds)},
            "min_idle": d.min_idle,
            "max_idle": d.max_idle,
            **dict.fromkeys(SUMMED, 0),
            "peak_target": 0,
            "refill_rate": 0.0,
            "spawners": [],
            "answered": 0,
            "errors": [],
        }
        for index, answer in enumerate(answers):
            if answer is None:
                entry["spawners"].append({"spawner": index, "answered": False})
                continue
            state = next((p for p in answer.get("pools", []) if p.get("name") == d.name), None)
            if state is None:
                continue
            entry["answered"] += 1
            for key in SUMMED:
                entry[key] += int(state.get(key, 0))
            entry["peak_target"] += int(state.get("peak", 0))
            entry["refill_rate"] += float(state.get("refill_rate", 0.0))
            if state.get("error"):
                entry["errors"].append(f"spawner {index}: {state['error']}")
            entry["spawners"].append(
                {
                    "spawner": index,
                    "answered": True,
                    "refill_pending": bool(answer.get("refill_pending")),
                    "idle": state.get("idle", 0),
                    "target": state.get("target", 0),
                    "min_idle": state.get("min_idle", 0),
                    "max_idle": state.get("max_idle", 0),
                }
            )
        entry["refill_rate"] = round(entry["refill_rate"], 3)
        entry["peak_target"] = max(entry["peak_target"], entry["target"])
        out.append(entry)
    return out
