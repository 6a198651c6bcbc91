"""The files real photo folders contain, good and bad, through collect → validate → dedup → crop.

Every bad file gets a reason a person understands, nothing crashes, and no source file changes.
"""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from helpers import jpeg_bytes, photo, save, sha256_tree
from lorapipe.config import CollectConfig, CropConfig, DedupConfig, ValidateConfig
from lorapipe.images import load_rgb
from tasks.collect import collect_sources
from tasks.crop import crop_records
from tasks.dedup import dedup_records
from tasks.validate import validate_records


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims to be width x height: a decompression bomb as far as any reader can tell."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def make_corpus(folder):
    """Write the corpus; returns {file name: expected reason prefix, or None for kept}."""
    folder.mkdir(parents=True)
    (folder / "truncated.jpg").write_bytes(jpeg_bytes(photo(900, 900, seed=1))[:6000])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "page.jpg").write_text("<!DOCTYPE html><html><body>403 Forbidden</body></html>")
    (folder / "logo.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="900" height="900"></svg>')
    (folder / "bomb.png").write_bytes(png_header_only(30_000, 30_000))  # over twice Pillow's limit: an error
    (folder / "bomb_warning.png").write_bytes(png_header_only(10_000, 10_000))  # over it: only a warning
    (folder / "notes.dat").write_text("shopping list: film, batteries\n")
    save(photo(300, 300, seed=2), folder / "small.png")

    ramp = np.linspace(0, 65535, 800 * 800).reshape(800, 800).astype(np.uint16)
    save(Image.fromarray(ramp), folder / "deep16.png")
    save(photo(900, 800, seed=3).convert("CMYK"), folder / "print.jpg", quality=95)
    save(photo(900, 800, seed=13), folder / "modern.avif", quality=60, speed=10)
    save(photo(900, 800, seed=14), folder / "web.webp", quality=80)
    palette = photo(800, 900, seed=4).quantize(64)
    pixels = np.asarray(palette).copy()
    pixels[pixels == 0] = 1
    pixels[:, :400] = 0  # left half transparent
    palette = Image.fromarray(pixels, "P")
    palette.putpalette(photo(800, 900, seed=4).quantize(64).getpalette())
    save(palette, folder / "palette.png", transparency=0)
    frames = [photo(820, 820, seed=s) for s in (5, 6, 7)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    save(photo(1200, 800, seed=8), folder / "rotated.jpg", exif=exif)

    with zipfile.ZipFile(folder / "upload.zip", "w") as z:
        z.writestr("good/inside.jpg", jpeg_bytes(photo(900, 800, seed=9)))
        z.writestr("../escape.jpg", jpeg_bytes(photo(900, 800, seed=10)))
        z.writestr("/etc/absolute.jpg", jpeg_bytes(photo(900, 800, seed=11)))
        link = zipfile.ZipInfo("link.jpg")
        link.external_attr = 0o120777 << 16  # a symlink member, pointing out of the archive
        z.writestr(link, "/etc/passwd")
    with tarfile.open(folder / "upload.tar", "w") as t:
        data = jpeg_bytes(photo(900, 800, seed=12))
        info = tarfile.TarInfo("sub/../../tar-escape.jpg")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("passwd.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(info)
    return {
        "truncated.jpg": "corrupt:",
        "empty.jpg": "unsupported: empty file (0 bytes)",
        "page.jpg": "unsupported: an HTML page",
        "logo.svg": "unsupported: an SVG drawing",
        "bomb.png": "too_large:",
        "bomb_warning.png": "too_large: Image size (100000000 pixels) exceeds limit of 89478485 pixels",
        "notes.dat": "unsupported: a text file",
        "small.png": "too_small: 300x300 < 768 px",
        "deep16.png": None,
        "print.jpg": None,
        "modern.avif": None,
        "web.webp": None,
        "palette.png": None,
        "animated.gif": None,
        "rotated.jpg": None,
        "inside.jpg": None,
        "escape.jpg": "unsafe: archive member name is path traversal (..)",
        "absolute.jpg": "unsafe: archive member name is an absolute path",
        "link.jpg": "unsafe: archive member is a symlink",
        "tar-escape.jpg": "unsafe: archive member name is path traversal (..)",
        "passwd.jpg": "unsafe: archive member is a symlink to '/etc/passwd'",
    }


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    """The corpus through collect → validate → dedup → crop, once for the tests below."""
    from lorapipe.workspace import Workspace

    root = tmp_path_factory.mktemp("corpus")
    src = root / "incoming" / "photos"
    expected = make_corpus(src)
    before = sha256_tree(root)
    workspace = Workspace.at(root / "workspace")
    sources = [str(src), str(src / "upload.zip"), str(src / "upload.tar")]
    records, stats = collect_sources(sources, workspace, CollectConfig())
    records, _ = validate_records(records, workspace, ValidateConfig())
    records, _ = dedup_records(records, workspace, DedupConfig())
    records, _ = crop_records(records, workspace, CropConfig(resolution=256, bucket_step=32))
    after = {k: v for k, v in sha256_tree(root).items() if not k.startswith("workspace/")}
    by_name = {os.path.basename(r.source): r for r in records}
    return workspace, by_name, expected, stats, before, after, root


def test_bad_inputs_get_reasons_and_nothing_is_modified(corpus_run):
    workspace, by_name, expected, stats, before, after, root = corpus_run
    by_name = dict(by_name)
    by_name.pop("upload.zip"), by_name.pop("upload.tar")  # the archives, seen as files of the folder
    assert set(by_name) == set(expected)
    for name, reason in expected.items():
        record = by_name[name]
        if reason is None:
            assert record.kept, (name, record.reason)
            assert Image.open(workspace.path(record.image_path)).mode == "RGB"
        else:
            assert not record.kept and record.reason.startswith(reason), (name, record.reason)
    assert after == before  # sources untouched, nothing written outside the workspace
    assert not list(root.rglob("*escape.jpg")) and stats["rejected"] == 5


def test_odd_modes_become_correct_8_bit_rgb(corpus_run):
    workspace, by_name, *_ = corpus_run
    deep = np.asarray(load_rgb(workspace.path(by_name["deep16.png"].raw_path)))
    assert by_name["deep16.png"].mode.startswith("I;16")
    assert deep.min() < 10 and deep.max() > 245 and 100 < deep.mean() < 155  # a ramp, not all white
    cropped = np.asarray(Image.open(workspace.path(by_name["deep16.png"].image_path)))
    assert 100 < cropped.mean() < 155

    original = np.asarray(photo(900, 800, seed=3), dtype=np.float64)
    cmyk = np.asarray(load_rgb(workspace.path(by_name["print.jpg"].raw_path)), dtype=np.float64)
    assert by_name["print.jpg"].mode == "CMYK" and np.abs(cmyk - original).mean() < 8

    palette = load_rgb(workspace.path(by_name["palette.png"].raw_path))
    assert palette.getpixel((100, 450)) == (128, 128, 128)  # the transparent half, on neutral grey
    assert palette.getpixel((600, 450)) != (128, 128, 128)

    gif = by_name["animated.gif"]
    assert gif.flags == ["animated: first of 3 frames used"]
    first = np.asarray(load_rgb(workspace.path(gif.raw_path)), dtype=np.float64)
    assert np.abs(first - np.asarray(photo(820, 820, seed=5), dtype=np.float64)).mean() < 20  # frame 1, not 3

    rotated = by_name["rotated.jpg"]
    assert (rotated.width, rotated.height) == (800, 1200)


def test_blurry_photos_are_flagged_with_their_score_and_kept(tmp_path, workspace):
    from PIL import ImageFilter

    src = tmp_path / "photos"
    sharp = photo(1024, 1024, seed=1)
    save(sharp, src / "sharp.png")
    save(sharp.filter(ImageFilter.GaussianBlur(4)), src / "shaken.png")
    records, stats = collect_sources([str(src)], workspace, CollectConfig())
    records, stats = validate_records(records, workspace, ValidateConfig())
    by_name = {os.path.basename(r.source): r for r in records}

    assert by_name["shaken.png"].kept and by_name["shaken.png"].flags == ["blurry"]
    assert by_name["sharp.png"].kept and by_name["sharp.png"].flags == []
    assert by_name["shaken.png"].blur_score < 15 < by_name["sharp.png"].blur_score
    assert stats["blurry"] == 1


def test_archive_caps_stop_bombs(tmp_path, workspace):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for i in range(3):
            z.writestr(f"zeros{i}.jpg", b"\0" * 2_000_000)  # 2 MB each, a few kB compressed
    config = CollectConfig(max_file_bytes=3_000_000, max_archive_bytes=5_000_000)
    records, _ = collect_sources([str(archive)], workspace, config)
    assert [r.kept for r in records] == [True, True, False]
    assert records[2].reason == "too_large: the archive unpacks to more than 5000000 bytes"
    records, _ = collect_sources([str(archive)], workspace, CollectConfig(max_file_bytes=1_000_000))
    assert all(r.reason == "too_large: 2000000 bytes unpacked > 1000000" for r in records)


def test_heic_without_its_plugin_says_what_to_install(tmp_path):
    import importlib.util

    if importlib.util.find_spec("pillow_heif"):
        pytest.skip("pillow-heif is installed here: HEIC files are read")
    from lorapipe.images import ImageRejected, open_image

    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 100)
    with pytest.raises(ImageRejected, match=r"unsupported: HEIF images cannot be read here \(pip install pillow-heif\)"):
        open_image(path)
