"""Per-item store: the expensive per-image results, keyed by what they depend on.

A key is a hash of (image id, the parameters that affect the result, model id + revision, code
version): adding 10 photos to 200 computes 10 results, not 210. Values are small JSON documents;
larger results (crops, latents) are files named by the same key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorapipe.fsutil import atomic_write_json, stable_hash


class ItemCache:
    def __init__(self, root: str | Path, namespace: str):
        self.dir = Path(root) / namespace
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(*parts: Any) -> str:
        return stable_hash(*parts)

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            self.misses += 1
            return None
        except ValueError:  # a damaged entry is recomputed, not trusted
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, key: str, value: dict) -> None:
        atomic_write_json(self._path(key), value)

    def file(self, key: str, suffix: str) -> Path:
        """Where a binary result for `key` lives (the caller writes it atomically)."""
        return self.dir / key[:2] / f"{key}{suffix}"

    def stats(self) -> dict[str, int]:
        return {"computed": self.misses, "reused": self.hits}
