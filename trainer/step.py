"""One micro-batch's loss: the part of a training step that touches the GPU.

Noise and timesteps come from a generator seeded by the micro-batch's position in the run, so the
same micro-batch gets the same noise whether the run is resumed, or split across processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorapipe.fsutil import stable_hash


def micro_batch_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(stable_hash("noise", seed, index)[:15], 16))


@dataclass
class Conditioning:
    prompt_embeds: torch.Tensor  # B x 77 x (768 + 1280)
    pooled: torch.Tensor  # B x 1280
    time_ids: torch.Tensor  # B x 6: original h, w, crop top, left, target h, w


def time_ids_for(batch) -> torch.Tensor:
    return torch.tensor(
        [[*ex.original_size, *ex.crop_top_left, ex.bucket[1], ex.bucket[0]] for ex in batch], dtype=torch.float32
    )


def sample_training_inputs(mean, std, scaling_factor, num_train_timesteps, noise_offset, generator):
    """Latents drawn from the cached VAE posterior, noise, and uniform timesteps (all on the CPU)."""
    latents = (mean + std * torch.randn(mean.shape, generator=generator)) * scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        noise += noise_offset * torch.randn((*noise.shape[:2], 1, 1), generator=generator)
    timesteps = torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=generator)
    return latents, noise, timesteps


def snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) per timestep (diffusers' `compute_snr`)."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1 - alphas_cumprod)


def min_snr_weight(snr_t: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023), as kohya's `apply_snr_weight` and diffusers'
    train_text_to_image.py compute it: min(SNR, gamma) / SNR for an epsilon target, min(SNR, gamma) /
    (SNR + 1) for a v target. Caps the weight of easy (high-SNR) timesteps at gamma / SNR.
    """
    clamped = torch.clamp(snr_t, max=gamma)
    return clamped / (snr_t + 1 if v_prediction else snr_t)


def training_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon) or the velocity (v_prediction)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")  # refused before training (checks.py)


def per_image_loss(unet, noise_scheduler, latents, noise, timesteps, cond: Conditioning, dtype,
                   min_snr_gamma: float | None = None) -> torch.Tensor:
    """MSE between the UNet's prediction and its target, one value per image (min-SNR weighted if asked)."""
    device = next(unet.parameters()).device
    latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(
        noisy.to(dtype),
        timesteps,
        cond.prompt_embeds.to(device, dtype),
        added_cond_kwargs={"text_embeds": cond.pooled.to(device, dtype), "time_ids": cond.time_ids.to(device)},
    ).sample
    target = training_target(noise_scheduler, latents, noise, timesteps)
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
        loss = loss * min_snr_weight(snr(noise_scheduler, timesteps), min_snr_gamma, v_prediction)
    return loss
