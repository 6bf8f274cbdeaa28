"""Per-stage timing of cold starts, kept per instance and summarized per start path.

Why: "cold start" is one number to a user but five to whoever has to make it smaller: the request
waiting for the start to begin, the fork server claiming (or forking) a child, confining it, the
app importing and binding its socket, and the first response. Each start records all five; the
last start of an instance is shown with it, and the recent starts of each path (pool, zygote,
fresh) are summarized so a regression in one stage shows up without a profiler.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.admin import ApiError, Request, Response, Route, json_response
from gateway.appspec import RUNTIMES
from gateway.launcher import LaunchError
from gateway.runner import RunnerHook, RunnerUnavailable, hook_for

if TYPE_CHECKING:
    from gateway.instances import InstanceManager

STAGES = ("queue", "claim", "confine", "app", "app_import", "first_byte")
PATHS = ("pool", "zygote", "fresh")
KEEP = 1000  # recent starts kept per path for the summary


@dataclass(slots=True)
class StartStages:
    """One cold start, in milliseconds per stage (None: the stage did not happen, or not yet)."""

    path: str  # "pool" | "zygote" | "fresh"
    queue: float | None = None  # first request queued → the start began
    spawn: float | None = None  # launch request sent → the fork server answered "spawned"
    claim: float | None = None  # (fork server) taking an idle child, or forking one
    confine: float | None = None  # (fork server) confinement steps until the tenant code runs
    app: float | None = None  # "spawned" → the instance's socket accepted
    app_import: float | None = None  # (pool) the member importing the app and its lifespan
    first_byte: float | None = None  # ready → the first response head relayed
    total: float | None = None  # first request queued → ready
    fallback: str | None = None  # why a faster path was not taken (or failed), if so

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "queue_ms": _round(self.queue),
            "spawn_ms": _round(self.spawn),
            "claim_ms": _round(self.claim),
            "confine_ms": _round(self.confine),
            "app_ms": _round(self.app),
            "import_ms": _round(self.app_import),
            "first_byte_ms": _round(self.first_byte),
            "total_ms": _round(self.total),
            "fallback": self.fallback,
        }

    def describe(self) -> str:
        """The log line's breakdown: "pool: claim 0.1 ms, confine 1.2 ms, app 6.0 ms"."""
        parts = [
            f"{name} {value:.1f} ms"
            for name, value in (
                ("claim", self.claim),
                ("confine", self.confine),
                ("app", self.app),
                ("import", self.app_import),
            )
            if value is not None
        ]
        why = f" (fallback: {self.fallback})" if self.fallback else ""
        return f"{self.path}: {', '.join(parts)}{why}"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of a non-empty list (no interpolation: a value that happened)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class ColdStartStats:
    """The last `KEEP` starts per path; summarized on demand (stats reads are rare)."""

    def __init__(self) -> None:
        self.recent: dict[str, deque[StartStages]] = {p: deque(maxlen=KEEP) for p in PATHS}
        self.counts: dict[str, int] = dict.fromkeys(PATHS, 0)
        self.fallbacks: dict[str, int] = dict.fromkeys(PATHS, 0)  # starts a faster path failed

    def record(self, stages: StartStages) -> None:
        """Add a start; its first_byte may still be filled in later (same object)."""
        self.recent.setdefault(stages.path, deque(maxlen=KEEP)).append(stages)
        self.counts[stages.path] = self.counts.get(stages.path, 0) + 1
        if stages.fallback is not None:
            self.fallbacks[stages.path] = self.fallbacks.get(stages.path, 0) + 1

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for path, starts in self.recent.items():
            stages: dict[str, Any] = {}
            for stage in (*STAGES, "spawn", "total"):
                values = [v for s in starts if (v := getattr(s, stage)) is not None]
                if values:
                    stages[stage] = {
                        "n": len(values),
                        "p50_ms": round(percentile(values, 50), 3),
                        "p99_ms": round(percentile(values, 99), 3),
                    }
            out[path] = {
                "count": self.counts.get(path, 0),
                "fallbacks": self.fallbacks.get(path, 0),
                "stages": stages,
            }
        return out


