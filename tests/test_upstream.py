"""Upstream connection reuse: a pooled connection the app closed is not the client's problem."""

from __future__ import annotations

import pytest

from tests.conftest import Gateway


def test_idempotent_request_retried_when_pooled_connection_dies(gateway: Gateway) -> None:
    with gateway.connect() as sock:
        sock.sendall(b"GET /then-drop HTTP/1.1\r\nHost: echo.localhost\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200") and first.endswith(b"ok")
        # The only pooled connection is the one the app will drop on its next request.
        sock.sendall(b"GET / HTTP/1.1\r\nHost: echo.localhost\r\n\r\n")
        second = sock.recv(65536)
        assert second.startswith(b"HTTP/1.1 200")
        assert second.endswith(b"hello from echo/main\n")


def test_request_with_body_is_not_retried(gateway: Gateway) -> None:
    with gateway.connect() as sock:
        sock.sendall(b"GET /then-drop HTTP/1.1\r\nHost: echo.localhost\r\n\r\n")
        assert sock.recv(65536).endswith(b"ok")
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: echo.localhost\r\nContent-Length: 2\r\n\r\nhi")
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 502 ")
        assert b"closed the connection" in answer


def test_hop_by_hop_response_headers_are_dropped(gateway: Gateway) -> None:
    resp = gateway.request("/hop")
    assert resp.status == 200 and resp.body == b"hop"
    assert "keep-alive" not in resp.headers
    assert resp.headers.get("connection", "") != "keep-alive"


def test_bytes_past_content_length_are_not_relayed_nor_reused(gateway: Gateway) -> None:
    with gateway.connect() as sock:
        sock.sendall(b"GET /overlong HTTP/1.1\r\nHost: echo.localhost\r\n\r\n")
        first = b""
        while not first.endswith(b"abc"):
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200") and b"def" not in first
        sock.sendall(b"GET / HTTP/1.1\r\nHost: echo.localhost\r\n\r\n")
        second = sock.recv(65536)
        assert second.startswith(b"HTTP/1.1 200") and second.endswith(b"hello from echo/main\n")
    inst = gateway.instance("echo")
    assert inst is not None and inst["connections"] <= 1  # the out-of-sync one was closed


@pytest.mark.parametrize("kind", ["two-lengths", "obs-fold", "bare-lf", "nul", "bad-name"])
def test_malformed_response_heads_are_never_relayed(gateway: Gateway, kind: str) -> None:
    resp = gateway.request(f"/bad-head?kind={kind}")
    assert resp.status == 502
    assert b"invalid response" in resp.body
    assert b"hello" not in resp.body
    assert gateway.request("/").status == 200  # and the next request is fine
