"""The gateway's side of the fork server (gateway/launcher.py), in-process against a real one.

A spawn the gateway stopped waiting for (the fork server did not answer within the spawn's
timeout: stopped, swapped out, stuck behind a slow pool refill) may still be carried out once
the fork server gets to it. Nobody owns that instance: the gateway already failed the start,
forgot the id and gave its uid back. It must not be left running.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from gateway.launcher import ExitInfo, Launcher, LaunchError, LaunchSpec, env_memfd


def pid_of(marker: Path, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return int(marker.read_text())
        except (FileNotFoundError, ValueError):
            time.sleep(0.02)
    return None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def python_spec(tmp_path: Path, instance_id: str, script: str) -> LaunchSpec:
    """A process-isolation start of `python -c script`, its run dir and log under tmp_path."""
    return LaunchSpec(
        id=instance_id,
        argv=[sys.executable, "-c", script],
        env={"PATH": "/usr/bin:/bin"},
        run_dir=str(tmp_path / "run" / instance_id),
        log_path=str(tmp_path / f"{instance_id}.log"),
        log_max_bytes=1 << 20,
        log_keep=1,
    )


async def give_up_then_resume(
    launcher: Launcher, spec: LaunchSpec, exits: list[tuple[str, ExitInfo]]
) -> None:
    """Send `spec` to a stopped fork server (alive, answering nothing) and give up on it at a
    0.5 s deadline, as a start does; then let the fork server run again and wait (10 s at most)
    for `on_exit` to hear of that instance."""
    forkserver = launcher.pid
    assert forkserver is not None
    os.kill(forkserver, signal.SIGSTOP)
    try:
        with pytest.raises(LaunchError, match="did not answer in time") as caught:
            await launcher.spawn(spec, timeout=0.5)
        assert not caught.value.lost and caught.value.unanswered
    finally:
        os.kill(forkserver, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while not exits and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def test_a_spawn_answered_after_the_gateway_gave_up_is_killed(tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    exits: list[tuple[str, ExitInfo]] = []
    script = (
        "import os, sys, time\n"
        f"open({str(marker)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(60)\n"
    )
    spec = python_spec(tmp_path, "late1", script)
    leftover: list[int] = []

    async def scenario() -> None:
        launcher = Launcher(lambda instance_id, info: exits.append((instance_id, info)))
        await launcher.start()
        try:
            # Resumed, it reads the spawn, starts the process and says "spawned" to nobody.
            await give_up_then_resume(launcher, spec, exits)
            assert [instance_id for instance_id, _ in exits] == ["late1"], (
                "an instance nobody waits for was left running"
            )
            assert exits[0][1].signal == signal.SIGKILL, exits
            pid = pid_of(marker, 0.0)  # it may have been killed before writing this
            if pid is not None:
                leftover.append(pid)
                assert not alive(pid)
        finally:
            await launcher.close()

    try:
        asyncio.run(scenario())
    finally:
        for pid in leftover:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_spawn_with_no_time_left_is_not_sent(tmp_path: Path) -> None:
    """A start whose deadline has passed does not ask the fork server at all (it would start
    the instance only for it to be killed as late)."""
    marker = tmp_path / "pid"
    spec = python_spec(tmp_path, "nolate", f"open({str(marker)!r}, 'w').write('started')")
    exits: list[str] = []

    async def scenario() -> None:
        launcher = Launcher(lambda instance_id, info: exits.append(instance_id))
        await launcher.start()
        try:
            with pytest.raises(LaunchError, match="deadline passed") as caught:
                await launcher.spawn(spec, timeout=0.0)
            assert not caught.value.lost and not caught.value.unanswered
            await asyncio.sleep(0.5)  # what a sent spawn would take, many times over
        finally:
            await launcher.close()

    asyncio.run(scenario())
    assert not marker.exists() and exits == []


def test_a_given_up_spawn_that_then_fails_is_reported_over(tmp_path: Path) -> None:
    """A spawn the gateway stopped waiting for, which the fork server then refuses: `on_exit`
    still hears of it, so whatever the start reserved for it (its uid) is freed."""
    (tmp_path / "not-a-dir").write_text("")
    spec = dataclasses.replace(  # a run dir the fork server cannot make: it refuses the spawn
        python_spec(tmp_path, "late2", "pass"), run_dir=str(tmp_path / "not-a-dir" / "late2")
    )
    exits: list[tuple[str, ExitInfo]] = []

    async def scenario() -> None:
        launcher = Launcher(lambda instance_id, info: exits.append((instance_id, info)))
        await launcher.start()
        try:
            await give_up_then_resume(launcher, spec, exits)
            # Heard from the running fork server, not from close() giving up on everything.
            assert [instance_id for instance_id, _ in exits] == ["late2"], exits
            assert not exits[0][1].lost
        finally:
            await launcher.close()

    asyncio.run(scenario())


def test_env_memfd_and_env_file_write_the_same_bytes() -> None:
    """gateway.launcher.env_memfd and sandboxes.spec.env_file are twins (the gateway does not
    import sandboxes): the same bytes, read back alike by both readers."""
    from runtimes.python import read_env
    from sandboxes.spec import env_file, read_env_file

    env = {"PATH": "/usr/bin:/bin", "EMPTY": "", "DB_PASSWORD": "a=b c;\t\u00e9\u4e2d", "X_1": "v"}
    fds = [env_memfd(env), env_file(env)]
    try:
        ours, theirs = (os.pread(fd, 1 << 16, 0) for fd in fds)
        assert ours == theirs == b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())
        assert read_env(fds[0]) == env
        assert read_env_file(fds[0]) == {k.encode(): v.encode() for k, v in env.items()}
    finally:
        for fd in fds:
            os.close(fd)


def test_a_spawn_whose_environment_cannot_be_sent_leaves_nothing_pending(tmp_path: Path) -> None:
    """An environment the memfd refuses is a LaunchError before anything is sent or awaited:
    no future is left behind for the fork server's death to fail later (never retrieved)."""
    spec = dataclasses.replace(python_spec(tmp_path, "badenv", "pass"), env={"A=B": "x"})

    async def scenario() -> None:
        launcher = Launcher(lambda instance_id, info: None)
        await launcher.start()
        try:
            with pytest.raises(LaunchError, match="cannot pass the environment"):
                await launcher.spawn(spec)
            assert launcher._pending == {} and launcher._run_dirs == {}
            good = python_spec(tmp_path, "goodenv", "pass")
            assert (await launcher.spawn(good)).pid > 0  # the channel is still in step
        finally:
            await launcher.close()

    asyncio.run(scenario())


