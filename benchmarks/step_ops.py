"""Operations dispatched per UNet forward+backward: bare UNet vs peft's LoRA vs lorapipe's LoRA step.

    python benchmarks/step_ops.py                 # SDXL at 1024² and the tiny UNet, kohya and attention sets
    python benchmarks/step_ops.py --models sdxl --targets kohya

On a GPU at small micro-batches a LoRA step is launch-bound: the time goes to dispatching operations,
not to math, and the number dispatched does not depend on the machine. So it is counted here without
one: the UNet is built on the `meta` device (no memory, no weights; SDXL's real architecture from
`sdxl_base_unet_config.json`), one micro-batch of 1 runs forward and backward, and a
`TorchDispatchMode` counts every aten operation dispatched, leaving out views and transposes (no kernel
runs for them). Takes seconds on a CPU.

What each row runs (same inputs; loss = mean of the output in fp32; LoRA rank 8, alpha 8):
- bare UNet: no LoRA, frozen weights; the latents require grad so backward runs through the UNet;
- peft LoRA: diffusers' training example (`add_adapter(LoraConfig)`, LoRA weights fp32);
- lorapipe LoRA: `trainer.models.add_lora` + `trainer.lora_layers.attach`, what the trainer runs;
- lorapipe full step: `trainer.step.per_image_loss` (noise, UNet, MSE) and backward, with lorapipe's LoRA.

Base weights in bf16 for SDXL (as on the GPU), fp32 for the tiny UNet (as the CPU trains it). Meta
tensors have no autocast: the counts are without it (the GPU trainer runs under bf16 autocast, which
adds casts to every row). On the meta device attention runs as its math decomposition (a fused
kernel on the GPU), in every row alike.

Reference (measured on an H200): kernel launches per forward+backward, bare 8.8k, peft LoRA 21.6k.
"""

from __future__ import annotations

import argparse
import collections
import copy
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode  # the documented way to observe dispatch

from unets import LABEL, RESOLUTION, build_unet, lorapipe_lora, plain_peft_lora, unet_inputs

GOAL = 1.7  # lorapipe's LoRA step at most this many times the bare UNet's operations


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))

    def total(self) -> int:
        return sum(n for f, n in self.counts.items() if not is_view(f))

    def casts(self) -> int:
        return sum(n for f, n in self.counts.items() if f.overloadpacket.__name__ == "_to_copy")


def is_view(func) -> bool:
    """Views and transposes (`_unsafe_view` is a view that autograd treats as a new tensor)."""
    return func.is_view or func.overloadpacket.__name__ == "_unsafe_view"


def count_unet(unet, kind: str, dtype, input_grad: bool) -> CountOps:
    sample, t, text, added = unet_inputs(unet, 1, RESOLUTION[kind], "meta", dtype)
    sample.requires_grad_(input_grad)
    with CountOps() as ops:
        unet(sample, t, text, added_cond_kwargs=added).sample.float().mean().backward()
    return ops


def count_full_step(unet, kind: str, dtype) -> CountOps:
    from diffusers import DDPMScheduler

    from trainer.step import Conditioning, per_image_loss

    sample, t, text, added = unet_inputs(unet, 1, RESOLUTION[kind], "meta", dtype)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    cond = Conditioning(text, added["text_embeds"], added["time_ids"])
    latents = sample.float()
    with CountOps() as ops:
        per_image_loss(unet, scheduler, latents, torch.randn_like(latents), t, cond, dtype).mean().backward()
    return ops


def twice(count, unet, *args) -> tuple[int, int, int]:
    """(operations, casts) of a first micro-batch (no .grad yet), then operations of one accumulating."""
    for p in unet.parameters():
        p.grad = None
    first = count(unet, *args)
    return first.total(), first.casts(), count(unet, *args).total()


def measure(kind: str, target_sets: list[str]) -> list[tuple[str, str, tuple[int, int, int]]]:
    """(targets, what runs, counts) rows for one model: the bare UNet, then each target set."""
    dtype = torch.bfloat16 if kind == "sdxl" else torch.float32
    bare = build_unet(kind, "meta", dtype)
    rows = [("-", "bare UNet", twice(count_unet, copy.deepcopy(bare), kind, dtype, True))]
    for targets in target_sets:
        unet = copy.deepcopy(bare)
        plain_peft_lora(unet, targets)
        rows.append((targets, "peft LoRA (diffusers' example)", twice(count_unet, unet, kind, dtype, False)))
        unet = copy.deepcopy(bare)
        lorapipe_lora(unet, targets)
        rows.append((targets, "lorapipe LoRA (trainer/lora_layers.py)", twice(count_unet, unet, kind, dtype, False)))
        rows.append((targets, "lorapipe full step (per_image_loss)", twice(count_full_step, unet, kind, dtype)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sdxl,tiny", help="sdxl, tiny or both")
    parser.add_argument("--targets", default="kohya,attention", help="LoRA target sets (trainer/models.py)")
    args = parser.parse_args()
    started = time.perf_counter()
    table = []
    for kind in args.models.split(","):
        rows = measure(kind, args.targets.split(","))
        bare = rows[0][2][0]
        for targets, label, (ops, casts, accumulating) in rows:
            table.append((f"{LABEL[kind]} {RESOLUTION[kind]}²", targets, label, ops, casts, ops / bare, accumulating))
    print("\naten operations dispatched per forward+backward, micro-batch 1, views and transposes left out")
    print("(accumulating: the same again while .grad holds earlier micro-batches' gradients)")
    print(f"{'model':<20}{'targets':<11}{'what runs':<40}{'ops':>8}{'casts':>7}{'vs bare':>9}{'accumulating':>14}")
    for model, targets, label, ops, casts, ratio, accumulating in table:
        print(f"{model:<20}{targets:<11}{label:<40}{ops:>8,}{casts:>7,}{ratio:>8.2f}x{accumulating:>14,}")
    worst = max(r for _, _, label, _, _, r, _ in table if label.startswith("lorapipe LoRA"))
    print(f"goal: lorapipe's LoRA step <= {GOAL}x the bare UNet: worst {worst:.2f}x -> "
          f"{'met' if worst <= GOAL else 'MISSED'}   ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
