"""`lorapipe resize LORA --rank 4`: SVD to a lower rank, energy reported, kohya file that diffusers loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from flows.cli import app
from trainer.export import read_lora, write
from trainer.kohya import to_kohya
from trainer.models import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_lora, load_sdxl, lora_state

runner = CliRunner()
ALPHA = 4.0  # alpha != rank: a resize that gets alpha wrong changes the LoRA's strength


@pytest.fixture(scope="module")
def rank8_file(tiny_models, tmp_path_factory):
    """A kohya-format rank-8 LoRA on the tiny SDXL's UNet and first text encoder, with non-zero up weights."""
    parts = load_sdxl(str(tiny_models.sdxl))
    add_lora(parts.unet, 8, ALPHA, UNET_TARGETS["kohya"])
    add_lora(parts.text_encoder, 8, ALPHA, TEXT_ENCODER_TARGETS)
    torch.manual_seed(0)
    states = {}
    for component, module in (("unet", parts.unet), ("text_encoder", parts.text_encoder)):
        state = lora_state(module)
        for key, tensor in state.items():
            if ".lora_B." in key:
                # Decaying columns: a real spectrum, so rank 4 keeps most but not all of the energy.
                state[key] = torch.randn_like(tensor) * torch.tensor([0.5 ** i for i in range(8)]) * 0.1
        states[component] = state
    tensors = to_kohya(states, ALPHA, parts.unet.config.layers_per_block)
    path = tmp_path_factory.mktemp("resize") / "jane-rank8.safetensors"
    write(path, tensors, {"ss_network_dim": "8", "ss_network_alpha": json.dumps(ALPHA), "ss_output_name": "jane"})
    return path


def deltas(path) -> dict[str, torch.Tensor]:
    """Each module's ΔW = (alpha / rank) · up @ down, from the file's factors (float64)."""
    tensors, _ = read_lora(path)
    out = {}
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            down, up = tensors[key].double(), tensors[f"{name}.lora_up.weight"].double()
            out[name] = float(tensors[f"{name}.alpha"]) / down.shape[0] * (up @ down)
    return out


def test_resize_to_4_keeps_the_energy_it_reports_and_loads_in_diffusers(rank8_file, tiny_models, tmp_path):
    dest = tmp_path / "jane-rank4.safetensors"
    result = runner.invoke(app, ["resize", str(rank8_file), "--rank", "4", "--out", str(dest)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["from_rank"], report["to_rank"]) == (8, 4)

    before, after = deltas(rank8_file), deltas(dest)
    assert before.keys() == after.keys() and any(k.startswith("lora_te1_") for k in after)
    # Energy kept, checked against the product of the factors: ‖ΔW'‖² / ‖ΔW‖², over all modules.
    kept = sum(float((after[k] ** 2).sum()) for k in after) / sum(float((before[k] ** 2).sum()) for k in before)
    assert report["energy_kept"] == pytest.approx(kept, rel=2e-3)
    assert 0.5 < kept < 0.999
    # Each module is the best rank-4 approximation of the original (Eckart–Young), up to fp16 rounding.
    for name in list(before)[:5]:
        u, s, vh = torch.linalg.svd(before[name], full_matrices=False)
        best = (u[:, :4] * s[:4]) @ vh[:4]
        assert torch.allclose(after[name], best, atol=2e-3 * float(best.abs().max()))
    per_module = json.loads((tmp_path / "jane-rank4.resize.json").read_text())
    assert len(per_module["modules"]) == len(before)
    assert all(0 < m["energy_kept"] <= 1 and m["new_rank"] == 4 for m in per_module["modules"])

    with safe_open(str(dest), framework="pt") as f:
        meta = f.metadata()
        alphas = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}
    assert alphas == {ALPHA / 8 * 4}  # alpha/rank kept, as kohya's resize_lora does
    assert (meta["ss_network_dim"], json.loads(meta["ss_network_alpha"])) == ("4", 2.0)
    assert json.loads(meta["lorapipe_resize"])["to_rank"] == 4 and meta["ss_output_name"] == "jane"
    assert meta["sshs_model_hash"]

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models.sdxl)
    pipe.set_progress_bar_config(disable=True)

    def render():
        return pipe("a photo of Jane Doe", num_inference_steps=2, width=128, height=128, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    base = render()
    pipe.load_lora_weights(str(dest.parent), weight_name=dest.name)
    with_lora = render()
    assert np.isfinite(with_lora).all() and np.abs(with_lora - base).mean() > 1e-4


def test_resize_to_the_same_rank_keeps_everything(rank8_file, tmp_path):
    dest = tmp_path / "same.safetensors"
    result = runner.invoke(app, ["resize", str(rank8_file), "--rank", "16", "--out", str(dest)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["energy_kept"] == pytest.approx(1.0, abs=1e-6)
    before, after = deltas(rank8_file), deltas(dest)
    for name in before:
        assert torch.allclose(after[name], before[name], atol=2e-3 * float(before[name].abs().max()))


def test_a_file_that_is_not_a_kohya_lora_is_one_line(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "diffusers-format.safetensors"
    save_file({"unet.down_blocks.0.lora_A.weight": torch.zeros(2, 4)}, str(other))
    from lorapipe.errors import UserError

    result = runner.invoke(app, ["resize", str(other), "--rank", "4"])
    assert isinstance(result.exception, UserError)
    assert "is not a kohya LoRA key" in str(result.exception) and "\n" not in str(result.exception)


def test_conv_modules_and_missing_alpha_resize_like_linear_ones():
    """LoCon-style 3x3 conv LoRA (4-D down, 1x1 up) flattens to the same algebra; no .alpha means alpha = rank."""
    from trainer.resize import resize_module

    torch.manual_seed(1)
    down, up = torch.randn(8, 16, 3, 3), torch.randn(32, 8, 1, 1) * torch.tensor([0.6 ** i for i in range(8)])[:, None, None]
    new_down, new_up, new_alpha, kept, _ = resize_module(down, up, None, 4)
    assert new_down.shape == (4, 16, 3, 3) and new_up.shape == (32, 4, 1, 1) and new_alpha == 4.0
    full = (up.reshape(32, 8) @ down.reshape(8, -1)).double()
    u, s, vh = torch.linalg.svd(full, full_matrices=False)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    assert torch.allclose((new_up.reshape(32, 4) @ new_down.reshape(4, -1)).double(), best, atol=1e-4)
    assert kept == pytest.approx(float((s[:4] ** 2).sum() / (s ** 2).sum()), rel=1e-6)
