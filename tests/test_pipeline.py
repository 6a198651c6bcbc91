"""The whole pipeline as one Prefect flow on the demo photos, with the tiny models, offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.demo import demo_config
from lorapipe.demo_data import extra_photo
from lorapipe.manifest import read_manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_run(prefect_harness, tiny_models, demo_photos_master, tmp_path_factory):
    """One full run, shared by the tests below (it takes ~25 s on 2 cores)."""
    import shutil

    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("e2e")
    shutil.copytree(demo_photos_master[0], root / "photos")
    config = demo_config(root / "photos", root / "workspace", tiny_models)
    return config, pipeline(config)


def by_name(records):
    return {Path(r.source).name: r for r in records}


def test_manifest_reports_rejections_and_duplicates(first_run):
    _, result = first_run
    records = by_name(read_manifest(result["manifest"]))
    assert len(records) == 14
    assert records["broken_download.jpg"].status == "rejected"
    assert records["broken_download.jpg"].reason.startswith("corrupt:")
    assert records["thumbnail.jpg"].reason == "too_small: 400x300 < 768 px"
    for copy, original in [("portrait_00_resized.jpg", "portrait_00.jpg"), ("portrait_01_edit.jpg", "portrait_01.jpg")]:
        assert records[copy].status == "rejected"
        assert records[copy].duplicate_of == records[original].id
        assert records[original].kept
    kept = [r for r in records.values() if r.kept]
    assert len(kept) == 10
    assert all("Jane Doe" in r.caption and r.review == "approved" for r in kept)


def test_training_images_have_kohya_sidecars(first_run):
    _, result = first_run
    ws = Path(result["workspace"])
    for record in read_manifest(result["manifest"]):
        if record.kept:
            assert (ws / record.image_path).with_suffix(".txt").read_text() == record.caption


def test_lora_loads_and_changes_the_output(first_run, tiny_models):
    from diffusers import StableDiffusionXLPipeline

    _, result = first_run
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models.sdxl)
    pipe.set_progress_bar_config(disable=True)

    def render():
        return pipe(
            "a photo of Jane Doe", num_inference_steps=4, width=256, height=256, output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images[0]

    base, base_again = render(), render()
    np.testing.assert_array_equal(base, base_again)  # the difference below is the LoRA's, not noise
    lora = Path(result["lora_latest"])
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    with_lora = render()
    assert np.abs(with_lora - base).mean() > 1e-3
    assert result["steps"] > 0 and np.isfinite(result["final_loss"])


def test_summary_has_identity_and_pollution_rows_honestly_empty_on_the_tiny_model(first_run):
    """The tiny SDXL draws no faces (random weights), and the drawn demo photos hold none either: the rows
    say so with the reason, the probe chooses text-encoder training and says why, and the LoRA carries that."""
    import json

    from safetensors import safe_open

    from flows.summary import summary_rows

    _, result = first_run
    rows = dict(summary_rows(result))
    photos = sum(r.review == "approved" for r in read_manifest(result["manifest"]))
    no_faces = (f"no face found in any of the person's {photos} photos; no usable face in 2 of 2 samples "
                "(2 no face found)")
    assert rows["text encoders"] == (f"trained: could not measure ({no_faces}): training the text encoders, "
                                     "which cannot lose a person the base model does not know")
    identity = {label: value for label, value in rows.items() if label.startswith("identity")}
    assert set(identity) == {f"identity, base model (vs {photos} training photos)",
                             f"identity, with the LoRA (vs {photos} training photos)"}
    assert all(v == f"not measured: {no_faces}" for v in identity.values())
    assert rows["style pollution"].startswith("1 − SSIM 0.") and "(prompts without the name)" in rows["style pollution"]
    with safe_open(result["lora"], framework="pt") as f:
        lineage = json.loads(f.metadata()["lorapipe"])
        assert f.metadata()["ss_network_train_unet_only"] == "false"
        assert any(k.startswith("lora_te2_") for k in f.keys())
    assert lineage["text_encoders"]["train_text_encoders"] is True
    assert lineage["text_encoders"]["reason"] == result["text_encoders"]["reason"]


def test_second_run_reuses_every_stage(first_run):
    from flows.pipeline import pipeline

    config, result = first_run
    again = pipeline(config)
    assert {name: s["cached"] for name, s in again["stages"].items()} == {name: True for name in result["stages"]}
    assert again["lora"] == result["lora"]


def test_a_deleted_output_is_rebuilt_not_served_from_the_cache(first_run):
    from flows.pipeline import pipeline

    config, result = first_run
    Path(result["lora"]).unlink()  # the LoRA people load: put back from its version, nothing recomputed
    again = pipeline(config)
    assert Path(again["lora"]).exists() and again["stages"]["export"]["cached"]
    shutil.rmtree(Path(result["lora"]).parent / "versions")  # the export's own files: exported again
    again = pipeline(config)
    assert Path(again["lora"]).exists()
    assert not again["stages"]["export"]["cached"]
    assert again["stages"]["train"]["cached"] and again["stages"]["review"]["cached"]


def test_one_new_photo_is_the_only_work_in_per_image_stages(first_run):
    from flows.pipeline import pipeline

    config, _ = first_run
    extra_photo(config.images)
    result = pipeline(config)
    stats = {name: s["stats"] for name, s in result["stages"].items()}
    assert stats["collect"]["computed"] == 1
    for stage in ("validate", "crop", "caption"):
        assert stats[stage]["computed"] == 1, (stage, stats[stage])
    assert stats["dedup"]["computed"] == 1  # one new perceptual hash
    assert stats["train"]["latents"] == {"computed": 1, "reused": 10}
    assert stats["train"]["text_embeddings"]["computed"] <= 1
    assert not result["stages"]["train"]["cached"]  # the data changed, so the LoRA is retrained
