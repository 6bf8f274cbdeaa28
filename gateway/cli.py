"""`dorm`: the command line. Everything but `serve` is a thin client of the admin API.

Errors are one readable line on stderr with exit status 1 (2 for usage mistakes), never a
traceback, because the CLI is run by people and by scripts, and both need to know what went wrong
without reading Python. The gateway is found through --admin-url/--token, DORM_ADMIN_URL and
DORM_ADMIN_TOKEN, or else the local config (the same dorm.toml `dorm serve` reads).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from gateway.auth import load_admin_token
from gateway.client import AdminClient, AdminError, error_message, path_quote
from gateway.config import ConfigError, load_config, split_host_port
from gateway.names import InvalidName, check_app_name, check_branch_name
from gateway.registry import DEFAULT_BRANCH


class UsageError(Exception):
    """A mistake in the command line itself (exit status 2)."""


# -- helpers ---------------------------------------------------------------------------------------
def _app_name(text: str) -> str:
    try:
        return check_app_name(text)
    except InvalidName as exc:
        raise UsageError(f"app name: {exc}") from None


def _app_branch(text: str, *, default: str | None = DEFAULT_BRANCH) -> tuple[str, str | None]:
    """APP or APP/BRANCH. A missing branch is `default` (None: "every branch")."""
    app, sep, branch = text.partition("/")
    _app_name(app)
    if not sep:
        return app, default
    try:
        return app, check_branch_name(branch)
    except InvalidName as exc:
        raise UsageError(f"branch name: {exc}") from None


def _env_pairs(items: Sequence[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def _print_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Aligned columns, like `docker ps`; `-` for missing values."""
    cells = [[("-" if v is None or v == "" else str(v)) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = [headers, *cells]
    for line in lines:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        sys.stdout.write("\n")


def _ago(value: Any, now: float) -> str | None:
    """'12s ago' for a Unix timestamp; anything else is shown as it came."""
    if value is None:
        return None
    if isinstance(value, int | float) and value > 1e9:
        seconds = max(0.0, now - value)
        if seconds < 120:
            return f"{seconds:.0f}s ago"
        if seconds < 7200:
            return f"{seconds / 60:.0f}m ago"
        return f"{seconds / 3600:.0f}h ago"
    return str(value)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return str(seconds)
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


# -- finding the gateway ---------------------------------------------------------------------------
def _client(args: argparse.Namespace) -> AdminClient:
    """The admin client from flags, then environment, then the local config.

    The token from the local config is only sent to the URL from the same config: an explicit
    --admin-url elsewhere must come with its own token.
    """
    url = args.admin_url or os.environ.get("DORM_ADMIN_URL")
    token = args.token or os.environ.get("DORM_ADMIN_TOKEN")
    if url and token:
        return AdminClient(url, token)
    try:
        cfg = load_config(args.config).gateway
    except ConfigError as exc:
        if url:
            return AdminClient(url, token)
        raise AdminError(f"cannot find the gateway: {exc}") from None
    if url:
        return AdminClient(url, token)
    host, port = split_host_port(cfg.admin_listen, "admin_listen")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    local_url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    if token is None:
        try:
            token = load_admin_token(cfg, create=False)
        except ConfigError as exc:
            raise AdminError(str(exc)) from None
    return AdminClient(local_url, token)


# -- commands --------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.server import serve  # lazily: the data plane is not needed by other commands

    return serve(args.config)


def cmd_apps(args: argparse.Namespace) -> int:
    apps = _client(args).call("GET", "/v1/apps")["apps"]
    if args.json:
        _print_json(apps)
        return 0
    rows = [
        (
            a["name"],
            a["runtime"],
            shlex.join(a["command"]),
            _duration(a["idle_timeout"]),
            a["max_body"],
            a["limits"]["memory"] or "unlimited",
            a["limits"]["cpu"] or "unlimited",
        )
        for a in apps
    ]
    _table(("NAME", "RUNTIME", "COMMAND", "IDLE", "MAX_BODY", "MEMORY", "CPU"), rows)
    return 0


def _spec_from_args(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if args.json_spec:
        try:
            raw = (
                sys.stdin.buffer.read()
                if args.json_spec == "-"
                else Path(args.json_spec).read_bytes()
            )
        except OSError as exc:
            raise UsageError(f"--json-spec {args.json_spec}: {exc.strerror}") from None
        try:
            spec = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise UsageError(f"--json-spec {args.json_spec}: not valid JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise UsageError(f"--json-spec {args.json_spec}: expected a JSON object")
    if args.runtime is not None:
        spec["runtime"] = args.runtime
    if args.command is not None:
        try:
            spec["command"] = shlex.split(args.command)
        except ValueError as exc:
            raise UsageError(f"--command: {exc}") from None
    if args.env:
        spec["env"] = {**spec.get("env", {}), **_env_pairs(args.env)}
    for flag in ("idle_timeout", "startup_timeout", "stop_timeout", "max_body", "max_queue"):
        if getattr(args, flag) is not None:
            spec[flag] = getattr(args, flag)
    if args.health is not None:
        spec["health"] = args.health
    if args.isolation is not None:
        spec["isolation"] = args.isolation
    limits = {
        k: getattr(args, k) for k in ("memory", "cpu", "pids") if getattr(args, k) is not None
    }
    if limits:
        spec["limits"] = {**spec.get("limits", {}), **limits}
    if "command" not in spec:
        raise UsageError("app set: --command (or a --json-spec with a command) is required")
    return spec


def cmd_app_set(args: argparse.Namespace) -> int:
    name = _app_name(args.name)
    spec = _spec_from_args(args)
    client = _client(args)
    status, answer = client.request("PUT", f"/v1/apps/{path_quote(name)}", spec)
    if status >= 400:
        raise error_message(status, answer)
    if args.json:
        _print_json(answer)
    else:
        print(f"{'created' if status == 201 else 'updated'} app {name}")
    return 0


def cmd_app_show(args: argparse.Namespace) -> int:
    name = _app_name(args.name)
    _print_json(_client(args).call("GET", f"/v1/apps/{path_quote(name)}"))
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    items = _client(args).call("GET", "/v1/instances")["instances"]
    if args.json:
        _print_json(items)
        return 0
    now = time.time()
    rows = [
        (
            i.get("app"),
            i.get("branch"),
            i.get("state"),
            i.get("pid"),
            i.get("in_flight"),
            i.get("queued"),
            i.get("upgraded"),
            i.get("starts"),
            i.get("failures"),
            _ago(i.get("last_request"), now),
            i.get("last_error"),
        )
        for i in items
    ]
    headers = ("APP", "BRANCH", "STATE", "PID", "IN_FLIGHT", "QUEUED", "UPGRADED")
    _table((*headers, "STARTS", "FAILURES", "LAST_REQUEST", "LAST_ERROR"), rows)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    app, branch = _app_branch(args.target, default=None)
    path = f"/v1/apps/{path_quote(app)}"
    path += "/stop" if branch is None else f"/branches/{path_quote(branch)}/stop"
    stopped = _client(args).call("POST", path)["stopped"]
    print(f"stopped {stopped} instance{'' if stopped == 1 else 's'}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    name = _app_name(args.name)
    _client(args).call("DELETE", f"/v1/apps/{path_quote(name)}")
    print(f"removed app {name}")
    return 0


def _branch_path(target: str) -> tuple[str, str, str]:
    app, branch = _app_branch(target, default=None)
    if branch is None:
        raise UsageError(f"{target!r}: expected APP/BRANCH")
    return app, branch, f"/v1/apps/{path_quote(app)}/branches/{path_quote(branch)}"


def cmd_branch_set(args: argparse.Namespace) -> int:
    app, branch, path = _branch_path(args.target)
    answer = _client(args).call("PUT", path, {"env": _env_pairs(args.env)})
    if args.json:
        _print_json(answer)
    else:
        print(f"set branch {app}/{branch}")
    return 0


def cmd_branch_rm(args: argparse.Namespace) -> int:
    app, branch, path = _branch_path(args.target)
    _client(args).call("DELETE", path)
    print(f"removed branch {app}/{branch}")
    return 0


def cmd_branches(args: argparse.Namespace) -> int:
    name = _app_name(args.app)
    branches = _client(args).call("GET", f"/v1/apps/{path_quote(name)}/branches")["branches"]
    if args.json:
        _print_json(branches)
        return 0
    rows = [
        (b["name"], " ".join(f"{k}={v}" for k, v in sorted(b["env"].items()))) for b in branches
    ]
    _table(("BRANCH", "ENV"), rows)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    app, branch = _app_branch(args.target)
    assert branch is not None
    if not 0 <= args.lines <= 10_000:
        raise UsageError("-n: expected a number of lines from 0 to 10000")
    path = f"/v1/apps/{path_quote(app)}/logs?branch={path_quote(branch)}&tail={args.lines}"
    if args.follow:
        path += "&follow=1"
    out = sys.stdout.buffer
    # Streamed in both cases: log bytes are passed through exactly, whatever their encoding.
    for chunk in _client(args).stream(path):
        out.write(chunk)
        out.flush()
    return 0


# -- argument parsing ------------------------------------------------------------------------------
def _global_flags(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Flags accepted both before and after the command (`dorm --token T ps`, `dorm ps --token T`).

    On subcommands the defaults are suppressed so they do not overwrite a value given earlier.
    """
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument("--admin-url", default=default, help="admin API URL (env DORM_ADMIN_URL)")
    parser.add_argument("--token", default=default, help="admin token (env DORM_ADMIN_TOKEN)")
    parser.add_argument(
        "--config", default=default, help="dorm.toml to read (default: ./dorm.toml, /etc/dorm)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dorm", description="dorm: a scale-to-zero HTTP gateway with on-demand sandboxes"
    )
    _global_flags(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str, **kw: Any) -> Any:
        p = sub.add_parser(name, help=help, description=help, **kw)
        _global_flags(p, suppress=True)
        p.set_defaults(func=func)
        return p

    add("serve", cmd_serve, "run the gateway (public and admin listeners)")

    p = add("apps", cmd_apps, "list apps")
    p.add_argument("--json", action="store_true", help="print JSON")

    app = sub.add_parser("app", help="create, replace or show an app", description="manage one app")
    app_sub = app.add_subparsers(dest="app_command", metavar="ACTION", required=True)
    p = app_sub.add_parser(
        "set",
        help="create or replace an app (the whole spec: flags not given take their defaults)",
        description="create or replace an app; the spec is replaced as a whole",
    )
    _global_flags(p, suppress=True)
    p.set_defaults(func=cmd_app_set)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--runtime", help="runtime (default: command)")
    p.add_argument("--command", help='command line, e.g. "python3 app.py"')
    p.add_argument("--env", action="append", metavar="K=V", help="environment (repeatable)")
    p.add_argument("--idle-timeout", dest="idle_timeout", help="e.g. 5m")
    p.add_argument("--startup-timeout", dest="startup_timeout", help="e.g. 10s")
    p.add_argument("--stop-timeout", dest="stop_timeout", help="grace before SIGKILL, e.g. 10s")
    p.add_argument("--max-body", dest="max_body", help="e.g. 10MiB")
    p.add_argument("--max-queue", dest="max_queue", type=int, metavar="N")
    p.add_argument("--memory", help="e.g. 256MiB")
    p.add_argument("--cpu", type=float, help="CPUs, e.g. 0.5")
    p.add_argument("--pids", type=int, help="max processes")
    p.add_argument("--health", metavar="PATH", help="readiness path, e.g. /healthz")
    p.add_argument("--isolation", choices=("process", "sandbox"))
    p.add_argument("--json-spec", dest="json_spec", metavar="FILE", help="spec as JSON (- = stdin)")
    p.add_argument("--json", action="store_true", help="print the stored spec as JSON")
    p = app_sub.add_parser("show", help="show an app's spec as JSON")
    _global_flags(p, suppress=True)
    p.set_defaults(func=cmd_app_show)
    p.add_argument("name", metavar="NAME")

    p = add("ps", cmd_ps, "list instances and their state")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("stop", cmd_stop, "drain and stop instances (APP: every branch)")
    p.add_argument("target", metavar="APP[/BRANCH]")

    p = add("rm", cmd_rm, "remove an app and stop its instances")
    p.add_argument("name", metavar="APP")

    branch = sub.add_parser("branch", help="set or remove a branch", description="manage branches")
    branch_sub = branch.add_subparsers(dest="branch_command", metavar="ACTION", required=True)
    p = branch_sub.add_parser("set", help="create or replace a branch (restarts its instance)")
    _global_flags(p, suppress=True)
    p.set_defaults(func=cmd_branch_set)
    p.add_argument("target", metavar="APP/BRANCH")
    p.add_argument("--env", action="append", metavar="K=V", help="environment (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = branch_sub.add_parser("rm", help="remove a branch")
    _global_flags(p, suppress=True)
    p.set_defaults(func=cmd_branch_rm)
    p.add_argument("target", metavar="APP/BRANCH")

    p = add("branches", cmd_branches, "list an app's branches")
    p.add_argument("app", metavar="APP")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("logs", cmd_logs, "show an instance's output (APP means APP/main)")
    p.add_argument("target", metavar="APP[/BRANCH]")
    p.add_argument("-n", "--lines", type=int, default=100, help="lines of history (default 100)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 error, 2 usage, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage or help
        return int(exc.code) if isinstance(exc.code, int) else 2
    try:
        result: int = args.func(args)
        return result
    except UsageError as exc:
        print(f"dorm: {exc}", file=sys.stderr)
        return 2
    except (AdminError, ConfigError) as exc:
        print(f"dorm: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output went to a pipe that closed (`dorm logs app | head`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:
        print(f"dorm: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug, but the user still gets one line, not a traceback
        print(f"dorm: unexpected error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
