"""Collect: copy every candidate file from the source folder into raw/, named by the sha256 of its bytes.

Originals are only read. A file already in raw/ (same bytes) is not copied again.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path

from lorapipe.config import CollectConfig
from lorapipe.fsutil import atomic_copy, sha256_file
from lorapipe.manifest import ImageRecord
from lorapipe.workspace import Workspace
from tasks.stage import code_version, finish_manifest_stage, stage_key, stage_task

log = logging.getLogger("lorapipe.collect")

# Files that sit beside photos in training folders and are not images themselves.
SIDECAR_SUFFIXES = {".txt", ".caption", ".json", ".jsonl", ".toml", ".yaml", ".yml", ".npz", ".md"}


def list_source_files(folder: str | Path, recursive: bool = True) -> list[Path]:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder not found")
    pattern = folder.rglob("*") if recursive else folder.glob("*")
    files = [
        p
        for p in pattern
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.suffix.lower() not in SIDECAR_SUFFIXES
    ]
    return sorted(files)


def collect_folder(folder: str | Path, ws: Workspace, config: CollectConfig) -> tuple[list[ImageRecord], dict]:
    records, new = [], 0
    for path in list_source_files(folder, config.recursive):
        image_id = sha256_file(path)
        raw = ws.raw / f"{image_id}{path.suffix.lower()}"
        if not raw.exists():
            atomic_copy(path, raw)
            new += 1
        # The first collection time, kept stable so an unchanged folder gives an identical manifest.
        fetched_at = datetime.fromtimestamp(raw.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
        records.append(
            ImageRecord(
                id=image_id,
                source=str(path.resolve()),
                fetched_at=fetched_at,
                raw_path=ws.relative(raw),
                size_bytes=path.stat().st_size,
            )
        )
    log.info("collected %d files from %s (%d new, %d already in raw/)", len(records), folder, new, len(records) - new)
    return records, {"files": len(records), "computed": new, "reused": len(records) - new}


def folder_fingerprint(folder: str | Path, recursive: bool) -> list:
    """Names, sizes and mtimes: cheap to read, and any added, removed or rewritten file changes it."""
    folder = Path(folder).expanduser()
    return [
        [str(p.relative_to(folder)), (st := p.stat()).st_size, st.st_mtime_ns]
        for p in list_source_files(folder, recursive)
    ]


CODE = code_version(__name__)


def collect_key(images: str, workspace: str, config: CollectConfig) -> str:
    return stage_key(
        "collect", CODE, str(Path(images).resolve()), folder_fingerprint(images, config.recursive), workspace, config
    )


def run_collect(images: str, workspace: str, config: CollectConfig) -> dict:
    ws = Workspace.at(workspace)
    records, stats = collect_folder(images, ws, config)
    return finish_manifest_stage(ws, "collect", collect_key(images, workspace, config), records, stats)


collect_task = stage_task(run_collect, collect_key, name="collect")
