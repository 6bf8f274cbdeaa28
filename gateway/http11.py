"""HTTP/1.1 constants and canned responses shared by the data plane.

Everything here is precomputed bytes: the hot path only looks things up and concatenates.
"""

from __future__ import annotations

from http import HTTPStatus

# Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus the proxy's own concerns.
# The gateway re-frames bodies itself, so Transfer-Encoding and Content-Length are handled apart.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"})

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_REASONS[431] = b"Request Header Fields Too Large"

CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"


def reason(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def error_response(
    status: int,
    message: str,
    *,
    close: bool = True,
    retry_after: int | None = None,
    head_only: bool = False,
) -> bytes:
    """A complete, well-formed plain-text error response.

    Errors are text, not JSON, because the data plane's clients are browsers and curl; the message
    is one line that says what went wrong and, where it helps, what to do.
    """
    body = message.encode("utf-8", "replace") + b"\n"
    parts = [
        b"HTTP/1.1 %d %s\r\n" % (status, reason(status)),
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(body),
        b"Cache-Control: no-store\r\n",
        b"X-Dorm-Error: 1\r\n",
    ]
    if retry_after is not None:
        parts.append(b"Retry-After: %d\r\n" % retry_after)
    parts.append(b"Connection: close\r\n\r\n" if close else b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)
