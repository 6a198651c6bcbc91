"""The trainer on the tiny SDXL: buckets, a short real training run, the saved LoRA reloads exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from helpers import cropped_demo_records
from lorapipe.config import TrainConfig
from lorapipe.demo_data import scenes
from trainer import Example, train_lora
from trainer.data import micro_batch_schedule
from trainer.export import export_diffusers_lora
from trainer.loop import LORA_WEIGHTS, group_into_steps


def example(i: int, bucket=(256, 256)) -> Example:
    return Example(f"id{i}", None, f"caption {i}", bucket, (1024, 1024), (0, 0))


def test_micro_batches_hold_one_bucket_and_repeat_deterministically():
    examples = [example(i, (256, 256)) for i in range(5)] + [example(i, (192, 320)) for i in range(5, 8)]
    schedule = micro_batch_schedule(examples, micro_batch_size=2, epochs=3, repeats=1, seed=7)
    assert all(len({examples[i].bucket for i in mb}) == 1 for mb in schedule)
    assert sorted(i for mb in schedule for i in mb) == sorted(list(range(8)) * 3)
    assert schedule == micro_batch_schedule(examples, micro_batch_size=2, epochs=3, repeats=1, seed=7)
    assert schedule != micro_batch_schedule(examples, micro_batch_size=2, epochs=3, repeats=1, seed=8)


def test_gradient_accumulation_groups_reach_the_effective_batch():
    # 200 images x 12 epochs at micro-batch 4, effective 64: the recipe's ~38 optimizer steps.
    schedule = [[0, 1, 2, 3]] * (200 * 12 // 4)
    steps = group_into_steps(schedule, 64)
    assert len(steps) == 38
    assert all(sum(len(mb) for mb in s) == 64 for s in steps[:-1])


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    from lorapipe.workspace import Workspace

    root = tmp_path_factory.mktemp("train")
    ws = Workspace.at(root / "ws")
    records = cropped_demo_records(root / "photos", ws, 4)
    examples = [
        Example(r.id, ws.path(r.image_path), f"Jane Doe, {s.describe()}", r.bucket_size, tuple(r.original_size),
                tuple(r.crop_top_left))
        for r, s in zip(records, scenes(4))
    ]
    config = TrainConfig(base_model=str(tiny_models.sdxl), epochs=3, micro_batch_size=2, effective_batch_size=4,
                         learning_rate=1e-3, device="cpu")
    result = train_lora(examples, config, root / "run", ws.cache)
    return config, result, examples, ws, root


def test_training_runs_and_saves_a_finite_lora(trained):
    config, result, examples, _, _ = trained
    assert result.steps == 3 and len(result.losses) == 3
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.preflight["optimizer_steps"] == 3
    assert result.cache["latents"] == {"computed": 4, "reused": 0}


def test_saved_lora_reloads_into_the_pipeline_exactly(trained, tiny_models):
    from diffusers import StableDiffusionXLPipeline

    _, result, _, _, _ = trained
    path = f"{result.lora_dir}/{LORA_WEIGHTS}"
    with safe_open(path, "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
        adapter = json.loads(f.metadata()["lora_adapter_metadata"])
    assert adapter["unet.r"] == 8 and adapter["unet.lora_alpha"] == 1.0
    assert any(".attn1.to_q." in k for k in saved) and any(".ff.net.2." in k for k in saved)

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models.sdxl)
    pipe.load_lora_weights(result.lora_dir, weight_name=LORA_WEIGHTS)
    loaded = pipe.unet.state_dict()
    for key, tensor in saved.items():
        name = key.removeprefix("unet.").replace(".lora_A.", ".lora_A.default_0.").replace(".lora_B.", ".lora_B.default_0.")
        assert name in loaded, key
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)


def test_cached_latents_are_reused_and_a_new_caption_is_the_only_new_embedding(trained, tiny_models):
    config, _, examples, ws, root = trained
    edited = [examples[0].__class__(**{**examples[0].__dict__, "caption": "Jane Doe laughing"})] + examples[1:]
    again = train_lora(edited, config.model_copy(update={"epochs": 1}), root / "run2", ws.cache)
    assert again.cache["latents"] == {"computed": 0, "reused": 4}
    assert again.cache["text_embeddings"] == {"computed": 1, "reused": 3}


def test_export_adds_lineage_and_refuses_non_finite_weights(trained, tmp_path):
    _, result, _, _, _ = trained
    src = f"{result.lora_dir}/{LORA_WEIGHTS}"
    dest = export_diffusers_lora(src, tmp_path / "jane.safetensors", {"name": "Jane Doe", "image_ids": ["a"]})
    with safe_open(str(dest), "pt") as f:
        assert json.loads(f.metadata()["lorapipe"])["name"] == "Jane Doe"
        assert "lora_adapter_metadata" in f.metadata()
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())

    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"unet.x.lora_A.weight": torch.tensor([float("nan")])}, bad)
    with pytest.raises(FloatingPointError, match="non-finite"):
        export_diffusers_lora(bad, tmp_path / "out.safetensors", {})
    assert not (tmp_path / "out.safetensors").exists()
