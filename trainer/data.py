"""Training data: examples from the manifest, aspect buckets, and the latent / text-embedding caches.

Both caches are keyed on content: a latent on the cropped image's bytes and the VAE, a text embedding
on the caption text and the encoders. An edited caption or a replaced image is never served stale,
and nothing else is recomputed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lorapipe.fsutil import atomic_path, sha256_file, stable_hash


@dataclass(frozen=True)
class Example:
    image_id: str
    image_path: Path
    caption: str
    bucket: tuple[int, int]  # width, height of the (already cropped) image
    original_size: tuple[int, int]  # height, width (SDXL order)
    crop_top_left: tuple[int, int]  # top, left


class TensorCache:
    """safetensors files under a folder, one per key, written atomically."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.computed = 0
        self.reused = 0

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path(key)
        if not path.exists():
            return None
        self.reused += 1
        return load_file(path)

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        self.computed += 1
        with atomic_path(self.path(key), suffix=".safetensors") as tmp:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp)


def image_tensor(path: Path) -> torch.Tensor:
    """An image as a 1x3xHxW tensor in [-1, 1], as the VAE expects."""
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)


@torch.no_grad()
def cache_latents(examples, vae, cache: TensorCache, vae_identity: dict, device, dtype) -> dict[str, dict]:
    """VAE posterior (mean, std) per image. The VAE runs in fp32 or bf16, never fp16 (SDXL's VAE overflows)."""
    latents = {}
    for ex in examples:
        key = stable_hash("latent", sha256_file(ex.image_path), vae_identity, str(dtype))
        entry = cache.get(key)
        if entry is None:
            dist = vae.encode(image_tensor(ex.image_path).to(device, dtype)).latent_dist
            entry = {"mean": dist.mean[0].float(), "std": dist.std[0].float()}
            cache.put(key, entry)
        latents[ex.image_id] = entry
    return latents


@torch.no_grad()
def encode_caption(caption: str, tokenizers, text_encoders, device) -> dict[str, torch.Tensor]:
    """SDXL conditioning: both encoders' penultimate hidden states side by side, and the pooled projection."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(
            caption, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2][0])
        pooled = out[0][0]  # the last encoder (with projection) gives the pooled embedding
    return {"prompt_embeds": torch.cat(hidden, dim=-1).float(), "pooled": pooled.float()}


def cache_text_embeddings(examples, tokenizers, text_encoders, cache: TensorCache, identity: dict, device):
    embeddings = {}
    for caption in sorted({ex.caption for ex in examples}):
        key = stable_hash("text", caption, identity)
        entry = cache.get(key)
        if entry is None:
            entry = encode_caption(caption, tokenizers, text_encoders, device)
            cache.put(key, entry)
        embeddings[caption] = entry
    return embeddings


def micro_batch_schedule(
    examples: list[Example], micro_batch_size: int, epochs: int, repeats: int, seed: int
) -> list[list[int]]:
    """Every micro-batch of the whole run, in order. Each holds images of one bucket (one tensor shape).

    Deterministic from the seed, so a resumed run sees the same batches in the same order.
    """
    schedule = []
    for epoch in range(epochs):
        rng = random.Random(stable_hash(seed, epoch))
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, ex in enumerate(examples):
            by_bucket.setdefault(ex.bucket, []).extend([index] * repeats)
        batches = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            rng.shuffle(indices)
            batches += [indices[i : i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]
        rng.shuffle(batches)
        schedule += batches
    return schedule
