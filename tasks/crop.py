"""Crop: each kept image to the SDXL bucket nearest its aspect ratio, placed around the largest face.

Without a face the crop follows a saliency map, or stays centred; `crop_method` says which. Images
smaller than their bucket are upscaled (Lanczos) and flagged. Records what SDXL's size conditioning
needs: the original size and the crop's top-left corner. Results are cached per (image id, settings).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from PIL import Image, ImageOps

from lorapipe.buckets import bucket_name, nearest_bucket, sdxl_buckets
from lorapipe.config import CropConfig
from lorapipe.faces import center_crop, crop_size, detect_faces, face_crop, saliency_crop
from lorapipe.fsutil import atomic_link, atomic_path
from lorapipe.images import ALLOWED_FORMATS, to_rgb
from lorapipe.item_cache import ItemCache
from lorapipe.manifest import ImageRecord, read_manifest
from lorapipe.workspace import Workspace, training_image_name
from tasks.stage import code_version, finish_manifest_stage, manifest_digest, stage_key, stage_task

log = logging.getLogger("lorapipe.crop")


def load_for_crop(path, width: int, height: int, scale: float) -> tuple[Image.Image, float]:
    """The upright RGB image, decoded no larger than the crop needs (JPEG draft); and its size factor."""
    with Image.open(path, formats=ALLOWED_FORMATS) as img:
        if img.format == "JPEG" and scale < 1:
            stored = img.size
            img.draft(img.mode, (math.ceil(stored[0] * scale), math.ceil(stored[1] * scale)))
        img = to_rgb(ImageOps.exif_transpose(img))
    return img, img.width / width


def plan_and_crop(src, dest: Path, width: int, height: int, bucket: tuple[int, int], config: CropConfig,
                  face: list[int] | None = None) -> dict:
    """Find the face (unless given: a face found before, in original pixels), place the crop, write the
    bucket-sized PNG; returns what the manifest records."""
    cw, _ = crop_size(width, height, bucket)
    scale = bucket[0] / cw
    img, k = load_for_crop(src, width, height, scale)
    if face is None and config.face_aware:
        faces = detect_faces(img)
        if faces:
            face = [min(round(v / k), limit) for v, limit in zip(faces[0], (width, height, width, height))]
    if face:
        box, method = face_crop(width, height, bucket, face, config.headroom), "face"
    elif config.fallback == "saliency":
        small_box, moved = saliency_crop(img, bucket)
        box = center_crop(width, height, bucket)
        if moved:  # the same placement in original pixels (the decoded copy may be smaller)
            left, top = round(small_box[0] / k), round(small_box[1] / k)
            left, top = min(left, width - (box[2] - box[0])), min(top, height - (box[3] - box[1]))
            box = (left, top, left + box[2] - box[0], top + box[3] - box[1])
        method = "saliency" if moved else "center"
    else:
        box, method = center_crop(width, height, bucket), "center"
    scaled_box = tuple(round(v * k) for v in box)
    out = img.crop(scaled_box).resize(bucket, Image.LANCZOS, reducing_gap=3.0)
    with atomic_path(dest, suffix=".png") as tmp:
        out.save(tmp, format="PNG")
    return {"bucket": bucket_name(bucket), "box": list(box), "method": method, "face": face, "scale": round(scale, 4)}


def publish(cached: Path, dest: Path) -> Path:
    """Put the cached crop at its images/ name (a hard link where possible), replacing an older crop."""
    return atomic_link(cached, dest, suffix=".png")


def crop_to_bucket(record: ImageRecord, ws: Workspace, config: CropConfig, bucket: tuple[int, int],
                   cache: ItemCache, dest: Path, face: list[int] | None = None) -> dict:
    """The original cropped to `bucket` (cached per image, settings and bucket), published at `dest`."""
    key = cache.key(record.id, record.width, record.height, config.model_dump(mode="json"), CODE, bucket, face)
    cropped = cache.file(key, ".png")
    plan = cache.get(key)
    if plan is None or not cropped.exists():
        plan = plan_and_crop(ws.path(record.raw_path), cropped, record.width, record.height, bucket, config, face)
        cache.put(key, plan)
    publish(cropped, dest)
    return plan


def cropped_fields(record: ImageRecord, plan: dict, image_path: str) -> dict:
    """The manifest fields a crop sets, SDXL's size and crop conditioning among them."""
    box, scale = plan["box"], plan["scale"]
    return {
        "crop": box,
        "bucket": plan["bucket"],
        "original_size": [record.height, record.width],
        # SDXL's crop conditioning is the offset in the resized image, before cropping.
        "crop_top_left": [round(box[1] * scale), round(box[0] * scale)],
        "image_path": image_path,
        "crop_method": plan["method"],
        "face": plan["face"],
        "crop_scale": scale,
    }


def retire_id_names(ws: Workspace, image_id: str, dest: Path) -> None:
    """Images were once named by their full sha256 (images/<id>.png, <id>-<bucket>.png): remove those crops
    (the cache keeps them), and move a caption sidecar to the new name, so a caption edited by hand is kept."""
    for old in ws.images.glob(f"{image_id}*"):
        if old in (dest, dest.with_suffix(".txt")):  # a source itself named by its sha256 (another raw/)
            continue
        if old.suffix == ".txt" and not dest.with_suffix(".txt").exists():
            old.rename(dest.with_suffix(".txt"))
        elif old.suffix == ".png":
            old.unlink(missing_ok=True)


def crop_records(records: list[ImageRecord], ws: Workspace, config: CropConfig) -> tuple[list, dict]:
    buckets = sdxl_buckets(config.resolution, config.bucket_step)
    cache = ItemCache(ws.cache, "crop")
    out, upscaled, methods = [], 0, {"face": 0, "saliency": 0, "center": 0}
    for record in records:
        if not record.kept:
            out.append(record)
            continue
        bucket = nearest_bucket(record.width, record.height, buckets)
        dest = ws.images / training_image_name(record.source, record.id)
        retire_id_names(ws, record.id, dest)
        plan = crop_to_bucket(record, ws, config, bucket, cache, dest)
        scale = plan["scale"]
        flags = [f for f in record.flags if not f.startswith("upscaled")]
        if scale > 1:
            upscaled += 1
            flags.append(f"upscaled: {scale:.2f}x to fill {plan['bucket']}")
            log.info("%s: upscaled %.2fx to fill %s", record.source, scale, plan["bucket"])
        methods[plan["method"]] += 1
        out.append(record.model_copy(update={**cropped_fields(record, plan, ws.relative(dest)), "flags": flags}))
    stats = {**cache.stats(), "upscaled": upscaled, **{f"crop_{m}": n for m, n in methods.items()},
             "buckets": sorted({r.bucket for r in out if r.kept})}
    return out, stats


CODE = code_version(__name__, "lorapipe.buckets", "lorapipe.images", "lorapipe.faces")


def crop_key(manifest: str, workspace: str, config: CropConfig) -> str:
    return stage_key("crop", CODE, manifest_digest(manifest), workspace, config)


def run_crop(manifest: str, workspace: str, config: CropConfig) -> dict:
    ws = Workspace.at(workspace)
    records, stats = crop_records(read_manifest(manifest), ws, config)
    return finish_manifest_stage(ws, "crop", crop_key(manifest, workspace, config), records, stats)


crop_task = stage_task(run_crop, crop_key, name="crop")
