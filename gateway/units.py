"""Parsing of human-friendly durations and sizes used by the config and the app spec.

Operators write `"5m"` or `"256MiB"`; machines send plain numbers. Both are accepted, and anything
else is refused with a message that says what was expected, so a typo never becomes a silent
default.
"""

from __future__ import annotations

import re

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")


# Sizes end up in cgroup files, struct fields and SQLite integers: all signed 64-bit.
MAX_SIZE = 2**63


class UnitError(ValueError):
    """A value that is not a valid duration or size; the message says what was expected."""


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as "300", "1.5s", "5m", "1h30m", "250ms"."""
    if isinstance(value, bool):
        raise UnitError('expected a duration such as 30, "30s" or "5m", got a boolean')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            seconds = 0.0
            pos = 0
            for match in _DURATION_PART.finditer(text):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
                pos = match.end()
            if pos != len(text) or not text:
                raise UnitError(
                    f'expected a duration such as 30, "30s", "5m" or "1h30m", got {value!r}'
                ) from None
    else:
        raise UnitError(f'expected a duration such as 30 or "5m", got {type(value).__name__}')
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise UnitError(f"a duration must be a finite number >= 0, got {value!r}")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from a number of bytes or a string such as "512", "64KiB", "10MiB", "1G"."""
    if isinstance(value, bool):
        raise UnitError('expected a size such as 1048576 or "1MiB", got a boolean')
    if isinstance(value, int):
        size = value
    elif isinstance(value, float):
        if not value.is_integer():
            raise UnitError(f"a size in bytes must be a whole number, got {value!r}")
        size = int(value)
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value.strip().lower())
        if match is None or match.group(2) not in _SIZE_UNITS:
            raise UnitError(f'expected a size such as 1048576, "64KiB" or "256MiB", got {value!r}')
        scaled = float(match.group(1)) * _SIZE_UNITS[match.group(2)]
        if not scaled < MAX_SIZE:  # also catches the infinity of a very long number
            raise UnitError(f"a size must be less than 8 EiB, got {value!r}")
        size = int(scaled)
    else:
        raise UnitError(f'expected a size such as 1048576 or "256MiB", got {type(value).__name__}')
    if size < 0:
        raise UnitError(f"a size must be >= 0, got {value!r}")
    if size >= MAX_SIZE:
        raise UnitError(f"a size must be less than 8 EiB, got {value!r}")
    return size


def format_size(size: int) -> str:
    """The shortest exact binary-unit spelling of a size, for showing limits back to people."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)
