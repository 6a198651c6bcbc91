"""Workspace layout, one per dataset name (DESIGN.md §2)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "dataset"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, root: str | Path) -> "Workspace":
        ws = cls(Path(root).expanduser().resolve())
        for folder in (ws.raw, ws.images, ws.cache, ws.manifests, ws.runs, ws.loras):
            folder.mkdir(parents=True, exist_ok=True)
        return ws

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def loras(self) -> Path:
        return self.root / "loras"

    def path(self, relative: str) -> Path:
        return self.root / relative

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root))

    def stage_manifest(self, stage: str, key: str) -> Path:
        """Content-addressed manifest for one stage run; `<stage>.jsonl` beside it is the latest copy."""
        return self.manifests / f"{stage}.{key[:16]}.jsonl"

    def latest_manifest(self, stage: str) -> Path:
        return self.manifests / f"{stage}.jsonl"
