"""Every grid says what it shows: a title, a label above each column and left of each row."""

from __future__ import annotations

import numpy as np
from PIL import Image

from trainer.sampling import grid


def ink(image: Image.Image, box: tuple[int, int, int, int]) -> int:
    """Dark pixels (text) inside `box`."""
    return int((np.asarray(image.crop(box).convert("L")) < 128).sum())


def test_a_grid_carries_its_title_and_row_and_column_labels():
    cells = [[Image.new("RGB", (256, 256), c) for c in ("#d0e0ff", "#ffe0d0")] for _ in range(2)]
    sheet = grid(cells, ["base model", "with rank 8"], ["a photo of Jane Doe · seed 1234", "a photo of a person in "
                 "a park · seed 1234"], "jane-doe.safetensors · rank 8 · epoch 12")
    label_w = sheet.width - 2 * 256
    top = sheet.height - 2 * 256
    assert label_w > 0 and top > 0  # bands for the labels, the cells unscaled
    assert ink(sheet, (0, 0, sheet.width, 30)) > 50  # the title
    for x in range(2):
        assert ink(sheet, (label_w + x * 256, 30, label_w + (x + 1) * 256, top)) > 50  # each column's prompt
    for y in range(2):
        assert ink(sheet, (0, top + y * 256, label_w, top + (y + 1) * 256)) > 30  # each row's label
    assert ink(sheet, (label_w, top, sheet.width, sheet.height)) == 0  # nothing drawn over the samples
    # Without labels, a plain sheet as before.
    assert grid(cells).size == (512, 512)
