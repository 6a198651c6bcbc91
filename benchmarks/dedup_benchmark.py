"""Dedup benchmark: lorapipe's pHash stage against imagededup's PHash, on the same files, in one run.

    make bench          # installs the [bench] extra and imagededup (--no-deps), then runs this
    .venv/bin/python benchmarks/dedup_benchmark.py --images 120

Photos: 12 MP JPEGs made from scikit-image's bundled sample photos (random crops, flips, colour
shifts; every fifth one also saved as a half-size recompressed copy, a known near duplicate).
Measured: hashing throughput per core (one process each, then each tool's own pool on every core),
the duplicates each finds at the same Hamming threshold, and the all-pairs search on 1k, 10k and 100k
random 64-bit hashes. Goals: hashing >= 5x imagededup per core; 100k-hash search < 5 s on
2 cores. Speed targets live here, not in the tests.

imagededup's package imports torchvision at load time (for its CNN method, unused here); PyPI's
torchvision fails to import beside the CPU build of torch ("operator torchvision::nms does not
exist"), so when it is missing those imports get empty placeholder modules. imagededup's PHash code
itself runs unchanged.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import types
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorapipe.config import DedupConfig  # noqa: E402
from lorapipe.phash import close_pairs, clusters, hash_files, pack  # noqa: E402

SAMPLES = ["astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "hubble_deep_field",
           "horse", "moon", "page", "brick", "grass", "gravel", "coins", "clock", "cat", "logo", "retina"]
SIZE = (4000, 3000)  # 12 MP


def import_imagededup():
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in ("torchvision", "torchvision.models", "torchvision.transforms",
                     "torchvision.models.vision_transformer"):
            module = types.ModuleType(name)
            module.__getattr__ = lambda attr: mock.MagicMock()  # any name the CNN module asks for
            sys.modules[name] = module
    import imagededup
    from imagededup.methods import PHash

    for name in list(logging.root.manager.loggerDict):  # its INFO lines would bury the table
        if name.startswith("imagededup"):
            logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="imagededup")
    return PHash, getattr(imagededup, "__version__", "?")


def sample_photos() -> list[Image.Image]:
    from skimage import data

    photos = []
    for name in SAMPLES:
        try:
            arr = getattr(data, name)()
        except Exception:  # some samples are downloaded on first use: skip them offline
            continue
        img = Image.fromarray(arr)
        photos.append(img.convert("RGB"))
    return photos


def make_photos(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` distinct 12 MP JPEGs plus known near-duplicate copies; reused when already there."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bases = None
    paths = []
    for i in range(count):
        path = folder / f"photo_{i:04d}.jpg"
        copy = folder / f"photo_{i:04d}_copy.jpg"
        crop, flip, shift = rng.uniform(0.6, 1.0), rng.random() < 0.5, rng.uniform(0.8, 1.2, 3)
        base_index, x0, y0 = i, rng.random(), rng.random()
        if not path.exists() or (i % 5 == 0 and not copy.exists()):
            bases = bases or sample_photos()
            base = bases[base_index % len(bases)]
            w, h = base.size
            cw, ch = int(w * crop), int(h * crop)
            left, top = int((w - cw) * x0), int((h - ch) * y0)
            img = base.crop((left, top, left + cw, top + ch))
            img = ImageOps.mirror(img) if flip else img
            r, g, b = (ImageEnhance.Brightness(c).enhance(s) for c, s in zip(img.split(), shift))
            img = Image.merge("RGB", (r, g, b)).resize(SIZE, Image.BICUBIC)
            img.save(path, quality=90)
            if i % 5 == 0:
                img.resize((SIZE[0] // 2, SIZE[1] // 2), Image.LANCZOS).save(copy, quality=75)
        paths.append(path)
        if i % 5 == 0:
            paths.append(copy)
    return paths


def warm(paths: list[Path]) -> None:
    for p in paths:
        p.read_bytes()


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def pairs_from_imagededup(duplicates: dict) -> set:
    return {tuple(sorted((a, b))) for a, dups in duplicates.items() for b in dups}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=120, help="distinct photos (every 5th also gets a copy)")
    parser.add_argument("--folder", type=Path, default=Path(__file__).resolve().parent / ".photos")
    parser.add_argument("--threshold", type=int, default=DedupConfig().phash_threshold)
    parser.add_argument("--sizes", default="1000,10000,100000", help="numbers of hashes for the search")
    parser.add_argument("--reference-search-budget", type=float, default=120.0,
                        help="skip imagededup's search at a size whose estimate exceeds this many seconds")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    PHash, version = import_imagededup()
    t = args.threshold

    print(f"making {args.images} 12 MP JPEGs in {args.folder} (kept for the next run) ...", flush=True)
    paths = make_photos(args.folder, args.images)
    folder = args.folder
    listed = sorted(folder.glob("*.jpg"))
    paths = [p for p in paths if p in set(listed)]
    # imagededup hashes a folder: give it one holding exactly these files.
    if len(listed) != len(paths):
        sys.exit(f"{folder} holds other .jpg files: use an empty --folder")
    warm(paths)
    n = len(paths)

    ours_1, ours_1_s = timed(hash_files, paths, workers=1)
    ours_pool, ours_pool_s = timed(hash_files, paths, workers=cores, pool_min=1)
    assert ours_pool == ours_1
    phasher = PHash(verbose=False)
    ref_1, ref_1_s = timed(phasher.encode_images, image_dir=str(folder), num_enc_workers=0)
    ref_pool, ref_pool_s = timed(phasher.encode_images, image_dir=str(folder), num_enc_workers=cores)

    names = [p.name for p in paths]
    ours_pairs = {tuple(sorted((names[i], names[j]))) for i, j in close_pairs(pack(ours_1), t).tolist()}
    ref_dups = phasher.find_duplicates(encoding_map=ref_1, max_distance_threshold=t, search_method="brute_force_cython")
    ref_pairs = pairs_from_imagededup(ref_dups)
    planted = {tuple(sorted((p.name, p.name.replace("_copy", "")))) for p in paths if "_copy" in p.name}

    rows = [("hashing, 1 process (images/s per core)", n / ours_1_s, n / ref_1_s),
            (f"hashing, pool on {cores} cores (images/s per core)", n / ours_pool_s / cores, n / ref_pool_s / cores)]

    rng = np.random.default_rng(1)
    search = []
    for size in [int(s) for s in args.sizes.split(",")]:
        hashes = rng.integers(0, 2**64 - 1, size=size, dtype=np.uint64, endpoint=True)
        hashes[1::50] = hashes[0::50][: len(hashes[1::50])] ^ np.uint64(0b111)  # some near pairs to find
        ours, ours_s = timed(lambda: clusters(size, close_pairs(hashes, t)))
        ref_s, note = None, ""
        previous = search[-1] if search else None
        estimate = previous[2] * (size / previous[0]) ** 2 if previous and previous[2] else 0
        if estimate > args.reference_search_budget:
            ref_s, note = estimate, "est."
        else:
            encoding = {f"h{i}": f"{int(h):016x}" for i, h in enumerate(hashes)}
            _, ref_s = timed(phasher.find_duplicates, encoding_map=encoding, max_distance_threshold=t,
                             search_method="brute_force_cython", num_dist_workers=cores)
        search.append((size, ours_s, ref_s, note))

    print()
    print(f"lorapipe dedup vs imagededup {version} PHash (find_duplicates, brute_force_cython), "
          f"threshold {t} bits, {n} JPEGs of 12 MP, {cores} cores")
    print(f"{'measure':<48}{'lorapipe':>12}{'imagededup':>14}{'ratio':>12}")
    for label, ours, ref in rows:
        print(f"{label:<48}{ours:>12.1f}{ref:>14.1f}{ours / ref:>11.1f}x")
    for size, ours_s, ref_s, note in search:
        ref_text = f"{note} {ref_s:.2f}".strip() if ref_s is not None else "-"
        ratio = f"{note} {ref_s / ours_s:.0f}x".strip()  # an estimated time gives an estimated ratio
        print(f"{f'search, {size:,} hashes (s)':<48}{ours_s:>12.3f}{ref_text:>14}{ratio:>12}")
    found = lambda pairs: f"{len(pairs & planted)}/{len(planted)} planted, {len(pairs - planted)} other"  # noqa: E731
    print(f"{'near-duplicate pairs found':<48}{found(ours_pairs):>26} (lorapipe)")
    print(f"{'':<48}{found(ref_pairs):>26} (imagededup)")
    hashing_ratio = rows[0][1] / rows[0][2]
    big = [s for s in search if s[0] == 100_000]
    print()
    print(f"goal: hashing >= 5x imagededup per core: {hashing_ratio:.1f}x -> {'met' if hashing_ratio >= 5 else 'MISSED'}")
    if big:
        print(f"goal: 100k-hash search < 5 s on {cores} cores: {big[0][1]:.2f} s -> "
              f"{'met' if big[0][1] < 5 else 'MISSED'}")


if __name__ == "__main__":
    main()
