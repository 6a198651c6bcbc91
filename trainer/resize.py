"""Resize a kohya-format LoRA to a lower rank by SVD (`lorapipe resize LORA --rank 4`).

Each module's update is ΔW = (alpha / r) · up @ down (kohya's convention; a file without `.alpha`
means alpha = r). Its best rank-k approximation in the Frobenius norm is the SVD truncated to the k
largest singular values (Eckart–Young). The SVD is taken of the r×r core of two QR factorisations
(up = Qu·Ru, downᵀ = Qd·Rd, so up @ down = Qu·(Ru·Rdᵀ)·Qdᵀ): exact, and cheap even for 5120-wide
modules, unlike an SVD of the dense product. Conv LoRA modules (4-D down, 1×1 up) are flattened.

The new file keeps alpha/rank (kohya's resize_lora.py does too: alpha' = (alpha/r)·k), splits √σ between
up and down (balanced magnitudes survive fp16), and reports the energy kept: Σσ²(kept) / Σσ², the share
of ‖ΔW‖²_F the smaller LoRA still carries, per module and overall (the overall one weights modules by
their ‖ΔW‖², i.e. sums before dividing).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorapipe.errors import UserError
from trainer.export import check_finite, read_lora, write
from trainer.kohya import TE1_PREFIX, TE2_PREFIX, UNET_PREFIX, safetensors_hashes

DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"


@dataclass
class ModuleEnergy:
    module: str  # kohya name, e.g. lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q
    rank: int
    new_rank: int
    energy_kept: float  # Σσ²(kept) / Σσ² of this module's ΔW, 0-1
    energy: float  # ‖ΔW‖²_F of the original module (weights the overall share)


@dataclass
class ResizeReport:
    source: str
    dest: str
    from_rank: int  # the largest module rank in the source
    to_rank: int
    energy_kept: float  # over all modules, 0-1
    modules: list[ModuleEnergy]

    def to_json(self) -> dict:
        return asdict(self)

    def least_kept(self, count: int = 5) -> list[ModuleEnergy]:
        return sorted(self.modules, key=lambda m: m.energy_kept)[:count]


def kohya_modules(tensors: dict[str, torch.Tensor], where) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {"down", "up", "alpha"?}}; anything but plain LoRA keys is refused by name."""
    modules: dict[str, dict] = {}
    for key, tensor in tensors.items():
        for suffix, part in ((DOWN, "down"), (UP, "up"), (ALPHA, "alpha")):
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[part] = tensor
                break
        else:
            raise UserError(f"{where}: {key} is not a kohya LoRA key (LyCORIS/LoHa/DoRA files cannot be resized)")
    incomplete = [name for name, parts in modules.items() if not {"down", "up"} <= parts.keys()]
    if incomplete:
        raise UserError(f"{where}: {incomplete[0]} lacks its lora_down or lora_up weight")
    if not modules:
        raise UserError(f"{where}: no LoRA modules in this file")
    if not any(name.startswith((UNET_PREFIX, TE1_PREFIX, TE2_PREFIX)) for name in modules):
        raise UserError(f"{where}: not a kohya-format SDXL LoRA (no lora_unet_/lora_te1_/lora_te2_ modules)")
    return modules


def resize_module(down: torch.Tensor, up: torch.Tensor, alpha: float | None, new_rank: int):
    """(down', up', alpha', energy kept, energy) with (alpha'/k)·up'@down' = best rank-k approximation of
    (alpha/r)·up@down, k = min(new_rank, r). Shapes: down (r, in[, kh, kw]), up (out, r[, 1, 1])."""
    r = down.shape[0]
    scale = (alpha if alpha is not None else r) / r
    d = down.reshape(r, -1).double()
    u = up.reshape(up.shape[0], r).double()
    qu, ru = torch.linalg.qr(u)
    qd, rd = torch.linalg.qr(d.T)
    left, sigma, right = torch.linalg.svd(ru @ rd.T)
    k = min(new_rank, r)
    total = float((sigma**2).sum())
    kept = float((sigma[:k] ** 2).sum())
    root = sigma[:k].sqrt()
    new_up = (qu @ left[:, :k]) * root
    new_down = root[:, None] * (right[:k] @ qd.T)
    new_up = new_up.reshape(up.shape[0], k, *up.shape[2:]).to(up.dtype).contiguous()
    new_down = new_down.reshape(k, *down.shape[1:]).to(down.dtype).contiguous()
    return new_down, new_up, scale * k, (kept / total if total > 0 else 1.0), scale**2 * total


def resize_lora(source: str | Path, dest: str | Path, rank: int) -> ResizeReport:
    """Write `source` resized to `rank` at `dest` (kohya format, the source's dtype and metadata, with
    ss_network_dim/ss_network_alpha updated and a `lorapipe_resize` key: ranks, energy kept, source hash)."""
    if rank < 1:
        raise UserError(f"--rank {rank}: a rank is at least 1")
    source, dest = Path(source), Path(dest)
    if not source.is_file():
        raise UserError(f"{source}: no such LoRA file")
    try:
        tensors, metadata = read_lora(source)
    except Exception as err:  # safetensors' own message says what is wrong with the file
        raise UserError(f"{source}: not a readable safetensors file ({err})") from None
    check_finite(tensors, source)
    out: dict[str, torch.Tensor] = {}
    modules: list[ModuleEnergy] = []
    alphas = set()
    for name, parts in sorted(kohya_modules(tensors, source).items()):
        alpha = float(parts["alpha"]) if "alpha" in parts else None
        down, up, new_alpha, kept, energy = resize_module(parts["down"], parts["up"], alpha, rank)
        out[name + DOWN], out[name + UP] = down, up
        out[name + ALPHA] = torch.tensor(new_alpha, dtype=parts["alpha"].dtype if "alpha" in parts else down.dtype)
        alphas.add(round(new_alpha, 6))
        modules.append(ModuleEnergy(name, parts["down"].shape[0], down.shape[0], kept, energy))
    total = sum(m.energy for m in modules)
    overall = sum(m.energy * m.energy_kept for m in modules) / total if total > 0 else 1.0
    from_rank = max(m.rank for m in modules)
    to_rank = max(m.new_rank for m in modules)
    report = ResizeReport(str(source), str(dest), from_rank, to_rank, overall, modules)
    from lorapipe.fsutil import sha256_file

    metadata = {
        **metadata,
        "ss_network_dim": json.dumps(to_rank),
        # One alpha when every module shares alpha/rank (the usual case); kohya writes "Dynamic" otherwise.
        "ss_network_alpha": json.dumps(alphas.pop()) if len(alphas) == 1 else "Dynamic",
        "ss_training_comment": (metadata.get("ss_training_comment", "") +
                                f"; dimension is resized from {from_rank} to {to_rank}").lstrip("; "),
        "lorapipe_resize": json.dumps({"from_rank": from_rank, "to_rank": to_rank, "energy_kept": overall,
                                       "source": source.name, "source_sha256": sha256_file(source)}),
    }
    model_hash, legacy_hash = safetensors_hashes(out, metadata)
    write(dest, out, {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash})
    return report
