"""`make demo`: run the gateway with a demo app and print what to try.

The demo keeps its state in ./demo-data (git-ignored), so it needs no root and no /var/lib, and
starting it twice gives the same apps back.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from gateway.server import serve

DEMO_DIR = Path("demo-data")
DEMO_SITE = Path(__file__).resolve().parent / "demo_site"


def write_demo_config(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data_dir = directory.absolute() / "data"
    # Unix socket paths are short (108 bytes): keep instance sockets under /tmp.
    run_dir = Path(tempfile.gettempdir()) / f"dorm-demo-{os.getuid()}"
    config = directory / "dorm.toml"
    config.write_text(f"""# Written by `make demo`; edit freely.
[gateway]
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:8081"
domains = ["localhost"]
data_dir = "{data_dir}"
run_dir = "{run_dir}"

[apps.hello]
runtime = "command"
command = ["{sys.executable}", "app.py"]
app_dir = "{DEMO_SITE}"   # shown read-only at /app inside the sandbox
idle_timeout = "30s"
env = {{ GREETING = "welcome to dorm" }}
""")
    return config


def print_guide(data_dir: Path) -> None:
    token_file = data_dir / "admin.token"
    print(
        f"""
dorm demo — a scale-to-zero gateway. The app `hello` is asleep until you ask for it:

  curl http://hello.localhost:8080/                 # wakes it (cold start), then answers
  curl http://hello.localhost:8080/stream           # a streamed response
  curl -H 'Host: hello.localhost' http://127.0.0.1:8080/   # if *.localhost does not resolve

Branch previews (a branch is its own instance):
  export DORM_ADMIN_URL=http://127.0.0.1:8081 DORM_ADMIN_TOKEN=$(cat {token_file})
  curl -X PUT -H "Authorization: Bearer $DORM_ADMIN_TOKEN" \\
       -d '{{"env": {{"GREETING": "preview"}}}}' $DORM_ADMIN_URL/v1/apps/hello/branches/feature-x
  curl http://feature-x--hello.localhost:8080/

Watch it: `.venv/bin/dorm ps` (instances), `.venv/bin/dorm logs hello`, and after 30 s idle
the instance is evicted — the next request wakes a new process (note the instance id).
Stop with Ctrl-C.
""",
        flush=True,
    )


def main() -> int:
    config = write_demo_config(DEMO_DIR)
    print_guide(DEMO_DIR.absolute() / "data")
    return serve(str(config))


if __name__ == "__main__":
    raise SystemExit(main())
