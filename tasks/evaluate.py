"""Evaluate: fixed prompts and seeds rendered with and without the LoRA, saved as one grid image."""

from __future__ import annotations

import logging
from pathlib import Path

from lorapipe.config import EvaluateConfig, TrainConfig
from lorapipe.fsutil import atomic_path, sha256_file
from lorapipe.workspace import Workspace
from tasks.stage import code_version, stage_key, stage_task
from trainer.sampling import compare_with_and_without, grid, mean_abs_difference

log = logging.getLogger("lorapipe.evaluate")

CODE = code_version(__name__, "trainer.sampling")


def evaluate_key(lora_file: str, workspace: str, config: EvaluateConfig, train: TrainConfig, name: str,
                 resolution: int) -> str:
    return stage_key("evaluate", CODE, sha256_file(lora_file), workspace, config, train, name, resolution)


def run_evaluate(lora_file: str, workspace: str, config: EvaluateConfig, train: TrainConfig, name: str,
                 resolution: int) -> dict:
    ws = Workspace.at(workspace)
    key = evaluate_key(lora_file, workspace, config, train, name, resolution)
    prompts = [p.replace("{name}", name) for p in config.prompts]
    before, after = compare_with_and_without(
        train.base_model, lora_file, prompts, config.seed, config.steps, config.guidance_scale,
        (resolution, resolution), revision=train.revision, vae=train.vae, device=train.device,
        single_file_config=train.base_model_config,
    )
    difference = mean_abs_difference(before, after)
    dest = ws.runs / f"samples-{Path(lora_file).stem}-{key[:8]}.png"
    with atomic_path(dest, suffix=".png") as tmp:
        grid([before, after]).save(tmp)
    log.info("samples (top: base model, bottom: with the LoRA) in %s; mean pixel change %.2f", dest, difference)
    return {"stage": "evaluate", "key": key, "samples": str(dest), "mean_abs_difference": difference,
            "prompts": prompts, "outputs": [str(dest)]}


evaluate_task = stage_task(run_evaluate, evaluate_key, name="evaluate", tags=["gpu"])
