"""What a run is and what it trains on: runs named by weight settings, micro-batch 'auto' kept for the run,
the preflight before any GPU work, and bucket merges that keep the face the crop stage protected."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import cropped_demo_records, photo, save
from lorapipe.config import CollectConfig, CropConfig, TrainConfig, ValidateConfig
from lorapipe.manifest import read_manifest, write_manifest
from lorapipe.workspace import Workspace
from trainer import Example, train_lora

NAME = "Jane Doe"
# Eileen Collins' face (brows to chin) in scikit-image's 512x512 astronaut, read off the picture.
ASTRONAUT_FACE = (180, 75, 268, 160)


def approve(records, caption=f"{NAME} smiling"):
    return [r.model_copy(update={"caption": f"{caption} {i}", "review": "approved"}) if r.kept else r
            for i, r in enumerate(records)]


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    ws = Workspace.at(root / "ws")
    manifest = write_manifest(root / "review.jsonl", approve(cropped_demo_records(root / "photos", ws, 4)))
    return ws, str(manifest)


def config(base_model, **settings) -> TrainConfig:
    return TrainConfig(**{"base_model": str(base_model), "epochs": 2, "effective_batch_size": 2, "device": "cpu",
                          "sample_prompts": [], **settings})


def test_only_settings_that_change_the_weights_name_a_run_and_a_new_run_says_why(reviewed, tiny_models, caplog):
    from tasks.train import announce_run, plan_run
    from trainer.identity import claim_run, run_identity

    ws, manifest = reviewed
    base = config(tiny_models.sdxl)
    job, _, _ = plan_run(manifest, str(ws.root), base, NAME)
    job.write()
    claim_run(job.run_dir, run_identity(job.examples, job.config))  # what the trainer does first
    for run_only in ({"timeout_minutes": 5.0}, {"checkpoint_every_steps": 1, "keep_checkpoints": 5},
                     {"sample_prompts": ["a photo of {name}"], "sample_every_epochs": 2, "sample_steps": 3},
                     {"device": "auto", "num_processes": 2, "gradient_checkpointing": True}):
        assert plan_run(manifest, str(ws.root), base.model_copy(update=run_only), NAME)[0].run_dir == job.run_dir

    for weights, said in (({"learning_rate": 2e-4}, "learning_rate 0.0004 -> 0.0002"),
                          ({"rank": 4, "alpha": 4.0}, "alpha 1.0 -> 4.0; rank 8 -> 4"),
                          ({"lora_init": "gaussian"}, 'lora_init "kohya" -> "gaussian"'),
                          ({"micro_batch_size": "auto"}, 'micro_batch_size 4 -> "auto"')):
        other, _, _ = plan_run(manifest, str(ws.root), base.model_copy(update=weights), NAME)
        assert other.run_dir != job.run_dir
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lorapipe.train"):
            announce_run(ws, other)
        assert f"new run {other.run_dir.name}: {said} since run {job.run_dir.name}" in caplog.text

    # An edited caption is new data: a new run, and the log says so.
    records = read_manifest(manifest)
    edited = write_manifest(Path(manifest).with_name("edited.jsonl"),
                            [records[0].model_copy(update={"caption": f"{NAME} laughing"}), *records[1:]])
    other, _, _ = plan_run(str(edited), str(ws.root), base, NAME)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lorapipe.train"):
        announce_run(ws, other)
    assert other.run_dir != job.run_dir and "1 training image(s) changed" in caplog.text


def test_auto_micro_batch_is_probed_once_per_run_and_the_preflight_comes_before_the_gpu(
        reviewed, tiny_models, tmp_path, monkeypatch, caplog):
    import trainer.loop as loop
    from tasks.train import training_examples

    ws, manifest = reviewed
    examples = training_examples(read_manifest(manifest), ws)
    events = []
    placed = loop.place
    monkeypatch.setattr(loop, "place", lambda *a: events.append("gpu") or placed(*a))
    probes = iter([2, 1])  # a second probe would see less free memory
    monkeypatch.setattr(loop, "probe_micro_batch", lambda *a, **k: events.append("probe") or next(probes))

    class Order(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("preflight:"):
                events.append("preflight")

    handler = Order()
    caplog.set_level(logging.INFO, logger="lorapipe.train")
    logging.getLogger("lorapipe.train").addHandler(handler)
    try:
        first = config(tiny_models.sdxl, micro_batch_size="auto", checkpoint_every_steps=1, timeout_minutes=1e-6)
        with pytest.raises(TimeoutError, match="at step 1"):
            train_lora(examples, first, tmp_path / "run", ws.cache)
        assert events.index("preflight") < events.index("gpu") < events.index("probe")
        events.clear()
        result = train_lora(examples, first.model_copy(update={"timeout_minutes": None}), tmp_path / "run", ws.cache)
    finally:
        logging.getLogger("lorapipe.train").removeHandler(handler)
    assert "probe" not in events  # the size chosen for this run is kept: the schedule cannot change on resume
    assert result.resumed_from_step == 1 and result.micro_batch_size == 2 and result.preflight["micro_batch_size"] == 2


# --- bucket merges keep the face ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_photo_workspace(tmp_path_factory):
    """Five ordinary photos and one 2400x1000 photo with the face far left, cropped at 256-px buckets:
    the wide one is alone in its 384x160 bucket."""
    from skimage import data

    from tasks.collect import collect_folder
    from tasks.crop import crop_records
    from tasks.validate import validate_records

    root = tmp_path_factory.mktemp("wide")
    photos, ws = root / "photos", Workspace.at(root / "ws")
    for seed in range(5):
        save(photo(1000, 1100, seed=seed), photos / f"ordinary{seed}.png")
    y, x = np.mgrid[0:1000, 0:2400]
    canvas = Image.fromarray(np.stack([90 + x / 60, 110 + y / 40, 130 + 0 * x], -1).astype(np.uint8))
    canvas.paste(Image.fromarray(data.astronaut()).resize((900, 900), Image.LANCZOS), (40, 50))
    save(canvas, photos / "wide.png")
    records, _ = validate_records(collect_folder(photos, ws, CollectConfig())[0], ws, ValidateConfig())
    crop = CropConfig(resolution=256, bucket_step=32)
    records, _ = crop_records(records, ws, crop)
    manifest = write_manifest(root / "review.jsonl", approve(records))
    [wide] = [r for r in records if r.source.endswith("wide.png")]
    return ws, str(manifest), crop, wide


def test_a_merged_bucket_trains_the_face_it_was_cropped_for(wide_photo_workspace, tiny_models):
    from tasks.train import run_train
    from trainer.data import cache_latents, merge_small_buckets
    from trainer.job import Job

    ws, manifest, crop, wide = wide_photo_workspace
    expected_face = [round(v * 900 / 512) + o for v, o in zip(ASTRONAUT_FACE, (40, 50, 40, 50))]
    assert wide.bucket == "384x160" and wide.crop_method == "face"
    assert all(abs(a - b) < 40 for a, b in zip(wide.face, expected_face))  # the crop stage found her face

    settings = config(tiny_models.sdxl, epochs=1, effective_batch_size=6, micro_batch_size=6)
    result = run_train(manifest, str(ws.root), settings, NAME, crop)
    assert result["steps"] == 1 and result["images"] == 6

    # What the trainer encodes (and caches) for the wide photo: the job's example after the trainer's own merge.
    job = Job.read(Path(result["run_dir"]) / "job.json")
    examples = merge_small_buckets(job.examples, settings.min_bucket_images)
    [example] = [e for e in examples if e.image_id == wide.id]
    encoded = {}

    class Recorder:  # stands in for the VAE: keeps the pixels it is given
        def encode(self, pixels):
            encoded["pixels"] = pixels
            raise StopIteration

    with pytest.raises(StopIteration):
        cache_latents([example], Recorder(), type("NoCache", (), {"get": lambda self, key: None})(), {}, "cpu",
                      torch.float32)
    pixels = encoded["pixels"][0]
    assert tuple(pixels.shape[1:]) == (256, 256) and example.bucket == (256, 256)

    # The manifest says what was trained: the re-crop from the original, its box holding the face.
    [trained] = [r for r in read_manifest(result["manifest"]) if r.id == wide.id]
    assert trained.bucket == "256x256" and trained.image_path != wide.image_path
    assert any(f.startswith("re-cropped from the original to 256x256") for f in trained.flags)
    left, top, right, bottom = trained.crop
    assert left <= wide.face[0] and top <= wide.face[1] and wide.face[2] <= right and wide.face[3] <= bottom
    # ...and the training tensor shows the face where that box puts it, inside the frame.
    scale = 256 / (right - left)
    face = [round((v - o) * scale) for v, o in zip(wide.face, (left, top, left, top))]
    assert 0 <= face[0] < face[2] <= 256 and 0 <= face[1] < face[3] <= 256
    shown = ((pixels.permute(1, 2, 0).numpy() + 1) * 127.5)[face[1]:face[3], face[0]:face[2]]
    original = Image.open(ws.path(wide.raw_path)).convert("RGB").crop(wide.face)
    expected = np.asarray(original.resize((shown.shape[1], shown.shape[0]), Image.LANCZOS), dtype=np.float64)
    assert np.abs(shown - expected).mean() < 15  # a crop that missed her differs by 40+


def test_the_trainer_alone_refits_around_the_face_or_leaves_the_image_out(tmp_path, caplog):
    """Examples given straight to the trainer (a hand-written job): a merge moves the crop to the face."""
    from trainer.data import image_tensor, merge_small_buckets

    wide = np.full((160, 384, 3), 40, np.uint8)
    wide[40:100, 10:60] = (250, 20, 20)  # the "face", far left
    path = save(Image.fromarray(wide), tmp_path / "wide.png")
    squares = [Example(f"s{i}", tmp_path / "s.png", "c", (256, 256), (256, 256), (0, 0)) for i in range(2)]
    lone = Example("w", path, "c", (384, 160), (1000, 2400), (0, 0), face=(10, 40, 60, 100))
    [*_, merged] = merge_small_buckets([*squares, lone], 2)
    assert merged.bucket == (256, 256) and merged.crop_top_left == (0, 0)  # the window starts at the left edge
    red = image_tensor(merged.image_path, merged.bucket, merged.face)[0, 0] > 0.8
    assert red.sum() > 0.9 * (60 * 50 * (256 / 160) ** 2)  # all of the face is in the frame

    too_wide = Example("x", path, "c", (384, 160), (1000, 2400), (0, 0), face=(0, 10, 300, 150))
    with caplog.at_level(logging.WARNING, logger="lorapipe.train"):
        assert merge_small_buckets([*squares, too_wide], 2) == squares
    assert f"{path}: left out of training: its face does not fit a 256x256 frame" in caplog.text


def test_a_malformed_job_file_is_refused_in_one_line(tmp_path, capsys):
    from trainer.__main__ import main

    job = tmp_path / "job.json"
    job.write_text('{"examples": [], "config": {"rank": 0}, "run_dir": "r", "cache_dir": "c", "name": "n"}')
    assert main([str(job)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {job}: config.rank: Input should be greater than or equal "
                                               "to 1")
    job.write_text("{not json")
    assert main([str(job)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {job}: not a training job (JSONDecodeError")
