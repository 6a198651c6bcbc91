"""Crop: each kept image to the SDXL bucket nearest its aspect ratio (centre crop), saved under images/.

Records what SDXL's size conditioning needs: the original size and the crop's top-left corner.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from PIL import Image

from lorapipe.buckets import bucket_name, nearest_bucket, sdxl_buckets
from lorapipe.config import CropConfig
from lorapipe.fsutil import atomic_path
from lorapipe.images import load_rgb
from lorapipe.item_cache import ItemCache
from lorapipe.manifest import ImageRecord, read_manifest
from lorapipe.workspace import Workspace
from tasks.stage import code_version, finish_manifest_stage, manifest_digest, stage_key, stage_task

log = logging.getLogger("lorapipe.crop")


def center_crop_box(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int, int, int]:
    """The largest box of the bucket's aspect ratio, centred: (left, top, right, bottom) in image pixels."""
    bw, bh = bucket
    if width * bh > height * bw:  # image wider than the bucket: trim the sides
        crop_w = round(height * bw / bh)
        left = (width - crop_w) // 2
        return left, 0, left + crop_w, height
    crop_h = round(width * bh / bw)
    top = (height - crop_h) // 2
    return 0, top, width, top + crop_h


def crop_image(src, dest, box, bucket) -> None:
    img = load_rgb(src).crop(box).resize(bucket, Image.LANCZOS)
    with atomic_path(dest, suffix=".png") as tmp:
        img.save(tmp, format="PNG")


def publish(cached: Path, dest: Path) -> Path:
    """Put the cached crop at images/<id>.png (a hard link where possible), replacing an older crop."""
    if dest.exists() and os.path.samefile(cached, dest):
        return dest
    with atomic_path(dest, suffix=".png") as tmp:
        tmp.unlink()
        try:
            os.link(cached, tmp)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(cached, tmp)
    return dest


def crop_records(records: list[ImageRecord], ws: Workspace, config: CropConfig) -> tuple[list, dict]:
    buckets = sdxl_buckets(config.resolution, config.bucket_step)
    cache = ItemCache(ws.cache, "crop")
    out, upscaled = [], 0
    for record in records:
        if not record.kept:
            out.append(record)
            continue
        bucket = nearest_bucket(record.width, record.height, buckets)
        box = center_crop_box(record.width, record.height, bucket)
        scale = bucket[0] / (box[2] - box[0])
        key = cache.key(record.id, bucket, box, CODE)
        cropped = cache.file(key, ".png")
        if cache.get(key) is None or not cropped.exists():
            crop_image(ws.path(record.raw_path), cropped, box, bucket)
            cache.put(key, {"bucket": bucket_name(bucket), "box": list(box)})
        dest = publish(cropped, ws.images / f"{record.id}.png")
        if scale > 1:
            upscaled += 1
            log.info("%s: upscaled %.2fx to fill %s", record.source, scale, bucket_name(bucket))
        out.append(
            record.model_copy(
                update={
                    "crop": list(box),
                    "bucket": bucket_name(bucket),
                    "original_size": [record.height, record.width],
                    # SDXL's crop conditioning is the offset in the resized image, before cropping.
                    "crop_top_left": [round(box[1] * scale), round(box[0] * scale)],
                    "image_path": ws.relative(dest),
                }
            )
        )
    return out, {**cache.stats(), "upscaled": upscaled, "buckets": sorted({r.bucket for r in out if r.kept})}


CODE = code_version(__name__, "lorapipe.buckets", "lorapipe.images")


def crop_key(manifest: str, workspace: str, config: CropConfig) -> str:
    return stage_key("crop", CODE, manifest_digest(manifest), workspace, config)


def run_crop(manifest: str, workspace: str, config: CropConfig) -> dict:
    ws = Workspace.at(workspace)
    records, stats = crop_records(read_manifest(manifest), ws, config)
    return finish_manifest_stage(ws, "crop", crop_key(manifest, workspace, config), records, stats)


crop_task = stage_task(run_crop, crop_key, name="crop")
