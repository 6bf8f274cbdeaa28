"""The upstream side of the proxy: one keep-alive HTTP/1.1 connection to an instance's Unix socket.

It parses the app's response with httptools and re-frames it for the client: Content-Length
bodies pass through, chunked bodies are re-chunked, close-delimited bodies become chunked for
HTTP/1.1 clients (so their connection survives) and stay close-delimited for HTTP/1.0 clients.
Writes to the client are batched per upstream read (one syscall instead of head + body), and
flushed before a response completes so pipelined responses can never be reordered.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Final

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from gateway import heads
from gateway.heads import reason_ok
from gateway.http11 import HOP_BY_HOP, LAST_CHUNK
from gateway.proxy import IDLE

if TYPE_CHECKING:
    from gateway.instance import Instance
    from gateway.proxy import ClientConnection, Exchange

# Called on every response: bound here, Final (a C static when compiled, see gateway/proxy.py).
monotonic: Final = time.monotonic
plain_response: Final = heads.plain_response
# Body framing towards the client.
NONE: Final = 0
LENGTH: Final = 1
CHUNKED: Final = 2
CLOSE: Final = 3
_RESP_SPECIAL = HOP_BY_HOP | {b"content-length"}


class _Unsolicited(Exception):
    """Raised from on_message_begin: a response starts after the one asked for has ended, in
    the same read (the gateway never pipelines requests to an app, so nobody asked for it)."""


class UpstreamConnection:
    __slots__ = (
        "_1xx",
        "_close_delimited",
        "_done",
        "_framing",
        "_head_response",
        "_head_size",
        "_in_head",
        "_keep_alive",
        "_parts",
        "_reason",
        "_remaining",
        "_switching",
        "_upgrade_value",
        "_wbuf",
        "closed",
        "exchange",
        "first_byte",
        "inst",
        "parser",
        "reading_paused",
        "received",
        "served",
        "transport",
        "tunnel",
        "write_paused",
    )

    def __init__(self, inst: Instance) -> None:
        self.inst = inst
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.closed = False
        # The readiness probe's connection, which carries the request that woke the instance:
        # the instance notes when the first response bytes have been relayed (cold-start timing).
        self.first_byte = False
        self.tunnel: ClientConnection | None = None
        self.reading_paused = False
        self.write_paused = False
        self.served = 0  # responses completed on this connection
        self._remaining = -1  # raw fast path: body bytes still to relay (-1: not in one)
        self.received = False  # any byte of the current response seen
        self._wbuf: list[bytes] = []
        self._parts: list[bytes] = []
        self._reason = b""
        self._framing = NONE
        self._keep_alive = True
        self._close_delimited = False
        self._head_response = False
        # Reads spent wholly inside a head (or trailers), against max_header_size: llhttp sets
        # no limit, and httptools keeps a header line until it ends.
        self._head_size = 0
        self._in_head = False
        self._1xx = False
        self._done = False  # the response ended inside feed_data: completed once that returns
        self._switching = False
        self._upgrade_value = b""

    # -- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.first_byte:
            self.first_byte = False
            self.data_received(data)
            inst = self.inst
            if inst.first_byte_pending:
                inst.first_byte_relayed()
            return
        if self.tunnel is not None:
            self.tunnel.transport.write(data)
            return
        ex = self.exchange
        if ex is None:
            self.close()  # bytes nobody asked for: this connection cannot be trusted any more
            return
        if self._remaining >= 0:
            self._raw_body(ex, data)
            return
        if not self.received:
            # The first bytes of a response. The common one (HTTP/1.1, a status with a body,
            # exactly one plain Content-Length, no hop-by-hop header, to an HTTP/1.1 request
            # that is neither HEAD nor an upgrade) needs no rewriting: its bytes go to the
            # client as they came (usually one write, no copy) and counting body bytes finds
            # its end. gateway/heads.py decides that in one call, validating the whole head at
            # least as strictly as llhttp does: a head it refuses (two lengths, obs-fold, bare
            # CR or LF, NUL...) takes the httptools path below, which answers 502 for malformed
            # responses, so a tenant cannot desynchronise a client. Inlined here rather than a
            # method of its own: this runs once per request, and a Python call costs.
            remaining = plain_response(data) if ex.raw_response else None
            if remaining is not None:
                client = ex.client
                keep = ex.keep_alive and ex.request_done and not client.plane.draining
                # ex.keep_client and ex.head_sent are set below only where someone reads them
                # again: not when the exchange ends right here (two stores a request).
                if keep and remaining >= 0:
                    client.transport.write(data)
                else:
                    # Bytes past the body, or the client's connection closes after this: cut
                    # at the body's end (the first CRLFCRLF is the head's: it was validated).
                    body_at = data.find(b"\r\n\r\n") + 4
                    body_end = len(data) + min(remaining, 0)
                    end = b"\r\n" if keep else b"Connection: close\r\n\r\n"
                    client.transport.write(data[: body_at - 2] + end + data[body_at:body_end])
                if remaining > 0:
                    ex.keep_client = keep
                    ex.head_sent = True
                    self.received = True
                    self._remaining = remaining
                    self._framing = LENGTH  # for _complete at the end of the body (no last chunk)
                    client.deadline = monotonic() + client.plane.upstream_timeout
                    return
                # _complete, inlined for the common case (nothing buffered, not chunked). Bytes
                # past the body are something the app should not have sent: that connection is
                # not reused.
                self.exchange = None
                self.served += 1
                if self.write_paused:
                    client.resume(1)
                if client.write_paused:
                    self.resume()
                ex.upstream = None
                now = monotonic()
                self.inst.release(self, remaining == 0 and ex.request_done, now)
                # ClientConnection.response_done, inlined for its common case: the client's
                # connection stays open (`keep` covers keep-alive and draining; a raw response
                # is never to an upgrade) and waits idle for its next request.
                if (
                    keep
                    and client.active is ex
                    and client.parsing is None
                    and not (client.pending or client.eof)
                ):
                    client.active = None
                    client.deadline_kind = IDLE
                    client.deadline = now + client.plane.keepalive_timeout
                else:
                    ex.keep_client = keep
                    ex.head_sent = True
                    client.response_done(ex)
                return
            self.received = True
        client = ex.client
        client.deadline = monotonic() + client.plane.upstream_timeout
        in_head = self._in_head
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self._flush()
            if self.exchange is not None:
                self.exchange.client.start_tunnel(self, data[exc.args[0] :])
            return
        except HttpParserError as exc:
            if self._done:
                # The response was complete; what followed it in this read (another response,
                # garbage) was not asked for: relay the response, never reuse the connection.
                self._done = self._head_response = False
                self._complete(False)
                return
            self._flush()
            cause = exc.__context__  # what a callback raised, rather than "User callback error"
            self.fail(
                f"the app sent an invalid response: "
                f"{cause if isinstance(cause, HttpParserError) else exc}"
            )
            return
        if in_head and self._in_head:
            self._head_size += len(data)  # the whole read was head (or trailer) bytes
            if self._head_size > client.plane.max_header_size:
                self._flush()
                limit = client.plane.max_header_size
                self.fail(f"the app sent a response head larger than {limit} bytes")
                return
        if self._done:
            # Completed here, not in on_message_complete: completing hands the connection to the
            # next request (this client's pipelined one, or another client's queued one), which
            # must not see bytes of this read that llhttp has not parsed yet.
            self._done = False
            if self._head_response:
                self._head_response = False
                self.parser = HttpResponseParser(self)  # see on_headers_complete
            self._complete(self._keep_alive)
            return
        if self._wbuf:
            self._flush()
        if self._switching and self.exchange is not None:
            self.exchange.client.start_tunnel(self, b"")

    # -- the raw fast path: the rest of a plain response's body ------------------------------
    def _raw_body(self, ex: Exchange, data: bytes) -> None:
        remaining = self._remaining
        size = len(data)
        client = ex.client
        if size < remaining:
            client.transport.write(data)
            self._remaining = remaining - size
            client.deadline = monotonic() + client.plane.upstream_timeout
            return
        body = data if size == remaining else data[:remaining]
        client.transport.write(body)
        self._remaining = -1
        self._complete(size == remaining)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.inst.connection_closed(self)
        if self.tunnel is not None:
            self.tunnel.tunnel_closed()
            return
        ex = self.exchange
        if ex is None:
            return
        if ex.head_sent and self._close_delimited:
            self._complete(False)  # EOF is how this response ends
        elif self.served and not self.received and ex.retryable():
            # The app closed a pooled keep-alive connection just as we reused it: nothing was
            # answered, and the request is safe to repeat, so send it on another connection.
            self.exchange = None
            ex.upstream = None
            now = monotonic()
            self.inst.release(self, False, now)
            self.inst.acquire(ex, now)
        else:
            self.fail("")

    def pause_writing(self) -> None:
        self.write_paused = True
        peer = self.tunnel or (self.exchange.client if self.exchange else None)
        if peer is not None:
            peer.pause(1)

    def resume_writing(self) -> None:
        self.write_paused = False
        peer = self.tunnel or (self.exchange.client if self.exchange else None)
        if peer is not None:
            peer.resume(1)

    # -- flow control from the client side --------------------------------------------------------
    def pause(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    # -- sending ----------------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    # -- httptools callbacks (response) -----------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._done:
            raise _Unsolicited
        self._parts = []
        self._reason = b""
        self._in_head = True
        self._upgrade_value = b""
        self._framing = NONE
        self._close_delimited = False
        self._1xx = False

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_chunk_header(self) -> None:
        self._in_head = True  # until its data: if it was the last chunk, trailers follow

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname in _RESP_SPECIAL:
            if lname == b"content-length":
                self._framing = LENGTH
                self._parts.append(name + b": " + value + b"\r\n")
            elif lname == b"transfer-encoding":
                # Only "chunked", once (as nginx): another coding would reach the client with
                # its name dropped from the head, and a list not ending in chunked makes the
                # body close-delimited (RFC 9112 §6.3), which would be relayed as chunked.
                if self._framing == CHUNKED or value.strip().lower() != b"chunked":
                    raise HttpParserError(f"unsupported Transfer-Encoding {value[:100]!r}")
                self._framing = CHUNKED
            elif lname == b"upgrade":
                self._upgrade_value = value
            return
        self._parts.append(name + b": " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_size = 0
        ex = self.exchange
        if ex is None:
            return
        status = self.parser.get_status_code()
        if not reason_ok(self._reason):
            # llhttp takes NUL and other control bytes in a reason phrase; relayed, they would
            # reach a client whose HTTP stack may truncate or choke on them.
            raise HttpParserError("a control byte in the reason phrase")
        if status < 200 and status != 101:
            # An interim response. 100 Continue is the gateway's to send (it answers Expect
            # itself); others (103 Early Hints) are relayed, to HTTP/1.1 clients only (RFC 9110
            # §15.2). It has no body: one that says otherwise is refused in on_body.
            self._1xx = True
            if status != 100 and not ex.http10:
                self._wbuf.append(
                    b"".join(
                        [
                            b"HTTP/1.1 %d %s\r\n" % (status, self._reason or b"Status"),
                            *self._without_length(),
                            b"\r\n",
                        ]
                    )
                )
            return
        client = ex.client
        self._keep_alive = self.parser.should_keep_alive()
        head = [b"HTTP/1.1 %d %s\r\n" % (status, self._reason or b"Status"), *self._parts]
        if status == 101:
            if not ex.upgrade:
                raise HttpParserError("101 Switching Protocols to a request that asked for none")
            self._switching = True
            head.append(b"Connection: upgrade\r\nUpgrade: " + self._upgrade_value + b"\r\n\r\n")
            self._wbuf.append(b"".join(head))
            ex.head_sent = True
            return
        if ex.method == b"HEAD" or status in (204, 304):
            framing = NONE
        elif self._framing == LENGTH:
            framing = LENGTH
        else:
            self._close_delimited = self._framing == NONE
            framing = CLOSE if ex.http10 else CHUNKED
            if framing == CHUNKED:
                head.append(b"Transfer-Encoding: chunked\r\n")
        self._framing = framing
        ex.keep_client = (
            ex.keep_alive
            and ex.request_done
            and framing != CLOSE
            and not ex.upgrade
            and not client.plane.draining
        )
        if not ex.keep_client:
            head.append(b"Connection: close\r\n")
        elif ex.http10:
            head.append(b"Connection: keep-alive\r\n")
        head.append(b"\r\n")
        self._wbuf.append(b"".join(head))
        ex.head_sent = True
        if ex.method == b"HEAD":
            # httptools cannot be told a response has no body: it would wait for
            # Content-Length bytes. So the response ends here: the exchange completes once
            # feed_data returns (as any response does, see data_received), bytes after the head
            # in this read are not relayed (on_body) and make the connection unusable, and the
            # next response gets a fresh parser.
            self._head_response = self._done = True

    def _without_length(self) -> list[bytes]:
        """The header lines minus Content-Length, for an interim response (it has no body
        whatever it says, and a client trusting it would read the final response as one)."""
        return [p for p in self._parts if p[:15].lower() != b"content-length:"]

    def on_body(self, data: bytes) -> None:
        self._in_head = False
        self._head_size = 0
        if self.exchange is None:
            return
        if self._1xx:
            raise HttpParserError("a body in an interim (1xx) response")
        if self._head_response:
            self._keep_alive = False  # an app that sends a body after HEAD is out of sync
            return
        if self._framing == CHUNKED:
            self._wbuf.append(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self._wbuf.append(data)

    def on_message_complete(self) -> None:
        self._in_head = False
        self._head_size = 0
        if self._1xx:
            self._1xx = False
            return
        if self.exchange is None or self._switching or self._head_response:
            return  # after a 101 the tunnel starts where httptools raises HttpParserUpgrade
        self._done = True  # completed when feed_data returns (see data_received)

    # -- ending a response ------------------------------------------------------------------------
    def _flush(self) -> None:
        ex = self.exchange
        if self._wbuf and ex is not None:
            ex.client.transport.write(b"".join(self._wbuf))
        self._wbuf.clear()

    def _complete(self, reusable: bool) -> None:
        ex = self.exchange
        assert ex is not None
        if self._framing == CHUNKED:
            self._wbuf.append(LAST_CHUNK)
        if self._wbuf:
            self._flush()
        self.exchange = None
        self.served += 1
        self.received = False
        if self.write_paused:
            ex.client.resume(1)
        if ex.client.write_paused:
            self.resume()
        ex.upstream = None
        self.inst.release(self, reusable and ex.request_done, monotonic())
        ex.client.response_done(ex)

    def fail(self, message: str) -> None:
        """The response cannot be completed: tell the client if we still can, else cut it off."""
        ex = self.exchange
        self.exchange = None
        self._wbuf.clear()
        self.close()
        if ex is None:
            return
        ex.upstream = None
        self.inst.release(self, False, monotonic())
        if ex.head_sent:
            ex.client.abort()
        elif message:
            ex.client.upstream_failed(ex, message)
        else:
            self.inst.upstream_lost(
                lambda reason: ex.client.upstream_failed(ex, reason),
                "the app closed the connection before answering",
            )
