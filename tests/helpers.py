"""Small builders for test inputs: real files, made on the spot."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from lorapipe.fsutil import sha256_file


def sha256_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def photo(width: int = 1024, height: int = 768, seed: int = 0) -> Image.Image:
    """A photo-like image: smooth shapes plus noise, distinct per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(1, 6, 3)
        channels.append(np.sin(fx * x * 6 + phase) * np.cos(fy * y * 6) * 100 + 128)
    arr = np.stack(channels, -1) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def save(img: Image.Image, path: Path, format: str | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=format, **kwargs)
    return path


def jpeg_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


def cropped_demo_records(folder: Path, ws, count: int):
    """`count` drawn portraits taken through collect, validate and crop at the demo's 256 px buckets."""
    from lorapipe.config import CollectConfig, CropConfig, ValidateConfig
    from lorapipe.demo_data import draw, scenes
    from tasks.collect import collect_folder
    from tasks.crop import crop_records
    from tasks.validate import validate_records

    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes(count)):
        draw(scene).save(folder / f"p{i}.png")
    records, _ = collect_folder(folder, ws, CollectConfig())
    records, _ = validate_records(records, ws, ValidateConfig())
    records, _ = crop_records(records, ws, CropConfig(resolution=256, bucket_step=32))
    return records
