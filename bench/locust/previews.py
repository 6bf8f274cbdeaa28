"""Reviewers clicking through branch previews: many branches per app, bursts on a few.

Config: `apps`, `branches` (per app), `pages`, `burst_users`, `rounds`, `gap`, `start_at`,
`burst_targets` (one `[app, branch]` per round). `Reviewer`s pick an app, a Zipf-popular branch
(recent pull requests get the clicks) and click through a few pages with think time.
`BurstReviewer`s model a link posted in a chat: at round k, all of them open `burst_targets[k]`
at the same moment (a branch nobody has opened yet: cold) and click on. Requests are named by
kind and by whether they waited for a start (`cold`) or not (`warm`).
"""

from __future__ import annotations

import itertools
import random
import time

import gevent
from locust import FastHttpUser, between, constant, task
from locust.exception import StopUser

from bench.locust.lib import CONFIG, classify, record, user_finished, zipf_cum_weights

_BRANCHES: list[str] = CONFIG.get("branches", [])
_CUM = zipf_cum_weights(len(_BRANCHES), CONFIG.get("zipf_s", 1.0)) if _BRANCHES else []
_ids = itertools.count()


def _click(user: FastHttpUser, kind: str, app: str, branch: str, page: str) -> None:
    host = f"{branch}--{app}.localhost" if branch != "main" else f"{app}.localhost"
    sent = time.time()
    t0 = time.perf_counter()
    with user.client.get(page, headers={"Host": host}, name=kind, catch_response=True) as resp:
        ms = (time.perf_counter() - t0) * 1000
        ok = resp.status_code == 200
        if not ok:
            resp.failure(f"HTTP {resp.status_code}")
        state = classify(resp.content or b"", sent)
        record(f"{kind} {state}", ms, ok, f"{branch}--{app}")


class Reviewer(FastHttpUser):
    """Opens a preview, clicks through a few pages with think time, moves on."""

    wait_time = between(0.2, 1.0)
    network_timeout = 60.0
    connection_timeout = 60.0
    weight = 1

    @task
    def review(self) -> None:
        app = random.choice(CONFIG["apps"])
        branch = random.choices(_BRANCHES, cum_weights=_CUM)[0]
        for page in random.sample(CONFIG["pages"], k=min(3, len(CONFIG["pages"]))):
            _click(self, "review", app, branch, page)
            gevent.sleep(random.uniform(0.1, 0.5))


class BurstReviewer(FastHttpUser):
    """Everyone opens the same fresh preview at once, then clicks through it."""

    wait_time = constant(0)
    network_timeout = 60.0
    connection_timeout = 60.0
    fixed_count = CONFIG.get("burst_users", 0)

    def on_start(self) -> None:
        self.idx = next(_ids)

    @task
    def rounds(self) -> None:
        for k in range(CONFIG["rounds"]):
            at = CONFIG["start_at"] + k * CONFIG["gap"]
            gevent.sleep(max(0.0, at - time.time()))
            app, branch = CONFIG["burst_targets"][k]
            for page in CONFIG["pages"][:3]:
                _click(self, "burst", app, branch, page)
        user_finished(self.environment, CONFIG["burst_users"])
        raise StopUser
