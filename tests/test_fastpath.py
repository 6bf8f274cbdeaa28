"""The data plane's fast paths, byte for byte, in process.

`ClientConnection.data_received` takes a plain request head without per-header callbacks and
`UpstreamConnection.data_received` relays a plain response as it came (gateway/heads.py decides
what is plain; tests/test_heads.py checks its C and Python versions against each other). Both
must produce exactly the bytes the parsing paths produce, and must refuse (fall back to the
parsing path) anything that is not plain, so every defence of the parsing path still applies.

The protocol objects run against recording transports (no sockets, no event loop), so what the
gateway forwards to the app and what it answers the client can be compared exactly: a request fed
in one read (the fast path may take it) against the same request split in two reads (only the
parsing path can take it). End-to-end coverage through real sockets is in
tests/test_proxy_protocol.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from gateway.appspec import BranchSpec, parse_app_spec
from gateway.config import GatewayConfig
from gateway.instance import Instance, State
from gateway.instances import InstanceManager
from gateway.proxy import PAUSED_BY_UPSTREAM, ClientConnection, DataPlane
from gateway.upstream import UpstreamConnection

HOST = b"bench.localhost"
FORWARDED = b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: "


@dataclass
class Recorder:
    """A transport that keeps what is written to it."""

    chunks: list[bytes] = field(default_factory=list)
    closed: bool = False
    eof: bool = False

    def write(self, data: bytes) -> None:
        self.chunks.append(bytes(data))

    def take(self) -> bytes:
        out = b"".join(self.chunks)
        self.chunks.clear()
        return out

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def write_eof(self) -> None:
        self.eof = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default


class NoRegistry:
    """The registry as the harness needs it: no runtimes, and no app but the one added."""

    runtimes: dict[str, object] = {}

    def get_app(self, name: str) -> None:
        return None

    def get_branch(self, app: str, name: str) -> None:
        return None


class Harness:
    """One client connection to a READY instance with one pooled upstream connection."""

    def __init__(self, manager_class: type[InstanceManager] = InstanceManager) -> None:
        # A real manager (the classes are native when compiled: no stand-in passes for one);
        # it starts nothing until start().
        manager = manager_class(GatewayConfig(), NoRegistry())  # type: ignore[arg-type]
        app = parse_app_spec("bench", {"command": ["true"]})
        self.inst = Instance(manager, app, BranchSpec(app="bench", name="main"))
        self.inst.state = State.READY
        manager.instances[("bench", "main")] = self.inst  # what every Host routes to
        self.up = UpstreamConnection(self.inst)
        self.up_t = Recorder()
        self.up.connection_made(self.up_t)  # type: ignore[arg-type]
        self.inst.idle.append(self.up)
        self.inst.connections = 1
        self.plane = DataPlane(GatewayConfig(), manager)
        self.client: ClientConnection = self.plane.protocol()
        self.client_t = Recorder()
        self.client.connection_made(self.client_t)  # type: ignore[arg-type]

    def send(self, *reads: bytes) -> None:
        for data in reads:
            self.client.data_received(data)

    def answer(self, *reads: bytes) -> None:
        for data in reads:
            self.up.data_received(data)


def forwarded_fast(request: bytes) -> tuple[bytes, bool]:
    """What reaches the app for `request` in one read, and whether the fast path took it."""
    h = Harness()
    h.send(request)
    ex = h.client.active
    return h.up_t.take(), ex is not None and ex.raw_head == request


def forwarded_parsed(request: bytes) -> bytes:
    """What reaches the app for `request` split in two reads: the parsing path alone."""
    h = Harness()
    cut = len(request) // 2
    h.send(request[:cut], request[cut:])
    ex = h.client.active
    assert ex is None or ex.raw_head == b""
    return h.up_t.take()


# -- requests the fast path takes ----------------------------------------------------------------

PLAIN = [
    pytest.param(b"GET / HTTP/1.1\r\nHost: bench.localhost\r\n\r\n", id="wrk"),
    pytest.param(
        b"GET /a/b?c=d&e=%20 HTTP/1.1\r\nUser-Agent: curl/8\r\nHost: bench.localhost\r\n"
        b"Accept: */*\r\nCookie: a=b; c=d\r\nX-Upgraded-Thing: 1\r\nTEX: 2\r\n\r\n",
        id="several-headers",
    ),
    pytest.param(b"DELETE /x HTTP/1.1\r\nhost: bench.localhost:8080\r\n\r\n", id="delete-port"),
    pytest.param(b"HEAD /x HTTP/1.1\r\nHOST: Bench.LocalHost\r\n\r\n", id="head-mixed-case"),
    pytest.param(b"OPTIONS /x HTTP/1.1\r\nHost: bench.localhost\r\n\r\n", id="options"),
]


@pytest.mark.parametrize("request_bytes", PLAIN)
def test_plain_request_is_forwarded_as_the_parsing_path_forwards_it(request_bytes: bytes) -> None:
    fast, took = forwarded_fast(request_bytes)
    assert took
    assert fast == forwarded_parsed(request_bytes)


def test_plain_request_bytes_exactly() -> None:
    request = b"GET /p?q HTTP/1.1\r\nHost: Bench.Localhost\r\nAccept: */*\r\n\r\n"
    fast, took = forwarded_fast(request)
    assert took
    assert fast == (
        b"GET /p?q HTTP/1.1\r\nHost: Bench.Localhost\r\nAccept: */*\r\n"
        + FORWARDED
        + b"bench.localhost\r\n\r\n"
    )


def test_header_lines_are_forwarded_as_they_came() -> None:
    """Whitespace is kept as it came (the parsing path rewrites each line as "Name: value",
    keeping only the whitespace llhttp leaves at the end of a value)."""
    request = b"GET / HTTP/1.1\r\nHost:\t bench.localhost\r\nX-A:  1 \r\n\r\n"
    fast, took = forwarded_fast(request)
    assert took
    assert fast == request[:-2] + FORWARDED + HOST + b"\r\n\r\n"
    assert forwarded_parsed(request) == (
        b"GET / HTTP/1.1\r\nHost: bench.localhost\r\nX-A: 1 \r\n" + FORWARDED + HOST + b"\r\n\r\n"
    )


def test_fast_path_exchange_reads_like_a_parsed_one() -> None:
    """gateway/static.py reads method, url and parts of an exchange from either path."""
    h = Harness()
    h.send(b"GET /s?x=1 HTTP/1.1\r\nHost: bench.localhost\r\nRange: bytes=0-1\r\n\r\n")
    fast = h.client.active
    assert fast is not None and fast.raw_head
    h2 = Harness()
    h2.send(b"GET /s?x=1 HTTP/1.1\r\nHost: bench.localhost\r\nRange: ", b"bytes=0-1\r\n\r\n")
    parsed = h2.client.active
    assert parsed is not None and not parsed.raw_head
    for ex in (fast, parsed):
        assert (ex.method, ex.url, ex.request_done) == (b"GET", b"/s?x=1", True)
        assert ex.parts == [b"Host: bench.localhost\r\n", b"Range: bytes=0-1\r\n"]
        assert not (ex.http10 or ex.upgrade or ex.chunked or ex.content_length)


# -- requests it refuses: the parsing path takes them, with the same result ----------------------

REFUSED = [
    pytest.param(
        b"POST /e HTTP/1.1\r\nHost: bench.localhost\r\nContent-Length: 0\r\n\r\n", id="cl"
    ),
    pytest.param(
        b"POST /e HTTP/1.1\r\nHost: bench.localhost\r\nTransfer-Encoding: chunked\r\n\r\n",
        id="te",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: bench.localhost\r\nConnection: close\r\n\r\n", id="close"
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: bench.localhost\r\nConnection: x-a\r\nX-A: 1\r\n\r\n",
        id="connection-listed",
    ),
    pytest.param(b"GET / HTTP/1.1\r\nKeep-Alive: 5\r\nHost: bench.localhost\r\n\r\n", id="ka"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: bench.localhost\r\nTE: trailers\r\n\r\n", id="te-hdr"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: bench.localhost\r\nTrailer: X\r\n\r\n", id="trailer"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: bench.localhost\r\nUpgrade: h2c\r\n\r\n", id="upgrade"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: bench.localhost\r\nProxy-Authorization: Basic eA==\r\n\r\n",
        id="proxy-auth",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nProxy-Connection: keep-alive\r\nHost: bench.localhost\r\n\r\n",
        id="proxy-connection",
    ),
    pytest.param(b"GET / HTTP/1.1\r\nHost: bench.localhost\r\nProxy-X: 1\r\n\r\n", id="proxy-x"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: bench.localhost\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n", id="xff"
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: bench.localhost\r\nx-forwarded-host: evil\r\n\r\n", id="xfh"
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: bench.localhost\r\nX-Forwarded-Proto: https\r\n\r\n", id="xfp"
    ),
    pytest.param(b"GET / HTTP/1.1\r\nHost: bench.localhost\r\nForwarded: for=x\r\n\r\n", id="fwd"),
    pytest.param(b"GET / HTTP/1.0\r\nHost: bench.localhost\r\n\r\n", id="http10"),
    pytest.param(b"GET http://bench.localhost/x HTTP/1.1\r\nHost: other\r\n\r\n", id="absolute"),
    pytest.param(b"OPTIONS * HTTP/1.1\r\nHost: bench.localhost\r\n\r\n", id="asterisk"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: bench.localhost \r\n\r\n", id="host-trailing-space"),
    pytest.param(b"\r\nGET / HTTP/1.1\r\nHost: bench.localhost\r\n\r\n", id="leading-crlf"),
    pytest.param(b"GET  / HTTP/1.1\r\nHost: bench.localhost\r\n\r\n", id="two-spaces"),
]


@pytest.mark.parametrize("request_bytes", REFUSED)
def test_special_requests_take_the_parsing_path(request_bytes: bytes) -> None:
    fast, took = forwarded_fast(request_bytes)
    assert not took
    assert fast == forwarded_parsed(request_bytes)


def test_expect_continue_takes_the_parsing_path() -> None:
    h = Harness()
    h.send(b"PUT /e HTTP/1.1\r\nHost: bench.localhost\r\nExpect: 100-continue\r\n\r\n")
    ex = h.client.active
    assert ex is not None and not ex.raw_head and ex.expect_continue
    assert h.up_t.take() == (
        b"PUT /e HTTP/1.1\r\nHost: bench.localhost\r\n" + FORWARDED + HOST + b"\r\n\r\n"
    )


def test_pipelined_requests_in_one_read_are_forwarded_one_at_a_time() -> None:
    first = b"GET /1 HTTP/1.1\r\nHost: bench.localhost\r\n\r\n"
    second = b"GET /2 HTTP/1.1\r\n\r\n"  # no Host: must be refused, not glued onto the first
    h = Harness()
    h.send(first + second)
    assert h.up_t.take() == first[:-2] + FORWARDED + HOST + b"\r\n\r\n"
    h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
    answer = h.client_t.take()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
    assert b"HTTP/1.1 400 " in answer and h.up_t.take() == b""


def test_stray_crlf_after_a_plain_head_is_not_forwarded_as_a_second_request() -> None:
    """A read holding a head and a stray CRLF after it (which llhttp skips): the X-Forwarded-*
    lines must go into the head, not after its empty line, where the app would read them as a
    second request (and its answer would go to whoever next used that connection)."""
    request = b"GET / HTTP/1.1\r\nHost: bench.localhost\r\n\r\n"
    h = Harness()
    h.send(request + b"\r\n")
    assert h.up_t.take() == request[:-2] + FORWARDED + HOST + b"\r\n\r\n"


def test_head_completed_by_a_later_read_is_not_taken_as_a_new_request() -> None:
    h = Harness()
    h.send(b"GET / HTTP/1.1\r\nX-Pad: ", b"1\r\nHost: bench.localhost\r\n\r\n")
    ex = h.client.active
    assert ex is not None and not ex.raw_head
    assert h.up_t.take() == (
        b"GET / HTTP/1.1\r\nX-Pad: 1\r\nHost: bench.localhost\r\n" + FORWARDED + HOST + b"\r\n\r\n"
    )


def test_fast_and_parsed_requests_alternate_on_one_connection() -> None:
    """The validating parser is fed whole messages only, so it stays in step with the stream."""
    h = Harness()
    plain = b"GET /%d HTTP/1.1\r\nHost: bench.localhost\r\n\r\n"
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    for i in range(6):
        request = plain % i
        if i % 3 == 2:
            h.send(request[:10], request[10:])
        else:
            h.send(request)
        ex = h.client.active
        assert ex is not None and bool(ex.raw_head) == (i % 3 != 2)
        assert h.up_t.take() == request[:-2] + FORWARDED + HOST + b"\r\n\r\n"
        h.answer(response)
        assert h.client_t.take() == response
        assert h.client.active is None and not h.client_t.closed


def test_fast_path_checks_out_a_pooled_connection_and_hands_it_back() -> None:
    """The fast path takes the idle connection itself (Instance.checkout, no waiter call): the
    instance counts it in flight until the response ends, then pools it again."""
    h = Harness()
    h.send(b"GET / HTTP/1.1\r\nHost: bench.localhost\r\n\r\n")
    ex = h.client.active
    assert ex is not None and ex.upstream is h.up and h.up.exchange is ex
    assert h.inst.in_flight == 1 and h.inst.idle == []
    h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert h.inst.in_flight == 0 and h.inst.idle == [h.up] and h.up.exchange is None
    assert h.inst.last_activity >= h.inst.last_request > 0


def test_fast_path_keeps_flow_control_both_ways() -> None:
    """A client that is not reading (its write buffer is full) keeps the app's answer unread;
    an app that is not reading keeps the client's next bytes unread."""
    h = Harness()
    h.client.pause_writing()  # what the transport says when the client's buffer is full
    h.send(b"GET / HTTP/1.1\r\nHost: bench.localhost\r\n\r\n")
    assert h.up.reading_paused
    h.client.resume_writing()
    assert not h.up.reading_paused
    h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert h.client_t.take().endswith(b"ok")

    h.up.pause_writing()  # the app's socket is full
    h.send(b"GET /2 HTTP/1.1\r\nHost: bench.localhost\r\n\r\n")
    assert h.client.paused & PAUSED_BY_UPSTREAM
    h.up.resume_writing()
    assert not h.client.paused


