"""What a run will do, said before any GPU work: images per bucket, micro-batches, optimizer steps,
and an estimate of GPU memory.
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("lorapipe.train")

FEW_STEPS = 30
GIB = 1024**3
# Measured with a plain diffusers+peft loop on an H200 (bf16, SDPA, no checkpointing): 63.6 GiB at
# micro-batch 8 of 1024x1024 for SDXL's 2.57 B-parameter UNet, ~7.3 GiB of activations per image.
ACTIVATION_BYTES_PER_PIXEL_PER_PARAM = 7.3 * GIB / (1024 * 1024) / 2.567e9
CHECKPOINTING_SAVES = 4  # rough: recomputing blocks keeps ~1/4 of the activations


def estimate_memory_gib(unet_params: int, lora_params: int, largest_bucket: tuple[int, int], micro_batch: int,
                        bf16: bool, gradient_checkpointing: bool) -> float:
    weights = unet_params * (2 if bf16 else 4)
    lora = lora_params * 4 * 3  # fp32 weights, gradients, Lion's single momentum
    activations = ACTIVATION_BYTES_PER_PIXEL_PER_PARAM * largest_bucket[0] * largest_bucket[1] * unet_params
    activations *= micro_batch * (1 if bf16 else 2) / (CHECKPOINTING_SAVES if gradient_checkpointing else 1)
    return (weights + lora + activations) / GIB


def preflight(examples, holdout, schedule, steps, config, micro_batch_size, memory_gib) -> dict:
    """Logged before the models move to the GPU. With `micro_batch_size: auto` not yet probed, the counts
    and the memory estimate are those of micro-batch 1 until `report_probed` gives the probed size's."""
    buckets = Counter(f"{ex.bucket[0]}x{ex.bucket[1]}" for ex in examples)
    info = {
        "images": len(examples),
        "held_out_images": len(holdout),
        "images_per_bucket": dict(sorted(buckets.items())),
        "micro_batch_size": micro_batch_size,
        "micro_batches_per_epoch": len(schedule) // config.epochs,
        "optimizer_steps": len(steps),
        "effective_batch_size": config.effective_batch_size,
        "epochs": config.epochs,
        "estimated_gpu_memory_gib": round(memory_gib, 1),
    }
    if micro_batch_size == "auto":
        info["note"] = "micro-batch size probed on the GPU next; counts and memory here are for micro-batch 1"
    log.info("%s", describe_preflight(info))
    if len(steps) < FEW_STEPS:
        log.warning(
            "only %d optimizer steps (%d images x %d epochs x %d repeats / batch %d): the LoRA may barely learn. "
            "Add photos, raise epochs or repeats, or lower effective_batch_size (e.g. to %d)",
            len(steps), len(examples), config.epochs, config.repeats, config.effective_batch_size,
            max(1, len(examples) * config.epochs * config.repeats // FEW_STEPS),
        )
    return info


def describe_preflight(info: dict) -> str:
    """The preflight for a person: `preflight: 10 images (0 held out) in 4 buckets (192x320 2, 256x256 3, ...);
    micro-batch 2, 6 micro-batches per epoch, 4 epochs, effective batch 4: 9 optimizer steps; GPU memory
    ~0.0 GiB (estimate)`."""
    buckets = ", ".join(f"{bucket} {n}" for bucket, n in info["images_per_bucket"].items())
    text = (f"preflight: {info['images']} images ({info['held_out_images']} held out) in "
            f"{len(info['images_per_bucket'])} buckets ({buckets}); micro-batch {info['micro_batch_size']}, "
            f"{info['micro_batches_per_epoch']} micro-batches per epoch, {info['epochs']} epochs, effective batch "
            f"{info['effective_batch_size']}: {info['optimizer_steps']} optimizer steps; GPU memory "
            f"~{info['estimated_gpu_memory_gib']} GiB (estimate)")
    return text + (f" ({info['note']})" if "note" in info else "")


def report_probed(info: dict, schedule, steps, config, micro_batch_size: int, memory_gib: float) -> dict:
    """The preflight's numbers again, for the micro-batch size `auto` probed (kept for the whole run)."""
    info = {**info, "micro_batch_size": micro_batch_size, "micro_batches_per_epoch": len(schedule) // config.epochs,
            "optimizer_steps": len(steps), "estimated_gpu_memory_gib": round(memory_gib, 1)}
    info.pop("note", None)
    log.info("micro_batch_size auto: %d fits; %d micro-batches per epoch, %d optimizer steps", micro_batch_size,
             info["micro_batches_per_epoch"], info["optimizer_steps"])
    return info
