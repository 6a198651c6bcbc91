"""Which copy of one photo to train on: the one with the most real detail, in colour, least compressed.

Copies of one photo (a near-duplicate cluster) differ in ways pixel count alone misreads: a thumbnail
upscaled to 1000x1400 has more pixels than its 800x1120 original and far less detail. So copies are
compared, in this order:

1. **Detail at a common scale**: each copy resized to the pixel count of the smallest one, then the
   variance of its Laplacian divided by the variance of its grey levels (so brightness and contrast edits
   don't count as detail). A copy under `BLURRIER` (0.7) times the best copy's detail is a blurrier copy.
2. **Colour** over greyscale.
3. **Less compression**: lossless formats first, then JPEG by its luminance quantisation table (mean step
   ≤ 12 is about libjpeg quality 90 and up, ≤ 30 about 75 and up), other lossy formats in the middle.
4. **More pixels**, then sharp over flagged blurry, then the first collected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lorapipe.images import load_rgb

BLURRIER = 0.7
LOSSLESS = {"PNG", "BMP", "TIFF", "GIF"}
GREY_SPREAD = 2.0  # mean |R-G| + |G-B| below this (in 8-bit levels): a grey picture stored as RGB


@dataclass(frozen=True)
class CopyQuality:
    """What dedup compares between copies of one photo; `detail` is relative to the cluster's common scale."""

    detail: float
    colour: bool
    compression: int  # 0 lossless, 1 light (JPEG ~q90+), 2 medium or unknown lossy, 3 heavy
    jpeg_quality: int | None  # libjpeg-equivalent quality, when a JPEG
    pixels: int
    size: tuple[int, int]  # (width, height)


def jpeg_quality(path: str | Path) -> int | None:
    """The libjpeg quality (1-100) whose scaling of the standard luminance table gives this file's table."""
    try:
        with Image.open(path, formats=["JPEG"]) as img:
            table = img.quantization.get(0)
    except Exception:  # not a JPEG after all, or no tables: no estimate
        return None
    if not table:
        return None
    scale = np.mean(table) / np.mean(STANDARD_LUMINANCE) * 100  # libjpeg: scale% = 5000/q (q<50), 200-2q
    quality = 5000 / scale if scale > 100 else (200 - scale) / 2
    return int(np.clip(round(quality), 1, 100))


def compression_level(fmt: str | None, quality: int | None) -> int:
    if fmt in LOSSLESS:
        return 0
    if quality is None:
        return 2
    return 1 if quality >= 90 else 2 if quality >= 75 else 3


def detail_at(img: Image.Image, pixels: int) -> float:
    """Laplacian variance over grey-level variance, with the image resized to `pixels` pixels."""
    scale = (pixels / (img.width * img.height)) ** 0.5
    grey = img.convert("L")
    if scale < 1:
        grey = grey.resize((max(3, round(img.width * scale)), max(3, round(img.height * scale))), Image.LANCZOS)
    a = np.asarray(grey, dtype=np.float32)
    lap = 4 * a[1:-1, 1:-1] - a[:-2, 1:-1] - a[2:, 1:-1] - a[1:-1, :-2] - a[1:-1, 2:]
    return float(lap.var() / (a.var() + 1e-6))


def measure_copies(paths: list[Path], formats: list[str | None]) -> list[CopyQuality]:
    """CopyQuality of each copy of one photo (the files of a near-duplicate cluster)."""
    images = [load_rgb(p) for p in paths]
    common = min(img.width * img.height for img in images)
    out = []
    for img, path, fmt in zip(images, paths, formats):
        small = np.asarray(img.resize((64, 64), Image.BILINEAR), dtype=np.int16)
        spread = np.abs(small[..., 0] - small[..., 1]).mean() + np.abs(small[..., 1] - small[..., 2]).mean()
        quality = jpeg_quality(path) if fmt == "JPEG" else None
        out.append(CopyQuality(detail_at(img, common), bool(spread >= GREY_SPREAD), compression_level(fmt, quality),
                               quality, img.width * img.height, img.size))
    return out


def why_better(kept: CopyQuality, other: CopyQuality, best_detail: float) -> str:
    """The first criterion on which `kept` beat `other`, in words for the manifest."""
    if other.detail < BLURRIER * best_detail:
        return f"more detail at the same scale ({kept.detail / max(other.detail, 1e-9):.1f}x)"
    if kept.colour and not other.colour:
        return "colour (this copy is greyscale)"
    if kept.compression < other.compression:
        def describe(q: CopyQuality) -> str:
            return "lossless" if q.compression == 0 else f"JPEG quality ~{q.jpeg_quality}" if q.jpeg_quality else "lossy"
        return f"less compressed ({describe(kept)} vs {describe(other)})"
    if kept.pixels > other.pixels:
        return f"more pixels ({kept.size[0]}x{kept.size[1]} vs {other.size[0]}x{other.size[1]})"
    return "the sharper or first collected copy"


def rank_key(q: CopyQuality, best_detail: float, blurry_flag: bool, order: int) -> tuple:
    """Sort key: the largest is the copy to keep (see the module docstring for the order)."""
    return (q.detail >= BLURRIER * best_detail, q.colour, -q.compression, q.pixels, not blurry_flag, -order)


# The IJG standard luminance quantisation table (JPEG spec, Annex K.1), which libjpeg scales by quality.
STANDARD_LUMINANCE = [
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
]
