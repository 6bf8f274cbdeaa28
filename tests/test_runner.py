"""The code runner end to end: real gateway, real runner service, real sandboxes, Piston requests.

Every request goes through the gateway's public listener with `Host: run.localhost` (or the admin
listener), exactly as a Piston client sends it. The hostile list of the sandboxes issue is sent as
snippets; each has its exact expected `run` result, and after each the runner must still answer a
normal execution and have left no process with a runner uid and no sandbox cgroup behind.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Gateway, make_gateway

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the runner needs root: it confines every execution in a sandbox"
)

RUNNER_HOST = "run.localhost"
RUNNER_UIDS = range(400000, 410000)
RUNNER_CONFIG = """
[runner]
rate_per_minute = 0
max_per_client = 0
queue = 200
"""


def start_runner_gateway(tmp: Path, runner_config: str) -> Gateway:
    """A sandboxing gateway with a [runner] section; the runner is woken before returning."""
    gw = make_gateway(tmp, 'isolation = "auto"')
    gw.data_dir.parent.mkdir(parents=True, exist_ok=True)
    gw.config_path.write_text(gw.config_path.read_text() + runner_config)
    gw.start()
    status, body, _ = execute(gw, {"language": "bash", "version": "*", "files": [{"content": ""}]})
    assert status == 200, body
    return gw


def stop_gateway(gw: Gateway) -> None:
    if gw.proc is not None and gw.proc.poll() is None:
        gw.stop(timeout=30)
    shutil.rmtree(gw.run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = start_runner_gateway(tmp_path_factory.mktemp("runner"), RUNNER_CONFIG)
    yield gateway
    stop_gateway(gateway)
    assert runner_processes() == []


def execute(
    gw: Gateway,
    body: Any,
    *,
    path: str = "/api/v2/execute",
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> tuple[int, Any, dict[str, str]]:
    resp = gw.request(
        path,
        host=RUNNER_HOST,
        method="POST",
        body=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        timeout=timeout,
    )
    return resp.status, json.loads(resp.body) if resp.body else None, resp.headers


def run(gw: Gateway, language: str, code: str, **fields: Any) -> dict[str, Any]:
    """Execute one file; assert a 200 and return the `run` stage."""
    body = {"language": language, "version": "*", "files": [{"content": code}], **fields}
    status, answer, _ = execute(gw, body)
    assert status == 200, answer
    result: dict[str, Any] = answer["run"]
    return result


def runner_processes() -> list[int]:
    """Pids of processes running with a runner uid anywhere on the host."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("Uid:"):
                    if int(line.split()[1]) in RUNNER_UIDS:
                        found.append(int(entry.name))
                    break
        except (OSError, ValueError):
            continue
    return found


def sandbox_cgroups(gw: Gateway) -> list[str]:
    """Sandbox cgroups (not the pre-forked pool's idle-*) under this gateway's runner parents."""
    parent = next(
        line.split('"')[1]
        for line in gw.config_path.read_text().splitlines()
        if line.startswith("cgroup_parent")
    )
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            own[c] = path
    found = []
    for controller in ("memory", "pids", "cpu,cpuacct"):
        base = Path("/sys/fs/cgroup") / controller / own.get(controller.split(",")[0], "/")[1:]
        for runner_parent in base.glob(f"{parent}-runner-*"):
            found += [
                str(d) for d in runner_parent.iterdir() if d.is_dir() and "idle-" not in d.name
            ]
    return found


def assert_healthy(gw: Gateway) -> None:
    """A normal execution still works; nothing of the previous one is left running."""
    result = run(gw, "python", "print('still here')")
    assert (result["stdout"], result["code"], result["status"]) == ("still here\n", 0, None)
    deadline = time.monotonic() + 15  # teardown is asynchronous; generous on a loaded host
    while runner_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runner_processes() == []
    assert sandbox_cgroups(gw) == []


