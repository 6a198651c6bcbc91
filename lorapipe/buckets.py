"""SDXL aspect-ratio buckets: sides multiples of `step`, area close to resolution²."""

from __future__ import annotations

import math
from collections.abc import Mapping


def sdxl_buckets(resolution: int = 1024, step: int = 64, max_aspect: float = 2.4) -> list[tuple[int, int]]:
    """(width, height) buckets of about resolution² pixels, both sides multiples of `step`, sorted by aspect.

    For each short side, the longest long side that keeps the area within resolution² and the aspect
    within `max_aspect`. At 1024 this is SDXL's list (1024x1024, 1152x896, 1216x832, 1344x768,
    1536x640 and their transposes) plus 1088x960 and 1472x704.
    """
    area = resolution * resolution
    buckets: set[tuple[int, int]] = set()
    for short in range(step, resolution + 1, step):
        long = min(area // short // step * step, int(short * max_aspect) // step * step)
        if long >= short and short * long >= 0.85 * area:
            buckets.update({(short, long), (long, short)})
    return sorted(buckets, key=lambda b: b[0] / b[1])


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log space: 2:1 and 1:2 are equally far)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def bucket_name(bucket: tuple[int, int]) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def merge_targets(counts: Mapping[tuple[int, int], int], min_images: int) -> dict[tuple[int, int], tuple[int, int]]:
    """{small bucket: the bucket its images join}: every bucket with fewer than `min_images` images goes to
    the nearest (by aspect) bucket that has enough. Empty when no bucket is small, or none is big enough.

    A bucket of one image makes micro-batches of one: slow, and a tensor shape of its own.
    """
    big = [b for b, n in counts.items() if n >= min_images]
    if not big:
        return {}
    return {b: nearest_bucket(b[0], b[1], big) for b, n in counts.items() if n < min_images}
