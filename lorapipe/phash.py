"""Perceptual hashes, fast: reduced-size JPEG decoding, a process pool, and a vectorised all-pairs search.

Kept free of Prefect and of the stage modules so that pool workers start quickly (they import this
module only).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageOps

from lorapipe.images import ALLOWED_FORMATS, to_rgb

# imagehash's pHash looks at a 32x32 thumbnail: decoding a 12 MP JPEG at 1/8 scale (draft) gives
# the same hash within 2 bits, ~8x faster (measured with Pillow's `draft()` on JPEG photos).
DRAFT_SIZE = (256, 256)
# Below this many images the pool's start-up (~1 s: fresh interpreters importing numpy and Pillow)
# costs more than it saves.
POOL_MIN_IMAGES = 64
# Rows x columns of one block of the all-pairs search: ~4.7 MB of scratch per thread, so memory
# stays flat whatever the number of hashes.
BLOCK_ROWS, BLOCK_COLS = 128, 4096


def perceptual_hash(path: str | Path) -> str:
    """64-bit pHash (imagehash) of the upright image, as 16 hex digits."""
    with Image.open(path, formats=ALLOWED_FORMATS) as img:
        if img.format == "JPEG" and img.mode in ("RGB", "L"):
            img.draft("L", DRAFT_SIZE)  # the luma plane only: what convert("L") would compute
        img = ImageOps.exif_transpose(img)
        grey = img.convert("L") if img.mode in ("L", "RGB", "CMYK", "YCbCr") else to_rgb(img).convert("L")
        return str(imagehash.phash(grey))


def hash_files(paths: list[str | Path], workers: int = 0, pool_min: int = POOL_MIN_IMAGES) -> list[str]:
    """pHash of each file, in order; `workers` processes (0: one per core) for `pool_min` files or more."""
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(paths) < pool_min:
        return [perceptual_hash(p) for p in paths]
    # spawn, not fork: the caller may be a threaded Prefect worker, and forking threads can deadlock.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(pool.map(perceptual_hash, [str(p) for p in paths], chunksize=max(1, len(paths) // (8 * workers))))


def pack(hashes: list[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hashes], dtype=np.uint64)


def close_pairs(packed: np.ndarray, threshold: int, threads: int = 0) -> np.ndarray:
    """Every pair (i < j) of hashes at most `threshold` bits apart, as an (n, 2) array.

    XOR then popcount over blocks of the upper triangle; numpy releases the GIL in both, so blocks
    run on `threads` threads (0: one per core). 100k hashes: ~5e9 pairs in ~2 s on 2 cores.
    """
    n = len(packed)
    threads = threads or os.cpu_count() or 1

    def rows(r0: int) -> list[np.ndarray]:
        r1 = min(n, r0 + BLOCK_ROWS)
        xor = np.empty((r1 - r0, BLOCK_COLS), np.uint64)
        bits = np.empty((r1 - r0, BLOCK_COLS), np.uint8)
        left = packed[r0:r1, None]
        found = []
        for c0 in range(r0, n, BLOCK_COLS):
            w = min(n, c0 + BLOCK_COLS) - c0
            np.bitwise_xor(left, packed[None, c0 : c0 + w], out=xor[:, :w])
            np.bitwise_count(xor[:, :w], out=bits[:, :w])
            if bits[:, :w].min() <= threshold:  # one cheap pass decides whether a block has any pair
                i, j = np.nonzero(bits[:, :w] <= threshold)
                i, j = i + r0, j + c0
                keep = i < j
                found.append(np.stack([i[keep], j[keep]], axis=1))
        return found

    starts = range(0, n, BLOCK_ROWS)
    if threads > 1 and n > BLOCK_ROWS:
        with ThreadPoolExecutor(threads) as pool:
            blocks = [b for found in pool.map(rows, starts) for b in found]
    else:
        blocks = [b for r0 in starts for b in rows(r0)]
    return np.concatenate(blocks) if blocks else np.empty((0, 2), dtype=np.int64)


def hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def clusters(n: int, pairs: np.ndarray) -> list[list[int]]:
    """Connected components of the "close" graph: near copies of near copies are one cluster."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return []
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        groups.setdefault(label, []).append(i)
    return list(groups.values())
