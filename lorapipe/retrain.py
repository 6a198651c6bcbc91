"""Is there anything new to train on? The nightly retrain asks this right after collecting.

A workspace remembers what its last LoRA was trained from (`last-trained.json`): the ids of the kept
photos collected, the review decisions (with captions edited in images/*.txt), and the settings. The
same three again means the same LoRA would come out, so the nightly run stops after collecting, without
touching the GPU.
"""

from __future__ import annotations

from pathlib import Path

from lorapipe.config import PipelineConfig
from lorapipe.fsutil import atomic_write_json, read_json, stable_hash
from lorapipe.manifest import read_manifest
from lorapipe.review_decisions import review_inputs_digest
from lorapipe.workspace import Workspace

LAST_TRAINED = "last-trained.json"


def training_fingerprint(ws: Workspace, collect_manifest: str | Path, config: PipelineConfig) -> str:
    photos = sorted(r.id for r in read_manifest(collect_manifest) if r.kept)
    # Where captioning runs changes nothing in the result.
    settings = config.model_dump(mode="json", by_alias=True, exclude={"scale_out"})
    # The review decisions and the caption files people edited by hand (images/*.txt).
    return stable_hash(photos, review_inputs_digest(ws.root), settings)


def last_trained(ws: Workspace) -> dict | None:
    """What the last LoRA of this workspace was trained from, if its file is still there."""
    path = ws.root / LAST_TRAINED
    if not path.exists():
        return None
    last = read_json(path)
    return last if Path(last.get("lora", "")).exists() else None


def record_trained(ws: Workspace, fingerprint: str, result: dict) -> None:
    atomic_write_json(ws.root / LAST_TRAINED, {"fingerprint": fingerprint, **result})
