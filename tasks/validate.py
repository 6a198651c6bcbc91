"""Validate: decode every collected file fully, upright; reject what cannot be trained on, with the reason.

Kept images get their size, format and a sharpness score; blurry ones are flagged, not dropped (a
soft photo of a rare angle can still be worth training on: the person decides).
"""

from __future__ import annotations

import logging

from lorapipe.config import ValidateConfig
from lorapipe.images import ImageRejected, blur_score, open_image
from lorapipe.item_cache import ItemCache
from lorapipe.manifest import ImageRecord, read_manifest
from lorapipe.workspace import Workspace
from tasks.stage import code_version, finish_manifest_stage, manifest_digest, stage_key, stage_task

log = logging.getLogger("lorapipe.validate")


def inspect_image(path, config: ValidateConfig) -> dict:
    """Facts about one file, or the reason it is rejected."""
    try:
        img = open_image(path, max_pixels=config.max_pixels)
    except ImageRejected as err:
        return {"reason": err.reason}
    facts = {"width": img.width, "height": img.height, "format": img.format, "mode": img.mode, "reason": None,
             "flags": []}
    if min(img.size) < config.min_side:
        facts["reason"] = f"too_small: {img.width}x{img.height} < {config.min_side} px"
        return facts
    if img.info["frames"] > 1:
        facts["flags"].append(f"animated: first of {img.info['frames']} frames used")
    facts["blur_score"] = round(blur_score(img), 2)
    if facts["blur_score"] < config.blur_threshold:
        facts["flags"].append("blurry")
    return facts


def validate_records(records: list[ImageRecord], ws: Workspace, config: ValidateConfig) -> tuple[list, dict]:
    cache = ItemCache(ws.cache, "validate")
    out = []
    for record in records:
        if not record.kept:
            out.append(record)
            continue
        key = cache.key(record.id, config.model_dump(mode="json"), CODE)
        facts = cache.get(key)
        if facts is None:
            facts = inspect_image(ws.path(record.raw_path), config)
            cache.put(key, facts)
        reason = facts.pop("reason")
        record = record.model_copy(update=facts)
        if reason:
            log.warning("%s: rejected (%s)", record.source, reason)
            record = record.reject(reason)
        elif record.flags:
            log.info("%s: kept, flagged %s (blur score %s)", record.source, ", ".join(record.flags), record.blur_score)
        out.append(record)
    stats = {**cache.stats(), "rejected": sum(1 for r in out if not r.kept), "kept": sum(1 for r in out if r.kept),
             "blurry": sum(1 for r in out if r.kept and "blurry" in r.flags)}
    return out, stats


CODE = code_version(__name__, "lorapipe.images")


def validate_key(manifest: str, workspace: str, config: ValidateConfig) -> str:
    return stage_key("validate", CODE, manifest_digest(manifest), workspace, config)


def run_validate(manifest: str, workspace: str, config: ValidateConfig) -> dict:
    ws = Workspace.at(workspace)
    records, stats = validate_records(read_manifest(manifest), ws, config)
    return finish_manifest_stage(ws, "validate", validate_key(manifest, workspace, config), records, stats)


validate_task = stage_task(run_validate, validate_key, name="validate")
