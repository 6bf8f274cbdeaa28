"""Piston v2 request parsing and validation, version selection, and result shapes.

Field meanings, defaults and messages follow Piston (engineer-man/piston, api/src/api/v2.js and
job.js) so existing clients work unchanged; where dorm is stricter (file names, encodings, sizes)
the answer is still a Piston-style 400 `{"message": ...}`. Deliberate differences are listed in
docs/runner.md.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass
from typing import Any

from runtimes.runner.languages import Language
from runtimes.runner.limits import MIN_MEMORY, Settings, StageLimits

MAX_NAME = 255
MAX_PATH = 1024
MAX_ARGS = 256
ENCODINGS = ("utf8", "base64", "hex")
# (request field, Settings attribute) for the six per-request limits.
LIMIT_FIELDS = (
    ("compile_timeout", "compile_timeout"),
    ("run_timeout", "run_timeout"),
    ("compile_cpu_time", "compile_cpu_time"),
    ("run_cpu_time", "run_cpu_time"),
    ("compile_memory_limit", "compile_memory"),
    ("run_memory_limit", "run_memory"),
)


class ApiError(Exception):
    """A Piston-style error answer: HTTP status and `{"message": ...}`."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def bad(message: str) -> ApiError:
    return ApiError(400, message)


# -- versions --------------------------------------------------------------------------------------
Version = tuple[int, int, int]
_PARTIAL = re.compile(r"^v?(\d+|[xX*])(?:\.(\d+|[xX*]))?(?:\.(\d+|[xX*]))?(?:[-+].*)?$")
_COMPARATOR = re.compile(r"^(<=|>=|<|>|=|\^|~>?)?\s*(.*)$")


def parse_version(text: str) -> Version | None:
    """ "3.11.7" → (3, 11, 7); missing parts are 0; None if it is not a version."""
    match = _PARTIAL.match(text.strip())
    if match is None or any(p and not p.isdigit() for p in match.groups()):
        return None
    a, b, c = (int(p) if p else 0 for p in match.groups())
    return a, b, c


def _partial(text: str) -> tuple[list[int], int] | None:
    """A possibly partial version → (its numbers padded with 0, how many were given)."""
    match = _PARTIAL.match(text.strip())
    if match is None:
        return None
    nums: list[int] = []
    for part in match.groups():
        if part is None or not part.isdigit():
            break
        nums.append(int(part))
    given = len(nums)
    return nums + [0] * (3 - given), given


def _bump(nums: list[int], index: int) -> Version:
    """The first version above every version starting with nums[:index + 1]."""
    out = [*nums[: index + 1], 0, 0][:3]
    out[index] += 1
    for i in range(index + 1, 3):
        out[i] = 0
    return out[0], out[1], out[2]


Bound = tuple[Version | None, bool, Version | None, bool]  # low, low inclusive, high, inclusive


def _comparator(text: str) -> Bound | None:
    match = _COMPARATOR.match(text)
    assert match is not None
    op, rest = match.group(1) or "", match.group(2)
    parsed = _partial(rest)
    if parsed is None:
        return None
    nums, given = parsed
    v: Version = (nums[0], nums[1], nums[2])
    if given == 0:  # *, x
        return (None, True, (0, 0, 0), True) if op in ("<", ">") else (None, True, None, True)
    if op in ("", "="):
        if given == 3:
            return v, True, v, True
        return v, True, _bump(nums, given - 1), False
    if op == "^":
        first = next((i for i in range(given) if nums[i] != 0), given - 1)
        return v, True, _bump(nums, min(first, given - 1)), False
    if op in ("~", "~>"):
        return v, True, _bump(nums, 0 if given == 1 else 1), False
    if op == ">=":
        return v, True, None, True
    if op == ">":
        return (v, False, None, True) if given == 3 else (_bump(nums, given - 1), True, None, True)
    if op == "<":
        return None, True, v, False
    # "<="
    return (None, True, v, True) if given == 3 else (None, True, _bump(nums, given - 1), False)


def _satisfies(version: Version, bound: Bound) -> bool:
    low, low_inc, high, high_inc = bound
    if low is not None and (version < low or (version == low and not low_inc)):
        return False
    return not (high is not None and (version > high or (version == high and not high_inc)))


def version_matches(version: str, selector: str) -> bool:
    """node-semver's `satisfies` for the forms people send: exact, partial (`3`, `3.11`), x-ranges
    (`*`, `3.x`), `^`, `~`, comparators (`>=3.10 <4`), hyphen ranges (`1.2 - 2`) and `||`."""
    parsed = parse_version(version)
    if parsed is None:
        return False
    for alternative in selector.split("||"):
        alt = alternative.strip()
        hyphen = re.fullmatch(r"(\S+)\s+-\s+(\S+)", alt)
        if hyphen:
            low, high = _comparator(">=" + hyphen.group(1)), _comparator("<=" + hyphen.group(2))
            bounds = [low, high]
        else:
            parts = re.sub(r"(<=|>=|<|>|=|\^|~>?)\s+", r"\1", alt).split() or ["*"]
            bounds = [_comparator(p) for p in parts]
        if all(b is not None and _satisfies(parsed, b) for b in bounds):
            return True
    return False


def pick_language(languages: list[Language], name: str, selector: str) -> Language | None:
    """The newest runtime whose name or alias is `name` and whose version satisfies `selector`."""
    matches = [
        lang
        for lang in languages
        if name in lang.names() and version_matches(lang.version, selector)
    ]
    if not matches:
        return None
    return max(matches, key=lambda lang: parse_version(lang.version) or (0, 0, 0))