MALFORMED = [
    pytest.param(b"GET / HTTP/1.1\r\nHost: bench.localhost\r\nX-A: b\r\n c\r\n\r\n", id="obs-fold"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: bench.localhost\r\nX-A: b\rc\r\n\r\n", id="bare-cr"),
    pytest.param(b"GET / HTTP/1.1\r\nX-A: b\nHost: bench.localhost\r\n\r\n", id="bare-lf"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: bench.localhost\r\nX-A: a\x00b\r\n\r\n", id="nul"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: bench.localhost\r\nX A: b\r\n\r\n", id="space-in-name"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: bench.localhost\r\nX-A : b\r\n\r\n", id="space-colon"),
    pytest.param(b"GET / HTTP/1.1\r\nHost : bench.localhost\r\n\r\n", id="host-space-colon"),
    pytest.param(b"GET /a b HTTP/1.1\r\nHost: bench.localhost\r\n\r\n", id="space-in-target"),
    pytest.param(b"GET /\x7f HTTP/1.1\r\nHost: bench.localhost\r\n\r\n", id="del-in-target"),
    pytest.param(b"get / HTTP/1.1\r\nHost: bench.localhost\r\n\r\n", id="lowercase-method"),
    pytest.param(b"GET / HTTP/1.2\r\nHost: bench.localhost\r\n\r\n", id="http-1.2"),
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="missing-host"),
    pytest.param(b"GET / HTTP/1.1\r\nHost:\r\n\r\n", id="empty-host"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: bench.localhost\r\nHost: bench.localhost\r\n\r\n", id="two-hosts"
    ),
    pytest.param(b"GET / HTTP/1.1\r\nHost: bench.localhost\r\n\n\r\n", id="bare-lf-end"),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: bench.localhost\r\nContent-Length: 1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        id="cl-te",
    ),
]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"CONNECT /x HTTP/1.1\r\nHost: bench.localhost\r\n\r\n",
        b"CONNECT bench.localhost:443 HTTP/1.1\r\nHost: bench.localhost\r\n\r\n",
    ],
)
def test_connect_is_405_and_never_forwarded(request_bytes: bytes) -> None:
    h = Harness()
    h.send(request_bytes)
    assert h.client_t.take().startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert h.up_t.take() == b""


