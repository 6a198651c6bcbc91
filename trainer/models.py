"""Loading SDXL the way users name it: a hub id, a local diffusers folder, or one .safetensors file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class SDXLParts:
    tokenizer: object
    tokenizer_2: object
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object


def is_single_file(base_model: str) -> bool:
    return Path(base_model).suffix in {".safetensors", ".ckpt", ".pt", ".bin"}


def load_sdxl(base_model: str, revision: str | None = None, vae: str | None = None) -> SDXLParts:
    """All the parts training needs, frozen, on the CPU in fp32 (the caller moves and casts them)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if is_single_file(base_model):
        if Path(base_model).suffix != ".safetensors":
            raise ValueError(f"{base_model}: only .safetensors checkpoints are loaded (pickle files can run code)")
        pipe = StableDiffusionXLPipeline.from_single_file(base_model)
        parts = SDXLParts(
            pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2, pipe.vae, pipe.unet,
            DDPMScheduler.from_config(pipe.scheduler.config),
        )
    else:
        kw = {"revision": revision}
        parts = SDXLParts(
            tokenizer=CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer", **kw),
            tokenizer_2=CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer_2", **kw),
            text_encoder=CLIPTextModel.from_pretrained(base_model, subfolder="text_encoder", **kw),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(base_model, subfolder="text_encoder_2", **kw),
            vae=AutoencoderKL.from_pretrained(base_model, subfolder="vae", **kw),
            unet=UNet2DConditionModel.from_pretrained(base_model, subfolder="unet", **kw),
            # Training adds noise with the DDPM formulation whatever sampler the model ships with.
            noise_scheduler=DDPMScheduler.from_pretrained(base_model, subfolder="scheduler", **kw),
        )
    if vae:
        parts.vae = (
            AutoencoderKL.from_single_file(vae) if is_single_file(vae) else AutoencoderKL.from_pretrained(vae)
        )
    for module in (parts.text_encoder, parts.text_encoder_2, parts.vae, parts.unet):
        module.requires_grad_(False)
        module.eval()
    return parts


def model_identity(base_model: str, revision: str | None, vae: str | None) -> dict:
    """What names the weights in cache keys: a local folder by its resolved path, a hub id by id + revision."""
    local = Path(base_model).expanduser()
    name = str(local.resolve()) if local.exists() else base_model
    return {"base_model": name, "revision": revision, "vae": vae}
