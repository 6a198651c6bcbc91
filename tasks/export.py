"""Export: the LoRA as the files users load, with lineage metadata, under loras/.

`<name>.safetensors` is kohya format (ComfyUI, A1111, Forge; diffusers loads it too);
`<name>.diffusers.safetensors` is diffusers format: the one name people use. Each export is also kept as
`versions/<name>-<key>.safetensors` (the names are hard links to it: no second copy), the newest
`train.keep_lora_versions` earlier ones beside it; older versions are pruned.
A training that took no optimizer step, or whose LoRA is all zeros (it equals the base model), is refused
before anything is written: the latest LoRA stays the last good one.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from pathlib import Path

from lorapipe.config import TrainConfig
from lorapipe.errors import UserError
from lorapipe.fsutil import atomic_link, sha256_file
from lorapipe.manifest import read_manifest
from lorapipe.workspace import Workspace, slugify
from tasks.stage import code_version, stage_key, stage_task
from trainer.export import export_diffusers_lora, export_kohya_lora, kohya_metadata, read_lora
from trainer.models import is_single_file

log = logging.getLogger("lorapipe.export")

VERSIONS = "versions"  # loras/versions/<name>-<export key>.safetensors: each export, kept by train.keep_lora_versions

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
    """`update_latest`: the export is the one `<name>.safetensors` names (off for a rank comparison's extra
    LoRAs); the caller links the name to it (`publish_latest`)."""
    check_trained(lora_file, train_result)
    ws = Workspace.at(workspace)
    key = export_key(lora_file, manifest, workspace, name, train_result, train_config, resolution, update_latest)
    records = trained_records(manifest, train_result)
    facts = lineage(records, name, train_result, train_config)
    # The export people load goes to versions/ (loras/<name>.safetensors links to it, see `publish_latest`);
    # a rank comparison's extra LoRAs stay beside the latest, named by their key, and are never pruned.
    folder = ws.loras / VERSIONS if update_latest else ws.loras
    folder.mkdir(exist_ok=True)
    stem = f"{slugify(name)}-{key[:8]}"
    diffusers_file = export_diffusers_lora(lora_file, folder / f"{stem}.diffusers.safetensors", facts)
    metadata = kohya_metadata(train_config, train_result, name, [r.caption for r in records], resolution, facts)
    kohya_file = export_kohya_lora(lora_file, folder / f"{stem}.safetensors", metadata, train_config.alpha,
                                   unet_layers_per_block(train_config))
    result = {
        "stage": "export",
        "key": key,
        "lora": str(ws.loras / f"{slugify(name)}.safetensors" if update_latest else kohya_file),
        "diffusers": str(ws.loras / f"{slugify(name)}.diffusers.safetensors" if update_latest else diffusers_file),
        "version": str(kohya_file),
        "size_bytes": kohya_file.stat().st_size,
        "outputs": [str(kohya_file), str(diffusers_file)],
    }
    log.info("LoRA written to %s (kohya, %.1f MB) and %s", result["lora"], kohya_file.stat().st_size / 1e6,
             Path(result["diffusers"]).name)
    return result


def publish_latest(result: dict, keep_versions: int) -> None:
    """Make loras/<name>.safetensors and .diffusers.safetensors the export `result` names (hard links to its
    version files: no second copy of the bytes), whether the export ran now or came from the cache; then
    prune the versions beyond the newest `keep_versions` earlier ones (`train.keep_lora_versions`).

    A pruned version's export runs again when asked for (its cached result points at missing files).
    """
    kohya_version, diffusers_version = (Path(p) for p in result["outputs"][:2])
    atomic_link(kohya_version, result["lora"])
    atomic_link(diffusers_version, result["diffusers"])
    prune_versions(kohya_version.parent, kohya_version, keep_versions)


def prune_versions(folder: Path, current: Path, keep: int) -> list[Path]:
    """Delete the exported versions in `folder` beyond the newest `keep` besides `current`; returns them."""
    stem = current.name.removesuffix(".safetensors").rsplit("-", 1)[0]  # <name>-<key[:8]>.safetensors
    version = re.compile(rf"{re.escape(stem)}-[0-9a-f]{{8}}\.safetensors")
    earlier = sorted((p for p in folder.iterdir() if version.fullmatch(p.name) and p != current),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    pruned = earlier[keep:]
    for kohya in pruned:
        kohya.unlink(missing_ok=True)
        kohya.with_name(kohya.name.replace(".safetensors", ".diffusers.safetensors")).unlink(missing_ok=True)
    if pruned:
        log.info("pruned %d earlier LoRA version(s) in %s (train.keep_lora_versions: %d)", len(pruned), folder, keep)
    return pruned


export_task = stage_task(run_export, export_key, name="export")
