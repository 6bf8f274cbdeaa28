"""Zero-downtime redeploys: a warm branch switches bundles without a failed request."""

from __future__ import annotations

import threading
import time
from typing import Any

from tests.conftest import Gateway
from tests.test_bundles import F, M, targz, upload
from tests.test_deploy import fetch, manifest, site_bundle, site_spec, wait_until


def test_redeploy_under_steady_load_fails_no_request(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory()
    gw.put_app("site", site_spec(gw))
    assert upload(gw, "site", "main", site_bundle("v1"))[0] == 201
    assert fetch(gw, "site.localhost").startswith("v1 ")
    results: list[tuple[int, bytes]] = []
    stop = threading.Event()

    def hammer() -> None:
        with gw.connect() as sock:
            while not stop.is_set():
                sock.sendall(b"GET / HTTP/1.1\r\nHost: site.localhost\r\n\r\n")
                data = b""
                while b"\r\n\r\n" not in data or not data.endswith(b"\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        results.append((0, data))
                        return
                    data += chunk
                results.append((int(data.split(b" ", 2)[1]), data.rsplit(b"\r\n\r\n", 1)[1]))

    workers = [threading.Thread(target=hammer) for _ in range(4)]
    for w in workers:
        w.start()
    time.sleep(0.3)
    status, body = upload(gw, "site", "main", site_bundle("v2"))
    assert status == 200, body
    wait_until(lambda: any(b.startswith(b"v2 ") for _, b in results[-20:]), what="v2 answers")
    time.sleep(0.3)
    stop.set()
    for w in workers:
        w.join(10)
    statuses = {s for s, _ in results}
    assert statuses == {200}, [r for r in results if r[0] != 200][:3]
    versions = [b.split(b" ")[0] for _, b in results]
    assert versions[0] == b"v1" and versions[-1] == b"v2"
    assert len(results) > 50


def test_failed_new_bundle_leaves_the_old_one_serving(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory()
    gw.put_app("site", site_spec(gw))
    assert upload(gw, "site", "main", site_bundle("v1"))[0] == 201
    before = fetch(gw, "site.localhost")
    broken = targz(
        M(manifest() + b'env = { CRASH = "1" }\n'),
        F("app.py", b"import sys\nprint('boom: missing config', flush=True)\nsys.exit(3)\n"),
        F("version.txt", b"v2"),
    )
    status, body = upload(gw, "site", "main", broken)
    assert status == 422, body
    message = body["error"]["message"]
    assert "exited with code 3" in message and "boom: missing config" in message
    assert fetch(gw, "site.localhost") == before  # same version, same process
    status, listed = gw.admin("GET", "/v1/apps/site/branches/main")
    assert status == 200 and listed["bundle"] != body.get("bundle")


def test_cold_branch_redeploy_starts_new_bundle_on_next_request(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory()
    gw.put_app("site", site_spec(gw))
    assert upload(gw, "site", "feat", site_bundle("v1"))[0] == 201
    assert upload(gw, "site", "feat", site_bundle("v2"))[0] == 200
    assert fetch(gw, "feat--site.localhost").startswith("v2 feat ")
