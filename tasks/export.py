"""Export: the LoRA as the files users load, with lineage metadata, under loras/.

`<name>.safetensors` is kohya format (ComfyUI, A1111, Forge; diffusers loads it too);
`<name>.diffusers.safetensors` is diffusers format. Both also keep a copy named by the run's key.
A training that took no optimizer step, or whose LoRA is all zeros (it equals the base model), is refused
before anything is written: the latest LoRA stays the last good one.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

from lorapipe.config import TrainConfig
from lorapipe.errors import UserError
from lorapipe.fsutil import atomic_copy, sha256_file
from lorapipe.manifest import read_manifest
from lorapipe.workspace import Workspace, slugify
from tasks.stage import code_version, stage_key, stage_task
from trainer.export import export_diffusers_lora, export_kohya_lora, kohya_metadata, read_lora
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


def trained_records(manifest: str, train_result: dict) -> list:
    """The records the LoRA was trained on: the train stage's manifest (re-crops, images left out) when the
    result names one, less the held-out images; else the reviewed manifest's approved records."""
    trained = set(train_result.get("image_ids") or [])
    source = train_result.get("manifest") if Path(train_result.get("manifest") or "").is_file() else manifest
    return [r for r in read_manifest(source)
            if r.kept and r.review == "approved" and (not trained or r.id in trained)]


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


def check_trained(lora_file: str, train_result: dict) -> None:
    """Refuse a LoRA no training changed: 0 optimizer steps, or every up-projection (peft's lora_B,
    kohya's lora_up; zero at initialisation) still zero.

    Raises:
        UserError: naming the file and why; nothing has been written.
    """
    if not train_result.get("steps"):
        raise UserError(f"{lora_file}: the training took 0 optimizer steps; not exported (the latest LoRA is "
                        "left as it was)")
    tensors, _ = read_lora(lora_file)
    ups = [t for k, t in tensors.items() if "lora_B" in k or "lora_up" in k]
    if not ups or all(not t.any() for t in ups):
        raise UserError(f"{lora_file}: every LoRA up-weight is zero, so it equals the base model; not exported "
                        "(the latest LoRA is left as it was)")


CODE = code_version(__name__, "trainer.export", "trainer.kohya")


def export_key(lora_file: str, manifest: str, workspace: str, name: str, train_result: dict,
               train_config: TrainConfig, resolution: int, update_latest: bool = True) -> str:
    return stage_key("export", CODE, sha256_file(lora_file), sha256_file(manifest), workspace, name, train_config,
                     resolution, update_latest, train_result.get("text_encoders"))


def run_export(lora_file: str, manifest: str, workspace: str, name: str, train_result: dict,
               train_config: TrainConfig, resolution: int, update_latest: bool = True) -> dict:
    """`update_latest`: also copy to `<name>.safetensors` (off for the rank comparison's extra LoRAs)."""
    check_trained(lora_file, train_result)
    ws = Workspace.at(workspace)
    key = export_key(lora_file, manifest, workspace, name, train_result, train_config, resolution, update_latest)
    records = trained_records(manifest, train_result)
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
