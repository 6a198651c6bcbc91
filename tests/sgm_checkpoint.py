"""Write a diffusers SDXL folder as one original-layout (SGM) .safetensors checkpoint, the kind people
download from model sites, so the single-file loading path can be tested offline on the tiny model.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest: str) -> str:
    name, _, param = rest.partition(".")
    return f"{RESNET[name]}.{param}"


def unet_key(key: str, config: dict) -> str:
    per_level = config["layers_per_block"] + 1
    module, _, param = key.rpartition(".")
    if module in UNET_FIXED:
        return f"{UNET_FIXED[module]}.{param}"
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + per_level * int(m[1]) + int(m[2])}.0.{_resnet(m[3])}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + per_level * int(m[1]) + int(m[2])}.1.{m[3]}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{per_level * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"output_blocks.{per_level * int(m[1]) + int(m[2])}.0.{_resnet(m[3])}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"output_blocks.{per_level * int(m[1]) + int(m[2])}.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        has_attention = config["up_block_types"][int(m[1])].startswith("CrossAttn")
        return f"output_blocks.{per_level * int(m[1]) + per_level - 1}.{2 if has_attention else 1}.conv.{m[2]}"
    raise KeyError(key)


def vae_key(key: str, levels: int) -> tuple[str, bool]:
    """(LDM name, whether a Linear weight becomes a 1x1 conv)."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}", False
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", False
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}", False
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}", False
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}", False
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", key):
        name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[m[2]]
        return f"{m[1]}.mid.attn_1.{name}.{m[3]}", m[2] != "group_norm" and m[3] == "weight"
    return key, False


def open_clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModelWithProjection → OpenCLIP's names (q, k, v packed into in_proj)."""
    out, qkv = {}, {}
    fixed = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key):
            rest = (m[2].replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2").replace("mlp.fc1", "mlp.c_fc")
                    .replace("mlp.fc2", "mlp.c_proj").replace("self_attn.out_proj", "attn.out_proj"))
            out[f"transformer.resblocks.{m[1]}.{rest}"] = value
    for (layer, param), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def write_sgm_checkpoint(diffusers_dir: Path, dest: Path) -> Path:
    import json

    unet_config = json.loads((diffusers_dir / "unet" / "config.json").read_text())
    vae_config = json.loads((diffusers_dir / "vae" / "config.json").read_text())
    out = {}
    for key, value in load_file(diffusers_dir / "unet" / "diffusion_pytorch_model.safetensors").items():
        out[f"model.diffusion_model.{unet_key(key, unet_config)}"] = value
    for key, value in load_file(diffusers_dir / "vae" / "diffusion_pytorch_model.safetensors").items():
        name, to_conv = vae_key(key, len(vae_config["block_out_channels"]))
        out[f"first_stage_model.{name}"] = value[:, :, None, None] if to_conv else value
    for key, value in load_file(diffusers_dir / "text_encoder" / "model.safetensors").items():
        key = key if key.startswith("text_model.") else f"text_model.{key}"  # transformers 5 dropped the level
        out[f"conditioner.embedders.0.transformer.{key}"] = value
    te2 = load_file(diffusers_dir / "text_encoder_2" / "model.safetensors")
    for key, value in open_clip_state(te2).items():
        out[f"conditioner.embedders.1.model.{key}"] = value
    save_file({k: v.contiguous() for k, v in out.items()}, dest)
    return dest


def write_vae_single_file(state: dict[str, torch.Tensor], vae_config: dict, dest: Path) -> Path:
    """A diffusers VAE state dict as one original-layout (LDM) .safetensors file, the kind people download
    (e.g. sdxl_vae.safetensors)."""
    out = {}
    for key, value in state.items():
        name, to_conv = vae_key(key, len(vae_config["block_out_channels"]))
        out[name] = value[:, :, None, None] if to_conv else value
    save_file({k: v.contiguous() for k, v in out.items()}, dest)
    return dest
