"""Export: the trained LoRA in the two formats people load.

- kohya (`<name>.safetensors`): ComfyUI, A1111, Forge, and diffusers' `load_lora_weights` too; with the
  `ss_*` metadata kohya users read, the model-spec keys, and our lineage.
- diffusers (`<name>.diffusers.safetensors`): peft key names and diffusers' adapter metadata.

Both fp16, every tensor checked finite first: a NaN LoRA loads silently and renders black images.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorapipe.config import TrainConfig
from lorapipe.fsutil import atomic_path
from trainer.checks import MODELSPEC_PREDICTION_TYPE, SDXL_BASE_MODEL_VERSION
from trainer.kohya import safetensors_hashes, to_kohya
from trainer.optim import resolve_optimizer

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def check_finite(tensors: dict[str, torch.Tensor], where) -> None:
    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise FloatingPointError(f"{where}: non-finite values in {len(bad)} tensors, e.g. {bad[0]}")


def split_components(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers' packed file ("unet.…", "text_encoder.…") back into one peft state dict per component."""
    states: dict[str, dict] = {}
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        if component not in COMPONENTS:
            raise ValueError(f"unexpected key in a diffusers LoRA file: {key}")
        states.setdefault(component, {})[rest] = tensor
    return states


def write(dest: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    with atomic_path(dest, suffix=".safetensors") as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return dest


def portable_state(component: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text-encoder LoRA keys under transformers 4's module names, which load on transformers 4 and 5.

    transformers 5's CLIPTextModel lost the `text_model.` level (CLIPTextModelWithProjection kept it), so
    peft names its LoRA `encoder.layers.…`; diffusers strips `text_model.` again where a model lacks it
    (`_load_lora_into_text_encoder`), while on transformers 4 keys without it match no module and the load
    fails ("Cannot copy out of meta tensor"). kohya's names carry the level too.
    """
    if component == "unet":
        return state
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}


def export_diffusers_lora(src: str | Path, dest: str | Path, lineage: dict, dtype=torch.float16) -> Path:
    """Copy the LoRA to `dest` in `dtype`, keeping diffusers' adapter metadata and adding ours."""
    tensors, metadata = read_lora(src)
    check_finite(tensors, src)
    tensors = {f"{component}.{k}": t for component, state in split_components(tensors).items()
               for k, t in portable_state(component, state).items()}  # runs trained before the names changed
    metadata = {**metadata, "format": "pt", "lorapipe": json.dumps(lineage, sort_keys=True, default=str)}
    return write(Path(dest), {k: t.to(dtype).contiguous() for k, t in tensors.items()}, metadata)


def caption_phrase_frequency(captions: list[str]) -> dict[str, int]:
    """kohya's ss_tag_frequency for natural-language captions: comma-separated phrases, counted."""
    counts = Counter(p.strip().lower() for c in captions for p in re.split(r"[,.]", c) if p.strip())
    return dict(counts.most_common(200))


def kohya_metadata(config: TrainConfig, result: dict, name: str, captions: list[str], resolution: int,
                   lineage: dict) -> dict[str, str]:
    """kohya's `ss_*` keys and the SAI model spec, from what the run did (`result`: its TrainResult as a dict),
    not from what was asked: precision, prediction type and base model version are the trainer's facts."""
    micro = result.get("micro_batch_size") or result.get("preflight", {}).get("micro_batch_size",
                                                                              config.micro_batch_size)
    model = result.get("model") or {}
    ss = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": config.rank,
        "ss_network_alpha": config.alpha,
        "ss_network_train_unet_only": not config.train_text_encoders,
        "ss_base_model_version": model.get("base_model_version", SDXL_BASE_MODEL_VERSION),
        "ss_sd_model_name": config.base_model,
        "ss_vae_name": config.vae or "",
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_num_train_images": result.get("images"),
        "ss_num_epochs": config.epochs,
        "ss_epoch": config.epochs,
        "ss_max_train_steps": result.get("steps"),
        "ss_steps": result.get("steps"),
        "ss_learning_rate": config.learning_rate,
        "ss_unet_lr": config.learning_rate,
        "ss_text_encoder_lr": config.text_encoder_lr if config.train_text_encoders else 0.0,
        "ss_optimizer": f"{resolve_optimizer(config.optimizer)}(weight_decay={config.weight_decay},betas=(0.9, 0.99))",
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": config.lr_warmup_steps,
        "ss_batch_size_per_device": micro,
        "ss_total_batch_size": config.effective_batch_size,
        "ss_gradient_accumulation_steps": max(1, config.effective_batch_size // micro) if micro != "auto" else "",
        "ss_mixed_precision": model.get("mixed_precision", ""),  # unknown for runs before it was recorded
        "ss_gradient_checkpointing": config.gradient_checkpointing,
        "ss_min_snr_gamma": config.min_snr_gamma if config.min_snr_gamma else "",
        "ss_noise_offset": config.noise_offset,
        "ss_zero_terminal_snr": model.get("zero_terminal_snr", False),
        "ss_seed": config.seed,
        "ss_num_repeats": config.repeats,
        "ss_output_name": name,
        "ss_training_comment": f"trained by lorapipe; trigger: {name}",
        "ss_training_finished_at": time.time(),
        "ss_tag_frequency": json.dumps({"images": caption_phrase_frequency(captions)}),
        "ss_caption_stats": json.dumps({
            "captions": len(captions),
            "mean_words": round(sum(len(c.split()) for c in captions) / max(len(captions), 1), 1),
        }),
    }
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": name,
        "modelspec.description": f"LoRA of {name}, trained by lorapipe",
        "modelspec.trigger_phrase": name,
        "modelspec.date": datetime.now(timezone.utc).date().isoformat(),
        "modelspec.resolution": f"{resolution}x{resolution}",
    }
    if model.get("prediction_type"):
        spec["modelspec.prediction_type"] = MODELSPEC_PREDICTION_TYPE[model["prediction_type"]]
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in {**ss, **spec}.items()}
    meta["lorapipe"] = json.dumps(lineage, sort_keys=True, default=str)
    return meta


def export_kohya_lora(src: str | Path, dest: str | Path, metadata: dict[str, str], alpha: float,
                      layers_per_block: int = 2) -> Path:
    tensors, _ = read_lora(src)
    check_finite(tensors, src)
    kohya = to_kohya(split_components(tensors), alpha, layers_per_block)
    model_hash, legacy_hash = safetensors_hashes(kohya, metadata)
    return write(Path(dest), kohya, {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash})
