"""Evaluate: the same prompts and seeds rendered without and with the LoRA, measured, in one labelled grid.

- Identity: for prompts with the name, each sample's face against the person's photos (the held-out ones
  when training kept some out), for the base model and with the LoRA (lorapipe/identity.py: dlib's
  descriptor, < 0.6 reads as the same person), with the share of samples where no face was found.
- Style pollution: for prompts without the name, how much the LoRA changes the base model's image with the
  same seed: SSIM (scikit-image; 1 = unchanged, reported as 1 − SSIM) and the mean pixel change (0-255).

Renders are cached by what makes them (model, prompt, seed, steps, size, LoRA file): the base model's
images are rendered once per workspace and shared by every LoRA compared against them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lorapipe.config import EvaluateConfig, TrainConfig
from lorapipe.fsutil import atomic_path, sha256_file, stable_hash
from lorapipe.identity import Face, IdentityStats, face_embedder, identity_stats, unavailable_stats
from lorapipe.errors import UserError
from lorapipe.item_cache import ItemCache
from lorapipe.manifest import read_manifest
from lorapipe.workspace import Workspace
from tasks.stage import code_version, stage_key, stage_task
from trainer.sampling import grid, load_pipeline, mean_abs_difference, render

log = logging.getLogger("lorapipe.evaluate")

CODE = code_version(__name__, "trainer.sampling", "lorapipe.identity", "lorapipe.plots")
RENDER_CODE = code_version("trainer.sampling")
FACE_CODE = code_version("lorapipe.identity")


@dataclass
class Sample:
    prompt: str
    seed: int

    @property
    def label(self) -> str:
        return f"{self.prompt} · seed {self.seed}"


def samples_of(prompts: list[str], name: str, seed: int, seeds: int) -> list[Sample]:
    """Every prompt ({name} filled in) with seeds seed, seed+1, ...: the same seeds for every model."""
    return [Sample(p.replace("{name}", name), seed + s) for p in prompts for s in range(seeds)]


class Renderer:
    """Renders with the base model (and a LoRA), cached on disk; the pipeline loads only on a cache miss."""

    def __init__(self, ws: Workspace, train: TrainConfig, steps: int, guidance_scale: float, size: tuple[int, int]):
        from lorapipe.devices import resolve_device
        from trainer.models import model_identity

        self.ws, self.train, self.steps, self.guidance, self.size = ws, train, steps, guidance_scale, size
        self.base_key = stable_hash(RENDER_CODE, model_identity(train.base_model, train.revision, train.vae),
                                    train.base_model_config, steps, guidance_scale, list(size),
                                    resolve_device(train.device))
        self.pipe = None
        self.lora: str | None = None

    def _pipeline(self, lora_file: str | None):
        if self.pipe is None:
            self.pipe = load_pipeline(self.train.base_model, self.train.revision, self.train.vae, self.train.device,
                                      self.train.base_model_config)
        if lora_file != self.lora:
            if self.lora is not None:
                self.pipe.unload_lora_weights()
            if lora_file is not None:
                path = Path(lora_file)
                self.pipe.load_lora_weights(str(path.parent), weight_name=path.name)
            self.lora = lora_file
        return self.pipe

    def images(self, samples: list[Sample], lora_file: str | None = None) -> list[Path]:
        """One PNG per sample, rendered now or found in WORKSPACE/cache/renders."""
        lora_hash = sha256_file(lora_file) if lora_file else None
        paths = [self.ws.cache / "renders" / stable_hash(self.base_key, lora_hash, asdict(s))[:32] for s in samples]
        paths = [p.with_suffix(".png") for p in paths]
        todo = [(s, p) for s, p in zip(samples, paths) if not p.exists()]
        if todo:
            pipe = self._pipeline(lora_file)
            rendered = render(pipe, [s.prompt for s, _ in todo], 0, self.steps, self.guidance, self.size,
                              seeds=[s.seed for s, _ in todo])
            for image, (_, path) in zip(rendered, todo):
                with atomic_path(path, suffix=".png") as tmp:
                    image.save(tmp)
        return paths


def load_images(paths: list[Path]) -> list[Image.Image]:
    out = []
    for path in paths:
        with Image.open(path) as img:
            out.append(img.convert("RGB"))
    return out


def reference_photos(ws: Workspace, manifest: str | None, train: TrainConfig, limit: int) -> tuple[list[Path], str]:
    """The person's photos to measure against: the held-out ones when training kept some out (the same
    split as the trainer's), else the training photos; at most `limit`. Also says which they are."""
    if not manifest or not Path(manifest).exists():
        return [], "none (no reviewed manifest)"
    from tasks.train import training_examples
    from trainer.data import merge_small_buckets, split_holdout

    try:
        examples = training_examples(read_manifest(manifest), ws)
    except ValueError:
        return [], "none (no approved photos)"
    examples = merge_small_buckets(examples, train.min_bucket_images)
    kept, held = split_holdout(examples, train.holdout_images, train.holdout_min_images, train.seed)
    chosen, which = (held, "held-out photos") if held else (kept, "training photos")
    return [e.image_path for e in chosen[:limit]], which


