"""A small synchronous admin API client (h11 over a plain socket), used by the CLI and tests.

Synchronous on purpose: the CLI does one or two requests and exits, and a blocking socket with a
timeout is the simplest thing that cannot hang. Every failure — connection refused, timeout, an
error answer — becomes an `AdminError` whose message is one readable line.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable, Iterator
from typing import IO, Any
from urllib.parse import quote, urlsplit

import h11
import orjson

MAX_RESPONSE = 64 * 1024 * 1024
_READ_SIZE = 64 * 1024
_UPLOAD_CHUNK = 256 * 1024
# How long an upload waits for `100 Continue` before sending the body anyway.
_CONTINUE_WAIT = 2.0


class AdminError(Exception):
    """A failed admin call. `status` is the HTTP status (None if no answer), `field` the
    field the server blamed, if any."""

    def __init__(self, message: str, status: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


class _Timeout(AdminError):
    """No answer in time: never retried, since the server may have acted on the request."""


def path_quote(segment: str) -> str:
    """Quote one path segment so a stray '/' or '?' in a name cannot change the route."""
    return quote(segment, safe="")


def error_message(status: int, body: Any) -> AdminError:
    """Turn an error answer into one readable line naming the field, as the server reported it."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and err.get("message"):
        field = err.get("field")
        text = f"{field}: {err['message']}" if field else str(err["message"])
        return AdminError(f"{text} (HTTP {status})", status, field)
    return AdminError(f"the admin API answered HTTP {status}", status)


