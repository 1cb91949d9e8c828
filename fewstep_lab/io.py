"""Files that are never half written and runs that do not write over each other.

``atomic_write(path)`` writes to a unique temporary file in the same folder, flushes and fsyncs
it, then renames it over ``path`` with ``os.replace`` (atomic on POSIX and Windows), and fsyncs
the folder where the platform allows: a crash, a kill or a full disk leaves either the old file
or the new one, never a mixture, and never a stray temporary file (it is removed on any error).
A full disk is reported as ``DiskFullError`` naming the file. ``FileLock(path)`` is an
exclusive lock file (``<path>.lock`` holding the owner's PID, host and start time), created with
``O_EXCL``; a second holder is refused with an error naming the lock and the PID, and a lock
left by a process that no longer runs on this host is taken over. No paper: this is plumbing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import IO, Iterator

__all__ = ["DiskFullError", "LockedError", "FileLock", "atomic_write", "atomic_write_bytes",
           "atomic_write_text", "fsync_dir"]


class DiskFullError(OSError):
    """The disk filled up while writing a file; the previous version of the file is intact."""


class LockedError(RuntimeError):
    """Another live process holds the lock file of the same output."""


def fsync_dir(folder) -> None:
    """fsync a folder so that a rename inside it survives a power cut (a no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; nothing to do there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Recording:
    """A file proxy that remembers the OSError its write raised: torch.save reports a failed write as a
    RuntimeError ("unexpected pos ..."), which loses the errno that tells a full disk apart."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by setting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """The permissions the written file gets: those of the file it replaces, else what open() would give.

    mkstemp creates its file readable by the owner only (0600); without this, every checkpoint written
    atomically would become unreadable for the other users of a shared machine.
    """
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO]:
    """Context manager: yield a file object for a temporary file that replaces `path` atomically on success.

    `mode` is "wb" or "w" (text, `encoding` default utf-8). On any exception the temporary file
    is removed and `path` is left as it was; ENOSPC becomes `DiskFullError` naming `path`.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write supports mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    proxy = None
    try:
        text = mode == "w"
        with os.fdopen(fd, mode, **({"encoding": encoding or "utf-8"} if text else {})) as f:
            proxy = _Recording(f)
            yield proxy
            f.flush()
            os.chmod(f.fileno() if os.chmod in os.supports_fd else tmp, _mode_for(path))
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        cause = proxy.error if proxy is not None and proxy.error is not None else err
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC and not isinstance(err, DiskFullError):
            raise DiskFullError(errno.ENOSPC, f"disk full while writing {path}; the previous version "
                                f"(if any) was kept. Free some space and retry") from err
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically (see `atomic_write`)."""
    with atomic_write(path, "w", encoding=encoding) as f:
        f.write(text)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # unknown: assume alive rather than steal a lock
    return True


class FileLock:
    """An exclusive lock file `<path>.lock` (use as a context manager); refuses a second live holder.

    The lock holds JSON {pid, host, started}. A lock whose PID no longer runs on this host is
    stale (a killed run) and is taken over; a lock from another host is never taken over. The
    lock is released (file removed) on exit, also when the body raises.
    """

    def __init__(self, path, *, purpose: str = "writing"):
        self.target = Path(path)
        self.path = self.target.with_name(self.target.name + ".lock")
        self.purpose = purpose
        self._held = False

    def _owner(self) -> dict | None:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable or half written: treated as held by an unknown process

    def acquire(self) -> "FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:
                    continue  # released meanwhile: try again
                pid, host = owner.get("pid"), owner.get("host")
                if isinstance(pid, int) and host == me["host"] and not _pid_alive(pid):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)  # stale: its process is gone
                    continue
                who = f"process {pid} on {host}" if pid else "an unknown process (unreadable lock)"
                raise LockedError(
                    f"{self.target} is locked by {who} ({self.path}): another run is {self.purpose} "
                    f"it. Wait for it to finish, choose another output path, or, if no such process "
                    f"runs, delete {self.path}"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            return self
        raise LockedError(f"could not take the lock {self.path} (it keeps changing); retry")

    def release(self) -> None:
        if self._held:
            self._held = False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
