"""Operator runtime bundles: upload, list, use from apps, refuse bad ones, delete, survive restarts.

The end-to-end tests build a real root filesystem: a tiny HTTP server written in C, compiled with
`gcc -static`, at /bin/server in the runtime's rootfs, plus a marker file. The server reports what
it can see, which proves the app ran inside the runtime's root (the marker is there, the host's
python3 is not) with the app's bundle at /app.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.appspec import SpecError, parse_app_spec
from gateway.cli import main
from gateway.runtimespec import RuntimeDef, parse_runtime_def, resolve_app
from sandboxes import detect_isolation
from tests.conftest import Gateway
from tests.test_bundles import E, F, targz, zipped

SERVER_C = r"""
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>

static void slurp(const char *path, char *out, size_t cap) {
    FILE *f = fopen(path, "r");
    size_t n = 0;
    if (f) { n = fread(out, 1, cap - 1, f); fclose(f); }
    out[n] = 0;
    while (n && (out[n - 1] == '\n')) out[--n] = 0;
    if (!f) strcpy(out, "-");
}

int main(int argc, char **argv) {
    const char *entry = argc > 1 ? argv[1] : "";
    const char *port = getenv("PORT"), *path = getenv("DORM_SOCKET");
    const char *name = getenv("DORM_RUNTIME"), *greet = getenv("GREETING");
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    long long started = (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    char app[256], marker[256], where[128], file[512];
    snprintf(file, sizeof file, "/app/%s", entry);
    slurp(file, app, sizeof app);
    slurp("/etc/runtime-marker", marker, sizeof marker);
    int fd;
    if (port) {
        struct sockaddr_in a; memset(&a, 0, sizeof a);
        a.sin_family = AF_INET; a.sin_port = htons(atoi(port));
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        fd = socket(AF_INET, SOCK_STREAM, 0);
        int one = 1; setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&a, sizeof a)) { perror("bind"); return 3; }
        snprintf(where, sizeof where, "tcp:%s", port);
    } else {
        struct sockaddr_un a; memset(&a, 0, sizeof a);
        a.sun_family = AF_UNIX; strncpy(a.sun_path, path ? path : "", sizeof a.sun_path - 1);
        fd = socket(AF_UNIX, SOCK_STREAM, 0);
        unlink(a.sun_path);
        if (bind(fd, (struct sockaddr *)&a, sizeof a)) { perror("bind"); return 3; }
        snprintf(where, sizeof where, "unix:%s", a.sun_path);
    }
    if (listen(fd, 64)) { perror("listen"); return 3; }
    signal(SIGCHLD, SIG_IGN);
    char body[2048], head[256], req[8192];
    int n = snprintf(body, sizeof body,
        "hello from runtime %s entry=%s app=%s marker=%s python3=%s listen=%s greeting=%s "
        "started=%lld\n", name ? name : "-", entry, app, marker,
        access("/usr/bin/python3", F_OK) == 0 ? "yes" : "no", where, greet ? greet : "-",
        started);
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c < 0) continue;
        if (fork() == 0) {
            size_t got = 0;
            while (got < sizeof req - 1) {
                ssize_t r = read(c, req + got, sizeof req - 1 - got);
                if (r <= 0) break;
                got += r; req[got] = 0;
                if (strstr(req, "\r\n\r\n")) break;
            }
            int h = snprintf(head, sizeof head, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                "Content-Length: %d\r\nConnection: close\r\n\r\n", n);
            write(c, head, h);
            write(c, body, n);
            close(c);
            _exit(0);
        }
        close(c);
    }
}
"""


@functools.cache
def static_server() -> Path | str:
    """The compiled static server, or the reason it cannot be built here."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return "gcc is not installed"
    # Named by the source's hash (str hashes are salted per process; sha256 is stable).
    out = Path(
        f"/tmp/dorm-test-runtime-server-{hashlib.sha256(SERVER_C.encode()).hexdigest()[:16]}"
    )
    if out.exists():
        return out
    src = out.with_suffix(".c")
    src.write_text(SERVER_C)
    done = subprocess.run(
        [gcc, "-static", "-O2", "-o", str(out) + ".tmp", str(src)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return f"gcc -static failed: {done.stderr.strip()[:300]}"
    Path(str(out) + ".tmp").rename(out)
    return out


def _needs_sandbox_and_gcc() -> str | None:
    level = detect_isolation()
    if level != "sandbox":
        return f"needs sandboxes; this host: {level}"
    server = static_server()
    return server if isinstance(server, str) else None


SANDBOX_SKIP = _needs_sandbox_and_gcc()
needs_sandbox = pytest.mark.skipif(SANDBOX_SKIP is not None, reason=SANDBOX_SKIP or "")

UNIX_TOML = b"""
description = "a static C server"
command = ["/bin/server", "{entry}"]
env = { GREETING = "from-runtime" }
ready = { path = "/healthz" }
startup_timeout = "20s"
pool = true
"""
TCP_TOML = b'command = ["/bin/server", "{entry}"]\nlisten = "tcp"\nport = 8080\n'
EXE = b"#!/nonexistent\n"  # enough for uploads that never start an instance


def runtime_archive(toml: bytes = UNIX_TOML, server: bytes | None = None) -> bytes:
    """A runtime bundle: runtime.toml and rootfs/ with /bin/server and a marker in /etc."""
    if server is None:
        built = static_server()
        server = built.read_bytes() if isinstance(built, Path) else EXE
    return targz(
        F("runtime.toml", toml),
        E("rootfs", "dir"),
        F("rootfs/bin/server", server, 0o755),
        F("rootfs/etc/runtime-marker", b"marker-42\n"),
    )


def put_runtime(
    gw: Gateway, name: str, data: bytes, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.admin_port, timeout=60)
    try:
        conn.request(
            "PUT",
            f"/v1/runtimes/{name}",
            body=data,
            headers={"Authorization": f"Bearer {gw.token}", **(headers or {})},
        )
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def deploy(gw: Gateway, app: str, data: bytes, branch: str = "main") -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.admin_port, timeout=60)
    try:
        conn.request(
            "PUT",
            f"/v1/apps/{app}/branches/{branch}/bundle",
            body=data,
            headers={"Authorization": f"Bearer {gw.token}"},
        )
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def app_bundle(runtime: str, text: bytes = b"hi-from-app", **extra: str) -> bytes:
    manifest = f'runtime = "{runtime}"\nentry = "greeting.txt"\nidle_timeout = "1s"\n'
    manifest += "".join(f'{k} = "{v}"\n' for k, v in extra.items())
    return targz(F("dorm.toml", manifest.encode()), F("greeting.txt", text))


def runtimes(gw: Gateway) -> dict[str, dict[str, Any]]:
    status, body = gw.admin("GET", "/v1/runtimes")
    assert status == 200, body
    return {r["name"]: r for r in body["runtimes"]}


def fields(body: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in body.split() if "=" in part)


def stored_trees(gw: Gateway) -> set[str]:
    root = gw.data_dir / "bundles"
    return {p.name for p in root.iterdir() if p.name != "tmp"}


# -- runtime.toml, without a gateway --------------------------------------------------------------
@pytest.mark.parametrize(
    ("toml", "field"),
    [
        ({}, "command"),
        ({"command": []}, "command"),
        ({"command": ["server"]}, "command.0"),
        ({"command": ["/bin/s", "{nope}"]}, "command.1"),
        ({"command": ["/bin/s", "{entry!r}"]}, "command.1"),
        ({"command": ["/bin/s", "{entry"]}, "command.1"),
        ({"command": ["/bin/{entry}"]}, "command.0"),
        ({"command": ["/bin/s"], "listen": "udp"}, "listen"),
        ({"command": ["/bin/s"], "port": 80}, "port"),
        ({"command": ["/bin/s"], "listen": "tcp", "port": 0}, "port"),
        ({"command": ["/bin/s"], "env": {"PORT": "1"}}, "env.PORT"),
        ({"command": ["/bin/s"], "ready": {"path": "healthz"}}, "ready.path"),
        ({"command": ["/bin/s"], "ready": {"pth": "/h"}}, "ready.pth"),
        ({"command": ["/bin/s"], "listen": "tcp", "ready": {"path": "/h"}}, "ready.path"),
        ({"command": ["/bin/s"], "startup_timeout": "forever"}, "startup_timeout"),
        ({"command": ["/bin/s"], "pool": "yes"}, "pool"),
        ({"command": ["/bin/s"], "colour": "red"}, "colour"),
    ],
)
def test_runtime_toml_errors_name_the_field(toml: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_runtime_def(toml)
    assert info.value.field == field, info.value


def test_runtime_toml_round_trip_and_app_resolution() -> None:
    rd = parse_runtime_def(
        {
            "command": ["/usr/bin/node", "{entry}", "--port={port}", "{{literal}}"],
            "listen": "tcp",
            "env": {"NODE_ENV": "production"},
            "startup_timeout": "30s",
            "pool": True,
        }
    )
    assert rd.port == 8080 and rd.pool and rd.startup_timeout == 30.0
    assert parse_runtime_def(rd.to_json()) == rd
    app = parse_app_spec("web", {"runtime": "node", "entry": "server.js"})
    resolved = resolve_app(app, rd)
    assert (resolved.port, resolved.isolation, resolved.startup_timeout) == (8080, "sandbox", 30)
    assert rd.argv(resolved) == ["/usr/bin/node", "server.js", "--port=8080", "{literal}"]
    unix = RuntimeDef(command=("/bin/server", "{socket}"), ready_path="/up")
    assert resolve_app(app, unix).health == "/up" and resolve_app(app, unix).port is None
    # An uploaded runtime's entry is the runtime's business (a script, a jar), not module:attr.
    with pytest.raises(SpecError, match="entry"):
        parse_app_spec("web", {"runtime": "python-asgi", "entry": "server.js"})
    with pytest.raises(SpecError, match="runtime"):
        parse_app_spec("web", {"runtime": "Node_JS"})


# -- refusals: nothing changes ---------------------------------------------------------------------
def state(gw: Gateway) -> dict[str, Any]:
    return {
        "runtimes": runtimes(gw),
        "stored": stored_trees(gw),
        "tmp": sorted(p.name for p in (gw.data_dir / "bundles" / "tmp").iterdir()),
    }


RT = F("runtime.toml", b'command = ["/bin/server"]\n')
ROOT_DIR = E("rootfs", "dir")
SERVER = F("rootfs/bin/server", EXE, 0o755)
REFUSED: dict[str, tuple[bytes, str, str]] = {
    "no-runtime-toml": (targz(ROOT_DIR, SERVER), "manifest", "no runtime.toml"),
    "bad-toml": (targz(F("runtime.toml", b"command = ["), SERVER), "manifest", "not valid TOML"),
    "no-command": (targz(F("runtime.toml", b'listen = "unix"\n'), SERVER), "manifest.command", ""),
    "unknown-key": (
        targz(F("runtime.toml", b'command = ["/bin/server"]\nimage = "x"\n'), SERVER),
        "manifest.image",
        "unknown field",
    ),
    "bad-listen": (
        targz(F("runtime.toml", b'command = ["/bin/server"]\nlisten = "udp"\n'), SERVER),
        "manifest.listen",
        "",
    ),
    "no-rootfs": (targz(RT, F("bin/server", EXE, 0o755)), "bundle", "rootfs/"),
    "no-program": (
        targz(RT, ROOT_DIR, F("rootfs/bin/other", EXE, 0o755)),
        "manifest.command.0",
        "",
    ),
    "not-executable": (targz(RT, ROOT_DIR, F("rootfs/bin/server", EXE)), "manifest.command.0", ""),
    "program-under-tmp": (
        targz(
            F("runtime.toml", b'command = ["/tmp/server"]\n'), F("rootfs/tmp/server", EXE, 0o755)
        ),
        "manifest.command.0",
        "/tmp",
    ),
    "traversal": (targz(RT, SERVER, F("../evil", b"x")), "bundle", "'..'"),
    "absolute": (targz(RT, SERVER, F("/etc/evil", b"x")), "bundle", "absolute"),
    "symlink-escape": (
        targz(RT, SERVER, E("rootfs/lib", "sym", target="../../../lib")),
        "bundle",
        "resolves outside",
    ),
    "device": (targz(RT, SERVER, E("rootfs/dev-null", "chr")), "bundle", "device"),
    "setuid": (targz(RT, F("rootfs/bin/server", EXE, 0o4755)), "bundle", "setuid"),
    "zip-traversal": (zipped(RT, SERVER, F("../evil", b"x")), "bundle", "'..'"),
    "not-an-archive": (b"plain text\n" * 10, "format", "not a gzip"),
}


def test_bad_runtime_bundles_are_refused_with_nothing_changed(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory()
    status, body = put_runtime(gw, "keep", runtime_archive(server=EXE))
    assert status == 201, body
    before = state(gw)
    for case, (data, field, message) in sorted(REFUSED.items()):
        for name in ("keep", "fresh"):  # neither a replacement nor a new runtime happens
            status, body = put_runtime(gw, name, data)
            assert status == 400, (case, body)
            assert body["error"]["field"] == field, (case, body)
            assert message in body["error"]["message"], (case, body)
            assert state(gw) == before, case
    for bad, why in (("Bad_Name", "DNS label"), ("static", "built-in"), ("a" * 64, "DNS label")):
        status, body = put_runtime(gw, bad, runtime_archive(server=EXE))
        assert (status, body["error"]["field"]) == (400, "name"), body
        assert why in body["error"]["message"]
    wrong = {"X-Content-SHA256": "0" * 64}
    status, body = put_runtime(gw, "fresh", runtime_archive(server=EXE), wrong)
    assert (status, body["error"]["field"]) == (400, "x-content-sha256"), body
    assert state(gw) == before


def test_apps_must_name_an_existing_runtime(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory()
    status, body = gw.admin("PUT", "/v1/apps/web", {"runtime": "node", "entry": "server.js"})
    assert (status, body["error"]["field"]) == (400, "runtime"), body
    assert "no runtime named 'node'" in body["error"]["message"]
    status, body = deploy(gw, "web", app_bundle("node"))
    assert (status, body["error"]["field"]) == (400, "manifest.runtime"), body
    assert gw.admin("GET", "/v1/apps/web")[0] == 404  # the refused deploy created nothing

    assert put_runtime(gw, "node", runtime_archive(server=EXE))[0] == 201
    # Its command uses {entry}: an app without one is refused, naming `entry`.
    status, body = gw.admin("PUT", "/v1/apps/web", {"runtime": "node"})
    assert (status, body["error"]["field"]) == (400, "entry"), body
    status, body = gw.admin("PUT", "/v1/apps/web", {"runtime": "node", "entry": "a", "port": 9})
    assert (status, body["error"]["field"]) == (400, "port"), body
    gw.put_app("web", {"runtime": "node", "entry": "server.js"})

    # Process isolation cannot provide the runtime's root filesystem: 503 with the reason.
    answer = gw.request("/", host="web.localhost")
    assert answer.status == 503, answer.body
    assert b"sandbox isolation" in answer.body

    status, body = gw.admin("DELETE", "/v1/runtimes/node")
    assert (status, body["error"]["field"]) == (409, "runtime"), body
    assert "web" in body["error"]["message"]
    status, body = gw.admin("GET", "/v1/runtimes/node")
    assert status == 200 and body["used_by"] == ["web"], body
    assert gw.admin("DELETE", "/v1/runtimes/static")[0] == 400
    assert gw.admin("DELETE", "/v1/runtimes/nothing")[0] == 404
    assert gw.admin("GET", "/v1/runtimes/nothing")[0] == 404


def test_cli_push_list_rm(
    gateway_factory: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gw: Gateway = gateway_factory()
    flags = ["--admin-url", f"http://127.0.0.1:{gw.admin_port}", "--token", gw.token]
    src = tmp_path / "rt"
    (src / "rootfs" / "bin").mkdir(parents=True)
    (src / "runtime.toml").write_bytes(b'command = ["/bin/server", "{entry}"]\n')
    (src / "rootfs" / "bin" / "server").write_bytes(EXE)
    (src / "rootfs" / "bin" / "server").chmod(0o755)

    assert main([*flags, "runtime", "push", "tiny", str(src)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("uploaded runtime tiny (")
    digest = runtimes(gw)["tiny"]["digest"]
    assert digest in stored_trees(gw)
    assert main([*flags, "runtime", "push", "tiny", str(src)]) == 0  # same tree, same digest
    assert capsys.readouterr().out.startswith("replaced runtime tiny (" + digest[:12])

    assert main([*flags, "runtimes"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[:4] == ["NAME", "KIND", "DIGEST", "SIZE"]
    table = {r.split()[0]: r.split() for r in rows}
    assert table["tiny"][1:3] == ["uploaded", digest[:12]]
    assert {"command", "python-asgi", "python-wsgi", "static"} <= set(table)
    assert main([*flags, "runtimes", "--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed["tiny"]["size"] > 0 and listed["tiny"]["uploaded"] > time.time() - 60
    assert listed["static"]["builtin"] is True

    assert main([*flags, "runtime", "rm", "tiny"]) == 0
    assert capsys.readouterr().out == "removed runtime tiny\n"
    assert "tiny" not in runtimes(gw)
    deadline = time.monotonic() + 10
    while digest in stored_trees(gw) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert digest not in stored_trees(gw)
    assert main([*flags, "runtime", "rm", "tiny"]) == 1
    assert "no runtime named 'tiny'" in capsys.readouterr().err
    (src / "runtime.toml").unlink()
    assert main([*flags, "runtime", "push", "tiny", str(src)]) == 2
    assert "no runtime.toml" in capsys.readouterr().err


# -- end to end, sandboxed -------------------------------------------------------------------------
def wake(gw: Gateway, host: str) -> dict[str, str]:
    answer = gw.request("/", host=host)
    assert answer.status == 200, (answer.status, answer.body, gw.log()[-3000:])
    return fields(answer.body.decode())


@needs_sandbox
def test_uploaded_runtime_serves_an_app_from_its_own_rootfs(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory('isolation = "auto"')
    status, body = put_runtime(gw, "cserver", runtime_archive())
    assert status == 201, body
    assert body["definition"]["pool"] is True and body["description"] == "a static C server"
    listed = runtimes(gw)["cserver"]
    assert listed["digest"] == body["digest"] and listed["size"] == body["size"] > 0
    assert listed["uploaded"] > time.time() - 60 and listed["builtin"] is False

    status, answer = deploy(gw, "web", app_bundle("cserver"))
    assert status == 201, answer
    first = wake(gw, "web.localhost")
    assert first["app"] == "hi-from-app"  # the app's bundle is /app
    assert first["marker"] == "marker-42"  # the runtime's rootfs is /
    assert first["python3"] == "no"  # and the host's system directories are not
    assert first["entry"] == "greeting.txt" and first["greeting"] == "from-runtime"
    assert first["listen"] == "unix:/run/dorm/http.sock"
    inst = gw.instance("web")
    assert inst is not None and inst["isolation"] == "sandbox"
    # runtime.toml says pool = true: its sandbox shape gets a warm pool
    assert "cserver" in {p["runtime"] for p in gw.admin("GET", "/v1/pools")[1]["pools"]}

    gw.wait_state("web", "cold")  # idle_timeout 1s: evicted
    second = wake(gw, "web.localhost")
    assert second["started"] != first["started"] and second["marker"] == "marker-42"

    # Another branch of the app runs its own bundle on the same runtime.
    status, answer = deploy(gw, "web", app_bundle("cserver", b"v2"), branch="feature")
    assert status == 201, answer
    assert wake(gw, "feature--web.localhost")["app"] == "v2"

    status, err = gw.admin("DELETE", "/v1/runtimes/cserver")
    assert status == 409 and "web" in err["error"]["message"], err

    # Restart: the runtime, its tree and the app using it all survive.
    gw.stop()
    gw.start()
    assert runtimes(gw)["cserver"]["digest"] == body["digest"]
    assert body["digest"] in stored_trees(gw)
    assert wake(gw, "web.localhost")["marker"] == "marker-42"

    # Unused: deleted, and its tree collected.
    assert gw.admin("DELETE", "/v1/apps/web")[0] == 200
    status, gone = gw.admin("DELETE", "/v1/runtimes/cserver")
    assert (status, gone) == (200, {"deleted": "cserver"})
    assert "cserver" not in runtimes(gw)
    deadline = time.monotonic() + 10
    while body["digest"] in stored_trees(gw) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert body["digest"] not in stored_trees(gw)


@needs_sandbox
def test_tcp_runtime_and_replacing_a_runtime_restarts_its_apps(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory('isolation = "auto"')
    assert put_runtime(gw, "ctcp", runtime_archive(TCP_TOML))[0] == 201
    gw.put_app("tcpapp", {"runtime": "ctcp", "entry": "none", "idle_timeout": "1m"})
    first = wake(gw, "tcpapp.localhost")
    assert first["listen"] == "tcp:8080" and first["marker"] == "marker-42"
    assert first["greeting"] == "-"
    # no `pool = true` in its runtime.toml: no warm pool for it
    assert "ctcp" not in {p["runtime"] for p in gw.admin("GET", "/v1/pools")[1]["pools"]}

    # Same name, new definition: the running instance is replaced on the next request.
    toml = TCP_TOML.replace(b"8080", b"9090") + b'env = { GREETING = "v2" }\n'
    status, body = put_runtime(gw, "ctcp", runtime_archive(toml))
    assert status == 200, body
    assert body["used_by"] == ["tcpapp"]
    deadline = time.monotonic() + 15
    second = wake(gw, "tcpapp.localhost")
    while second["greeting"] != "v2" and time.monotonic() < deadline:
        time.sleep(0.1)
        second = wake(gw, "tcpapp.localhost")
    assert second["listen"] == "tcp:9090" and second["greeting"] == "v2"
