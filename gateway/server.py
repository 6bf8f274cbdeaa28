"""`dorm serve`: wire config, registry, fork server, data plane and admin API together, and run.

Start-up order matters: the fork server is started before anything else creates threads, stale
instance directories from a previous run are removed before any instance can start, and the
listeners open last, when everything behind them is ready. Shutdown is the reverse: stop accepting,
let in-flight requests finish (up to shutdown_timeout), stop every instance, then the fork server.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import uvloop

from gateway import compiled
from gateway.admin import start_admin_server
from gateway.auth import load_admin_token
from gateway.bundles import BundleLimits, BundleStore
from gateway.coldstart import ColdStartApi
from gateway.config import Config, ConfigError, GatewayConfig, load_config, split_host_port
from gateway.deploy import DeployApi
from gateway.forkserver import remove_tree
from gateway.instances import InstanceManager
from gateway.proxy import DataPlane
from gateway.registry import Registry
from gateway.runner import RunnerHook
from gateway.runtime_bundles import RuntimeApi
from gateway.static import StaticFiles
from gateway.upstream import UpstreamConnection

log = logging.getLogger("dorm")
# sun_path is 108 bytes; "<run_dir>/<instance id>/http.sock" must fit with room for the id.
MAX_RUN_DIR = 80


def serve(config_path: str | None = None) -> int:
    """Run the gateway until SIGTERM/SIGINT. Returns the process exit code."""
    logging.basicConfig(
        level=os.environ.get("DORM_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(config_path)
        _check_paths(config.gateway)
    except ConfigError as exc:
        print(f"dorm: {exc}", file=sys.stderr)
        return 1
    try:
        return uvloop.run(_run(config))
    except ConfigError as exc:
        print(f"dorm: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"dorm: {exc.strerror or exc}: {getattr(exc, 'filename', '') or ''}".rstrip(": "),
            file=sys.stderr,
        )
        return 1


def _check_paths(cfg: GatewayConfig) -> None:
    if len(str(cfg.run_path.absolute())) > MAX_RUN_DIR:
        raise ConfigError(
            f"run_dir {cfg.run_path} is too long for Unix socket paths (max {MAX_RUN_DIR} "
            "characters); set gateway.run_dir to a shorter directory such as /run/dorm"
        )


def _listen(address: str, key: str) -> socket.socket:
    host, port = split_host_port(address, key)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{key}: cannot listen on {address}: {exc.strerror}") from None
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def _run(config: Config) -> int:
    cfg = config.gateway
    token = load_admin_token(cfg, create=True)
    # Bind first: a taken port should fail the start before anything is spawned.
    public_sock = _listen(cfg.listen, "listen")
    await asyncio.to_thread(_clean_run_dir, cfg)
    db_path = Path(cfg.data_dir) / "dorm.sqlite"
    registry = Registry(db_path)
    await registry.open()
    for spec in config.apps:
        if registry.get_app(spec.name) != spec:
            await registry.put_app(spec)
    manager = InstanceManager(cfg, registry, config.pool)
    manager.upstream_factory = UpstreamConnection
    static = StaticFiles()  # the static runtime: bundles served by the gateway, no process
    manager.static_site = static.site
    plane = DataPlane(cfg, manager)
    store = BundleStore(
        Path(cfg.data_dir) / "bundles",
        BundleLimits(
            max_size=cfg.max_bundle_size,
            max_unpacked=cfg.max_bundle_unpacked,
            max_files=cfg.max_bundle_files,
        ),
    )
    manager.bundle_path = store.path
    deploys = DeployApi(cfg, registry, manager, store)
    runtimes = RuntimeApi(registry, manager, store, deploys.request_gc)
    runner = RunnerHook(config, manager)  # the code runner: an internal instance (docs/runner.md)
    runner.register()
    await deploys.start()
    await manager.start()
    plane.start()
    loop = asyncio.get_running_loop()
    public = await loop.create_server(plane.protocol, sock=public_sock)  # type: ignore[arg-type]
    coldstarts = ColdStartApi(manager)  # start timing and warm pools
    routes = [*deploys.routes(), *runtimes.routes(), *runner.routes(), *coldstarts.routes()]
    admin = await start_admin_server(cfg, registry, manager, token, extra_routes=routes)
    # What is loaded by now (modules, the registry: ~70 MiB of objects for 100,000 apps) lives as
    # long as the gateway. Frozen, the cyclic GC never walks it again: a full collection would
    # otherwise pause the data plane for as long as that walk takes.
    gc.collect()
    gc.freeze()
    log.info(
        "dorm serving %s on http://%s (admin http://%s, data %s, db %s; %s)",
        ", ".join(cfg.domains),
        cfg.listen,
        cfg.admin_listen,
        cfg.data_dir,
        db_path,
        compiled.describe(),
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining in-flight requests (up to %gs)", cfg.shutdown_timeout)
    public.close()
    admin.close()
    plane.close_idle()
    deadline = time.monotonic() + cfg.shutdown_timeout
    while plane.in_flight() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    plane.close_tunnels()
    plane.stop()
    await manager.shutdown(timeout=max(0.0, deadline - time.monotonic()))
    static.close()
    for conn in list(plane.connections):
        conn.abort()
    await deploys.close()
    await registry.close()
    log.info("stopped")
    return 0


def _clean_run_dir(cfg: GatewayConfig) -> None:
    """Instance directories left by a previous run hold dead sockets; start from nothing."""
    run = cfg.run_path
    if run.exists():
        for entry in run.iterdir():
            remove_tree(entry)  # tenants wrote in there: no recursion, no symlink followed
    run.mkdir(parents=True, exist_ok=True, mode=0o711)
