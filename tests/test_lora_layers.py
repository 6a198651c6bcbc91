"""trainer/lora_layers.py against peft's own LoRA layers: the same outputs, gradients and files.

Every comparison sets the LoRA weights itself (A and B random and non-zero), so it holds whatever
initialisation `add_lora` uses.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import cropped_demo_records
from lorapipe.config import TrainConfig
from trainer import Example, train_lora
from trainer.lora_layers import attach
from trainer.loop import LORA_WEIGHTS
from trainer.models import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_lora

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))


@pytest.fixture(scope="module")
def tiny_unet(tiny_models):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_models.sdxl, subfolder="unet")
    return unet.requires_grad_(False)


def with_lora(module, targets, dtype=torch.float32, seed=0):
    """A copy of `module` with a LoRA of random non-zero A and B (fp32) and its frozen weights in `dtype`."""
    from peft import LoraConfig, inject_adapter_in_model

    module = copy.deepcopy(module)
    if hasattr(module, "add_adapter"):
        params = add_lora(module, 8, 4.0, targets)  # diffusers' and transformers' models: as the trainer does
    else:
        inject_adapter_in_model(LoraConfig(r=8, lora_alpha=4.0, target_modules=targets), module)
        params = [p for p in module.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    for p in module.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    return module, params


def unet_step(unet, params, dtype, micro_batches=(0,), autocast=False):
    """Output of the last micro-batch and the LoRA gradients summed over `micro_batches` (seeds)."""
    from unets import unet_inputs

    for p in params:
        p.grad = None
    for seed in micro_batches:
        sample, t, text, added = unet_inputs(unet, 2, 256, "cpu", dtype, seed)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = unet(sample, t, text, added_cond_kwargs=added).sample
        out.float().pow(2).mean().backward()
    return out.detach().float(), [p.grad.clone() for p in params]


def relative(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def flat(grads) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("targets", ["kohya", "attention"])
def test_outputs_and_gradients_equal_peft_in_fp32(tiny_unet, targets):
    unet, params = with_lora(tiny_unet, UNET_TARGETS[targets])
    peft_out, peft_grads = unet_step(unet, params, torch.float32)
    fast = attach(unet)
    assert len(fast.slots) == (242 if targets == "kohya" else 176)
    assert sum(len(g.slots) > 1 for g in fast.groups) == 44  # q/k/v of 22 self-, k/v of 22 cross-attentions
    out, grads = unet_step(unet, params, torch.float32)
    assert fast.grad is not None  # every layer ran the fast path (none fell back to peft's forward)
    torch.testing.assert_close(out, peft_out, rtol=1e-5, atol=1e-5)
    for g, ref in zip(grads, peft_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-7)
    fast.detach()
    torch.testing.assert_close(unet_step(unet, params, torch.float32)[0], peft_out, rtol=0, atol=0)


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-base", "bf16-autocast"])
def test_a_bf16_base_is_as_close_to_fp32_as_peft_is(tiny_unet, autocast):
    """bf16 base, fp32 LoRA weights: the LoRA branch runs in bf16 here (as peft's does under autocast),
    in fp32 in peft without autocast. Both must sit as close to the all-fp32 result."""
    unet, params = with_lora(tiny_unet, UNET_TARGETS["kohya"])
    ref_out, ref_grads = unet_step(unet, params, torch.float32)
    for p in unet.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    peft_out, peft_grads = unet_step(unet, params, torch.bfloat16, autocast=autocast)
    fast = attach(unet)
    out, grads = unet_step(unet, params, torch.bfloat16, autocast=autocast)
    assert fast.grad is not None  # every layer ran the fast path (none fell back to peft's forward)
    assert all(g.dtype == torch.float32 for g in grads)
    assert relative(out, ref_out) <= 1.25 * relative(peft_out, ref_out) + 1e-3
    assert relative(flat(grads), flat(ref_grads)) <= 1.25 * relative(flat(peft_grads), flat(ref_grads)) + 1e-3
    assert relative(flat(grads), flat(peft_grads)) < 0.1  # bf16: 8 bits of mantissa


def test_gradient_accumulation_and_checkpointing_equal_peft(tiny_unet):
    unet, params = with_lora(tiny_unet, UNET_TARGETS["kohya"])
    _, peft_grads = unet_step(unet, params, torch.float32, micro_batches=(1, 2, 3))
    fast = attach(unet)
    _, grads = unet_step(unet, params, torch.float32, micro_batches=(1, 2, 3))
    assert fast.grads_are_views()  # micro-batches 2 and 3 were added in one operation
    unet.enable_gradient_checkpointing()
    unet.train()
    _, checkpointed = unet_step(unet, params, torch.float32, micro_batches=(1, 2, 3))
    for g, c, ref in zip(grads, checkpointed, peft_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(c, ref, rtol=1e-4, atol=1e-7)


def test_text_encoder_attention_shares_its_down_projection(tiny_models):
    from transformers import CLIPTextModelWithProjection

    encoder = CLIPTextModelWithProjection.from_pretrained(tiny_models.sdxl, subfolder="text_encoder_2")
    encoder, params = with_lora(encoder.requires_grad_(False), TEXT_ENCODER_TARGETS)
    ids = torch.randint(0, encoder.config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(0))

    def step():
        for p in params:
            p.grad = None
        out = encoder(ids, output_hidden_states=True)
        (out.hidden_states[-2].pow(2).mean() + out.text_embeds.pow(2).mean()).backward()
        return out.hidden_states[-2].detach(), [p.grad for p in params]

    peft_out, peft_grads = step()
    fast = attach(encoder)
    assert {len(g.slots) for g in fast.groups} == {1, 3}  # q/k/v of every layer read one input
    out, grads = step()
    torch.testing.assert_close(out, peft_out, rtol=1e-5, atol=1e-6)
    assert [g is None for g in grads] == [g is None for g in peft_grads]
    for g, ref in zip(grads, peft_grads):
        if ref is not None:
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-7)


class ToyAttention(torch.nn.Module):
    """q/k/v called on different inputs, or k not used at all: the group must not share then."""

    def __init__(self, mode: str):
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.mode = (torch.nn.Linear(6, 6), torch.nn.Linear(6, 6),
                                                      torch.nn.Linear(6, 6), mode)

    def forward(self, x, y):
        k = self.to_k(y if self.mode == "different" else x)
        return self.to_q(x) * (k if self.mode != "unused" else 1) + self.to_v(x)


@pytest.mark.parametrize("mode", ["shared", "different"])
def test_projections_that_do_not_share_an_input_each_compute_their_own(mode):
    torch.manual_seed(0)
    toy, params = with_lora(ToyAttention(mode).requires_grad_(False), ["to_q", "to_k", "to_v"])
    x, y = torch.randn(3, 6, requires_grad=True), torch.randn(3, 6, requires_grad=True)

    def step():
        for t in [*params, x, y]:
            t.grad = None
        toy(x, y).pow(2).sum().backward()
        return [t.grad for t in [*params, x]] + [y.grad if mode == "different" else y.grad is None]

    reference = step()
    fast = attach(toy)
    assert [len(g.slots) for g in fast.groups] == [3]
    for g, ref in zip(step(), reference):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)


def test_fp32_inputs_under_autocast_run_the_fast_path_like_autocast_runs_peft():
    """On the GPU, autocast runs norms in fp32: their fp32 outputs reach bf16 Linears, which cast them."""
    torch.manual_seed(0)
    toy, params = with_lora(ToyAttention("shared").requires_grad_(False), ["to_q", "to_k", "to_v"], torch.bfloat16)
    x = torch.randn(5, 6, requires_grad=True)

    def step():
        for t in [*params, x]:
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = toy(x, x)
        out.float().pow(2).sum().backward()
        return [out.detach().float()] + [t.grad for t in [*params, x]]

    reference = step()
    fast = attach(toy)
    results = step()
    assert fast.grad is not None and results[-1].dtype == torch.float32
    for g, ref in zip(results, reference):
        assert relative(g, ref) < 0.02


def test_an_unused_projection_is_an_error_not_a_silent_gradient():
    toy, params = with_lora(ToyAttention("unused").requires_grad_(False), ["to_q", "to_k", "to_v"])
    attach(toy)
    with pytest.raises(RuntimeError, match="was not used"):
        toy(torch.randn(3, 6), torch.randn(3, 6)).sum().backward()


def test_peft_describes_saves_and_disables_the_lora(tiny_unet):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from unets import unet_inputs

    unet, params = with_lora(tiny_unet, UNET_TARGETS["kohya"])
    before = {k: v.clone() for k, v in get_peft_model_state_dict(unet).items()}
    names = list(unet.state_dict())
    fast = attach(unet)
    unet_step(unet, params, torch.float32)
    after = get_peft_model_state_dict(unet)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert list(unet.state_dict()) == names

    sample, t, text, added = unet_inputs(unet, 1, 256, "cpu", torch.float32)
    with torch.no_grad():
        unet.disable_adapters()
        torch.testing.assert_close(unet(sample, t, text, added_cond_kwargs=added).sample,
                                   tiny_unet(sample, t, text, added_cond_kwargs=added).sample, rtol=0, atol=0)
        unet.enable_adapters()
    fast.detach()
    assert all("forward" not in s.layer.__dict__ for s in fast.slots)

    # Dropout is a peft feature these layers leave to peft.
    dropped = copy.deepcopy(tiny_unet)
    dropped.add_adapter(LoraConfig(r=4, lora_alpha=4, lora_dropout=0.1, target_modules=["to_q"]))
    assert attach(dropped).slots == []


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from lorapipe.workspace import Workspace

    root = tmp_path_factory.mktemp("fast-lora")
    ws = Workspace.at(root / "ws")
    records = cropped_demo_records(root / "photos", ws, 2)
    return root, ws, [Example(r.id, ws.path(r.image_path), f"Jane Doe, photo {i}", r.bucket_size,
                              tuple(r.original_size), tuple(r.crop_top_left)) for i, r in enumerate(records)]


def test_training_writes_the_lora_peft_s_step_writes(photos, tiny_models, monkeypatch):
    """Through train_lora, two micro-batches accumulated per step: the same file, key for key and value
    for value. Lion steps by the sign of its momentum, so rounding-level gradient differences change a
    value only where that momentum is ~0: at most a few in a million values, by at most 2 lr a step."""
    root, ws, examples = photos
    config = TrainConfig(base_model=str(tiny_models.sdxl), epochs=3, micro_batch_size=1, effective_batch_size=2,
                         learning_rate=1e-2, alpha=8.0, device="cpu", sample_prompts=[], min_bucket_images=1)
    fast = train_lora(examples, config, root / "fast", ws.cache, name="Jane Doe")
    monkeypatch.setattr("trainer.loop.attach_fast_lora", lambda module: None)
    plain = train_lora(examples, config, root / "peft", ws.cache, name="Jane Doe")
    files = []
    for result in (fast, plain):
        with safe_open(f"{result.lora_dir}/{LORA_WEIGHTS}", "pt") as f:
            files.append(({k: f.get_tensor(k) for k in f.keys()}, f.metadata()))
    (a, meta_a), (b, meta_b) = files
    assert a.keys() == b.keys() and meta_a == meta_b and len(a) == 2 * 242
    assert all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape for k in a)
    values = sum(t.numel() for t in a.values())
    differ = sum(int((a[k] != b[k]).sum()) for k in a)
    assert differ <= values * 1e-5, f"{differ} of {values} values differ"  # 0 when this was written
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 2 * config.learning_rate * fast.steps
    assert fast.losses == pytest.approx(plain.losses, rel=1e-5)