class AdminClient:
    """Talks to one admin API. Keeps its connection alive between calls; not thread-safe."""

    def __init__(self, url: str, token: str | None, timeout: float = 10.0) -> None:
        split = urlsplit(url if "://" in url else f"http://{url}")
        if split.scheme != "http":
            raise AdminError(
                f"admin URL {url!r}: only http:// is supported (put TLS in front of the admin API)"
            )
        try:
            port = split.port or 80
        except ValueError:
            raise AdminError(f"admin URL {url!r}: bad port") from None
        if not split.hostname:
            raise AdminError(f"admin URL {url!r}: no host")
        self.url = url
        self.host = split.hostname
        self.port = port
        self.prefix = split.path.rstrip("/")
        # A token read from a file or a variable often ends in a newline, which no header may
        # hold: strip it, as the gateway strips its own; anything else unsendable is refused.
        token = token.strip() if token else token
        if token and not all(33 <= ord(c) <= 126 for c in token):
            raise AdminError("the admin token must be visible ASCII without spaces")
        self.token = token
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._conn: h11.Connection | None = None
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._host_header = f"{host}:{port}"

    # -- connection ----------------------------------------------------------------------------
    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None
        self._conn = None

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> tuple[socket.socket, h11.Connection]:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except TimeoutError:
            raise AdminError(f"cannot reach the admin API at {self.url}: timed out") from None
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise AdminError(f"cannot reach the admin API at {self.url}: {reason}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self._conn = sock, h11.Connection(h11.CLIENT)
        return sock, self._conn

    def _headers(self, body: bytes | None) -> list[tuple[str, str]]:
        headers = [("host", self._host_header), ("user-agent", "dorm-cli")]
        if self.token:
            headers.append(("authorization", f"Bearer {self.token}"))
        if body is not None:
            headers += [("content-type", "application/json"), ("content-length", str(len(body)))]
        return headers

    def _next_event(self, sock: socket.socket, conn: h11.Connection) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = sock.recv(_READ_SIZE)
            except TimeoutError:
                raise _Timeout(f"the admin API at {self.url} did not answer in time") from None
            except OSError as exc:
                raise AdminError(f"connection to {self.url} failed: {exc.strerror}") from None
            conn.receive_data(data)

    def _send_request(self, method: str, path: str, body: bytes | None) -> h11.Response:
        """Send a request and read the response head, on a reused or a fresh connection.

        A kept-alive connection the server has meanwhile closed fails before any answer
        arrives; only then is the request retried, once, on a new connection.
        """
        target = self.prefix + path
        for attempt in (0, 1):
            reused = self._sock is not None and attempt == 0
            if self._sock is None or self._conn is None:
                self._connect()
            sock, conn = self._sock, self._conn
            assert sock is not None and conn is not None
            try:
                data = conn.send(
                    h11.Request(method=method, target=target, headers=self._headers(body))
                )
                if body:
                    data += conn.send(h11.Data(data=body))
                data += conn.send(h11.EndOfMessage())
                sock.sendall(data)
                event = self._next_event(sock, conn)
                while isinstance(event, h11.InformationalResponse):
                    event = self._next_event(sock, conn)
            except _Timeout:
                self.close()
                raise
            except (h11.RemoteProtocolError, AdminError, OSError) as exc:
                self.close()
                if reused:
                    continue  # the server closed the idle connection; try a fresh one
                if isinstance(exc, AdminError):
                    raise
                raise AdminError(f"bad answer from the admin API at {self.url}: {exc}") from None
            if isinstance(event, h11.Response):
                return event
            self.close()
            if not reused:
                break
        raise AdminError(f"the admin API at {self.url} closed the connection")

    def _read_body(self) -> bytes:
        sock, conn = self._sock, self._conn
        assert sock is not None and conn is not None
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                event = self._next_event(sock, conn)
                if isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > MAX_RESPONSE:
                        raise AdminError(f"answer from {self.url} larger than {MAX_RESPONSE}")
                    chunks.append(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    raise AdminError(f"the admin API at {self.url} closed the connection")
        except h11.RemoteProtocolError as exc:
            self.close()
            raise AdminError(f"bad answer from the admin API at {self.url}: {exc}") from None
        except AdminError:
            self.close()
            raise
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            self.close()
        return b"".join(chunks)

    # -- API -------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any | None = None) -> tuple[int, Any]:
        """Send one request (JSON body if given) and return (status, decoded JSON answer)."""
        payload = None if body is None else orjson.dumps(body)
        response = self._send_request(method, path, payload)
        raw = self._read_body()
        return response.status_code, _decode(response, raw, self.url)

    def call(self, method: str, path: str, body: Any | None = None) -> Any:
        """Like `request`, but any status >= 400 raises AdminError with the server's reason."""
        status, answer = self.request(method, path, body)
        if status >= 400:
            raise error_message(status, answer)
        return answer

    def upload(
        self,
        path: str,
        body: IO[bytes],
        size: int,
        *,
        headers: Iterable[tuple[str, str]] = (),
        timeout: float = 600.0,
    ) -> tuple[int, Any]:
        """PUT `size` bytes read from `body` (streamed, never whole in memory) to `path`, and
        return (status, decoded JSON answer).

        Sends `Expect: 100-continue`, so a refusal that needs no body (bad token, unknown app,
        too large) comes back before anything is uploaded. `timeout` bounds the wait for the
        answer once the body is sent: the server validates and unpacks before it answers.
        """
        self.close()  # a fresh connection: nothing left over can be mistaken for our answer
        sock, conn = self._connect()
        head = [
            *self._headers(None),
            ("content-type", "application/octet-stream"),
            ("content-length", str(size)),
            ("expect", "100-continue"),
            *headers,
        ]
        try:
            sock.sendall(
                conn.send(h11.Request(method="PUT", target=self.prefix + path, headers=head))
            )
            early = self._await_continue(sock, conn)
            if early is None:
                self._send_body(sock, conn, body, size)
                sock.settimeout(timeout)
                event = self._next_event(sock, conn)
                while isinstance(event, h11.InformationalResponse):
                    event = self._next_event(sock, conn)
                if not isinstance(event, h11.Response):
                    raise AdminError(f"the admin API at {self.url} closed the connection")
                early = event
            raw = self._read_body()
        except h11.ProtocolError as exc:
            raise AdminError(f"upload to {self.url} failed: {exc}") from None
        finally:
            self.close()
        return early.status_code, _decode(early, raw, self.url)

    def _await_continue(self, sock: socket.socket, conn: h11.Connection) -> h11.Response | None:
        """Wait briefly for `100 Continue`; a final answer instead means the server refused."""
        sock.settimeout(_CONTINUE_WAIT)
        try:
            event = self._next_event(sock, conn)
        except _Timeout:
            return None  # an old server or proxy that does not answer 100: send anyway
        finally:
            sock.settimeout(self.timeout)
        if isinstance(event, h11.InformationalResponse):
            return None
        if isinstance(event, h11.Response):
            return event
        raise AdminError(f"the admin API at {self.url} closed the connection")

    def _send_body(
        self, sock: socket.socket, conn: h11.Connection, body: IO[bytes], size: int
    ) -> None:
        sent = 0
        try:
            while sent < size:
                chunk = body.read(min(_UPLOAD_CHUNK, size - sent))
                if not chunk:
                    raise AdminError(f"the upload ended after {sent} of {size} bytes")
                sock.sendall(conn.send(h11.Data(data=chunk)))
                sent += len(chunk)
            sock.sendall(conn.send(h11.EndOfMessage()))
        except (BrokenPipeError, ConnectionResetError):
            # The server answered early and closed (say, 413): its answer may still be readable.
            return

    def stream(self, path: str, *, idle_timeout: float | None = None) -> Iterator[bytes]:
        """GET `path` and yield the body as it arrives; `idle_timeout` bounds each wait for data
        once the answer started (None: wait for as long as it takes, as `logs -f` wants).

        Used for `logs -f`: the stream ends when the server ends it; closing the iterator
        closes the connection, which tells the server to stop.
        """
        response = self._send_request("GET", path, None)
        if response.status_code >= 400:
            raw = self._read_body()
            try:
                answer = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                answer = None
            raise error_message(response.status_code, answer)
        sock, conn = self._sock, self._conn
        assert sock is not None and conn is not None
        sock.settimeout(idle_timeout)
        try:
            while True:
                event = self._next_event(sock, conn)
                if isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    return
                else:
                    raise AdminError(f"the admin API at {self.url} closed the stream")
        except h11.RemoteProtocolError as exc:
            raise AdminError(f"the log stream from {self.url} broke: {exc}") from None
        finally:
            self.close()


def _decode(response: h11.Response, raw: bytes, url: str) -> Any:
    """A response body as JSON (by its content type), text, or None if empty."""
    content_type = dict(response.headers).get(b"content-type", b"")
    if not raw:
        return None
    if content_type.startswith(b"application/json"):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise AdminError(f"the admin API at {url} sent invalid JSON") from None
    return raw.decode("utf-8", "replace")
