"""Is there anything new to train on? The nightly retrain asks this right after collecting.

A workspace remembers what its last LoRA was trained from (`last-trained.json`): the kept photos collected
(ids and file names), the review decisions, and the settings. The same three again means the same LoRA
would come out, so the nightly run stops after collecting, without touching the GPU; otherwise
`what_changed` names the difference: photos added or removed, decisions, settings (dotted path: old → new).
"""

from __future__ import annotations

import json
from pathlib import Path

from lorapipe.config import PipelineConfig
from lorapipe.fsutil import atomic_write_json, read_json, stable_hash
from lorapipe.manifest import ImageRecord, read_manifest
from lorapipe.review_decisions import DecisionStore
from lorapipe.workspace import Workspace

LAST_TRAINED = "last-trained.json"
MAX_NAMES = 10  # file names listed per change; more are counted


def training_inputs(ws: Workspace, collect_manifest: str | Path, config: PipelineConfig) -> dict:
    """What a LoRA is trained from: {"photos": {id: file name}, "decisions": {key: decision}, "settings"}."""
    photos = {r.id: _file_name(r) for r in read_manifest(collect_manifest) if r.kept}
    store = DecisionStore(ws.cache)
    files = sorted(store.dir.glob("*.json")) if store.dir.exists() else []
    decisions = {p.stem: {k: v for k, v in json.loads(p.read_text()).items() if k in ("action", "caption")}
                 for p in files}
    # Where captioning runs changes nothing in the result.
    settings = config.model_dump(mode="json", by_alias=True, exclude={"scale_out"})
    return {"photos": dict(sorted(photos.items())), "decisions": decisions, "settings": settings}


def training_fingerprint(ws: Workspace, collect_manifest: str | Path, config: PipelineConfig) -> str:
    inputs = training_inputs(ws, collect_manifest, config)
    return stable_hash(sorted(inputs["photos"]), DecisionStore(ws.cache).digest(), inputs["settings"])


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
    images = {DecisionStore.key(r.id, r.caption): _file_name(r) for r in records}
    new = {key: d for key, d in now["decisions"].items() if old["decisions"].get(key) != d}
    gone = [key for key in old["decisions"] if key not in now["decisions"]]
    if new or gone:
        named = [f"{images.get(key, 'an image')}: {d['action']}" for key, d in new.items()]
        changes.append(f"review decisions: {len(new)} new or changed, {len(gone)} withdrawn"
                       + (f" ({_names(named)})" if named else ""))
    old_settings, new_settings = _flat(old["settings"]), _flat(now["settings"])
    settings = [f"{path} {_show(old_settings.get(path))} → {_show(new_settings.get(path))}"
                for path in sorted(old_settings.keys() | new_settings.keys())
                if old_settings.get(path) != new_settings.get(path)]
    if settings:
        changes.append("settings: " + "; ".join(settings))
    return changes or ["review decisions recorded again (same actions and captions)"]


def _file_name(record: ImageRecord) -> str:
    return Path(record.source.split("!/")[-1]).name  # a file inside an archive: its own name


def _names(names: list[str]) -> str:
    more = len(names) - MAX_NAMES
    return ", ".join(names[:MAX_NAMES]) + (f" and {more} more" if more > 0 else "")


def _flat(settings: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _show(value) -> str:
    return "(not set)" if value is None else json.dumps(value, ensure_ascii=False)
