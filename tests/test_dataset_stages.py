"""collect, validate, dedup and crop as plain functions: no Prefect, real files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from helpers import jpeg_bytes, photo, save, sha256_tree
from lorapipe.config import CollectConfig, CropConfig, DedupConfig, ValidateConfig
from lorapipe.fsutil import sha256_file
from lorapipe.images import ImageRejected, load_rgb, open_image, to_rgb
from tasks.collect import collect_folder
from tasks.crop import crop_records
from lorapipe.phash import close_pairs, clusters, hash_files, pack
from tasks.dedup import dedup_records
from tasks.validate import validate_records


def collected(folder, workspace):
    records, _ = collect_folder(folder, workspace, CollectConfig())
    return records


def test_collect_copies_by_content_and_never_touches_originals(tmp_path, workspace):
    src = tmp_path / "photos"
    save(photo(seed=1), src / "a.jpg")
    save(photo(seed=2), src / "nested" / "b.png")
    (src / "a.txt").write_text("a kohya caption sidecar, not an image")
    (src / ".DS_Store").write_bytes(b"\0\0")
    before = sha256_tree(src)

    records, stats = collect_folder(src, workspace, CollectConfig())

    assert sha256_tree(src) == before
    assert [r.source.split("/")[-1] for r in records] == ["a.jpg", "b.png"]
    for r in records:
        assert r.id == sha256_file(workspace.path(r.raw_path)) == sha256_file(r.source)
    assert stats == {"files": 2, "computed": 2, "reused": 0}
    again, stats = collect_folder(src, workspace, CollectConfig())
    assert stats["computed"] == 0 and [r.model_dump() for r in again] == [r.model_dump() for r in records]


def test_collect_names_a_missing_folder(tmp_path, workspace):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        collect_folder(tmp_path / "nowhere", workspace, CollectConfig())


def test_validate_rejects_with_reasons_and_keeps_good_images(tmp_path, workspace):
    src = tmp_path / "photos"
    save(photo(1024, 1024, seed=1), src / "good.jpg")
    (src / "truncated.jpg").write_bytes(jpeg_bytes(photo(seed=2))[:5000])
    (src / "empty.jpg").write_bytes(b"")
    (src / "page.jpg").write_text("<html><body>404 not found</body></html>")
    save(photo(300, 300, seed=3), src / "small.png")

    records, stats = validate_records(collected(src, workspace), workspace, ValidateConfig())
    by_name = {r.source.split("/")[-1]: r for r in records}

    assert by_name["good.jpg"].kept and (by_name["good.jpg"].width, by_name["good.jpg"].height) == (1024, 1024)
    assert by_name["truncated.jpg"].reason.startswith("corrupt:")
    assert by_name["empty.jpg"].reason.startswith("unsupported:")
    assert by_name["page.jpg"].reason.startswith("unsupported:")
    assert by_name["small.png"].reason == "too_small: 300x300 < 768 px"
    assert stats["kept"] == 1 and stats["rejected"] == 4


def test_validate_reuses_per_image_results(tmp_path, workspace):
    src = tmp_path / "photos"
    save(photo(seed=1), src / "a.jpg")
    records = collected(src, workspace)
    _, first = validate_records(records, workspace, ValidateConfig())
    save(photo(seed=2), src / "b.jpg")
    _, second = validate_records(collected(src, workspace), workspace, ValidateConfig())
    assert (first["computed"], second["computed"], second["reused"]) == (1, 1, 1)


def test_exif_orientation_is_applied(tmp_path):
    img = photo(1200, 800, seed=4)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    path = save(img, tmp_path / "rotated.jpg", exif=exif)
    assert open_image(path).size == (800, 1200)


def test_sixteen_bit_png_is_scaled_not_white(tmp_path):
    ramp = (np.linspace(0, 65535, 256 * 256).reshape(256, 256)).astype(np.uint16)
    path = save(Image.fromarray(ramp), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I;16")
    rgb = np.asarray(load_rgb(path))
    assert rgb.min() < 10 and rgb.max() > 245 and 100 < rgb.mean() < 155


def test_transparency_is_flattened_on_grey():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (128, 128, 128)


def test_decompression_bomb_is_a_rejection(tmp_path):
    path = save(Image.new("L", (4000, 4000)), tmp_path / "big.png")
    with pytest.raises(ImageRejected, match="too_large"):
        open_image(path, max_pixels=1_000_000)


def test_dedup_clusters_exact_and_near_copies_and_keeps_the_largest(tmp_path, workspace):
    src = tmp_path / "photos"
    original = photo(1600, 1200, seed=5)
    save(original, src / "a_original.jpg", quality=95)
    save(original.resize((1200, 900), Image.LANCZOS), src / "b_resized.jpg", quality=70)
    save(original, src / "c_copy.jpg", quality=95)  # the same bytes as a_original.jpg
    save(photo(1600, 1200, seed=6), src / "d_other.jpg")
    records, _ = validate_records(collected(src, workspace), workspace, ValidateConfig())

    records, stats = dedup_records(records, workspace, DedupConfig())
    by_name = {r.source.split("/")[-1]: r for r in records}

    assert by_name["a_original.jpg"].kept and by_name["d_other.jpg"].kept
    assert by_name["b_resized.jpg"].duplicate_of == by_name["a_original.jpg"].id
    assert "near copy" in by_name["b_resized.jpg"].reason
    assert by_name["c_copy.jpg"].duplicate_of == by_name["a_original.jpg"].id
    assert "exact copy" in by_name["c_copy.jpg"].reason
    assert stats["exact_duplicates"] == 1 and stats["near_duplicates"] == 1


def test_close_pairs_counts_bits():
    hashes = pack(["0000000000000000", "000000000000000f", "ffffffffffffffff", "00000000000000ff"])
    assert close_pairs(hashes, 4).tolist() == [[0, 1], [1, 3]]
    assert close_pairs(hashes, 8).tolist() == [[0, 1], [0, 3], [1, 3]]
    assert close_pairs(hashes, 64).shape == (6, 2)


def test_near_copies_of_near_copies_are_one_cluster():
    # 0 and 2 are 16 bits apart, but each is 8 from 1: one cluster, not two pairs.
    hashes = pack(["0000000000000000", "00000000000000ff", "000000000000ffff", "f0f0f0f0f0f0f0f0"])
    assert sorted(map(sorted, clusters(4, close_pairs(hashes, 8)))) == [[0, 1, 2], [3]]


def test_blocked_threaded_search_finds_exactly_the_close_pairs():
    rng = np.random.default_rng(0)
    packed = rng.integers(0, 2**64 - 1, size=4500, dtype=np.uint64, endpoint=True)
    for i in range(0, 4500, 97):  # plant near copies across row and column blocks
        packed[(i * 31 + 4099) % 4500] = packed[i] ^ np.uint64(0b1011 << (i % 50))
    expected = []
    for i in range(len(packed)):
        d = np.bitwise_count(packed[i] ^ packed[i + 1 :])
        expected += [(i, i + 1 + j) for j in np.nonzero(d <= 6)[0]]
    found = close_pairs(packed, 6, threads=2)
    assert sorted(map(tuple, found.tolist())) == sorted(expected) and len(expected) >= 40


def test_hashes_from_the_process_pool_match_and_jpegs_hash_like_full_decodes(tmp_path):
    import imagehash

    paths = [save(photo(1600, 1200, seed=s), tmp_path / f"{s}.jpg", quality=90) for s in range(4)]
    serial = hash_files(paths, workers=1)
    assert hash_files(paths, workers=2, pool_min=1) == serial
    for path, h in zip(paths, serial):  # reduced-size decoding moves the hash by a bit or two at most
        full = imagehash.phash(Image.open(path).convert("L"))
        assert (int(str(full), 16) ^ int(h, 16)).bit_count() <= 2


def test_dedup_keeps_the_largest_then_the_sharp_copy(tmp_path, workspace):
    from PIL import ImageFilter

    src = tmp_path / "photos"
    original = photo(1600, 1200, seed=5)
    save(original.filter(ImageFilter.GaussianBlur(4)), src / "a_blurred.jpg", quality=95)
    save(original, src / "b_original.jpg", quality=95)
    save(original.resize((800, 600), Image.LANCZOS), src / "c_small.jpg", quality=95)
    records, _ = validate_records(collected(src, workspace), workspace, ValidateConfig(min_side=512))
    records, stats = dedup_records(records, workspace, DedupConfig())
    by_name = {r.source.split("/")[-1]: r for r in records}
    assert by_name["a_blurred.jpg"].flags == ["blurry"] and by_name["b_original.jpg"].kept
    assert by_name["a_blurred.jpg"].duplicate_of == by_name["c_small.jpg"].duplicate_of == by_name["b_original.jpg"].id
    assert stats["near_duplicates"] == 2


@pytest.mark.parametrize("make_worse, why", [
    # A blurry thumbnail upscaled past its original: more pixels, less detail.
    (lambda img: img.resize((320, 448), Image.LANCZOS).resize((1000, 1400), Image.BICUBIC), "more detail"),
    (lambda img: img.convert("L").convert("RGB"), "colour"),
    (lambda img: img.convert("L"), "colour"),
])
def test_dedup_keeps_the_copy_with_the_most_detail_in_colour(tmp_path, workspace, make_worse, why):
    src = tmp_path / "photos"
    original = photo(800, 1120, seed=11)
    save(make_worse(original), src / "a_worse.jpg", quality=95)
    save(original, src / "b_original.jpg", quality=95)
    records, _ = validate_records(collected(src, workspace), workspace, ValidateConfig(min_side=512))
    records, _ = dedup_records(records, workspace, DedupConfig())
    by_name = {r.source.split("/")[-1]: r for r in records}
    assert by_name["b_original.jpg"].kept, by_name["b_original.jpg"].reason
    assert by_name["a_worse.jpg"].duplicate_of == by_name["b_original.jpg"].id
    assert f"kept for {why}" in by_name["a_worse.jpg"].reason


def test_dedup_keeps_the_less_compressed_copy_and_says_so(tmp_path, workspace):
    from PIL import ImageFilter

    src = tmp_path / "photos"
    # Smooth content, so that the JPEGs keep the same detail and only their compression tells them apart.
    original = photo(1200, 900, seed=12).filter(ImageFilter.GaussianBlur(1.5))
    save(original, src / "a_recompressed.jpg", quality=40)
    save(original, src / "b_original.jpg", quality=95)
    save(original, src / "c_lossless.png")
    records, _ = validate_records(collected(src, workspace), workspace, ValidateConfig(min_side=512))
    records, _ = dedup_records(records, workspace, DedupConfig())
    by_name = {r.source.split("/")[-1]: r for r in records}
    assert by_name["c_lossless.png"].kept
    assert "less compressed (lossless vs JPEG quality ~40)" in by_name["a_recompressed.jpg"].reason
    assert "less compressed (lossless vs JPEG quality ~95)" in by_name["b_original.jpg"].reason


def test_crop_fits_each_image_to_its_bucket(tmp_path, workspace):
    src = tmp_path / "photos"
    save(photo(1200, 1600, seed=7), src / "portrait.jpg")
    save(photo(1900, 1000, seed=8), src / "wide.jpg")  # nearest: 1344x768 (1.75:1)
    records, _ = validate_records(collected(src, workspace), workspace, ValidateConfig())

    config = CropConfig(fallback="center")  # no faces in these: the plain geometry
    records, stats = crop_records(records, workspace, config)
    by_name = {r.source.split("/")[-1]: r for r in records}

    portrait, wide = by_name["portrait.jpg"], by_name["wide.jpg"]
    assert portrait.bucket == "896x1152" and wide.bucket == "1344x768"
    assert Image.open(workspace.path(portrait.image_path)).size == (896, 1152)
    assert portrait.original_size == [1600, 1200]
    assert wide.crop[1] == 0 and wide.crop[3] == 1000  # full height kept, sides trimmed
    assert wide.crop == [75, 0, 1825, 1000]
    assert wide.crop_top_left == [0, round(75 * 768 / 1000)]  # in resized pixels, as SDXL was trained
    assert stats["computed"] == 2
    assert {r.crop_method for r in records} == {"center"}
    _, again = crop_records(records, workspace, config)
    assert again["computed"] == 0 and again["reused"] == 2
