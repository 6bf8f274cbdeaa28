"""gateway/_heads.c against gateway/heads.py's reference (regex scan + llhttp strict mode).

The C classifier may refuse a head the reference takes (the parsing path then handles it: only
speed is lost), but whenever it takes a head the reference must take it too, with the same
method, target, Host, forwarded head or body offset and length: otherwise a head llhttp would
refuse could be forwarded, or a response could be framed differently from how llhttp reads it.
Checked here on ordinary heads (where the two must agree exactly), on hand-written hostile ones
and on 200,000 mutations of both (a fixed seed, so a failure reproduces).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import heads
from gateway.heads import plain_request_py, plain_response_py, response_head_py

_heads = pytest.importorskip("gateway._heads", reason="the C extension is not built")
ROOT = Path(__file__).resolve().parent.parent

MAX = 8192
FWD = b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: "

ORDINARY_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: bench.localhost\r\n\r\n",
    b"GET /a/b?c=d&e=%20#frag HTTP/1.1\r\nUser-Agent: curl/8\r\nHost: bench.localhost\r\n"
    b"Accept: */*\r\nCookie: a=b; c=d\r\nX-Upgraded-Thing: 1\r\nTEX: 2\r\n\r\n",
    b"DELETE /x HTTP/1.1\r\nhost: bench.localhost:8080\r\n\r\n",
    b"HEAD /x HTTP/1.1\r\nHOST: Bench.LocalHost\r\n\r\n",
    b"OPTIONS /x HTTP/1.1\r\nHost: bench.localhost\r\n\r\n",
    b"POST /form HTTP/1.1\r\nHost: a.localhost\r\nX-Empty:\r\nX-Ows: \t v \t\r\n\r\n",
    b"PUT /x HTTP/1.1\r\nHost:\tbench.localhost\r\nX-Obs: caf\xc3\xa9\r\n\r\n",
    b"PATCH /!$&'()*+,;=:@[]{}|\\^`~\"<> HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: bench.localhost\r\nProxyish: 1\r\nX-Proxy-A: 2\r\n"
    b"Hosts: 3\r\nContent-Lengthy: 4\r\nTE2: 5\r\nX-Forwarded-Fort: 6\r\nforwarde: 7\r\n\r\n",
    b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: bench.localhost\r\n\r\n",
]

HOSTILE_REQUESTS = [
    b"",
    b"\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\ncontent-length: 5\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTRANSFER-ENCODING: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a \r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: caf\xc3\xa9\r\n\r\n",
    b"GET / HTTP/1.1\r\n Host: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n X: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n\tc\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: b\rc\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: b\nY: c\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX A: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX\x80: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nKeep-Alive: 5\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nTrailer: X\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nProxy-Authorization: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nPROXY-CONNECTION: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nProxy-: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Host: evil\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Proto: https\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nForwarded: for=x\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.2\r\nHost: a\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    b"GET / http/1.1\r\nHost: a\r\n\r\n",
    b"GET /  HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /\x80 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /\t HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET HTTP/1.1\r\nHost: a\r\n\r\n",
    b"get / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"CONNECT / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b" GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * MAX + b"\r\n\r\n",
]

ORDINARY_RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA",
    b"HTTP/1.1 404 Not Found\r\ncontent-length:  10 \t\r\n\r\n0123456789",
    b"HTTP/1.1 500 \r\nCONTENT-LENGTH: 0\r\n\r\n",
    b"HTTP/1.1 201 Cr\xc3\xa9\xc3\xa9\r\nX-Empty:\r\nContent-Length: 007\r\nX: caf\xc3\xa9\r\n\r\n",
    b"HTTP/1.1 599 Whatever\tit is\r\nContent-Length: 999999999999999\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nProxyish: 1\r\nTE2: 2\r\nContent-Lengthy: 3\r\nConnections: 4\r\n"
    b"Content-Length: 1\r\n\r\nx",
]

HOSTILE_RESPONSES = [
    b"",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r",
    b"HTTP/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\ncontent-length: 3\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1234567890123456\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nKeep-Alive: 5\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTE: x\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTrailer: x\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nUpgrade: x\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nProxy-Authenticate: x\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\n Content-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nX: a\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nX: a\rContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\nok",
    b"HTTP/1.1 200 OK\r\nX: a\x00\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 101 Switching Protocols\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 199 X\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 600 X\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1  200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"http/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nX A: 1\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\n: 1\r\nContent-Length: 2\r\n\r\nok",
    # llhttp takes any byte but CR and LF in a reason phrase; both classifiers allow only HTAB,
    # SP, VCHAR and obs-text (RFC 9112), since what they take is relayed byte for byte.
    b"HTTP/1.1 200 O\x00K\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 O\x01K\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 O\x1fK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 O\x7fK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 \x00\r\nContent-Length: 2\r\n\r\nok",
]

# Heads the reference takes and the C classifier refuses (both answers are safe: the parsing
# path relays these as the reference would), kept here so a change on either side shows.
STRICTER_IN_C = [
    # Methods outside C's short list.
    (plain_request_py, b"TRACE / HTTP/1.1\r\nHost: a\r\n\r\n"),
    (plain_request_py, b"PROPFIND / HTTP/1.1\r\nHost: a\r\n\r\n"),
]


@pytest.mark.parametrize(("reference", "data"), STRICTER_IN_C)
def test_stricter_in_c(reference: object, data: bytes) -> None:
    if reference is plain_response_py:
        assert _heads.plain_response(data) is None and plain_response_py(data) is not None
    else:
        assert _heads.plain_request(data, MAX, FWD) is None
        assert plain_request_py(data, MAX, FWD) is not None


# Bytes that break grammars: line ends, controls, separators, high bytes, case.
_NASTY = b'\r\n\x00\x01\t\x0b\x7f\x80\xff :;,/?#%"\\()<>@[]{}=-_.aAzZ09'


def _mutations(bases: list[bytes], count: int, seed: int) -> list[bytes]:
    """`count` heads, each a base with one to three bytes replaced, inserted or deleted."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        head = bytearray(rng.choice(bases))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(head) + 1)
            op = rng.random()
            byte = _NASTY[rng.randrange(len(_NASTY))]
            if op < 0.4 and at < len(head):
                head[at] = byte
            elif op < 0.8:
                head.insert(at, byte)
            elif at < len(head):
                del head[at]
        out.append(bytes(head))
    return out


