"""The offline demo's photos: drawn portraits of one made-up person, plus the trouble real folders have.

Generated from a seed (nothing to download): distinct portraits in several aspect ratios, two near
duplicates (a resized, recompressed copy and a brightened copy), one broken download (truncated JPEG)
and one image too small to train on.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from lorapipe.fsutil import atomic_write_bytes

CLOTHES_RGB = {
    "red coat": (180, 30, 40),
    "blue shirt": (40, 70, 170),
    "green sweater": (40, 130, 60),
    "yellow dress": (220, 190, 40),
    "black jacket": (25, 25, 30),
    "white t-shirt": (235, 235, 230),
}
SETTING_RGB = {
    "outdoors": ((120, 170, 230), (90, 150, 80)),
    "in a studio": ((200, 200, 205), (170, 170, 175)),
    "in a park": ((150, 200, 240), (60, 130, 50)),
    "at the beach": ((130, 190, 240), (230, 210, 160)),
    "in a kitchen": ((230, 220, 200), (150, 110, 80)),
    "on a city street": ((170, 170, 180), (90, 90, 95)),
}
SIZES = [(960, 1280), (1280, 960), (1024, 1024), (896, 1344), (1344, 896), (1152, 1152)]


@dataclass(frozen=True)
class Scene:
    clothes: str
    setting: str
    smiling: bool
    size: tuple[int, int]
    seed: int

    def describe(self) -> str:
        pose = "smiling" if self.smiling else "looking at the camera"
        return f"a woman {pose}, wearing a {self.clothes}, {self.setting}"


def scenes(count: int = 10, seed: int = 0) -> list[Scene]:
    rng = random.Random(seed)
    clothes, settings = list(CLOTHES_RGB), list(SETTING_RGB)
    return [
        Scene(
            clothes=clothes[i % len(clothes)],
            setting=settings[(i * 5 + 1 + i // len(clothes)) % len(settings)],  # no two scenes alike
            smiling=i % 3 != 0,
            size=SIZES[i % len(SIZES)],
            seed=rng.randrange(1 << 30),
        )
        for i in range(count)
    ]


def draw(scene: Scene) -> Image.Image:
    """A portrait: sky/wall and ground, a torso in the clothes' color, a head with eyes and a mouth."""
    rng = np.random.default_rng(scene.seed)
    w, h = scene.size
    top, bottom = SETTING_RGB[scene.setting]
    horizon = int(h * rng.uniform(0.45, 0.7))
    img = Image.new("RGB", (w, h), top)
    d = ImageDraw.Draw(img)
    d.rectangle([0, horizon, w, h], fill=bottom)
    for _ in range(int(rng.integers(4, 9))):  # background objects, so photos differ beyond the person
        x, y, s = rng.integers(0, w), rng.integers(0, h), rng.integers(w // 16, w // 5)
        color = tuple(int(c) for c in rng.integers(40, 220, 3))
        d.ellipse([x - s, y - s, x + s, y + s], fill=color)
    cx = int(w * rng.uniform(0.35, 0.65))
    head = int(min(w, h) * rng.uniform(0.09, 0.14))
    cy = int(h * rng.uniform(0.3, 0.45))
    d.rounded_rectangle(
        [cx - 2.4 * head, cy + 1.1 * head, cx + 2.4 * head, h + head], radius=head, fill=CLOTHES_RGB[scene.clothes]
    )
    d.rectangle([cx - 0.4 * head, cy + 0.8 * head, cx + 0.4 * head, cy + 1.3 * head], fill=(205, 160, 130))
    d.ellipse([cx - head, cy - 1.25 * head, cx + head, cy + 1.1 * head], fill=(225, 180, 150))
    d.chord([cx - 1.05 * head, cy - 1.35 * head, cx + 1.05 * head, cy + 0.2 * head], 180, 360, fill=(70, 45, 30))
    for ex in (cx - 0.4 * head, cx + 0.4 * head):
        d.ellipse([ex - 0.12 * head, cy - 0.15 * head, ex + 0.12 * head, cy + 0.05 * head], fill=(40, 30, 30))
    mouth = [cx - 0.35 * head, cy + 0.3 * head, cx + 0.35 * head, cy + 0.7 * head]
    if scene.smiling:
        d.arc(mouth, 20, 160, fill=(150, 50, 60), width=max(2, head // 12))
    else:
        d.line([mouth[0], cy + 0.5 * head, mouth[2], cy + 0.5 * head], fill=(150, 50, 60), width=max(2, head // 14))
    # Sensor noise and a touch of blur, like a photo rather than a drawing.
    noise = rng.normal(0, 6, (h, w, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).filter(ImageFilter.GaussianBlur(0.6))


def write_if_changed(path: Path, data: bytes) -> None:
    """Write only when the bytes differ: an unchanged demo folder stays unchanged (and cached)."""
    if not (path.exists() and path.read_bytes() == data):
        atomic_write_bytes(path, data)


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_demo_photos(folder: str | Path, count: int = 10, seed: int = 0) -> dict[str, str]:
    """Write the demo folder; returns {file name: what it is} so tests and the demo can say what to expect."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}
    portraits = []
    for i, scene in enumerate(scenes(count, seed)):
        img = draw(scene)
        portraits.append(img)
        name = f"portrait_{i:02d}.png" if i % 4 == 3 else f"portrait_{i:02d}.jpg"
        write_if_changed(folder / name, png_bytes(img) if name.endswith(".png") else jpeg_bytes(img))
        expected[name] = "kept"

    small = portraits[0].resize((portraits[0].width * 17 // 20, portraits[0].height * 17 // 20), Image.LANCZOS)
    write_if_changed(folder / "portrait_00_resized.jpg", jpeg_bytes(small, quality=70))
    expected["portrait_00_resized.jpg"] = "duplicate_of:portrait_00.jpg"

    brighter = ImageEnhance.Brightness(portraits[1]).enhance(1.08)
    write_if_changed(folder / "portrait_01_edit.jpg", jpeg_bytes(brighter, quality=85))
    expected["portrait_01_edit.jpg"] = "duplicate_of:portrait_01.jpg"

    broken = jpeg_bytes(portraits[2])
    write_if_changed(folder / "broken_download.jpg", broken[: len(broken) // 2])
    expected["broken_download.jpg"] = "corrupt"

    thumb = draw(Scene("blue shirt", "outdoors", True, (400, 300), seed + 99))
    write_if_changed(folder / "thumbnail.jpg", jpeg_bytes(thumb))
    expected["thumbnail.jpg"] = "too_small"
    return expected


def extra_photo(folder: str | Path, index: int = 50, seed: int = 7) -> Path:
    """One more distinct portrait, for "add a photo and rerun"."""
    path = Path(folder) / f"new_portrait_{index}.jpg"
    write_if_changed(path, jpeg_bytes(draw(extra_scene(index, seed))))
    return path


def extra_scene(index: int = 50, seed: int = 7) -> Scene:
    return Scene("white t-shirt", "in a kitchen", True, (1024, 1280), seed * 1000 + index)  # unlike the ten