# -- the hostile list ------------------------------------------------------------------------------
FORK_BOMB = """
import os, time
n = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
except OSError as e:
    print("EAGAIN", e.errno, n >= 50)
"""
MEMORY_BOMB = """
a = []
while True:
    a.append(b"x" * 1_000_000)
"""
TMP_FILL = """
i = 0
try:
    while True:
        with open(f"/tmp/f{i}", "wb") as f:
            f.write(b"x" * 1_000_000)
        i += 1
except OSError as e:
    print(e.errno, i > 30)
"""
BIG_FILE_PY = """
try:
    with open("/tmp/big", "wb") as f:
        f.write(b"x" * 20_000_000)
except OSError as e:
    print(e.errno)
"""
BIG_FILE_C = """
#include <stdio.h>
#include <string.h>
int main(void) {
    static char b[65536];
    memset(b, 'x', sizeof b);
    FILE *f = fopen("/tmp/big", "w");
    for (int i = 0; i < 400; i++) fwrite(b, 1, sizeof b, f);
    fclose(f);
    puts("survived");
    return 0;
}
"""
ORPHAN = """
import os, time
if os.fork() == 0:
    if os.fork() == 0:
        time.sleep(60)
        os._exit(0)
    os._exit(0)
os.wait()
print("parent done", flush=True)
"""
KILL_ALL = """
import os, signal, time
pid = os.fork()
if pid == 0:
    time.sleep(60)
    os._exit(0)
os.kill(-1, signal.SIGKILL)
_, status = os.waitpid(pid, 0)
print("child", os.WTERMSIG(status))
"""
SETUID = """
import os
res = []
for f in (os.setuid, os.setgid, os.seteuid):
    try:
        f(0)
        res.append("ok")
    except OSError as e:
        res.append(e.errno)
print(res, os.getuid() in range(400000, 410000), os.getuid() == os.getgid())
"""
SYSCALLS = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
out = []
# keyctl, io_uring_setup, userfaultfd, bpf, mount, unshare(CLONE_NEWUSER)
for nr, args in ((250, (0,)), (425, (1, 0)), (323, (0,)), (321, (0, 0, 0)),
                 (165, (0, 0, 0, 0, 0)), (272, (0x10000000,))):
    r = libc.syscall(nr, *args)
    out.append((r, ctypes.get_errno()))
print(out)
"""
SYSCALLS_C = """
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    int r1 = unshare(CLONE_NEWUSER); int e1 = errno;
    int r2 = mount("none", "/tmp", "tmpfs", 0, 0); int e2 = errno;
    int r3 = setuid(0); int e3 = errno;
    int r4 = open("/usr/x", O_CREAT | O_WRONLY, 0644); int e4 = errno;
    long r5 = syscall(SYS_bpf, 0, 0, 0); int e5 = errno;
    printf("%d %d %d %d %d %d %d %d %ld %d\\n", r1, e1, r2, e2, r3, e3, r4, e4, r5, e5);
    return 0;
}
"""
READONLY = """
res = []
for p in ("/usr/x", "/x", "/etc/x", "/app/x", "/run/dorm/x"):
    try:
        open(p, "w")
        res.append("written")
    except OSError as e:
        res.append(e.errno)