def _check_request(head: bytes) -> bool:
    """The C classifier never takes what the reference refuses, nor disagrees when both take."""
    c = _heads.plain_request(head, MAX, FWD)
    py = plain_request_py(head, MAX, FWD)
    if c is not None:
        assert py == c, head
    return c is not None


def _check_response(data: bytes) -> bool:
    c = _heads.response_head(data)
    py = response_head_py(data)
    if c is not None:
        assert py == c, data
        body_at, length = c
        assert _heads.plain_response(data) == length - (len(data) - body_at)
        assert plain_response_py(data) == _heads.plain_response(data)
    else:
        assert _heads.plain_response(data) is None
    return c is not None


def test_the_fast_path_tests_pass_on_the_python_fallback() -> None:
    """The data plane without the extension (DORM_PURE_PYTHON_HEADS=1): same behaviour."""
    env = {**os.environ, "DORM_PURE_PYTHON_HEADS": "1"}
    check = "import gateway.heads as h, sys; sys.exit(h.COMPILED)"
    subprocess.run([sys.executable, "-c", check], env=env, cwd=ROOT, check=True)
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fastpath.py"],
        env=env,
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def test_the_extension_is_what_the_data_plane_uses() -> None:
    assert heads.COMPILED
    assert heads.plain_request is _heads.plain_request
    assert heads.plain_response is _heads.plain_response
    assert heads.response_head is _heads.response_head


