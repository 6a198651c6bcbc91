"""Is there anything new to train on? The nightly retrain asks this right after collecting.

A workspace remembers what its last LoRA was trained from (`last-trained.json`): the kept photos collected
(ids and file names), the review decisions (with captions edited in images/*.txt), and the settings. The
same three again means the same LoRA would come out, so the nightly run stops after collecting, without
touching the GPU; otherwise `what_changed` names the difference: photos added or removed, decisions,
caption files edited by hand, settings (dotted path: old → new).
"""

from __future__ import annotations

import json
from pathlib import Path

from lorapipe.config import PipelineConfig, flat_settings
from lorapipe.fsutil import atomic_write_json, read_json, stable_hash
from lorapipe.manifest import ImageRecord, read_manifest
from lorapipe.review_decisions import DecisionStore, SidecarLedger, review_inputs_digest
from lorapipe.workspace import Workspace

LAST_TRAINED = "last-trained.json"
MAX_NAMES = 10  # file names listed per change; more are counted


def training_inputs(ws: Workspace, collect_manifest: str | Path, config: PipelineConfig) -> dict:
    """What a LoRA is trained from, as plain JSON:

    `photos` {image id: file name}; `decisions` {image id: [[action, caption written], ...]} (each image's
    review log, oldest first); `edited_files` {images/<file>.txt: sha256} (caption files a person changed
    and the review stage has not yet taken in); `settings` (the run's settings but `scale_out`).
    """
    photos = {r.id: r.file_name for r in read_manifest(collect_manifest) if r.kept}
    logs = DecisionStore(ws.cache).dir / "images"
    decisions = {p.stem: [[d.get("action"), d.get("after")] for d in json.loads(p.read_text(encoding="utf-8"))]
                 for p in (sorted(logs.glob("*.json")) if logs.exists() else [])}
    edited = dict(SidecarLedger(ws.root).person_changes())
    # Where captioning runs changes nothing in the result.
    settings = config.model_dump(mode="json", by_alias=True, exclude={"scale_out"})
    return {"photos": dict(sorted(photos.items())), "decisions": decisions, "edited_files": edited,
            "settings": settings}


def training_fingerprint(ws: Workspace, collect_manifest: str | Path, config: PipelineConfig,
                         inputs: dict | None = None) -> str:
    """The hash `last-trained.json` keeps; `inputs`: `training_inputs` already read for the same arguments."""
    inputs = inputs or training_inputs(ws, collect_manifest, config)
    # The review decisions and the caption files people edited by hand (images/*.txt).
    return stable_hash(sorted(inputs["photos"]), review_inputs_digest(ws.root), inputs["settings"])


def last_trained(ws: Workspace) -> dict | None:
    """What the last LoRA of this workspace was trained from, if its file is still there."""
    path = ws.root / LAST_TRAINED
    if not path.exists():
        return None
    last = read_json(path)
    return last if Path(last.get("lora", "")).exists() else None


def record_trained(ws: Workspace, fingerprint: str, result: dict, inputs: dict | None = None) -> None:
    """Remember what the workspace's latest LoRA came from (`inputs`: `training_inputs`, for what_changed)."""
    atomic_write_json(ws.root / LAST_TRAINED, {"fingerprint": fingerprint, **({"inputs": inputs} if inputs else {}),
                                               **result})


def what_changed(last: dict, now: dict, records: list[ImageRecord] = ()) -> list[str]:
    """Each difference between two `training_inputs`, one phrase each, e.g.
    `photos added: 1 (extra.jpg)`, `review decisions: 1 new (portrait_03.jpg: drop)`,
    `settings: train.epochs 4 → 1`. `records` (the latest review manifest) name the decisions' images.
    """
    if "inputs" not in last:  # written before lorapipe recorded them
        return ["photos, review decisions or settings (the last LoRA's record does not say which)"]
    old = last["inputs"]
    changes = []
    added = [name for key, name in now["photos"].items() if key not in old["photos"]]
    removed = [name for key, name in old["photos"].items() if key not in now["photos"]]
    for what, names in (("photos added", added), ("photos removed", removed)):
        if names:
            changes.append(f"{what}: {len(names)} ({_names(names)})")
    images = {r.id: r.file_name for r in records}
    new = {key: log for key, log in now["decisions"].items() if old["decisions"].get(key) != log}
    gone = [key for key in old["decisions"] if key not in now["decisions"]]
    if new or gone:
        named = [f"{images.get(key) or now['photos'].get(key, 'an image')}: {log[-1][0]}"
                 for key, log in new.items() if log]
        changes.append(f"review decisions: {len(new)} new or changed, {len(gone)} withdrawn"
                       + (f" ({_names(named)})" if named else ""))
    edited = [Path(rel).name for rel, digest in now.get("edited_files", {}).items()
              if old.get("edited_files", {}).get(rel) != digest]
    if edited:
        changes.append(f"caption files edited by hand: {len(edited)} ({_names(edited)})")
    old_settings, new_settings = flat_settings(old["settings"]), flat_settings(now["settings"])
    settings = [f"{path} {_show(old_settings.get(path))} → {_show(new_settings.get(path))}"
                for path in sorted(old_settings.keys() | new_settings.keys())
                if old_settings.get(path) != new_settings.get(path)]
    if settings:
        changes.append("settings: " + "; ".join(settings))
    return changes or ["review decisions recorded again (same actions and captions)"]


def _names(names: list[str]) -> str:
    more = len(names) - MAX_NAMES
    return ", ".join(names[:MAX_NAMES]) + (f" and {more} more" if more > 0 else "")


def _show(value) -> str:
    return "(not set)" if value is None else json.dumps(value, ensure_ascii=False)