class ColdStartApi:
    """Admin endpoints for start timing and warm pools (mounted as extra routes).

    GET /v1/instances/{app}/{branch}   one instance, with its last start stage by stage
    GET /v1/stats                      cold starts summarized per path (count, p50, p99 per stage)
    GET /v1/pools                      warm pools per sandbox shape: idle, claimed, misses...
                                       (the fork server's, then the code runner's)
    PUT /v1/pools/{runtime}            {"min_idle": n, "max_idle": m} for that runtime's pools,
                                       or for the runner pool serving that language

    The code runner's pools live in its spawner processes, not the fork server: they are asked
    for through the runner's hook (gateway/runner.py), each entry marked `"kind": "runner"`,
    with the languages it serves. App runtime names win over language names on PUT.
    """

    def __init__(self, manager: InstanceManager, runner: RunnerHook | None = None) -> None:
        self.manager = manager
        self._runner = runner

    @property
    def runner(self) -> RunnerHook | None:
        """The enabled code runner, if any (found through the manager when not given)."""
        return self._runner if self._runner is not None else hook_for(self.manager)

    def routes(self) -> list[Route]:
        return [
            Route("GET", "/v1/instances/{app}/{branch}", self.get_instance),
            Route("GET", "/v1/stats", self.stats),
            Route("GET", "/v1/pools", self.list_pools),
            Route("PUT", "/v1/pools/{runtime}", self.put_pool),
        ]

    async def get_instance(self, req: Request) -> Response:
        app, branch = req.params["app"], req.params["branch"]
        found = next(
            (i for i in self.manager.snapshot() if i["app"] == app and i["branch"] == branch),
            None,
        )
        if found is None:
            raise ApiError(404, "branch", f"no instance for {app}/{branch}")
        return json_response(200, found)

    async def stats(self, req: Request) -> Response:
        return json_response(
            200,
            {"cold_starts": self.manager.coldstarts.summary(), "paths": list(PATHS)},
        )

    async def list_pools(self, req: Request) -> Response:
        manager = self.manager
        try:
            state = await manager.launcher.pools()
        except LaunchError as exc:
            raise ApiError(503, None, f"pool state unavailable: {exc}") from None
        body: dict[str, Any] = {
            "enabled": manager.isolation == "sandbox" and manager.pool.max_idle > 0,
            "isolation": manager.isolation,
            "pools": [{"kind": "runtime", **p} for p in state.get("pools", [])],
            "config": state.get("config", {}),
        }
        runner = self.runner
        if runner is not None:
            try:
                found = await runner.pool_state()
            except RunnerUnavailable as exc:
                raise ApiError(503, None, f"pool state unavailable: {exc}") from None
            body["pools"] += found["pools"]
            body["runner"] = {"state": found["state"], "config": found["config"]}
        return json_response(200, body)

    async def put_pool(self, req: Request) -> Response:
        runtime = req.params["runtime"]
        known = runtime in RUNTIMES and runtime != "static"
        is_runtime = known or self.manager.runtime_defs(runtime) is not None
        runner = self.runner
        if not is_runtime and runner is None:
            raise ApiError(404, "runtime", f"no runtime named {runtime!r} that runs processes")
        bounds = _bounds(req.json())
        if not is_runtime:
            assert runner is not None
            return await self._put_runner_pool(runner, runtime, bounds)
        await self.manager.set_pool_bounds(runtime, bounds["min_idle"], bounds["max_idle"])
        return json_response(200, {"runtime": runtime, **bounds})

    async def _put_runner_pool(
        self, runner: RunnerHook, name: str, bounds: dict[str, int]
    ) -> Response:
        try:
            status, answer = await runner.configure_pool(
                name, bounds["min_idle"], bounds["max_idle"]
            )
        except RunnerUnavailable as exc:
            raise ApiError(503, None, str(exc)) from None
        if status == 404:
            raise ApiError(
                404, "runtime", f"no runtime or code-runner language named {name!r}"
            ) from None
        if status != 200:
            message = answer.get("message") if isinstance(answer, dict) else None
            raise ApiError(502 if status >= 500 else 400, None, f"the code runner: {message}")
        return json_response(200, answer)


def _bounds(body: Any) -> dict[str, int]:
    """{"min_idle": n, "max_idle": m}, validated; a 400 names the field at fault."""
    if not isinstance(body, dict):
        raise ApiError(400, None, "expected a JSON object")
    unknown = sorted(set(body) - {"min_idle", "max_idle"})
    if unknown:
        raise ApiError(400, unknown[0], f"unknown key {unknown[0]!r}")
    bounds: dict[str, int] = {}
    for key in ("min_idle", "max_idle"):
        value = body.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1000:
            raise ApiError(400, key, f"{key}: expected a whole number from 0 to 1000")
        bounds[key] = value
    if bounds["max_idle"] < bounds["min_idle"]:
        raise ApiError(400, "max_idle", "max_idle must be >= min_idle")
    return bounds
