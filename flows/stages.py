"""Each stage's Prefect task and its arguments, built from the one config, for the flows and the CLI.

`lorapipe dedup WS` runs the `stage` flow below: one stage as a one-task flow, so a stage run alone is
cached like the pipeline's and shows up in the Prefect UI when PREFECT_API_URL points at a server
(ephemeral mode otherwise: no server needed). `lorapipe caption WS` sends captioning to the cluster
`scale_out` names first, as the pipeline does (flows/fanout.py).
"""

from __future__ import annotations

import importlib
from typing import Literal

from prefect import flow

from flows.checks import check_before_stages
from flows.fanout import fan_out_captions
from lorapipe.config import PipelineConfig
from lorapipe.workspace import Workspace, slugify
from tasks.stage import call_stage

# Each stage's module is imported when the stage runs: `lorapipe dedup WS` loads neither torch nor the
# trainer (seconds of a cached stage command on 2 cores).

Stage = Literal["collect", "validate", "dedup", "crop", "caption", "review", "probe", "train", "export", "evaluate"]

# Which stage's manifest a stage reads (collect reads the sources; evaluate reads the exported LoRA).
STAGE_INPUT = {"validate": "collect", "dedup": "validate", "crop": "dedup", "caption": "crop", "review": "caption",
               "probe": "review", "train": "review", "export": "review"}


def stage_call(stage: Stage, config: PipelineConfig, ws: Workspace, manifest: str | None = None, **extra):
    """(task, keyword arguments) for one stage; `extra` carries what only the flow knows (a train result)."""
    common = {"workspace": str(ws.root)}
    d = config.dataset
    if stage == "collect":
        from tasks.collect import collect_task, resolve_sources

        return collect_task, {"images": resolve_sources(config.images), "config": d.collect, **common}
    if stage in ("validate", "dedup", "crop"):
        task = getattr(importlib.import_module(f"tasks.{stage}"), f"{stage}_task")
        return task, {"manifest": manifest, "config": getattr(d, "validate_" if stage == "validate" else stage),
                      **common}
    if stage in ("caption", "review"):
        task = getattr(importlib.import_module(f"tasks.{stage}"), f"{stage}_task")
        if stage == "caption" and config.caption.backend != "transformers":
            task = task.with_options(tags=["caption-api"])  # a remote server's captions need no GPU slot
        return task, {"manifest": manifest, "config": getattr(config, stage), "name": config.name,
                      "tokenizer_from": config.train.tokenizer_source, **common}
    if stage == "probe":
        from tasks.probe import probe_task

        return probe_task, {"manifest": manifest, "train": config.train, "probe": config.probe, "name": config.name,
                            "resolution": config.dataset.crop.resolution, **common}
    if stage == "train":
        from tasks.train import train_task

        return train_task, {"manifest": manifest, "config": config.train, "name": config.name,
                            "crop": config.dataset.crop, **common}
    if stage == "export":
        from tasks.export import export_task

        train = extra["train"]
        return export_task, {"lora_file": train["lora_file"], "manifest": manifest, "name": config.name,
                             "train_result": train, "train_config": config.train,
                             "resolution": config.dataset.crop.resolution,
                             "update_latest": extra.get("update_latest", True), **common}
    if stage == "evaluate":
        from tasks.evaluate import evaluate_task

        return evaluate_task, {"lora_file": extra["lora_file"], "config": config.evaluate, "train": config.train,
                               "name": config.name, "resolution": config.dataset.crop.resolution,
                               "manifest": manifest or extra.get("manifest"), **common}
    raise ValueError(f"unknown stage {stage!r}")


def run_stage(stage: Stage, config: PipelineConfig, ws: Workspace, manifest: str | None = None,
              **extra) -> tuple[dict, bool]:
    task, kwargs = stage_call(stage, config, ws, manifest, **extra)
    result, cached = call_stage(task, ws, **kwargs)
    if stage == "export" and extra.get("update_latest", True):  # loras/<name>.safetensors: this export's, cached or not
        from tasks.export import publish_latest

        publish_latest(result, config.train.keep_lora_versions)
    return result, cached


class MissingInput(ValueError):
    """A stage was asked for before the stage it reads from has run."""


def input_for(stage: Stage, ws: Workspace, config: PipelineConfig) -> tuple[str | None, dict]:
    """The manifest (and extras) a stage run alone reads: the latest output of the stage before it."""
    if stage == "collect":
        return None, {}
    if stage == "evaluate":
        lora = ws.loras / f"{slugify(config.name)}.safetensors"
        if not lora.exists():
            raise MissingInput(f"{lora} does not exist: run `lorapipe train` first")
        reviewed = ws.latest_manifest("review")  # the person's photos, to measure identity against
        return (str(reviewed) if reviewed.exists() else None), {"lora_file": str(lora)}
    path = ws.latest_manifest(STAGE_INPUT[stage])
    if not path.exists():
        raise MissingInput(f"{path} does not exist: run `lorapipe {STAGE_INPUT[stage]}` first")
    if stage == "export":
        from tasks.probe import decided, recorded_decision
        from tasks.train import trained_run

        probe = recorded_decision(ws, str(path), config)  # train_text_encoders: auto, as the probe decided
        train_config = decided(config, probe).train if probe else config.train
        train = trained_run(str(path), str(ws.root), train_config, config.name, config.dataset.crop)
        if train is None:
            raise MissingInput(f"no finished training for {path} with these settings: run `lorapipe train` first")
        return str(path), {"train": train}
    return str(path), {}


def reviewed_manifest(config: PipelineConfig, ws: Workspace) -> str:
    """The review stage run again on the latest captions, for a training started on its own (`lorapipe train`,
    the train deployment, `lorapipe compare-ranks`): captions a person edited in images/*.txt since the last review
    are read, so a LoRA is never trained on text that differs from those files. Cached when nothing changed."""
    captioned = ws.latest_manifest("caption")
    if not captioned.exists():
        return input_for("train", ws, config)[0]
    return run_stage("review", config, ws, str(captioned))[0]["manifest"]


@flow(name="stage", flow_run_name="{stage}")
def stage_flow(stage: Stage, config: PipelineConfig) -> dict:
    """One stage on a workspace, reading the previous stage's latest manifest (`lorapipe <stage> WS`)."""
    ws = check_before_stages(config, [stage, "export"] if stage == "train" else [stage])
    manifest, extra = input_for(stage, ws, config)
    if stage == "train":  # captions edited in images/*.txt since the last review count
        manifest = reviewed_manifest(config, ws)
    if stage in ("train", "export"):  # the probe decides train_text_encoders: auto (cached after its first run)
        from tasks.probe import decided, decision_summary

        probe, _ = run_stage("probe", config, ws, manifest)
        config = decided(config, probe)
        if stage == "export":
            extra["train"] = {**extra["train"], "text_encoders": decision_summary(probe)}
    fanned = fan_out_captions(ws, manifest, config) if stage == "caption" else None  # scale_out, as the pipeline
    result, cached = run_stage(stage, config, ws, manifest, **extra)
    if fanned:
        result = {**result, "fan_out": fanned}
    if stage == "train":  # what users load comes from export: `lorapipe train` gives them a file
        result["text_encoders"] = decision_summary(probe)
        exported, _ = run_stage("export", config, ws, manifest, train=result)
        result = {**result, "lora": exported["lora"], "diffusers": exported["diffusers"],
                  "version": exported["version"]}
    return {**result, "cached": cached}
