"""Captioning throughput: LLaVA-1.5-7B's architecture (random weights) generating 60 new tokens per image,
one image at a time with plain `generate` versus lorapipe's batched captioner path, in one run.

    python benchmarks/caption_benchmark.py                  # GPU: batch 1, 16, 64 (bf16, SDPA)
    python benchmarks/caption_benchmark.py --tiny --cpu     # smoke test with the tiny LLaVA

Reference (issue 4), an H200 with HF generate: 0.28 captions/s at batch 1, 18.6 at batch 128.
Goal: >= 25 captions/s at 60 tokens on one H100/H200.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REFERENCE = {1: 0.28, 128: 18.6}
NEW_TOKENS = 60


def llava_15_7b(device, dtype):
    """LLaVA-1.5-7B's config (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14-336 + Vicuna-7B, random weights."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        text_config=LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                                max_position_embeddings=4096, pad_token_id=32001),
        image_token_index=32000, vision_feature_select_strategy="default", vision_feature_layer=-2,
        pad_token_id=32001,
    )
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype)
    return model.eval(), 576, 336  # image tokens, image side


def tiny_llava(device, dtype):
    from transformers import AutoModelForImageTextToText

    from lorapipe.tiny_models import ensure_tiny_models

    model = AutoModelForImageTextToText.from_pretrained(ensure_tiny_models().llava, dtype=dtype).to(device)
    return model.eval(), 16, 32


def batch_inputs(model, batch, image_tokens, side, device, dtype, prompt_tokens=60):
    """What the processor produces for LLaVA-1.5's chat prompt: <image> expanded, then the question."""
    image_token = model.config.image_token_index
    vocab = min(model.config.text_config.vocab_size, image_token)
    prompt = torch.randint(3, vocab, (prompt_tokens,))
    ids = torch.cat([prompt[:5], torch.full((image_tokens,), image_token), prompt[5:]]).repeat(batch, 1)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": torch.randn(batch, 3, side, side, device=device, dtype=dtype),
    }


def generate(model, inputs):
    with torch.inference_mode():
        # min_new_tokens: random weights would stop at an early end-of-sequence; captions are ~60 tokens.
        return model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def rate(model, batch, images, args, device, dtype, image_tokens, side) -> float:
    inputs = batch_inputs(model, batch, image_tokens, side, device, dtype)
    generate(model, inputs)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(max(1, images // batch)):
        generate(model, inputs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return max(1, images // batch) * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--images", type=int, default=128, help="images captioned per measurement")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, image_tokens, side = (tiny_llava if args.tiny else llava_15_7b)(device, dtype)

    rows = [("plain generate, one image at a time", 1,
             rate(model, 1, min(args.images, 8), args, device, dtype, image_tokens, side))]
    for batch in [int(b) for b in args.batches.split(",")]:
        rows.append(("lorapipe batched generate", batch,
                     rate(model, batch, max(args.images, batch), args, device, dtype, image_tokens, side)))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n{'tiny LLaVA' if args.tiny else 'LLaVA-1.5-7B architecture'}, {NEW_TOKENS} new tokens, on {name}")
    print(f"{'path':38s} {'batch':>6s} {'captions/s':>11s} {'vs one-by-one':>14s}")
    for label, batch, r in rows:
        print(f"{label:38s} {batch:>6d} {r:>11.2f} {r / rows[0][2]:>13.1f}x")
    print(f"reference (H200, HF generate): {REFERENCE}; goal: >= 25 captions/s")


if __name__ == "__main__":
    main()
