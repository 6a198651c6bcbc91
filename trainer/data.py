"""Training data: examples, aspect buckets, the schedule of micro-batches, and the latent and
text-embedding caches.

Both caches are keyed on content: a latent on the training image's bytes, its bucket and the VAE; a
text embedding on the caption text and the encoders. An edited caption or a replaced image is never
served stale, and nothing else is recomputed.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lorapipe.buckets import merge_targets
from lorapipe.faces import center_crop, face_crop
from lorapipe.fsutil import atomic_path, sha256_file, stable_hash

log = logging.getLogger("lorapipe.train")


@dataclass(frozen=True)
class Example:
    image_id: str
    image_path: Path
    caption: str
    bucket: tuple[int, int]  # width, height the image is trained at
    original_size: tuple[int, int]  # height, width (SDXL order)
    crop_top_left: tuple[int, int]  # top, left, in pixels of the original resized to cover the bucket
    # What the crop stage protected (the face): left, top, right, bottom in pixels of the file at image_path.
    # Any later refit of the image to another bucket keeps it inside the frame, or leaves the image out.
    face: tuple[int, int, int, int] | None = None

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "image_path": str(self.image_path)}

    @classmethod
    def from_json(cls, data: dict) -> "Example":
        return cls(
            data["image_id"], Path(data["image_path"]), data["caption"], tuple(data["bucket"]),
            tuple(data["original_size"]), tuple(data["crop_top_left"]),
            tuple(data["face"]) if data.get("face") else None,
        )


# --- buckets ----------------------------------------------------------------------------------


def fit_box(size: tuple[int, int], bucket: tuple[int, int], face=None) -> tuple[int, int, int, int]:
    """The bucket-shaped box (left, top, right, bottom) of an image of `size` that is trained at `bucket`.

    Placed like the crop stage places it (lorapipe/faces.py): around the face when there is one, centred
    otherwise. The box is then resized to the bucket.
    """
    if face:
        return face_crop(size[0], size[1], bucket, face, headroom=0.0)
    return center_crop(size[0], size[1], bucket)


def holds(box, inner) -> bool:
    return box[0] <= inner[0] and box[1] <= inner[1] and inner[2] <= box[2] and inner[3] <= box[3]


def merge_small_buckets(examples: list[Example], min_images: int) -> list[Example]:
    """Move images of buckets smaller than `min_images` into the nearest bucket (by aspect) that is not.

    The image is refitted around its face (never a blind centre crop); an image whose face cannot fit the
    new bucket's frame is left out, with a warning naming it. lorapipe's train stage re-crops such images
    from their originals before this runs (tasks/train.py), so there this finds nothing to merge.
    """
    targets = merge_targets(Counter(ex.bucket for ex in examples), min_images)
    out = []
    for ex in examples:
        target = targets.get(ex.bucket)
        if target is None:
            out.append(ex)
            continue
        box = fit_box(ex.bucket, target, ex.face)  # the image file is its bucket's size
        if ex.face and not holds(box, ex.face):
            log.warning("%s: left out of training: its face does not fit a %dx%d frame (its bucket %dx%d has "
                        "fewer than %d images)", ex.image_path, *target, *ex.bucket, min_images)
            continue
        scale = target[0] / (box[2] - box[0])
        crop = (round((ex.crop_top_left[0] + box[1]) * scale), round((ex.crop_top_left[1] + box[0]) * scale))
        out.append(dataclasses.replace(ex, bucket=target, crop_top_left=crop))
    for bucket, target in sorted(targets.items()):
        log.warning("bucket %dx%d has fewer than %d images: its images are refitted to %dx%d (around their faces)",
                    *bucket, min_images, *target)
    return out


def split_holdout(examples: list[Example], count: int, min_images: int, seed: int) -> tuple[list, list]:
    """A few images kept out of training to measure held-out loss, only where the dataset can spare them."""
    if count == 0 or len(examples) < min_images:
        return examples, []
    held = set(random.Random(stable_hash("holdout", seed)).sample(range(len(examples)), count))
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


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


def group_into_steps(
    schedule: list[list[int]], effective_batch_size: int, min_micro_batches: int = 1
) -> list[list[int]]:
    """Indices into `schedule` for each optimizer step: consecutive micro-batches until the step has seen
    the effective batch. With N processes every step needs N micro-batches at least (one each).
    """
    steps, current, seen = [], [], 0
    for index, micro_batch in enumerate(schedule):
        current.append(index)
        seen += len(micro_batch)
        if seen >= effective_batch_size and len(current) >= min_micro_batches:
            steps.append(current)
            current, seen = [], 0
    if current:
        if len(current) < min_micro_batches and steps:
            steps[-1] += current
        else:
            steps.append(current)
    return steps


# --- caches -----------------------------------------------------------------------------------


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

    def stats(self) -> dict[str, int]:
        return {"computed": self.computed, "reused": self.reused}


def image_tensor(path: Path, bucket: tuple[int, int], face=None) -> torch.Tensor:
    """The image at its bucket's size as a 1x3xHxW tensor in [-1, 1], as the VAE expects.

    An image of another size (a merged bucket) is refitted with `fit_box`, around `face` if given.
    """
    img = Image.open(path).convert("RGB")
    if img.size != bucket:
        img = img.resize(bucket, Image.LANCZOS, box=fit_box(img.size, bucket, face))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)


@torch.no_grad()
def cache_latents(examples, vae, cache: TensorCache, vae_identity: dict, device, dtype) -> dict[str, dict]:
    """VAE posterior (mean, std) per image. The VAE runs in fp32 or bf16, never fp16 (SDXL's VAE overflows)."""
    latents = {}
    for ex in examples:
        key = stable_hash("latent", sha256_file(ex.image_path), ex.bucket, ex.face, vae_identity, str(dtype))
        entry = cache.get(key)
        if entry is None:
            dist = vae.encode(image_tensor(ex.image_path, ex.bucket, ex.face).to(device, dtype)).latent_dist
            entry = {"mean": dist.mean[0].float().cpu(), "std": dist.std[0].float().cpu()}
            cache.put(key, entry)
        latents[ex.image_id] = entry
    return latents


def encode_prompts(captions: list[str], tokenizers, text_encoders, device) -> dict[str, torch.Tensor]:
    """SDXL conditioning: both encoders' penultimate hidden states side by side, and the pooled projection."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder (with projection) gives the pooled embedding
    return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled": pooled}


@torch.no_grad()
def cache_text_embeddings(examples, tokenizers, text_encoders, cache: TensorCache, identity: dict, device):
    embeddings = {}
    for caption in sorted({ex.caption for ex in examples}):
        key = stable_hash("text", caption, identity)
        entry = cache.get(key)
        if entry is None:
            out = encode_prompts([caption], tokenizers, text_encoders, device)
            entry = {k: v[0].float().cpu() for k, v in out.items()}
            cache.put(key, entry)
        embeddings[caption] = entry
    return embeddings
