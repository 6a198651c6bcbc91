"""The UNets, inputs and LoRA set-ups the training benchmarks share.

- `build_unet("sdxl", ...)`: SDXL base's UNet architecture (`sdxl_base_unet_config.json`, 2.57 B
  parameters) with random weights, on any device including `meta` (no memory, no weights);
- `build_unet("tiny", ...)`: the tiny SDXL UNet the demo and the tests train (`lorapipe/tiny_models.py`);
- `plain_peft_lora`: LoRA the way diffusers' `train_text_to_image_lora_sdxl.py` adds it (peft's
  `add_adapter` with a `LoraConfig`, then `cast_training_params` to fp32): the reference;
- `lorapipe_lora`: lorapipe's own (`trainer.models.add_lora`, then `trainer.lora_layers.attach`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from trainer.models import UNET_TARGETS  # noqa: E402


def quiet() -> None:
    """diffusers warns on every `.to(bf16)` of a UNet built from a config; the tables are what matter."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()

RESOLUTION = {"sdxl": 1024, "tiny": 256}  # pixels; latents are 1/8 of that
LABEL = {"sdxl": "SDXL UNet", "tiny": "tiny SDXL UNet"}


def build_unet(kind: str, device, dtype) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    quiet()
    if kind == "sdxl":
        config = json.loads((HERE / "sdxl_base_unet_config.json").read_text())
    else:
        from lorapipe.tiny_models import ensure_tiny_models

        config = UNet2DConditionModel.load_config(ensure_tiny_models().sdxl, subfolder="unet")
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config)  # random weights: op counts and speed only
    unet.requires_grad_(False)
    return unet.to(dtype)


def unet_inputs(unet, batch: int, resolution: int, device, dtype, seed: int = 0):
    """(noisy latents, timesteps, prompt embeddings, added_cond_kwargs) for one micro-batch."""
    gen = torch.Generator().manual_seed(seed)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    side = resolution // 8

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    return (
        randn(batch, unet.config.in_channels, side, side),
        torch.randint(0, 1000, (batch,), generator=gen).to(device),
        randn(batch, 77, unet.config.cross_attention_dim),
        {"text_embeds": randn(batch, pooled),
         "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch,
                                  dtype=torch.float32).to(device)},
    )


def plain_peft_lora(unet, targets: str, rank: int = 8, alpha: float = 8.0) -> list[torch.nn.Parameter]:
    """diffusers' example: `unet.add_adapter(LoraConfig(...))`, LoRA weights cast to fp32."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=UNET_TARGETS[targets]))
    cast_training_params(unet, dtype=torch.float32)
    return [p for p in unet.parameters() if p.requires_grad]


def lorapipe_lora(unet, targets: str, rank: int = 8, alpha: float = 8.0) -> list[torch.nn.Parameter]:
    """What trainer/loop.py does: `add_lora`, then the fast LoRA layers (after the base is in its dtype)."""
    from trainer.lora_layers import attach
    from trainer.models import add_lora

    params = add_lora(unet, rank, alpha, UNET_TARGETS[targets])
    attach(unet)
    return params
