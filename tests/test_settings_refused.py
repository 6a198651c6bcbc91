"""Settings that cannot make a good LoRA are refused where they are read, in one line naming them:
numbers out of bounds, blank or unusable names, pickle model files, unreadable settings files, a workspace
that is a file. None of them leaves a workspace behind or touches the latest LoRA.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from flows.cli import app
from lorapipe.config import PipelineConfig
from lorapipe.errors import UserError
from lorapipe.fsutil import sha256_file

runner = CliRunner()


@pytest.mark.parametrize("section, setting, value", [
    ("train", "micro_batch_size", -1),  # trained 0 steps and wrote an untrained LoRA
    ("train", "micro_batch_size", 0),  # crashed deep in the trainer
    ("train", "effective_batch_size", 0),
    ("train", "rank", 100_000),
    ("train", "learning_rate", float("inf")),
    ("train", "learning_rate", float("nan")),
    ("train", "seed", -1),
    ("train", "epochs", 10**9),
    ("train", "noise_offset", 5.0),
    ("train", "timeout_minutes", float("inf")),
    ("evaluate", "seed", 2**40),
    ("evaluate", "guidance_scale", -3.0),
    ("caption", "api_timeout_seconds", float("inf")),
    ("caption", "batch_size", 10**6),
    ("review", "timeout_hours", float("nan")),
    ("scale_out", "chunk_size", 0),
])
def test_numbers_out_of_bounds_are_refused_naming_the_setting(section, setting, value):
    with pytest.raises(ValidationError) as err:
        PipelineConfig.model_validate({"name": "Jane Doe", "images": "x", section: {setting: value}})
    assert {e["loc"][:2] for e in err.value.errors()} == {(section, setting)}


@pytest.mark.parametrize("collect", [{"max_file_bytes": 0}, {"retries": 1000}, {"read_timeout": float("inf")},
                                     {"max_archive_members": 0}, {"concurrency": 10_000}])
def test_collect_numbers_out_of_bounds_are_refused(collect):
    with pytest.raises(ValidationError, match=next(iter(collect))):
        PipelineConfig.model_validate({"name": "Jane Doe", "images": "x", "dataset": {"collect": collect}})


@pytest.mark.parametrize("name, why", [
    ("", "blank"),
    ("   ", "blank"),  # '"" in caption' is always true: every caption would pass review without the trigger
    ("J" * 101, "101 characters"),
    ("a" * 500, "500 characters"),  # once a FileNotFoundError deep in the workspace
    ("Jane\nDoe", r"U\+000A"),
    ("Jane\tDoe", r"U\+0009"),
    ("Jane\x00Doe", r"U\+0000"),
    ("Jane\u202eeoD", r"U\+202E"),  # a right-to-left override would disguise the trigger
])
def test_unusable_names_are_refused(name, why):
    with pytest.raises(ValidationError, match=why):
        PipelineConfig(name=name, images="x")


def test_real_names_pass_trimmed():
    assert PipelineConfig(name="  Zoë Saldaña-Nazario ", images="x").name == "Zoë Saldaña-Nazario"
    assert PipelineConfig(name="李小龙", images="x").name == "李小龙"


@pytest.mark.parametrize("section, setting, value", [
    ("train", "vae", "sdxl-vae.ckpt"), ("train", "vae", "vae.pt"), ("train", "base_model", "model.bin"),
    ("train", "base_model_config", "config.pth"), ("caption", "model", "llava.bin"),
])
def test_pickle_model_files_are_refused_by_name_in_every_model_setting(section, setting, value):
    with pytest.raises(ValidationError, match=rf"{value}: only \.safetensors checkpoints are loaded"):
        PipelineConfig.model_validate({"name": "Jane Doe", "images": "x", section: {setting: value}})


def test_a_pickle_only_model_folder_is_refused_naming_the_file(tiny_models, tmp_path):
    """A diffusers folder whose UNet is only a .bin: refused before any loader (or torch.load) sees it."""
    import shutil

    from trainer.models import load_sdxl
    from trainer.sampling import load_pipeline

    model = tmp_path / "sdxl"
    shutil.copytree(tiny_models.sdxl, model)
    for weights in (model / "unet").glob("*.safetensors"):
        weights.rename(weights.with_name("diffusion_pytorch_model.bin"))
    bin_file = model / "unet" / "diffusion_pytorch_model.bin"
    for load in (load_sdxl, load_pipeline):  # training, and the evaluate stage's renders
        with pytest.raises(UserError, match=rf"{bin_file}: only \.safetensors checkpoints are loaded"):
            load(str(model))
    vae = tmp_path / "vae.pt"
    vae.write_bytes(b"never read")
    with pytest.raises(UserError, match=r"vae\.pt: only \.safetensors"):
        load_pipeline(str(tiny_models.sdxl), vae=str(vae))


# --- through the command line: one line, exit status 2, nothing written ----------------------------


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorapipe: "), result.stderr
    return lines[0]


def test_a_negative_micro_batch_is_a_usage_error_and_the_latest_lora_stays(tmp_path):
    ws = tmp_path / "ws"
    (ws / "loras").mkdir(parents=True)
    latest = ws / "loras" / "jane-doe.safetensors"
    latest.write_bytes(b"the last good LoRA")
    before = sha256_file(latest)
    for flag in ("-1", "0"):
        result = runner.invoke(app, ["run", "--name", "Jane Doe", "--images", str(tmp_path), "--workspace", str(ws),
                                     "--micro-batch-size", flag])
        # said in the flag's name, as the person typed it
        assert f"--micro-batch-size {flag}: Input should be greater than or equal to 1" in one_line_error(result)
    assert sha256_file(latest) == before and sorted(p.name for p in ws.iterdir()) == ["loras"]


@pytest.mark.parametrize("content, expected", [
    (None, "is a folder, not a settings file"),
    ("missing", "no such settings file"),
    (b"name: Jane Doe\ntrain:\n  rank: [8\n", r"job\.yaml: line 4, column 1: not valid YAML"),
    (b"- name: Jane Doe\n- images: photos\n", "not a list"),
    (b"name: Zo\xeb\n", r"not UTF-8 text \(byte 0xeb"),
    (b"name: ''\nimages: photos\n", "name: Value error, the name is blank"),
    (b"name: Jane Doe\nimages: photos\ntrain:\n  micro_batch_size: -1\n", "train.micro_batch_size"),
])
def test_bad_settings_files_are_one_line_naming_the_file(tmp_path, content, expected):
    job = tmp_path / "job.yaml"
    if content is None:
        job.mkdir()
    elif content != "missing":
        job.write_bytes(content)
    for argv in (["run", "--config", str(job)], ["validate", str(tmp_path / "ws"), "--config", str(job)]):
        line = one_line_error(runner.invoke(app, argv))
        assert str(job) in line and __import__("re").search(expected, line), (argv, line)


def test_a_workspace_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "job.yaml").write_text(f"name: Jane Doe\nimages: {tmp_path}\n")
    not_a_folder = tmp_path / "ws"
    not_a_folder.write_text("a file")
    line = one_line_error(runner.invoke(app, ["collect", str(not_a_folder), "--config", str(tmp_path / "job.yaml")]))
    assert f"{not_a_folder}: is a file" in line
    broken = tmp_path / "ws2"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert "config.json: not valid JSON" in one_line_error(runner.invoke(app, ["dedup", str(broken)]))


def test_the_installed_command_prints_the_same_single_line(tmp_path):
    """The console script (what users type), not only the app: no traceback, no usage box."""
    job = tmp_path / "job.yaml"
    job.write_text("- a list\n")
    lorapipe = str(Path(sys.executable).with_name("lorapipe"))
    done = subprocess.run([lorapipe, "crop", str(tmp_path / "ws"), "--config", str(job)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"lorapipe: {job}: expected settings as `key: value` lines at the top level, "
                                   "not a list")


# --- an untrained LoRA never replaces the latest one -------------------------------------------------


def test_a_training_without_one_optimizer_step_writes_no_lora(tiny_models, tmp_path, workspace, monkeypatch):
    """Every step skipped (non-finite losses): once an all-zero LoRA, exit 0."""
    import torch

    import trainer.loop as loop
    from helpers import cropped_demo_records
    from lorapipe.config import TrainConfig
    from tasks.train import training_examples

    records = cropped_demo_records(tmp_path / "photos", workspace, 2)
    records = [r.model_copy(update={"caption": "a photo of Jane Doe", "review": "approved"}) for r in records]
    nan_loss = lambda unet, scheduler, model_input, *rest: torch.full(  # noqa: E731
        (model_input.shape[0],), float("nan"), requires_grad=True)
    monkeypatch.setattr(loop, "per_image_loss", nan_loss)
    config = TrainConfig(base_model=str(tiny_models.sdxl), epochs=1, effective_batch_size=2, micro_batch_size=2,
                         sample_prompts=[], holdout_images=0, device="cpu")
    with pytest.raises(RuntimeError, match=r"training took no optimizer step \(1 planned, 1 skipped"):
        loop.train_lora(training_examples(records, workspace), config, tmp_path / "run", workspace.cache)
    assert not (tmp_path / "run" / "lora").exists() and not (tmp_path / "run" / "train_result.json").exists()


@pytest.mark.parametrize("steps, up, why", [(3, 0.0, "every LoRA up-weight is zero"),
                                            (0, 0.5, "took 0 optimizer steps")])
def test_export_refuses_an_untrained_lora_and_keeps_the_latest(tiny_models, workspace, steps, up, why):
    import torch
    from safetensors.torch import save_file

    from lorapipe.config import TrainConfig
    from tasks.export import run_export

    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    lora = workspace.runs / "lora.safetensors"
    save_file({f"{key}.lora_A.weight": torch.randn(4, 32), f"{key}.lora_B.weight": torch.full((32, 4), up)}, lora)
    manifest = workspace.manifests / "review.jsonl"
    manifest.write_text("")
    latest = workspace.loras / "jane-doe.safetensors"
    latest.write_bytes(b"the last good LoRA")
    with pytest.raises(UserError, match=why):
        run_export(str(lora), str(manifest), str(workspace.root), "Jane Doe", {"steps": steps, "final_loss": 0.1},
                   TrainConfig(base_model=str(tiny_models.sdxl)), 256)
    assert latest.read_bytes() == b"the last good LoRA" and sorted(p.name for p in workspace.loras.iterdir()) == [
        "jane-doe.safetensors"]
