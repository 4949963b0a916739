"""Writing outputs: one atomic writer, one-line errors for locations that cannot be written, and claims that give
an output folder or file to one process at a time."""
from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional


class OutputError(ValueError):
    """An output location that cannot be used or written; the message is one line."""


def os_reason(exc: OSError) -> str:
    """'No space left on device', 'Read-only file system', ...: the first line of an OSError without its path."""
    if getattr(exc, "strerror", None):
        return exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---- the atomic writer ---------------------------------------------------------------------------------------------
def fsync_dir(folder: Path) -> None:
    """Makes a rename in `folder` durable: without it a power cut may bring back the old directory entry."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def temp_path(path) -> Path:
    """The hidden name beside `path` that a file is written under before it is renamed to `path`
    (core.checkpoint.remove_temp_files and sampling.outputs recognise the pattern `.NAME.tmp-PID`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path):
    """Yields a temp path beside `path` for a writer that takes a path (an mp4 muxer, an image library); when the
    block ends the file is fsync'ed and renamed over `path`, so a kill, a crash or a full disk never leaves a
    partial file under `path`'s name: `path` is its old complete file or the new one. On failure the temp file is
    removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path, write) -> None:
    """Calls `write(handle)` on a binary file that becomes `path` only once it is complete (see atomic_path)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            write(handle)


