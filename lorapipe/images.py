"""Opening untrusted image files: an allow-list of formats, a full decode, orientation, 8-bit RGB."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
NEUTRAL_BACKGROUND = (128, 128, 128)


class ImageRejected(Exception):
    """The file cannot be trained on; `reason` is what goes into the manifest ('corrupt: ...')."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def open_image(path: str | Path, max_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485) -> Image.Image:
    """Decode the whole file and return it upright, as 8-bit RGB. Raises ImageRejected with a reason.

    `verify()` passes truncated JPEGs, so this calls `load()`; Pillow's decompression-bomb warning is an
    error here, checked from the header before any pixel is decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path, formats=ALLOWED_FORMATS)
            if img.width * img.height > max_pixels:
                raise ImageRejected(f"too_large: {img.width}x{img.height} > {max_pixels} pixels")
            img.load()
    except ImageRejected:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ImageRejected(f"too_large: {err}") from err
    except UnidentifiedImageError:
        raise ImageRejected("unsupported: not an image in an allowed format (" + ", ".join(ALLOWED_FORMATS) + ")")
    except Exception as err:  # decoders fail in many ways on broken files (OSError, struct.error, ...)
        raise ImageRejected(f"corrupt: {err or type(err).__name__}") from err
    fmt = img.format
    img = ImageOps.exif_transpose(img)
    img.format = fmt
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: 16-bit scaled (not clipped to white), alpha flattened on neutral grey."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, NEUTRAL_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    return to_rgb(open_image(path))
