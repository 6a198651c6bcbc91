"""Lion (Chen et al. 2023): sign of an interpolated momentum, decoupled weight decay.

Four implementations are selectable. `lion` is ours: the same arithmetic as lion-pytorch, but with
torch's multi-tensor (`_foreach_*`) ops, so one step over SDXL's ~1,500 LoRA tensors is a handful of
kernel launches instead of several per tensor. bitsandbytes' Lion8bit quantises its momentum and is
not exact.
"""

from __future__ import annotations

import torch

LION_BETAS = (0.9, 0.99)  # the Lion paper's defaults


class ForeachLion(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-4, betas=LION_BETAS, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            momenta = []
            for p in params:
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                momenta.append(state["exp_avg"])
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            update = torch._foreach_mul(momenta, beta1)
            torch._foreach_add_(update, grads, alpha=1 - beta1)
            torch._foreach_sign_(update)
            torch._foreach_add_(params, update, alpha=-lr)
            torch._foreach_mul_(momenta, beta2)
            torch._foreach_add_(momenta, grads, alpha=1 - beta2)
        return None


def resolve_optimizer(name: str) -> str:
    # Measured on CPU (benchmarks/train_step_benchmark.py --optimizers): ours is the fastest exact one;
    # on CUDA it replaces one launch per tensor (bitsandbytes) or several (lion-pytorch) with a few in all.
    return "lion" if name == "auto" else name


def make_optimizer(param_groups: list[dict], name: str, weight_decay: float) -> torch.optim.Optimizer:
    """`param_groups`: [{"params": [...], "lr": ...}, ...] (UNet and text encoders have their own LRs)."""
    name = resolve_optimizer(name)
    if name == "lion":
        return ForeachLion(param_groups, betas=LION_BETAS, weight_decay=weight_decay)
    if name == "lion-pytorch":
        from lion_pytorch import Lion

        return Lion(param_groups, betas=LION_BETAS, weight_decay=weight_decay)
    if name in ("bnb-lion", "bnb-lion8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.Lion if name == "bnb-lion" else bnb.optim.Lion8bit
        return cls(param_groups, betas=LION_BETAS, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} (known: auto, lion, lion-pytorch, bnb-lion, bnb-lion8bit)")
