"""`lorapipe compare-ranks WS` end to end on the tiny models: the probe, trainings at two ranks sharing the
latent cache, a resized and an outside LoRA in the same table, the report (file and artifact), and a rerun
that trains nothing.

The tiny SDXL has random weights: its samples hold no faces, so the report must say so instead of naming
a rank, and the probe must choose text-encoder training and say why.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from flows.cli import app
from flows.demo import demo_config

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def reviewed(prefect_harness, tiny_models, demo_photos_master, tmp_path_factory):
    """The demo's photos collected, captioned and reviewed (approval auto), settings sized for seconds."""
    from flows.pipeline import dataset_flow

    root = tmp_path_factory.mktemp("ranks")
    shutil.copytree(demo_photos_master[0], root / "photos")
    config = demo_config(root / "photos", root / "workspace", tiny_models).model_copy(deep=True)
    config.train.epochs, config.train.sample_prompts = 1, []
    config.evaluate.steps, config.evaluate.seeds = 2, 1
    config.probe.steps, config.probe.seeds = 2, 2
    dataset_flow(config)  # writes WORKSPACE/config.json: later commands need only the workspace
    return Path(config.workspace)


def compare(ws: Path, *args: str) -> dict:
    result = runner.invoke(app, ["compare-ranks", str(ws), "--rank", "2", "--rank", "4", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def test_compare_ranks_reports_size_time_identity_and_pollution(reviewed):
    ws = reviewed
    edited = sorted((ws / "images").glob("*.txt"))[0]  # by hand since the review: trained as edited
    edited.write_text("Jane Doe flying a green kite by hand")
    report = compare(ws, "--resize-to", "1")
    markdown = Path(report["markdown"]).read_text()
    assert Path(ws / "reports" / "rank-comparison.md").read_text() == markdown
    rows = {m[0].strip(): [c.strip() for c in m[1:]] for m in
            (line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| "))}
    assert set(rows) == {"LoRA", "base model (no LoRA)", "rank 2", "rank 4", "rank 4 → 1 (SVD)"}
    size = {label: float(rows[label][1].split()[0]) for label in ("rank 2", "rank 4", "rank 4 → 1 (SVD)")}
    assert size["rank 4 → 1 (SVD)"] < size["rank 2"] < size["rank 4"]
    assert rows["rank 2"][2].endswith(" s") and rows["rank 4 → 1 (SVD)"][2] == "—"  # trained here or not
    # No faces in the tiny model's samples: no identity numbers, 100% "no face", and no verdict, said so.
    assert all(rows[label][3] == "—" and rows[label][5] == "100%" for label in size)
    assert report["smallest_good_rank"] is None
    assert report["verdict"].startswith("No verdict: identity was not measured for any LoRA (not measured: no "
                                        "face found in any of the person's")
    assert "no usable face in 1 of 1 samples" in markdown  # one prompt with the name, one seed
    # Style pollution is measured whatever the faces: the LoRA changes prompts without the name somewhat.
    assert all(0 < float(rows[label][6]) < 1 for label in size)

    # The probe found no face in the base model's renders of the name: the text encoders trained, and why
    # is in the manifests, and in every compared file's metadata.
    decision = json.loads((ws / "manifests" / "probe.json").read_text())
    assert decision["train_text_encoders"] is True and decision["measured"] is False
    assert "no usable face in 2 of 2 samples" in decision["reason"]
    rank_files = {}
    for row in json.loads(Path(report["json"]).read_text())["rows"]:
        with safe_open(row["file"], framework="pt") as f:
            rank_files[row["label"]] = (f.metadata(), [k for k in f.keys() if k.startswith("lora_te1_")])
    meta, te_keys = rank_files["rank 4"]
    assert json.loads(meta["lorapipe"])["text_encoders"]["reason"] == decision["reason"] and te_keys
    assert meta["ss_network_dim"] == "4" and meta["ss_network_train_unet_only"] == "false"
    assert "jane doe flying a green kite by hand" in json.loads(meta["ss_tag_frequency"])["images"]
    assert json.loads(rank_files["rank 4 → 1 (SVD)"][0]["lorapipe_resize"])["to_rank"] == 1
    assert not (ws / "loras" / "jane-doe.safetensors").exists()  # the comparison replaces no one's LoRA

    # The second training re-used the first one's latents (same photos, same VAE).
    caches = [json.loads(p.read_text())["cache"] for p in (ws / "runs").glob("*/train_result.json")]
    assert sorted(c["latents"]["computed"] for c in caches)[0] == 0

    # The labelled grid: base model on top, one row per LoRA.
    from PIL import Image

    with Image.open(report["grid"]) as grid:
        assert grid.height > 4 * 256 // 2  # 4 rows of 256 px samples shrunk to 256-px cells, plus labels

    # The same report as a Prefect artifact, its grid embedded.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        artifact = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["jane-doe-rank-comparison"])), sort=ArtifactSort.CREATED_DESC)[0]
    assert "| rank 4 → 1 (SVD) |" in artifact.data and re.search(r"!\[rank comparison grid\]\(data:image/jpeg",
                                                                    artifact.data)


def test_rerun_trains_nothing_and_an_outside_lora_joins(reviewed, tmp_path):
    ws = reviewed
    trained = {p: p.stat().st_mtime_ns for p in (ws / "runs").glob("*/train_result.json")}
    outside = tmp_path / "someone-elses.safetensors"
    shutil.copy(next((ws / "loras").glob("*-rank1.safetensors")), outside)
    report = compare(ws, "--lora", str(outside))
    assert {p: p.stat().st_mtime_ns for p in (ws / "runs").glob("*/train_result.json")} == trained
    markdown = Path(report["markdown"]).read_text()
    assert "| other: someone-elses.safetensors | 1 |" in markdown and "| rank 2 |" in markdown

    missing = runner.invoke(app, ["compare-ranks", str(ws), "--lora", str(tmp_path / "nope.safetensors")])
    assert missing.exit_code != 0 and "nope.safetensors: no such LoRA file (--lora)" in str(missing.exception)


@pytest.mark.parametrize("flags, said", [
    (["--rank", "0"], "--rank 0: Input should be greater than or equal to 1"),
    (["--rank", "8", "--rank", "2048"], "--rank 2048: Input should be less than or equal to 1024"),
    (["--resize-to", "0"], "--resize-to 0: Input should be greater than or equal to 1"),
    (["--tolerance", "-1"], "--tolerance -1.0: Input should be greater than or equal to 0"),
])
def test_a_bad_flag_is_one_line_naming_it_before_anything_runs(reviewed, flags, said):
    """Through the installed command: no flow, no run folder, no traceback (a rank-0 run once stayed behind)."""
    import subprocess
    import sys

    runs = sorted((reviewed / "runs").iterdir())
    done = subprocess.run([str(Path(sys.executable).with_name("lorapipe")), "compare-ranks", str(reviewed), *flags],
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr.strip()) == (2, f"lorapipe: {said}")
    assert sorted((reviewed / "runs").iterdir()) == runs
