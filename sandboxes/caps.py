"""Privilege dropping: bounding set, ids, parent-death signal, capability sets, no_new_privs.

Ordering constraints the kernel imposes (and why the steps are split this way):

* ``PR_CAPBSET_DROP`` needs CAP_SETPCAP, so the bounding set is emptied *before* the uid change.
* ``setresuid`` away from 0 clears the effective and permitted sets by itself; ``capset``
  then clears the inheritable set too and ``PR_CAP_AMBIENT_CLEAR_ALL`` the ambient set, so all
  five are empty.
* A credential change resets ``PR_SET_PDEATHSIG``, so the parent-death signal is armed *after*
  ``setresuid`` (arming it earlier, as the textbook order suggests, would silently lose it).
* ``PR_SET_NO_NEW_PRIVS`` must precede seccomp (an unprivileged process cannot load a filter
  without it) and makes setuid/setgid/file-capability binaries exec without gaining anything.
"""

from __future__ import annotations

import errno
import os
import select
import signal

from . import libc

_cap_last: int | None = None


def cap_last_cap() -> int:
    """Highest capability number this kernel knows (the bounding set must be emptied up to it)."""
    global _cap_last
    if _cap_last is None:
        try:
            with open("/proc/sys/kernel/cap_last_cap") as f:
                _cap_last = int(f.read())
        except OSError:
            _cap_last = 40
    return _cap_last


def drop_bounding_set(last: int) -> None:
    for cap in range(last + 1):
        try:
            libc.prctl(libc.PR_CAPBSET_DROP, cap)
        except OSError as e:
            if e.errno != 22:  # EINVAL: capability unknown to this kernel
                raise


def set_ids(uid: int, gid: int) -> None:
    """No supplementary groups, then gid before uid (after setuid we could not change gid)."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def await_exit(pidfd: int, timeout: float = 5.0) -> None:
    """Rootless only: wait until the intermediate process (the pidfd) has exited, then close it.

    The rootless pid-1 process is forked by an intermediate that exits at once, and the kernel sends
    the parent-death signal when the *current* parent exits. Armed while the intermediate still
    lives, it would SIGKILL the sandbox as soon as the intermediate is gone (seen in CI).
    A pidfd turns readable only after the exiting process reparented its children, so arming after
    this wait ties the signal to the fork server (the child subreaper) as intended.
    """
    if pidfd < 0:
        return
    try:
        p = select.poll()
        p.register(pidfd, select.POLLIN)
        if not p.poll(int(timeout * 1000)):
            raise OSError(errno.ETIMEDOUT, "intermediate process did not exit")
    finally:
        os.close(pidfd)


def arm_parent_death(errpipe_w: int) -> None:
    """SIGKILL us when the fork server dies; close the fork→prctl race with a pipe check.

    In a pid namespace ``getppid()`` is 0, so the usual "did my parent already die?" check cannot
    work. Instead we poll the write end of the error pipe: the parent holds the only read end, so
    POLLERR means it is gone.
    """
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    p = select.poll()
    p.register(errpipe_w, select.POLLOUT)
    for _fd, ev in p.poll(0):
        if ev & (select.POLLERR | select.POLLHUP):
            os._exit(137)


def clear_capabilities() -> None:
    libc.capset_zero()
    libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_CLEAR_ALL)


def no_new_privs() -> None:
    libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)


def new_session() -> None:
    """Own session and process group: no controlling terminal to inject keystrokes into."""
    os.setsid()