@pytest.mark.parametrize("request_bytes", MALFORMED)
def test_malformed_heads_are_400_and_never_forwarded(request_bytes: bytes) -> None:
    for reads in ((request_bytes,), (request_bytes[:9], request_bytes[9:])):
        h = Harness()
        h.send(*reads)
        answer = h.client_t.take()
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
        assert b"\r\nConnection: close\r\n" in answer
        assert h.client.closed and (h.client_t.eof or h.client_t.closed)
        assert h.up_t.take() == b""


def test_unknown_host_is_404_as_before() -> None:
    h = Harness()
    h.plane.manager.instances.clear()  # the manager knows no app now
    h.send(b"GET / HTTP/1.1\r\nHost: nope.localhost\r\n\r\n")
    assert h.client_t.take().startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert h.up_t.take() == b""


def test_oversized_head_is_431() -> None:
    h = Harness()
    big = b"X-Big: " + b"a" * (h.plane.cfg.max_header_size + 1) + b"\r\n"
    h.send(b"GET / HTTP/1.1\r\nHost: bench.localhost\r\n" + big + b"\r\n")
    assert h.client_t.take().startswith(b"HTTP/1.1 431 ")
    assert h.up_t.take() == b""


# -- responses -----------------------------------------------------------------------------------


def relay(response_reads: tuple[bytes, ...], method: bytes = b"GET") -> tuple[bytes, Harness]:
    h = Harness()
    h.send(method + b" / HTTP/1.1\r\nHost: bench.localhost\r\n\r\n")
    h.up_t.take()
    h.answer(*response_reads)
    return h.client_t.take(), h


