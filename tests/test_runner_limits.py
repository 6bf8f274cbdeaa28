"""The runner's abuse controls through the real gateway: API keys, 429 (rate and per-client
concurrency, with Retry-After), 503 when the global queue is full, and admin-forwarded requests
needing no API key."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway, make_gateway
from tests.test_runner import RUNNER_HOST, execute, start_runner_gateway, stop_gateway

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the runner needs root: it confines every execution in a sandbox"
)

KEY = "k-" + os.urandom(8).hex()
HELLO = {"language": "bash", "version": "*", "files": [{"content": "echo hi"}]}
SLOW = {"language": "bash", "version": "*", "files": [{"content": "sleep 1.5; echo slow"}]}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """API keys (one inline, one from a key file), 3 executions a minute, 1 at a time per client."""
    tmp = tmp_path_factory.mktemp("keyed")
    key_file = tmp / "keys.txt"
    key_file.write_text("# runner keys\nfile-key\n")
    config = f"""
[runner]
api_keys = ["{KEY}"]
api_key_file = "{key_file}"
rate_per_minute = 4
max_per_client = 1
"""
    gw = make_keyed(tmp, config)
    yield gw
    stop_gateway(gw)


def make_keyed(tmp: Path, config: str) -> Gateway:
    """Like start_runner_gateway, without the wake-up request (it would need a key)."""
    gw = make_gateway(tmp, 'isolation = "auto"')
    gw.data_dir.parent.mkdir(parents=True, exist_ok=True)
    gw.config_path.write_text(gw.config_path.read_text() + config)
    gw.start()
    return gw


def admin_execute(gw: Gateway, body: dict[str, Any]) -> tuple[int, Any]:
    return gw.admin("POST", "/api/v2/execute", body)


def test_api_keys_rate_and_per_client_concurrency(keyed: Gateway) -> None:
    status, answer, _ = execute(keyed, HELLO)
    assert (status, answer) == (
        401,
        {"message": "a valid API key is required in the Authorization header"},
    )
    status, answer, _ = execute(keyed, HELLO, headers={"Authorization": "wrong"})
    assert status == 401
    # The admin listener's own token is enough there (the runner sees its internal token).
    status, answer = admin_execute(keyed, HELLO)
    assert status == 200 and answer["run"]["stdout"] == "hi\n", answer
    # Keys: bare, "Bearer", and from the key file. Rate: 4 a minute, so the 4th key use is 429.
    for auth in (KEY, f"Bearer {KEY}", "file-key"):
        status, answer, _ = execute(keyed, HELLO, headers={"Authorization": auth})
        assert status == 200 and answer["run"]["stdout"] == "hi\n", answer
    # One at a time per client: a second request while the first runs is refused.
    results: list[tuple[int, Any, dict[str, str]]] = []
    slow = threading.Thread(
        target=lambda: results.append(execute(keyed, SLOW, headers={"Authorization": KEY}))
    )
    slow.start()
    time.sleep(0.5)
    status, answer, headers = execute(keyed, HELLO, headers={"Authorization": KEY})
    assert status == 429, answer
    assert "concurrent" in answer["message"] and headers["retry-after"] == "1"
    slow.join(30)
    assert results and results[0][0] == 200 and results[0][1]["run"]["stdout"] == "slow\n"
    # The bucket (4 per minute) is now empty: 429 with a Retry-After of about 15 s.
    status, answer, headers = execute(keyed, HELLO, headers={"Authorization": KEY})
    assert status == 429 and answer["message"] == "rate limit: 4 executions per minute", answer
    assert 1 <= int(headers["retry-after"]) <= 15


def test_queue_full_is_503(tmp_path: Path) -> None:
    gw = start_runner_gateway(
        tmp_path,
        """
[runner]
rate_per_minute = 0
max_per_client = 0
max_concurrency = 1
queue = 1
""",
    )
    try:
        results: list[tuple[int, Any, dict[str, str]]] = []
        lock = threading.Lock()

        def one() -> None:
            answer = execute(gw, SLOW)
            with lock:
                results.append(answer)

        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.3)  # the first runs, the second waits in the queue
        status, answer, headers = execute(gw, HELLO)
        assert status == 503, answer
        assert answer == {"message": "the runner is busy: 1 executions already queued"}
        assert headers["retry-after"] == "1"
        for t in threads:
            t.join(30)
        assert sorted(r[0] for r in results) == [200, 200]
        assert all(r[1]["run"]["stdout"] == "slow\n" for r in results)
        status, answer, _ = execute(gw, HELLO)  # and it recovers
        assert status == 200 and answer["run"]["stdout"] == "hi\n"
    finally:
        stop_gateway(gw)


def test_runner_off_in_process_isolation(gateway_factory: Any) -> None:
    """Untrusted code is never run unconfined: with isolation = "process" there is no runner."""
    gw = gateway_factory()
    resp = gw.request("/api/v2/runtimes", host=RUNNER_HOST)
    assert resp.status == 404
    assert "code runner disabled" in gw.log()
    status, body = gw.admin("GET", "/api/v2/runtimes")
    assert status == 404, json.dumps(body)
