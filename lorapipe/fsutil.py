"""Content hashing, atomic writes (every output is a temp file renamed into place), and locks.

One file-mode rule for everything lorapipe writes: files are 0666 and folders 0777, less the process's
umask, whether copied, unpacked from an archive or downloaded (temp files start as 0600). Workers running
as different users on a shared volume read each other's files as the umask says (e.g. umask 002 and a
shared group), never less.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Iterator

try:  # POSIX; elsewhere the locks are no-ops (lorapipe's servers and workers run on Linux)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

CHUNK = 1 << 20
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK
TEMP_MARK = ".tmp"  # every temp name lorapipe makes starts with "." and holds this

log = logging.getLogger("lorapipe")


def publish(tmp: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Give a finished temp file (or folder) the usual permissions and rename it onto `dest` atomically."""
    os.chmod(tmp, DIR_MODE if Path(tmp).is_dir() else FILE_MODE)
    os.replace(tmp, dest)
    return Path(dest)


def remove_temps(folder: str | os.PathLike, pattern: str = f".*{TEMP_MARK}*") -> list[Path]:
    """Delete the temp files and folders a killed writer left in `folder`: names matching `pattern` (a
    glob; by default every temp name lorapipe makes: a leading "." and ".tmp").

    Only safe while holding the lock of whoever writes such names there: a live writer's temp file looks
    the same. Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.glob(pattern):
        if not path.name.startswith(".") or TEMP_MARK not in path.name:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.info("removed %d unfinished temp files left in %s by an interrupted run", len(removed), folder)
    return removed


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, what: str) -> Iterator[IO[str]]:
    """Hold an exclusive lock on `path` (created if missing) while the block runs; yields the open lock file.

    Another process holding it: log who (pid, host, since when, from the lock file) and wait. The lock is
    the kernel's (flock), so it goes away with its holder's process however that ends, SIGKILL included,
    and the next run takes it at once. A child process given the file descriptor (subprocess's
    `pass_fds`) holds it too, until both have exited. `what` names the thing guarded, for the log.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as lock:
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "another process"
                log.warning("waiting for %s: %s holds it (%s)", what, holder, path)
                fcntl.flock(lock, fcntl.LOCK_EX)
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}\n")
        lock.flush()
        try:
            yield lock
        finally:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def stable_hash(*parts: Any) -> str:
    """sha256 of a canonical JSON encoding: the same values give the same key on every machine."""
    encoded = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(encoded.encode()).hexdigest()


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside `dest`; rename it onto `dest` only if the block finishes.

    A crash or an exception leaves `dest` as it was (absent or the old version), never half written.
    The temp name keeps `suffix` so writers that pick a format from the extension still work.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".tmp{suffix}", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        publish(tmp_path, dest)  # mkstemp makes it 0600; outputs get the usual permissions
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Like atomic_path, for a folder: fill a temp folder, then swap it in."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, DIR_MODE)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old{TEMP_MARK}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


def atomic_write_text(dest: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(dest, text.encode("utf-8"))


def atomic_write_json(dest: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(dest, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_copy(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dest)


def atomic_link(src: str | os.PathLike, dest: str | os.PathLike, suffix: str = "") -> Path:
    """`dest` becomes the same file as `src`: a hard link (no second copy of the bytes) where the file system
    allows one, else a copy; atomically either way. Nothing is done when it already is that file."""
    if Path(dest).exists() and os.path.samefile(src, dest):
        return Path(dest)
    with atomic_path(dest, suffix=suffix) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(src, tmp)
    return Path(dest)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
