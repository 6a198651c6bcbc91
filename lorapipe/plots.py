"""Pictures for people: the loss curve and labelled sample grids drawn with Pillow (no plotting
library), images as data URLs.

The Prefect UI renders a markdown artifact's `![](data:image/...)` (checked in headless Chromium), so
an image travels inside the artifact itself: nothing to host, nothing for the server to fetch.
"""

from __future__ import annotations

import base64
import io
import math

from PIL import Image, ImageDraw, ImageFont

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def human_size(n: int) -> str:
    """Bytes for people: 42.6 MB (powers of 1000, as file managers show them)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * i / count for i in range(count + 1)]


def line_chart(lines: dict[str, list[tuple[float, float]]], dots: dict[str, list[tuple[float, float]]], title: str,
               x_label: str, y_label: str, size: tuple[int, int] = (720, 400)) -> Image.Image:
    """Series of (x, y) points, drawn as lines (a single point as a dot) or as dots, with a legend."""
    width, height = size
    left, right, top, bottom = 70, 20, 40, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(16), _font(12)
    draw.text((left, 10), title, fill="black", font=font)
    series = {**lines, **dots}
    points = [p for values in series.values() for p in values if math.isfinite(p[1])]
    if not points:
        draw.text((left, height // 2), "no finite values", fill="gray", font=font)
        return image
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    pad = (max(ys) - min(ys)) * 0.05 or abs(max(ys)) * 0.05 or 1.0
    y0, y1 = min(ys) - pad, max(ys) + pad

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="#888888")
    for y in _ticks(y0, y1):
        _, py = to_px(x0, y)
        draw.line([left - 4, py, left, py], fill="#888888")
        draw.text((4, py - 7), f"{y:.3g}", fill="black", font=small)
    for x in _ticks(x0, x1):
        px, _ = to_px(x, y0)
        draw.line([px, height - bottom, px, height - bottom + 4], fill="#888888")
        draw.text((px - 8, height - bottom + 6), f"{x:.0f}", fill="black", font=small)
    draw.text((width // 2 - 20, height - 20), x_label, fill="black", font=small)
    draw.text((4, 12), y_label, fill="black", font=small)

    for n, (name, values) in enumerate(series.items()):
        color = COLORS[n % len(COLORS)]
        pixels = [to_px(x, y) for x, y in values if math.isfinite(y)]
        if name in lines and len(pixels) > 1:
            draw.line(pixels, fill=color, width=2)
        else:
            for px, py in pixels:
                draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color)
        draw.rectangle([width - right - 150, top + 8 + 18 * n, width - right - 138, top + 20 + 18 * n], fill=color)
        draw.text((width - right - 132, top + 6 + 18 * n), name, fill="black", font=small)
    return image


def loss_chart(losses: list[float], held_out: list[float] | None = None, epochs: int | None = None) -> Image.Image:
    """Training loss per optimizer step; held-out loss (if measured) as dots at the epoch ends."""
    dots = {}
    if held_out and losses:
        per_epoch = len(losses) / (epochs or len(held_out))
        dots["held-out loss"] = [(round(per_epoch * (e + 1)), v) for e, v in enumerate(held_out)]
    return line_chart({"training loss": [(i + 1, v) for i, v in enumerate(losses)]}, dots, "Loss", "optimizer step",
                      "loss")


def _fit(draw, text: str, font, width: int) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _wrap(draw, text: str, font, width: int, lines: int) -> list[str]:
    """Words of `text` in at most `lines` lines of `width` pixels (the last one cut with an ellipsis)."""
    out, words = [], text.split()
    while words and len(out) < lines:
        line = words.pop(0)
        while words and draw.textlength(f"{line} {words[0]}", font=font) <= width:
            line += " " + words.pop(0)
        out.append(line)
    if words:
        out[-1] = _fit(draw, out[-1] + " " + " ".join(words), font, width)
    return [_fit(draw, line, font, width) for line in out]


def labelled_grid(rows: list[list[Image.Image]], row_labels: list[str], column_labels: list[str],
                  title: str = "") -> Image.Image:
    """Images in rows and columns, with a title band, a label above each column (the prompt, the seed)
    and one left of each row (base model / with the LoRA, rank, epoch): the picture says what it shows
    even when read outside the UI. Cells take the first image's size; row labels wrap to fit."""
    w, h = rows[0][0].size
    columns = max(len(r) for r in rows)
    font, small = _font(max(12, min(18, w // 14))), _font(max(10, min(14, w // 18)))
    label_w, title_h, head_h = max(110, min(220, w // 2)), (30 if title else 0), 3 * small.size + 10
    sheet = Image.new("RGB", (label_w + w * columns, title_h + head_h + h * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((8, 6), _fit(draw, title, font, sheet.width - 16), fill="black", font=font)
    for x, label in enumerate(column_labels[:columns]):
        for n, line in enumerate(_wrap(draw, label, small, w - 8, 3)):
            draw.text((label_w + x * w + 4, title_h + 4 + n * small.size), line, fill="black", font=small)
    for y, row in enumerate(rows):
        top = title_h + head_h + y * h
        label = row_labels[y] if y < len(row_labels) else ""
        for n, line in enumerate(_wrap(draw, label, small, label_w - 10, max(1, h // (small.size + 2)))):
            draw.text((6, top + 6 + n * (small.size + 2)), line, fill="black", font=small)
        draw.line([0, top, label_w, top], fill="#bbbbbb")  # a rule between row labels, none over the samples
        for x, img in enumerate(row):
            sheet.paste(img.convert("RGB").resize((w, h)) if img.size != (w, h) else img.convert("RGB"),
                        (label_w + x * w, top))
    return sheet


def data_url(image: Image.Image, max_side: int = 1024, photo: bool = False) -> str:
    """A `data:` URL of the image, scaled down to `max_side`: JPEG for photos (small), PNG for charts (crisp)."""
    image = image.convert("RGB")
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if photo else "PNG", **({"quality": 85} if photo else {"optimize": True}))
    mime = "image/jpeg" if photo else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"
