"""Caption: a vision-language model describes each cropped training image; the name becomes the subject.

Raw answers are cached per (image, crop, model, revision, prompt, generation settings): adding photos
captions only the new ones, and a new name or post-processing rule re-finishes captions without
running the model again.
"""

from __future__ import annotations

import logging
import os
import time

from PIL import Image
from prefect import task
from prefect.cache_policies import NO_CACHE

from captioners import clip_token_counter, finish_caption, load_captioner
from captioners.postprocess import POSTPROCESS_VERSION
from lorapipe.config import CaptionConfig
from lorapipe.errors import UserError
from lorapipe.fsutil import stable_hash
from lorapipe.item_cache import ItemCache
from lorapipe.manifest import ImageRecord, read_manifest
from lorapipe.modelfiles import check_model_source
from lorapipe.policy import api_key_problem, caption_destination_problem, current_policy
from lorapipe.workspace import Workspace, slugify
from tasks.progress import StageProgress
from tasks.stage import (code_version, finish_manifest_stage, manifest_digest, retry_if_transient, stage_key, stage_task,
                         stage_boundary)

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
    """From a Prefect Secret block when one is named, else from the environment (an empty name: no key).
    Never logged. Under a serving policy, only a variable or block the operator allowed (lorapipe/policy.py).

    Raises:
        UserError: the policy does not allow the variable or block named.
    """
    if (policy := current_policy()) is not None:
        if problem := api_key_problem(config.api_key_env, config.api_key_secret, policy):
            raise UserError(f"refused by this deployment's serving policy: {problem}")
    if config.api_key_secret:
        from prefect.blocks.system import Secret

        return Secret.load(config.api_key_secret).get()
    return os.environ.get(config.api_key_env) if config.api_key_env else None


def check_api_destination(config: CaptionConfig) -> None:
    """Under a serving policy, photos (and a key) go only where the operator allows (lorapipe/policy.py);
    checked here, where the requests are made, as well as when the run starts.

    Raises:
        UserError: the base URL is not listed and its host is not public, or a key would go to an unlisted one.
    """
    if (policy := current_policy()) is not None and (problem := caption_destination_problem(config, policy)):
        raise UserError(f"refused by this deployment's serving policy: caption.api_base_url: {problem}")


def open_captioner(config: CaptionConfig):
    if config.backend == "openai":
        check_api_destination(config)
        return load_captioner(
            "openai", config.model, base_url=config.api_base_url, api_key=api_key(config),
            max_new_tokens=config.max_new_tokens, concurrency=config.api_concurrency,
            timeout_seconds=config.api_timeout_seconds, max_retries=config.api_max_retries,
        )
    check_model_source(config.model)  # no pickle weights, by name
    return load_captioner(
        "transformers", config.model, revision=config.revision, device=config.device, batch_size=config.batch_size,
        max_new_tokens=config.max_new_tokens, quantization=config.quantization,
        trust_remote_code=config.trust_remote_code,
    )


def raw_captions(records: list[ImageRecord], ws: Workspace, config: CaptionConfig,
                 progress_key: str | None = None) -> tuple[dict[int, str], list[int]]:
    """The model's answer for every kept record, from the per-image cache or the model; (answers, computed)."""
    cache = ItemCache(ws.cache, "captions")
    keys = {i: raw_caption_key(r, config) for i, r in enumerate(records) if r.kept}
    raw = {i: entry["raw"] for i, key in keys.items() if (entry := cache.get(key)) is not None}
    todo = [i for i in keys if i not in raw]
    if not todo:
        return raw, todo
    log.info("captioning %d images with %s (%d cached)", len(todo), config.model, len(raw))
    captioner = open_captioner(config)
    started = time.monotonic()  # after loading: the rate (and so the ETA) is the model's, not the disk's
    try:
        with StageProgress("caption", len(todo), "images", key=progress_key) as progress:
            for start in range(0, len(todo), config.batch_size):
                chunk = todo[start : start + config.batch_size]
                images = [Image.open(ws.path(records[i].image_path)).convert("RGB") for i in chunk]
                for i, answer in zip(chunk, captioner.describe(images, config.prompt)):
                    raw[i] = answer
                    cache.put(keys[i], {"raw": answer, **captioner.identity})  # saved as we go: a crash keeps them
                done = start + len(chunk)
                rate = done / (time.monotonic() - started)
                progress.update(done, speed=f"{rate:.2f} images/s", eta_seconds=(len(todo) - done) / rate)
    finally:
        captioner.close()
    return raw, todo


def caption_records(
    records: list[ImageRecord], ws: Workspace, config: CaptionConfig, name: str, tokenizer_from: str
) -> tuple[list, dict]:
    keys = [i for i, r in enumerate(records) if r.kept]
    raw, todo = raw_captions(records, ws, config, progress_key=f"{slugify(name)}-caption-progress")

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


def uncaptioned_ids(manifest: str, workspace: str, config: CaptionConfig) -> list[str]:
    """Ids of kept images the per-image cache has no answer for: the work a fan-out has to share."""
    cache = ItemCache(Workspace.at(workspace).cache, "captions")
    return [r.id for r in read_manifest(manifest) if r.kept and cache.get(raw_caption_key(r, config)) is None]


def run_caption_chunk(manifest: str, workspace: str, config: CaptionConfig, ids: list[str]) -> dict:
    """Caption some of a manifest's images into the per-image cache (one task of a fan-out).

    The caption stage that follows finds every answer cached and only finishes the captions.
    """
    wanted = set(ids)
    records = [r for r in read_manifest(manifest) if r.id in wanted]
    _, computed = raw_captions(records, Workspace.at(workspace), config)
    return {"images": len(records), "computed": len(computed), "pid": os.getpid()}


# Not tagged "gpu": the chunks run on the cluster's workers, each with its own GPU (see README, Scale-out).
caption_chunk_task = task(stage_boundary(run_caption_chunk, "caption-chunk"), name="caption-chunk",
                          cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=retry_if_transient)
