"""The flows: `dataset` (collect → review), `train` (train → export → evaluate), `pipeline` (both).

Flow parameters are the pydantic config models, so the Prefect UI shows them as a form. Captions that wait
for a person are asked about by the run a person started (flows/review.py): the `dataset` run when it was
started alone, else the `pipeline` (or nightly) run around it, between the dataset and the training.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.artifacts import publish_dataset, publish_training
from flows.checks import ALL_STAGES, DATASET_STAGES, TRAIN_STAGES, check_before_stages
from flows.fanout import fan_out_captions
from flows.review import ReviewTimedOut, failed_for, settle_review
from flows.stages import reviewed_manifest, run_stage
from flows.summary import summary_rows
from lorapipe.config import PipelineConfig
from lorapipe.fsutil import atomic_write_json
from lorapipe.retrain import record_trained, training_fingerprint, training_inputs
from lorapipe.workspace import Workspace
from tasks.probe import decided, decision_summary


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
    # The serving policy, the sources, the workspace and the models, before any stage: one line if not.
    ws = check_before_stages(config, DATASET_STAGES)
    atomic_write_json(ws.root / "config.json", config.model_dump(mode="json", by_alias=True))
    stages: dict = {}
    result = _record(stages, "collect", *run_stage("collect", config, ws))
    collected = result["manifest"]
    for stage in ("validate", "dedup", "crop"):
        result = _record(stages, stage, *run_stage(stage, config, ws, result["manifest"]))
    if fanned := fan_out_captions(ws, result["manifest"], config):
        stages["caption-fan-out"] = {"cached": False, "stats": fanned}
    result = _record(stages, "caption", *run_stage("caption", config, ws, result["manifest"]))
    captioned = result["manifest"]
    result = _record(stages, "review", *run_stage("review", config, ws, captioned))
    publish_dataset(config.name, result["manifest"], stages)  # before any wait: the reviewer sees the caption table
    try:
        # asks only when this run is the one a person started
        result = settle_review(config, ws, result, captioned, stages)
    except ReviewTimedOut as err:
        return failed_for(err)
    return {"workspace": str(ws.root), "manifest": result["manifest"], "collected": collected, "captioned": captioned,
            "stages": stages}


@flow(name="train")
def train_flow(config: PipelineConfig, manifest: str | None = None) -> dict:
    """Train a LoRA on a reviewed manifest, export it, and render samples with and without it.

    Args:
        config: The pipeline's settings (the workspace to train from, and the recipe)
        manifest: A reviewed manifest; empty: the workspace's captions reviewed again (captions edited in
            WORKSPACE/images/*.txt since the last review count)
    """
    ws = check_before_stages(config, TRAIN_STAGES, manifest)  # policy, models: one line before any stage
    if manifest is None:  # the review stage again: captions edited in images/*.txt since then count
        manifest = reviewed_manifest(config, ws)
    stages: dict = {}
    # train_text_encoders: auto → the probe renders the name with the base model and decides.
    probe = _record(stages, "probe", *run_stage("probe", config, ws, manifest))
    config = decided(config, probe)
    train = _record(stages, "train", *run_stage("train", config, ws, manifest))
    train["text_encoders"] = decision_summary(probe)  # into the LoRA's metadata
    export = _record(stages, "export", *run_stage("export", config, ws, manifest, train=train))
    evaluate = _record(stages, "evaluate", *run_stage("evaluate", config, ws, manifest, lora_file=export["lora"]))
    publish_training(config.name, train, export, evaluate, stages, probe)
    return {"train": train, "export": export, "evaluate": evaluate, "probe": probe, "stages": stages}


@flow(name="pipeline")
def pipeline(config: PipelineConfig) -> dict:
    """Photos of a person in, a LoRA out: the dataset flow, then the train flow."""
    try:
        return build_lora(config)
    except ReviewTimedOut as err:
        return failed_for(err)


def build_lora(config: PipelineConfig) -> dict:
    """The pipeline's steps, in whichever flow a person started (`pipeline`, or the nightly retrain)."""
    check_before_stages(config, ALL_STAGES)  # a missing model fails now, not after the CPU stages
    dataset = dataset_flow(config)
    ws = Workspace.at(dataset["workspace"])
    review = {"manifest": dataset["manifest"], "stats": dataset["stages"]["review"]["stats"]}
    dataset["manifest"] = settle_review(config, ws, review, dataset["captioned"], dataset["stages"])["manifest"]
    trained = train_flow(config, dataset["manifest"])
    result = {
        "name": config.name,
        "workspace": dataset["workspace"],
        "manifest": dataset["manifest"],
        "lora": trained["export"]["lora"],
        "lora_latest": trained["export"]["lora"],  # one name: loras/<name>.safetensors
        "lora_diffusers": trained["export"]["diffusers"],
        "lora_bytes": trained["export"]["size_bytes"],
        "samples": trained["evaluate"]["samples"],
        "mean_abs_difference": trained["evaluate"]["mean_abs_difference"],
        "evaluate": trained["evaluate"],
        "text_encoders": decision_summary(trained["probe"]),
        "steps": trained["train"]["steps"],
        "final_loss": trained["train"]["final_loss"],
        "stages": {**dataset["stages"], **trained["stages"]},
    }
    logger = get_run_logger()
    for label, value in summary_rows(result):  # the table `lorapipe run` prints, in this run's logs
        logger.info("%s: %s", label, value)
    # What this LoRA was trained from: the nightly retrain compares against it (lorapipe/retrain.py).
    inputs = training_inputs(ws, dataset["collected"], config)
    record_trained(ws, training_fingerprint(ws, dataset["collected"], config, inputs),
                   {k: result[k] for k in ("lora", "lora_latest", "steps", "final_loss", "samples")}, inputs)
    return result
