"""The data plane: one asyncio Protocol per client connection, parsing requests with httptools.

Hot path: accept → parse head → route → acquire an upstream connection → forward → relay. No task
per request and no per-request timer: deadlines are plain floats checked by one sweep per second
(`DataPlane.sweep`), and flow control is pause_reading/resume_reading on both sides.

Plain requests (one whole HTTP/1.1 head in one read, a plain Host, no header the gateway acts on:
what load generators, health checks and most GETs send) skip the per-header callbacks: one call
(`gateway.heads.plain_request`, C when built) validates the head strictly, finds Host, refuses
anything special and builds the head to forward (as it came plus the X-Forwarded-* lines); see
`ClientConnection.data_received`. Every other request, and every head that fast path refuses,
takes the callback path below.

Request smuggling defences come from llhttp's strict mode (both Content-Length and
Transfer-Encoding, duplicate or invalid Content-Length, bad chunk sizes, obs-fold, bare CR or LF are
parse errors); any parse error is answered 400 and the connection is closed, so a desynchronised
stream is never read further. Pipelined requests are parsed ahead but answered strictly in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from gateway import heads
from gateway.config import GatewayConfig
from gateway.http11 import CONTINUE_100, FORWARDED, HOP_BY_HOP, LAST_CHUNK, error_response
from gateway.routing import HostCache, parse_host

if TYPE_CHECKING:
    from gateway.instance import Instance
    from gateway.instances import InstanceManager
    from gateway.upstream import UpstreamConnection

log = logging.getLogger("dorm.proxy")

_REQ_SPECIAL = HOP_BY_HOP | FORWARDED | {b"host", b"content-length", b"expect"}
BUFFER_LIMIT = 64 * 1024  # request body bytes held while a request waits for its upstream
# Deadline kinds.
IDLE: Final = 0
HEAD: Final = 1
BODY: Final = 2
RESPONSE: Final = 3
LINGER: Final = 4
LINGER_TIMEOUT = 2.0
# Reasons reading from the client is paused (a bit mask: resume only when none is left).
PAUSED_BY_UPSTREAM: Final = 1
PAUSED_BUFFERING: Final = 2
# Final: compiled by mypyc (setup.py), a Final name is a C static, not a dict lookup per read;
# so are the two functions called on every request, bound here rather than imported.
_NOT_FOUND: Final = object()
monotonic: Final = time.monotonic
plain_request: Final = heads.plain_request
_RETRYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS"})
_NO_BODY: Final[list[bytes]] = []  # Exchange.buffer of a request without body; never appended to
_UNSPLIT: Final[list[bytes]] = []  # Exchange.lines of a fast-path request not split yet; ditto
_NO_NAMES: Final[frozenset[bytes]] = frozenset()  # Exchange.forwarded_given with none given


def _chunked_last(ex: Exchange) -> bool:
    """Whether a request's Transfer-Encoding lines end in chunked (and name it once), as llhttp
    decides it (tests/test_desync.py checks the two agree); normalises `ex.transfer_encoding`
    to what is forwarded: the codings lowercased and trimmed, on one line, without empty
    elements and identity (an app comparing the value to "chunked" must read the body as the
    gateway does, not as the next request)."""
    codings = [c.lstrip(b" \t").rstrip(b" ").lower() for c in ex.transfer_encoding.split(b",")]
    ex.transfer_encoding = b", ".join(c for c in codings if c and c != b"identity")
    return codings[-1] == b"chunked" and b"chunked" not in codings[:-1]


class DataPlane:
    """State shared by every client connection: config, routing and the connection set."""

    def __init__(self, cfg: GatewayConfig, manager: InstanceManager) -> None:
        self.cfg = cfg
        self.manager = manager
        self.suffixes = tuple(sorted(("." + d for d in cfg.domains), key=len, reverse=True))
        # Read on every request: copied out of cfg so the hot path does one lookup less.
        self.max_header_size = cfg.max_header_size
        self.upstream_timeout = cfg.upstream_timeout
        self.keepalive_timeout = cfg.keepalive_timeout
        self.hosts = HostCache()
        self.host_entries = self.hosts.entries  # read directly: one dict lookup per request
        self.connections: set[ClientConnection] = set()
        self.draining = False
        self._sweeper: asyncio.TimerHandle | None = None
        manager.on_change = self.hosts.clear

    def route(self, host: bytes) -> Instance | None:
        """The instance a Host header names (cached per Host value)."""
        found = self.host_entries.get(host)
        if found is None:
            route = parse_host(host.decode("latin-1"), self.suffixes)
            inst = None if route is None else self.manager.get(route.app, route.branch)
            found = _NOT_FOUND if inst is None else inst
            self.hosts.put(host, found)
        return None if found is _NOT_FOUND else found  # type: ignore[return-value]

    def protocol(self) -> ClientConnection:
        return ClientConnection(self)

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().call_later(1.0, self.sweep)

    def sweep(self) -> None:
        """Enforce every client-side deadline; one pass a second over all connections."""
        now = time.monotonic()
        for conn in list(self.connections):
            if conn.deadline and now > conn.deadline:
                conn.timed_out()
        self._sweeper = asyncio.get_running_loop().call_later(1.0, self.sweep)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    def in_flight(self) -> int:
        """Requests still being answered. Tunnels are not counted: they have no natural end."""
        return sum(1 for c in self.connections if c.active is not None)

    def close_tunnels(self) -> None:
        """For shutdown, once requests have drained: WebSockets cannot be drained, only closed."""
        for conn in list(self.connections):
            if conn.tunnel is not None:
                conn.close()

    def close_idle(self) -> None:
        """For shutdown: close connections between requests; busy ones close after answering."""
        self.draining = True
        for conn in list(self.connections):
            if conn.active is None and conn.parsing is None and conn.tunnel is None:
                conn.transport.close()


class Exchange:
    """One request and its response, from the head being parsed to the last byte relayed."""

    # Defaults live on the class: a request sets only what it has (this runs once per request;
    # compiled by mypyc, the defaults are stored into the new object's fields in C).
    url = b""
    method = b""
    head_size = 0
    host: bytes | None = None
    content_length: int | None = None
    chunked = False
    transfer_encoding = b""
    expect_continue = False
    connection_tokens = b""
    upgrade_value = b""
    xff = b""
    forwarded_given: frozenset[bytes] | set[bytes]  # set in __init__ (mypyc: not a constant)
    http10 = False
    keep_alive = True
    # The response may take the raw path (gateway/upstream.py): not HEAD, not HTTP/1.0, not an
    # upgrade. One flag, set where the request is parsed, read once per response.
    raw_response = True
    keep_client = False
    upgrade = False
    instance: Instance | None = None
    upstream: UpstreamConnection | None = None
    buffered = 0
    body_received = 0
    request_done = False
    head_sent = False
    queued_at = 0.0
    reject: tuple[int, str] | None = None
    # A response written by the gateway itself (gateway/static.py) waits here for the client
    # to drain its write buffer; called from resume_writing.
    on_drain: Callable[[], None] | None = None
    # The forwarded header lines ("Name: value\r\n"), built by the parsing path; _UNSPLIT for
    # a request taken by the plain-head fast path until someone asks for `parts`.
    lines: list[bytes] = _UNSPLIT
    # Fast path only: the request head as received, and the head to forward (built once).
    raw_head = b""
    forward_head = b""
    # Body bytes waiting for an upstream connection. The parsing path gives each exchange its
    # own list in on_message_begin; a fast-path request has no body, so it shares this empty one
    # (never appended to).
    buffer: list[bytes] = _NO_BODY

    client: ClientConnection

    def __init__(self, client: ClientConnection | None) -> None:
        if client is not None:
            self.client = client
        self.forwarded_given = _NO_NAMES
        self.lines = _UNSPLIT
        self.buffer = _NO_BODY

    @property
    def parts(self) -> list[bytes]:
        """The request's header lines as forwarded ("Name: value\\r\\n"; gateway/static.py reads
        them). Split from the raw head on first use for a fast-path request: most never ask."""
        lines = self.lines
        if lines is _UNSPLIT:
            head = self.raw_head
            block = head[head.find(b"\r\n") + 2 : -4]
            lines = self.lines = [line + b"\r\n" for line in block.split(b"\r\n")]
        return lines

    @parts.setter
    def parts(self, lines: list[bytes]) -> None:
        self.lines = lines

    # -- called by the instance -------------------------------------------------------------------
    def attach(self, conn: UpstreamConnection) -> None:
        """An upstream connection is ours: send the head and whatever body we buffered."""
        client = self.client
        if client.active is not self or client.closed:  # the client went away meanwhile
            conn.inst.release(conn, True, monotonic())
            return
        self.upstream = conn
        conn.exchange = self
        head = self.forward_head
        if head:  # a fast-path request: no body, no Expect, its head built already
            if not conn.closed:
                conn.transport.write(head)  # conn.send, inlined: this runs once per request
            if client.write_paused:
                conn.pause()
            if conn.write_paused:
                client.pause(PAUSED_BY_UPSTREAM)
            return
        if self.expect_continue and not self.request_done and not self.body_received:
            client.transport.write(CONTINUE_100)
            if client.deadline_kind == BODY:
                client.deadline = time.monotonic() + client.plane.cfg.body_timeout
        head = self.request_head()
        if self.buffer:
            conn.send(head + b"".join(self.buffer))
            self.buffer = []
            self.buffered = 0
            client.resume(PAUSED_BUFFERING)
        else:
            conn.send(head)
        if client.write_paused:
            conn.pause()
        if conn.write_paused:
            client.pause(PAUSED_BY_UPSTREAM)

    def fail(self, status: int, message: str, retry_after: int | None = None) -> None:
        """The instance cannot serve this request: answer with an error (if still ours)."""
        if self.client.active is self and not self.client.closed:
            self.client.send_error(status, message, retry_after=retry_after)

    def abandon(self) -> None:
        """Give up on this exchange's upstream side: a half-used connection is discarded (it
        cannot be reused), a queued request leaves its queue."""
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.exchange = None
            conn.close()
            conn.inst.release(conn, False, monotonic())
        elif self.instance is not None:
            self.instance.cancel(self)

    def retryable(self) -> bool:
        """Safe to send again on another connection: idempotent, bodiless, fully read."""
        return (
            self.method in _RETRYABLE
            and self.request_done
            and not self.chunked
            and not self.content_length
            and not self.upgrade
        )

    def request_head(self) -> bytes:
        client = self.client
        if not (self.xff or self.forwarded_given or self.chunked or self.upgrade):
            # The common case, from bytes precomputed per connection.
            return b"".join(
                [
                    self.method,
                    b" ",
                    self.url,
                    b" HTTP/1.1\r\n",
                    *self.lines,
                    client.forwarded,
                    (self.host or b"").lower(),  # as the fast path sends it (nginx's $host too)
                    b"\r\n\r\n",
                ]
            )
        xff = self.xff + b", " + client.peer if self.xff else client.peer
        extra = [b"X-Forwarded-For: " + xff + b"\r\n"]
        given = self.forwarded_given
        if b"x-forwarded-host" not in given:
            extra.append(b"X-Forwarded-Host: " + (self.host or b"").lower() + b"\r\n")
        if b"x-forwarded-proto" not in given:
            extra.append(b"X-Forwarded-Proto: http\r\n")
        if self.chunked:
            extra.append(b"Transfer-Encoding: " + self.transfer_encoding + b"\r\n")
        if self.upgrade:
            extra.append(b"Connection: upgrade\r\nUpgrade: " + self.upgrade_value + b"\r\n")
        return b"".join(
            [self.method, b" ", self.url, b" HTTP/1.1\r\n", *self.lines, *extra, b"\r\n"]
        )


# ClientConnection.parsing once the stream is broken after a complete request that is still being
# answered: nothing more is read (see protocol_error).
_BROKEN: Final = Exchange(None)


class ClientConnection:
    """One client TCP connection; a uvicorn-style Protocol with no task per request (an asyncio
    protocol by its methods: gateway/upstream.py's UpstreamConnection says why it does not
    subclass one)."""

    __slots__ = (
        "active",
        "closed",
        "deadline",
        "deadline_kind",
        "eof",
        "forwarded",
        "head_bytes",
        "lingering",
        "parser",
        "parsing",
        "paused",
        "peer",
        "pending",
        "plane",
        "transport",
        "tunnel",
        "tunnel_tail",
        "upgrade_pending",
        "write_paused",
    )

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = HttpRequestParser(self)
        self.parsing: Exchange | None = None
        self.active: Exchange | None = None
        self.pending: deque[Exchange] = deque()
        self.tunnel: UpstreamConnection | None = None
        self.tunnel_tail = b""
        self.upgrade_pending = False
        self.peer = b"unknown"
        self.paused = 0
        self.write_paused = False
        self.closed = False
        self.eof = False
        self.forwarded = (
            b"X-Forwarded-For: unknown\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: "
        )
        self.lingering = False
        self.head_bytes = 0
        self.deadline = 0.0
        self.deadline_kind = IDLE

    # -- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = peer[0].encode()
            self.forwarded = (
                b"X-Forwarded-For: "
                + self.peer
                + b"\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: "
            )
        plane = self.plane
        if len(plane.connections) >= plane.cfg.max_connections:
            self.transport.write(error_response(503, "too many connections", retry_after=1))
            transport.close()
            self.closed = True
            return
        plane.connections.add(self)
        self.deadline = time.monotonic() + plane.cfg.header_timeout
        self.deadline_kind = IDLE

    def data_received(self, data: bytes) -> None:
        if (
            self.parsing is None
            and self.tunnel is None
            and not self.closed
            and not self.upgrade_pending
        ):
            # Between requests: a plain request is taken without per-header callbacks. Plain
            # means `data` is exactly one complete HTTP/1.1 head (so the parser, at a message
            # boundary, loses nothing by not seeing it), with an origin-form target, one Host
            # with a plain value and no header the gateway acts on (framing, Expect,
            # hop-by-hop, X-Forwarded-*, Forwarded): the request has no body and its head is
            # forwarded as it came plus the three X-Forwarded-* lines, the same bytes the
            # parsing path builds. gateway/heads.py decides that, validating every byte at
            # least as strictly as llhttp does; anything else (including a Host that routes
            # nowhere: 404 and friends) takes the parsing path. Inlined here rather than a
            # method of its own: this runs once per request, and a Python call costs.
            plane = self.plane
            plain = plain_request(data, plane.max_header_size, self.forwarded)
            if plain is not None:
                method, url, host, head = plain
                found = plane.host_entries.get(host)
                if found is None:
                    found = plane.route(host)  # the first request for this (lowercased) Host
                if found is not None and found is not _NOT_FOUND:
                    inst = cast("Instance", found)  # typed: a direct call when compiled
                    ex = Exchange(self)
                    ex.method = method
                    ex.url = url
                    ex.host = host
                    ex.raw_head = data
                    ex.forward_head = head
                    ex.request_done = True
                    ex.instance = inst
                    # Read on every response: set on the instance, not left to the class
                    # defaults, because CPython 3.11 specializes attribute reads only for
                    # instance attributes (a class default costs a generic lookup each time).
                    ex.keep_alive = True
                    ex.raw_response = method != b"HEAD"
                    self.deadline_kind = RESPONSE
                    now = monotonic()
                    self.deadline = now + plane.upstream_timeout
                    if self.active is None and not self.pending:
                        self.active = ex
                        conn = inst.checkout(now)
                        if conn is None:
                            inst.acquire(ex, now)
                            return
                        # Exchange.attach, inlined for its fast-path case: the client is
                        # ours (we are in its data_received), the request has no body.
                        ex.upstream = conn
                        conn.exchange = ex
                        if not conn.closed:
                            conn.transport.write(head)
                        if self.write_paused:
                            conn.pause()
                        if conn.write_paused:
                            self.pause(PAUSED_BY_UPSTREAM)
                    else:
                        self.pending.append(ex)
                    return
        if self.tunnel is not None:
            self.tunnel.send(data)
            return
        if self.closed or self.parsing is _BROKEN:
            # Also while lingering, or finishing a response before a broken request: unread
            # input is discarded until EOF or the deadline.
            return
        if self.upgrade_pending:  # bytes after an Upgrade request, before the app answered
            self.tunnel_tail += data
            if len(self.tunnel_tail) > BUFFER_LIMIT:
                self.pause(PAUSED_BUFFERING)
            return
        before = self.parsing
        received = before.body_received if before is not None else 0
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self.tunnel_tail = data[exc.args[0] :]
            self.upgrade_pending = True
            return
        except HttpParserError as exc:
            self.protocol_error(400, f"malformed request: {exc}")
            return
        parsing = self.parsing
        if parsing is not None:
            limit = self.plane.cfg.max_header_size
            if self.deadline_kind == HEAD:
                self.head_bytes += len(data)
                if self.head_bytes > limit:
                    self.protocol_error(431, f"request head larger than {limit} bytes")
            elif parsing.head_size > limit:
                self.protocol_error(431, f"request trailers larger than {limit} bytes")
            elif parsing is before and parsing.chunked:
                # A read without a body byte in a chunked body is framing or trailers, which
                # httptools keeps until a line ends: counted like a head, reset by body bytes.
                if parsing.body_received != received:
                    self.head_bytes = 0
                else:
                    self.head_bytes += len(data)
                    if self.head_bytes > limit:
                        self.protocol_error(431, f"request trailers larger than {limit} bytes")

    def eof_received(self) -> bool | None:
        if self.lingering:
            return None
        if self.tunnel is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self.tunnel.transport.write_eof()
            return True  # keep our write side open: the app may still answer
        if self.active is not None and (self.parsing is None or self.parsing is _BROKEN):
            self.eof = True
            return True  # half-close after a full request: still deliver the response
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.plane.connections.discard(self)
        if self.tunnel is not None:
            self.tunnel_closed_by_client()
            return
        ex = self.active
        self.active = None
        self.pending.clear()
        if ex is None:
            return
        ex.abandon()

    def pause_writing(self) -> None:
        self.write_paused = True
        up = self.tunnel or (self.active.upstream if self.active else None)
        if up is not None:
            up.pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        up = self.tunnel or (self.active.upstream if self.active else None)
        if up is not None:
            up.resume()
        elif self.active is not None and self.active.on_drain is not None:
            self.active.on_drain()

    # -- flow control -----------------------------------------------------------------------------
    def pause(self, reason: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
            if self.deadline_kind == BODY:
                self.deadline = 0.0  # we stopped reading; the client is not slow
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and not self.closed:
            self.transport.resume_reading()
            if self.deadline_kind == BODY:
                self.deadline = time.monotonic() + self.plane.cfg.body_timeout

    # -- httptools callbacks (request) ------------------------------------------------------------
    def on_message_begin(self) -> None:
        ex = self.parsing = Exchange(self)
        ex.lines = []
        ex.buffer = []
        self.head_bytes = 0
        self.deadline = time.monotonic() + self.plane.cfg.header_timeout
        self.deadline_kind = HEAD

    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        ex.url += url
        ex.head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        ex.head_size += len(name) + len(value) + 4
        if ex.method:
            return  # a trailer field (after a chunked body): counted, never forwarded
        lname = name.lower()
        if lname not in _REQ_SPECIAL:
            if b"_" in lname and lname.replace(b"_", b"-") in _REQ_SPECIAL:
                # "X_Forwarded_For" and the like: WSGI servers read it as X-Forwarded-For (and
                # a2wsgi joins the two), so it is dropped like the header it would pass for.
                return
            ex.lines.append(name + b": " + value + b"\r\n")
            return
        if lname == b"host":
            if ex.host is not None:
                ex.reject = (400, "more than one Host header")
            ex.host = value
            ex.lines.append(name + b": " + value + b"\r\n")
        elif lname == b"content-length":
            # llhttp has checked it is ASCII digits (and OWS), and only one. Forwarded as the
            # number it is ("0005 " becomes "5"): the app cannot read it any other way.
            ex.content_length = int(value)
            ex.lines.append(name + b": %d\r\n" % ex.content_length)
        elif lname == b"transfer-encoding":
            # Every line's codings, checked and normalised in _check_head.
            ex.chunked = True
            ex.transfer_encoding = (
                ex.transfer_encoding + b"," + value if ex.transfer_encoding else value
            )
        elif lname == b"connection":
            ex.connection_tokens += value.lower() + b","
        elif lname == b"upgrade":
            ex.upgrade_value = value
        elif lname == b"expect":
            if value.lower() == b"100-continue":
                ex.expect_continue = True
            else:
                ex.reject = (417, f"unsupported expectation {value[:100]!r}")
        elif lname in FORWARDED and self.plane.cfg.trust_forwarded:
            if lname == b"x-forwarded-for":
                ex.xff = ex.xff + b", " + value if ex.xff else value
            else:
                ex.lines.append(name + b": " + value + b"\r\n")
                ex.forwarded_given = ex.forwarded_given | {lname}

    def on_headers_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        parser = self.parser
        cfg = self.plane.cfg
        ex.method = parser.get_method()
        self.head_bytes = 0  # from here: bytes of chunk framing and trailers (data_received)
        version = parser.get_http_version()
        ex.http10 = version == "1.0"
        # RFC 9112 §6.1: after an HTTP/1.0 request with Transfer-Encoding, close.
        ex.keep_alive = parser.should_keep_alive() and not (ex.http10 and ex.chunked)
        ex.upgrade = parser.should_upgrade()
        # Always set (see the fast path in data_received for why not a class default).
        ex.raw_response = not (ex.http10 or ex.upgrade or ex.method == b"HEAD")
        has_body = ex.chunked or bool(ex.content_length)
        self.deadline_kind = BODY if has_body else RESPONSE
        if has_body and ex.expect_continue:
            self.deadline = 0.0  # the client waits for our 100 Continue; the clock starts then
        else:
            timeout = cfg.body_timeout if has_body else cfg.upstream_timeout
            self.deadline = time.monotonic() + timeout
        if ex.reject is None:
            ex.reject = self._check_head(ex, version)
        if ex.reject is None and ex.upgrade:
            self._check_upgrade(ex)
        if ex.reject is None and ex.connection_tokens:
            self._drop_connection_listed(ex)
        if ex.reject is not None:
            ex.keep_alive = False
        elif self.active is None and not self.pending and not self.closed:
            self.active = ex  # the common case: nothing pipelined ahead of it
            ex.instance.acquire(ex, monotonic())  # type: ignore[union-attr]
            return
        self.pending.append(ex)
        if self.active is None:
            self.next_exchange()

    def _check_head(self, ex: Exchange, version: str) -> tuple[int, str] | None:
        """Everything that makes a parsed head unacceptable, as (status, message)."""
        cfg = self.plane.cfg
        if version not in ("1.1", "1.0"):
            return (505, f"HTTP/{version} is not supported")
        if ex.head_size > cfg.max_header_size:
            return (431, f"request head larger than {cfg.max_header_size} bytes")
        if ex.method == b"CONNECT":
            return (405, "CONNECT is not supported: this is not a forward proxy")
        if ex.chunked and not _chunked_last(ex):
            # RFC 9112 §6.1: the body's length cannot be determined. llhttp finds some of
            # these only once the body starts, after the head would have been forwarded.
            coding = ex.transfer_encoding[:100]
            return (400, f"request Transfer-Encoding {coding!r} does not end in chunked")
        if ex.url[:1] != b"/":
            if ex.url == b"*" and ex.method == b"OPTIONS":
                pass
            elif ex.url[:7].lower() == b"http://" or ex.url[:8].lower() == b"https://":
                # absolute-form: the URL's authority wins over Host (RFC 9112 §3.2.2), but an
                # HTTP/1.1 request must still carry one (§3.2)
                if ex.host is None and version == "1.1":
                    return (400, "missing Host header")
                rest = ex.url.split(b"://", 1)[1]
                ends = [at for at in map(rest.find, (b"/", b"?", b"#")) if at >= 0]
                end = min(ends, default=len(rest))
                authority, path = rest[:end], rest[end:]
                ex.host = authority
                ex.url = path if path[:1] == b"/" else b"/" + path.partition(b"#")[0]
                ex.lines = [p for p in ex.lines if p[:5].lower() != b"host:"]
                ex.lines.append(b"Host: " + authority + b"\r\n")
            else:
                return (400, "request target must be an absolute path")
        if not ex.host:
            return (400, "missing Host header")
        inst = self.plane.route(ex.host)
        if inst is None:
            host = ex.host[:253].decode("latin-1")
            return (404, f"no app is served at host {host!r}")
        ex.instance = inst
        limit = inst.app.max_body
        if ex.content_length is not None and ex.content_length > limit:
            return (
                413,
                f"request body of {ex.content_length} bytes exceeds this app's "
                f"limit of {limit} bytes",
            )
        return None

    @staticmethod
    def _check_upgrade(ex: Exchange) -> None:
        if ex.method != b"GET" or not ex.upgrade_value or b"upgrade" not in ex.connection_tokens:
            ex.reject = (400, "malformed Upgrade request")
        elif ex.chunked or ex.content_length:
            ex.reject = (400, "an Upgrade request cannot carry a body")

    @staticmethod
    def _drop_connection_listed(ex: Exchange) -> None:
        """Headers named in Connection are hop-by-hop too (RFC 9110 §7.6.1)."""
        listed = {t.strip() for t in ex.connection_tokens.split(b",")}
        # Framing and routing headers are never dropped: an app reading a body that the
        # gateway forwarded without its length would see a second, smuggled request.
        listed -= {
            b"",
            b"close",
            b"keep-alive",
            b"upgrade",
            b"host",
            b"content-length",
            b"transfer-encoding",
        }
        if listed:
            ex.lines = [p for p in ex.lines if p.split(b":", 1)[0].lower() not in listed]

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        ex.body_received += len(body)
        if ex.instance is not None and ex.body_received > ex.instance.app.max_body:
            if ex.reject is None:
                ex.reject = (
                    413,
                    f"request body exceeds this app's limit of {ex.instance.app.max_body} bytes",
                )
                if self.active is ex:
                    self._reject_active(ex)
            return
        if ex.reject is not None:
            return  # the request is refused; its body goes nowhere
        if ex.chunked:
            body = b"%x\r\n%s\r\n" % (len(body), body)
        up = ex.upstream
        if up is not None:
            up.send(body)
        else:
            ex.buffer.append(body)
            ex.buffered += len(body)
            if ex.buffered > BUFFER_LIMIT:
                self.pause(PAUSED_BUFFERING)
        if not self.paused:
            self.deadline = time.monotonic() + self.plane.cfg.body_timeout

    def on_message_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        self.parsing = None
        ex.request_done = True
        if ex.chunked and ex.reject is None:
            if ex.upstream is not None:
                ex.upstream.send(LAST_CHUNK)
            else:
                ex.buffer.append(LAST_CHUNK)
        if self.active is None and not self.pending:  # answered already (refused early)
            self.deadline_kind = IDLE
            self.deadline = time.monotonic() + self.plane.cfg.keepalive_timeout
        elif self.deadline_kind == BODY:
            self.deadline_kind = RESPONSE
            self.deadline = time.monotonic() + self.plane.cfg.upstream_timeout

    # -- exchanges --------------------------------------------------------------------------------
    def next_exchange(self) -> None:
        """Start answering the oldest parsed request, if no response is in progress."""
        while self.active is None and self.pending and not self.closed:
            ex = self.active = self.pending.popleft()
            if ex.reject is not None:
                self._reject_active(ex)
                return
            assert ex.instance is not None
            ex.instance.acquire(ex, monotonic())

    def _reject_active(self, ex: Exchange) -> None:
        status, message = ex.reject  # type: ignore[misc]
        ex.abandon()
        if ex.head_sent:
            self.abort()
            return
        # A 404 for a request without a body leaves the stream in sync: keep the connection.
        keep = (
            status == 404
            and ex.request_done
            and ex.keep_alive
            and not ex.upgrade
            and not self.plane.draining
        )
        self.send_error(status, message, keep=keep)

    def send_error(
        self, status: int, message: str, *, keep: bool = False, retry_after: int | None = None
    ) -> None:
        ex = self.active
        head_only = ex is not None and ex.method == b"HEAD"
        self.transport.write(
            error_response(
                status, message, close=not keep, retry_after=retry_after, head_only=head_only
            )
        )
        if ex is not None:
            ex.head_sent = True
            ex.keep_client = keep
        if keep and ex is not None:
            self.response_done(ex)
        elif ex is not None and not ex.request_done:
            self.close_lingering()
        else:
            self.close()

    def upstream_failed(self, ex: Exchange, reason: str) -> None:
        if self.active is ex and not self.closed:
            name = ex.instance.app.name if ex.instance else "?"
            self.send_error(502, f"app {name!r} failed: {reason}")

    def response_done(self, ex: Exchange) -> None:
        """The response to `ex` is fully written: keep the connection for the next request?"""
        if self.active is not ex:
            return
        self.active = None
        if not ex.keep_client or ex.upgrade or self.eof:
            if ex.request_done or ex.upgrade:
                self.close()
            else:  # answered before its body arrived: the rest is in the way (see there)
                self.close_lingering()
            return
        if self.pending:
            # A response that completes in one read does not push the deadline back (the raw
            # path skips it); the next pipelined request gets its own full wait.
            if self.deadline_kind == RESPONSE:
                self.deadline = monotonic() + self.plane.upstream_timeout
            self.next_exchange()
        elif self.parsing is None:
            plane = self.plane
            if plane.draining:
                self.close()
                return
            self.deadline_kind = IDLE
            self.deadline = monotonic() + plane.keepalive_timeout

    def start_tunnel(self, conn: UpstreamConnection, rest: bytes) -> None:
        """The app switched protocols: splice the two connections together."""
        ex = self.active
        assert ex is not None and ex.instance is not None
        self.active = None
        self.tunnel = conn
        conn.tunnel = self
        conn.exchange = None
        inst = ex.instance
        inst.in_flight -= 1
        inst.upgraded += 1
        self.upgrade_pending = False
        self.deadline = 0.0
        if rest:
            self.transport.write(rest)
        if self.tunnel_tail:
            conn.send(self.tunnel_tail)
            self.tunnel_tail = b""
        self.resume(PAUSED_BUFFERING)

    def tunnel_closed(self) -> None:
        """The app's side of a tunnel closed."""
        if self.tunnel is not None:
            self.tunnel.inst.upgraded -= 1
            self.tunnel.inst.last_activity = time.monotonic()
            self.tunnel = None
        self.close()

    # -- ending -----------------------------------------------------------------------------------
    def protocol_error(self, status: int, message: str) -> None:
        """The byte stream is broken: answer if we still can, and close.

        If the broken bytes belong to a later pipelined request, the response in progress is
        finished first. If they belong to the active request, its upstream connection has a
        partial request on it and is discarded.
        """
        broken = self.parsing
        self.pending.clear()
        self.parsing = None
        ex = self.active
        if ex is not None and broken is not ex:
            # An earlier request is being answered (or waits for its upstream connection):
            # finish it, then close. Not `closed` yet: that means the client is gone, and its
            # answer would be dropped. Nothing more is read (the fast path wants `parsing` None,
            # data_received discards input while it is _BROKEN).
            ex.keep_alive = False
            ex.keep_client = False
            self.parsing = _BROKEN
            self.deadline_kind = RESPONSE
            self.deadline = time.monotonic() + self.plane.upstream_timeout
            return
        if ex is not None:
            ex.reject = (status, message)
            self._reject_active(ex)
            return
        self.transport.write(error_response(status, message))
        self.close_lingering()

    def timed_out(self) -> None:
        kind = self.deadline_kind
        self.deadline = 0.0
        ex = self.active
        if kind in (IDLE, LINGER):
            self.transport.close()
            self.closed = True
        elif kind == HEAD:
            self.protocol_error(408, "timed out reading the request head")
        elif kind == BODY:
            if ex is not None and ex is self.parsing and not ex.head_sent:
                ex.reject = (408, "timed out reading the request body")
                self._reject_active(ex)
            else:
                self.protocol_error(408, "timed out reading the request body")
        elif ex is not None and not ex.head_sent:
            ex.reject = (504, "the app did not answer in time")
            self._reject_active(ex)
        else:
            self.abort()

    def close_lingering(self) -> None:
        """Close after an error while the client may still be sending.

        Closing a socket with unread input makes the kernel send RST, which can destroy the
        error response before the client reads it. So: send FIN, discard input for a few
        seconds (or until the client closes), then close (nginx's "lingering close").
        """
        if self.transport.is_closing():
            return
        self.closed = True
        self.lingering = True
        self.parsing = None
        self.pending.clear()
        if self.paused:
            self.paused = 0
            self.transport.resume_reading()
        try:
            self.transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            self.transport.close()
            return
        self.deadline_kind = LINGER
        self.deadline = time.monotonic() + LINGER_TIMEOUT

    def abort(self) -> None:
        """Cut the connection: a response was started and cannot be finished."""
        self.closed = True
        self.transport.close()

    def close(self) -> None:
        self.closed = True
        self.transport.close()
        if self.tunnel is not None:
            self.tunnel_closed_by_client()

    def tunnel_closed_by_client(self) -> None:
        conn = self.tunnel
        if conn is not None:
            self.tunnel = None
            conn.tunnel = None
            conn.inst.upgraded -= 1
            conn.inst.last_activity = time.monotonic()
            conn.close()
