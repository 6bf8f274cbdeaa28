"""Per-instance log files: size-rotated on write, tailed and followed on read.

An instance's stdout and stderr (and the fork server's `[dorm] …` lifecycle lines) all land in one
file, `<data_dir>/logs/<app>/<branch>/instance.log`, so one `tail` shows what happened in order.
The writer lives in the single-threaded fork server and is synchronous; the readers serve the admin
API from the event loop and therefore do every file operation in a worker thread. Rotation is by
rename (`instance.log` → `.1` → `.2` …), so a reader holding the old file keeps a consistent view
and `follow` can notice the switch by inode, exactly like `tail -F`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import BinaryIO

LOG_NAME = "instance.log"
_BLOCK = 64 * 1024
# read_tail never holds more than this many bytes, however long the lines are.
MAX_TAIL_BYTES = 8 * 1024 * 1024


def log_path(data_dir: str | Path, app: str, branch: str) -> Path:
    """Where the log of (app, branch) lives. Names are validated DNS labels, so no traversal."""
    return Path(data_dir) / "logs" / app / branch / LOG_NAME


def rotated_path(path: Path, index: int) -> Path:
    """The `index`-th older file of `path` (`instance.log.1` is the most recent rotation)."""
    return path.with_name(f"{path.name}.{index}")


class RotatingLog:
    """An append-only log file that never grows past `max_bytes`, keeping `keep` older files.

    Used from the fork server's single thread, one per instance. A failing disk must not take the
    fork server down with it, so write errors are counted in `dropped` instead of raised, and the
    file is reopened on the next write.
    """

    def __init__(self, path: Path, max_bytes: int, keep: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if keep < 0:
            raise ValueError("keep must be >= 0")
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.dropped = 0
        self._fd: int | None = None
        self._size = 0
        try:  # a failure here is retried by the first write, as a failure there would be
            path.parent.mkdir(parents=True, exist_ok=True)
            self._open()
        except OSError:
            self._close_fd()

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._fd = fd
        self._size = os.fstat(fd).st_size

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _rotate(self) -> None:
        """Shift `.1` → `.2` … (dropping the oldest), move the current file to `.1`, start anew."""
        self._close_fd()
        if self.keep == 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(rotated_path(self.path, self.keep))
            for index in range(self.keep - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(rotated_path(self.path, index), rotated_path(self.path, index + 1))
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.path, rotated_path(self.path, 1))
        self._open()

    def _write_all(self, data: memoryview) -> None:
        assert self._fd is not None
        while data:
            written = os.write(self._fd, data)
            data = data[written:]
            self._size += written

    def write(self, data: bytes) -> None:
        """Append `data`, rotating first whenever the current file would exceed `max_bytes`.

        A write larger than `max_bytes` is split across files so no file ever exceeds the limit.
        """
        view = memoryview(data)
        try:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._open()
            while view:
                room = self.max_bytes - self._size
                if room <= 0:
                    self._rotate()
                    continue
                # Start a fresh file rather than cutting this write if it fits in one.
                if room < len(view) <= self.max_bytes and self._size > 0:
                    self._rotate()
                    continue
                piece = view[:room]
                self._write_all(piece)
                view = view[len(piece) :]
        except OSError:
            self.dropped += len(view)
            self._close_fd()

    def close(self) -> None:
        self._close_fd()


def _read_backwards(
    fh: BinaryIO, end: int, blocks: list[bytes], budget: list[int], need: int
) -> bool:
    """Prepend blocks of `fh[:end]` (into reversed `blocks`) until `need` newlines are seen.

    `budget` holds [bytes left, newlines seen]; returns True when enough was read.
    """
    pos = end
    while pos > 0:
        size = min(_BLOCK, pos, budget[0])
        if size <= 0:
            return True
        pos -= size
        fh.seek(pos)
        block = fh.read(size)
        blocks.append(block)
        budget[0] -= len(block)
        budget[1] += block.count(b"\n")
        if budget[1] >= need:
            return True
    return False


def _tail_sync(path: Path, lines: int, current: BinaryIO | None, end: int, max_bytes: int) -> bytes:
    """The last `lines` lines of `current[:end]` preceded by the rotated files, oldest last."""
    if lines <= 0:
        return b""
    blocks: list[bytes] = []
    # One newline more than lines is needed when the text ends with one (it ends the last line).
    budget = [max_bytes, 0]
    need = lines + 1
    seen: set[tuple[int, int]] = set()
    done = False
    if current is not None:
        st = os.fstat(current.fileno())
        seen.add((st.st_dev, st.st_ino))
        done = _read_backwards(current, end, blocks, budget, need)
    index = 1
    while not done:
        older = rotated_path(path, index)
        index += 1
        try:
            fh = open(older, "rb")  # noqa: SIM115 - closed below, in every path
        except FileNotFoundError:
            break
        with fh:
            st = os.fstat(fh.fileno())
            # A rotation racing with us can show the same file under two names: read it once.
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            done = _read_backwards(fh, st.st_size, blocks, budget, need)
    data = b"".join(reversed(blocks))
    parts = data.split(b"\n")
    keep = lines + 1 if data.endswith(b"\n") else lines
    return b"\n".join(parts[-keep:])


def read_tail(path: Path, lines: int, *, max_bytes: int = MAX_TAIL_BYTES) -> bytes:
    """The last `lines` lines across the current file and its rotations, at most `max_bytes`.

    Reads backwards in blocks, so memory is bounded by `max_bytes` however large the files are.
    """
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return _tail_sync(path, lines, None, 0, max_bytes)
    with fh:
        return _tail_sync(path, lines, fh, os.fstat(fh.fileno()).st_size, max_bytes)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class _Follower:
    """The synchronous state of one `follow`: the files still to read, oldest first.

    The last file in `files` is the one believed to be current. When a rotation is noticed, the
    new current file is opened first (pinning its content), then every rotated file written
    after the one just finished is opened too, so rotations faster than the poll interval lose
    nothing as long as the files still exist (unlike `tail -F`, which skips them).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: deque[BinaryIO] = deque()

    def start(self, lines: int) -> bytes:
        """Open the current file and read the tail up to its present end, in one view."""
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 - owned by self.files, closed in close()
        except FileNotFoundError:
            return _tail_sync(self.path, lines, None, 0, MAX_TAIL_BYTES)
        self.files.append(fh)
        end = os.fstat(fh.fileno()).st_size
        tail = _tail_sync(self.path, lines, fh, end, MAX_TAIL_BYTES)
        fh.seek(end)
        return tail

    def _newer_rotations(
        self, old: os.stat_result, current: tuple[int, int] | None
    ) -> list[BinaryIO]:
        """Rotated files written after `old` (excluding the pinned current one), oldest first."""
        found: list[BinaryIO] = []
        index = 1
        while True:
            try:
                fh = open(rotated_path(self.path, index), "rb")  # noqa: SIM115 - returned
            except FileNotFoundError:
                break
            index += 1
            st = os.fstat(fh.fileno())
            if _identity(st) == _identity(old):
                fh.close()
                break  # everything older than this was read already
            if _identity(st) == current or st.st_mtime_ns < old.st_mtime_ns:
                fh.close()  # the pinned current file, or one older than ours (ours was deleted)
                continue
            found.append(fh)
        found.reverse()
        return found

    def poll(self) -> bytes:
        """New bytes if there are any, else b"" (the caller sleeps before asking again)."""
        while self.files:
            fh = self.files[0]
            data = fh.read(_BLOCK)
            if data:
                return data
            if len(self.files) > 1:
                self.files.popleft().close()
                continue
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            own = os.fstat(fh.fileno())
            if st is not None and _identity(st) == _identity(own):
                if own.st_size < fh.tell():
                    fh.seek(0)  # truncated in place: start over, as tail -F does
                return b""
            # Rotated away (or removed): pin the new current file, then collect what came between.
            self.files.popleft().close()
            try:
                current = open(self.path, "rb")  # noqa: SIM115 - owned by self.files
            except FileNotFoundError:
                current = None
            cur_id = None if current is None else _identity(os.fstat(current.fileno()))
            self.files.extend(self._newer_rotations(own, cur_id))
            if current is not None:
                self.files.append(current)
            if not self.files:
                return b""
        try:
            self.files.append(open(self.path, "rb"))  # noqa: SIM115 - owned by self.files
        except FileNotFoundError:
            return b""
        return self.poll()

    def close(self) -> None:
        while self.files:
            self.files.popleft().close()


async def follow(
    path: Path, *, start_lines: int, poll: float = 0.25
) -> AsyncGenerator[bytes, None]:
    """Yield the last `start_lines` lines, then new data as it is written, across rotations.

    Runs until the consumer stops iterating (closing the generator closes the files). Every file
    operation runs in a worker thread so a slow disk never stalls the event loop.
    """
    follower = _Follower(path)
    try:
        tail = await asyncio.to_thread(follower.start, start_lines)
        if tail:
            yield tail
        while True:
            data = await asyncio.to_thread(follower.poll)
            if data:
                yield data
            else:
                await asyncio.sleep(poll)
    finally:
        # Close in a thread too; if we are being cancelled it still completes there.
        await asyncio.shield(asyncio.to_thread(follower.close))
