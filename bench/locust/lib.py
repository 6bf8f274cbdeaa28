"""What every dorm locustfile shares: its config, a raw-sample recorder and the cold/warm test.

Imported by the locustfiles inside the locust process (gevent-patched), so it uses nothing but the
standard library and locust itself.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import gevent
from locust import events

CONFIG: dict[str, Any] = {}
if os.environ.get("DORM_LOCUST_CONFIG"):
    with open(os.environ["DORM_LOCUST_CONFIG"]) as _f:
        CONFIG = json.load(_f)

_lock = threading.Lock()
_out = open(CONFIG["samples"], "a", buffering=1) if CONFIG.get("samples") else None  # noqa: SIM115


def record(name: str, latency_ms: float, ok: bool, app: str, extra: str = "") -> None:
    """One raw sample: wall time at the end, request name, latency, success, tenant."""
    if _out is None:
        return
    with _lock:
        _out.write(
            json.dumps(
                {"t": time.time(), "name": name, "ms": latency_ms, "ok": ok, "app": app, "x": extra}
            )
            + "\n"
        )


def classify(body: bytes, sent_wall: float) -> str:
    """ "cold" if the tenant's module was imported after the request was sent (it waited for a
    start), else "warm". The hello app returns `hello <imported> <served>` as wall-clock times;
    there is no time namespace in a sandbox, so they compare with ours."""
    parts = body.split()
    if len(parts) == 3 and parts[0] == b"hello":
        try:
            return "cold" if float(parts[1]) >= sent_wall - 0.001 else "warm"
        except ValueError:
            pass
    return "unknown"


def zipf_cum_weights(n: int, s: float) -> list[float]:
    """Cumulative Zipf weights (rank k has weight 1/k^s) for random.choices."""
    out: list[float] = []
    total = 0.0
    for k in range(1, n + 1):
        total += 1.0 / k**s
        out.append(total)
    return out


_finished = 0


def user_finished(environment: Any, users: int) -> None:
    """Quit the run when the last scripted user is done, instead of idling until --run-time."""
    global _finished
    _finished += 1
    if _finished >= users and environment.runner is not None:
        # Not at once: Locust writes its CSV once a second, and quitting right away loses the
        # last second's requests from *_stats.csv.
        gevent.spawn_later(2.5, environment.runner.quit)


@events.quitting.add_listener
def _close(**_kw: Any) -> None:
    if _out is not None:
        _out.flush()
