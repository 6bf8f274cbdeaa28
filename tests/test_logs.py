"""Instance log files: rotation and retention, tail across rotations, follow (tail -F)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from gateway.logs import RotatingLog, follow, log_path, read_tail, rotated_path


def sizes(path: Path, keep: int) -> list[int | None]:
    out: list[int | None] = [path.stat().st_size if path.exists() else None]
    for i in range(1, keep + 2):
        p = rotated_path(path, i)
        out.append(p.stat().st_size if p.exists() else None)
    return out


def test_log_path_layout(tmp_path: Path) -> None:
    assert log_path(tmp_path, "app", "main") == tmp_path / "logs/app/main/instance.log"
    assert log_path(str(tmp_path), "a", "b").name == "instance.log"


def test_rotation_keeps_n_files_each_within_limit(tmp_path: Path) -> None:
    path = tmp_path / "deep/dir/instance.log"
    log = RotatingLog(path, max_bytes=100, keep=2)
    for i in range(50):
        log.write(b"%02d-------\n" % i)  # 10 bytes
    log.close()
    # 500 bytes in 100-byte files: current + .1 + .2 hold the newest 300; .3 never exists.
    assert sizes(path, 2) == [100, 100, 100, None]
    assert rotated_path(path, 2).read_bytes().startswith(b"20-")
    assert path.read_bytes().endswith(b"49-------\n")


def test_write_that_does_not_fit_starts_a_new_file(tmp_path: Path) -> None:
    path = tmp_path / "instance.log"
    log = RotatingLog(path, max_bytes=10, keep=3)
    log.write(b"abcdef")
    log.write(b"ghijkl")  # would make 12 bytes: rotate first, do not split
    assert rotated_path(path, 1).read_bytes() == b"abcdef"
    assert path.read_bytes() == b"ghijkl"
    log.write(b"0123456789" * 2 + b"xy")  # bigger than any file: fill up, then split
    log.close()
    assert path.read_bytes() == b"456789xy"
    assert rotated_path(path, 1).read_bytes() == b"4567890123"
    assert rotated_path(path, 2).read_bytes() == b"ghijkl0123"
    assert rotated_path(path, 3).read_bytes() == b"abcdef"
    assert not rotated_path(path, 4).exists()


def test_keep_zero_and_reopen_appends(tmp_path: Path) -> None:
    path = tmp_path / "instance.log"
    log = RotatingLog(path, max_bytes=8, keep=0)
    log.write(b"1234")
    log.close()
    log = RotatingLog(path, max_bytes=8, keep=0)  # the size on disk counts after a restart
    log.write(b"5678")
    assert path.read_bytes() == b"12345678"
    log.write(b"9")
    log.close()
    assert path.read_bytes() == b"9"
    assert not rotated_path(path, 1).exists()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        RotatingLog(tmp_path / "x.log", max_bytes=0, keep=1)
    with pytest.raises(ValueError):
        RotatingLog(tmp_path / "x.log", max_bytes=10, keep=-1)


def test_write_errors_are_counted_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "instance.log"
    log = RotatingLog(path, max_bytes=1000, keep=1)
    assert log._fd is not None
    os.close(log._fd)  # simulate a broken file descriptor
    log.write(b"lost")
    assert log.dropped == 4
    log.write(b"kept\n")  # reopened on the next write
    log.close()
    assert path.read_bytes() == b"kept\n"


def test_a_log_that_cannot_be_opened_yet_is_retried_by_writes(tmp_path: Path) -> None:
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the log's directory should be")
    path = blocker / "app" / "instance.log"
    log = RotatingLog(path, max_bytes=1000, keep=1)  # no exception: the start must not fail
    log.write(b"lost\n")
    assert log.dropped == 5
    blocker.unlink()  # the disk is fixed
    log.write(b"kept\n")  # the next write makes the directory and opens the file
    log.close()
    assert path.read_bytes() == b"kept\n"


def test_read_tail_across_rotations(tmp_path: Path) -> None:
    path = tmp_path / "instance.log"
    log = RotatingLog(path, max_bytes=30, keep=3)
    for i in range(20):
        log.write(b"line %02d\n" % i)  # 8 bytes; 3 lines a file
    log.close()
    assert read_tail(path, 2) == b"line 18\nline 19\n"
    assert read_tail(path, 7) == b"".join(b"line %02d\n" % i for i in range(13, 20))
    # Everything still on disk: current + 3 rotations = 4 files of up to 3 lines.
    everything = read_tail(path, 1000)
    assert everything.endswith(b"line 19\n")
    assert everything.count(b"\n") == len(everything.split(b"\n")) - 1 <= 12
    assert read_tail(path, 0) == b""


def test_read_tail_edge_cases(tmp_path: Path) -> None:
    path = tmp_path / "instance.log"
    assert read_tail(path, 10) == b""  # nothing yet
    path.write_bytes(b"a\nb\npartial")
    assert read_tail(path, 1) == b"partial"
    assert read_tail(path, 2) == b"b\npartial"
    # Only rotated files (the instance has not written since the last rotation).
    path.rename(rotated_path(path, 1))
    assert read_tail(path, 2) == b"b\npartial"
    # Memory is bounded even for one enormous line.
    path.write_bytes(b"x" * 100_000 + b"\n")
    assert len(read_tail(path, 1, max_bytes=1000)) <= 1000


def run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, 10))  # type: ignore[arg-type]


async def collect(path: Path, until: bytes, start_lines: int, writes: list[bytes]) -> bytes:
    """Follow `path`, writing `writes` through a RotatingLog after the tail arrived."""
    log = RotatingLog(path, max_bytes=20, keep=10)
    got = b""
    stream = follow(path, start_lines=start_lines, poll=0.02)
    try:
        async for chunk in stream:
            got += chunk
            if writes:
                for data in writes:
                    log.write(data)
                    await asyncio.sleep(0.005)
                writes = []
            if got.endswith(until):
                return got
    finally:
        await stream.aclose()
        log.close()
    return got


def test_follow_across_rotations(tmp_path: Path) -> None:
    path = tmp_path / "instance.log"
    path.write_bytes(b"one\ntwo\nthree\n")
    new = [b"line %02d\n" % i for i in range(10)]  # 8 bytes: rotates every 2 lines
    got = run(collect(path, b"line 09\n", 2, new))
    assert got == b"two\nthree\n" + b"".join(new)


def test_follow_waits_for_the_file_to_appear(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "instance.log"

    async def scenario() -> bytes:
        stream = follow(path, start_lines=5, poll=0.02)
        task = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.1)
        assert not task.done()
        log = RotatingLog(path, max_bytes=100, keep=1)
        log.write(b"hello\n")
        log.close()
        try:
            return await task
        finally:
            await stream.aclose()

    assert run(scenario()) == b"hello\n"


def test_follow_after_truncation(tmp_path: Path) -> None:
    path = tmp_path / "instance.log"
    path.write_bytes(b"old old old\n")

    async def scenario() -> bytes:
        stream = follow(path, start_lines=0, poll=0.02)
        task = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.1)
        path.write_bytes(b"new\n")  # truncated in place, then written
        try:
            return await task
        finally:
            await stream.aclose()

    assert run(scenario()) == b"new\n"