def test_the_run_dirs_of_a_dead_fork_server_are_removed(tmp_path: Path) -> None:
    """A fork server that dies cannot remove its instances' run dirs: the gateway does (off its
    event loop), however deep the tenant made them."""
    spec = python_spec(tmp_path, "orphan", "import time; time.sleep(60)")
    exits: list[tuple[str, ExitInfo]] = []

    async def scenario() -> None:
        launcher = Launcher(lambda instance_id, info: exits.append((instance_id, info)))
        await launcher.start()
        try:
            await launcher.spawn(spec)
            deep = Path(spec.run_dir)
            for _ in range(50):
                deep = deep / "d"
            deep.mkdir(parents=True)
            (deep / "f").write_bytes(b"x")
            forkserver = launcher.pid
            assert forkserver is not None
            os.kill(forkserver, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while not exits and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert [(i, info.lost) for i, info in exits] == [("orphan", True)]
            while os.path.exists(spec.run_dir) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not os.path.exists(spec.run_dir)
        finally:
            await launcher.close()

    asyncio.run(scenario())


def test_a_burst_of_spawns_waits_for_room_on_the_environment_channel(tmp_path: Path) -> None:
    """More spawns than the environment channel holds (a burst of cold starts while the fork
    server is busy: a few hundred at the default buffer size, a handful here) wait for room
    instead of failing, and each still gets its own environment."""
    exits: list[str] = []

    async def scenario() -> None:
        launcher = Launcher(lambda instance_id, info: exits.append(instance_id))
        await launcher.start()
        forkserver = launcher.pid
        assert forkserver is not None and launcher._env_channel is not None
        launcher._env_channel.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        specs = []
        for n in range(24):
            spec = python_spec(tmp_path, f"burst{n}", "import os; print(os.environ['N'])")
            specs.append(dataclasses.replace(spec, env={**spec.env, "N": str(n)}))
        os.kill(forkserver, signal.SIGSTOP)
        try:
            spawns = [asyncio.ensure_future(launcher.spawn(spec)) for spec in specs]
            await asyncio.sleep(0.2)
            assert not any(s.done() for s in spawns)  # waiting, not failed
        finally:
            os.kill(forkserver, signal.SIGCONT)
        try:
            await asyncio.gather(*spawns)
            deadline = time.monotonic() + 20
            while len(exits) < len(specs) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert sorted(exits) == sorted(spec.id for spec in specs)
        finally:
            await launcher.close()
        for n, spec in enumerate(specs):
            lines = Path(spec.log_path).read_text().splitlines()
            assert [line for line in lines if not line.startswith("[dorm]")] == [str(n)], lines

    asyncio.run(scenario())


def test_a_spawn_whose_frame_cannot_be_encoded_sends_no_environment(tmp_path: Path) -> None:
    """A spawn that fails while its frame is built sends nothing: an environment sent without
    its frame would have put every later spawn out of step with the fork server."""

    async def scenario() -> None:
        launcher = Launcher(lambda instance_id, info: None)
        await launcher.start()
        try:
            bad = dataclasses.replace(python_spec(tmp_path, "badframe", "pass"), sandbox={"x": {1}})
            with pytest.raises(TypeError):
                await launcher.spawn(bad)
            assert launcher._pending == {}
            good = python_spec(tmp_path, "afterbad", "pass")
            assert (await launcher.spawn(good, timeout=10)).pid > 0
        finally:
            await launcher.close()

    asyncio.run(scenario())


def test_the_fork_server_passes_the_instance_network_namespace(tmp_path: Path) -> None:
    """`LaunchSpec.netns`: the instance's network namespace comes back as an fd with "spawned"
    (for a TCP app the gateway connects to inside it), opened by the fork server, its parent,
    not by pid in the gateway (a pid that may name another process by then). A spawn that
    does not ask gets none, and the environment channel stays in step for the next ones."""
    script = "import time; time.sleep(60)"

    async def scenario() -> None:
        launcher = Launcher(lambda _id, _info: None)
        await launcher.start()
        try:
            for n, netns in enumerate((True, False, True)):
                spec = python_spec(tmp_path, f"ns{n}", script)
                spawned = await launcher.spawn(dataclasses.replace(spec, netns=netns))
                try:
                    if not netns:
                        assert spawned.netns_fd == -1
                        continue
                    assert spawned.netns_fd >= 0
                    held = os.fstat(spawned.netns_fd)
                    named = os.stat(f"/proc/{spawned.pid}/ns/net")
                    assert (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)
                finally:
                    if spawned.netns_fd >= 0:
                        os.close(spawned.netns_fd)
                    launcher.signal(spec.id, signal.SIGKILL)
        finally:
            await launcher.close()

    asyncio.run(scenario())


def test_a_spawn_whose_network_namespace_did_not_come_is_killed(tmp_path: Path) -> None:
    """A TCP app whose namespace the fork server could not pass would be unreachable (and a
    socket made outside it would reach the host's own 127.0.0.1): the start fails, the
    instance is killed, and its uid stays reserved until its exit is reported (unanswered)."""
    spec = python_spec(tmp_path, "nonetns", "import time; time.sleep(60)")
    exits: list[tuple[str, ExitInfo]] = []

    async def scenario() -> None:
        launcher = Launcher(lambda instance_id, info: exits.append((instance_id, info)))
        await launcher.start()
        try:
            # The fork server answers with the namespace; the gateway is made to miss it.
            launcher._take_netns = lambda instance_id: -1  # type: ignore[method-assign]
            with pytest.raises(LaunchError, match="network namespace") as caught:
                await launcher.spawn(dataclasses.replace(spec, netns=True))
            assert caught.value.unanswered
            deadline = time.monotonic() + 10
            while not exits and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert [(i, info.signal) for i, info in exits] == [("nonetns", signal.SIGKILL)]
        finally:
            await launcher.close()

    asyncio.run(scenario())


def test_live_watch_hears_a_member_socket_get_its_name(tmp_path: Path) -> None:
    """A claimed member goes live by renaming its socket to http.sock; the gateway hears it from
    inotify on the run dir (a symlink to the member's socket dir, followed), for that instance
    only, once, and other names in the dir are not "live"."""
    from gateway.launcher import LiveWatch

    members = tmp_path / "member"
    members.mkdir()
    run_dir = tmp_path / "i1"
    run_dir.symlink_to(members)
    heard: list[str] = []

    async def scenario() -> None:
        watch = LiveWatch(heard.append)
        try:
            watch.watch("i1", str(run_dir))
            (members / "other").write_bytes(b"")
            (members / ".member.sock").write_bytes(b"")
            await asyncio.sleep(0.05)
            assert heard == []
            os.rename(members / ".member.sock", members / "http.sock")
            deadline = time.monotonic() + 5
            while not heard and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert heard == ["i1"]
            os.rename(members / "http.sock", members / ".member.sock")
            os.rename(members / ".member.sock", members / "http.sock")
            await asyncio.sleep(0.05)
            assert heard == ["i1"]  # forgotten once heard
            watch.watch("i1", str(run_dir))
            watch.forget("i1")
            os.unlink(members / "http.sock")
            (members / "http.sock").write_bytes(b"")
            await asyncio.sleep(0.05)
            assert heard == ["i1"]
        finally:
            watch.close()

    asyncio.run(scenario())
