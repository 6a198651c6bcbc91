"""Reading zip and tar archives of photos without trusting them.

Member names are never used as paths: each member's bytes are streamed into a temp file in the
destination and renamed to their sha256, so `../` or absolute names cannot write anywhere. Such names
are still reported, as are symlinks and special files (never followed). Bytes are counted as they
are unpacked (declared sizes can lie), with a cap per member and a cap for the whole archive, and
entries are counted as they are read, with a cap on their number (100,000 empty members once took 80 s
and 700 MB before the first check; a zip's central directory is counted before anything is unpacked).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Iterator

from lorapipe.fsutil import publish

CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveItem:
    name: str
    path: Path | None = None  # the unpacked bytes, named by sha256, when accepted
    sha256: str | None = None
    size: int | None = None
    reason: str | None = None


class ArchiveError(Exception):
    """The archive itself cannot be read (not a zip or tar, or broken); `reason` goes into the manifest."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or f"corrupt: {message}"


class TooManyMembers(ArchiveError):
    """More entries than the cap: the archive is refused as a whole."""


def is_archive(path: str | Path) -> bool:
    path = Path(path)
    return path.is_file() and (zipfile.is_zipfile(path) or _is_tar(path))


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def unsafe_name(name: str) -> str | None:
    """Why a member name could escape the folder it is unpacked into, or None."""
    normal = name.replace("\\", "/")
    if "\x00" in normal:
        return "a NUL byte in the name"
    if normal.startswith("/") or re.match(r"^[A-Za-z]:", normal):
        return "an absolute path"
    if ".." in PurePosixPath(normal).parts:
        return "path traversal (..)"
    return None


def _too_many(archive: Path, max_members: int) -> TooManyMembers:
    return TooManyMembers(f"{archive.name}: more than {max_members} entries",
                          f"unsafe: the archive has more than {max_members} entries (collect.max_archive_members)")


def _count(entries, max_members: int, archive: Path):
    """The entries, raising TooManyMembers as soon as there are more than `max_members`."""
    for n, entry in enumerate(entries, 1):
        if n > max_members:
            raise _too_many(archive, max_members)
        yield entry


def _zip_members(archive: zipfile.ZipFile) -> Iterator[tuple[str, int, str | None, Callable[[], IO[bytes]]]]:
    for info in archive.infolist():
        if info.is_dir():
            continue
        mode = info.external_attr >> 16
        kind = None
        if stat.S_ISLNK(mode):
            kind = "a symlink (not followed)"
        elif info.flag_bits & 0x1:
            kind = "encrypted"
        yield info.filename, info.file_size, kind, lambda info=info: archive.open(info)


def _tar_members(archive: tarfile.TarFile, max_members: int,
                 path: Path) -> Iterator[tuple[str, int, str | None, Callable[[], IO[bytes]]]]:
    for member in _count(archive, max_members, path):  # headers are read one at a time, as iterated
        if member.isdir():
            continue
        kind = None
        if member.issym() or member.islnk():
            kind = f"a {'symlink' if member.issym() else 'hard link'} to {member.linkname!r} (not followed)"
        elif not member.isreg():
            kind = "a special file (device or pipe)"
        yield member.name, member.size, kind, lambda member=member: archive.extractfile(member)


def unpack(
    path: str | Path,
    dest: str | Path,
    max_file_bytes: int,
    max_total_bytes: int,
    wanted: Callable[[str], bool] = lambda name: True,
    max_members: int = 20_000,
) -> list[ArchiveItem]:
    """Every wanted member of a zip or tar file: unpacked into `dest` as <sha256><suffix>, or a reason.

    Raises:
        ArchiveError: the archive cannot be read; TooManyMembers: it has more than `max_members` entries
            (folders and unwanted files count). Files unpacked before a TooManyMembers stay in `dest`.
    """
    path, dest = Path(path), Path(dest)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if len(archive.infolist()) > max_members:  # the central directory is read already
                    raise _too_many(path, max_members)
                return _unpack(_zip_members(archive), dest, max_file_bytes, max_total_bytes, wanted)
        with tarfile.open(path, "r:*") as archive:
            return _unpack(_tar_members(archive, max_members, path), dest, max_file_bytes, max_total_bytes, wanted)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, RuntimeError) as err:
        raise ArchiveError(f"{path.name}: not a readable zip or tar archive ({err})") from err


def _unpack(members, dest: Path, max_file: int, max_total: int, wanted) -> list[ArchiveItem]:
    items: list[ArchiveItem] = []
    total = 0
    for name, declared, kind, opener in members:
        if not wanted(name):
            continue
        problem = unsafe_name(name)
        if problem:
            items.append(ArchiveItem(name, reason=f"unsafe: archive member name is {problem}"))
        elif kind:
            items.append(ArchiveItem(name, reason=f"unsafe: archive member is {kind}"))
        elif declared > max_file:
            items.append(ArchiveItem(name, reason=f"too_large: {declared} bytes unpacked > {max_file}"))
        elif total + declared > max_total:
            items.append(ArchiveItem(name, reason=f"too_large: the archive unpacks to more than {max_total} bytes"))
        else:
            item = _copy_member(name, opener, dest, min(max_file, max_total - total))
            total += item.size or 0
            items.append(item)
    return items


def _copy_member(name: str, opener, dest: Path, limit: int) -> ArchiveItem:
    dest.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".unpack-", suffix=".tmp", dir=dest)
    tmp = Path(tmp_name)
    try:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out, opener() as src:
            while chunk := src.read(CHUNK):
                size += len(chunk)
                if size > limit:  # the declared size lied (or the total cap is reached)
                    return ArchiveItem(name, reason=f"too_large: unpacks to more than {limit} bytes")
                digest.update(chunk)
                out.write(chunk)
        final = publish(tmp, dest / f"{digest.hexdigest()}{PurePosixPath(name).suffix.lower()}")
        return ArchiveItem(name, final, digest.hexdigest(), size)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, RuntimeError, ValueError) as err:
        return ArchiveItem(name, reason=f"corrupt: cannot unpack ({err})")
    finally:
        tmp.unlink(missing_ok=True)
