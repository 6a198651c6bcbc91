"""Dedup: exact copies by sha256, near copies (resized, recompressed, lightly edited) by perceptual hash.

Near duplicates form clusters (connected components of all pairs within the threshold); each cluster
keeps its best image (largest, then not blurry, then first collected) and records the others as
`duplicate_of`. Hashes are cached per image id, computed in a process pool, and compared all-pairs
with a vectorised popcount (lorapipe/phash.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from lorapipe.config import DedupConfig
from lorapipe.copy_quality import measure_copies, rank_key, why_better
from lorapipe.item_cache import ItemCache
from lorapipe.manifest import ImageRecord, read_manifest
from lorapipe.phash import close_pairs, clusters, hamming, hash_files, pack
from lorapipe.workspace import Workspace
from tasks.stage import code_version, finish_manifest_stage, manifest_digest, stage_key, stage_task

log = logging.getLogger("lorapipe.dedup")


def attach_hashes(records: list[ImageRecord], indices: list[int], ws: Workspace, workers: int) -> dict:
    """Fill in `phash` for records[indices], from the per-image cache or computed in one pool."""
    cache = ItemCache(ws.cache, "phash")
    keys = {i: cache.key(records[i].id, HASH_CODE) for i in indices}
    known = {i: cache.get(keys[i]) for i in indices}
    missing = [i for i in indices if known[i] is None]
    for i, value in zip(missing, hash_files([ws.path(records[i].raw_path) for i in missing], workers)):
        known[i] = {"phash": value}
        cache.put(keys[i], known[i])
    for i in indices:
        records[i] = records[i].model_copy(update={"phash": known[i]["phash"]})
    return cache.stats()


def best_copy(records: list[ImageRecord], members: list[int], ws: Workspace) -> tuple[int, dict[int, str]]:
    """The member to keep, and for each other member why the kept one won (lorapipe/copy_quality.py)."""
    measured = measure_copies([ws.path(records[m].raw_path) for m in members], [records[m].format for m in members])
    best_detail = max(q.detail for q in measured)
    keys = [rank_key(q, best_detail, "blurry" in records[m].flags, m) for m, q in zip(members, measured)]
    winner = max(range(len(members)), key=keys.__getitem__)
    return members[winner], {m: why_better(measured[winner], q, best_detail)
                             for m, q in zip(members, measured) if m != members[winner]}


def dedup_records(records: list[ImageRecord], ws: Workspace, config: DedupConfig) -> tuple[list, dict]:
    out = list(records)
    first_of: dict[str, int] = {}
    exact = 0
    for i, record in enumerate(out):
        if not record.kept:
            continue
        if record.id in first_of:
            original = out[first_of[record.id]]
            log.info("%s: exact copy of %s", record.source, original.source)
            out[i] = record.reject(f"duplicate_of: {Path(original.source).name} (exact copy)", record.id)
            exact += 1
        else:
            first_of[record.id] = i

    unique = sorted(first_of.values())
    stats = attach_hashes(out, unique, ws, config.workers)
    pairs = close_pairs(pack([out[i].phash for i in unique]), config.phash_threshold)
    near = 0
    for group in clusters(len(unique), pairs):
        if len(group) < 2:
            continue
        best, why = best_copy(out, [unique[g] for g in group], ws)
        for m, reason in why.items():
            d = hamming(out[m].phash, out[best].phash)
            log.info("%s: near duplicate of %s (%d bits apart; kept: %s)", out[m].source, out[best].source, d, reason)
            out[m] = out[m].reject(
                f"duplicate_of: {Path(out[best].source).name} (near copy, phash distance {d}; kept for {reason})",
                out[best].id,
            )
            near += 1
    return out, {**stats, "exact_duplicates": exact, "near_duplicates": near}


CODE = code_version(__name__, "lorapipe.phash", "lorapipe.copy_quality")
HASH_CODE = code_version("lorapipe.phash", "lorapipe.images")  # hashes stay valid when only the clustering changes


def dedup_key(manifest: str, workspace: str, config: DedupConfig) -> str:
    return stage_key("dedup", CODE, manifest_digest(manifest), workspace, config)


def run_dedup(manifest: str, workspace: str, config: DedupConfig) -> dict:
    ws = Workspace.at(workspace)
    records, stats = dedup_records(read_manifest(manifest), ws, config)
    return finish_manifest_stage(ws, "dedup", dedup_key(manifest, workspace, config), records, stats)


dedup_task = stage_task(run_dedup, dedup_key, name="dedup")
