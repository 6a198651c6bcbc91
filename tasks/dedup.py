"""Dedup: exact copies by sha256, near copies (resized, recompressed, lightly edited) by perceptual hash.

Near duplicates form clusters (union of all pairs within the threshold); each cluster keeps its best
image (largest, then first collected) and records the others as `duplicate_of`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageOps

from lorapipe.config import DedupConfig
from lorapipe.item_cache import ItemCache
from lorapipe.manifest import ImageRecord, read_manifest
from lorapipe.workspace import Workspace
from tasks.stage import code_version, finish_manifest_stage, manifest_digest, stage_key, stage_task

log = logging.getLogger("lorapipe.dedup")


def perceptual_hash(path) -> str:
    """64-bit pHash of the upright image; JPEGs are decoded at reduced size (draft), which moves it <= 2 bits."""
    with Image.open(path) as img:
        img.draft("RGB", (256, 256))
        img = ImageOps.exif_transpose(img).convert("L")
        return str(imagehash.phash(img))


def hamming_matrix(hashes: list[str]) -> np.ndarray:
    """All-pairs Hamming distances of 64-bit hashes: xor then popcount, vectorised."""
    values = np.array([int(h, 16) for h in hashes], dtype=np.uint64)
    return np.bitwise_count(values[:, None] ^ values[None, :]).astype(np.int16)


def clusters(distances: np.ndarray, threshold: int) -> list[list[int]]:
    parent = list(range(len(distances)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(distances <= threshold, k=1))):
        parent[root(int(j))] = root(int(i))
    groups: dict[int, list[int]] = {}
    for i in range(len(distances)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


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

    cache = ItemCache(ws.cache, "phash")
    unique = sorted(first_of.values())
    for i in unique:
        key = cache.key(out[i].id, CODE)
        cached = cache.get(key)
        if cached is None:
            cached = {"phash": perceptual_hash(ws.path(out[i].raw_path))}
            cache.put(key, cached)
        out[i] = out[i].model_copy(update={"phash": cached["phash"]})

    near = 0
    if unique:
        distances = hamming_matrix([out[i].phash for i in unique])
        for group in clusters(distances, config.phash_threshold):
            if len(group) < 2:
                continue
            members = [unique[g] for g in group]
            best = max(members, key=lambda m: (out[m].width * out[m].height, -m))
            for m in members:
                if m == best:
                    continue
                d = int(distances[group[members.index(m)], group[members.index(best)]])
                log.info("%s: near duplicate of %s (%d bits apart)", out[m].source, out[best].source, d)
                out[m] = out[m].reject(
                    f"duplicate_of: {Path(out[best].source).name} (near copy, phash distance {d})", out[best].id
                )
                near += 1
    return out, {**cache.stats(), "exact_duplicates": exact, "near_duplicates": near}


CODE = code_version(__name__)


def dedup_key(manifest: str, workspace: str, config: DedupConfig) -> str:
    return stage_key("dedup", CODE, manifest_digest(manifest), workspace, config)


def run_dedup(manifest: str, workspace: str, config: DedupConfig) -> dict:
    ws = Workspace.at(workspace)
    records, stats = dedup_records(read_manifest(manifest), ws, config)
    return finish_manifest_stage(ws, "dedup", dedup_key(manifest, workspace, config), records, stats)


dedup_task = stage_task(run_dedup, dedup_key, name="dedup")
