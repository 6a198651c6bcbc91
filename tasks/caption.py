"""Caption: a vision-language model describes each cropped training image; the name becomes the subject.

Raw answers are cached per (image, crop, model, revision, prompt, generation settings): adding photos
captions only the new ones, and a new name or post-processing rule re-finishes captions without
running the model again.

Each image succeeds or fails on its own. An image the captioner gave no usable caption (a refusal, a content
filter, an empty answer, a request the server rejected) keeps its record with an empty caption and its reason
in `caption_error`, for the review stage to flag; its answer is not cached, so the next run asks again. The
stage finishes the other images and succeeds with a warning and a count, unless every image it asked failed
for the same permanent reason, or the captioner cannot caption at all (a rejected key, no quota, a model
without image input): then it fails with one line and keeps the answers it had.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image
from prefect import task
from prefect.cache_policies import NO_CACHE

from captioners import Answer, CaptionerStopped, clip_token_counter, finish_caption, load_captioner
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
    # What the server is sent, when set (unset keeps the keys, and so the answers, of earlier versions).
    sent = [v for v in (config.api_image_max_side, config.api_image_detail) if v is not None]
    return ItemCache.key(
        record.id, record.crop, record.bucket, config.backend, config.model, config.revision, where,
        config.prompt, config.max_new_tokens, *(sent if config.backend == "openai" else []),
    )


class FailureLog:
    """Images a captioner was asked about and gave no usable caption, by answer key.

    The answer cache never holds them, so the next run asks again. This log tells the caption stage two
    things: an image failed before (so the stage's own cached result must not be reused: it has asking to
    do), and what a fan-out's workers were told in this run ("fresh" entries), so it is not asked twice.
    """

    def __init__(self, ws: Workspace):
        self.store = ItemCache(ws.cache, "caption-failures")

    def put(self, key: str, answer: Answer, fresh: bool) -> None:
        """`fresh`: asked by a fan-out's worker, for the caption stage of this run to take as it is."""
        self.store.put(key, {"error": answer.error, "permanent": answer.permanent, "fresh": fresh})

    def has(self, key: str) -> bool:
        return self.store.get(key) is not None

    def fresh(self, key: str) -> Answer | None:
        entry = self.store.get(key)
        return Answer(error=entry["error"], permanent=entry["permanent"]) if entry and entry["fresh"] else None




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
            image_max_side=config.api_image_max_side, image_detail=config.api_image_detail,
        )
    check_model_source(config.model)  # no pickle weights, by name
    return load_captioner(
        "transformers", config.model, revision=config.revision, device=config.device, batch_size=config.batch_size,
        max_new_tokens=config.max_new_tokens, quantization=config.quantization,
        trust_remote_code=config.trust_remote_code,
    )


@dataclass
class Asked:
    """The model's answers for kept records (by index): cached or new, failures, and which were asked now."""

    raw: dict[int, str] = field(default_factory=dict)
    failures: dict[int, Answer] = field(default_factory=dict)
    computed: list[int] = field(default_factory=list)


def raw_captions(records: list[ImageRecord], ws: Workspace, config: CaptionConfig, progress_key: str | None = None,
                 skip: frozenset[int] = frozenset(), fan_out: bool = False) -> Asked:
    """The model's answer for every kept record, from the per-image cache or the model (`skip`: not asked).

    Usable answers are cached as they come; failures go to the FailureLog (fresh when asked by a fan-out's
    worker). When the captioner stops (CaptionerStopped), what it answered before is kept and the error raised.
    """
    cache, failure_log = ItemCache(ws.cache, "captions"), FailureLog(ws)
    keys = {i: raw_caption_key(r, config) for i, r in enumerate(records) if r.kept}
    asked = Asked(raw={i: entry["raw"] for i, key in keys.items() if (entry := cache.get(key)) is not None})
    asked.computed = [i for i in keys if i not in asked.raw and i not in skip]
    if not asked.computed:
        return asked
    log.info("captioning %d images with %s (%d cached)", len(asked.computed), config.model, len(asked.raw))
    captioner = open_captioner(config)

    def keep(i: int, answer: Answer) -> None:
        if answer.ok:
            asked.raw[i] = answer.text
            cache.put(keys[i], {"raw": answer.text, **captioner.identity})  # saved as we go: a crash keeps them
        else:
            asked.failures[i] = answer
            failure_log.put(keys[i], answer, fresh=fan_out)

    started = time.monotonic()  # after loading: the rate (and so the ETA) is the model's, not the disk's
    todo = asked.computed
    try:
        with StageProgress("caption", len(todo), "images", key=progress_key) as progress:
            for start in range(0, len(todo), captioner.chunk_size):
                chunk = todo[start : start + captioner.chunk_size]
                images = [Image.open(ws.path(records[i].image_path)).convert("RGB") for i in chunk]
                try:
                    answers = captioner.describe(images, config.prompt)
                except CaptionerStopped as stopped:
                    for i, answer in zip(chunk, stopped.answers):
                        if answer is not None:
                            keep(i, answer)
                    raise
                for i, answer in zip(chunk, answers):
                    keep(i, answer)
                done = start + len(chunk)
                rate = done / (time.monotonic() - started)
                progress.update(done, speed=f"{rate:.2f} images/s", eta_seconds=(len(todo) - done) / rate)
    finally:
        captioner.close()
    return asked