# -- requests --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class JobFile:
    name: str
    data: bytes
    utf8: bool  # Piston: only utf8 files are "code files" (passed to compile/run)
    mode: int = 0o644


@dataclass(frozen=True, slots=True)
class Job:
    language: Language
    files: tuple[JobFile, ...]
    stdin: bytes
    args: tuple[str, ...]
    compile_limits: StageLimits
    run_limits: StageLimits


def check_name(name: str, index: int) -> str:
    """A file name that stays inside the work dir: relative, no `..`, no NUL, not too long."""
    where = f"files[{index}].name"
    if "\0" in name:
        raise bad(f"{where} must not contain NUL")
    if name.startswith("/"):
        raise bad(f"{where} must be a relative path, got {name[:100]!r}")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise bad(f"{where} must not contain '..', '.' or empty path segments: {name[:100]!r}")
    if len(name.encode()) > MAX_PATH or any(len(p.encode()) > MAX_NAME for p in parts):
        raise bad(f"{where} is too long")
    return name


def _decode(content: str, encoding: str, index: int) -> bytes:
    try:
        if encoding == "base64":
            return base64.b64decode(content, validate=True)
        if encoding == "hex":
            return bytes.fromhex(content)
    except (binascii.Error, ValueError):
        raise bad(f"files[{index}].content is not valid {encoding}") from None
    return content.encode("utf-8", "surrogatepass")


def _limit(body: dict[str, Any], key: str, maximum: int) -> int:
    """Piston's rule: absent/0 → the server's value; a number ≤ the configured maximum; dorm also
    takes -1 ("no limit" in Piston clients) to mean the server maximum."""
    value = body.get(key)
    if not value:
        return maximum
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise bad(f"If specified, {key} must be a number")
    if value == -1:
        return maximum
    if value > maximum:
        raise bad(f"{key} cannot exceed the configured limit of {maximum}")
    if value < 0:
        raise bad(f"{key} must be non-negative")
    if key.endswith("memory_limit") and value < MIN_MEMORY:
        raise bad(f"{key} must be at least {MIN_MEMORY} bytes")
    return max(1, math.ceil(value))


def parse_job(body: Any, languages: list[Language], settings: Settings) -> Job:
    """Validate a `POST /api/v2/execute` body (already JSON-decoded) into a Job, or raise 400."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    language = body.get("language")
    if not language or not isinstance(language, str):
        raise bad("language is required as a string")
    version = body.get("version")
    if not version or not isinstance(version, str):
        raise bad("version is required as a string")
    files = body.get("files")
    if not files or not isinstance(files, list):
        raise bad("files is required as an array")
    for i, f in enumerate(files):
        if not isinstance(f, dict) or not isinstance(f.get("content"), str):
            raise bad(f"files[{i}].content is required as a string")
    lang = pick_language(languages, language, version)
    if lang is None:
        raise bad(f"{language}-{version} runtime is unknown")
    if len(files) > settings.max_files:
        raise bad(f"files: at most {settings.max_files} files are accepted")
    decoded: list[JobFile] = []
    seen: set[str] = set()
    total = 0
    for i, f in enumerate(files):
        encoding = f.get("encoding") or "utf8"
        if encoding not in ENCODINGS:
            raise bad(f"files[{i}].encoding must be one of {', '.join(ENCODINGS)}")
        name = f.get("name") or f"file{i}.code"
        if not isinstance(name, str):
            raise bad(f"files[{i}].name must be a string")
        check_name(name, i)
        if name in seen:
            raise bad(f"files[{i}].name {name[:100]!r} is given twice")
        seen.add(name)
        data = _decode(f["content"], encoding, i)
        if len(data) > settings.max_file_size:
            raise bad(f"files[{i}] is larger than the maximum file size ({settings.max_file_size})")
        total += len(data)
        decoded.append(JobFile(name, data, encoding == "utf8"))
    if total > settings.tmp_size // 2:
        raise bad(f"files: {total} bytes in all is more than this runner accepts")
    if not any(f.utf8 for f in decoded):
        raise bad("files must include at least one utf8 encoded file")
    stdin = body.get("stdin")
    if stdin is None:
        stdin = ""
    if not isinstance(stdin, str):
        raise bad("stdin must be a string")
    if not stdin.endswith("\n"):  # Piston appends a newline when there is none
        stdin += "\n"
    args = body.get("args")
    if args is None:
        args = []
    if (
        not isinstance(args, list)
        or len(args) > MAX_ARGS
        or not all(isinstance(a, str) and "\0" not in a for a in args)
    ):
        raise bad(f"args must be an array of at most {MAX_ARGS} strings without NUL")
    values = {key: _limit(body, key, getattr(settings, attr)) for key, attr in LIMIT_FIELDS}

    def stage(prefix: str) -> StageLimits:
        return StageLimits(
            wall_ms=values[f"{prefix}_timeout"],
            cpu_ms=values[f"{prefix}_cpu_time"],
            memory=values[f"{prefix}_memory_limit"],
            processes=settings.max_processes,
            open_files=settings.max_open_files,
            file_size=settings.max_file_size,
            output=settings.output_max_size,
            tmp_size=settings.tmp_size,
            cpus=settings.cpus,
            binds=lang.binds,
        )

    return Job(
        language=lang,
        files=tuple(decoded),
        stdin=stdin.encode("utf-8", "surrogatepass"),
        args=tuple(args),
        compile_limits=stage("compile"),
        run_limits=stage("run"),
    )