print(res)
"""


def test_fork_bomb_is_contained(gw: Gateway) -> None:
    result = run(gw, "python", FORK_BOMB, run_timeout=3000)
    assert (result["stdout"], result["code"], result["signal"]) == ("EAGAIN 11 True\n", 0, None)
    assert result["status"] is None
    # The main shell forks once (`: &`), first, so it always gets to exit: 0, at once.
    bash = run(gw, "bash", ":(){ :|:& };: &", run_timeout=3000)
    assert (bash["code"], bash["signal"], bash["status"]) == (0, None, None)
    # The classic form forks the pipeline's two halves from the main shell, and the first half's
    # bomb can take every pid before the second fork: bash then retries it with growing sleeps
    # and the run ends at its time limit (1 run in 8 here, on an idle machine). Contained
    # either way.
    classic = run(gw, "bash", ":(){ :|:& };:", run_timeout=3000)
    assert (classic["code"], classic["signal"], classic["status"]) in (
        (0, None, None),
        (None, "SIGKILL", "TO"),
    )
    assert_healthy(gw)


def test_memory_bomb_is_killed(gw: Gateway) -> None:
    result = run(gw, "python", MEMORY_BOMB, run_memory_limit=64 * 1024**2)
    assert (result["code"], result["signal"], result["status"]) == (None, "SIGKILL", "SG")
    assert result["message"] == "Caught fatal signal 9 (out of memory: memory limit exceeded)"
    assert result["memory"] <= 64 * 1024**2
    assert_healthy(gw)


def test_tmp_fill_and_file_size(gw: Gateway) -> None:
    assert run(gw, "python", TMP_FILL)["stdout"] == "28 True\n"  # ENOSPC on the sandbox's /tmp
    assert run(gw, "python", BIG_FILE_PY)["stdout"] == "27\n"  # Python ignores SIGXFSZ: EFBIG
    c = run(gw, "c", BIG_FILE_C)  # C gets SIGXFSZ at RLIMIT_FSIZE (10 MB)
    assert (c["stdout"], c["code"], c["signal"], c["status"]) == ("", None, "SIGXFSZ", "SG")
    assert c["message"] == "Caught fatal signal 25"
    assert_healthy(gw)


def test_cpu_loop_and_sleep_time_out(gw: Gateway) -> None:
    cpu = run(gw, "python", "while True: pass", run_cpu_time=300, run_timeout=3000)
    assert (cpu["code"], cpu["signal"], cpu["status"]) == (None, "SIGKILL", "TO")
    assert cpu["message"] == "Time limit exceeded"
    assert 300 <= cpu["cpu_time"] < 1500
    sleep = run(gw, "python", "import time; time.sleep(30)", run_timeout=300)
    assert (sleep["code"], sleep["signal"], sleep["status"]) == (None, "SIGKILL", "TO")
    assert sleep["message"] == "Time limit exceeded (wall clock)"
    assert 300 <= sleep["wall_time"] < 3000
    assert_healthy(gw)


def test_double_fork_orphan_dies_with_the_program(gw: Gateway) -> None:
    result = run(gw, "python", ORPHAN)
    assert (result["stdout"], result["code"], result["status"]) == ("parent done\n", 0, None)
    assert result["wall_time"] < 3000  # the orphan's sleep did not hold the execution
    assert_healthy(gw)


def test_secrets_are_out_of_reach(gw: Gateway) -> None:
    paths = [
        "/etc/shadow",
        str(gw.data_dir),
        str(gw.data_dir / "dorm.sqlite"),
        str(gw.config_path),  # holds the admin token
        "/proc/1/environ",  # the sandbox's init: hidden (not dumpable, hidepid)
        "/etc/ssl/private",
        "/sys/fs/cgroup",
    ]
    code = (
        "import os\n"
        f"for p in {paths!r}:\n"
        "    try:\n"
        "        os.stat(p)\n"
        "        print(p, 'visible')\n"
        "    except OSError as e:\n"
        "        print(e.errno)\n"
        "print(sorted(os.environ))\n"
        "env = open('/proc/self/environ', 'rb').read()\n"
        f"print(b'DORM_RUNNER' in env, {gw.token!r}.encode() in env)\n"
    )
    result = run(gw, "python", code)
    lines = result["stdout"].splitlines()
    assert lines[: len(paths)] == ["2"] * len(paths), result
    assert lines[len(paths)] == str(["HOME", "LANG", "PATH", "PISTON_LANGUAGE", "TMPDIR"])
    assert lines[len(paths) + 1] == "False False"
    assert_healthy(gw)


def test_kill_minus_one_hits_only_the_sandbox(gw: Gateway) -> None:
    result = run(gw, "python", KILL_ALL)
    assert (result["stdout"], result["code"], result["status"]) == ("child 9\n", 0, None)
    assert gw.proc is not None and gw.proc.poll() is None
    assert_healthy(gw)


def test_no_network(gw: Gateway) -> None:
    code = (
        "import socket\n"
        "out = []\n"
        "try:\n"
        "    socket.socket(40, socket.SOCK_STREAM)  # AF_VSOCK\n"
        "except OSError as e:\n"
        "    out.append(e.errno)\n"
        f"for port in ({gw.port}, {gw.admin_port}):\n"
        "    s = socket.socket()\n"
        "    try:\n"
        "        s.connect(('127.0.0.1', port))\n"
        "        out.append('connected')\n"
        "    except OSError as e:\n"
        "        out.append(e.errno)\n"
        "out.append([name for _, name in socket.if_nameindex()])\n"
        "print(out)\n"
    )
    assert run(gw, "python", code)["stdout"] == "[1, 111, 111, ['lo']]\n"
    assert_healthy(gw)


def test_privilege_and_kernel_surface(gw: Gateway) -> None:
    assert run(gw, "python", SETUID)["stdout"] == "[1, 1, 1] True True\n"
    assert run(gw, "python", SYSCALLS)["stdout"] == str([(-1, 1)] * 6) + "\n"
    c = run(gw, "c", SYSCALLS_C)
    assert (c["stdout"], c["code"]) == ("-1 1 -1 1 -1 1 -1 30 -1 1\n", 0)
    assert run(gw, "python", READONLY)["stdout"] == "[30, 30, 30, 30, 13]\n"
    assert_healthy(gw)


def test_output_caps_truncate_and_kill(gw: Gateway) -> None:
    out = run(gw, "python", "print('x' * 100000)\nimport time; time.sleep(5)")
    assert (out["status"], out["signal"], out["code"]) == ("OL", "SIGKILL", None)
    assert out["message"] == "stdout length exceeded"
    assert out["stdout"] == "x" * 65536
    err = run(gw, "python", "import sys; sys.stderr.write('e' * 100000)")
    assert (err["status"], err["signal"], err["message"]) == (
        "EL",
        "SIGKILL",
        "stderr length exceeded",
    )
    assert err["stderr"] == "e" * 65536 and err["stdout"] == ""
    assert_healthy(gw)


# -- normal behaviour ------------------------------------------------------------------------------
def test_invalid_utf8_and_nul_bytes(gw: Gateway) -> None:
    result = run(gw, "python", "import sys; sys.stdout.buffer.write(b'a\\x00b\\xff\\xfec\\n')")
    assert result["stdout"] == "a\x00b\ufffd\ufffdc\n"
    assert result["output"] == result["stdout"]


def test_python_io_args_errors_and_files(gw: Gateway) -> None:
    body = {
        "language": "py",
        "version": "3",
        "files": [
            {
                "name": "main.py",
                "content": "import sys, helper\nprint(sys.argv, input(), helper.X)",
            },
            {"name": "helper.py", "content": "X = open('data/blob.bin', 'rb').read()"},
            {"name": "data/blob.bin", "content": "AP8=", "encoding": "base64"},
        ],
        "stdin": "hello",
        "args": ["a", "b c"],
    }
    status, answer, _ = execute(gw, body)
    assert status == 200, answer
    assert answer["language"] == "python" and answer["version"].startswith("3.")
    assert "compile" not in answer
    assert answer["run"]["stdout"] == "['main.py', 'a', 'b c'] hello b'\\x00\\xff'\n"
    crash = run(gw, "python", "x = 1\n1 / 0\n")
    assert (crash["code"], crash["status"], crash["message"]) == (
        1,
        "RE",
        "Exited with error status 1",
    )
    assert crash["stderr"] == (
        "Traceback (most recent call last):\n"
        '  File "/tmp/box/file0.code", line 2, in <module>\n'
        "    1 / 0\n"
        "    ~~^~~\n"
        "ZeroDivisionError: division by zero\n"
    )
    assert run(gw, "python", "raise SystemExit(3)")["code"] == 3
    assert "SyntaxError" in run(gw, "python", "print(")["stderr"]


def test_python_fresh_mode_matches_zygote(tmp_path: Path) -> None:
    fresh = start_runner_gateway(tmp_path, RUNNER_CONFIG + 'python_mode = "fresh"\n')
    try:
        code = "import sys, os\nprint(sys.argv, input(), os.getcwd())\n1/0"
        result = run(fresh, "python", code, stdin="in", args=["x"])
        assert result["stdout"] == "['file0.code', 'x'] in /tmp/box\n"
        assert result["code"] == 1 and result["stderr"].endswith(
            "ZeroDivisionError: division by zero\n"
        )
    finally:
        stop_gateway(fresh)


def test_bash_javascript_and_c(gw: Gateway) -> None:
    bash = run(gw, "sh", 'read x; echo "got $x $1"; echo oops >&2; exit 4', stdin="in", args=["A"])
    assert (bash["stdout"], bash["stderr"], bash["code"], bash["status"]) == (
        "got in A\n",
        "oops\n",
        4,
        "RE",
    )
    js = run(gw, "js", "console.log(process.argv.slice(2).join(','), 6 * 7)", args=["p", "q"])
    assert (js["stdout"], js["code"]) == ("p,q 42\n", 0)
    body = {
        "language": "c",
        "version": "*",
        "files": [
            {
                "name": "main.c",
                "content": '#include "util.h"\nint main(int c, char **v) { return twice(c); }',
            },
            {"name": "util.h", "content": "static int twice(int x) { return 2 * x; }"},
        ],
        "args": ["1", "2"],
    }
    status, answer, _ = execute(gw, body)
    assert status == 200, answer
    assert answer["compile"]["code"] == 0 and answer["compile"]["status"] is None
    assert answer["run"]["code"] == 6  # argc 3, doubled


def test_c_compile_error_is_the_compile_stage(gw: Gateway) -> None:
    body = {
        "language": "gcc",
        "version": "*",
        "files": [{"name": "m.c", "content": "int main() { return x; }"}],
    }
    status, answer, _ = execute(gw, body)
    assert status == 200, answer
    compiled = answer["compile"]
    assert (compiled["code"], compiled["status"], compiled["signal"]) == (1, "RE", None)
    assert "error: \u2018x\u2019 undeclared" in compiled["stderr"]
    assert answer["run"] == compiled  # Piston: run repeats the compile stage when it never ran


def test_traversal_names_are_refused(gw: Gateway) -> None:
    for name in ("../x", "/etc/x", "a/../../x"):
        body = {"language": "python", "version": "*", "files": [{"name": name, "content": "1"}]}
        status, answer, _ = execute(gw, body)
        assert status == 400 and answer["message"].startswith("files[0].name"), answer


def test_piston_errors(gw: Gateway) -> None:
    status, answer, _ = execute(
        gw, {"language": "cobol", "version": "*", "files": [{"content": ""}]}
    )
    assert (status, answer) == (400, {"message": "cobol-* runtime is unknown"})
    resp = gw.request(
        "/api/v2/execute",
        host=RUNNER_HOST,
        method="POST",
        body=b"{nope",
        headers={"Content-Type": "application/json"},
    )
    assert resp.status == 400 and "message" in json.loads(resp.body)
    resp = gw.request(
        "/api/v2/execute",
        host=RUNNER_HOST,
        method="POST",
        body=b"{}",
        headers={"Content-Type": "text/plain"},
    )
    assert (resp.status, json.loads(resp.body)) == (
        415,
        {"message": "requests must be of type application/json"},
    )
    status, answer, _ = execute(
        gw, {"language": "python", "version": "*", "files": [{"content": ""}], "run_timeout": 10**6}
    )
    assert (status, answer["message"]) == (
        400,
        "run_timeout cannot exceed the configured limit of 3000",
    )


def test_piston_clients_unchanged(gw: Gateway) -> None:
    """Requests shaped exactly as Piston's client libraries send them."""
    resp = gw.request("/api/v2/runtimes", host=RUNNER_HOST)
    assert resp.status == 200
    runtimes = json.loads(resp.body)
    names = {r["language"] for r in runtimes}
    assert {"python", "bash", "c", "javascript"} <= names
    c_entry = next(r for r in runtimes if r["language"] == "c")
    assert c_entry["runtime"] == "gcc" and "gcc" in c_entry["aliases"]
    assert "runtime" not in next(r for r in runtimes if r["language"] == "bash")
    # piston-client (npm): looks the version up in /runtimes, then posts every field.
    for language, code, expected in (
        ("python", "print(input())", "hi\n"),
        ("bash", "echo $1", "first\n"),
        ("c", '#include <stdio.h>\nint main(){puts("c ok");}', "c ok\n"),
        ("javascript", "console.log('js ok')", "js ok\n"),
    ):
        version = next(r["version"] for r in runtimes if r["language"] == language)
        body = {
            "language": language,
            "version": version,
            "files": [{"content": code}],
            "stdin": "hi",
            "args": ["first"],
            "compile_timeout": 10000,
            "run_timeout": 3000,
            "compile_memory_limit": -1,
            "run_memory_limit": -1,
        }
        status, answer, _ = execute(gw, body)
        assert status == 200, answer
        assert (answer["language"], answer["version"]) == (language, version)
        assert answer["run"]["stdout"] == expected, answer
        assert set(answer["run"]) == {
            "stdout",
            "stderr",
            "output",
            "code",
            "signal",
            "message",
            "status",
            "cpu_time",
            "wall_time",
            "memory",
        }
    # axios clients with baseURL ".../api/v2/piston" (the emkc.org layout), no file name.
    status, answer, _ = execute(
        gw,
        {"language": "python", "version": "3.x", "files": [{"content": "print(2)"}]},
        path="/api/v2/piston/execute",
    )
    assert status == 200 and answer["run"]["output"] == "2\n"
    # The admin listener answers the same API behind the admin token.
    conn = http.client.HTTPConnection("127.0.0.1", gw.admin_port, timeout=30)
    try:
        conn.request(
            "POST",
            "/api/v2/execute",
            body=json.dumps(
                {"language": "bash", "version": "*", "files": [{"content": "echo admin"}]}
            ),
            headers={"Authorization": f"Bearer {gw.token}", "Content-Type": "application/json"},
        )
        resp2 = conn.getresponse()
        assert resp2.status == 200
        assert json.loads(resp2.read())["run"]["stdout"] == "admin\n"
    finally:
        conn.close()
    status_code, _ = gw.admin("GET", "/api/v2/runtimes", token="wrong")
    assert status_code == 401


