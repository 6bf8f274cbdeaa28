"""Command apps that only speak TCP on 127.0.0.1:$PORT, reached without a network interface."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from sandboxes import detect_isolation
from tests.conftest import ROOT, Gateway, free_port

APPS = str(ROOT / "tests" / "apps")


def tcp_spec(port: int, **extra: Any) -> dict[str, Any]:
    return {
        "runtime": "command",
        "command": [sys.executable, "tcp_only.py"],
        "app_dir": APPS,
        "port": port,
        "idle_timeout": "1s",
        **extra,
    }


def test_tcp_app_in_process_mode(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory()
    port = free_port()
    gw.put_app("tcp", tcp_spec(port))
    first = gw.request("/", host="tcp.localhost")
    assert first.status == 200 and f"on port {port}".encode() in first.body
    gw.wait_state("tcp", "cold")
    again = gw.request("/", host="tcp.localhost")
    assert again.status == 200 and again.body != first.body


@pytest.mark.skipif(
    detect_isolation() != "sandbox", reason=f"needs sandboxes; this host: {detect_isolation()}"
)
def test_tcp_app_in_sandboxes_share_a_port_without_interfaces(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory('isolation = "auto"')
    # Both apps listen on the same port: each has a network namespace of its own.
    gw.put_app("tcp1", tcp_spec(8080))
    gw.put_app("tcp2", tcp_spec(8080))
    one = gw.request("/", host="tcp1.localhost")
    two = gw.request("/", host="tcp2.localhost")
    assert one.status == 200 and two.status == 200, (one.body, two.body)
    assert b"on port 8080 tcp1" in one.body and b"on port 8080 tcp2" in two.body
    assert gw.instance("tcp1")["isolation"] == "sandbox"  # type: ignore[index]
    gw.wait_state("tcp1", "cold")
    assert gw.request("/", host="tcp1.localhost").status == 200


def test_tcp_app_with_health_path_becomes_ready(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory()
    gw.put_app("tcph", tcp_spec(free_port(), health="/healthz"))
    resp = gw.request("/", host="tcph.localhost")
    assert resp.status == 200 and b"tcp app" in resp.body


def test_tcp_app_deployed_as_a_bundle(gateway_factory: Any) -> None:
    """The real-app case of issue 4: a TCP-only command app, deployed as a bundle with its own
    manifest, woken by a request, evicted and woken again."""
    from tests.test_bundles import F, M, targz, upload

    gw: Gateway = gateway_factory()
    port = free_port()
    manifest = (
        f'runtime = "command"\ncommand = [{json.dumps(sys.executable)}, "tcp_only.py"]\n'
        f'port = {port}\nidle_timeout = "1s"\n'
    ).encode()
    source = (ROOT / "tests" / "apps" / "tcp_only.py").read_bytes()
    status, body = upload(gw, "tcpb", "feat", targz(M(manifest), F("tcp_only.py", source)))
    assert status == 201, body
    first = gw.request("/", host="feat--tcpb.localhost")
    assert first.status == 200 and f"on port {port}".encode() in first.body
    gw.wait_state("tcpb", "cold", branch="feat")
    again = gw.request("/", host="feat--tcpb.localhost")
    assert again.status == 200 and again.body != first.body