def photo_faces(ws: Workspace, photos: list[Path]) -> list[Face]:
    """Faces of the person's photos, cached per file content (WORKSPACE/cache/faces)."""
    cache = ItemCache(ws.cache, "faces")
    faces = []
    for path in photos:
        key = cache.key(FACE_CODE, sha256_file(path))
        if (hit := cache.get(key)) is None:
            with Image.open(path) as img:
                hit = asdict(face_embedder().face(img))
            cache.put(key, hit)
        faces.append(Face(hit["descriptor"], tuple(hit["box"]) if hit["box"] else None, hit["reason"]))
    return faces


def measure_identity(ws: Workspace, photos: list[Path], sample_sets: dict[str, list[Image.Image]]) -> dict:
    """{set name: IdentityStats}: each set's faces against the photos' faces; without dlib, why not."""
    from lorapipe.identity import IdentityUnavailable

    try:
        references = [f.descriptor for f in photo_faces(ws, photos) if f.found]
        embedder = face_embedder()
    except IdentityUnavailable as err:
        return {k: unavailable_stats(len(v), str(err)) for k, v in sample_sets.items()}
    out = {}
    for set_name, images in sample_sets.items():
        stats = identity_stats([embedder.face(img) for img in images], references)
        if not photos:
            stats.note = "no photos of the person to compare with"
        elif not references:
            stats.note = f"no face found in any of the person's {len(photos)} photos"
        out[set_name] = stats
    return out


def style_change(base: list[Image.Image], lora: list[Image.Image], prompts: list[str]) -> dict:
    """Style pollution over the prompts without the name: SSIM and mean pixel change, base vs LoRA."""
    if not base:
        return {"prompts": prompts, "ssim": None, "style_change": None, "pixel_change": None,
                "note": "no prompts without the name (evaluate.style_prompts is empty)"}
    pixel = mean_abs_difference(base, lora)
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        return {"prompts": prompts, "ssim": None, "style_change": None, "pixel_change": pixel,
                "note": "SSIM needs scikit-image: pip install 'lorapipe[evidence]'"}
    ssim = float(np.mean([structural_similarity(np.asarray(a), np.asarray(b), channel_axis=-1, data_range=255)
                          for a, b in zip(base, lora)]))
    return {"prompts": prompts, "ssim": ssim, "style_change": 1.0 - ssim, "pixel_change": pixel, "note": None}


