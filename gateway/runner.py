"""The gateway's side of the code runner: register the service, forward admin-port requests.

The runner (runtimes/runner) is a service of dorm's own, started and supervised by the instance
manager like a tenant (`add_internal`): routable as `<runner.host>.<domain>`, never evicted,
restarted after a crash, logged to `<data_dir>/logs/<host>/main/instance.log`. It runs with
process isolation because it is root and confines every execution in a sandbox of its own.

The admin listener answers `/api/v2/runtimes` and `/api/v2/execute` too, behind the admin token:
those requests are forwarded to the service's Unix socket (waking it if cold) with a per-start
internal token instead of the caller's Authorization header, so the admin token never reaches the
runner and API keys are not needed there. Interactive executions (`/api/v2/connect`, a
WebSocket) are served on `run.<domain>` only: the data plane tunnels the Upgrade to the service
like any app's, while the admin listener is request/response.

The runner's warm pools are shown and set through the gateway's pool routes (coldstart.py):
`pool_state` and `configure_pool` talk to the service's internal `/dorm/pools` endpoint with the
same token, each with a bounded wait. Bounds set that way are kept by the service in a file under
the run dir, which this hook empties at each gateway start (the config's values apply again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import h11
import orjson

from gateway.admin import Request, Response, Route
from gateway.appspec import parse_app_spec
from gateway.config import Config

if TYPE_CHECKING:
    from gateway.instances import Instance, InstanceManager

log = logging.getLogger("dorm.runner")

STARTUP_TIMEOUT = 60.0
FORWARD_TIMEOUT = 300.0
MAX_RESPONSE = 64 * 1024**2
PATHS = ("/api/v2/runtimes", "/api/v2/execute", "/api/v2/piston/runtimes", "/api/v2/piston/execute")
POOLS_PATH = "/dorm/pools"  # the service's internal pool endpoint (runtimes/runner/service.py)
POOL_QUERY_TIMEOUT = 5.0  # the service answers within its spawners' 2 s bound, or is stuck
POOL_WAKE_TIMEOUT = 30.0  # a PUT starts a cold runner (its pools live in its spawners)
# Pool bounds set through the admin API, kept in the data dir like the app runtimes' own
# (<data_dir>/pool-overrides.json): an operator's PUT survives runner and gateway restarts alike.
OVERRIDES_FILE = "runner-pool-overrides.json"


class RunnerUnavailable(Exception):
    """The runner should have answered a pool request but could not (the gateway says 503)."""


def hook_for(manager: InstanceManager) -> RunnerHook | None:
    """The registered (enabled) runner of this manager, if any: how the pool routes find it
    without a reference being threaded through the server's start-up."""
    hook: RunnerHook | None = manager.runner_hook
    return hook


def runner_unavailable(manager: InstanceManager) -> str | None:
    """Why this host cannot run untrusted code (None if it can): the runner needs real root and
    full sandboxes for its per-execution uids and cgroups; it never falls back to less."""
    if os.geteuid() != 0:
        return "the gateway is not running as root"
    if manager.isolation != "sandbox":
        return "; ".join(manager.isolation_reasons) or "sandboxes are not available"
    return None


