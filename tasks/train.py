"""Train: the approved images and captions of a manifest into a LoRA (trainer/ does the work)."""

from __future__ import annotations

import logging
from dataclasses import asdict

from lorapipe.config import TrainConfig
from lorapipe.manifest import ImageRecord, read_manifest
from lorapipe.workspace import Workspace
from tasks.stage import code_version, manifest_digest, stage_key, stage_task
from trainer import Example, train_lora
from trainer.loop import LORA_WEIGHTS

log = logging.getLogger("lorapipe.train")


def training_examples(records: list[ImageRecord], ws: Workspace) -> list[Example]:
    examples = []
    for r in records:
        if r.kept and r.review == "approved":
            examples.append(
                Example(
                    image_id=r.id,
                    image_path=ws.path(r.image_path),
                    caption=r.caption,
                    bucket=r.bucket_size,
                    original_size=tuple(r.original_size),
                    crop_top_left=tuple(r.crop_top_left),
                )
            )
    waiting = sum(1 for r in records if r.kept and r.review == "pending")
    if waiting:
        log.warning("%d images wait for caption review and are left out of this run", waiting)
    if not examples:
        raise ValueError(
            f"no approved captions to train on ({sum(r.kept for r in records)} images kept, {waiting} waiting for "
            "review): see review_reasons in the review manifest"
        )
    return examples


CODE = code_version(__name__, "trainer")


def train_key(manifest: str, workspace: str, config: TrainConfig) -> str:
    return stage_key("train", CODE, manifest_digest(manifest), workspace, config)


def run_train(manifest: str, workspace: str, config: TrainConfig) -> dict:
    ws = Workspace.at(workspace)
    key = train_key(manifest, workspace, config)
    run_dir = ws.runs / key[:16]
    result = train_lora(training_examples(read_manifest(manifest), ws), config, run_dir, ws.cache)
    lora_file = f"{result.lora_dir}/{LORA_WEIGHTS}"
    return {
        "stage": "train",
        "key": key,
        "run_dir": str(run_dir),
        "lora_file": lora_file,
        **{k: v for k, v in asdict(result).items() if k != "lora_dir"},
        "outputs": [lora_file],
    }


train_task = stage_task(run_train, train_key, name="train", retries=1, tags=["gpu"])
