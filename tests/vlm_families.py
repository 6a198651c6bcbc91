"""Tiny random-weight builds of the VLM families people caption with, from each family's own transformers classes.

Each builder returns (model, processor): the family's model class at toy width, its real processor class,
a BPE tokenizer trained on the spot with the family's special tokens (and its BOS behaviour: Gemma and
Llama-3 tokenizers add a BOS, Qwen's and GLM's do not), and a chat template that renders the same text as the
family's published one for one user turn with an image (system prompt, BOS, image placeholder, generation
prompt). They test loading, batching, padding, token ids and decoding; not caption quality.

PyPI's torchvision does not import beside the CPU torch wheel used here, and the processors of LLaVA-OneVision,
Qwen2/2.5/3-VL, GLM-4.1V and SmolVLM carry a video processor that needs it. Their builds here leave the video
processor out (`image_only`): everything lorapipe does with images runs, loading from a folder does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from lorapipe.tiny_models import CLIP_MEAN, CLIP_STD, caption_corpus

# --- tokenizers ----------------------------------------------------------------------------------


def bpe(specials: list[str], metaspace: bool = False, vocab_size: int = 420) -> tuple[dict, list]:
    """(vocab, merges) of a BPE trained on the caption corpus; byte-level (GPT-2, Qwen, Llama-3) or metaspace."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=specials[0] if metaspace else None))
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        alphabet = []
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(caption_corpus() + ["Describe.\nDescribe the photo.\ncaption en"], trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def llama3_tokenizer(extra: list[str]):
    """Llama-3's special tokens, and its post-processor that puts <|begin_of_text|> before every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|finetune_right_pad_id|>"]
    vocab, merges = bpe(specials)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    bos = vocab["<|begin_of_text|>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                        pad_token="<|finetune_right_pad_id|>")
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    return tokenizer


def qwen2_tokenizer(extra: list[str]):
    """Qwen2's: no BOS, <|im_end|> ends a turn, <|endoftext|> pads."""
    from transformers import Qwen2Tokenizer

    vocab, merges = bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *extra]})
    return tokenizer


def gemma_tokenizer(extra: list[str], extra_special_tokens: dict | None = None):
    """Gemma's: metaspace BPE, adds <bos> to every text."""
    from transformers import GemmaTokenizer

    vocab, merges = bpe(["<unk>", "<pad>", "<eos>", "<bos>"], metaspace=True)
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True,
                               extra_special_tokens=extra_special_tokens or {})
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    return tokenizer


def gpt2_tokenizer(bos: str, eos: str, pad: str, extra: list[str]):
    """SmolLM2's (SmolVLM): byte-level, adds nothing; GLM-4's likewise."""
    from transformers import GPT2Tokenizer

    vocab, merges = bpe([pad, bos, eos])
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, bos_token=bos, eos_token=eos, pad_token=pad,
                              unk_token=pad)
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    return tokenizer


# --- chat templates (rendering what each family's published template renders for one user turn) -------

