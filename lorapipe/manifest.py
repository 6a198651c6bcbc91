"""The manifest: one record per source image, carried through every stage as JSONL.

Each stage reads a manifest and writes a new one; records are never edited in place on disk.
Paths inside records are relative to the workspace, so a workspace can be moved or copied.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lorapipe.fsutil import atomic_path
from lorapipe.textio import printable

Status = Literal["kept", "rejected"]
Review = Literal["approved", "rejected", "pending"]


class CaptionEdit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    who: str
    when: str
    before: str | None
    after: str | None


class ImageRecord(BaseModel):
    """Everything lorapipe knows about one source image."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="sha256 of the original bytes: the image's identity everywhere")
    source: str = Field(description="Where the bytes came from (path or URL)")
    fetched_at: str = Field(description="UTC time the bytes were collected (ISO 8601)")
    raw_path: str | None = Field(None, description="Collected bytes, relative to the workspace (raw/<id>.<ext>)")
    size_bytes: int | None = None

    status: Status = "kept"
    reason: str | None = Field(None, description="Why the image was rejected, e.g. 'corrupt: ...', 'too_small: ...'")
    duplicate_of: str | None = Field(None, description="Id of the kept image this one duplicates")

    width: int | None = Field(None, description="Width after EXIF orientation")
    height: int | None = Field(None, description="Height after EXIF orientation")
    format: str | None = None
    mode: str | None = Field(None, description="Pillow mode of the original (RGB, L, RGBA, I;16 ...)")
    phash: str | None = Field(None, description="64-bit perceptual hash as hex")
    blur_score: float | None = Field(None, description="Variance of the Laplacian at 1024 px: lower is blurrier")
    flags: list[str] = Field(default_factory=list, description="Kept, but worth a look: 'blurry', 'upscaled' ...")

    crop: list[int] | None = Field(None, description="Crop box in oriented original pixels: left, top, right, bottom")
    bucket: str | None = Field(None, description="Training resolution WIDTHxHEIGHT, e.g. 896x1152")
    original_size: list[int] | None = Field(None, description="SDXL size conditioning: [height, width] of the original")
    crop_top_left: list[int] | None = Field(None, description="SDXL crop conditioning: [top, left] in bucket pixels")
    image_path: str | None = Field(None, description="Cropped training image, relative to the workspace")
    crop_method: Literal["face", "saliency", "center"] | None = Field(None, description="How the crop was placed")
    face: list[int] | None = Field(None, description="Largest face found: left, top, right, bottom (oriented pixels)")
    crop_scale: float | None = Field(None, description="Bucket size / crop size: above 1 the crop was upscaled")

    caption: str | None = None
    caption_by: dict | None = Field(None, description="Backend, model id and revision, prompt hash")
    caption_error: str | None = Field(
        None, description="Why the captioner gave no usable caption (its refusal, a content filter, the server's "
        "message): the image waits for a person and is captioned again on the next run")
    caption_edits: list[CaptionEdit] = Field(default_factory=list)
    review: Review | None = None
    review_reasons: list[str] = Field(default_factory=list, description="Rules that flagged the caption")
    reviewed_by: str | None = Field(None, description="The person who approved, edited or dropped it")

    @field_validator("source", "reason")
    @classmethod
    def writable(cls, value: str | None) -> str | None:
        """A file name that is not UTF-8 is kept, its bad bytes escaped (`caf\\xe9.jpg`): the record can be
        written, and the photo is not lost."""
        return None if value is None else printable(value)

    def reject(self, reason: str, duplicate_of: str | None = None) -> "ImageRecord":
        return self.model_copy(update={"status": "rejected", "reason": reason, "duplicate_of": duplicate_of})

    @property
    def kept(self) -> bool:
        return self.status == "kept"

    @property
    def file_name(self) -> str:
        """The source's own file name (a file inside an archive: the member's), what people know it by."""
        return Path(self.source.split("!/")[-1]).name

    @property
    def bucket_size(self) -> tuple[int, int]:
        width, height = (int(v) for v in self.bucket.split("x"))
        return width, height


def read_manifest(path: str | os.PathLike) -> list[ImageRecord]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(ImageRecord.model_validate_json(line))
            except ValueError as err:
                raise ValueError(f"{path}:{line_no}: not a valid manifest record: {err}") from err
    return records


def write_manifest(path: str | os.PathLike, records: Iterable[ImageRecord]) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(record.model_dump_json(exclude_defaults=False) + "\n")
    return Path(path)


def rejection_counts(records: Iterable[ImageRecord]) -> Counter:
    """Rejections grouped by kind: the part of the reason before the colon ('corrupt', 'too_small' ...)."""
    return Counter(r.reason.split(":")[0] for r in records if not r.kept and r.reason)
