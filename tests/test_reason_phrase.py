"""A response whose reason phrase holds a NUL, another control byte, or a bare CR or LF is never
relayed: the client gets a 502 and its connection is closed, on both response paths.

RFC 9112 allows only HTAB, SP, VCHAR and obs-text in a reason phrase. llhttp refuses a bare CR
or LF there but takes every other byte, NUL included; gateway/_heads.c refuses all of them, so
with the extension built such a response goes down the httptools path (which checks the phrase
llhttp hands it with `reason_ok`), and with
DORM_PURE_PYTHON_HEADS=1 the Python reference classifier decides first. A NUL relayed to a
client is a byte many HTTP stacks truncate at or choke on: the gateway must not be the one that
lets it through.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from gateway.heads import response_head_py
from tests.apps.echo import BAD_HEADS
from tests.conftest import Gateway, echo_spec

REFUSED_BY_LLHTTP = ["reason-cr", "reason-lf"]
TAKEN_BY_LLHTTP = ["reason-nul", "reason-ctl", "reason-del"]


@pytest.fixture(params=["compiled", "pure-python"])
def gw(request: pytest.FixtureRequest, gateway_factory: Any) -> Gateway:
    gateway: Gateway = gateway_factory(start=False)
    pure = request.param == "pure-python"
    gateway.start({"DORM_PURE_PYTHON_HEADS": "1"} if pure else {})
    gateway.put_app("echo", echo_spec())
    return gateway


def exchange(gw: Gateway, kind: str) -> tuple[bytes, bool]:
    """What a keep-alive client gets for /bad-head?kind=KIND, and whether the gateway then
    closed the connection (within 5 s)."""
    with gw.connect() as sock:
        sock.sendall(f"GET /bad-head?kind={kind} HTTP/1.1\r\nHost: echo.localhost\r\n\r\n".encode())
        sock.settimeout(5)
        received, closed = b"", False
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                closed = True
                break
            received += data
    return received, closed


def assert_refused(gw: Gateway, kind: str) -> None:
    received, closed = exchange(gw, kind)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 "), received
    assert b"invalid response" in body, received
    assert b"O\x00K" not in received and b"hello" not in received, received
    assert closed, received  # the connection ends with the 502
    assert gw.request("/").status == 200  # the app's next response is fine


@pytest.mark.parametrize("kind", REFUSED_BY_LLHTTP)
def test_bare_cr_or_lf_in_the_reason_gets_502_and_close(gw: Gateway, kind: str) -> None:
    assert_refused(gw, kind)


@pytest.mark.parametrize("kind", TAKEN_BY_LLHTTP)
def test_control_bytes_in_the_reason_get_502_and_close(gw: Gateway, kind: str) -> None:
    assert_refused(gw, kind)


@pytest.mark.parametrize("kind", REFUSED_BY_LLHTTP + TAKEN_BY_LLHTTP)
def test_reference_classifier_never_takes_such_a_head(kind: str) -> None:
    # The raw fast path relays what the classifier takes byte for byte: it must refuse these.
    assert response_head_py(BAD_HEADS[kind] + b"hello") is None
