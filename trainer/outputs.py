"""What a run writes besides checkpoints: progress.json, held-out loss, sample sheets, and the LoRA itself."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lorapipe.fsutil import atomic_dir, atomic_path, atomic_write_json
from trainer.data import Example
from trainer.export import portable_state
from trainer.models import lora_state
from trainer.sampling import training_samples
from trainer.step import micro_batch_generator

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def epoch_of_step(indices: list[int], per_epoch: int) -> int:
    return indices[-1] // per_epoch + 1


def write_progress(run_dir: Path, done_here: int, step: int, total: int, epoch: int, epochs: int, loss: float,
                   started: float) -> None:
    """run_dir/progress.json after every optimizer step, for whoever watches (the CLI, Prefect artifacts)."""
    elapsed = time.monotonic() - started
    eta = elapsed / done_here * (total - step) if done_here else None
    atomic_write_json(run_dir / "progress.json", {
        "step": step, "total_steps": total, "epoch": epoch, "epochs": epochs, "loss": loss,
        "elapsed_seconds": round(elapsed, 1), "eta_seconds": None if eta is None else round(eta, 1),
    })


@torch.no_grad()
def held_out_loss(holdout: list[Example], micro_batch_loss, seed: int) -> float:
    """Loss on images never trained on, with the same noise every time so epochs compare."""
    total = 0.0
    for n, ex in enumerate(holdout):  # one at a time: held-out images may sit in different buckets
        total += micro_batch_loss([ex], micro_batch_generator(seed, -1 - n)).sum().item()
    return total / len(holdout)


def save_samples(run_dir, label, parts, unet, encoders, config, name, size, device, bf16) -> Path:
    movable = [parts.vae, *encoders]
    if not config.train_text_encoders:
        for module in movable:
            module.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        sheet = training_samples(parts, unet, encoders, config.sample_prompts, name or "a person", config.seed,
                                 config.sample_steps, size, title=f"training samples · {label} · rank {config.rank}")
    if not config.train_text_encoders and device.type == "cuda":
        for module in movable:
            module.to("cpu")
    dest = run_dir / "samples" / f"{label}.png"
    with atomic_path(dest, suffix=".png") as tmp:
        sheet.save(tmp)
    return dest


def save_lora(lora_dir: Path, modules: dict[str, torch.nn.Module]) -> Path:
    from diffusers import StableDiffusionXLPipeline

    states = {name: portable_state(name, lora_state(module)) for name, module in modules.items()}
    bad = [k for state in states.values() for k, t in state.items() if not torch.isfinite(t).all()]
    if bad:
        raise FloatingPointError(f"LoRA weights are not finite: {bad[:5]}")
    kwargs = {}
    for name, module in modules.items():
        kwargs[f"{name}_lora_layers"] = states[name]
        kwargs[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    with atomic_dir(lora_dir) as tmp:
        StableDiffusionXLPipeline.save_lora_weights(tmp, weight_name=LORA_WEIGHTS, **kwargs)
    return lora_dir / LORA_WEIGHTS
