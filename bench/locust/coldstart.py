"""Cold starts under Locust: every user hits a different cold tenant, in synchronized rounds.

`DormColdUser` asks dorm (Host `<app>.localhost`); `FreshProcessUser` is the baseline a plain
process-per-tenant gateway gives: spawn `python -m bench.locust.tiny_server PORT` for the tenant,
poll until it listens, send the request. Both follow the same pattern from the config: `rounds`
rounds, round k starting at `start_at + k * gap` (wall clock), user i requesting `apps[k][i]`.
One user is "sequential" (gap only as a floor between requests); N users are "bursts of N".
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import subprocess
import sys
import time
from typing import Any

import gevent
from locust import FastHttpUser, User, constant, events, task
from locust.exception import StopUser

from bench.locust.lib import CONFIG, classify, record, user_finished

_ids = itertools.count()
_children: list[subprocess.Popen[bytes]] = []


def _wait_round(k: int) -> None:
    at = CONFIG["start_at"] + k * CONFIG["gap"]
    gevent.sleep(max(0.0, at - time.time()))


class DormColdUser(FastHttpUser):
    """One tenant per round through dorm; the first request to a cold app wakes it."""

    wait_time = constant(0)
    network_timeout = 60.0
    connection_timeout = 60.0

    def on_start(self) -> None:
        self.idx = next(_ids)

    @task
    def rounds(self) -> None:
        for k in range(CONFIG["rounds"]):
            _wait_round(k)
            app = CONFIG["apps"][k][self.idx]
            sent = time.time()
            t0 = time.perf_counter()
            with self.client.get(
                "/", headers={"Host": f"{app}.localhost"}, name=CONFIG["phase"], catch_response=True
            ) as resp:
                ms = (time.perf_counter() - t0) * 1000
                ok = resp.status_code == 200
                if not ok:
                    resp.failure(f"HTTP {resp.status_code}")
                record(CONFIG["phase"], ms, ok, app, classify(resp.content or b"", sent))
        user_finished(self.environment, CONFIG["users"])
        raise StopUser


class FreshProcessUser(User):
    """The baseline: a new interpreter per tenant, timed from spawn to the whole response."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.idx = next(_ids)

    @task
    def rounds(self) -> None:
        for k in range(CONFIG["rounds"]):
            _wait_round(k)
            app = CONFIG["apps"][k][self.idx]
            self._one(app)
        user_finished(self.environment, CONFIG["users"])
        raise StopUser

    def _one(self, app: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t0 = time.perf_counter()
        exc: Exception | None = None
        body = b""
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.locust.tiny_server", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            _children.append(proc)
            deadline = time.monotonic() + 60
            while True:
                try:
                    conn = socket.create_connection(("127.0.0.1", port), timeout=60)
                    break
                except ConnectionRefusedError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise
                    gevent.sleep(0.001)
            with conn:
                conn.sendall(b"GET / HTTP/1.1\r\nHost: %s.localhost\r\n\r\n" % app.encode())
                buf = b""
                while b"\r\n\r\n" not in buf or not buf.split(b"\r\n\r\n", 1)[1].count(b" ") >= 2:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                body = buf.split(b"\r\n\r\n", 1)[-1]
                if not buf.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"bad response {buf[:60]!r}")
        except Exception as e:
            exc = e
        ms = (time.perf_counter() - t0) * 1000
        events.request.fire(
            request_type="SPAWN",
            name=CONFIG["phase"],
            response_time=ms,
            response_length=len(body),
            exception=exc,
            context={},
        )
        record(CONFIG["phase"], ms, exc is None, app, "cold")


@events.quitting.add_listener
def _reap(**_kw: Any) -> None:
    """Baseline tenants live until the run ends (dorm's stay warm too), then go."""
    for proc in _children:
        with contextlib.suppress(OSError):
            proc.kill()
    for proc in _children:
        with contextlib.suppress(Exception):
            proc.wait(5)
