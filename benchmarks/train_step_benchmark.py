"""Training-step throughput: lorapipe's trainer step vs a plain diffusers+peft loop, in one run.

    python benchmarks/train_step_benchmark.py                 # GPU: real SDXL UNet, 1024x1024, random weights
    python benchmarks/train_step_benchmark.py --tiny --cpu    # smoke test on the CPU with the tiny SDXL

Both loops: the same rank-8 kohya-set LoRA, Lion, bf16, cached latents (random tensors stand in for
them), SDPA attention; micro-batches 1, 4 and 8. Prints samples/s and peak GPU memory per row, then
the reference it compares against.

Reference (DESIGN.md §7, issue 6), an H200, plain loop: 2.0 samples/s at micro-batch 1, 7.8 at 4,
12.8 at 8 (63.6 GiB). Goals: >= 3x the plain loop at micro-batch 1, >= 2x at 4, >= 26 samples/s at the
best micro-batch, >= 12 samples/s within 24 GiB peak.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.models import UNET_TARGETS, add_lora  # noqa: E402
from trainer.optim import make_optimizer  # noqa: E402
from trainer.step import Conditioning, per_image_loss  # noqa: E402

REFERENCE = {1: 2.0, 4: 7.8, 8: 12.8}  # H200, plain diffusers+peft loop, samples/s
HERE = Path(__file__).resolve().parent


def build_unet(tiny: bool, device, dtype):
    from diffusers import UNet2DConditionModel

    if tiny:
        from lorapipe.tiny_models import ensure_tiny_models

        unet = UNet2DConditionModel.from_pretrained(ensure_tiny_models().sdxl, subfolder="unet")
    else:
        config = json.loads((HERE / "sdxl_base_unet_config.json").read_text())
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(config)  # random weights: fine for speed
    unet.requires_grad_(False)
    return unet.to(device, dtype)


def inputs(unet, batch, resolution, device, dtype):
    from diffusers import DDPMScheduler

    side = resolution // 8
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    cond = Conditioning(
        torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype),
        torch.randn(batch, pooled, device=device, dtype=dtype),
        torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, device=device,
                     dtype=torch.float32),
    )
    latents = torch.randn(batch, 4, side, side, device=device)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), latents, noise, \
        timesteps, cond


def plain_step(unet, optimizer, scheduler, latents, noise, timesteps, cond, dtype):
    """What the diffusers example loop does per step (including the loss.item() a progress bar shows)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with torch.autocast(latents.device.type, dtype=dtype, enabled=dtype == torch.bfloat16):
        pred = unet(noisy.to(dtype), timesteps, cond.prompt_embeds,
                    added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": cond.time_ids}).sample
    loss = F.mse_loss(pred.float(), noise.float())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def our_step(unet, optimizer, scheduler, latents, noise, timesteps, cond, dtype):
    """lorapipe's trainer step: the same loss code and optimizer the trainer runs, no host sync."""
    with torch.autocast(latents.device.type, dtype=dtype, enabled=dtype == torch.bfloat16):
        loss = per_image_loss(unet, scheduler, latents, noise, timesteps, cond, dtype).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def measure(step, unet, optimizer, args, batch, device, dtype):
    scheduler, latents, noise, timesteps, cond = inputs(unet, batch, args.resolution, device, dtype)
    for _ in range(args.warmup):
        step(unet, optimizer, scheduler, latents, noise, timesteps, cond, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step(unet, optimizer, scheduler, latents, noise, timesteps, cond, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 1024**3 if device.type == "cuda" else float("nan")
    return batch * args.steps / seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batches", default="1,4,8")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="the tiny SDXL instead of the real architecture")
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        args.resolution = min(args.resolution, 256)

    rows = []
    for batch in [int(b) for b in args.micro_batches.split(",")]:
        for label, step, optimizer_name in (("plain diffusers+peft", plain_step, "bnb-lion"),
                                            ("lorapipe", our_step, "auto")):
            unet = build_unet(args.tiny, device, dtype)
            params = add_lora(unet, 8, 1.0, UNET_TARGETS["kohya"])
            unet.train()
            optimizer = make_optimizer([{"params": params, "lr": 4e-4}], optimizer_name, 1e-2)
            try:
                rate, peak = measure(step, unet, optimizer, args, batch, device, dtype)
            except torch.cuda.OutOfMemoryError:
                rate, peak = float("nan"), float("inf")
            rows.append((label, batch, rate, peak))
            del unet, optimizer, params
            if device.type == "cuda":
                torch.cuda.empty_cache()

    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n{'tiny SDXL' if args.tiny else 'SDXL UNet (2.57 B params)'} at {args.resolution}px on {name}")
    print(f"{'loop':22s} {'micro-batch':>11s} {'samples/s':>10s} {'peak GiB':>9s} {'vs plain':>9s} {'reference':>10s}")
    plain = {b: r for label, b, r, _ in rows if label.startswith("plain")}
    for label, batch, rate, peak in rows:
        ratio = rate / plain[batch] if plain.get(batch) else float("nan")
        ref = REFERENCE.get(batch, float("nan")) if label.startswith("plain") and not args.tiny else float("nan")
        print(f"{label:22s} {batch:>11d} {rate:>10.2f} {peak:>9.1f} {ratio:>8.2f}x {ref:>10.1f}")
    print("reference: H200, plain loop (DESIGN.md §7). goals: >=3x plain at 1, >=2x at 4, >=26 samples/s best, "
          ">=12 samples/s within 24 GiB")


if __name__ == "__main__":
    main()