LLAMA3_LLAVA_TEMPLATE = (  # JoyCaption-style LLaVA: Llama-3's turns, the template writes the BOS itself
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN_TEMPLATE = (  # Qwen2-VL and Qwen2.5-VL (default system prompt); Qwen3-VL has none
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' and default_system %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

GLM4V_TEMPLATE = (  # GLM-4.1V: "[gMASK]<sop>" written by the template; the tokenizer adds nothing
    "[gMASK]<sop>{% for message in messages %}{{ '<|' + message['role'] + '|>\n' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<|begin_of_image|><|image|><|end_of_image|>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

IDEFICS3_TEMPLATE = (  # Idefics3 writes <|begin_of_text|>; SmolVLM writes <|im_start|> (its BOS) the same way
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% elif c['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] | trim }}{% endif %}{% endfor %}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


# --- helpers --------------------------------------------------------------------------------------


def image_only(processor_class):
    """The family's processor without its video processor (which needs torchvision): images only."""

    class ImageOnly(processor_class):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             chat_template=chat_template, **kwargs)

    ImageOnly.__name__ = processor_class.__name__
    if processor_class.__name__ == "SmolVLMProcessor":
        # Its apply_chat_template reads the frame sampling defaults off the video processor, even for images.
        ImageOnly.video_processor = SimpleNamespace(num_frames=64, fps=1)
    return ImageOnly


def finish(model, tokenizer):
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def save(model, processor, out_dir) -> str:
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return str(out_dir)


def llama_text(tokenizer, width: int = 32, **extra) -> dict:
    return {"model_type": "llama", "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": len(tokenizer),
            "max_position_embeddings": 2048, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, **extra}


def qwen_text(tokenizer, model_type: str, width: int = 32, **extra) -> dict:
    return {"model_type": model_type, "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": len(tokenizer),
            "max_position_embeddings": 2048, "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}, **extra}


def siglip_vision(image_size: int, patch: int, width: int = 32) -> dict:
    return {"model_type": "siglip_vision_model", "hidden_size": width, "intermediate_size": 2 * width,
            "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": image_size, "patch_size": patch}


def ids(tokenizer, *tokens: str) -> dict:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}


# --- families -------------------------------------------------------------------------------------


def joycaption(seed: int = 0):
    """JoyCaption-style: LLaVA with a SigLIP tower (all features, no CLS) and a Llama-3 language model."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, SiglipImageProcessorPil

    tokenizer = llama3_tokenizer(["<image>"])
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                                              image_std=[0.5] * 3)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="full", num_additional_image_tokens=0,
                               chat_template=LLAMA3_LLAVA_TEMPLATE)
    torch.manual_seed(seed)
    config = LlavaConfig(vision_config=siglip_vision(32, 8), text_config=llama_text(tokenizer),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="full", vision_feature_layer=-1,
                         pad_token_id=tokenizer.pad_token_id)
    return finish(LlavaForConditionalGeneration(config), tokenizer), processor


def qwen2_vl(seed: int = 0, model_type: str = "qwen2_vl"):
    """Qwen2-VL, Qwen2.5-VL or Qwen3-VL: dynamic resolution (token count follows the image), M-RoPE."""
    import transformers as tf
    from transformers import Qwen2VLImageProcessorPil

    tokenizer = qwen2_tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    special = ids(tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    tokens = {"image_token_id": special["<|image_pad|>"], "video_token_id": special["<|video_pad|>"],
              "vision_start_token_id": special["<|vision_start|>"], "vision_end_token_id": special["<|vision_end|>"]}
    patch = 16 if model_type == "qwen3_vl" else 14
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, min_pixels=(2 * patch) ** 2,
                                               max_pixels=(6 * patch) ** 2, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    vision = {"depth": 1, "num_heads": 2, "patch_size": patch, "spatial_merge_size": 2, "temporal_patch_size": 2}
    if model_type == "qwen2_vl":
        vision |= {"embed_dim": 32, "hidden_size": 32, "mlp_ratio": 2}
        text = qwen_text(tokenizer, "qwen2_vl_text")
        classes = tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor
    elif model_type == "qwen2_5_vl":
        vision |= {"hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 32, "window_size": 56,
                   "fullatt_block_indexes": [0]}
        text = qwen_text(tokenizer, "qwen2_5_vl_text")
        classes = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor
    else:
        vision |= {"hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 32, "num_position_embeddings": 64,
                   "deepstack_visual_indexes": [0]}
        text = qwen_text(tokenizer, "qwen3_vl_text", head_dim=16,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True})
        classes = tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLProcessor
    config_class, model_class, processor_class = classes
    template = QWEN_TEMPLATE.replace("default_system", "true" if model_type != "qwen3_vl" else "false")
    processor = image_only(processor_class)(image_processor=image_processor, tokenizer=tokenizer,
                                            chat_template=template)
    torch.manual_seed(seed)
    config = config_class(text_config=text, vision_config=vision, **tokens)
    return finish(model_class(config), tokenizer), processor


def onevision(seed: int = 0):
    """LLaVA-OneVision: SigLIP + Qwen2, anyres tiling."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
    )

    tokenizer = qwen2_tokenizer(["<image>", "<video>"])
    pinpoints = [[32, 32], [32, 64], [64, 32]]
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
                                                      image_grid_pinpoints=pinpoints, image_mean=[0.5] * 3,
                                                      image_std=[0.5] * 3)
    processor = image_only(LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=ONEVISION_TEMPLATE,
        num_image_tokens=16, vision_feature_select_strategy="full")
    torch.manual_seed(seed)
    special = ids(tokenizer, "<image>", "<video>")
    config = LlavaOnevisionConfig(
        vision_config=siglip_vision(32, 8), image_grid_pinpoints=pinpoints,
        text_config=qwen_text(tokenizer, "qwen2", rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        image_token_index=special["<image>"], video_token_index=special["<video>"],
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")
    return finish(LlavaOnevisionForConditionalGeneration(config), tokenizer), processor


def glm4v(seed: int = 0):
    """GLM-4.1V: its own ViT with 2x2 merge, GLM-4 language model; "[gMASK]<sop>" prefix from the template."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration, Glm4vImageProcessorPil, Glm4vProcessor

    extra = ["[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|begin_of_image|>", "<|end_of_image|>",
             "<|image|>", "<|video|>", "<|begin_of_video|>", "<|end_of_video|>"]
    tokenizer = gpt2_tokenizer("<|endoftext|>", "<|user|>", "<|endoftext|>", [])
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    tokenizer.bos_token = None  # GLM's tokenizer has no BOS: "[gMASK]<sop>" comes from the template
    special = ids(tokenizer, *extra)
    image_processor = Glm4vImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                             size={"shortest_edge": (2 * 14) ** 2, "longest_edge": (6 * 14) ** 2},
                                             image_mean=CLIP_MEAN, image_std=CLIP_STD)
    processor = image_only(Glm4vProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                           chat_template=GLM4V_TEMPLATE)
    torch.manual_seed(seed)
    config = Glm4vConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                     "eos_token_id": tokenizer.eos_token_id,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
                                         "partial_rotary_factor": 0.5}},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "image_size": 28,
                       "patch_size": 14, "out_hidden_size": 32, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=special["<|image|>"], video_token_id=special["<|video|>"],
        image_start_token_id=special["<|begin_of_image|>"], image_end_token_id=special["<|end_of_image|>"],
        video_start_token_id=special["<|begin_of_video|>"], video_end_token_id=special["<|end_of_video|>"])
    return finish(Glm4vForConditionalGeneration(config), tokenizer), processor


def _idefics_tokens() -> list[str]:
    return (["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
            + [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)])


def idefics3(seed: int = 0, smol: bool = False):
    """Idefics3 (SigLIP + Llama-3, image split into tiles) or SmolVLM (the same with SmolLM2)."""
    import transformers as tf

    if smol:
        tokenizer = gpt2_tokenizer("<|im_start|>", "<end_of_utterance>", "<|im_end|>", [])
        tokenizer.add_special_tokens({"additional_special_tokens": _idefics_tokens()})
        template = IDEFICS3_TEMPLATE
        config_class, model_class, image_class = (tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration,
                                                  tf.SmolVLMImageProcessorPil)
        processor_class = image_only(tf.SmolVLMProcessor)
    else:
        tokenizer = llama3_tokenizer(_idefics_tokens())
        template = IDEFICS3_TEMPLATE
        config_class, model_class, image_class = (tf.Idefics3Config, tf.Idefics3ForConditionalGeneration,
                                                  tf.Idefics3ImageProcessorPil)
        processor_class = tf.Idefics3Processor
    # 32 px tiles of 8 px patches, pixel shuffle by 2: 4 image tokens per tile.
    image_processor = image_class(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                chat_template=template)
    torch.manual_seed(seed)
    text = llama_text(tokenizer)
    config = config_class(vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                         "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                          text_config=text, scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                          pad_token_id=tokenizer.pad_token_id)
    return finish(model_class(config), tokenizer), processor


def gemma3(seed: int = 0):
    """Gemma 3: SigLIP + Gemma 3, a fixed number of soft tokens per image, <bos> from the template."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor

    names = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = gemma_tokenizer(["<start_of_turn>", "<end_of_turn>"], extra_special_tokens=names)
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                                              image_std=[0.5] * 3)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4,
                                chat_template=GEMMA3_TEMPLATE)
    special = ids(tokenizer, *names.values())
    torch.manual_seed(seed)
    config = Gemma3Config(
        vision_config=siglip_vision(32, 8),
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "head_dim": 16, "vocab_size": len(tokenizer), "sliding_window": 64,
                     "query_pre_attn_scalar": 16, "pad_token_id": tokenizer.pad_token_id,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id},
        mm_tokens_per_image=4, boi_token_index=special["<start_of_image>"],
        eoi_token_index=special["<end_of_image>"], image_token_index=special["<image_soft_token>"])
    model = Gemma3ForConditionalGeneration(config)
    # Gemma 3 ends its turn with <end_of_turn>: generation stops there, as in the published generation_config.
    finish(model, tokenizer).generation_config.eos_token_id = [tokenizer.eos_token_id,
                                                               tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    return model, processor


def paligemma(seed: int = 0):
    """PaliGemma: SigLIP + Gemma, no chat template; captions with the task prefix "caption en"."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor, SiglipImageProcessorPil

    tokenizer = gemma_tokenizer([])
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                                              image_std=[0.5] * 3)
    image_processor.image_seq_length = 16
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    torch.manual_seed(seed)
    config = PaliGemmaConfig(
        vision_config=siglip_vision(32, 8) | {"projection_dim": 32},
        text_config={"model_type": "gemma", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": len(tokenizer),
                     "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id},
        image_token_index=processor.image_token_id, projection_dim=32, hidden_size=32,
        vocab_size=len(tokenizer), tie_word_embeddings=False)  # tied, random weights repeat the last token
    return finish(PaliGemmaForConditionalGeneration(config), tokenizer), processor


def florence2(seed: int = 0):
    """Florence-2: DaViT + BART encoder-decoder, no chat template; task tokens such as <MORE_DETAILED_CAPTION>."""
    from transformers import BartTokenizer, CLIPImageProcessorPil, Florence2Config, Florence2ForConditionalGeneration
    from transformers import Florence2Processor

    vocab, merges = bpe(["<s>", "<pad>", "</s>", "<unk>"])
    tokenizer = BartTokenizer(vocab=vocab, merges=merges, extra_special_tokens={"image_token": "<image>"})
    tokenizer.add_tokens([f"<loc_{i}>" for i in range(1000)])
    image_processor = CLIPImageProcessorPil(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
                                            do_center_crop=False, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    image_processor.image_seq_length = 65  # (32 / 4)**2 spatial tokens and the pooled one
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)
    torch.manual_seed(seed)
    config = Florence2Config(
        text_config={"model_type": "bart", "vocab_size": len(tokenizer), "max_position_embeddings": 128,
                     "encoder_layers": 1, "encoder_ffn_dim": 32, "decoder_layers": 1, "decoder_ffn_dim": 32,
                     "encoder_attention_heads": 2, "decoder_attention_heads": 2, "d_model": 16,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id, "decoder_start_token_id": tokenizer.eos_token_id,
                     "forced_eos_token_id": tokenizer.eos_token_id},
        vision_config={"depths": [1], "patch_size": [7], "patch_stride": [4], "patch_padding": [3],
                       "patch_prenorm": [False], "embed_dim": [16], "num_heads": [1], "num_groups": [1],
                       "window_size": 4, "projection_dim": 16},
        image_token_id=processor.image_token_id)
    model = Florence2ForConditionalGeneration(config)
    finish(model, tokenizer).generation_config.decoder_start_token_id = tokenizer.eos_token_id
    return model, processor


BUILDERS = {
    "joycaption": joycaption,
    "onevision": onevision,
    "qwen2_vl": lambda seed=0: qwen2_vl(seed, "qwen2_vl"),
    "qwen2_5_vl": lambda seed=0: qwen2_vl(seed, "qwen2_5_vl"),
    "qwen3_vl": lambda seed=0: qwen2_vl(seed, "qwen3_vl"),
    "glm4v": glm4v,
    "idefics3": idefics3,
    "smolvlm": lambda seed=0: idefics3(seed, smol=True),
    "gemma3": gemma3,
    "paligemma": paligemma,
    "florence2": florence2,
}


def build_saved(family: str, out_dir: str | Path, seed: int = 0) -> str:
    """Build a family and save it as a model folder (only for families whose processor loads here)."""
    model, processor = BUILDERS[family](seed)
    return save(model, processor, out_dir)
