"""The flows: `dataset` (collect → review), `train` (train → export → evaluate), `pipeline` (both).

Flow parameters are the pydantic config models, so the Prefect UI shows them as a form.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from lorapipe.config import PipelineConfig
from lorapipe.fsutil import atomic_write_json
from lorapipe.workspace import Workspace
from tasks.caption import caption_task
from tasks.collect import collect_task, resolve_sources
from tasks.crop import crop_task
from tasks.dedup import dedup_task
from tasks.evaluate import evaluate_task
from tasks.export import export_task
from flows.review import ask_a_person
from tasks.review import record_decisions_task, review_task
from tasks.stage import call_stage
from tasks.train import train_task
from tasks.validate import validate_task


def _record(stages: dict, name: str, result: dict, cached: bool) -> dict:
    stats = result.get("stats") or result.get("cache") or {}
    stages[name] = {"cached": cached, "stats": stats}
    if cached:
        get_run_logger().info("%s: unchanged input, re-used the cached result", name)
    else:
        get_run_logger().info("%s: ran %s", name, stats)
    return result


@flow(name="dataset")
def dataset_flow(config: PipelineConfig) -> dict:
    """Collect, validate, dedup, crop, caption and review: a workspace of approved training images."""
    ws = Workspace.at(config.workspace_path())
    atomic_write_json(ws.root / "config.json", config.model_dump(mode="json", by_alias=True))
    d, common, stages = config.dataset, {"workspace": str(ws.root)}, {}
    tokenizer_from = config.train.tokenizer_source

    result = _record(stages, "collect", *call_stage(
        collect_task, ws, images=resolve_sources(config.images), config=d.collect, **common))
    result = _record(stages, "validate", *call_stage(
        validate_task, ws, manifest=result["manifest"], config=d.validate_, **common))
    result = _record(stages, "dedup", *call_stage(dedup_task, ws, manifest=result["manifest"], config=d.dedup, **common))
    result = _record(stages, "crop", *call_stage(crop_task, ws, manifest=result["manifest"], config=d.crop, **common))
    result = _record(stages, "caption", *call_stage(
        caption_task, ws, manifest=result["manifest"], config=config.caption, name=config.name,
        tokenizer_from=tokenizer_from, **common))
    review = {"manifest": result["manifest"], "config": config.review, "name": config.name,
              "tokenizer_from": tokenizer_from, **common}
    result = _record(stages, "review", *call_stage(review_task, ws, **review))
    if result["stats"]["pending"] and config.review.approval != "auto":
        decision = ask_a_person(ws, result["manifest"], config.review)
        if decision:
            record_decisions_task(manifest=result["manifest"], workspace=str(ws.root), decision=decision)
            result = _record(stages, "review", *call_stage(review_task, ws, **review))
    return {"workspace": str(ws.root), "manifest": result["manifest"], "stages": stages}


@flow(name="train")
def train_flow(config: PipelineConfig, manifest: str) -> dict:
    """Train a LoRA on a reviewed manifest, export it, and render samples with and without it."""
    ws = Workspace.at(config.workspace_path())
    common, stages = {"workspace": str(ws.root)}, {}
    train = _record(stages, "train", *call_stage(train_task, ws, manifest=manifest, config=config.train,
                                                 name=config.name, **common))
    export = _record(stages, "export", *call_stage(
        export_task, ws, lora_file=train["lora_file"], manifest=manifest, name=config.name, train_result=train,
        train_config=config.train, resolution=config.dataset.crop.resolution, **common))
    evaluate = _record(stages, "evaluate", *call_stage(
        evaluate_task, ws, lora_file=export["lora"], config=config.evaluate, train=config.train, name=config.name,
        resolution=config.dataset.crop.resolution, **common))
    return {"train": train, "export": export, "evaluate": evaluate, "stages": stages}


@flow(name="pipeline")
def pipeline(config: PipelineConfig) -> dict:
    """Photos of a person in, a LoRA out: the dataset flow, then the train flow."""
    dataset = dataset_flow(config)
    trained = train_flow(config, dataset["manifest"])
    return {
        "name": config.name,
        "workspace": dataset["workspace"],
        "manifest": dataset["manifest"],
        "lora": trained["export"]["lora"],
        "lora_latest": trained["export"]["latest"],
        "lora_diffusers": trained["export"]["diffusers"],
        "lora_bytes": trained["export"]["size_bytes"],
        "samples": trained["evaluate"]["samples"],
        "mean_abs_difference": trained["evaluate"]["mean_abs_difference"],
        "steps": trained["train"]["steps"],
        "final_loss": trained["train"]["final_loss"],
        "stages": {**dataset["stages"], **trained["stages"]},
    }
