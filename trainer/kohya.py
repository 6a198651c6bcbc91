"""The kohya LoRA format that ComfyUI, A1111 and Forge load, written from peft's weights.

Names follow SDXL's original (SGM) layout, e.g. diffusers' `down_blocks.1.attentions.0.…` is
`lora_unet_input_blocks_4_1_…`; each module has `.lora_down.weight` (A), `.lora_up.weight` (B) and
`.alpha` with the real alpha. diffusers' own `convert_state_dict_to_kohya` writes alpha = rank and fails
on text-encoder keys, hence this converter.
"""

from __future__ import annotations

import hashlib
import io
import re

import torch
from safetensors.torch import save

UNET_PREFIX, TE1_PREFIX, TE2_PREFIX = "lora_unet_", "lora_te1_", "lora_te2_"


def sgm_module_path(diffusers_path: str, layers_per_block: int = 2) -> str:
    """diffusers UNet module path → SDXL's original (SGM) one; only transformer blocks carry our LoRA."""
    per_level = layers_per_block + 1  # the resnet+attention pairs, then a down/upsampler
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", diffusers_path):
        level, block, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{per_level * level + block + 1}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", diffusers_path):
        level, block, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{per_level * level + block}.1.{rest}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", diffusers_path):
        return f"middle_block.1.{m[1]}"
    raise ValueError(f"no SGM name for UNet module {diffusers_path!r} (LoRA outside the transformer blocks?)")


def peft_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (lora_A, lora_B)} from a peft state dict ("x.lora_A.weight", "x.lora_B.weight")."""
    pairs: dict[str, list] = {}
    for key, tensor in state.items():
        m = re.match(r"(.+)\.lora_([AB])\.weight$", key)
        if not m:
            raise ValueError(f"unexpected key in a LoRA state dict: {key}")
        pairs.setdefault(m[1], [None, None])["AB".index(m[2])] = tensor
    return {path: (a, b) for path, (a, b) in pairs.items()}


def to_kohya(states: dict[str, dict[str, torch.Tensor]], alpha: float, layers_per_block: int = 2,
             dtype=torch.float16) -> dict[str, torch.Tensor]:
    """`states`: {"unet": ..., "text_encoder": ..., "text_encoder_2": ...} peft LoRA state dicts."""
    out = {}
    for component, state in states.items():
        for path, (down, up) in peft_pairs(state).items():
            if component == "unet":
                name = UNET_PREFIX + sgm_module_path(path, layers_per_block).replace(".", "_")
            else:
                prefix = TE1_PREFIX if component == "text_encoder" else TE2_PREFIX
                # transformers 5's CLIPTextModel has no "text_model." level; kohya's names do.
                name = prefix + "text_model_" + path.removeprefix("text_model.").replace(".", "_")
            out[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
            out[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def safetensors_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """sd-webui-additional-networks' hashes (kohya's `sshs_model_hash`, `sshs_legacy_hash`).

    Computed over the file as it would be saved with only the `ss_` metadata, so adding other metadata
    later does not change them: sha256 of everything after the header, and the legacy 8-digit hash of
    the 64 kB at offset 1 MiB.
    """
    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_length = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_length :]).hexdigest()
    legacy_hash = hashlib.sha256(io.BytesIO(data).getbuffer()[0x100000 : 0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash
