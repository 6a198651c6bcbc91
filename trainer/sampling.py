"""Samples: the same prompts and seeds rendered without and with the LoRA, side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lorapipe.devices import resolve_device
from trainer.models import is_single_file, load_vae


def load_pipeline(base_model: str, revision: str | None = None, vae: str | None = None, device: str = "auto",
                  single_file_config: str | None = None):
    from diffusers import StableDiffusionXLPipeline

    from lorapipe.modelfiles import check_model_source

    for source in (base_model, single_file_config, vae):
        check_model_source(source)  # no pickle, by name (the evaluate stage loads these too)
    device = resolve_device(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kwargs = {"dtype": dtype}
    if vae:
        kwargs["vae"] = load_vae(vae, base_model, revision, single_file_config, dtype)
    if is_single_file(base_model):
        pipe = StableDiffusionXLPipeline.from_single_file(base_model, config=single_file_config, **kwargs)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(base_model, revision=revision, use_safetensors=True,
                                                         **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def render(pipe, prompts: list[str], seed: int, steps: int, guidance_scale: float, size: tuple[int, int]):
    images = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator("cpu").manual_seed(seed + i)
        images += pipe(
            prompt, num_inference_steps=steps, guidance_scale=guidance_scale, width=size[0], height=size[1],
            generator=generator,
        ).images
    return images


def grid(rows: list[list[Image.Image]]) -> Image.Image:
    w, h = rows[0][0].size
    sheet = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, img in enumerate(row):
            sheet.paste(img, (x * w, y * h))
    return sheet


def mean_abs_difference(a: list[Image.Image], b: list[Image.Image]) -> float:
    """Mean absolute pixel difference (0-255) between two sets of renders."""
    return float(np.mean([np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).mean() for x, y in zip(a, b)]))


def sample_prompts(templates: list[str], name: str) -> list[str]:
    """Each prompt with the person's name, then without it: the LoRA should change the first row only."""
    return [t.replace("{name}", name) for t in templates] + [t.replace("{name}", "a person") for t in templates]


@torch.no_grad()
def training_samples(parts, unet, text_encoders, templates: list[str], name: str, seed: int, steps: int,
                     size: tuple[int, int]) -> Image.Image:
    """Render samples with the model being trained (LoRA active): a grid, prompts across, with/without name down."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=parts.vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1], tokenizer=parts.tokenizer,
        tokenizer_2=parts.tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler.from_config(parts.scheduler_config),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    was_training = unet.training
    unet.eval()
    # The VAE decodes in fp32 on the CPU and bf16 on the GPU; SDXL's VAE overflows in fp16.
    images = render(pipe, sample_prompts(templates, name), seed, steps, 5.0, size)
    unet.train(was_training)
    n = len(templates)
    return grid([images[:n], images[n:]])


def compare_with_and_without(
    base_model: str, lora_file: str | Path, prompts: list[str], seed: int, steps: int, guidance_scale: float,
    size: tuple[int, int], revision: str | None = None, vae: str | None = None, device: str = "auto",
    single_file_config: str | None = None,
):
    """Render the prompts with the base model, load the LoRA, render again: (before, after)."""
    pipe = load_pipeline(base_model, revision, vae, device, single_file_config)
    before = render(pipe, prompts, seed, steps, guidance_scale, size)
    lora_file = Path(lora_file)
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    after = render(pipe, prompts, seed, steps, guidance_scale, size)
    return before, after