@contextmanager
def reported(what: str, path):
    """OSErrors of the block (a full disk, a read-only file system, a file in the way) as one line naming `what`
    (a flag) and `path`."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"{what} {path}: cannot write it ({os_reason(exc)})") from None


def write_output(path, write, what: str) -> None:
    """atomic_write, with a failure reported in one line naming `what` and `path`."""
    with reported(what, path):
        atomic_write(path, write)


def check_creatable(path: Path, flag: str, folder: bool) -> None:
    """One line if `path` (a folder, or a file) cannot be created or written: something in the way or no permission.

    Writability is probed by creating a file, since permission bits say nothing for root or on a read-only mount.
    """
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == path:
        if folder and not path.is_dir():
            raise OutputError(f"{flag} {path}: is a file, not a folder")
        if not folder and path.is_dir():
            raise OutputError(f"{flag} {path}: is a folder, not a file")
        where = path if folder else path.parent
    elif not existing.is_dir():
        raise OutputError(f"{flag} {path}: {existing} is a file, not a folder")
    else:
        where = existing  # the folders below it will be created
    try:
        handle, probe = tempfile.mkstemp(dir=where, prefix=".cmd-write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{flag} {path}: cannot write in {where} ({os_reason(exc)})") from None


# ---- claims: one process per output location -----------------------------------------------------------------------
CLAIM_FILE = ".cmd-claim"  # in a claimed folder; beside a claimed file: .NAME.cmd-claim
# flock errors that mean "this file system has no locks" rather than "someone holds it".
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
_HELD: dict = {}  # lock file (absolute) -> Claim of this process


def claim_file_of(path, folder: bool) -> Path:
    path = Path(os.path.abspath(path))
    return path / CLAIM_FILE if folder else path.with_name(f".{path.name}.cmd-claim")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _read_holder(lock: Path) -> dict:
    try:
        holder = json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _holder_once_written(lock: Path, wait: float = 1.0) -> dict:
    """The holder record of a lock that another process holds: it writes the record just after taking the lock, so
    a claimant that lost by a hair waits for it (up to `wait` seconds) rather than name no one."""
    deadline = time.monotonic() + wait
    while True:
        holder = _read_holder(lock)
        if holder.get("pid") or time.monotonic() >= deadline:
            return holder
        time.sleep(0.02)


def describe_holder(holder: dict) -> str:
    if not holder.get("pid"):
        return "another process (it is starting)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
    return f"pid {holder['pid']} on {holder.get('host', '?')} (since {since}: {holder.get('command', '?')})"


class Claim:
    """This process's hold on an output location, until `release()` or the process ends, a kill -9 included.

    The lock file holds who claimed it (pid, host, time, command) for the message a second claimant gets. Whether
    the holder lives is the file system's answer, not a guess from the pid: the lock (flock) is released by the
    kernel, or the NFS server, when its process ends however it ends, also for a claimant on another node of a
    cluster (a requeued Slurm job). Forked children (DataLoader workers) close their copy at once, so that one
    outliving a killed trainer for a moment does not keep its claim. On a file system without locks the claim is
    the lock file alone (O_EXCL), stale when its pid is dead on this host.
    """

    def __init__(self, path: Path, lock: Path, fd: Optional[int]):
        self.path, self.lock, self.fd, self.pid = path, lock, fd, os.getpid()

    def release(self) -> None:
        if self.pid != os.getpid() or _HELD.get(self.lock) is not self:
            return
        del _HELD[self.lock]
        try:
            if self.fd is None or os.fstat(self.fd).st_ino == os.stat(self.lock).st_ino:
                self.lock.unlink()  # before the lock goes: a claimant that opened this file re-checks its inode
        except OSError:
            pass
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _holder_record() -> bytes:
    import sys

    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
    command = command if len(command) <= 100 else command[:97] + "..."
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
                       "command": command}).encode()


def _claim_without_locks(path: Path, lock: Path, what: str, hint: str) -> Claim:
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            holder = _read_holder(lock)
            stale = holder.get("host") == socket.gethostname() and holder.get("pid") and not _pid_alive(holder["pid"])
            if not stale:
                raise OutputError(f"{what} {path} is in use by {describe_holder(holder)}; {hint} (if that process "
                                  f"has ended, delete {lock})") from None
            lock.unlink(missing_ok=True)
            continue
        os.write(fd, _holder_record())
        os.close(fd)
        return Claim(path, lock, None)
    raise OutputError(f"{what} {path}: another process claimed it at the same instant; {hint}")


def claim(path, what: str, hint: str, folder: bool = True) -> Claim:
    """Gives the folder (created if missing) or file `path` to this process alone, or raises OutputError naming
    `path` and the process that holds it, with `hint` (what to do instead). Released at exit."""
    path = Path(path)
    (path if folder else path.parent).mkdir(parents=True, exist_ok=True)
    lock = claim_file_of(path, folder)
    if lock in _HELD:
        raise OutputError(f"{what} {path} is already in use by this process")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = describe_holder(_holder_once_written(lock))
                raise OutputError(f"{what} {path} is in use by {holder}; {hint}") from None
            if exc.errno in _NO_LOCKS:
                result = _claim_without_locks(path, lock, what, hint)
                break
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder released it (and removed the file) between our open and our lock: try again
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_record(), 0)
        result = Claim(path, lock, fd)
        break
    _HELD[lock] = result
    return result


def check_unclaimed(path, what: str, hint: str, folder: bool = True) -> None:
    """Raises what `claim` would for a location held by a live process, without claiming it (a check made before
    the claim, by processes that must not hold it: the other ranks of a job)."""
    lock = claim_file_of(path, folder)
    if lock in _HELD or not lock.is_file():
        return
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = describe_holder(_holder_once_written(lock))
            raise OutputError(f"{what} {path} is in use by {holder}; {hint}") from None
    finally:
        os.close(fd)


def release(path, folder: bool = True) -> None:
    """Ends this process's claim on `path`, if it holds one."""
    held = _HELD.get(claim_file_of(path, folder))
    if held is not None:
        held.release()


@atexit.register
def _release_all() -> None:
    for held in list(_HELD.values()):
        held.release()


def _forget_in_child() -> None:
    """A forked child closes its copies of the lock files: the claims stay its parent's alone."""
    for held in _HELD.values():
        if held.fd is not None:
            try:
                os.close(held.fd)
            except OSError:
                pass
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)
