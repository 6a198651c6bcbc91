"""The recipe as kohya users know it: initialisation, alpha 1 / rank 8 / Lion 4e-4 saved and reloaded exactly,
min-SNR and time_ids against the reference formulas, and the settings that must reach the step."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import cropped_demo_records
from lorapipe.config import TrainConfig
from lorapipe.demo_data import scenes
from lorapipe.errors import UserError
from trainer import Example, train_lora
from trainer.loop import LORA_WEIGHTS

NAME = "Jane Doe"
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    from lorapipe.workspace import Workspace

    root = tmp_path_factory.mktemp("recipe")
    ws = Workspace.at(root / "ws")
    records = cropped_demo_records(root / "photos", ws, 4)
    return ws, [Example(r.id, ws.path(r.image_path), f"{NAME}, {s.describe()}", r.bucket_size, tuple(r.original_size),
                        tuple(r.crop_top_left)) for r, s in zip(records, scenes(4))]


def quick(base_model, **settings) -> TrainConfig:
    """One optimizer step over two images, nothing rendered."""
    return TrainConfig(**{"base_model": str(base_model), "epochs": 1, "effective_batch_size": 2, "device": "cpu",
                          "sample_prompts": [], **settings})


def model_copy(tiny_models, tmp_path, **scheduler) -> Path:
    """The tiny SDXL with other scheduler settings (v-prediction, zero terminal SNR, ...)."""
    dest = tmp_path / "model"
    shutil.copytree(tiny_models.sdxl, dest)
    config_file = dest / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **scheduler}))
    return dest


# --- initialisation -----------------------------------------------------------------------------


def kohya_bound(in_features: int) -> float:
    """kohya's LoRAModule: torch.nn.init.kaiming_uniform_(lora_down.weight, a=math.sqrt(5)), lora_up zero.
    kaiming_uniform_ draws U(-b, b) with b = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + a^2))."""
    return math.sqrt(2 / (1 + 5)) * math.sqrt(3 / in_features)


def lora_layers(module):
    return [(n, m) for n, m in module.named_modules() if "default" in getattr(m, "lora_A", {})]


def test_lora_init_is_kohyas_on_every_layer_and_gaussian_stays_a_setting(tiny_models):
    from diffusers import ModelMixin, Transformer2DModel, UNet2DConditionModel
    from diffusers.loaders import PeftAdapterMixin
    from scipy.stats import kstest

    from trainer.models import UNET_TARGETS, add_lora

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_models.sdxl, subfolder="unet")
    add_lora(unet, rank=8, alpha=1.0, targets=UNET_TARGETS["kohya"])  # the default init
    normalised = []
    for name, layer in lora_layers(unet):
        down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        bound = kohya_bound(down.shape[1])
        assert down.abs().max() <= bound and torch.count_nonzero(up) == 0, name
        normalised.append((down / bound).flatten())
    values = torch.cat(normalised).detach().numpy()
    assert values.size > 10_000 and kstest(values, "uniform", args=(-1, 2)).pvalue > 1e-3  # U(-1, 1) after scaling

    # At SDXL's own widths (a transformer block of its first level: 640 channels, 2048-wide text, GEGLU
    # 2560) the std is kohya's 1/sqrt(3 * in_features): 0.0228 at 640, 0.0128 at 2048, 0.0114 at 2560.
    class Block(ModelMixin, PeftAdapterMixin):  # a UNet's adapter API around one transformer block
        def __init__(self):
            super().__init__()
            self.attentions = Transformer2DModel(num_attention_heads=10, attention_head_dim=64, in_channels=640,
                                                 cross_attention_dim=2048, use_linear_projection=True)

    def sdxl_block():
        return Block()

    block = sdxl_block()
    add_lora(block, rank=8, alpha=1.0, targets=UNET_TARGETS["kohya"])
    assert {layer.lora_A["default"].weight.shape[1] for _, layer in lora_layers(block)} == {640, 2048, 2560}
    for name, layer in lora_layers(block):
        down = layer.lora_A["default"].weight
        assert down.std().item() == pytest.approx(1 / math.sqrt(3 * down.shape[1]), rel=0.05), name

    block = sdxl_block()
    add_lora(block, rank=8, alpha=1.0, targets=["to_q"], init="gaussian")  # peft's "gaussian": N(0, 1/rank)
    for name, layer in lora_layers(block):
        assert layer.lora_A["default"].weight.std().item() == pytest.approx(1 / 8, rel=0.05), name
    assert TrainConfig().lora_init == "kohya"


def test_a_rank_above_a_layers_features_is_refused(tiny_models):
    from diffusers import UNet2DConditionModel

    from trainer.models import UNET_TARGETS, add_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_models.sdxl, subfolder="unet")
    with pytest.raises(UserError, match=r"train.rank 128 is above the features of .* use a rank of at most 64"):
        add_lora(unet, rank=128, alpha=1.0, targets=UNET_TARGETS["kohya"])


# --- the step against the reference formulas ------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weight_is_the_clamp_and_divisor_kohya_and_diffusers_use(tiny_models, prediction_type):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from trainer.models import load_sdxl
    from trainer.step import Conditioning, min_snr_weight, per_image_loss, snr

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type)
    timesteps = torch.tensor([0, 10, 200, 500, 999])
    s, gamma = compute_snr(scheduler, timesteps), 5.0
    # diffusers' train_text_to_image.py: stack([snr, gamma]).min / snr (epsilon) or / (snr + 1) (v);
    # kohya's apply_snr_weight: minimum(snr, gamma) / snr, or / (snr + 1) with v_prediction.
    divisor = s + 1 if prediction_type == "v_prediction" else s
    expected = torch.stack([s, gamma * torch.ones_like(s)], dim=1).min(dim=1)[0] / divisor
    weight = min_snr_weight(snr(scheduler, timesteps), gamma, prediction_type == "v_prediction")
    torch.testing.assert_close(weight, expected)
    assert weight[0] < weight[-1] or prediction_type == "v_prediction"  # easy timesteps are damped

    # ...and the loss is weighted by exactly that, image by image.
    unet = load_sdxl(str(tiny_models.sdxl)).unet
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(5, 4, 8, 8, generator=generator), torch.randn(5, 4, 8, 8, generator=generator)
    cond = Conditioning(torch.randn(5, 77, unet.config.cross_attention_dim, generator=generator),
                        torch.randn(5, 48, generator=generator), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 5))
    with torch.no_grad():
        plain = per_image_loss(unet, scheduler, latents, noise, timesteps, cond, torch.float32)
        weighted = per_image_loss(unet, scheduler, latents, noise, timesteps, cond, torch.float32, gamma)
    torch.testing.assert_close(weighted, plain * expected)


def test_time_ids_match_diffusers_for_a_non_square_bucket_with_a_crop(tiny_models):
    from diffusers import StableDiffusionXLPipeline

    from trainer.step import time_ids_for

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models.sdxl)
    ex = Example("a", Path("a.png"), "caption", bucket=(1216, 832), original_size=(1000, 1500),
                 crop_top_left=(12, 140))
    # The reference is what the pipeline conditions on at inference: diffusers' private `_get_add_time_ids`
    # (no public function computes it; called here only as the test's reference).
    expected = pipe._get_add_time_ids(original_size=(1000, 1500), crops_coords_top_left=(12, 140),
                                      target_size=(832, 1216), dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(time_ids_for([ex]), expected)


# --- the recipe's own numbers, trained, saved and reloaded ----------------------------------------


def test_recipe_defaults_alpha_1_rank_8_lion_4e_4_reload_exactly_in_both_formats(examples, tiny_models, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from trainer.export import export_diffusers_lora, export_kohya_lora, kohya_metadata, read_lora

    ws, exs = examples
    config = quick(tiny_models.sdxl)
    assert (config.rank, config.alpha, config.learning_rate, config.optimizer) == (8, 1.0, 4e-4, "auto")
    result = train_lora(exs[:2], config, tmp_path / "run", ws.cache, name=NAME)
    trained = load_file(f"{result.lora_dir}/{LORA_WEIGHTS}")
    ups = [t for k, t in trained.items() if ".lora_B." in k]
    # One Lion step from B = 0: every element of B moved by exactly the learning rate (or stayed).
    assert all(torch.isin(t.abs(), torch.tensor([0.0, 4e-4])).all() for t in ups)
    assert any(torch.count_nonzero(t) for t in ups)
    assert result.model["mixed_precision"] == "no"  # fp32 on the CPU, whatever was asked

    meta = kohya_metadata(config, dataclasses.asdict(result), NAME, [e.caption for e in exs[:2]], 256, {})
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_mixed_precision"]) == ("8", "1.0", "no")
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    diffusers_file = export_diffusers_lora(f"{result.lora_dir}/{LORA_WEIGHTS}", tmp_path / "j.diffusers.safetensors",
                                           {})
    kohya_file = export_kohya_lora(f"{result.lora_dir}/{LORA_WEIGHTS}", tmp_path / "j.safetensors", meta, config.alpha)
    assert read_lora(kohya_file)[0]["lora_unet_middle_block_1_proj_in.alpha"].item() == 1.0

    for source in (Path(result.lora_dir) / LORA_WEIGHTS, diffusers_file, kohya_file):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models.sdxl)
        pipe.load_lora_weights(str(source.parent), weight_name=source.name)
        layers = lora_layers_any(pipe.unet)
        assert len(layers) == len(ups), source.name
        exact = source.name == LORA_WEIGHTS  # the exported files are fp16 by design
        for name, layer in layers:
            adapter = next(iter(layer.lora_A))
            assert layer.scaling[adapter] == 1.0 / 8, (source.name, name)  # alpha / rank, as trained
            key = f"unet.{name}.lora_B.weight"
            want = trained[key] if exact else trained[key].half().float()
            assert torch.equal(layer.lora_B[adapter].weight.float(), want), (source.name, name)


def lora_layers_any(module):
    return [(n, m) for n, m in module.named_modules() if getattr(m, "lora_A", None)]


# --- settings that must reach the step -------------------------------------------------------------


def test_noise_offset_min_snr_and_a_single_file_vae_change_what_is_trained(examples, tiny_models, tmp_path):
    from diffusers import AutoencoderKL

    from sgm_checkpoint import write_vae_single_file
    from tasks.evaluate import run_evaluate
    from lorapipe.config import EvaluateConfig
    from trainer.sampling import load_pipeline

    ws, exs = examples
    vae = AutoencoderKL.from_pretrained(tiny_models.sdxl, subfolder="vae")
    state = {k: v * 1.5 if k.startswith("encoder.conv_in") else v for k, v in vae.state_dict().items()}
    vae_file = write_vae_single_file(state, dict(vae.config), tmp_path / "other_vae.safetensors")

    def first_loss(**settings) -> float:
        run = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}"
        return train_lora(exs[:2], quick(tiny_models.sdxl, **settings), run, ws.cache).losses[0]

    base = first_loss()
    assert first_loss() == base  # the same settings give the same loss: differences below are the setting's
    assert first_loss(noise_offset=0.5) != base
    assert first_loss(min_snr_gamma=0.01) != base  # small: below every sampled SNR, so the weight is < 1
    assert first_loss(vae=str(vae_file)) != base

    # The same single-file VAE renders samples in evaluate, with its own weights.
    pipe = load_pipeline(str(tiny_models.sdxl), vae=str(vae_file), device="cpu")
    assert torch.equal(pipe.vae.encoder.conv_in.weight, state["encoder.conv_in.weight"])
    lora = next(tmp_path.glob("run-*/lora")) / LORA_WEIGHTS
    train = quick(tiny_models.sdxl, vae=str(vae_file))
    out = run_evaluate(str(lora), str(ws.root), EvaluateConfig(prompts=["a photo of {name}"], steps=1), train, NAME,
                       64)
    assert Path(out["samples"]).exists()


def test_v_prediction_with_zero_terminal_snr_and_min_snr_trains_and_says_so(examples, tiny_models, tmp_path):
    from trainer.export import kohya_metadata

    ws, exs = examples
    model = model_copy(tiny_models, tmp_path, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    config = quick(model, min_snr_gamma=5.0)
    result = train_lora(exs[:2], config, tmp_path / "run", ws.cache)
    assert np.isfinite(result.losses).all() and result.model["prediction_type"] == "v_prediction"
    meta = kohya_metadata(config, dataclasses.asdict(result), NAME, [], 256, {})
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_zero_terminal_snr"] == "true"


@pytest.mark.parametrize("scheduler, settings, message", [
    ({"prediction_type": "sample"}, {}, "its scheduler predicts 'sample'; lorapipe trains epsilon and v_prediction"),
    ({"rescale_betas_zero_snr": True}, {"min_snr_gamma": 5.0},
     "train.min_snr_gamma 5.0: .* zero-terminal-SNR schedule, where the epsilon weight min"),
])
def test_what_would_train_the_wrong_target_or_nan_is_refused(examples, tiny_models, tmp_path, scheduler, settings,
                                                            message):
    ws, exs = examples
    model = model_copy(tiny_models, tmp_path, **scheduler)
    with pytest.raises(UserError, match=message):
        train_lora(exs[:2], quick(model, **settings), tmp_path / "run", ws.cache)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_numpy_pin_excludes_versions_without_bitwise_count():
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [numpy] = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "numpy"]
    assert not numpy.specifier.contains("1.26.4") and numpy.specifier.contains("2.0.0")
    assert hasattr(np, "bitwise_count")  # what lorapipe/phash.py calls