def lora_facts(lora_file: str) -> dict:
    """Rank and epoch from the file's kohya metadata (empty for a file without it)."""
    from safetensors import safe_open

    try:
        with safe_open(lora_file, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:
        raise UserError(f"{lora_file}: not a readable safetensors LoRA ({err})") from None
    facts = {}
    for key, out in (("ss_network_dim", "rank"), ("ss_epoch", "epoch")):
        try:
            facts[out] = int(json.loads(meta[key]))
        except (KeyError, ValueError, TypeError):
            pass
    return facts


def describe_lora(lora_file: str) -> str:
    facts = lora_facts(lora_file)
    parts = [Path(lora_file).name] + [f"{k} {facts[k]}" for k in ("rank", "epoch") if k in facts]
    return " · ".join(parts)


def evaluate_key(lora_file: str, workspace: str, config: EvaluateConfig, train: TrainConfig, name: str,
                 resolution: int, manifest: str | None = None) -> str:
    photos = sha256_file(manifest) if manifest and Path(manifest).exists() else None
    return stage_key("evaluate", CODE, sha256_file(lora_file), workspace, config, train, name, resolution, photos)


def run_evaluate(lora_file: str, workspace: str, config: EvaluateConfig, train: TrainConfig, name: str,
                 resolution: int, manifest: str | None = None) -> dict:
    ws = Workspace.at(workspace)
    key = evaluate_key(lora_file, workspace, config, train, name, resolution, manifest)
    named = samples_of(config.prompts, name, config.seed, config.seeds)
    style = samples_of(config.style_prompts, "a person", config.seed, config.seeds)
    renderer = Renderer(ws, train, config.steps, config.guidance_scale, (resolution, resolution))
    base_paths = renderer.images(named + style)
    lora_paths = renderer.images(named + style, lora_file)
    base, lora = load_images(base_paths), load_images(lora_paths)
    n = len(named)
    photos, which = reference_photos(ws, manifest, train, config.max_reference_photos)
    identity = measure_identity(ws, photos, {"base": base[:n], "lora": lora[:n]})
    pollution = style_change(base[n:], lora[n:], [s.prompt for s in style])
    difference = mean_abs_difference(base[:n], lora[:n])
    facts = lora_facts(lora_file)
    rank = f"rank {facts['rank']}" if "rank" in facts else "the LoRA"
    dest = ws.runs / f"samples-{Path(lora_file).stem}-{key[:8]}.png"
    with atomic_path(dest, suffix=".png") as tmp:
        grid([base, lora], ["base model", f"with {rank}"], [s.label for s in named + style],
             f"{describe_lora(lora_file)} · columns: prompts with the name, then without it").save(tmp)
    log.info("samples (top: base model, bottom: with the LoRA) in %s; mean pixel change %.2f; identity %s; "
             "style change %s", dest, difference, identity["lora"].describe(), pollution["style_change"])
    return {"stage": "evaluate", "key": key, "samples": str(dest), "mean_abs_difference": difference,
            "prompts": [s.prompt for s in named], "columns": [s.label for s in named + style],
            "identity": {k: v.to_json() for k, v in identity.items()}, "references": which,
            "reference_photos": len(photos), "pollution": pollution, "lora": facts,
            "renders": {"base": [str(p) for p in base_paths], "lora": [str(p) for p in lora_paths]},
            "outputs": [str(dest), *map(str, base_paths), *map(str, lora_paths)]}


def identity_line(result: dict, which: str = "lora") -> str:
    """One line for a summary: the identity numbers of an evaluate result, or why there are none."""
    data = (result.get("identity") or {}).get(which)
    if not data:
        return "not measured"
    data = {k: v for k, v in data.items() if k in IdentityStats.__dataclass_fields__}
    return IdentityStats(**data).describe()


def pollution_line(result: dict) -> str:
    p = result.get("pollution") or {}
    if p.get("pixel_change") is None:
        return f"not measured: {p.get('note') or 'no prompts without the name'}"
    ssim = f"1 − SSIM {p['style_change']:.3g}" if p.get("style_change") is not None else p["note"]
    return f"{ssim}; mean pixel change {p['pixel_change']:.2f} / 255 (prompts without the name)"


evaluate_task = stage_task(run_evaluate, evaluate_key, name="evaluate", tags=["gpu"])
