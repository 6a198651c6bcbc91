"""Face-aware cropping on a real photo (scikit-image's astronaut), and the fallbacks without a face."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from helpers import photo, save
from lorapipe.buckets import bucket_name, sdxl_buckets
from lorapipe.config import CollectConfig, CropConfig, ValidateConfig
from tasks.collect import collect_folder
from tasks.crop import crop_records, plan_and_crop
from tasks.validate import validate_records

# Eileen Collins' face (brows to chin) in the 512x512 astronaut image, read off the picture.
FACE = (180, 75, 268, 160)
OFFSET = (900, 820)  # where the photo sits in the larger canvas below: far from the centre


@pytest.fixture(scope="module")
def astronaut_canvas(tmp_path_factory):
    """The astronaut pasted into the bottom-right of a 1440x1400 backdrop: a centre crop would cut her off."""
    from skimage import data

    y, x = np.mgrid[0:1400, 0:1440]
    backdrop = np.stack([90 + x / 30, 110 + y / 40, 130 + 0 * x], -1).astype(np.uint8)  # smooth, faceless
    canvas = Image.fromarray(backdrop)
    canvas.paste(Image.fromarray(data.astronaut()), OFFSET)
    path = tmp_path_factory.mktemp("astronaut") / "astronaut.png"
    canvas.save(path)
    face = (FACE[0] + OFFSET[0], FACE[1] + OFFSET[1], FACE[2] + OFFSET[0], FACE[3] + OFFSET[1])
    return path, canvas.size, face


def inside(inner, outer) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def test_every_bucket_keeps_the_face_inside_with_headroom(astronaut_canvas, tmp_path):
    path, (width, height), face = astronaut_canvas
    source = Image.open(path).convert("RGB")
    config = CropConfig()
    for bucket in sdxl_buckets(config.resolution, config.bucket_step):
        out = tmp_path / f"{bucket_name(bucket)}.png"
        plan = plan_and_crop(path, out, width, height, bucket, config)
        box = plan["box"]
        assert plan["method"] == "face", bucket
        assert inside(face, box), (bucket, box)
        assert box[1] <= face[1] - 0.3 * (face[3] - face[1]) or box[1] == 0, (bucket, box)  # room above the brows
        assert abs((box[2] - box[0]) / (box[3] - box[1]) - bucket[0] / bucket[1]) < 0.01
        assert inside(box, (0, 0, width, height))
        cropped = Image.open(out)
        assert cropped.size == bucket and cropped.mode == "RGB"
        # The training image shows her face where the box says: compare pixels, not boxes.
        scale = bucket[0] / (box[2] - box[0])
        where = [round((v - o) * scale) for v, o in zip(face, (box[0], box[1], box[0], box[1]))]
        shown = np.asarray(cropped.crop(where), dtype=np.float64)
        expected = np.asarray(source.crop(face).resize(cropped.crop(where).size, Image.LANCZOS), dtype=np.float64)
        assert np.abs(shown - expected).mean() < 15, bucket  # a misplaced crop differs by 40+


def test_crop_stage_records_the_face_and_flags_upscaling(tmp_path, workspace, astronaut_canvas):
    from skimage import data

    src = tmp_path / "photos"
    src.mkdir()
    path, _, face = astronaut_canvas
    (src / "canvas.png").write_bytes(path.read_bytes())
    save(Image.fromarray(data.astronaut()).resize((800, 800)), src / "small_astronaut.png")
    save(photo(1400, 1000, seed=3), src / "no_face.jpg")
    records, _ = validate_records(collect_folder(src, workspace, CollectConfig())[0], workspace, ValidateConfig())

    records, stats = crop_records(records, workspace, CropConfig())
    by_name = {r.source.split("/")[-1]: r for r in records}

    canvas = by_name["canvas.png"]
    assert canvas.crop_method == "face" and canvas.bucket == "1024x1024"
    assert all(abs(a - b) < 25 for a, b in zip(canvas.face, face))  # the detector found her face
    assert inside(face, canvas.crop) and canvas.crop_scale < 1 and canvas.flags == []
    small = by_name["small_astronaut.png"]
    assert small.crop_scale > 1 and small.flags == ["upscaled: 1.28x to fill 1024x1024"]
    assert by_name["no_face.jpg"].crop_method in ("saliency", "center") and by_name["no_face.jpg"].face is None
    assert stats["crop_face"] == 2 and stats["upscaled"] == 1
    # Cached per (image id, settings): changed settings recompute, unchanged ones don't.
    assert crop_records(records, workspace, CropConfig())[1]["computed"] == 0
    again, stats = crop_records(records, workspace, CropConfig(face_aware=False, fallback="center"))
    assert stats["computed"] == 3 and {r.crop_method for r in again} == {"center"}


def test_without_a_face_the_crop_follows_what_stands_out(tmp_path):
    """A single bright object on the far left of a plain wide image: saliency moves the crop to it."""
    img = np.full((800, 1600, 3), 120, np.uint8)
    img[300:500, 60:260] = (250, 200, 40)
    path = save(Image.fromarray(img), tmp_path / "object_left.png")
    plan = plan_and_crop(path, tmp_path / "out.png", 1600, 800, (1024, 1024), CropConfig())
    assert plan["method"] == "saliency" and plan["box"][0] < 60 and plan["box"][2] > 260
    plain = save(Image.fromarray(np.full((800, 1600, 3), 120, np.uint8)), tmp_path / "plain.png")
    plan = plan_and_crop(plain, tmp_path / "plain_out.png", 1600, 800, (1024, 1024), CropConfig())
    assert plan["method"] == "center" and plan["box"] == [400, 0, 1200, 800]
