"""Opening untrusted image files: an allow-list of formats, a full decode, orientation, 8-bit RGB."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

NEUTRAL_BACKGROUND = (128, 128, 128)
BLUR_SIDE = 1024


def _allowed_formats() -> tuple[str, ...]:
    formats = ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"]
    if features.check("avif"):
        formats.append("AVIF")
    try:  # optional: HEIC/HEIF photos (iPhones) need the pillow-heif plugin
        import pillow_heif

        pillow_heif.register_heif_opener()
        formats.append("HEIF")
    except ImportError:
        pass
    return tuple(formats)


ALLOWED_FORMATS = _allowed_formats()
FILE_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif", "GIF": ".gif",
               "AVIF": ".avif", "HEIF": ".heic"}
HEAD_BYTES = 512


class ImageRejected(Exception):
    """The file cannot be trained on; `reason` is what goes into the manifest ('corrupt: ...')."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def sniff_format(head: bytes) -> str | None:
    """The image format the first bytes announce (magic numbers), whatever the name or Content-Type says."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM" and len(head) >= 14:
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[4:8] == b"ftyp":  # ISO media: the brands say AVIF or HEIF
        box = int.from_bytes(head[:4], "big")
        brands = {head[i : i + 4] for i in range(8, min(box, len(head)) - 3, 4)}
        if brands & {b"avif", b"avis"}:
            return "AVIF"
        if brands & {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}:
            return "HEIF"
    return None


def describe_content(head: bytes) -> str:
    """What a file that is not an image is, for a reason a person understands."""
    if not head:
        return "empty file (0 bytes)"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text or b"<body" in text:
        return "an HTML page"
    if b"<svg" in text:
        return "an SVG drawing (vector images are not supported)"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive"
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "a text file"
        except UnicodeDecodeError:
            pass
    return "not an image"


def read_head(path: str | Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(HEAD_BYTES)


def open_image(path: str | Path, max_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485) -> Image.Image:
    """Decode the whole file and return it upright. Raises ImageRejected with a reason.

    The format comes from the file's first bytes and must be on the allow-list; `verify()` passes
    truncated JPEGs, so this calls `load()`; Pillow's decompression-bomb warning is an error here,
    and the size is checked from the header before any pixel is decoded. For animations the first
    frame is used; `info["frames"]` says how many there were.
    """
    head = read_head(path)
    fmt = sniff_format(head)
    if fmt is None:
        what = describe_content(head)
        allowed = "" if not head else f" (allowed: {', '.join(ALLOWED_FORMATS)})"
        raise ImageRejected(f"unsupported: {what}{allowed}")
    if fmt not in ALLOWED_FORMATS:
        hint = " (pip install pillow-heif)" if fmt == "HEIF" else ""
        raise ImageRejected(f"unsupported: {fmt} images cannot be read here{hint}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path, formats=ALLOWED_FORMATS)
            if img.width * img.height > max_pixels:
                raise ImageRejected(f"too_large: {img.width}x{img.height} > {max_pixels} pixels")
            # MPO (cameras' JPEG with a preview image inside) is one photo, not an animation.
            frames = 1 if img.format == "MPO" else getattr(img, "n_frames", 1)
            img.load()
    except ImageRejected:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ImageRejected(f"too_large: {err}") from err
    except UnidentifiedImageError:
        raise ImageRejected(f"corrupt: starts like a {fmt} file but Pillow cannot read it")
    except Exception as err:  # decoders fail in many ways on broken files (OSError, struct.error, ...)
        raise ImageRejected(f"corrupt: {err or type(err).__name__}") from err
    fmt = img.format
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as err:  # a malformed EXIF block: the pixels are fine, the orientation unknown
        raise ImageRejected(f"corrupt: unreadable EXIF orientation ({err})") from err
    img.format = fmt
    img.info["frames"] = frames
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: 16-bit and float scaled (not clipped to white), alpha flattened on grey."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            peak = 65535.0
        elif img.mode == "F" and arr.max() <= 1.0:
            peak = 1.0
        else:
            peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, NEUTRAL_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    return to_rgb(open_image(path))


def blur_score(img: Image.Image) -> float:
    """Variance of the Laplacian of the grey image at BLUR_SIDE px on its long side: lower is blurrier.

    Measured at one size so that scores of small and large photos compare; sharp photos score in
    the hundreds, a photo out of focus or shaken in the tens.
    """
    grey = to_rgb(img).convert("L") if img.mode not in ("L", "RGB") else img.convert("L")
    scale = BLUR_SIDE / max(grey.size)
    if scale < 1:
        grey = grey.resize((max(1, round(grey.width * scale)), max(1, round(grey.height * scale))),
                           Image.BILINEAR, reducing_gap=2.0)
    a = np.asarray(grey, dtype=np.float32)
    if min(a.shape) < 3:
        return 0.0
    lap = 4 * a[1:-1, 1:-1] - a[:-2, 1:-1] - a[2:, 1:-1] - a[1:-1, :-2] - a[1:-1, 2:]
    return float(lap.var())