def fail_if_nothing_could_caption(asked: int, failures: dict[int, Answer]) -> None:
    """Every image asked failed for one and the same permanent reason: the setup, not the images, is wrong."""
    reasons = {f.error for f in failures.values()}
    if asked and len(failures) == asked and len(reasons) == 1 and all(f.permanent for f in failures.values()):
        raise UserError(f"caption: every image failed: {reasons.pop()}")


def warn_failures(failures: dict[int, Answer], total: int) -> None:
    if failures:
        reasons = Counter(f.error for f in failures.values()).most_common(3)
        log.warning("caption: %d of %d images got no usable caption (%s); they wait for a person in review and are "
                    "asked again on the next run", len(failures), total,
                    "; ".join(f"{n}x {reason[:200]}" for reason, n in reasons))


def caption_records(
    records: list[ImageRecord], ws: Workspace, config: CaptionConfig, name: str, tokenizer_from: str
) -> tuple[list, dict]:
    keys = [i for i, r in enumerate(records) if r.kept]
    # A fan-out in this run already asked these and got no caption: not asked twice.
    cache, failure_log = ItemCache(ws.cache, "captions"), FailureLog(ws)
    answer_keys = {i: raw_caption_key(records[i], config) for i in keys}
    handed = {i: f for i, key in answer_keys.items() if cache.get(key) is None and (f := failure_log.fresh(key))}
    asked = raw_captions(records, ws, config, progress_key=f"{slugify(name)}-caption-progress",
                         skip=frozenset(handed))
    for i, failure in handed.items():
        failure_log.put(answer_keys[i], failure, fresh=False)  # taken: the next run asks again
    failures = {**handed, **asked.failures}
    fail_if_nothing_could_caption(len(asked.computed) + len(handed), failures)
    warn_failures(failures, len(keys))

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
        if i in failures:
            update = {"caption": "", "caption_error": failures[i].error}
        else:
            text = finish_caption(asked.raw[i], name, config.class_word, count_tokens, CLIP_MAX_TOKENS)
            update = {"caption": text, "caption_error": None}
        out[i] = out[i].model_copy(update={**update, "caption_by": caption_by, "review": None})
    computed = len(asked.computed)
    return out, {"computed": computed, "reused": len(keys) - computed - len(handed), "captions": len(keys),
                 "failed": len(failures)}


CODE = code_version(__name__, "captioners")


def caption_key(manifest: str, workspace: str, config: CaptionConfig, name: str, tokenizer_from: str) -> str:
    # Images that failed before are asked again: a stage with such images is never taken from the cache.
    again = [uuid.uuid4().hex] if failed_before(manifest, workspace, config) else []
    return stage_key("caption", CODE, manifest_digest(manifest), workspace, config, name, tokenizer_from, *again)


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


def failed_before(manifest: str, workspace: str, config: CaptionConfig) -> bool:
    """Some kept image has no cached answer because a captioner was asked and gave no usable caption."""
    records = {r.id: r for r in read_manifest(manifest)}
    failure_log = FailureLog(Workspace.at(workspace))
    pending = uncaptioned_ids(manifest, workspace, config)
    return any(failure_log.has(raw_caption_key(records[i], config)) for i in pending)


def run_caption_chunk(manifest: str, workspace: str, config: CaptionConfig, ids: list[str]) -> dict:
    """Caption some of a manifest's images into the per-image cache (one task of a fan-out).

    The caption stage that follows finds every answer cached and only finishes the captions.
    """
    wanted = set(ids)
    records = [r for r in read_manifest(manifest) if r.id in wanted]
    asked = raw_captions(records, Workspace.at(workspace), config, fan_out=True)
    return {"images": len(records), "computed": len(asked.computed), "failed": len(asked.failures),
            "pid": os.getpid()}


# Not tagged "gpu": the chunks run on the cluster's workers, each with its own GPU (see README, Scale-out).
# Retried only for what a retry can get past (a lost worker or connection), not a missing dependency or a
# rejected key.
caption_chunk_task = task(stage_boundary(run_caption_chunk, "caption-chunk"), name="caption-chunk",
                          cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=retry_if_transient)
