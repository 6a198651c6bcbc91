"""The trainer on the tiny SDXL: batching, the loss falls, resume after SIGKILL is exact, exports load."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import cropped_demo_records
from lorapipe.config import TrainConfig
from lorapipe.demo_data import scenes
from lorapipe.manifest import write_manifest
from trainer import Example, train_lora
from trainer.checkpoint import load_state, save_state
from trainer.data import group_into_steps, image_tensor, merge_small_buckets, micro_batch_schedule, split_holdout
from trainer.export import export_diffusers_lora, export_kohya_lora, kohya_metadata, read_lora
from trainer.job import Job
from trainer.kohya import safetensors_hashes, sgm_module_path
from trainer.loop import LORA_WEIGHTS
from trainer.optim import make_optimizer

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def example(i: int, bucket=(256, 256), path=None) -> Example:
    return Example(f"id{i}", path, f"caption {i}", bucket, (1024, 1024), (0, 0))


# --- data and schedule ------------------------------------------------------------------------


def test_micro_batches_hold_one_bucket_and_repeat_deterministically():
    examples = [example(i, (256, 256)) for i in range(5)] + [example(i, (192, 320)) for i in range(5, 8)]
    schedule = micro_batch_schedule(examples, micro_batch_size=2, epochs=3, repeats=1, seed=7)
    assert all(len({examples[i].bucket for i in mb}) == 1 for mb in schedule)
    assert sorted(i for mb in schedule for i in mb) == sorted(list(range(8)) * 3)
    assert schedule == micro_batch_schedule(examples, micro_batch_size=2, epochs=3, repeats=1, seed=7)
    assert schedule != micro_batch_schedule(examples, micro_batch_size=2, epochs=3, repeats=1, seed=8)


def test_gradient_accumulation_reaches_the_effective_batch():
    # 200 images x 12 epochs at micro-batch 4, effective 64: the recipe's ~38 optimizer steps.
    schedule = [[0, 1, 2, 3]] * (200 * 12 // 4)
    steps = group_into_steps(schedule, 64)
    assert len(steps) == 38
    assert all(sum(len(schedule[i]) for i in s) == 64 for s in steps[:-1])
    # With 2 processes every step needs a micro-batch for each, even when one would reach the batch.
    assert all(len(s) >= 2 for s in group_into_steps([[0] * 8] * 9, 4, min_micro_batches=2))


def test_a_lone_image_joins_the_nearest_bucket(tmp_path):
    from PIL import Image

    path = tmp_path / "wide.png"
    Image.new("RGB", (320, 192), "red").save(path)
    examples = [example(i, (256, 256)) for i in range(3)] + [example(3, (320, 192), path)]
    examples += [example(i, (288, 224)) for i in range(4, 6)]
    merged = merge_small_buckets(examples, min_images=2)
    lone = merged[3]
    assert lone.bucket == (288, 224)  # nearest aspect (1.29) to 320x192 (1.67), not 256x256
    assert lone.crop_top_left[1] > 0  # the extra side crop is part of SDXL's crop conditioning
    assert image_tensor(path, lone.bucket).shape == (1, 3, 224, 288)
    assert merged[:3] == examples[:3]


def test_held_out_images_only_from_big_datasets():
    examples = [example(i) for i in range(50)]
    train, held = split_holdout(examples, 4, 40, seed=0)
    assert len(held) == 4 and len(train) == 46 and not set(held) & set(train)
    assert split_holdout(examples[:10], 4, 40, seed=0) == (examples[:10], [])


# --- optimizer, checkpoint state, loss weighting ------------------------------------------------


def test_lion_implementations_agree_exactly_and_restore_exactly(tmp_path):
    torch.manual_seed(0)
    start = [torch.randn(64, 96) for _ in range(3)]
    grads = [[torch.randn(64, 96) for _ in range(3)] for _ in range(4)]
    finals = {}
    for name in ("lion", "lion-pytorch", "bnb-lion", "bnb-lion8bit"):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = make_optimizer([{"params": params, "lr": 1e-3}], name, weight_decay=0.01)
        for step, grad in enumerate(grads):
            for p, g in zip(params, grad):
                p.grad = g.clone()
            optimizer.step()
            if step == 1:  # checkpoint and restore the optimizer mid-way: nothing may change
                save_state(tmp_path, name, optimizer.state_dict())
                optimizer = make_optimizer([{"params": params, "lr": 1e-3}], name, weight_decay=0.01)
                optimizer.load_state_dict(load_state(tmp_path, name))
        finals[name] = torch.cat([p.detach().flatten() for p in params])
    assert torch.equal(finals["lion"], finals["lion-pytorch"])
    assert torch.equal(finals["lion"], finals["bnb-lion"])


def test_min_snr_weights_match_diffusers():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from trainer.step import snr

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    timesteps = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(snr(scheduler, timesteps), compute_snr(scheduler, timesteps))


# --- sizes and names of the real SDXL -----------------------------------------------------------


def test_rank8_kohya_set_on_real_sdxl_is_42_6_mb():
    from diffusers import UNet2DConditionModel

    from trainer.models import UNET_TARGETS, add_lora

    config = json.loads((BENCHMARKS / "sdxl_base_unet_config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    lora = add_lora(unet, rank=8, alpha=1.0, targets=UNET_TARGETS["kohya"])
    params = sum(p.numel() for p in lora)
    assert params == 21_278_720
    assert round(params * 2 / 1e6, 1) == 42.6  # fp16 bytes, as kohya's sd-scripts reports rank 8


def test_diffusers_block_names_map_to_sdxl_sgm_names():
    assert sgm_module_path("down_blocks.1.attentions.0.proj_in") == "input_blocks.4.1.proj_in"
    assert sgm_module_path("down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2") == (
        "input_blocks.8.1.transformer_blocks.9.ff.net.2")
    assert sgm_module_path("mid_block.attentions.0.transformer_blocks.0.attn1.to_q") == (
        "middle_block.1.transformer_blocks.0.attn1.to_q")
    assert sgm_module_path("up_blocks.0.attentions.2.proj_out") == "output_blocks.2.1.proj_out"
    assert sgm_module_path("up_blocks.1.attentions.0.proj_out") == "output_blocks.3.1.proj_out"


def test_preflight_warns_when_steps_are_few(caplog, tmp_path):
    from trainer.preflight import preflight

    config = TrainConfig()
    with caplog.at_level(logging.WARNING, logger="lorapipe.train"):
        info = preflight([example(i) for i in range(20)], [], [[0]] * 60, [[0]] * 4, config, 4, 20.0)
    assert info["optimizer_steps"] == 4 and info["micro_batches_per_epoch"] == 5
    assert "only 4 optimizer steps" in caplog.text and "lower effective_batch_size" in caplog.text


# --- real training on the tiny SDXL -------------------------------------------------------------

NAME = "Jane Doe"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from lorapipe.workspace import Workspace

    root = tmp_path_factory.mktemp("train")
    ws = Workspace.at(root / "ws")
    records = cropped_demo_records(root / "photos", ws, 4)
    examples = [
        Example(r.id, ws.path(r.image_path), f"{NAME}, {s.describe()}", r.bucket_size, tuple(r.original_size),
                tuple(r.crop_top_left))
        for r, s in zip(records, scenes(4))
    ]
    # The same images and captions as a reviewed manifest, for the train stage (root / "review.jsonl").
    write_manifest(root / "review.jsonl", [r.model_copy(update={"caption": e.caption, "review": "approved"})
                                           for r, e in zip(records, examples)])
    return root, ws, examples


def overfit_config(base_model) -> TrainConfig:
    # Strong settings so 12 epochs move a random tiny UNet visibly; 4 one-image buckets, 2 steps an epoch.
    return TrainConfig(base_model=str(base_model), epochs=12, micro_batch_size=4, effective_batch_size=2,
                       learning_rate=1e-2, alpha=8.0, device="cpu", sample_prompts=["a photo of {name}"],
                       sample_every_epochs=6, sample_steps=2)


@pytest.fixture(scope="module")
def trained(dataset, tiny_models):
    root, ws, examples = dataset
    config = overfit_config(tiny_models.sdxl)
    return config, train_lora(examples, config, root / "run", ws.cache, name=NAME)


def fixed_noise_loss(base_model, examples, lora_dir=None) -> float:
    """Loss over the training images with fixed noise and timesteps: comparable across models."""
    from trainer.data import TensorCache, cache_latents, cache_text_embeddings
    from trainer.models import UNET_TARGETS, add_lora, load_lora_state, load_sdxl
    from trainer.step import Conditioning, micro_batch_generator, per_image_loss, sample_training_inputs, time_ids_for

    parts = load_sdxl(str(base_model))
    if lora_dir:
        add_lora(parts.unet, 8, 8.0, UNET_TARGETS["kohya"])
        state = load_file(f"{lora_dir}/{LORA_WEIGHTS}")
        load_lora_state(parts.unet, {k.removeprefix("unet."): v for k, v in state.items()})
    cache = Path(lora_dir or examples[0].image_path.parent) / "eval-cache"
    latents = cache_latents(examples, parts.vae, TensorCache(cache / "l"), {}, "cpu", torch.float32)
    text = cache_text_embeddings(examples, [parts.tokenizer, parts.tokenizer_2],
                                 [parts.text_encoder, parts.text_encoder_2], TensorCache(cache / "t"), {}, "cpu")
    losses = []
    with torch.no_grad():
        for k in range(8):
            for i, ex in enumerate(examples):
                x, noise, t = sample_training_inputs(latents[ex.image_id]["mean"][None], latents[ex.image_id]["std"][None],
                                                     parts.vae.config.scaling_factor, 1000, 0.0,
                                                     micro_batch_generator(99, 100 * k + i))
                cond = Conditioning(text[ex.caption]["prompt_embeds"][None], text[ex.caption]["pooled"][None],
                                    time_ids_for([ex]))
                losses.append(per_image_loss(parts.unet, parts.noise_scheduler, x, noise, t, cond, torch.float32))
    return torch.cat(losses).mean().item()


def test_loss_on_four_images_falls(trained, dataset, tiny_models):
    config, result = trained
    _, _, examples = dataset
    assert result.steps == 24 and all(np.isfinite(result.losses))
    before = fixed_noise_loss(tiny_models.sdxl, examples)
    after = fixed_noise_loss(tiny_models.sdxl, examples, result.lora_dir)
    assert after < 0.97 * before, (before, after)


def test_samples_at_epoch_ends_and_checkpoints_pruned(trained):
    _, result = trained
    progress = json.loads((Path(result.lora_dir).parent / "progress.json").read_text())
    assert (progress["step"], progress["total_steps"], progress["epoch"], progress["eta_seconds"]) == (24, 24, 12, 0)
    assert [Path(s).name for s in result.samples] == ["epoch-006.png", "final.png"]
    assert all(Path(s).exists() for s in result.samples)
    checkpoints = sorted(p.name for p in (Path(result.lora_dir).parent / "checkpoints").iterdir())
    assert checkpoints == ["step-000020", "step-000022"]  # epoch ends, newest two kept


def test_saved_lora_reloads_into_the_pipeline_exactly(trained, tiny_models):
    from diffusers import StableDiffusionXLPipeline

    _, result = trained
    path = f"{result.lora_dir}/{LORA_WEIGHTS}"
    with safe_open(path, "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
        adapter = json.loads(f.metadata()["lora_adapter_metadata"])
    assert adapter["unet.r"] == 8 and adapter["unet.lora_alpha"] == 8.0
    assert any(".attn1.to_q." in k for k in saved) and any(".ff.net.2." in k for k in saved)

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models.sdxl)
    pipe.load_lora_weights(result.lora_dir, weight_name=LORA_WEIGHTS)
    loaded = pipe.unet.state_dict()
    for key, tensor in saved.items():
        name = key.removeprefix("unet.").replace(".lora_A.", ".lora_A.default_0.").replace(".lora_B.",
                                                                                         ".lora_B.default_0.")
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)


def render(pipe_factory, lora_file=None):
    pipe = pipe_factory()
    if lora_file:
        pipe.load_lora_weights(str(Path(lora_file).parent), weight_name=Path(lora_file).name)
    return pipe("a photo of Jane Doe", num_inference_steps=3, width=256, height=256, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


def export_both(result, config, tmp_path, resolution=256):
    src = f"{result.lora_dir}/{LORA_WEIGHTS}"
    lineage = {"name": NAME, "image_ids": ["a"]}
    diffusers_file = export_diffusers_lora(src, tmp_path / "jane.diffusers.safetensors", lineage)
    meta = kohya_metadata(config, dataclasses.asdict(result), NAME, ["Jane Doe, smiling, in a red coat"],
                          resolution, lineage)
    kohya_file = export_kohya_lora(src, tmp_path / "jane.safetensors", meta, config.alpha)
    return diffusers_file, kohya_file


def test_kohya_export_loads_without_leftovers_and_renders_like_diffusers_format(trained, tiny_models, tmp_path,
                                                                                caplog):
    from diffusers import StableDiffusionXLPipeline

    config, result = trained
    diffusers_file, kohya_file = export_both(result, config, tmp_path)
    tensors, meta = read_lora(kohya_file)
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert tensors["lora_unet_middle_block_1_proj_in.alpha"].item() == 8.0
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["modelspec.trigger_phrase"]) == ("8", "8.0", NAME)
    assert meta["sshs_model_hash"] == safetensors_hashes(tensors, meta)[0]
    lora_params = sum(t.numel() for k, t in tensors.items() if not k.endswith(".alpha"))
    alphas = sum(k.endswith(".alpha") for k in tensors)
    header = int.from_bytes(kohya_file.read_bytes()[:8], "little")
    assert kohya_file.stat().st_size == 8 + header + 2 * (lora_params + alphas)  # fp16, nothing else

    def pipe():
        p = StableDiffusionXLPipeline.from_pretrained(tiny_models.sdxl)
        p.set_progress_bar_config(disable=True)
        return p

    with caplog.at_level(logging.WARNING):
        from_kohya = render(pipe, kohya_file)
    assert "unexpected keys" not in caplog.text  # peft's warning for weights that matched no module
    loaded = pipe()
    loaded.load_lora_weights(str(tmp_path), weight_name=kohya_file.name)
    assert sum(1 for _, m in loaded.unet.named_modules() if hasattr(m, "lora_A") and m.lora_A) == alphas
    from_diffusers = render(pipe, diffusers_file)
    np.testing.assert_allclose(from_kohya, from_diffusers, atol=1e-6)
    assert np.abs(from_kohya - render(pipe)).mean() > 1e-3


def test_edited_caption_recomputes_one_embedding_and_no_latent(trained, dataset):
    config, _ = trained
    root, ws, examples = dataset
    edited = [dataclasses.replace(examples[0], caption=f"{NAME} laughing")] + examples[1:]
    settings = {"epochs": 1, "sample_prompts": [], "holdout_images": 1, "holdout_min_images": 4}
    again = train_lora(edited, config.model_copy(update=settings), root / "run2", ws.cache)
    assert again.cache["latents"] == {"computed": 0, "reused": 4}
    assert again.cache["text_embeddings"] == {"computed": 1, "reused": 3}
    assert again.images == 3 and len(again.held_out_losses) == 1  # one image held out, measured each epoch


def test_export_refuses_non_finite_weights(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"unet.x.lora_A.weight": torch.tensor([float("nan")])}, bad)
    with pytest.raises(FloatingPointError, match="non-finite"):
        export_diffusers_lora(bad, tmp_path / "out.safetensors", {})
    assert not (tmp_path / "out.safetensors").exists()


# --- crash safety: a real process, killed with SIGKILL mid-epoch, then rerun through the train stage -----


@pytest.mark.slow
def test_job_killed_mid_epoch_resumes_to_the_identical_lora(trained, dataset, capsys):
    from tasks.train import plan_run, run_train
    from trainer.__main__ import main as trainer_main

    config, uninterrupted = trained
    root, ws, examples = dataset
    manifest = str(root / "review.jsonl")
    first = config.model_copy(update={"checkpoint_every_steps": 1})
    job, _, _ = plan_run(manifest, str(ws.root), first, NAME)  # the job the train stage runs
    command = [sys.executable, "-m", "trainer", str(job.write())]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (job.run_dir / "checkpoints" / "step-000005" / "complete.json").exists():  # mid-epoch 3
        assert proc.poll() is None and time.monotonic() < deadline, "trainer ended before the kill"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (job.run_dir / "lora").exists()

    # Rerun through the stage with only settings that leave the weights alone changed: the same run resumes.
    again = first.model_copy(update={"timeout_minutes": 60.0, "keep_checkpoints": 3, "sample_every_epochs": 4})
    resumed = run_train(manifest, str(ws.root), again, NAME)
    assert resumed["run_dir"] == str(job.run_dir)
    assert 5 <= resumed["resumed_from_step"] < 24
    a = load_file(f"{uninterrupted.lora_dir}/{LORA_WEIGHTS}")
    b = load_file(f"{job.run_dir}/lora/{LORA_WEIGHTS}")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    assert resumed["losses"] == uninterrupted.losses

    # The run's job.json edited by hand: a weight setting is refused in one line, nothing is lost.
    lora_bytes = (job.run_dir / "lora" / LORA_WEIGHTS).read_bytes()
    data = json.loads(Path(job.run_dir / "job.json").read_text())
    data["config"]["rank"] = 4  # before: a raw size-mismatch traceback
    (job.run_dir / "job.json").write_text(json.dumps(data))
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    [line] = done.stderr.strip().splitlines()
    assert "rank 8 -> 4 since this run started (finished)" in line and "new run_dir" in line
    data["config"].update(rank=8, learning_rate=1e-3)  # before: resumed with the old learning rate
    (job.run_dir / "job.json").write_text(json.dumps(data))
    assert trainer_main([command[-1]]) == 2
    assert "learning_rate 0.01 -> 0.001 since this run started" in capsys.readouterr().err
    assert (job.run_dir / "lora" / LORA_WEIGHTS).read_bytes() == lora_bytes


# --- text encoders and several processes --------------------------------------------------------


@pytest.mark.slow
def test_text_encoder_lora_trains_exports_and_loads(dataset, tiny_models, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    root, ws, examples = dataset
    config = TrainConfig(base_model=str(tiny_models.sdxl), epochs=2, micro_batch_size=4, effective_batch_size=4,
                         train_text_encoders=True, text_encoder_lr=1e-2, text_encoder_2_lr=1e-2, learning_rate=1e-2,
                         alpha=8.0, device="cpu", sample_prompts=[])
    result = train_lora(examples[:2], config, tmp_path / "run", ws.cache, name=NAME)
    diffusers_file, kohya_file = export_both(result, config, tmp_path)
    keys = read_lora(diffusers_file)[0].keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    # transformers 4's module names, which diffusers loads on transformers 4 and 5 (without `text_model.`,
    # diffusers 0.35 on transformers 4.57 fails: "Cannot copy out of meta tensor").
    assert all(k.startswith(("unet.", "text_encoder.text_model.encoder.layers.",
                             "text_encoder_2.text_model.encoder.layers.")) for k in keys)
    kohya_keys = read_lora(kohya_file)[0].keys()
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya_keys
    assert "lora_te2_text_model_encoder_layers_2_mlp_fc2.alpha" in kohya_keys

    def pipe():
        p = StableDiffusionXLPipeline.from_pretrained(tiny_models.sdxl)
        p.set_progress_bar_config(disable=True)
        return p

    base = pipe()
    base_embeds = base.encode_prompt("a photo of Jane Doe", do_classifier_free_guidance=False)[0]
    tuned = pipe()
    tuned.load_lora_weights(str(kohya_file.parent), weight_name=kohya_file.name)
    tuned_embeds = tuned.encode_prompt("a photo of Jane Doe", do_classifier_free_guidance=False)[0]
    assert (tuned_embeds - base_embeds).abs().max() > 1e-4  # the text encoders' LoRA is applied
    np.testing.assert_allclose(render(pipe, kohya_file), render(pipe, diffusers_file), atol=1e-6)


@pytest.mark.slow
def test_two_processes_with_accelerate_train_like_one(trained, dataset):
    from tasks.train import run_trainer

    config, single = trained
    root, ws, examples = dataset
    job = Job(examples, config.model_copy(update={"num_processes": 2, "sample_prompts": []}), root / "ddp",
              ws.cache, NAME)
    result = run_trainer(job)
    assert result["steps"] == single.steps
    a = load_file(f"{single.lora_dir}/{LORA_WEIGHTS}")
    b = load_file(f"{job.run_dir}/lora/{LORA_WEIGHTS}")
    # The same micro-batches with the same noise; each step's two micro-batches are summed by the
    # all-reduce instead of in one process, and a + b == b + a: the LoRA is bit-identical.
    assert result["losses"] == single.losses
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


def test_pickle_checkpoints_are_refused(tmp_path):
    from trainer.models import load_sdxl

    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="model.ckpt: only .safetensors"):
        load_sdxl(str(ckpt))


def test_a_single_file_checkpoint_trains_like_its_diffusers_folder(tiny_models, dataset, tmp_path):
    """Users download one .safetensors (SGM layout); it must load offline given a config folder, and train."""
    from sgm_checkpoint import write_sgm_checkpoint
    from trainer.models import load_sdxl

    checkpoint = write_sgm_checkpoint(tiny_models.sdxl, tmp_path / "tiny-sdxl.safetensors")
    from_file = load_sdxl(str(checkpoint), single_file_config=str(tiny_models.sdxl))
    from_folder = load_sdxl(str(tiny_models.sdxl))
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(from_file, part).state_dict(), getattr(from_folder, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part

    root, ws, examples = dataset
    config = TrainConfig(base_model=str(checkpoint), base_model_config=str(tiny_models.sdxl), epochs=1,
                         effective_batch_size=4, device="cpu", sample_prompts=[])
    assert config.tokenizer_source == str(tiny_models.sdxl)
    result = train_lora(examples, config, tmp_path / "run", ws.cache)
    assert result.steps == 1 and Path(result.lora_dir, LORA_WEIGHTS).exists()


def test_checkpointing_min_snr_noise_offset_and_a_vae_override_train(dataset, tiny_models, tmp_path):
    root, ws, examples = dataset
    config = TrainConfig(base_model=str(tiny_models.sdxl), vae=str(tiny_models.sdxl / "vae"), epochs=1,
                         effective_batch_size=4, gradient_checkpointing=True, min_snr_gamma=5.0, noise_offset=0.05,
                         lr_scheduler="cosine", lr_warmup_steps=1, device="cpu", sample_prompts=[])
    result = train_lora(examples[:2], config, tmp_path / "run", ws.cache)
    assert result.steps == 1 and np.isfinite(result.final_loss)


def test_non_finite_losses_abort_with_a_clear_error(dataset, tiny_models, tmp_path):
    root, ws, examples = dataset
    config = TrainConfig(base_model=str(tiny_models.sdxl), epochs=4, effective_batch_size=1, micro_batch_size=1,
                         device="cpu", sample_prompts=[])
    # Settings refuse an infinite noise offset; model_copy skips validation, to reach the trainer's own guard.
    config = config.model_copy(update={"noise_offset": float("inf")})
    with pytest.raises(FloatingPointError, match="3 optimizer steps in a row had a non-finite loss"):
        train_lora(examples[:1], config, tmp_path / "run", ws.cache)
    assert not (tmp_path / "run" / "lora").exists()
