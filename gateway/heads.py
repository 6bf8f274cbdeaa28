"""Plain request and response heads: the data plane's fast-path checks, one call each.

The data plane takes the common request (one whole HTTP/1.1 head in one read, a plain Host,
nothing the gateway acts on) and relays the common response (HTTP/1.1, a status with a body, one
plain Content-Length, nothing hop-by-hop) without per-header Python callbacks. Whether a head is
plain is decided here, in one call:

- `plain_request(data, max_size, forwarded)` -> (method, target, host, forward_head) or None.
  `host` is the Host value lowercased; `forward_head` is `data` minus its final CRLF, plus
  `forwarded` (the connection's X-Forwarded-* block, ending "X-Forwarded-Host: "), `host` and
  the empty line: exactly the bytes the parsing path forwards for the same request.
- `response_head(data)` -> (body_at, content_length) or None: where the body of a plain
  response head at the start of `data` starts, and how long it is.
- `plain_response(data)` -> what the relay needs of that, as one int (no tuple to build and
  unpack on every response): `content_length - (len(data) - body_at)`, the body bytes still to
  come after this read (0: the response is complete; negative: `data` holds bytes past it).

None means "not plain": the caller takes the httptools parsing path, which handles every other
request and response and answers 400 / 502 for malformed ones. So a classifier may refuse more
than it must (only speed is lost) but must never accept a head the parsing path would refuse, nor
disagree with it about method, target, Host or length.

Two implementations keep that promise. `plain_request_py` / `plain_response_py` are the
reference: a regex scan for the headers that matter, then llhttp in strict mode (httptools with
no callbacks) over the whole head. gateway/_heads.c does the same in one pass over the bytes with
a whitelist grammar narrower than llhttp's, at a fraction of the instructions; it is used when
built (`pip install -e .` builds it) and tests/test_heads.py checks it against the reference on
many ordinary and hostile heads.
"""

from __future__ import annotations

import os
import re

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser, HttpResponseParser

_NO_CALLBACKS = object()  # a protocol with no callbacks: llhttp validates, Python is not called

# Run over the lowercased head. Every header line starts right after "\n" (llhttp's strict mode
# refuses bare LF and obs-fold), so one scan sees every header name: a Host with a plain value
# yields that value; the empty line that ends the head, and any header that needs the parsing
# path (framing, hop-by-hop, forwarded, Expect, an unusual Host, and the twins of those names
# with "_" for "-", which the parsing path drops), yield b"". The pattern starts
# with a literal "\n" so the regex engine jumps from line to line.
_PLAIN_SCAN = re.compile(
    rb"\n(?:\r\n|host:[ \t]*([!-~]+)\r|proxy[-_][^:\r\n]*:"
    rb"|(?:host|content[-_]length|transfer[-_]encoding|connection|keep[-_]alive|te|trailer"
    rb"|upgrade|expect|x[-_]forwarded[-_](?:for|host|proto)|forwarded)[ \t]*:)"
)
# One scan over a response head: a plain Content-Length yields its digits; a header that sends
# the response down the parsing path (hop-by-hop, Transfer-Encoding, an odd Content-Length)
# yields b"".
_RAW_SCAN = re.compile(
    rb"\n(?:content-length:[ \t]*([0-9]{1,15})[ \t]*\r|proxy-[^:\r\n]*:"
    rb"|(?:content-length|connection|keep-alive|te|trailer|transfer-encoding|upgrade)[ \t]*:)",
    re.IGNORECASE,
)
# Status lines taken, up to the space before the reason: HTTP/1.1 and a status with a body (not
# 1xx, 204 or 304).
_RAW_STATUS = frozenset(
    b"HTTP/1.1 %d " % code for code in range(200, 600) if code not in (204, 304)
)
# A byte RFC 9112 does not allow in a reason phrase (only HTAB, SP, VCHAR and obs-text): llhttp
# refuses a bare CR or LF there but takes every other control byte, NUL included, which a client
# must never be sent. gateway/_heads.c refuses exactly these.
_REASON_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def reason_ok(reason: bytes) -> bool:
    """Whether a reason phrase holds only bytes RFC 9112 allows there. For the parsing path,
    which builds the head it relays from what llhttp hands `on_status`, and so must refuse (502)
    what llhttp lets through."""
    return _REASON_CTL.search(reason) is None


def plain_request_py(
    data: bytes, max_size: int, forwarded: bytes
) -> tuple[bytes, bytes, bytes, bytes] | None:
    """The reference classifier for request heads (see the module docstring)."""
    if data[-3:] != b"\n\r\n" or len(data) > max_size:
        return None  # not ending in an empty line (or too big: parsing path, then 431)
    try:
        method, url, rest = data.split(b" ", 2)
        if url[0] != 47 or data[0] < 65:  # origin-form ("/"); no CR or LF before the method
            return None
        # The last match is the empty line at the end (data ends "\n\r\n"), and the only one:
        # the head ends exactly where this read does. The other is Host, if plain.
        host, _ = _PLAIN_SCAN.findall(data.lower())
    except (ValueError, IndexError):
        return None  # not three parts, an empty target, a special header, two empty lines
    if not host or rest[:10] != b"HTTP/1.1\r\n":
        return None
    if data.find(b"\r\n\r\n") != len(data) - 4:
        # The head ends before this read does: "...\r\n\r\n\r\n" has one "\n\r\n" for the
        # scan but a stray CRLF after the head (which llhttp skips as the start of the next
        # message). Taken, it would put the X-Forwarded-* lines after the empty line: a second
        # request on the upstream connection. (The fast path before gateway/_heads.c did that.)
        return None
    try:
        HttpRequestParser(_NO_CALLBACKS).feed_data(data)
    except (HttpParserError, HttpParserUpgrade):  # Upgrade: CONNECT (405 on the other path)
        return None
    return method, url, host, data[:-2] + forwarded + host + b"\r\n\r\n"


def response_head_py(data: bytes) -> tuple[int, int] | None:
    """The reference classifier for response heads (see the module docstring)."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or data[:13] not in _RAW_STATUS:
        return None
    if _REASON_CTL.search(data, 13, data.find(b"\r\n", 13)):
        return None  # taken by llhttp, but relayed as received it would reach the client
    try:
        # From 12: "HTTP/1.1 NNN" holds no line break, so the status line's own "\n" and every
        # header line after it are scanned.
        (length_digits,) = _RAW_SCAN.findall(data, 12, end + 2)
    except ValueError:
        return None  # no Content-Length, or a second one, or a hop-by-hop header
    if not length_digits:
        return None
    try:
        HttpResponseParser(_NO_CALLBACKS).feed_data(data[: end + 4])
    except (HttpParserError, HttpParserUpgrade):
        return None
    return end + 4, int(length_digits)


def plain_response_py(data: bytes) -> int | None:
    """`response_head_py`, as the one int the relay needs (see the module docstring)."""
    head = response_head_py(data)
    if head is None:
        return None
    body_at, length = head
    return length - (len(data) - body_at)


# DORM_PURE_PYTHON_HEADS=1 uses the reference even when the extension is built: the test suite
# runs the data plane's fast-path tests that way too, so the fallback cannot rot.
try:
    if os.environ.get("DORM_PURE_PYTHON_HEADS"):
        raise ImportError("DORM_PURE_PYTHON_HEADS is set")
    from gateway._heads import plain_request, plain_response, response_head
except ImportError:  # the C extension is not built: same answers, more instructions
    plain_request, plain_response = plain_request_py, plain_response_py
    response_head = response_head_py
    COMPILED = False
else:
    COMPILED = True