def test_plain_response_is_relayed_as_it_came() -> None:
    response = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
    out, h = relay((response,))
    assert out == response
    assert h.inst.idle == [h.up] and h.client.active is None


def test_plain_response_in_pieces_is_relayed_as_it_came() -> None:
    response = b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n\r\n0123456789"
    out, h = relay((response[:-7], response[-7:-3], response[-3:]))
    assert out == response
    assert h.inst.idle == [h.up] and h.client.active is None


def test_bytes_past_the_length_are_dropped_and_the_connection_not_reused() -> None:
    out, h = relay((b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",))
    assert out == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert h.inst.idle == [] and h.up_t.closed


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        pytest.param(
            b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 Status\r\nContent-Length: 2\r\n\r\nok",
            id="no-reason",
        ),
        pytest.param(
            b"HTTP/1.1 200 \r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 Status\r\nContent-Length: 2\r\n\r\nok",
            id="empty-reason-hop-by-hop",
        ),
        pytest.param(
            b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\n",
            id="204",
        ),
        pytest.param(
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            id="304",
        ),
        pytest.param(
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            id="http10-response",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: 5\r\n"
            b"Content-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            id="hop-by-hop",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            id="chunked",
        ),
    ],
)
def test_special_responses_take_the_parsing_path(response: bytes, expected: bytes) -> None:
    out, _ = relay((response,))
    assert out == expected


