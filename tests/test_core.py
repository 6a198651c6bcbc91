"""The core every stage relies on: configuration, the manifest, buckets, atomic writes, the tiny models."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lorapipe.buckets import nearest_bucket, sdxl_buckets
from lorapipe.config import PipelineConfig, load_config
from lorapipe.fsutil import atomic_path, atomic_write_text
from lorapipe.manifest import ImageRecord, read_manifest, write_manifest


def test_config_rejects_unknown_keys_and_reads_yaml(tmp_path):
    with pytest.raises(ValidationError, match="learning_rat"):
        PipelineConfig.model_validate({"name": "Jane Doe", "images": "x", "train": {"learning_rat": 1e-4}})
    path = tmp_path / "job.yaml"
    path.write_text("name: Jane Doe\nimages: photos\ntrain:\n  rank: 16\ndataset:\n  validate:\n    min_side: 512\n")
    config = load_config(path, train={"epochs": 3})
    assert (config.train.rank, config.train.epochs, config.train.learning_rate) == (16, 3, 4e-4)
    assert config.dataset.validate_.min_side == 512
    assert config.workspace_path().name == "jane-doe"


def test_recipe_defaults():
    train = PipelineConfig(name="Jane Doe", images="x").train
    assert (train.rank, train.learning_rate, train.optimizer, train.effective_batch_size) == (8, 4e-4, "auto", 64)
    assert (train.alpha, train.targets, train.train_text_encoders) == (1.0, "kohya", "auto")  # the probe decides
    assert (train.epochs, train.repeats, train.base_model) == (12, 1, "stabilityai/stable-diffusion-xl-base-1.0")


def test_config_round_trips_through_json_as_flow_parameters_do():
    config = PipelineConfig.model_validate({"name": "Jane Doe", "images": "x", "dataset": {"validate": {"min_side": 5}}})
    for dumped in (config.model_dump(mode="json"), config.model_dump(mode="json", by_alias=True)):
        assert PipelineConfig.model_validate(dumped) == config


def test_manifest_round_trip_and_bad_lines_name_the_file(tmp_path):
    records = [ImageRecord(id="a" * 64, source="/p/a.jpg", fetched_at="2026-11-26T00:00:00+00:00")]
    path = write_manifest(tmp_path / "m.jsonl", records)
    assert read_manifest(path) == records
    path.write_text(path.read_text() + '{"id": 3}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2"):
        read_manifest(path)


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path):
    target = atomic_write_text(tmp_path / "out.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half writ")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_sdxl_buckets():
    buckets = sdxl_buckets(1024, 64)
    for standard in [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
                     (1536, 640), (640, 1536)]:
        assert standard in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and 0.85 <= w * h / 1024**2 <= 1 for w, h in buckets)
    assert nearest_bucket(3000, 4000, buckets) == (896, 1152)
    assert nearest_bucket(4000, 3000, buckets) == (1152, 896)


def test_tiny_models_load_like_hub_models(tiny_models):
    from diffusers import StableDiffusionXLPipeline
    from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_models.sdxl, subfolder="tokenizer")
    ids = tokenizer("a photo of Jane Doe smiling in a red coat").input_ids
    assert len(tokenizer) > 100 and len(ids) > 4  # not the 2-token tokenizer transformers 5 can silently build
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of jane doe smiling in a red coat"
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models.sdxl)
    assert pipe.unet.config.addition_embed_type == "text_time" and pipe.vae_scale_factor == 8
    assert type(AutoModelForImageTextToText.from_pretrained(tiny_models.llava)).__name__ == "LlavaForConditionalGeneration"
    assert "<image>" in AutoProcessor.from_pretrained(tiny_models.llava).tokenizer.get_vocab()
