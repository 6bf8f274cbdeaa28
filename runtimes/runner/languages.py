"""Language definitions: one TOML file per language, built-ins here, more from an operator dir.

A definition says how to run (and maybe first compile) the request's files; the version is never
written down but asked of the installed toolchain at start, so `GET /api/v2/runtimes` always tells
the truth, and a language whose toolchain is missing is simply not offered.

Format (see runtimes/runner/languages/*.toml and docs/runner.md):

    language = "c"                      # the Piston language name
    runtime = "gcc"                     # optional, shown as Piston's `runtime`
    aliases = ["gcc"]
    version_command = ["gcc", "-dumpfullversion"]
    version_pattern = '(\\d+\\.\\d+\\.\\d+)'   # first group = the version
    compile = ["gcc", "-o", "a.out", "{sources}"]   # optional compile stage
    headers = [".h"]                    # left out of {sources}
    artifacts = ["a.out"]               # files the compile stage hands to the run stage
    run = ["./a.out", "{args}"]
    env = { KEY = "value" }             # optional, added to the program's environment
    binds = ["/opt/toolchain"]          # optional host directories shown read-only
    zygote = false                      # Python only: may run in the pre-imported interpreter

Placeholders: {main} the first UTF-8 file, {sources} every UTF-8 file but headers (several argv
entries), {args} the request's args (several entries), {python} dorm's base Python interpreter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUILTIN_DIR = Path(__file__).resolve().parent / "languages"
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
_KEYS = frozenset(
    {
        "language",
        "runtime",
        "aliases",
        "version_command",
        "version_pattern",
        "compile",
        "headers",
        "artifacts",
        "run",
        "env",
        "binds",
        "zygote",
    }
)
_NAME = re.compile(r"[a-z0-9][a-z0-9+#._-]{0,39}")


class LanguageError(ValueError):
    """A bad language definition; the message names the file and key."""


@dataclass(frozen=True, slots=True)
class Language:
    name: str
    version: str
    aliases: tuple[str, ...]
    run: tuple[str, ...]
    runtime: str | None = None
    compile: tuple[str, ...] | None = None
    headers: tuple[str, ...] = ()
    artifacts: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    binds: tuple[str, ...] = ()
    zygote: bool = False

    def to_piston(self) -> dict[str, Any]:
        """The `GET /api/v2/runtimes` entry; `runtime` only when there is one, as Piston does."""
        out: dict[str, Any] = {
            "language": self.name,
            "version": self.version,
            "aliases": list(self.aliases),
        }
        if self.runtime:
            out["runtime"] = self.runtime
        return out

    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


def python_interpreter() -> str:
    """dorm's base interpreter (not the virtualenv's): its prefix is bound into every sandbox."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for name in (f"python{version}", "python3"):
        candidate = Path(sys.base_prefix) / "bin" / name
        if candidate.exists():
            return str(candidate)
    return sys.executable


def python_path(interpreter: str) -> list[str]:
    """sys.path of `python3 main.py` without the script dir: what zygote mode recreates."""
    out = subprocess.run(
        [interpreter, "-c", "import json, sys; print(json.dumps(sys.path[1:]))"],
        capture_output=True,
        timeout=10,
        env={"PATH": SANDBOX_PATH, "HOME": "/tmp", "LANG": "C.UTF-8"},
        cwd="/",
        check=True,
    )
    paths = json.loads(out.stdout)
    return [p for p in paths if isinstance(p, str)]


def _strings(path: Path, key: str, value: Any, *, allow_empty: bool = True) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise LanguageError(f"{path}: {key} must be a list of strings")
    if not allow_empty and not value:
        raise LanguageError(f"{path}: {key} must not be empty")
    return tuple(value)


def _expand(word: str, python: str) -> str:
    return word.replace("{python}", python)


def detect_version(command: tuple[str, ...], pattern: str) -> str | None:
    """Run the toolchain's version command on the host; None when it is not installed."""
    exe = command[0]
    if "/" not in exe:
        found = shutil.which(exe, path=SANDBOX_PATH)
        if found is None:
            return None
        exe = found
    elif not os.access(exe, os.X_OK):
        return None
    try:
        out = subprocess.run(
            [exe, *command[1:]],
            capture_output=True,
            timeout=10,
            env={"PATH": SANDBOX_PATH, "HOME": "/tmp", "LANG": "C.UTF-8"},
            cwd="/",
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(pattern, (out.stdout + out.stderr).decode("utf-8", "replace"))
    return match.group(1) if match else None


def parse_definition(path: Path, data: dict[str, Any], python: str) -> Language | None:
    """One TOML definition → a Language (None if its toolchain is not installed)."""
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise LanguageError(f"{path}: unknown key {unknown[0]!r}")
    name = data.get("language")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise LanguageError(f"{path}: language must be a lowercase name")
    aliases = _strings(path, "aliases", data.get("aliases", []))
    run_words = _strings(path, "run", data.get("run"), allow_empty=False)
    run = tuple(_expand(w, python) for w in run_words)
    compile_cmd = None
    if "compile" in data:
        words = _strings(path, "compile", data["compile"], allow_empty=False)
        compile_cmd = tuple(_expand(w, python) for w in words)
    command = tuple(
        _expand(w, python)
        for w in _strings(path, "version_command", data.get("version_command"), allow_empty=False)
    )
    pattern = data.get("version_pattern", r"(\d+\.\d+\.\d+)")
    if not isinstance(pattern, str):
        raise LanguageError(f"{path}: version_pattern must be a string")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise LanguageError(f"{path}: version_pattern: {exc}") from None
    env = data.get("env", {})
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise LanguageError(f"{path}: env must be a table of strings")
    binds = _strings(path, "binds", data.get("binds", []))
    for bind in binds:
        if not bind.startswith("/") or not os.path.isdir(bind):
            raise LanguageError(f"{path}: binds: {bind!r} is not an existing absolute directory")
    runtime = data.get("runtime")
    if runtime is not None and not isinstance(runtime, str):
        raise LanguageError(f"{path}: runtime must be a string")
    zygote = data.get("zygote", False)
    if not isinstance(zygote, bool):
        raise LanguageError(f"{path}: zygote must be true or false")
    version = detect_version(command, pattern)
    if version is None:
        return None
    return Language(
        name=name,
        version=version,
        aliases=aliases,
        run=run,
        runtime=runtime or None,
        compile=compile_cmd,
        headers=_strings(path, "headers", data.get("headers", [])),
        artifacts=_strings(path, "artifacts", data.get("artifacts", [])),
        env=dict(env),
        binds=binds,
        zygote=zygote,
    )


def load_languages(extra_dir: str | None, python: str) -> list[Language]:
    """Built-ins, then the operator's directory (a definition there replaces a built-in with the
    same language name and detected version)."""
    found: dict[tuple[str, str], Language] = {}
    dirs = [BUILTIN_DIR] + ([Path(extra_dir)] if extra_dir else [])
    for directory in dirs:
        if not directory.is_dir():
            raise LanguageError(f"languages_dir {directory} is not a directory")
        for path in sorted(directory.glob("*.toml")):
            try:
                data = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise LanguageError(f"{path}: {exc}") from None
            lang = parse_definition(path, data, python)
            if lang is not None:
                found[(lang.name, lang.version)] = lang
    return sorted(found.values(), key=lambda lang: (lang.name, lang.version))