def test_head_response_has_no_body() -> None:
    out, h = relay((b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",), method=b"HEAD")
    assert out == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    assert h.client.active is None and not h.client_t.closed


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nokk", id="two-cl"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 2\r\n\r\nok", id="obs-fold"
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nX: a\nContent-Length: 2\r\n\r\nok", id="bare-lf"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX: a\x00\r\nContent-Length: 2\r\n\r\nok", id="nul"),
        pytest.param(b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok", id="bad-status"),
    ],
)
def test_malformed_responses_are_never_relayed(response: bytes) -> None:
    out, h = relay((response,))
    assert out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"ok" not in out.split(b"\r\n\r\n", 1)[1]
    assert h.up_t.closed


def _as_parsed(head: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """(method, target, header fields) of a forwarded head, as llhttp reads it."""
    from httptools import HttpRequestParser

    class Fields:
        def __init__(self) -> None:
            self.url = b""
            self.fields: list[tuple[bytes, bytes]] = []

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.fields.append((name, value))

    got = Fields()
    parser = HttpRequestParser(got)
    parser.feed_data(head)
    return parser.get_method(), got.url, got.fields


def test_every_head_the_fast_path_takes_is_forwarded_as_the_parsing_path_would() -> None:
    """Thousands of mutated heads (a fixed seed): whenever the fast path takes one, the app gets
    what it gets when the parsing path alone reads the head (split over two reads): the same
    method, target and header fields in the same order (the fast path keeps each line's
    whitespace as it came, the parsing path writes "Name: value"), and the client nothing yet;
    a head the fast path refuses gets exactly the parsing path's bytes both ways."""
    import random

    rng = random.Random(7)
    bases = [b"GET /a?b=c HTTP/1.1\r\nHost: bench.localhost\r\nX-A: b c\r\nAccept: */*\r\n\r\n"]
    nasty = b"\r\n\x00\t\x7f\x80 :;/?#%aA0-"
    taken = 0
    for _ in range(3000):
        head = bytearray(rng.choice(bases))
        for _ in range(rng.randint(1, 2)):
            at = rng.randrange(len(head))
            if rng.random() < 0.5:
                head[at] = nasty[rng.randrange(len(nasty))]
            else:
                head.insert(at, nasty[rng.randrange(len(nasty))])
        request = bytes(head)
        fast_h = Harness()
        fast_h.send(request)
        ex = fast_h.client.active
        if ex is not None and ex.raw_head == request:
            taken += 1
            fast, parsed = fast_h.up_t.take(), forwarded_parsed(request)
            assert _as_parsed(fast) == _as_parsed(parsed), request
            assert fast.count(b"\r\n\r\n") == 1 and fast.endswith(b"\r\n\r\n"), request
            assert fast_h.client_t.take() == b""
        else:
            parsed_h = Harness()
            cut = len(request) // 2
            parsed_h.send(request[:cut], request[cut:])
            assert fast_h.up_t.take() == parsed_h.up_t.take(), request
            assert fast_h.client_t.take() == parsed_h.client_t.take(), request
    assert taken > 300