def test_hundred_concurrent_executions(gw: Gateway) -> None:
    results: dict[int, Any] = {}

    def one(i: int) -> None:
        body = {
            "language": "python",
            "version": "*",
            "files": [
                {"content": f"import sys\nprint({i}, input())\nprint('e{i}', file=sys.stderr)"}
            ],
            "stdin": f"token-{i}",
        }
        results[i] = execute(gw, body, timeout=120)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert len(results) == 100
    for i, (status, answer, _) in results.items():
        assert status == 200, answer
        assert answer["run"]["stdout"] == f"{i} token-{i}\n"
        assert answer["run"]["stderr"] == f"e{i}\n"
    assert_healthy(gw)


def test_dorm_run(gw: Gateway, tmp_path: Path) -> None:
    script = tmp_path / "hello.py"
    script.write_text(
        "import sys\nprint('out', sys.argv[1:], input())\n"
        "print('err', file=sys.stderr)\nsys.exit(5)\n"
    )
    cmd = [sys.executable, "-m", "gateway.cli", "run", str(script), "--config", str(gw.config_path)]
    proc = subprocess.run(
        [*cmd, "--stdin", "typed", "--arg", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (5, "out ['x'] typed\n", "err\n")
    killed = tmp_path / "k.sh"
    killed.write_text("kill -TERM $$\n")
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "run", str(killed), "--config", str(gw.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 128 + 15
    piped = (
        subprocess.run(
            [*cmd[:4], str(tmp_path / "cat.sh"), *cmd[5:], "--stdin", "-"],
            input="piped\n",
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        if (tmp_path / "cat.sh").write_text("cat\n")
        else None
    )
    assert piped is not None and (piped.returncode, piped.stdout) == (0, "piped\n")
