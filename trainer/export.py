"""Export: the trained LoRA as one diffusers-format .safetensors file with its lineage in the metadata."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorapipe.fsutil import atomic_path


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def export_diffusers_lora(src: str | Path, dest: str | Path, lineage: dict, dtype=torch.float16) -> Path:
    """Copy the LoRA to `dest` in `dtype`, keeping diffusers' adapter metadata and adding ours.

    Every tensor is checked finite first: a NaN LoRA loads silently and renders black images.
    """
    tensors, metadata = read_lora(src)
    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise FloatingPointError(f"{src}: non-finite values in {len(bad)} tensors, e.g. {bad[0]}")
    metadata = {**metadata, "format": "pt", "lorapipe": json.dumps(lineage, sort_keys=True, default=str)}
    with atomic_path(dest, suffix=".safetensors") as tmp:
        save_file({k: t.to(dtype).contiguous() for k, t in tensors.items()}, tmp, metadata=metadata)
    return Path(dest)
