"""The run directory (``--workdir``): one run at a time, and a fresh run only in an
empty directory.

``lock_workdir(path, fresh=...)`` is a context manager holding an exclusive
``fcntl.flock`` on ``<workdir>/.lock`` for the whole run. A second process (a second
``--resume`` while the first runs, or two fresh starts racing) is refused at once, with
a :class:`WorkdirError` naming the holder (pid, host, start time, which the holder
writes into the lock file); it changes nothing in the directory. Two runs in one
directory would prune each other's temporary checkpoints, delete each other's
half-built export versions and interleave checkpoints of two different models.

The lock is the kernel's: it goes away with its holder's process however that ends
(SIGKILL included), so a stale ``.lock`` file never blocks a resume; the file itself
stays (removing it would let a process that opened the old file and one that creates a
new one both "hold" the lock). On release its content is cleared.

Fresh runs: the directory may hold nothing but ``.lock``. Emptiness is checked before
the lock is taken (a directory of someone else's files is refused without writing
anything into it) and again once it is held (of two fresh starts racing, the one that
locks second either fails to lock or sees the first one's files).

Limits: ``flock`` is local to one kernel. On NFS, Linux maps it to POSIX byte-range
locks (lockd), which works across clients with NFSv4 or a running lockd; other network
file systems may not lock across machines at all.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pathlib
import socket
import time
from collections.abc import Iterator

from dgm_tf.config import ConfigError

__all__ = ["LOCK_FILE", "WorkdirError", "check_fresh", "lock_workdir", "read_holder"]

LOCK_FILE = ".lock"


class WorkdirError(ConfigError):
    """The work directory cannot be used (in use, not empty, not writable, missing)."""


def check_fresh(workdir: str | os.PathLike) -> pathlib.Path:
    """Refuse a directory a fresh run cannot use; writes nothing.

    A fresh run needs a missing or empty directory (a ``.lock`` file alone does not
    count: it is left by a refused start or a lock check).

    Raises:
        WorkdirError: the path exists and is not a directory, cannot be listed, or
            holds files.
    """
    path = pathlib.Path(workdir)
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"--workdir={workdir}: exists and is not a directory")
    if path.is_dir():
        try:
            content = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE)
        except OSError as e:
            raise WorkdirError(f"--workdir={workdir}: cannot list the directory ({e.strerror or e})") from None
        if content:
            shown = ", ".join(content[:3]) + (", ..." if len(content) > 3 else "")
            raise WorkdirError(
                f"--workdir={workdir}: directory is not empty ({shown}); choose a new one or remove it "
                "(a run never overwrites an earlier run's files; --resume continues a run)"
            )
    return path


def read_holder(workdir: str | os.PathLike) -> dict | None:
    """What the lock file says about its holder, or None (empty, unreadable). Only
    meaningful while the lock is held."""
    try:
        text = (pathlib.Path(workdir) / LOCK_FILE).read_text()
        holder = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "a process that has not recorded itself yet"
    started = holder.get("started", "?")
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {started}"


@contextlib.contextmanager
def lock_workdir(workdir: str | os.PathLike, *, fresh: bool = False) -> Iterator[pathlib.Path]:
    """Hold the exclusive lock of ``workdir`` for the ``with`` block.

    Args:
        workdir: The run directory.
        fresh: A new run: the directory is created if missing and must be empty
            (``.lock`` aside), checked before and after locking. Otherwise (resume)
            it must exist.

    Yields:
        The directory as a ``pathlib.Path``.

    Raises:
        WorkdirError: another process holds the lock (the message names it; nothing
            was written), the directory is missing (not ``fresh``), not empty
            (``fresh``) or not writable.
    """
    path = pathlib.Path(workdir)
    if fresh:
        check_fresh(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WorkdirError(f"--workdir={workdir}: not writable, cannot create it ({e.strerror or e})") from None
    elif not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise WorkdirError(f"--workdir={workdir}: {what}")
    lock_path = path / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise WorkdirError(
            f"--workdir={workdir}: not writable, cannot create {lock_path} ({e.strerror or e})"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirError(f"--workdir={workdir}: cannot lock {lock_path} ({e.strerror or e})") from None
            raise WorkdirError(
                f"--workdir={workdir}: in use by another run ({_describe(read_holder(path))}); wait for it to "
                "end or stop it (two runs in one directory overwrite each other's checkpoints and exports)"
            ) from None
        if fresh:
            check_fresh(path)  # under the lock: a racing start that got here first has written
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock
