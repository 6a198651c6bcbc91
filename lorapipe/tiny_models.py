"""Tiny models of the real architectures, built offline for the demo and the tests.

Real classes and real configs (SDXL's UNet block layout, SDXL's two CLIP text encoders, LLaVA-1.5's
CLIP vision tower + Llama), random weights from a fixed seed, tokenizers trained on the spot. Each
model is saved with `save_pretrained` into a cache folder once, then loaded by the same
`from_pretrained` code that loads `stabilityai/stable-diffusion-xl-base-1.0` or
`llava-hf/llava-1.5-7b-hf`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from lorapipe.fsutil import atomic_dir, file_lock

# Words the tokenizers learn; the demo's captions and prompts are made of them.
SUBJECTS = ["a woman", "a man", "the person", "a young woman", "a smiling man", "the woman"]
CLOTHES = ["red coat", "blue shirt", "green sweater", "yellow dress", "black jacket", "white t-shirt"]
SETTINGS = ["outdoors", "in a studio", "in a park", "at the beach", "in a kitchen", "on a city street"]
POSES = ["smiling", "looking at the camera", "laughing", "standing", "sitting", "looking away"]
LIGHTING = ["in soft light", "in bright sunlight", "at golden hour", "under studio lights"]
FRAMING = ["close-up portrait", "half-body shot", "full-body photo", "headshot"]


def caption_corpus() -> list[str]:
    lines = []
    for i, subject in enumerate(SUBJECTS * 4):
        lines.append(
            f"{FRAMING[i % 4]} of {subject} {POSES[i % 6]}, wearing a {CLOTHES[(i * 5) % 6]}, "
            f"{SETTINGS[(i * 7) % 6]} {LIGHTING[i % 4]}."
        )
    lines += [
        "USER: ASSISTANT: describe this photo in one sentence for an image generator.",
        "say what the person wears, their pose and expression, the setting, the lighting and the framing.",
        "do not describe their face, hair color, age or ethnicity, and do not start with the image shows.",
        "a photo of a portrait of jane doe, smiling, outdoors. the image shows a picture of",
    ]
    return lines


@dataclass(frozen=True)
class TinyModels:
    sdxl: Path
    llava: Path


def _builder_version() -> str:
    """This module and the demo's drawings (the tiny captioner is taught on them) make the models."""
    from lorapipe import demo_data

    sources = Path(__file__).read_bytes() + Path(demo_data.__file__).read_bytes()
    return hashlib.sha256(sources).hexdigest()[:12]


def default_cache_root() -> Path:
    return Path(os.environ.get("LORAPIPE_CACHE", Path.home() / ".cache" / "lorapipe"))


def ensure_tiny_models(root: str | Path | None = None, seed: int = 0) -> TinyModels:
    """Build the tiny models into `root` once (keyed by this module's source and the seed); reuse after."""
    root = Path(root) if root else default_cache_root() / "tiny-models"
    tag = f"{_builder_version()}-seed{seed}"
    models = TinyModels(sdxl=root / f"tiny-sdxl-{tag}", llava=root / f"tiny-llava-{tag}")
    if (models.sdxl / "model_index.json").exists() and (models.llava / "config.json").exists():
        return models
    # Two processes starting at once (the demo beside the tests, parallel test workers) build once: the
    # second waits, then finds the folders; without the lock it would swap a folder the first is reading.
    with file_lock(root / f".build-{tag}.lock", "the tiny models' build"):
        if not (models.sdxl / "model_index.json").exists():
            with atomic_dir(models.sdxl) as tmp:
                build_tiny_sdxl(tmp, seed=seed)
        if not (models.llava / "config.json").exists():
            with atomic_dir(models.llava) as tmp:
                build_tiny_llava(tmp, seed=seed)
    return models


# --- tokenizers -------------------------------------------------------------------------------


def train_clip_tokenizer(vocab_size: int = 600):
    """A CLIP BPE tokenizer (lower-cased, byte-level, '</w>' word ends) trained on the caption corpus."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    split = Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(split, behavior="removed", invert=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(caption_corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    # transformers 5 ignores vocab_file/merges_file arguments: pass the vocab and merges themselves.
    return CLIPTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], model_max_length=77)


def train_llama_tokenizer(vocab_size: int = 500):
    """A Llama-style BPE tokenizer (metaspace) with LLaVA's <image> and <pad> tokens added."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(caption_corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    llama = LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    llama.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    return llama


# --- SDXL -------------------------------------------------------------------------------------


def build_tiny_sdxl(out_dir: str | Path, seed: int = 0) -> Path:
    """SDXL's layout at toy width: 3 UNet levels (plain, cross-attn, cross-attn), 8x VAE, two CLIP encoders."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = train_clip_tokenizer()
    tokenizer_2 = train_clip_tokenizer()
    # Two widths, as in SDXL (768 and 1280): loaders tell the encoders apart by it.
    hidden, hidden_2, time_dim = 32, 48, 8

    def text_config(act: str, width: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act=act,
            projection_dim=width,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config("quick_gelu", hidden))  # CLIP ViT-L's activation
    text_encoder_2 = CLIPTextModelWithProjection(text_config("gelu", hidden_2))  # OpenCLIP bigG's
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        cross_attention_dim=hidden + hidden_2,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + hidden_2,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 32, 32],
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=256,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    # SDXL base's scheduler_config.json.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


# --- LLaVA ------------------------------------------------------------------------------------

# llava-hf/llava-1.5-7b-hf's chat template: "USER: <image>\n{prompt} ASSISTANT:".
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _tiny_vlm_configs(tokenizer, image_size: int, patch: int) -> dict:
    """LLaVA's parts at toy width: a CLIP vision tower and a Llama, with LLaVA-1.5's feature choices."""
    from transformers import CLIPVisionConfig, LlamaConfig

    return {
        "vision_config": CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=image_size, patch_size=patch, projection_dim=32,
        ),
        "text_config": LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        "image_token_index": tokenizer.convert_tokens_to_ids("<image>"),
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -2,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _save_vlm(model, processor, out_dir, tokenizer) -> Path:
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return Path(out_dir)


def build_tiny_llava(out_dir: str | Path, seed: int = 0) -> Path:
    """LLaVA-1.5's architecture (CLIP vision tower, 2-layer projector, Llama) at toy width, taught to caption."""
    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = train_llama_tokenizer()
    image_size, patch = 32, 8
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=LLAVA_15_CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(LlavaConfig(**_tiny_vlm_configs(tokenizer, image_size, patch)))
    teach_to_caption(model, processor, seed=seed)
    return _save_vlm(model, processor, out_dir, tokenizer)


def build_tiny_llava_next(out_dir: str | Path, seed: int = 0) -> Path:
    """LLaVA-NeXT (1.6): LLaVA plus "anyres" tiling, so images of other aspects give other token counts."""
    import torch
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer = train_llama_tokenizer()
    image_size, patch, pinpoints = 32, 8, [[32, 64], [64, 32], [64, 64]]
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints, image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_15_CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    config = LlavaNextConfig(**_tiny_vlm_configs(tokenizer, image_size, patch), image_grid_pinpoints=pinpoints)
    return _save_vlm(LlavaNextForConditionalGeneration(config), processor, out_dir, tokenizer)


def teach_to_caption(model, processor, seed: int = 0, steps: int = 300, batch_size: int = 16) -> float:
    """A few seconds of training on drawn portraits and their descriptions.

    Random weights answer with word salad; after this the tiny LLaVA describes the demo's photos in
    plain sentences ("a woman smiling, wearing a red coat, in a studio"), sometimes wrongly, like a
    real small VLM. That keeps the caption stage's name insertion and review rules honest in the
    demo and the tests (the demo's own portraits are among the examples, so those are described right).
    Returns the last training loss.
    """
    import random

    import torch

    from lorapipe.config import DEFAULT_CAPTION_PROMPT
    from lorapipe.demo_data import CLOTHES_RGB, SETTING_RGB, Scene, draw, extra_scene, scenes

    rng = random.Random(seed)
    examples = []
    for clothes in CLOTHES_RGB:
        for setting in SETTING_RGB:
            for smiling in (True, False):
                for _ in range(2):
                    size = rng.choice([(96, 128), (128, 96), (112, 112)])
                    scene = Scene(clothes, setting, smiling, size, rng.randrange(1 << 30))
                    examples.append((draw(scene), scene.describe()))
    # The demo's own portraits too, a few times each, so that their captions are right and distinct on any
    # CPU: taught only on look-alikes, one CPU's rounding gave two of the ten the same (wrong) caption.
    for scene in [*scenes(), extra_scene()]:
        examples += [(draw(scene), scene.describe())] * 3
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DEFAULT_CAPTION_PROMPT}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    prompt_length = processor(images=[examples[0][0]], text=[prompt], return_tensors="pt").input_ids.shape[1]
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right"
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = [examples[i] for i in torch.randperm(len(examples), generator=generator)[:batch_size].tolist()]
        inputs = processor(
            images=[img for img, _ in batch],
            text=[f"{prompt} {text}{tokenizer.eos_token}" for _, text in batch],
            return_tensors="pt",
            padding=True,
        )
        labels = inputs["input_ids"].clone()
        labels[:, :prompt_length] = -100  # learn the answer, not the question
        labels[inputs["attention_mask"] == 0] = -100
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tokenizer.padding_side = "left"
    return float(loss.detach())
