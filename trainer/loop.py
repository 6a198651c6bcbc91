"""The training loop: SDXL UNet + rank-8 LoRA (peft) + Lion + gradient accumulation over aspect buckets.

1. Encode every image once with the VAE and every caption once with both text encoders (cached on disk).
2. Free the VAE and text encoders; add LoRA to the UNet's transformer blocks (kohya's target set).
3. For each optimizer step: micro-batches (one bucket each) until the effective batch is reached,
   noise at random timesteps, predict the noise, MSE, backward; then one Lion step.
4. Save the LoRA in diffusers format, with adapter metadata so alpha != rank reloads exactly.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lorapipe.config import TrainConfig
from lorapipe.devices import resolve_device
from lorapipe.fsutil import atomic_dir, atomic_write_json
from trainer.data import (
    Example,
    TensorCache,
    cache_latents,
    cache_text_embeddings,
    micro_batch_schedule,
)
from trainer.models import load_sdxl, model_identity
from trainer.optim import make_optimizer

log = logging.getLogger("lorapipe.train")

# kohya's default LoRA targets for SDXL: every Linear in the UNet's transformer blocks.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
FEW_STEPS = 20
MAX_BAD_STEPS = 3


@dataclass
class TrainResult:
    lora_dir: str
    steps: int
    images: int
    losses: list[float]
    final_loss: float
    seconds: float
    skipped_steps: int
    preflight: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)  # latents / text embeddings computed vs re-used


def group_into_steps(schedule: list[list[int]], effective_batch_size: int) -> list[list[list[int]]]:
    """Consecutive micro-batches per optimizer step, until each step has seen the effective batch."""
    steps, current, seen = [], [], 0
    for micro_batch in schedule:
        current.append(micro_batch)
        seen += len(micro_batch)
        if seen >= effective_batch_size:
            steps.append(current)
            current, seen = [], 0
    if current:
        steps.append(current)
    return steps


def preflight(examples: list[Example], steps: list, config: TrainConfig, schedule: list) -> dict:
    buckets = Counter(f"{ex.bucket[0]}x{ex.bucket[1]}" for ex in examples)
    info = {
        "images": len(examples),
        "images_per_bucket": dict(sorted(buckets.items())),
        "micro_batches_per_epoch": len(schedule) // config.epochs,
        "optimizer_steps": len(steps),
        "effective_batch_size": config.effective_batch_size,
        "epochs": config.epochs,
    }
    log.info("preflight: %s", json.dumps(info))
    if len(steps) < FEW_STEPS:
        log.warning(
            "only %d optimizer steps (%d images x %d epochs x %d repeats / batch %d): the LoRA may barely learn; "
            "add photos, raise epochs or repeats, or lower effective_batch_size",
            len(steps), len(examples), config.epochs, config.repeats, config.effective_batch_size,
        )
    return info


def train_lora(examples: list[Example], config: TrainConfig, run_dir: str | Path, cache_dir: str | Path) -> TrainResult:
    if not examples:
        raise ValueError("no approved images to train on")
    started = time.monotonic()
    run_dir = Path(run_dir)
    device = resolve_device(config.device)
    use_bf16 = device == "cuda" and config.mixed_precision == "bf16"
    weight_dtype = torch.bfloat16 if use_bf16 else torch.float32
    torch.manual_seed(config.seed)

    # 1. Caches. The VAE stays in fp32 on the CPU and bf16 on the GPU: fp16 overflows in SDXL's VAE.
    parts = load_sdxl(config.base_model, config.revision, config.vae)
    identity = model_identity(config.base_model, config.revision, config.vae)
    parts.vae.to(device, dtype=weight_dtype)
    latent_cache = TensorCache(Path(cache_dir) / "latents")
    latents = cache_latents(examples, parts.vae, latent_cache, identity, device, weight_dtype)
    scaling_factor = parts.vae.config.scaling_factor
    encoders = [parts.text_encoder.to(device, weight_dtype), parts.text_encoder_2.to(device, weight_dtype)]
    text_cache = TensorCache(Path(cache_dir) / "text")
    embeddings = cache_text_embeddings(
        examples, [parts.tokenizer, parts.tokenizer_2], encoders, text_cache, identity, device
    )
    parts.vae = parts.text_encoder = parts.text_encoder_2 = encoders = None
    gc.collect()

    # 2. LoRA on the UNet. Frozen weights in the compute dtype, trainable LoRA weights in fp32.
    from peft import LoraConfig

    unet = parts.unet.to(device, dtype=weight_dtype)
    unet.add_adapter(
        LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian", target_modules=UNET_TARGETS)
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = make_optimizer(params, config.optimizer, config.learning_rate, config.weight_decay)

    schedule = micro_batch_schedule(examples, config.micro_batch_size, config.epochs, config.repeats, config.seed)
    steps = group_into_steps(schedule, config.effective_batch_size)
    info = preflight(examples, steps, config, schedule)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=len(steps)
    )
    noise_scheduler = parts.noise_scheduler
    generator = torch.Generator().manual_seed(config.seed)

    # 3. The loop.
    losses, skipped, bad_in_a_row = [], 0, 0
    for step, micro_batches in enumerate(steps, 1):
        images_in_step = sum(len(mb) for mb in micro_batches)
        step_loss = 0.0
        for mb in micro_batches:
            batch = [examples[i] for i in mb]
            mean = torch.stack([latents[ex.image_id]["mean"] for ex in batch])
            std = torch.stack([latents[ex.image_id]["std"] for ex in batch])
            model_input = (mean + std * torch.randn(mean.shape, generator=generator)) * scaling_factor
            noise = torch.randn(model_input.shape, generator=generator)
            if config.noise_offset:
                noise += config.noise_offset * torch.randn((*noise.shape[:2], 1, 1), generator=generator)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(batch),), generator=generator)
            noisy = noise_scheduler.add_noise(model_input, noise, timesteps)
            time_ids = torch.tensor(
                [[*ex.original_size, *ex.crop_top_left, ex.bucket[1], ex.bucket[0]] for ex in batch],
                dtype=torch.float32,
            )
            prompt_embeds = torch.stack([embeddings[ex.caption]["prompt_embeds"] for ex in batch])
            pooled = torch.stack([embeddings[ex.caption]["pooled"] for ex in batch])
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16):
                prediction = unet(
                    noisy.to(device, weight_dtype),
                    timesteps.to(device),
                    prompt_embeds.to(device, weight_dtype),
                    added_cond_kwargs={"text_embeds": pooled.to(device, weight_dtype), "time_ids": time_ids.to(device)},
                ).sample
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(model_input, noise, timesteps)
            else:
                target = noise
            per_image = F.mse_loss(prediction.float(), target.to(device), reduction="none").mean(dim=(1, 2, 3))
            (per_image.sum() / images_in_step).backward()
            step_loss += per_image.sum().item() / images_in_step

        if not math.isfinite(step_loss):
            skipped += 1
            bad_in_a_row += 1
            optimizer.zero_grad(set_to_none=True)
            log.warning("step %d: loss is %s; step skipped", step, step_loss)
            if bad_in_a_row >= MAX_BAD_STEPS:
                raise FloatingPointError(
                    f"{bad_in_a_row} optimizer steps in a row had a non-finite loss (last at step {step}): "
                    "lower the learning rate, or use fp32 / the fp16-fix VAE"
                )
            continue
        bad_in_a_row = 0
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        log.info("step %d/%d  loss %.4f  lr %.2e", step, len(steps), step_loss, lr_scheduler.get_last_lr()[0])

    # 4. Save.
    lora_dir = run_dir / "lora"
    save_unet_lora(unet, lora_dir)
    result = TrainResult(
        lora_dir=str(lora_dir),
        steps=len(losses),
        images=len(examples),
        losses=losses,
        final_loss=losses[-1] if losses else float("nan"),
        seconds=round(time.monotonic() - started, 2),
        skipped_steps=skipped,
        preflight=info,
        cache={
            "latents": {"computed": latent_cache.computed, "reused": latent_cache.reused},
            "text_embeddings": {"computed": text_cache.computed, "reused": text_cache.reused},
        },
    )
    atomic_write_json(run_dir / "train_result.json", asdict(result))
    return result


def save_unet_lora(unet, lora_dir: Path) -> Path:
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    # peft's key names, as they are. diffusers' convert_state_dict_to_diffusers rewrites the attention
    # keys to an older naming that load_lora_weights then drops with only a warning (measured: the
    # reloaded UNet differed from the trained one by 0.11; with peft names it is exact).
    state = get_peft_model_state_dict(unet)
    bad = [name for name, t in state.items() if not torch.isfinite(t).all()]
    if bad:
        raise FloatingPointError(f"LoRA weights are not finite: {bad[:5]}")
    with atomic_dir(lora_dir) as tmp:
        StableDiffusionXLPipeline.save_lora_weights(
            tmp,
            unet_lora_layers={k: v.detach().float().cpu() for k, v in state.items()},
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
            weight_name=LORA_WEIGHTS,
        )
    return lora_dir / LORA_WEIGHTS
