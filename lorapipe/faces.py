"""Where to crop: faces (OpenCV's Haar cascades, shipped inside opencv-python-headless<5, so offline),
a spectral-residual saliency map when there is no face, the centre when nothing stands out.

Boxes are (left, top, right, bottom) in pixels of the upright image.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np
from PIL import Image

DETECT_SIDE = 1024  # faces are found on a copy this size: Haar cost grows with pixels, not with faces
SALIENCY_SIDE = 64
# Saliency moves the crop only when the window it picks holds clearly more than the centred one.
SALIENCY_GAIN = 1.05

_local = threading.local()  # a CascadeClassifier is not safe to share between threads


def _cascades() -> tuple[cv2.CascadeClassifier, cv2.CascadeClassifier]:
    if not hasattr(_local, "cascades"):
        folder = cv2.data.haarcascades
        frontal = cv2.CascadeClassifier(folder + "haarcascade_frontalface_default.xml")
        profile = cv2.CascadeClassifier(folder + "haarcascade_profileface.xml")
        if frontal.empty() or profile.empty():
            raise RuntimeError(f"OpenCV's Haar cascades are missing from {folder} (opencv-python-headless>=5 "
                               "ships none: install opencv-python-headless<5)")
        _local.cascades = frontal, profile
    return _local.cascades


def detect_faces(img: Image.Image) -> list[tuple[int, int, int, int]]:
    """Faces in an RGB image, largest first: frontal, else profile (either way round)."""
    scale = min(1.0, DETECT_SIDE / max(img.size))
    small = img if scale == 1.0 else img.resize((round(img.width * scale), round(img.height * scale)),
                                                Image.BILINEAR, reducing_gap=2.0)
    grey = cv2.equalizeHist(np.asarray(small.convert("L")))
    min_side = max(24, round(min(grey.shape) * 0.05))  # smaller "faces" are mostly texture
    frontal, profile = _cascades()
    options = {"scaleFactor": 1.1, "minNeighbors": 5, "minSize": (min_side, min_side)}
    found = [tuple(f) for f in frontal.detectMultiScale(grey, **options)]
    if not found:
        found = [tuple(f) for f in profile.detectMultiScale(grey, **options)]
        width = grey.shape[1]
        found += [(width - x - w, y, w, h) for x, y, w, h in profile.detectMultiScale(grey[:, ::-1].copy(), **options)]
    boxes = [(round(x / scale), round(y / scale), round((x + w) / scale), round((y + h) / scale))
             for x, y, w, h in found]
    return sorted(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)


def crop_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """The largest box of the bucket's aspect ratio inside the image."""
    bw, bh = bucket
    if width * bh > height * bw:  # image wider than the bucket: the crop spans the full height
        return min(width, round(height * bw / bh)), height
    return width, min(height, round(width * bh / bw))


def _place(start: float, size: int, limit: int, need: tuple[float, float] | None = None) -> int:
    """A 1-D position: `start` moved just enough to hold `need` (if it fits), then kept inside [0, limit]."""
    if need is not None and need[1] - need[0] <= size:
        start = min(max(start, need[1] - size), need[0])
    return int(round(min(max(start, 0), limit - size)))


def face_crop(width: int, height: int, bucket: tuple[int, int], face, headroom: float) -> tuple[int, int, int, int]:
    """The bucket-shaped crop holding the face, with `headroom` face heights above it.

    The face's centre sits at the crop's centre across and at 40% of its height down (where a
    photographer puts the eyes), then the crop moves just enough to hold the face, its headroom and
    a margin, and stays inside the image.
    """
    cw, ch = crop_size(width, height, bucket)
    left, top, right, bottom = face
    fw, fh = right - left, bottom - top
    need_x = (max(0, left - 0.15 * fw), min(width, right + 0.15 * fw))
    need_y = (max(0, top - headroom * fh), min(height, bottom + 0.25 * fh))
    if need_y[1] - need_y[0] > ch:  # no room for all the headroom: keep the face itself
        need_y = (top, bottom)
    x = _place((left + right) / 2 - cw / 2, cw, width, need_x)
    y = _place((top + bottom) / 2 - 0.4 * ch, ch, height, need_y)
    return x, y, x + cw, y + ch


def center_crop(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int, int, int]:
    cw, ch = crop_size(width, height, bucket)
    left, top = (width - cw) // 2, (height - ch) // 2
    return left, top, left + cw, top + ch


def saliency_map(img: Image.Image) -> np.ndarray:
    """Spectral-residual saliency (Hou & Zhang, 2007) on a small grey copy; sums to 1."""
    scale = SALIENCY_SIDE / max(img.size)
    small = img.convert("L").resize((max(4, round(img.width * scale)), max(4, round(img.height * scale))),
                                    Image.BILINEAR, reducing_gap=2.0)
    spectrum = np.fft.fft2(np.asarray(small, dtype=np.float64))
    log_amplitude = np.log(np.abs(spectrum) + 1e-9)
    residual = log_amplitude - cv2.blur(log_amplitude, (3, 3), borderType=cv2.BORDER_REPLICATE)
    saliency = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)))) ** 2
    saliency = cv2.GaussianBlur(saliency, (0, 0), 2.5)
    total = saliency.sum()
    return saliency / total if total > 0 else np.full_like(saliency, 1 / saliency.size)


def saliency_crop(img: Image.Image, bucket: tuple[int, int]) -> tuple[tuple[int, int, int, int], bool]:
    """The bucket-shaped window holding the most saliency; (box, moved) where `moved` is False when
    the centred window was as good (then the box is the centred one)."""
    width, height = img.size
    cw, ch = crop_size(width, height, bucket)
    centred = center_crop(width, height, bucket)
    if (cw, ch) == (width, height):
        return centred, False
    sal = saliency_map(img)
    horizontal = cw < width
    profile = sal.sum(axis=0 if horizontal else 1)
    cells, full = len(profile), width if horizontal else height
    window = max(1, round((cw if horizontal else ch) / full * cells))
    sums = np.convolve(profile, np.ones(window), mode="valid")
    best = int(np.argmax(sums))
    centre_cell = (len(sums) - 1) // 2
    if sums[best] < SALIENCY_GAIN * sums[centre_cell]:
        return centred, False
    start = _place(best / cells * full, cw if horizontal else ch, full)
    if horizontal:
        return (start, 0, start + cw, ch), True
    return (0, start, cw, start + ch), True
