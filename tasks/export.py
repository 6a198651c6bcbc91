"""Export: the LoRA as the files users load, with lineage metadata, under loras/.

`<name>.safetensors` is kohya format (ComfyUI, A1111, Forge; diffusers loads it too);
`<name>.diffusers.safetensors` is diffusers format. Both also keep a copy named by the run's key.
"""

from __future__ import annotations

import importlib.metadata
import logging

from lorapipe.config import TrainConfig
from lorapipe.fsutil import atomic_copy, sha256_file
from lorapipe.manifest import read_manifest
from lorapipe.workspace import Workspace, slugify
from tasks.stage import code_version, stage_key, stage_task
from trainer.export import export_diffusers_lora, export_kohya_lora, kohya_metadata
from trainer.models import is_single_file

log = logging.getLogger("lorapipe.export")

VERSIONED = ["lorapipe", "torch", "diffusers", "peft", "transformers", "accelerate", "prefect"]


def lineage(records, name: str, train_result: dict, train_config: TrainConfig) -> dict:
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
        "train_config": train_config.model_dump(mode="json"),
        "steps": train_result.get("steps"),
        "final_loss": train_result.get("final_loss"),
        # Why the text encoders trained or stayed frozen (the probe stage's decision and numbers).
        "text_encoders": train_result.get("text_encoders"),
        "versions": versions,
    }


def unet_layers_per_block(config: TrainConfig) -> int:
    """The SGM block numbering depends on it (2 for SDXL); single files are SDXL by definition here."""
    source = config.base_model
    if is_single_file(config.base_model):
        if not config.base_model_config:
            return 2
        source = config.base_model_config
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.load_config(source, subfolder="unet", revision=config.revision)
    return int(unet["layers_per_block"])


CODE = code_version(__name__, "trainer.export", "trainer.kohya")


def export_key(lora_file: str, manifest: str, workspace: str, name: str, train_result: dict,
               train_config: TrainConfig, resolution: int, update_latest: bool = True) -> str:
    return stage_key("export", CODE, sha256_file(lora_file), sha256_file(manifest), workspace, name, train_config,
                     resolution, update_latest, train_result.get("text_encoders"))


def run_export(lora_file: str, manifest: str, workspace: str, name: str, train_result: dict,
               train_config: TrainConfig, resolution: int, update_latest: bool = True) -> dict:
    """`update_latest`: also copy to `<name>.safetensors` (off for the rank comparison's extra LoRAs)."""
    ws = Workspace.at(workspace)
    key = export_key(lora_file, manifest, workspace, name, train_result, train_config, resolution, update_latest)
    records = [r for r in read_manifest(manifest) if r.review == "approved"]
    facts = lineage(records, name, train_result, train_config)
    stem = f"{slugify(name)}-{key[:8]}"
    diffusers_file = export_diffusers_lora(lora_file, ws.loras / f"{stem}.diffusers.safetensors", facts)
    metadata = kohya_metadata(train_config, train_result, name, [r.caption for r in records], resolution, facts)
    kohya_file = export_kohya_lora(lora_file, ws.loras / f"{stem}.safetensors", metadata, train_config.alpha,
                                   unet_layers_per_block(train_config))
    latest = kohya_file
    if update_latest:
        latest = atomic_copy(kohya_file, ws.loras / f"{slugify(name)}.safetensors")
        atomic_copy(diffusers_file, ws.loras / f"{slugify(name)}.diffusers.safetensors")
    log.info("LoRA written to %s (kohya, %.1f MB) and %s", kohya_file, kohya_file.stat().st_size / 1e6,
             diffusers_file.name)
    return {
        "stage": "export",
        "key": key,
        "lora": str(kohya_file),
        "diffusers": str(diffusers_file),
        "latest": str(latest),
        "size_bytes": kohya_file.stat().st_size,
        "outputs": [str(kohya_file), str(diffusers_file)],
    }


export_task = stage_task(run_export, export_key, name="export")
