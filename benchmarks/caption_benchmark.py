"""Captioning throughput: lorapipe's captioner against plain transformers `generate`, same model, same
images, same prompt, in one run.

    python benchmarks/caption_benchmark.py                                   # the tiny LLaVA, offline, CPU
    python benchmarks/caption_benchmark.py --model llava-hf/llava-1.5-7b-hf  # a GPU box with the hub

What each row runs (the model is loaded once, by lorapipe's captioner, and shared):
- plain generate, one image at a time: what transformers' LLaVA model card shows: the processor on one
  image and the chat prompt, `generate(max_new_tokens=N, do_sample=False)`, decode;
- lorapipe TransformersCaptioner, batch B: `captioners.transformers_vlm.TransformersCaptioner.describe`,
  the code the caption stage runs (left padding, B images per `generate`), with the caption stage's
  prompt (`lorapipe/config.py`) and max_new_tokens.

Nothing is forced: a caption ends at the model's end-of-sequence token or at max_new_tokens, and the
table prints the tokens generated per caption and whether each row's captions are the one-at-a-time
captions (batching must not change them). Images: the demo's drawn portraits (`lorapipe/demo_data.py`).

Reference (an H200, LLaVA-1.5-7B, HF generate, 60 new tokens): 0.28 captions/s at batch 1, 18.6 at
batch 128. Goal: >= 25 captions/s at 60 tokens on one H100/H200.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from captioners.transformers_vlm import TransformersCaptioner  # noqa: E402
from lorapipe.config import CaptionConfig  # noqa: E402
from lorapipe.demo_data import draw, scenes  # noqa: E402

REFERENCE = "H200, LLaVA-1.5-7B, HF generate, 60 new tokens: 0.28 captions/s at batch 1, 18.6 at batch 128"


def plain_generate(captioner: TransformersCaptioner, images, prompt: str, max_new_tokens: int):
    """One image per call, as the model card shows it. Returns (captions, new tokens per caption)."""
    processor, model = captioner.processor, captioner.model
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
        add_generation_prompt=True)
    captions, lengths = [], []
    for image in images:
        inputs = processor(images=image, text=text, return_tensors="pt").to(model.device, captioner.dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
        lengths.append(int((new != processor.tokenizer.pad_token_id).sum()))
        captions.append(processor.decode(new, skip_special_tokens=True).strip())
    return captions, lengths


def timed(fn, *args):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub id or folder (default: the tiny LLaVA, built offline)")
    parser.add_argument("--images", type=int, default=32, help="images captioned per row")
    parser.add_argument("--batches", default="1,8,32", help="lorapipe's batch sizes")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    label = args.model or "tiny LLaVA (lorapipe/tiny_models.py)"
    if not args.model:
        from lorapipe.tiny_models import ensure_tiny_models

        args.model = str(ensure_tiny_models().llava)
    config = CaptionConfig()
    captioner = TransformersCaptioner(args.model, device=args.device, max_new_tokens=config.max_new_tokens)
    images = [draw(scene) for scene in scenes(args.images)]

    # Warm-up (first calls allocate and pick kernels), then one-at-a-time as the reference captions.
    plain_generate(captioner, images[:1], config.prompt, config.max_new_tokens)
    (reference, lengths), seconds = timed(plain_generate, captioner, images, config.prompt, config.max_new_tokens)
    rows = [("plain generate, one image at a time", 1, len(images) / seconds, sum(lengths) / len(lengths), "-")]
    for batch in [int(b) for b in args.batches.split(",")]:
        captioner.batch_size = batch
        captioner.describe(images[:batch], config.prompt)  # warm-up at this batch size
        captions, seconds = timed(captioner.describe, images, config.prompt)
        same = sum(a == b for a, b in zip(captions, reference))
        rows.append((f"lorapipe TransformersCaptioner, batch {batch}", batch, len(images) / seconds,
                     float("nan"), f"{same}/{len(images)}"))
    device = torch.cuda.get_device_name() if captioner.device == "cuda" else "CPU"
    print(f"\n{label}, {len(images)} images, max {config.max_new_tokens} new tokens, {captioner.dtype}, {device}")
    print(f"{'what runs':<44}{'batch':>6}{'captions/s':>12}{'vs plain':>10}{'tokens/caption':>16}"
          f"{'same captions':>15}")
    for label, batch, rate, tokens, same in rows:
        tokens_text = f"{tokens:.1f}" if tokens == tokens else "-"
        print(f"{label:<44}{batch:>6}{rate:>12.2f}{rate / rows[0][2]:>9.1f}x{tokens_text:>16}{same:>15}")
    print(f"reference: {REFERENCE}; goal: >= 25 captions/s")
    captioner.close()


if __name__ == "__main__":
    main()