class RunnerHook:
    """Registers the runner as an internal instance and provides its admin routes."""

    def __init__(self, config: Config, manager: InstanceManager) -> None:
        self.config = config
        self.manager = manager
        self.token = secrets.token_hex(32)
        self.instance: Instance | None = None

    def register(self) -> bool:
        runner = self.config.runner
        if not runner.enabled:
            return False
        why = runner_unavailable(self.manager)
        if why is not None:
            log.warning("code runner disabled: %s", why)
            return False
        settings = runner.settings(self.config.gateway.cgroup_parent, self.token)
        overrides = Path(self.config.gateway.data_dir) / OVERRIDES_FILE
        settings["pool_overrides_file"] = str(overrides)
        root = str(Path(__file__).resolve().parent.parent)
        spec = parse_app_spec(
            runner.host,
            {
                "runtime": "command",
                "command": [sys.executable, "-m", "runtimes.runner.service"],
                "isolation": "process",
                "idle_timeout": "1000d",
                "startup_timeout": STARTUP_TIMEOUT,
                "stop_timeout": 15,
                "max_body": runner.max_body,
                "max_queue": max(100, runner.queue),
                "env": {
                    "DORM_RUNNER_SETTINGS": orjson.dumps(settings).decode(),
                    "PYTHONPATH": root,
                },
            },
        )
        self.instance = self.manager.add_internal(spec)
        self.manager.runner_hook = self
        log.info("code runner at %s.<domain> (and /api/v2/* on the admin listener)", runner.host)
        return True

    def routes(self) -> list[Route]:
        if self.instance is None:
            return []
        out = []
        for path in PATHS:
            if path.endswith("runtimes"):
                out.append(Route("GET", path, self.forward))
            else:
                out.append(Route("POST", path, self.forward, max_body=self.config.runner.max_body))
        return out

    async def _socket(self, timeout: float = STARTUP_TIMEOUT) -> str:
        """The service's socket path once it is ready, waking it if cold."""
        from gateway.instances import State

        inst = self.instance
        assert inst is not None
        deadline = time.monotonic() + timeout
        while inst.state is not State.READY:
            if inst.state in (State.COLD, State.FAILED):
                self.manager.wake(inst)
            if time.monotonic() > deadline:
                raise TimeoutError(inst.last_error or "the runner did not start")
            await asyncio.sleep(0.01)
        return inst.socket_path

    @property
    def state(self) -> str:
        """The service's instance state ("cold", "starting", "ready", ...)."""
        assert self.instance is not None
        return self.instance.state.name.lower()

    async def pool_state(self) -> dict[str, Any]:
        """{"state", "pools", "config"}; pools only while the service runs (a cold runner has
        none: its spawners hold them). Raises RunnerUnavailable if it runs but cannot answer."""
        from gateway.instances import State

        inst = self.instance
        assert inst is not None
        if inst.state is not State.READY:
            return {"state": self.state, "pools": [], "config": None}
        status, body = await self._call("GET", POOLS_PATH, b"", POOL_QUERY_TIMEOUT)
        if status != 200 or not isinstance(body, dict):
            raise RunnerUnavailable(f"the code runner answered {status}: {_message(body)}")
        return {"state": self.state, "pools": body.get("pools", []), "config": body.get("config")}

    async def configure_pool(self, name: str, min_idle: int, max_idle: int) -> tuple[int, Any]:
        """Set the bounds of the pool serving language `name` (waking the runner if cold);
        (status, body) of the service: 200, 404 (no such language) or 400."""
        try:
            await self._socket(POOL_WAKE_TIMEOUT)
        except TimeoutError as exc:
            raise RunnerUnavailable(f"the code runner is not available: {exc}") from None
        payload = orjson.dumps({"min_idle": min_idle, "max_idle": max_idle})
        path = f"{POOLS_PATH}/{quote(name, safe='')}"
        return await self._call("PUT", path, payload, POOL_QUERY_TIMEOUT)

    async def _call(self, method: str, path: str, body: bytes, timeout: float) -> tuple[int, Any]:
        """One internal request to the running service; RunnerUnavailable if it fails."""
        assert self.instance is not None
        headers = [
            ("host", "runner"),
            ("x-dorm-runner-internal", self.token),
            ("connection", "close"),
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
        ]
        client = h11.Connection(h11.CLIENT)
        data = client.send(h11.Request(method=method, target=path, headers=headers)) or b""
        data += (client.send(h11.Data(data=body)) if body else b"") or b""
        data += client.send(h11.EndOfMessage()) or b""
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(self.instance.socket_path)
                writer.write(data)
                resp = await _read_response(client, reader)
        except (OSError, TimeoutError, h11.ProtocolError) as exc:
            why = "no answer in time" if isinstance(exc, TimeoutError) else str(exc)
            raise RunnerUnavailable(f"the code runner did not answer: {why}") from None
        finally:
            if writer is not None:
                writer.close()
        try:
            return resp.status, orjson.loads(resp.body)
        except orjson.JSONDecodeError:
            return resp.status, {"message": resp.body[:200].decode(errors="replace")}

    async def forward(self, req: Request) -> Response:
        try:
            path = await self._socket()
        except TimeoutError as exc:
            return _error(503, f"the code runner is not available: {exc}")
        headers = [
            ("host", "runner"),
            ("x-dorm-runner-internal", self.token),
            ("connection", "close"),
        ]
        content_type = req.header(b"content-type")
        if content_type is not None:
            headers.append(("content-type", content_type.decode("latin-1")))
        if req.method == "POST":
            headers.append(("content-length", str(len(req.body))))
        client = h11.Connection(h11.CLIENT)
        data = client.send(h11.Request(method=req.method, target=req.path, headers=headers))
        data = (data or b"") + (client.send(h11.Data(data=req.body)) if req.body else b"")
        data += client.send(h11.EndOfMessage()) or b""
        try:
            reader, writer = await asyncio.open_unix_connection(path)
        except OSError as exc:
            return _error(502, f"the code runner is not reachable: {exc.strerror or exc}")
        try:
            writer.write(data)
            return await asyncio.wait_for(_read_response(client, reader), FORWARD_TIMEOUT)
        except (OSError, TimeoutError, h11.ProtocolError) as exc:
            return _error(502, f"the code runner failed: {exc}")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _read_response(client: h11.Connection, reader: asyncio.StreamReader) -> Response:
    status = 502
    headers: list[tuple[str, str]] = []
    content_type = "application/json"
    body = bytearray()
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(await reader.read(65536))
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            for name, value in event.headers:
                if name == b"retry-after":
                    headers.append(("retry-after", value.decode("latin-1")))
                elif name == b"content-type":
                    content_type = value.decode("latin-1")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_RESPONSE:
                raise OSError("the runner's answer is too large")
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            return Response(status, bytes(body), content_type=content_type, headers=headers)


def _message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return repr(body)[:200]


def _error(status: int, message: str) -> Response:
    return Response(status, orjson.dumps({"message": message}))
