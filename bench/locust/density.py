"""Steady load over many tenants with Zipf popularity: a few hot apps, a long tail of cold ones.

Config: `apps` (names, most popular first), `zipf_s`. Each request picks an app by Zipf rank and
is named `density cold` if the tenant's module was imported after the request was sent (it waited
for a start: first request or the app had been evicted after its short idle timeout), else
`density warm`. No think time: the users push as hard as one locust process can.
"""

from __future__ import annotations

import random
import time

from locust import FastHttpUser, constant, task

from bench.locust.lib import CONFIG, classify, record, zipf_cum_weights

_APPS: list[str] = CONFIG.get("apps", [])
_CUM = zipf_cum_weights(len(_APPS), CONFIG.get("zipf_s", 1.0)) if _APPS else []


class DensityUser(FastHttpUser):
    """One client of many tenants: every request goes to a Zipf-chosen app."""

    wait_time = constant(0)
    network_timeout = 60.0
    connection_timeout = 60.0

    @task
    def hit(self) -> None:
        app = random.choices(_APPS, cum_weights=_CUM)[0]
        sent = time.time()
        t0 = time.perf_counter()
        with self.client.get(
            "/", headers={"Host": f"{app}.localhost"}, name="density", catch_response=True
        ) as resp:
            ms = (time.perf_counter() - t0) * 1000
            ok = resp.status_code == 200
            if not ok:
                resp.failure(f"HTTP {resp.status_code}")
            kind = classify(resp.content or b"", sent)
            if kind == "cold" or not ok or CONFIG.get("record_all"):
                record(f"density {kind}", ms, ok, app)
