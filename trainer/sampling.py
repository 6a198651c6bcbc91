"""Samples: the same prompts and seeds rendered without and with the LoRA, side by side."""

from __future__ import annotations


import numpy as np
import torch
from PIL import Image

from lorapipe.devices import resolve_device
from lorapipe.plots import labelled_grid
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


def render(pipe, prompts: list[str], seed: int, steps: int, guidance_scale: float, size: tuple[int, int],
           seeds: list[int] | None = None):
    """One image per prompt: prompt i with seed `seed + i`, or with `seeds[i]` when given (a CPU generator,
    so a seed draws the same noise on any device)."""
    images = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator("cpu").manual_seed(seeds[i] if seeds is not None else seed + i)
        images += pipe(
            prompt, num_inference_steps=steps, guidance_scale=guidance_scale, width=size[0], height=size[1],
            generator=generator,
        ).images
    return images


def grid(rows: list[list[Image.Image]], row_labels: list[str] | None = None, column_labels: list[str] | None = None,
         title: str = "") -> Image.Image:
    """Rows of same-size images, labelled (lorapipe.plots.labelled_grid) when labels are given."""
    if row_labels is not None or column_labels is not None or title:
        return labelled_grid(rows, row_labels or [], column_labels or [], title)
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
                     size: tuple[int, int], title: str = "training samples") -> Image.Image:
    """Render samples with the model being trained (LoRA active): a labelled grid, prompts across,
    with/without the name down; `title` says which run, epoch and rank."""
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
    n = len(templates)
    seeds = [seed + i for i in range(n)] * 2  # each column one seed: the rows differ only by the name
    images = render(pipe, sample_prompts(templates, name), seed, steps, 5.0, size, seeds)
    unet.train(was_training)
    return grid([images[:n], images[n:]], [f"{{name}} = {name}", "{name} = a person"],
                [f"{t} · seed {seed + i}" for i, t in enumerate(templates)], title)
