"""Caption: a vision-language model describes each cropped training image; the name becomes the subject.

Raw answers are cached per (image, crop, model, revision, prompt, generation settings): adding photos
captions only the new ones, and a new name or post-processing rule re-finishes captions without
running the model again.
"""

from __future__ import annotations

import logging
import os

from PIL import Image

from captioners import clip_token_counter, finish_caption, load_captioner
from captioners.postprocess import POSTPROCESS_VERSION
from lorapipe.config import CaptionConfig
from lorapipe.fsutil import stable_hash
from lorapipe.item_cache import ItemCache
from lorapipe.manifest import ImageRecord, read_manifest
from lorapipe.workspace import Workspace
from tasks.stage import code_version, finish_manifest_stage, manifest_digest, stage_key, stage_task

log = logging.getLogger("lorapipe.caption")

CLIP_MAX_TOKENS = 75


def raw_caption_key(record: ImageRecord, config: CaptionConfig) -> str:
    """What a model's answer depends on (the name and post-processing do not: they are applied after)."""
    where = config.api_base_url.rstrip("/") if config.backend == "openai" else config.quantization
    return ItemCache.key(
        record.id, record.crop, record.bucket, config.backend, config.model, config.revision, where,
        config.prompt, config.max_new_tokens,
    )


def api_key(config: CaptionConfig) -> str | None:
    """From a Prefect Secret block when one is named, else from the environment. Never logged."""
    if config.api_key_secret:
        from prefect.blocks.system import Secret

        return Secret.load(config.api_key_secret).get()
    return os.environ.get(config.api_key_env)


def open_captioner(config: CaptionConfig):
    if config.backend == "openai":
        return load_captioner(
            "openai", config.model, base_url=config.api_base_url, api_key=api_key(config),
            max_new_tokens=config.max_new_tokens, concurrency=config.api_concurrency,
            timeout_seconds=config.api_timeout_seconds, max_retries=config.api_max_retries,
        )
    return load_captioner(
        "transformers", config.model, revision=config.revision, device=config.device, batch_size=config.batch_size,
        max_new_tokens=config.max_new_tokens, quantization=config.quantization,
        trust_remote_code=config.trust_remote_code,
    )


def caption_records(
    records: list[ImageRecord], ws: Workspace, config: CaptionConfig, name: str, tokenizer_from: str
) -> tuple[list, dict]:
    cache = ItemCache(ws.cache, "captions")
    keys = {i: raw_caption_key(r, config) for i, r in enumerate(records) if r.kept}
    raw = {i: entry["raw"] for i, key in keys.items() if (entry := cache.get(key)) is not None}
    todo = [i for i in keys if i not in raw]
    if todo:
        log.info("captioning %d images with %s (%d cached)", len(todo), config.model, len(raw))
        captioner = open_captioner(config)
        try:
            for start in range(0, len(todo), config.batch_size):
                chunk = todo[start : start + config.batch_size]
                images = [Image.open(ws.path(records[i].image_path)).convert("RGB") for i in chunk]
                for i, answer in zip(chunk, captioner.describe(images, config.prompt)):
                    raw[i] = answer
                    cache.put(keys[i], {"raw": answer, **captioner.identity})  # saved as we go: a crash keeps them
        finally:
            captioner.close()

    count_tokens = clip_token_counter(tokenizer_from) if keys else None
    caption_by = {
        "backend": config.backend,
        "model": config.model,
        "revision": config.revision,
        **({"base_url": config.api_base_url} if config.backend == "openai" else {}),
        "prompt_sha256": stable_hash(config.prompt)[:12],
        "postprocess_version": POSTPROCESS_VERSION,
    }
    out = list(records)
    for i in keys:
        text = finish_caption(raw[i], name, config.class_word, count_tokens, CLIP_MAX_TOKENS)
        out[i] = out[i].model_copy(update={"caption": text, "caption_by": caption_by, "review": None})
    return out, {"computed": len(todo), "reused": len(keys) - len(todo), "captions": len(keys)}


CODE = code_version(__name__, "captioners")


def caption_key(manifest: str, workspace: str, config: CaptionConfig, name: str, tokenizer_from: str) -> str:
    return stage_key("caption", CODE, manifest_digest(manifest), workspace, config, name, tokenizer_from)


def run_caption(manifest: str, workspace: str, config: CaptionConfig, name: str, tokenizer_from: str) -> dict:
    ws = Workspace.at(workspace)
    records, stats = caption_records(read_manifest(manifest), ws, config, name, tokenizer_from)
    key = caption_key(manifest, workspace, config, name, tokenizer_from)
    return finish_manifest_stage(ws, "caption", key, records, stats)


# The in-process VLM holds the GPU: the tag lets a Prefect concurrency limit keep GPU stages apart.
caption_task = stage_task(run_caption, caption_key, name="caption", tags=["gpu"])
