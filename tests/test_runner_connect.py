"""Interactive executions (Piston's WebSocket `/api/v2/connect`) end to end.

Real gateway, real runner service, real sandboxes, as tests/test_runner.py: every session is a
WebSocket through the gateway's public listener with `Host: run.localhost`, speaking Piston's
protocol (init, data, signal in; runtime, stage, data, exit, error out; Piston's close codes).
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from tests.conftest import Gateway
from tests.test_runner import (
    RUNNER_HOST,
    assert_healthy,
    runner_processes,
    sandbox_cgroups,
    start_runner_gateway,
    stop_gateway,
)
from tests.test_runner_limits import KEY, make_keyed

pytestmark = pytest.mark.skipif(
    __import__("os").geteuid() != 0, reason="the runner needs root (a sandbox per execution)"
)

# run_timeout is also the maximum a request may ask for: long enough to see a disconnect kill.
CONFIG = """
[runner]
rate_per_minute = 0
max_per_client = 0
run_timeout = "20s"
"""

ECHO = """
import sys
print("ready", flush=True)
for i, line in enumerate(sys.stdin):
    word = line.strip()
    if word == "bye":
        break
    print(f"echo {i}: {word}", file=sys.stdout if i % 2 == 0 else sys.stderr, flush=True)
sys.exit(3)
"""

SLEEPER = "import time\nprint('started', flush=True)\ntime.sleep(60)\n"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = start_runner_gateway(tmp_path_factory.mktemp("connect"), CONFIG)
    yield gateway
    stop_gateway(gateway)
    assert runner_processes() == []


class Client:
    """A Piston interactive client over one WebSocket."""

    def __init__(
        self, gw: Gateway, path: str = "/api/v2/connect", headers: dict[str, str] | None = None
    ) -> None:
        self.ws: ClientConnection = ws_connect(
            f"ws://{RUNNER_HOST}:{gw.port}{path}",
            sock=gw.connect(),
            open_timeout=10,
            max_size=None,
            additional_headers=headers,
        ).__enter__()  # the context manager form (websockets 17 warns otherwise); closed below

    def send(self, **message: Any) -> None:
        self.ws.send(json.dumps(message))

    def init(self, language: str, code: str, **fields: Any) -> None:
        self.send(type="init", language=language, version="*", files=[{"content": code}], **fields)

    def recv(self, timeout: float = 15.0) -> dict[str, Any]:
        message = json.loads(self.ws.recv(timeout=timeout))
        assert isinstance(message, dict)
        return message

    def expect(self, *shapes: dict[str, Any], timeout: float = 15.0) -> list[dict[str, Any]]:
        """The next messages, each checked against (a subset of) its shape."""
        got = []
        for shape in shapes:
            message = self.recv(timeout)
            assert {k: message.get(k) for k in shape} == shape, message
            got.append(message)
        return got

    def closed(self, timeout: float = 15.0) -> tuple[int | None, str, list[dict[str, Any]]]:
        """Read until the server closes: (close code, reason, the messages before it)."""
        messages = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                messages.append(json.loads(self.ws.recv(timeout=deadline - time.monotonic())))
        except ConnectionClosed as exc:
            assert exc.rcvd is not None, "closed without a close frame"
            return exc.rcvd.code, exc.rcvd.reason, messages

    def close(self) -> None:
        self.ws.close()


def wait_no_runner_processes(timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while runner_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runner_processes() == []


def test_interactive_echo_streams_in_order(gw: Gateway) -> None:
    c = Client(gw)
    c.init("python", ECHO)
    runtime, _, _ = c.expect(
        {"type": "runtime", "language": "python"},
        {"type": "stage", "stage": "run"},
        {"type": "data", "stream": "stdout", "data": "ready\n"},
    )
    assert runtime["version"].count(".") == 2
    # Lock-step: each answer arrives while the program is still running, on the right stream.
    for i, word in enumerate(["one", "two", "three", "four", "héllo ✓"]):
        c.send(type="data", stream="stdin", data=word + "\n")
        stream = "stdout" if i % 2 == 0 else "stderr"
        c.expect({"type": "data", "stream": stream, "data": f"echo {i}: {word}\n"})
    c.send(type="data", stream="stdin", data="bye\n")
    code, reason, messages = c.closed()
    assert (code, reason) == (4999, "Job Completed")
    assert len(messages) == 1, messages
    exit_ = messages[0]
    assert {k: exit_[k] for k in ("type", "stage", "code", "signal", "status")} == {
        "type": "exit",
        "stage": "run",
        "code": 3,
        "signal": None,
        "status": "RE",
    }
    assert exit_["wall_time"] >= 0 and exit_["memory"] > 0
    wait_no_runner_processes()


def test_piston_base_url_and_stdin_eof(gw: Gateway) -> None:
    """The emkc.org layout (`/api/v2/piston/connect`); `eof` (a dorm extension) closes stdin."""
    c = Client(gw, "/api/v2/piston/connect")
    c.init("bash", "tr a-z A-Z; echo done >&2")
    c.expect({"type": "runtime", "language": "bash"}, {"type": "stage", "stage": "run"})
    c.send(type="data", stream="stdin", data="abc\n")
    c.send(type="data", stream="stdin", data="xyz\n", eof=True)
    code, reason, messages = c.closed()
    assert (code, reason) == (4999, "Job Completed")
    out = "".join(m["data"] for m in messages if m.get("stream") == "stdout")
    err = "".join(m["data"] for m in messages if m.get("stream") == "stderr")
    assert (out, err) == ("ABC\nXYZ\n", "done\n")
    assert messages[-1] == {**messages[-1], "type": "exit", "stage": "run", "code": 0}


def test_exit_by_signal_and_client_signals(gw: Gateway) -> None:
    # The program's own signal.
    c = Client(gw)
    c.init("python", "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    code, _, messages = c.closed()
    assert code == 4999
    exit_ = messages[-1]
    assert (exit_["type"], exit_["code"], exit_["signal"], exit_["status"]) == (
        "exit",
        None,
        "SIGSEGV",
        "SG",
    )
    # SIGKILL from the client.
    c = Client(gw)
    c.init("python", SLEEPER)
    c.expect({"type": "runtime"}, {"type": "stage"}, {"type": "data", "data": "started\n"})
    started = time.monotonic()
    c.send(type="signal", signal="SIGKILL")
    code, reason, messages = c.closed()
    assert time.monotonic() - started < 5
    assert (code, reason) == (4999, "Job Completed")
    assert [(m["type"], m["code"], m["signal"]) for m in messages] == [("exit", None, "SIGKILL")]
    # A signal the program handles: it reaches the program itself, which carries on.
    c = Client(gw)
    c.init(
        "python",
        # os.write and os._exit: a print in the handler could land inside the main print's
        # flush (a reentrant call Python refuses).
        "import os, signal, time\n"
        "signal.signal(signal.SIGUSR1, lambda *a: (os.write(1, b'got USR1\\n'), os._exit(7)))\n"
        "print('waiting', flush=True)\n"
        "time.sleep(60)\n",
    )
    c.expect({"type": "runtime"}, {"type": "stage"}, {"type": "data", "data": "waiting\n"})
    c.send(type="signal", signal="SIGUSR1")
    c.expect({"type": "data", "stream": "stdout", "data": "got USR1\n"})
    code, _, messages = c.closed()
    assert code == 4999
    assert [(m["type"], m["code"], m["signal"]) for m in messages] == [("exit", 7, None)]
    wait_no_runner_processes()


def test_run_timeout(gw: Gateway) -> None:
    c = Client(gw)
    c.init("python", SLEEPER, run_timeout=500)
    c.expect({"type": "runtime"}, {"type": "stage"}, {"type": "data", "data": "started\n"})
    code, reason, messages = c.closed()
    assert (code, reason) == (4999, "Job Completed")
    exit_ = messages[-1]
    assert (exit_["type"], exit_["signal"], exit_["status"], exit_["message"]) == (
        "exit",
        "SIGKILL",
        "TO",
        "Time limit exceeded (wall clock)",
    )
    assert 400 <= exit_["wall_time"] < 3000
    # Above the configured maximum: Piston's validation error, then 4002.
    c = Client(gw)
    c.init("python", SLEEPER, run_timeout=60000)
    code, reason, messages = c.closed()
    assert (code, reason) == (4002, "Notified Error")
    assert messages == [
        {"type": "error", "message": "run_timeout cannot exceed the configured limit of 20000"}
    ]


def test_output_cap(gw: Gateway) -> None:
    c = Client(gw)
    c.init("python", "import sys\nsys.stdout.write('x' * 200_000)\n")
    code, _, messages = c.closed()
    assert code == 4999
    out = "".join(m["data"] for m in messages if m["type"] == "data")
    assert out == "x" * 65536
    assert messages[-1]["status"] == "OL"


@pytest.mark.parametrize("how", ["drop", "close"])
def test_client_going_away_kills_the_program(gw: Gateway, how: str) -> None:
    c = Client(gw)
    c.init("python", SLEEPER)
    c.expect({"type": "runtime"}, {"type": "stage"}, {"type": "data", "data": "started\n"})
    assert runner_processes() != []
    started = time.monotonic()
    if how == "close":
        c.close()  # a close frame
    else:
        c.ws.socket.shutdown(socket.SHUT_RDWR)  # the TCP connection just goes
        c.ws.socket.close()
    wait_no_runner_processes(10)
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 10
    while sandbox_cgroups(gw) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_cgroups(gw) == []
    assert_healthy(gw)


def test_protocol_misuse_closes_with_pistons_codes(gw: Gateway) -> None:
    cases: list[tuple[list[Any], int, str, list[dict[str, Any]]]] = [
        ([{"type": "data", "stream": "stdin", "data": "x"}], 4003, "Not yet initialized", []),
        ([{"type": "signal", "signal": "SIGKILL"}], 4003, "Not yet initialized", []),
        (["{not json"], 4002, "Notified Error", []),
        ([[1, 2]], 4002, "Notified Error", []),
        ([{"type": "shout"}], 4002, "Notified Error", []),
        (
            [{"type": "init", "language": "cobol", "version": "*", "files": [{"content": "x"}]}],
            4002,
            "Notified Error",
            [{"type": "error", "message": "cobol-* runtime is unknown"}],
        ),
        ([{"type": "init", "language": "python"}], 4002, "Notified Error", []),
    ]
    for messages, want_code, want_reason, want_messages in cases:
        c = Client(gw)
        for m in messages:
            c.ws.send(m if isinstance(m, str) else json.dumps(m))
        code, reason, got = c.closed()
        assert (code, reason) == (want_code, want_reason), messages
        if want_code == 4002:
            assert len(got) == 1 and got[0]["type"] == "error", got
            assert isinstance(got[0]["message"], str) and got[0]["message"]
        if want_messages:
            assert got == want_messages
    # Double init, wrong stream, invalid signal: while a program runs (and it is killed).
    for second, want in [
        ({"type": "init", "language": "python", "version": "*", "files": [{"content": ""}]}, 4000),
        ({"type": "data", "stream": "stdout", "data": "x"}, 4004),
        ({"type": "signal", "signal": "SIGNOPE"}, 4005),
        ({"type": "signal", "signal": 9}, 4005),
    ]:
        c = Client(gw)
        c.init("python", SLEEPER)
        c.expect({"type": "runtime"}, {"type": "stage"}, {"type": "data", "data": "started\n"})
        c.send(**second)
        code, reason, got = c.closed()
        expected_reason = {
            4000: "Already Initialized",
            4004: "Can only write to stdin",
            4005: "Invalid signal",
        }
        assert (code, reason) == (want, expected_reason[want])
        assert [m["type"] for m in got] in ([], ["exit"])
    wait_no_runner_processes()


def test_init_timeout(gw: Gateway) -> None:
    c = Client(gw)
    started = time.monotonic()
    code, reason, got = c.closed()
    assert (code, reason, got) == (4001, "Initialization Timeout", [])
    assert 0.9 <= time.monotonic() - started < 5


def test_oversize_message(gw: Gateway) -> None:
    c = Client(gw)
    c.init("python", "x = 1\n" * 400_000)  # 2.4 MB: over the runner's 2 MiB max_body
    code, reason, _ = c.closed()
    assert (code, reason) == (1009, "Message Too Big")
    # Too much stdin waiting for a program that does not read it.
    c = Client(gw)
    c.init("python", SLEEPER)
    c.expect({"type": "runtime"}, {"type": "stage"}, {"type": "data", "data": "started\n"})
    chunk = "y" * 256 * 1024
    try:
        for _ in range(8):
            c.send(type="data", stream="stdin", data=chunk)
    except ConnectionClosed:
        pass
    code, reason, got = c.closed()
    assert (code, reason) == (4002, "Notified Error")
    assert got[0]["type"] == "error" and "stdin" in got[0]["message"]
    wait_no_runner_processes()


def test_bad_frames_and_handshakes(gw: Gateway) -> None:
    # An unmasked client frame is a protocol error: 1002, not a traceback.
    with gw.connect() as sock:
        sock.sendall(
            b"GET /api/v2/connect HTTP/1.1\r\nHost: run.localhost\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 101 "), head
        assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
        rest = head.split(b"\r\n\r\n", 1)[1]
        sock.sendall(b"\x81\x02hi")  # unmasked text frame
        data = rest
        deadline = time.monotonic() + 10
        while len(data) < 4 and time.monotonic() < deadline:
            more = sock.recv(4096)
            if not more:
                break
            data += more
        assert data[0] == 0x88, data  # a close frame
        (code,) = struct.unpack("!H", data[2:4])
        assert code == 1002
    # A plain GET is told to upgrade.
    resp = gw.request("/api/v2/connect", host=RUNNER_HOST)
    assert resp.status == 426, resp.body
    assert "WebSocket" in json.loads(resp.body)["message"]


def test_c_compile_stage(gw: Gateway) -> None:
    c = Client(gw)
    c.send(
        type="init",
        language="c",
        version="*",
        files=[
            {
                "name": "main.c",
                "content": "#include <stdio.h>\nint main(void) { char b[64]; "
                'if (fgets(b, 64, stdin)) printf("got %s", b); return 4; }\n',
            }
        ],
    )
    c.expect(
        {"type": "runtime", "language": "c"},
        {"type": "stage", "stage": "compile"},
        {"type": "exit", "stage": "compile", "code": 0, "signal": None},
        {"type": "stage", "stage": "run"},
        timeout=60,
    )
    c.send(type="data", stream="stdin", data="line\n")
    c.expect({"type": "data", "stream": "stdout", "data": "got line\n"})
    code, reason, messages = c.closed()
    assert (code, reason) == (4999, "Job Completed")
    assert [(m["type"], m["stage"], m["code"]) for m in messages] == [("exit", "run", 4)]
    # A compile error: the compiler's stderr streams, the compile stage exits, no run stage.
    c = Client(gw)
    c.init("c", "int main(void) { return nope; }\n")
    c.expect({"type": "runtime"}, {"type": "stage", "stage": "compile"}, timeout=60)
    code, reason, messages = c.closed(60)
    assert (code, reason) == (4999, "Job Completed")
    stderr = "".join(m["data"] for m in messages if m["type"] == "data")
    assert "nope" in stderr and "error" in stderr
    assert messages[-1] == {**messages[-1], "type": "exit", "stage": "compile", "code": 1}
    assert not any(m["type"] == "stage" for m in messages)
    wait_no_runner_processes()


def test_stdin_to_a_program_that_closed_it(gw: Gateway) -> None:
    c = Client(gw)
    c.init(
        "python",
        "import os, time\nos.close(0)\nprint('closed', flush=True)\n"
        "time.sleep(0.5)\nprint('end')\n",
    )
    c.expect({"type": "runtime"}, {"type": "stage"}, {"type": "data", "data": "closed\n"})
    for _ in range(3):
        c.send(type="data", stream="stdin", data="nobody reads this\n")
    code, _, messages = c.closed()
    assert code == 4999
    assert [m["type"] for m in messages] == ["data", "exit"] and messages[-1]["code"] == 0


def test_execute_still_works_and_nothing_left(gw: Gateway, tmp_path: Path) -> None:
    assert_healthy(gw)
    assert sandbox_cgroups(gw) == []
    # Bad input never became a traceback or an error in the runner's log.
    log = (gw.data_dir / "logs" / "run" / "main" / "instance.log").read_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def test_api_keys_slots_and_per_client_concurrency(tmp_path: Path) -> None:
    """The upgrade needs an API key like /execute; a session holds one of the client's
    executions from its init, and an execution slot while it runs; a client that leaves while
    queued for a slot gives its place up."""
    config = f'[runner]\napi_keys = ["{KEY}"]\nmax_per_client = 2\nmax_concurrency = 1\n'
    gw = make_keyed(tmp_path, config)
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        with pytest.raises(InvalidStatus) as refused:
            Client(gw)
        assert refused.value.response.status_code == 401
        first = Client(gw, headers=auth)
        first.init("python", SLEEPER)
        first.expect({"type": "runtime"}, {"type": "stage"}, {"type": "data"}, timeout=60)
        queued = Client(gw, headers={"Authorization": KEY})  # waits for the only slot
        queued.init("python", "print(1)")
        time.sleep(0.3)
        third = Client(gw, headers=auth)
        third.init("python", "print(1)")
        code, reason, got = third.closed()
        assert (code, reason) == (4002, "Notified Error")
        assert got == [
            {"type": "error", "message": "too many concurrent executions from this client (max 2)"}
        ]
        queued.close()  # gone while queued
        first.close()
        wait_no_runner_processes()
        # The slot and the client's count are free again: a session runs at once.
        again = Client(gw, headers=auth)
        again.init("python", "print('again')")
        again.expect(
            {"type": "runtime"}, {"type": "stage"}, {"type": "data", "data": "again\n"}, timeout=10
        )
        code, _, got = again.closed()
        assert code == 4999 and got[-1]["code"] == 0
    finally:
        stop_gateway(gw)


def test_stdin_beyond_its_bound_is_an_error(gw: Gateway) -> None:
    """A program that never reads stdin: past MAX_PENDING_STDIN (1 MiB) of it waiting, the
    session answers an error naming the bound and closes (4002); the program is killed."""
    c = Client(gw)
    c.init("python", SLEEPER)
    c.expect({"type": "runtime"}, {"type": "stage"}, {"type": "data", "data": "started\n"})
    chunk = "y" * (300 << 10)
    for _ in range(6):  # 1.8 MiB: more than the bound plus what the pipe itself holds
        c.send(type="data", stream="stdin", data=chunk)
    code, _, messages = c.closed()
    assert code == 4002
    errors = [m["message"] for m in messages if m["type"] == "error"]
    assert errors and "bytes of stdin are waiting for the program to read" in errors[0], messages
    wait_no_runner_processes()


def test_a_client_that_does_not_read_is_dropped(tmp_path: Path) -> None:
    """With an output cap above MAX_OUTBOX (4 MiB), a client that stops reading is dropped once
    that much waits for it, and its program is killed, rather than the runner buffering the
    whole output for it."""
    gw = start_runner_gateway(tmp_path, CONFIG + 'output_max_size = "32MiB"\n')
    try:
        c = Client(gw)
        c.init("python", "import sys\nsys.stdout.write('z' * (32 << 20))\nsys.stdout.flush()\n")
        log = gw.data_dir / "logs" / "run" / "main" / "instance.log"
        deadline = time.monotonic() + 20
        while "does not read its output" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "dropping an interactive client that does not read its output" in log.read_text()
        wait_no_runner_processes()
        c.ws.close_socket()
    finally:
        stop_gateway(gw)
