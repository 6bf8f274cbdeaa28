"""The byte format between the service and the in-sandbox init (boot.py), over one socket pair.

Why a socket pair and not files: the sandbox gets its code, stdin pipe and output pipes straight
from the service (SCM_RIGHTS), so no host directory is ever writable by untrusted code and the
spawner (the zygote every sandbox is forked from) never holds request data.

Service → boot: PREFIX (magic, header length) carrying three fds (stdin read end, stdout and
stderr write ends), then the JSON header, then each file's bytes in header order; for an
interactive stage (`"interactive": true` in the header), then any number of single bytes, each a
signal number the init sends the program.
Boot → service: STATUS (length), JSON status, then each artifact's bytes; then EOF.
"""

from __future__ import annotations

import struct
from typing import Final

MAGIC: Final = b"DRN1"
PREFIX: Final = struct.Struct("!4sI")
STATUS: Final = struct.Struct("!I")
MAX_HEADER: Final = 4 * 1024 * 1024
WORK_DIR: Final = "/tmp/box"  # the sandbox's cwd: a directory on its own /tmp tmpfs
MODES: Final = ("exec", "python", "compile")
