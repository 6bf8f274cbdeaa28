"""`dorm`: the command line. Everything but `serve` is a thin client of the admin API.

Errors are one readable line on stderr with exit status 1 (2 for usage mistakes), never a
traceback, because the CLI is run by people and by scripts, and both need to know what went wrong
without reading Python. The gateway is found through --admin-url/--token, DORM_ADMIN_URL and
DORM_ADMIN_TOKEN, or else the local config (the same dorm.toml `dorm serve` reads).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import shlex
import signal as signal_module
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import orjson

from gateway.auth import load_admin_token
from gateway.bundles import MANIFEST, pack
from gateway.client import AdminClient, AdminError, error_message, path_quote
from gateway.config import ConfigError, GatewayConfig, load_config, split_host_port
from gateway.names import InvalidName, check_app_name, check_branch_name
from gateway.registry import DEFAULT_BRANCH
from gateway.runtimespec import RUNTIME_TOML
from gateway.units import format_size


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


def cmd_pools(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.set is not None:
        low, _, high = args.set.partition(":")
        if not (low.isdigit() and high.isdigit()):
            raise SystemExit("dorm pools: --set expects MIN:MAX, such as 2:8")
        body = {"min_idle": int(low), "max_idle": int(high)}
        _print_json(client.call("PUT", f"/v1/pools/{path_quote(args.set_runtime)}", body))
        return 0
    answer = client.call("GET", "/v1/pools")
    if args.json:
        _print_json(answer)
        return 0
    if not answer.get("enabled"):
        print(f"warm pools are off (isolation {answer.get('isolation')}, or max_idle = 0)")
    rows = [
        (
            f"runner:{p.get('pool')}" if p.get("kind") == "runner" else p.get("runtime"),
            p.get("shape", {}).get("memory"),
            p.get("idle"),
            f"{p.get('min_idle')}-{p.get('max_idle')}",
            p.get("target"),
            p.get("claimed"),
            p.get("forking"),
            p.get("misses"),
            f"{p.get('refill_rate', 0) * 60:.0f}/min",
        )
        for p in answer.get("pools", [])
    ]
    _table(
        (
            "RUNTIME",
            "MEMORY",
            "IDLE",
            "MIN-MAX",
            "TARGET",
            "CLAIMED",
            "FORKING",
            "MISSES",
            "REFILL",
        ),
        rows,
    )
    # The code runner's pools are per sandbox layout: say which languages each one serves.
    runner = answer.get("runner")
    for p in answer.get("pools", []):
        if p.get("kind") == "runner":
            print(f"runner:{p.get('pool')} serves {', '.join(p.get('languages', []))}")
            for error in p.get("errors", []):
                print(f"runner:{p.get('pool')}: {error}")
    if runner is not None and runner.get("state") != "ready":
        print(f"code runner {runner.get('state')}: its pools are built when it starts")
    # The point of a pool is the start it saves: show recent starts per path next to it.
    starts = client.call("GET", "/v1/stats")["cold_starts"]
    stage_rows = []
    for path, summary in starts.items():
        stages = summary.get("stages", {})
        if not summary.get("count"):
            continue
        stage_rows.append(
            (
                path,
                summary["count"],
                *(
                    f"{stages[s]['p50_ms']:.1f}/{stages[s]['p99_ms']:.1f}" if s in stages else "-"
                    for s in ("queue", "claim", "confine", "app", "first_byte", "total")
                ),
            )
        )
    if stage_rows:
        print()
        headers = ("PATH", "STARTS", "QUEUE", "CLAIM", "CONFINE", "APP", "FIRST_BYTE", "TOTAL")
        _table(headers, stage_rows)
        print("(ms, p50/p99 of recent starts)")
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
    now = time.time()
    rows = [
        (
            b["name"],
            (b.get("bundle") or "")[:12],
            _ago(b.get("deployed_at"), now),
            _ago(b.get("last_request"), now),
            " ".join(f"{k}={v}" for k, v in sorted(b["env"].items())),
        )
        for b in branches
    ]
    _table(("BRANCH", "BUNDLE", "DEPLOYED", "LAST_REQUEST", "ENV"), rows)
    return 0


@contextlib.contextmanager
def _bundle_file(source: Path, manifest: str = MANIFEST) -> Iterator[tuple[IO[bytes], int, str]]:
    """The archive to upload as (file, size, sha256 hex): a directory is packed into a
    temporary file first (so it is streamed from disk, not held in memory)."""
    if source.is_dir():
        if not (source / manifest).is_file():
            raise UsageError(f"{source}: no {manifest} at the top of the directory")
        with tempfile.TemporaryFile() as tmp:
            pack(source, tmp, warn=lambda msg: print(f"dorm: {msg}", file=sys.stderr))
            yield tmp, *_rewind_and_hash(tmp)
        return
    try:
        fh = open(source, "rb")  # noqa: SIM115 - closed below, after the upload
    except OSError as exc:
        raise UsageError(f"{source}: {exc.strerror}") from None
    with fh:
        yield fh, *_rewind_and_hash(fh)


def _rewind_and_hash(fh: IO[bytes]) -> tuple[int, str]:
    fh.seek(0)
    digest = hashlib.sha256()
    size = 0
    while chunk := fh.read(1024 * 1024):
        digest.update(chunk)
        size += len(chunk)
    fh.seek(0)
    return size, digest.hexdigest()


def _wait_for(url: str, admin_host: str, timeout: float) -> int:
    """Request the preview URL until it answers without a 5xx; returns that status.

    Preview host names often do not resolve where the CLI runs (they are wildcard DNS for
    the gateway's public address), so the request goes to the URL's host if it resolves, else
    to the admin API's host, with the preview name as Host either way.
    """
    split = urlsplit(url)
    host, port = split.hostname or "", split.port or 80
    try:
        socket.getaddrinfo(host, port)
        target = host
    except OSError:
        target = admin_host
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(target, port, timeout=max(1.0, min(10.0, timeout)))
        try:
            conn.request("GET", split.path or "/", headers={"Host": split.netloc})
            resp = conn.getresponse()
            body = resp.read(200).decode("utf-8", "replace").strip()
            if resp.status < 500:
                return resp.status
            last = f"HTTP {resp.status}: {body}"
        except (OSError, http.client.HTTPException) as exc:
            last = str(exc) or type(exc).__name__
        finally:
            conn.close()
        time.sleep(0.25)
    raise AdminError(f"{url} was not ready within {timeout:g}s ({last})")


def cmd_deploy(args: argparse.Namespace) -> int:
    app = _app_name(args.app)
    try:
        branch = check_branch_name(args.branch)
    except InvalidName as exc:
        raise UsageError(f"--branch: {exc}") from None
    path = f"/v1/apps/{path_quote(app)}/branches/{path_quote(branch)}/bundle"
    client = _client(args)
    with _bundle_file(Path(args.source)) as (fh, size, digest):
        status, answer = client.upload(
            path, fh, size, headers=[("x-content-sha256", digest)], timeout=args.timeout
        )
    if status >= 400:
        raise error_message(status, answer)
    if args.wait:
        _wait_for(answer["url"], client.host, args.timeout)
    if args.json:
        _print_json(answer)
    else:
        print(f"deployed {answer['bundle'][:12]} to {app}/{branch}")
        print(answer["url"])
    return 0


def _runtime_name(text: str) -> str:
    try:
        return check_branch_name(text)  # runtime names are DNS labels too
    except InvalidName as exc:
        raise UsageError(f"runtime name: {exc}") from None


def cmd_runtimes(args: argparse.Namespace) -> int:
    runtimes = _client(args).call("GET", "/v1/runtimes")["runtimes"]
    if args.json:
        _print_json(runtimes)
        return 0
    now = time.time()
    rows = [
        (
            r["name"],
            "built-in" if r["builtin"] else ("INVALID" if "error" in r else "uploaded"),
            (r.get("digest") or "")[:12],
            "" if r.get("size") is None else format_size(r["size"]),
            _ago(r.get("uploaded"), now) or "",
            ",".join(r.get("used_by", [])),
            r.get("error") or r.get("description", ""),
        )
        for r in runtimes
    ]
    _table(("NAME", "KIND", "DIGEST", "SIZE", "UPLOADED", "USED_BY", "DESCRIPTION"), rows)
    return 0


def cmd_runtime_push(args: argparse.Namespace) -> int:
    name = _runtime_name(args.name)
    client = _client(args)
    with _bundle_file(Path(args.source), RUNTIME_TOML) as (fh, size, digest):
        status, answer = client.upload(
            f"/v1/runtimes/{path_quote(name)}",
            fh,
            size,
            headers=[("x-content-sha256", digest)],
            timeout=args.timeout,
        )
    if status >= 400:
        raise error_message(status, answer)
    if args.json:
        _print_json(answer)
    else:
        verb = "uploaded" if status == 201 else "replaced"
        print(f"{verb} runtime {name} ({answer['digest'][:12]}, {format_size(answer['size'])})")
    return 0


def cmd_runtime_show(args: argparse.Namespace) -> int:
    name = _runtime_name(args.name)
    _print_json(_client(args).call("GET", f"/v1/runtimes/{path_quote(name)}"))
    return 0


def cmd_runtime_rm(args: argparse.Namespace) -> int:
    name = _runtime_name(args.name)
    _client(args).call("DELETE", f"/v1/runtimes/{path_quote(name)}")
    print(f"removed runtime {name}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    app, branch = _app_branch(args.target)
    assert branch is not None
    path = f"/v1/apps/{path_quote(app)}/branches/{path_quote(branch)}/rollback"
    answer = _client(args).call("POST", path)
    print(
        f"rolled {app}/{branch} back to {answer['bundle'][:12]} "
        f"(from {(answer.get('previous_bundle') or '-')[:12]})"
    )
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


def cmd_doctor(args: argparse.Namespace) -> int:
    """What this host can give tenants: read locally, no gateway needed."""
    from sandboxes import host_report
    from sandboxes.doctor import volume_ownership

    report = host_report()
    # The host facts stand without a config, but a config that does not load must not pass
    # unnoticed: the volume probe would silently describe the default data dir instead of the
    # one the gateway will use. Report the error, probe the default, and exit non-zero.
    config_error: str | None = None
    try:
        data_dir = load_config(args.config).gateway.data_dir
    except ConfigError as exc:
        config_error = str(exc)
        data_dir = GatewayConfig().data_dir
    report["config_error"] = config_error
    report["volumes"] = volumes = volume_ownership(os.path.join(data_dir, "volumes"))
    status = 0 if config_error is None else 1
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return status
    cgroup = report["cgroup"]
    userns = report["user_namespaces"]
    seccomp = report["seccomp"]

    def yes(flag: object) -> str:
        return "yes" if flag else "no"

    controllers = ", ".join(cgroup["controllers"]) or "none"
    if cgroup.get("reason"):
        controllers += f" ({cgroup['reason']})"

    lines = [
        f"kernel            {report['kernel']} ({report['arch']})",
        f"running as root   {yes(report['root'])} (euid {report['euid']})",
        f"cgroups           v{cgroup['version'] or '-'}: {controllers}",
        f"user namespaces   {_describe(userns)}",
        f"seccomp           {_describe(seccomp)}",
        f"overlayfs         {yes(report['overlayfs'])}",
        f"pidfd             {yes(report['pidfd'])}",
        f"mount_setattr     {yes(report['mount_setattr'])}",
        f"favordynmods      {report['favordynmods'] or 'no (cgroup joins wait for RCU)'}",
        f"sandbox launcher  {report['sandbox_launcher'] or 'no (exec starts use the Python path)'}",
        "/data volumes     "
        + (
            f"idmapped mounts (owned by {volumes['storage_uid']} on disk, {volumes['fstype']})"
            if volumes["mode"] == "idmap"
            else f"chowned to each instance's uid per start ({volumes['reason']})"
        ),
        f"isolation         {report['isolation']}",
    ]
    lines += [f"  - {reason}" for reason in report["isolation_reasons"]]
    if report["missing_protections"]:
        lines.append("missing in rootless mode:")
        lines += [f"  - {item}" for item in report["missing_protections"]]
    if config_error is not None:
        lines.append(f"config            not loaded: {config_error}")
        lines.append(f"                  (/data volumes above probed under the default {data_dir})")
    print("\n".join(lines))
    return status


RUN_EXTENSIONS = {
    ".py": "python",
    ".sh": "bash",
    ".bash": "bash",
    ".c": "c",
    ".cc": "c++",
    ".cpp": "c++",
    ".cxx": "c++",
    ".js": "javascript",
    ".mjs": "javascript",
}


def _runner_target(args: argparse.Namespace) -> tuple[str, int, str, str]:
    """(host, port, Host header, path prefix) of the code runner: --url, $DORM_RUNNER_URL, or the
    local config's public listener with `Host: <runner.host>.<first domain>`."""
    url = args.url or os.environ.get("DORM_RUNNER_URL")
    if url:
        split = urlsplit(url)
        if split.scheme != "http" or not split.hostname:
            raise UsageError(f"--url {url!r}: expected http://HOST[:PORT][/PREFIX]")
        host_header = split.netloc
        return split.hostname, split.port or 80, host_header, split.path.rstrip("/")
    config = load_config(args.config)
    host, port = split_host_port(config.gateway.listen, "listen")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return host, port, f"{config.runner.host}.{config.gateway.domains[0]}", ""


def cmd_run(args: argparse.Namespace) -> int:
    """Run a file on the code runner; print its output and exit with its exit code."""
    path = Path(args.file)
    try:
        source = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{args.file}: {exc.strerror}") from None
    language = args.language or RUN_EXTENSIONS.get(path.suffix.lower())
    if language is None:
        raise UsageError(f"cannot tell the language of {path.name}: give --language")
    stdin = args.stdin
    if stdin == "-":
        stdin = sys.stdin.read()
    try:
        file: dict[str, str] = {"name": path.name, "content": source.decode("utf-8")}
    except UnicodeDecodeError:
        raise UsageError(f"{args.file} is not UTF-8 text") from None
    body = {
        "language": language,
        "version": args.version,
        "files": [file],
        "stdin": stdin or "",
        "args": args.arg or [],
    }
    host, port, host_header, prefix = _runner_target(args)
    headers = {"Host": host_header, "Content-Type": "application/json"}
    key = args.api_key or os.environ.get("DORM_RUNNER_KEY")
    if key:
        headers["Authorization"] = key
    conn = http.client.HTTPConnection(host, port, timeout=args.timeout)
    try:
        conn.request("POST", prefix + "/api/v2/execute", body=orjson.dumps(body), headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except OSError as exc:
        raise AdminError(f"cannot reach the code runner at {host}:{port}: {exc}") from None
    finally:
        conn.close()
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        answer = None
    if resp.status != 200 or not isinstance(answer, dict):
        message = answer.get("message") if isinstance(answer, dict) else None
        raise AdminError(f"runner answered {resp.status}: {message or raw[:200]!r}")
    stage = answer["run"]
    compiled = answer.get("compile")
    if compiled is not None and compiled is not stage and compiled != stage:
        sys.stderr.write(compiled.get("stderr") or "")
    sys.stdout.write(stage.get("stdout") or "")
    sys.stdout.flush()
    sys.stderr.write(stage.get("stderr") or "")
    if stage.get("status") in ("TO", "OL", "EL", "XX"):
        sys.stderr.write(f"dorm: {stage.get('message')}\n")
    sys.stderr.flush()
    if stage.get("signal"):
        with contextlib.suppress(AttributeError, ValueError):
            return 128 + int(getattr(signal_module, stage["signal"]))
        return 128
    return int(stage.get("code") or 0)


def _describe(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


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
    p = add("doctor", cmd_doctor, "show what this host supports (cgroups, namespaces, seccomp)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("run", cmd_run, "run a file on the code runner; exit with the program's code")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--language", "-l", help="language or alias (default: from the extension)")
    p.add_argument("--version", default="*", help="version selector (default: *)")
    p.add_argument("--stdin", help="text for the program's stdin (- reads this stdin)")
    p.add_argument("--arg", action="append", metavar="A", help="program argument (repeatable)")
    p.add_argument("--url", help="runner URL (env DORM_RUNNER_URL; default: the local config)")
    p.add_argument("--api-key", dest="api_key", help="runner API key (env DORM_RUNNER_KEY)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer")

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

    p = add(
        "pools", cmd_pools, "show warm pools (idle, claimed, misses), or set a runtime's bounds"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--set", metavar="MIN:MAX", help="set min_idle:max_idle for --runtime")
    p.add_argument(
        "--runtime",
        dest="set_runtime",
        default="python-asgi",
        help="runtime for --set, or a code-runner language (sets the pool serving it)",
    )

    p = add("branches", cmd_branches, "list an app's branches")
    p.add_argument("app", metavar="APP")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("deploy", cmd_deploy, "upload a bundle (a directory or .tar.gz/.zip) to a branch")
    p.add_argument(
        "source", metavar="DIR|FILE", help=f"a directory with a {MANIFEST}, or an archive"
    )
    p.add_argument("--app", required=True, help="the app (created from the manifest if new)")
    p.add_argument("--branch", default=DEFAULT_BRANCH, help="the branch (default: main)")
    p.add_argument("--wait", action="store_true", help="wait until the preview URL answers")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for the upload and --wait")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")

    p = add("runtimes", cmd_runtimes, "list runtimes: built-in and uploaded")
    p.add_argument("--json", action="store_true", help="print JSON")

    runtime = sub.add_parser(
        "runtime", help="upload, show or remove a runtime", description="manage uploaded runtimes"
    )
    runtime_sub = runtime.add_subparsers(dest="runtime_command", metavar="ACTION", required=True)
    p = runtime_sub.add_parser(
        "push", help=f"upload a runtime (a directory with {RUNTIME_TOML} and rootfs/, or archive)"
    )
    _global_flags(p, suppress=True)
    p.set_defaults(func=cmd_runtime_push)
    p.add_argument("name", metavar="NAME")
    p.add_argument("source", metavar="DIR|FILE")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the upload")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p = runtime_sub.add_parser("show", help="show a runtime as JSON")
    _global_flags(p, suppress=True)
    p.set_defaults(func=cmd_runtime_show)
    p.add_argument("name", metavar="NAME")
    p = runtime_sub.add_parser("rm", help="remove an uploaded runtime no app uses")
    _global_flags(p, suppress=True)
    p.set_defaults(func=cmd_runtime_rm)
    p.add_argument("name", metavar="NAME")

    p = add("rollback", cmd_rollback, "return a branch to its previous bundle (APP: main)")
    p.add_argument("target", metavar="APP[/BRANCH]")

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
