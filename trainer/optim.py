"""Lion, from bitsandbytes: 32-bit states by default, 8-bit states to save memory."""

from __future__ import annotations

import torch

LION_BETAS = (0.9, 0.99)  # Lion paper defaults


def make_optimizer(params: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float):
    import bitsandbytes as bnb

    if name == "lion":
        return bnb.optim.Lion(params, lr=lr, betas=LION_BETAS, weight_decay=weight_decay)
    if name == "lion8bit":
        return bnb.optim.Lion8bit(params, lr=lr, betas=LION_BETAS, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} (known: lion, lion8bit)")
