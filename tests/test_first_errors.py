"""First errors: what a run cannot get (photos, models) is said in one line before any stage runs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import photo, save

LORAPIPE = str(Path(sys.executable).with_name("lorapipe"))


def _lorapipe(args: list[str], cwd: Path, **env) -> tuple[subprocess.CompletedProcess, float]:
    import os

    inherited = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    env = {**inherited, "HF_HOME": str(cwd / "hf-home"), "PREFECT_API_URL": "", **env}  # an empty hub cache
    started = time.monotonic()
    done = subprocess.run([LORAPIPE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    return done, time.monotonic() - started


@pytest.fixture
def photos(tmp_path):
    for seed in (1, 2):
        save(photo(900, 800, seed=seed), tmp_path / "photos" / f"{seed}.jpg")
    return tmp_path / "photos"


UNREACHABLE = {"HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there: the hub cannot be reached
OFFLINE = {"HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("env, why", [(UNREACHABLE, "the hub at http://127.0.0.1:9 cannot be reached"),
                                      (OFFLINE, "HF_HUB_OFFLINE is set")])
def test_readme_first_command_without_the_hub_is_one_line_before_any_stage(tmp_path, photos, env, why):
    done, seconds = _lorapipe(["run", "--images", str(photos), "--name", "Jane Doe"], tmp_path, **env)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = done.stderr.strip().splitlines()  # one line, no traceback, no stage output
    assert line.startswith("lorapipe: train.base_model stabilityai/stable-diffusion-xl-base-1.0 and caption.model "
                           "llava-hf/llava-1.5-7b-hf are not in the Hugging Face cache (")
    assert str(tmp_path / "hf-home" / "hub") in line and why in line  # where it looked, why it cannot download
    assert "`hf download stabilityai/stable-diffusion-xl-base-1.0`" in line and "local folder" in line
    assert not (tmp_path / "workspaces").exists()  # no stage ran, nothing written
    assert seconds < 60  # seconds, not minutes of retries (~4 s on 2 idle cores)


def test_a_missing_model_folder_or_photo_folder_is_one_line(tmp_path, photos):
    done, _ = _lorapipe(["run", "--images", str(photos), "--name", "Jane Doe", "--base-model", str(tmp_path / "sdxl"),
                         "--captioner", str(tmp_path / "llava")], tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"lorapipe: train.base_model {tmp_path / 'sdxl'}: no such folder or file (a local "
                                   "model is a diffusers or transformers folder, or one .safetensors file); "
                                   f"caption.model {tmp_path / 'llava'}: no such folder or file (a local model is a "
                                   "diffusers or transformers folder, or one .safetensors file)")
    done, _ = _lorapipe(["run", "--images", str(tmp_path / "nowhere"), "--name", "Jane Doe"], tmp_path, **OFFLINE)
    assert done.stderr.strip() == f"lorapipe: images: {tmp_path / 'nowhere'}: no such folder, archive or URL list"


def test_a_stage_command_checks_only_the_models_its_stage_loads(tmp_path, photos, tiny_models):
    job = tmp_path / "job.yaml"
    job.write_text(f"name: Jane Doe\nimages: {photos}\ntrain: {{base_model: {tiny_models.sdxl}}}\n"
                   "caption: {model: org/not-cached-vlm}\n")
    ws = tmp_path / "ws"
    done, _ = _lorapipe(["caption", str(ws), "--config", str(job)], tmp_path, **OFFLINE)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("lorapipe: caption.model org/not-cached-vlm is not in the Hugging Face "
                                          "cache")
    assert "train.base_model" not in done.stderr  # a local tiny SDXL: found


def test_a_model_in_the_hub_cache_is_found_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from lorapipe.config import PipelineConfig
    from lorapipe.model_sources import check_models

    repo = tmp_path / "hub" / "models--org--tiny-sdxl"  # the hub cache's layout: refs/main -> snapshots/<commit>
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "model_index.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    config = PipelineConfig(name="Jane Doe", images="photos", train={"base_model": "org/tiny-sdxl"})
    check_models(config, ["train", "review"])  # found: no error, no network
    with pytest.raises(Exception, match="caption.model llava-hf/llava-1.5-7b-hf is not in the Hugging Face cache"):
        check_models(config, ["caption"])
