"""Fetch CIFAR-10's official python release, all or nothing.

The archive is streamed to a temporary file beside the destination (a tqdm bar shows the bytes),
its MD5 is checked, its members are checked (no absolute paths, no ``..``, no links or devices)
and extracted into a temporary folder, and the result is renamed into place in one step. On any
failure (offline, a wrong checksum, a connection cut midway, a full disk, Ctrl-C) every partial
file and folder is removed and `DataUnavailableError` says what failed and the manual route; no
empty ``data/cifar10/`` is left behind. ``FEWSTEP_CIFAR10_URL`` overrides the address (mirrors,
tests). Whether ``load_cifar10`` may download by itself is decided in one place,
`auto_download_allowed`. No paper: this is plumbing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

__all__ = ["DataUnavailableError", "download_cifar10", "auto_download_allowed", "default_download_root",
           "MANUAL_ROUTE", "URL", "MD5", "URL_ENV", "NO_DOWNLOAD_ENV"]

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
URL_ENV = "FEWSTEP_CIFAR10_URL"
NO_DOWNLOAD_ENV = "FEWSTEP_NO_DOWNLOAD"
PY_FOLDER = "cifar-10-batches-py"
EXPECTED = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
MANUAL_ROUTE = (f"To get it by hand: download {URL} (MD5 {MD5}), unpack it into ./data/cifar10 of the "
                "repository, or set FEWSTEP_DATA to a folder holding it; or retry "
                "`fewstep data cifar10 --download` (--root DIR for another folder).")


class DataUnavailableError(FileNotFoundError):
    """A dataset is not on this machine and could not be fetched; the message gives the manual route."""


def auto_download_allowed(environ=None) -> tuple[bool, str]:
    """Whether `load_cifar10` may download CIFAR-10 by itself, and why not: never under CI or FEWSTEP_NO_DOWNLOAD."""
    env = os.environ if environ is None else environ
    off = ("", "0", "false", "no")
    if env.get(NO_DOWNLOAD_ENV, "").strip().lower() not in off:
        return False, f"{NO_DOWNLOAD_ENV} is set"
    if env.get("CI", "").strip().lower() not in off:
        return False, "running under CI (the CI environment variable is set)"
    return True, ""


def default_download_root() -> Path:
    """Where an automatic download goes: $FEWSTEP_DATA, else `<repository root>/data/cifar10`."""
    from ..paths import repo_root

    value = os.environ.get("FEWSTEP_DATA")
    return Path(value).expanduser().resolve() if value else repo_root() / "data" / "cifar10"


def _fail(url: str, what: str) -> DataUnavailableError:
    return DataUnavailableError(f"CIFAR-10 download from {url} failed: {what}. {MANUAL_ROUTE}")


def _safe_members(tar: tarfile.TarFile, url: str) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for m in members:
        parts = PurePosixPath(m.name).parts
        if m.name.startswith(("/", "\\")) or ".." in parts or not (m.isfile() or m.isdir()):
            raise _fail(url, f"the archive holds an unsafe member {m.name!r} (absolute path, '..' or a "
                             "link); nothing was extracted")
    return members


def _stream(url: str, dest, timeout: float, progress: bool) -> str:
    """Copy `url` into the open binary file `dest`; return the MD5. Raises _fail on any network error."""
    from tqdm.auto import tqdm

    from ..profiles import progress_enabled

    md5, got = hashlib.md5(), 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = response.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, desc="CIFAR-10",
                      disable=not progress_enabled(progress)) as bar:
                while chunk := response.read(1 << 20):
                    dest.write(chunk)
                    md5.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        raise _fail(url, f"the server answered HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise _fail(url, f"could not reach the server ({err.reason}); are you offline?") from None
    except (TimeoutError, ConnectionError, OSError) as err:
        if getattr(err, "errno", None) == errno.ENOSPC:
            raise
        raise _fail(url, f"the connection broke after {got:,} bytes ({type(err).__name__}: {err})") from None
    if total is not None and got != total:
        raise _fail(url, f"the connection was cut after {got:,} of {total:,} bytes")
    return md5.hexdigest()


def _remove(archive, unpacked) -> None:
    if archive is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(archive)
    if unpacked is not None:
        shutil.rmtree(unpacked, ignore_errors=True)


def download_cifar10(root, *, url: str | None = None, md5: str | None = MD5, progress: bool | None = True,
                     timeout: float = 60.0) -> Path:
    """Download and unpack the official python release into `root`; return `root/cifar-10-batches-py`.

    `url` defaults to $FEWSTEP_CIFAR10_URL, else the dataset's page; `md5=None` skips the check
    (only for mirrors of other content). `timeout` is per network operation, in seconds. All or
    nothing: on failure nothing new is left on disk and DataUnavailableError is raised.
    """
    url = url or os.environ.get(URL_ENV) or URL
    root = Path(root).expanduser().resolve()
    final = root / PY_FOLDER
    if all((final / f).is_file() for f in EXPECTED):
        return final  # already there
    if final.exists():
        raise _fail(url, f"{final} exists but is incomplete; delete it and retry")
    created = [p for p in (root, *root.parents) if not p.exists()]  # removed again on failure
    archive = unpacked = None
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        fd, archive = tempfile.mkstemp(dir=root.parent, prefix=".cifar-10-python.", suffix=".tar.gz.part")
        with os.fdopen(fd, "wb") as f:
            digest = _stream(url, f, timeout, progress)
        if md5 is not None and digest != md5:
            raise _fail(url, f"the archive's MD5 is {digest}, expected {md5} (a damaged or different file)")
        unpacked = Path(tempfile.mkdtemp(dir=root.parent, prefix=".cifar10-unpack."))
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = _safe_members(tar, url)
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(unpacked, members=members, **safe)
        except (tarfile.TarError, EOFError) as err:
            raise _fail(url, f"the archive is not a readable .tar.gz ({err})") from None
        missing = [f for f in EXPECTED if not (unpacked / PY_FOLDER / f).is_file()]
        if missing:
            raise _fail(url, f"the archive lacks {PY_FOLDER}/{', '.join(missing)}")
        if root.exists():
            os.replace(unpacked / PY_FOLDER, final)  # one rename: the folder appears complete or not at all
        else:
            os.replace(unpacked, root)
            unpacked = None
    except BaseException as err:
        _remove(archive, unpacked)
        for p in created:  # deepest first: only folders this call made, and only if empty
            with contextlib.suppress(OSError):
                p.rmdir()
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise _fail(url, f"the disk is full in {root.parent}; free about 350 MB and retry") from None
        if isinstance(err, PermissionError):
            raise _fail(url, f"cannot write in {root.parent} ({err.strerror}); choose another --root") from None
        raise
    _remove(archive, unpacked)
    return final
