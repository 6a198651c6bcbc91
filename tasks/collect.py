"""Collect: every candidate file from the sources into raw/, named by the sha256 of its bytes.

Sources are folders (searched recursively), zip/tar archives, URL lists (a .txt file with one URL a
line, or a .csv file with a `url` column) and single URLs. Originals are only read. Bytes already in
raw/ are not copied again, and a URL downloaded once is not downloaded again; a URL that failed is
retried on the next run. A source that yields nothing usable (a failed URL, an unsafe archive member)
becomes a rejected record with the reason, never a crash; each line of a URL list is judged on its own,
and its reason names the list and the line.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import time
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from lorapipe.archives import ArchiveError, TooManyMembers, is_archive, unpack
from lorapipe.config import CollectConfig
from lorapipe.download import DownloadFailed, Downloader, DownloadPolicy, as_sources, is_url
from lorapipe.errors import UserError
from lorapipe.fsutil import atomic_copy, sha256_file
from lorapipe.item_cache import ItemCache
from lorapipe.manifest import ImageRecord
from lorapipe.textio import printable, read_user_text
from lorapipe.workspace import Workspace
from tasks.stage import code_version, finish_manifest_stage, stage_key, stage_task

log = logging.getLogger("lorapipe.collect")

# Files that sit beside photos in training folders and are not images themselves.
SIDECAR_SUFFIXES = {".txt", ".caption", ".json", ".jsonl", ".toml", ".yaml", ".yml", ".npz", ".md"}
URL_LIST_SUFFIXES = {".txt", ".csv", ".urls"}


def resolve_sources(images: str | list[str]) -> list[str]:
    """Local paths made absolute (the workspace may be used from elsewhere); URLs as they are."""
    return [s if is_url(s) else str(Path(s).expanduser().resolve()) for s in as_sources(images)]


def is_candidate(relative: str, recursive: bool = True) -> bool:
    """Not hidden (.DS_Store, __MACOSX), not a sidecar (.txt captions), in a subfolder only if recursive."""
    parts = PurePosixPath(relative.replace("\\", "/")).parts
    if not parts or (not recursive and len(parts) > 1):
        return False
    hidden = any(p.startswith(".") and p not in (".", "..") for p in parts) or parts[0] == "__MACOSX"
    return not hidden and PurePosixPath(parts[-1]).suffix.lower() not in SIDECAR_SUFFIXES


def list_source_files(folder: str | Path, recursive: bool = True) -> list[Path]:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder not found")
    pattern = folder.rglob("*") if recursive else folder.glob("*")
    return sorted(p for p in pattern if p.is_file() and is_candidate(p.relative_to(folder).as_posix()))


def _stamp(path: Path) -> str:
    # The first collection time, kept stable so an unchanged source gives an identical manifest.
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _failed(source: str, reason: str, fetched_at: str) -> ImageRecord:
    """A record for a source that gave no bytes: its id is the hash of the source, not of content."""
    source = printable(source)
    return ImageRecord(id=hashlib.sha256(source.encode()).hexdigest(), source=source, fetched_at=fetched_at,
                       status="rejected", reason=reason)


def copy_in(path: Path, ws: Workspace) -> tuple[ImageRecord, bool]:
    """One local file into raw/ under its sha256 (unless already there); (record, whether it was new)."""
    image_id = sha256_file(path)
    raw = ws.raw / f"{image_id}{path.suffix.lower()}"
    new = not raw.exists()
    if new:
        atomic_copy(path, raw)
    record = ImageRecord(id=image_id, source=str(path.resolve()), fetched_at=_stamp(raw), raw_path=ws.relative(raw),
                         size_bytes=path.stat().st_size)
    return record, new


def collect_folder(folder: str | Path, ws: Workspace, config: CollectConfig) -> tuple[list[ImageRecord], dict]:
    records, new = [], 0
    for path in list_source_files(folder, config.recursive):
        record, was_new = copy_in(path, ws)
        records.append(record)
        new += was_new
    log.info("collected %d files from %s (%d new, %d already in raw/)", len(records), folder, new, len(records) - new)
    return records, {"files": len(records), "computed": new, "reused": len(records) - new}


def collect_archive(path: str | Path, ws: Workspace, config: CollectConfig) -> tuple[list[ImageRecord], dict]:
    path = Path(path).resolve()
    before = {p.name for p in ws.raw.iterdir()}
    try:
        items = unpack(path, ws.raw, config.max_file_bytes, config.max_archive_bytes,
                       lambda name: is_candidate(name, config.recursive), config.max_archive_members)
    except ArchiveError as err:
        if isinstance(err, TooManyMembers):  # refused as a whole: what it unpacked so far goes too
            for added in {p.name for p in ws.raw.iterdir()} - before:
                (ws.raw / added).unlink(missing_ok=True)
        log.warning("%s: rejected (%s)", path, err.reason)
        return [_failed(str(path), err.reason, _now())], {"files": 1, "computed": 0, "reused": 0}
    records, new = [], 0
    for item in items:
        source = printable(f"{path}!/{item.name}")  # a tar keeps a Latin-1 name's bytes: escaped
        if item.reason:
            log.warning("%s: rejected (%s)", source, item.reason)
            records.append(_failed(source, item.reason, _stamp(path)))
            continue
        new += item.path.name not in before
        records.append(ImageRecord(id=item.sha256, source=source, fetched_at=_stamp(item.path),
                                   raw_path=ws.relative(item.path), size_bytes=item.size))
    accepted = sum(1 for r in records if r.kept)
    log.info("collected %d members from %s (%d new, %d rejected)", len(records), path, new, len(records) - accepted)
    return records, {"files": len(records), "computed": new, "reused": accepted - new}


def url_list_lines(path: str | Path) -> list[tuple[int, str]]:
    """(line number, URL) from a .txt file (one a line; blank lines and # comments skipped) or a .csv with
    a url column. Lines are not judged here: a malformed one fails alone when collected, with its line.

    Raises:
        UserError: the list cannot be read as UTF-8 text, or a CSV has no `url` column.
    """
    path = Path(path)
    text = read_user_text(path, "URL list")
    if path.suffix.lower() == ".csv":
        try:
            reader = csv.DictReader(text.splitlines())
            column = next((c for c in (reader.fieldnames or []) if c and c.strip().lower() == "url"), None)
            if column is None:
                raise UserError(f"{path}: a CSV URL list needs a column named 'url'")
            return [(reader.line_num, url) for row in reader if (url := (row[column] or "").strip())]
        except csv.Error as err:
            raise UserError(f"{path}: not a readable CSV file ({err})") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")]


def read_url_list(path: str | Path) -> list[str]:
    return [url for _, url in url_list_lines(path)]


def collect_urls(urls: list[str], ws: Workspace, config: CollectConfig,
                 where: dict[str, str] | None = None) -> tuple[list[ImageRecord], dict]:
    """Download the URLs (each once) into raw/. `where`: URL -> "urls.txt line 3", added to its failure reason."""
    where = where or {}
    cache = ItemCache(ws.cache, "download")
    done: dict[str, dict] = {}
    for url in dict.fromkeys(urls):
        entry = cache.get(cache.key(url))
        if entry and "id" in entry and ws.path(entry["raw_path"]).exists():
            done[url] = entry
    todo = [url for url in dict.fromkeys(urls) if url not in done]
    failures: dict[str, str] = {}
    if todo:
        results = Downloader(DownloadPolicy.from_config(config), ws.raw).fetch_all(todo)
        for url, result in results.items():
            key = cache.key(url)
            previous = cache.get(key) or {}
            if isinstance(result, DownloadFailed):
                # The first failure's time, so a URL that keeps failing leaves the manifest unchanged.
                at = previous.get("failed_at", _now())
                cache.put(key, {"reason": result.reason, "failed_at": at})
                failures[url] = result.reason
                done[url] = {"reason": result.reason, "failed_at": at}
            else:
                entry = {"id": result.sha256, "raw_path": ws.relative(result.path), "size_bytes": result.size,
                         "format": result.format, "final_url": result.final_url, "fetched_at": _now()}
                cache.put(key, entry)
                done[url] = entry
    records = []
    for url in urls:
        entry = done[url]
        if "id" not in entry:
            reason = f"{entry['reason']} ({where[url]})" if url in where else entry["reason"]
            records.append(_failed(url, reason, entry["failed_at"]))
        else:
            records.append(ImageRecord(id=entry["id"], source=url, fetched_at=entry["fetched_at"],
                                       raw_path=entry["raw_path"], size_bytes=entry["size_bytes"]))
    fetched = len(todo) - len(failures)
    log.info("collected %d URLs (%d downloaded, %d failed, %d already in raw/)", len(urls), fetched, len(failures),
             len(urls) - len(todo))
    return records, {"files": len(records), "computed": fetched, "reused": len(urls) - len(todo)}


def source_kind(source: str) -> str:
    if is_url(source):
        return "url"
    path = Path(source).expanduser()
    if path.is_dir():
        return "folder"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such folder, archive or URL list")
    if path.suffix.lower() in URL_LIST_SUFFIXES:
        return "url_list"
    if is_archive(path):
        return "archive"
    return "file"


def collect_sources(images: str | list[str], ws: Workspace, config: CollectConfig) -> tuple[list[ImageRecord], dict]:
    """Every source in order; the stats add up, with `rejected` counting sources that gave no image."""
    records: list[ImageRecord] = []
    stats = {"files": 0, "computed": 0, "reused": 0}
    for source in as_sources(images):
        kind = source_kind(source)
        if kind == "folder":
            got, s = collect_folder(source, ws, config)
        elif kind == "archive":
            got, s = collect_archive(source, ws, config)
        elif kind == "file":
            record, new = copy_in(Path(source), ws)
            got, s = [record], {"files": 1, "computed": int(new), "reused": int(not new)}
        elif kind == "url":
            got, s = collect_urls([source], ws, config)
        else:
            lines = url_list_lines(source)
            where: dict[str, str] = {}
            for n, url in lines:
                where.setdefault(url, f"{Path(source).name} line {n}")
            got, s = collect_urls([url for _, url in lines], ws, config, where)
        records.extend(got)
        for key in stats:
            stats[key] += s[key]
    stats["rejected"] = sum(1 for r in records if not r.kept)
    return records, stats


def source_fingerprint(source: str, workspace: str, config: CollectConfig) -> list:
    """Cheap to read, and changed by anything that changes what collect would produce.

    Folders: names, sizes and mtimes. Files: size and mtime. URLs: the URL and what is stored for
    it; while any URL has no download yet, the current time, so the next run tries it again.
    """
    kind = source_kind(source)
    if kind == "folder":
        folder = Path(source).expanduser()
        return [[str(p.relative_to(folder)), (st := p.stat()).st_size, st.st_mtime_ns]
                for p in list_source_files(folder, config.recursive)]
    if kind in ("archive", "file"):
        st = Path(source).stat()
        return [st.st_size, st.st_mtime_ns]
    urls = [source] if kind == "url" else read_url_list(source)
    cache = ItemCache(Path(workspace) / "cache", "download")
    stored = [cache.get(cache.key(url)) or {} for url in urls]
    pending = any("id" not in s or not (Path(workspace) / s["raw_path"]).exists() for s in stored)
    return [urls, [s.get("id") for s in stored], time.time_ns() if pending else None]


CODE = code_version(__name__, "lorapipe.archives", "lorapipe.download")


def collect_key(images: str | list[str], workspace: str, config: CollectConfig) -> str:
    sources = resolve_sources(images)
    fingerprints = [source_fingerprint(s, workspace, config) for s in sources]
    return stage_key("collect", CODE, sources, fingerprints, workspace, config)


def run_collect(images: str | list[str], workspace: str, config: CollectConfig) -> dict:
    ws = Workspace.at(workspace)
    key = collect_key(images, workspace, config)
    records, stats = collect_sources(resolve_sources(images), ws, config)
    return finish_manifest_stage(ws, "collect", key, records, stats)


collect_task = stage_task(run_collect, collect_key, name="collect")
