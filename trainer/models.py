"""Loading SDXL the way users name it (a hub id, a local diffusers folder, one .safetensors file) and
adding the LoRA adapters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lorapipe.config import SDXL_BASE
from lorapipe.errors import UserError

# kohya's default LoRA targets for SDXL: every Linear in the UNet's transformer blocks.
UNET_TARGETS = {
    "kohya": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
}
# ...and in both CLIP text encoders: attention and MLP.
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@dataclass
class SDXLParts:
    tokenizer: object
    tokenizer_2: object
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    scheduler_config: dict  # the sampler the model ships with, for samples


def is_single_file(base_model: str) -> bool:
    return Path(base_model).suffix in {".safetensors", ".ckpt", ".pt", ".bin", ".pth"}


def load_sdxl(base_model: str, revision: str | None = None, vae: str | None = None,
              single_file_config: str | None = None) -> SDXLParts:
    """All the parts training needs, frozen, on the CPU in fp32 (the caller moves and casts them).

    A single-file checkpoint takes its component configs from `single_file_config` (a diffusers folder
    or hub id); without one, diffusers fetches SDXL base's from the hub.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from lorapipe.modelfiles import check_model_source

    for source in (base_model, single_file_config, vae):
        check_model_source(source)  # no pickle, by name, whatever torch's default would do
    if is_single_file(base_model):
        pipe = StableDiffusionXLPipeline.from_single_file(base_model, config=single_file_config)
        parts = SDXLParts(
            pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2, pipe.vae, pipe.unet,
            DDPMScheduler.from_config(pipe.scheduler.config), dict(pipe.scheduler.config),
        )
    else:
        weights = {"revision": revision, "use_safetensors": True}  # a stray .bin beside them is never read
        kw = {"revision": revision}
        from diffusers import EulerDiscreteScheduler

        parts = SDXLParts(
            tokenizer=CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer", **kw),
            tokenizer_2=CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer_2", **kw),
            text_encoder=CLIPTextModel.from_pretrained(base_model, subfolder="text_encoder", **weights),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(base_model, subfolder="text_encoder_2",
                                                                       **weights),
            vae=AutoencoderKL.from_pretrained(base_model, subfolder="vae", **weights),
            unet=UNet2DConditionModel.from_pretrained(base_model, subfolder="unet", **weights),
            # Training adds noise with the DDPM formulation whatever sampler the model ships with.
            noise_scheduler=DDPMScheduler.from_pretrained(base_model, subfolder="scheduler", **kw),
            scheduler_config=dict(EulerDiscreteScheduler.load_config(base_model, subfolder="scheduler", **kw)),
        )
    if vae:
        parts.vae = load_vae(vae, base_model, revision, single_file_config)
    for module in (parts.text_encoder, parts.text_encoder_2, parts.vae, parts.unet):
        module.requires_grad_(False)
        module.eval()
    return parts


def load_vae(vae: str, base_model: str, revision: str | None = None, single_file_config: str | None = None,
             dtype: torch.dtype | None = None):
    """A VAE override as users name it: a hub id or diffusers folder, or one .safetensors file.

    A single file carries weights only: its config comes from the base model's VAE (same architecture),
    so it loads offline whenever the base model does.
    """
    from diffusers import AutoencoderKL

    from lorapipe.modelfiles import check_model_source

    check_model_source(vae)  # no pickle, by name
    kwargs = {} if dtype is None else {"dtype": dtype}
    if not is_single_file(vae):
        return AutoencoderKL.from_pretrained(vae, use_safetensors=True, **kwargs)
    config = base_model if not is_single_file(base_model) else (single_file_config or SDXL_BASE)
    return AutoencoderKL.from_single_file(vae, config=config, subfolder="vae", revision=revision, **kwargs)


def _fingerprint(path: str | None) -> list | None:
    """A local model by path, size and mtime of its files: re-saving different weights there changes it."""
    if not path or not Path(path).expanduser().exists():
        return None
    root = Path(path).expanduser().resolve()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [str(root)] + [[str(p.relative_to(root.parent)), (st := os.stat(p)).st_size, st.st_mtime_ns] for p in files]


def model_identity(base_model: str, revision: str | None, vae: str | None) -> dict:
    """What names the weights in cache keys: a hub id by id + revision, a local model by its files."""
    return {
        "base_model": _fingerprint(base_model) or base_model,
        "revision": revision,
        "vae": _fingerprint(vae) or vae,
    }


# LoRA initialisations (lorapipe's `lora_init` -> peft's `init_lora_weights`). Both start exactly at the base
# model (B = 0). kohya's LoRAModule draws A with `kaiming_uniform_(a=sqrt(5))`: uniform on
# [-1/sqrt(in_features), 1/sqrt(in_features)], std 1/sqrt(3 in_features) (0.008-0.023 over SDXL's 640-5120
# features); that is exactly peft's default (`True`). peft's "gaussian" draws A ~ N(0, 1/rank): std 0.125 at
# rank 8, 5-15x larger. Under Lion every element moves by the learning rate per step, so the LoRA product
# moves in proportion to |A|: a learning rate tuned under kohya only transfers with kohya's init.
LORA_INITS = {"kohya": True, "gaussian": "gaussian"}


def add_lora(module: torch.nn.Module, rank: int, alpha: float, targets: list[str],
             init: str = "kohya") -> list[torch.nn.Parameter]:
    """Add a peft LoRA adapter ("default"); returns its parameters, in fp32 (the frozen weights may be bf16).

    Raises UserError when `rank` exceeds a targeted layer's features (the extra rank is dead weight).
    """
    from peft import LoraConfig

    module.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=LORA_INITS[init],
                                  target_modules=targets))
    for name, layer in module.named_modules():
        if "default" in getattr(layer, "lora_A", {}) and rank > min(layer.in_features, layer.out_features):
            raise UserError(f"train.rank {rank} is above the features of {name} ({layer.in_features} in, "
                            f"{layer.out_features} out): use a rank of at most "
                            f"{min(layer.in_features, layer.out_features)}")
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def lora_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft's key names, as they are. diffusers' convert_state_dict_to_diffusers rewrites the attention
    keys to an older naming that load_lora_weights then drops with only a warning (measured: a reloaded
    UNet differed from the trained one by 0.11; with peft's names it is exact).
    """
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(module, save_embedding_layers=False)
    return {k: v.detach().float().cpu() for k, v in state.items()}


def load_lora_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(module, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"checkpoint has LoRA weights this model lacks: {unexpected[:3]}")
