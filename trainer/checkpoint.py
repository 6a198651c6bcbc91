"""Checkpoints in safetensors + JSON (no pickle): LoRA weights, optimizer and scheduler state, RNG
states, and the position in the run. Written to a temp folder, marked complete, renamed into place;
older ones pruned only after. A rerun of the same job resumes from the newest complete one.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lorapipe.fsutil import atomic_write_json, publish

log = logging.getLogger("lorapipe.train")

COMPLETE = "complete.json"


def flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str = "s") -> Any:
    """A JSON skeleton of `obj` with its tensors moved into `tensors` (keyed by their path).

    Keeps what JSON would lose: integer dict keys (optimizer state is keyed by parameter index) and tuples.
    """
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().clone()  # a copy: optimizers share tensors (bnb qmaps)
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[k, flatten(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path}")


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__tuple__" in skeleton:
            return tuple(unflatten(v, tensors) for v in skeleton["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    return skeleton


def save_state(folder: Path, name: str, state: Any) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(state, tensors)
    save_file(tensors, folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(folder: Path, name: str) -> Any:
    return unflatten(json.loads((folder / f"{name}.json").read_text()), load_file(folder / f"{name}.safetensors"))


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(states["cuda"]))


def write_checkpoint(root: Path, step: int, job_key: str, trainables: dict[str, dict], optimizer, scheduler,
                     extra: dict, keep: int) -> Path:
    """`trainables`: {"unet": lora state dict, "text_encoder": ..., ...}; `extra`: JSON (losses, epoch, ...)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    # A name of its own: a second writer (there should be none: the run folder is locked) cannot share it.
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}.", suffix=".tmp", dir=root))
    for name, weights in trainables.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / f"lora_{name}.safetensors")
    save_state(tmp, "optimizer", optimizer.state_dict())
    save_state(tmp, "rng", rng_states())
    (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    # Written last: a folder without it is an interrupted write and is never resumed from.
    atomic_write_json(tmp / COMPLETE, {"step": step, "job_key": job_key, **extra})
    shutil.rmtree(final, ignore_errors=True)
    publish(tmp, final)
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step-*") if (p / COMPLETE).exists())


def latest_checkpoint(root: Path, job_key: str) -> Path | None:
    for folder in reversed(complete_checkpoints(root)):
        info = json.loads((folder / COMPLETE).read_text())
        if info.get("job_key") == job_key:
            return folder
        log.warning("%s belongs to another job; not resuming from it", folder)
    return None


def read_checkpoint(folder: Path) -> dict:
    return {
        "info": json.loads((folder / COMPLETE).read_text()),
        "lora": {p.stem.removeprefix("lora_"): load_file(p) for p in folder.glob("lora_*.safetensors")},
        "optimizer": load_state(folder, "optimizer"),
        "rng": load_state(folder, "rng"),
        "scheduler": json.loads((folder / "scheduler.json").read_text()),
    }
