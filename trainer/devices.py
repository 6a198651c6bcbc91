"""Where a run executes: the accelerator (one process or DDP), placement of weights, and the probe that
picks the micro-batch size for `micro_batch_size: auto` (CUDA only).
"""

from __future__ import annotations

import torch

from lorapipe.config import TrainConfig


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator

    from lorapipe.devices import resolve_device

    device = resolve_device(config.device)
    bf16 = device == "cuda" and config.mixed_precision == "bf16"
    return Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=device == "cpu"), bf16


def place(module: torch.nn.Module, device, dtype) -> None:
    """Move to the device; frozen weights in the compute dtype, trainable (LoRA) weights stay fp32."""
    module.to(device)
    for p in module.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)


def probe_micro_batch(unet, bucket, cond_dims, device, dtype, candidates=(16, 8, 4, 2, 1)) -> int:
    """The largest micro-batch whose forward+backward fits in GPU memory with 10% to spare."""
    if device.type != "cuda":
        return 4
    total = torch.cuda.get_device_properties(device).total_memory
    for size in candidates:
        try:
            torch.cuda.reset_peak_memory_stats(device)
            latents = torch.randn(size, 4, bucket[1] // 8, bucket[0] // 8, device=device, dtype=dtype)
            out = unet(latents, torch.full((size,), 500, device=device),
                       torch.randn(size, 77, cond_dims[0], device=device, dtype=dtype),
                       added_cond_kwargs={"text_embeds": torch.randn(size, cond_dims[1], device=device, dtype=dtype),
                                          "time_ids": torch.ones(size, 6, device=device)}).sample
            out.float().mean().backward()
            unet.zero_grad(set_to_none=True)
            if torch.cuda.max_memory_allocated(device) < 0.9 * total:
                return size
        except torch.cuda.OutOfMemoryError:
            pass
        unet.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    return 1
