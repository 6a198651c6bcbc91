"""From what a VLM said to a caption that trains well: no boilerplate, the person's name as the subject,
within the 75 CLIP tokens SDXL reads, cut at a clause boundary rather than mid-word.

The rules themselves are the table in captioners/review_rules.py; this module runs its cleaning rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from captioners.caption_text import REFUSAL, fit_tokens
from captioners.review_rules import Subject, clean_caption

# Bump when the rules change: finished captions are recomputed, raw VLM answers are kept.
POSTPROCESS_VERSION = 3

# REFUSAL and fit_tokens stay importable from here, where they were before the rule table.
__all__ = ["POSTPROCESS_VERSION", "REFUSAL", "clip_token_counter", "finish_caption", "fit_tokens"]


def finish_caption(
    raw: str,
    name: str,
    class_word: str | None = None,
    count_tokens: Callable[[str], int] | None = None,
    max_tokens: int = 75,
) -> str:
    """The caption trained on, from a VLM's raw answer ("" when nothing usable is left). A refusal that
    cannot be cleaned safely comes back as the model wrote it, without the name, so the review flags it."""
    return clean_caption(raw, Subject(name=name, class_word=class_word, count_tokens=count_tokens,
                                      max_tokens=max_tokens))


def clip_token_counter(source: str, revision: str | None = None) -> Callable[[str], int]:
    """Count CLIP tokens (without start/end) with the base model's own tokenizer."""
    from transformers import CLIPTokenizer

    if Path(source).suffix in {".safetensors", ".ckpt"}:
        # A single-file checkpoint carries no tokenizer; SDXL's first tokenizer is CLIP ViT-L's.
        tokenizer = CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")
    else:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision)
    return lambda text: len(tokenizer(text, add_special_tokens=False, truncation=False).input_ids)