@pytest.mark.parametrize("head", ORDINARY_REQUESTS)
def test_ordinary_requests_agree_exactly(head: bytes) -> None:
    assert plain_request_py(head, MAX, FWD) is not None
    assert _check_request(head)


@pytest.mark.parametrize("head", HOSTILE_REQUESTS)
def test_hostile_requests_are_refused(head: bytes) -> None:
    assert _heads.plain_request(head, MAX, FWD) is None
    assert plain_request_py(head, MAX, FWD) is None


@pytest.mark.parametrize("data", ORDINARY_RESPONSES)
def test_ordinary_responses_agree_exactly(data: bytes) -> None:
    assert plain_response_py(data) is not None
    assert _check_response(data)


@pytest.mark.parametrize("data", HOSTILE_RESPONSES)
def test_hostile_responses_are_refused(data: bytes) -> None:
    assert _heads.plain_response(data) is None and _heads.response_head(data) is None
    assert plain_response_py(data) is None


def test_mutated_requests_never_taken_against_the_reference() -> None:
    bases = ORDINARY_REQUESTS[:-1] + HOSTILE_REQUESTS[2:-1]
    taken = sum(_check_request(head) for head in _mutations(bases, 100_000, seed=2))
    assert taken > 1000  # the mutations do reach the accepting side, not only refusals


def test_mutated_responses_never_taken_against_the_reference() -> None:
    bases = ORDINARY_RESPONSES + HOSTILE_RESPONSES[1:]
    taken = sum(_check_response(data) for data in _mutations(bases, 100_000, seed=3))
    assert taken > 500


def test_every_byte_in_every_position_of_a_request() -> None:
    """One byte replaced or inserted at every offset, for all 256 values: exhaustive."""
    base = b"GET /p?q HTTP/1.1\r\nHost: bench.localhost\r\nX-A: b\r\n\r\n"
    for at in range(len(base)):
        for byte in range(256):
            _check_request(base[:at] + bytes([byte]) + base[at + 1 :])
            _check_request(base[:at] + bytes([byte]) + base[at:])


def test_every_byte_in_every_position_of_a_response() -> None:
    base = b"HTTP/1.1 200 OK\r\nX-A: b\r\nContent-Length: 2\r\n\r\nok"
    for at in range(len(base) - 2):
        for byte in range(256):
            _check_response(base[:at] + bytes([byte]) + base[at + 1 :])
            _check_response(base[:at] + bytes([byte]) + base[at:])


def test_not_bytes_is_not_plain() -> None:
    """A transport always delivers bytes; anything else is left to the parsing path."""
    head = ORDINARY_REQUESTS[0]
    assert _heads.plain_request(bytearray(head), MAX, FWD) is None
    assert _heads.plain_request(memoryview(head), MAX, FWD) is None
    assert _heads.plain_response(bytearray(ORDINARY_RESPONSES[0])) is None
    assert _heads.response_head(bytearray(ORDINARY_RESPONSES[0])) is None


def test_max_size_is_inclusive() -> None:
    head = ORDINARY_REQUESTS[0]
    assert _heads.plain_request(head, len(head), FWD) is not None
    assert _heads.plain_request(head, len(head) - 1, FWD) is None
    assert plain_request_py(head, len(head) - 1, FWD) is None


def test_reused_host_and_target_objects_never_leak_between_requests() -> None:
    """The C side reuses the last Host and target objects when the bytes repeat: a different
    Host or target of the same length (or the same in another case) must still come out right."""
    seen = []
    for host, target in [
        (b"a.localhost", b"/x"),
        (b"A.LOCALHOST", b"/x"),
        (b"b.localhost", b"/y"),
        (b"a.localhost", b"/x"),
        (b"a.localhosT", b"/X"),
    ]:
        head = b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
        taken = _heads.plain_request(head, MAX, FWD)
        assert taken is not None and taken == plain_request_py(head, MAX, FWD)
        assert (taken[1], taken[2]) == (target, host.lower())
        seen.append(taken)
    assert seen[0][2] is seen[1][2]  # reused: same bytes once lowercased
