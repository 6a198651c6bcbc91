"""Export: the LoRA as the file users load (diffusers format), with lineage metadata, under loras/."""

from __future__ import annotations

import importlib.metadata
import logging

from lorapipe.fsutil import atomic_copy, sha256_file
from lorapipe.manifest import read_manifest
from lorapipe.workspace import Workspace, slugify
from tasks.stage import code_version, stage_key, stage_task
from trainer.export import export_diffusers_lora

log = logging.getLogger("lorapipe.export")

VERSIONED = ["lorapipe", "torch", "diffusers", "peft", "transformers", "prefect"]


def lineage(manifest: str, name: str, train_result: dict, train_config: dict) -> dict:
    records = [r for r in read_manifest(manifest) if r.review == "approved"]
    captioned_by = next((r.caption_by for r in records if r.caption_by), None)
    versions = {}
    for package in VERSIONED:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "name": name,
        "image_ids": [r.id for r in records],
        "captioner": captioned_by,
        "train_config": train_config,
        "steps": train_result.get("steps"),
        "final_loss": train_result.get("final_loss"),
        "versions": versions,
    }


CODE = code_version(__name__, "trainer.export")


def export_key(lora_file: str, manifest: str, workspace: str, name: str, train_result: dict, train_config: dict) -> str:
    return stage_key("export", CODE, sha256_file(lora_file), sha256_file(manifest), workspace, name, train_config)


def run_export(lora_file: str, manifest: str, workspace: str, name: str, train_result: dict, train_config: dict) -> dict:
    ws = Workspace.at(workspace)
    key = export_key(lora_file, manifest, workspace, name, train_result, train_config)
    dest = ws.loras / f"{slugify(name)}-{key[:8]}.safetensors"
    export_diffusers_lora(lora_file, dest, lineage(manifest, name, train_result, train_config))
    latest = atomic_copy(dest, ws.loras / f"{slugify(name)}.safetensors")
    log.info("LoRA written to %s (%.1f kB)", dest, dest.stat().st_size / 1e3)
    return {
        "stage": "export",
        "key": key,
        "lora": str(dest),
        "latest": str(latest),
        "size_bytes": dest.stat().st_size,
        "outputs": [str(dest)],
    }


export_task = stage_task(run_export, export_key, name="export")

