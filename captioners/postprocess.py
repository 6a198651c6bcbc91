"""From what a VLM said to a caption that trains well: no boilerplate, the person's name as the subject,
within the 75 CLIP tokens SDXL reads, cut at a clause boundary rather than mid-word.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

# Bump when the rules change: finished captions are recomputed, raw VLM answers are kept.
POSTPROCESS_VERSION = 2

BOILERPLATE = re.compile(
    r"^\s*(?:(?:the|this) (?:image|photo|photograph|picture|scene) (?:shows|depicts|features|captures|is of|contains)"
    r"|in (?:the|this) (?:image|photo|photograph|picture),?)\s*",
    re.IGNORECASE,
)
REFUSAL = re.compile(r"\b(?:i'?m sorry|i cannot|i can'?t help|as an ai)\b", re.IGNORECASE)
GENERIC_SUBJECT = re.compile(
    r"\b(?:a|an|the)\s+(?:(?:young|middle-aged|older|smiling|happy)\s+)?"
    r"(?:woman|man|person|girl|boy|lady|gentleman|guy|individual|subject)\b",
    re.IGNORECASE,
)
# Reasoning models (GLM-4.1V-Thinking ...) wrap their answer; keep only the answer.
THINKING = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
ANSWER_TAGS = re.compile(r"</?answer>|<\|begin_of_box\|>|<\|end_of_box\|>", re.IGNORECASE)
REPEATED_WORDS = re.compile(r"\b(\w+(?:\s+\w+){0,3})(?:[\s,]+\1\b)+", re.IGNORECASE)


def clean(raw: str) -> str:
    text = ANSWER_TAGS.sub("", THINKING.sub("", raw))
    text = " ".join(text.replace("\n", " ").split()).strip(" \"'*")
    if REFUSAL.search(text):
        return ""
    previous = None
    while previous != text:  # "The image shows, in this image, ..." takes two passes
        previous, text = text, BOILERPLATE.sub("", text)
    text = REPEATED_WORDS.sub(r"\1", text)
    return text.strip(" ,;:")


def insert_name(text: str, name: str, class_word: str | None = None, replace_subject: bool = True) -> str:
    """Make the person's name the subject: replace the first generic subject, or lead with the name."""
    subject = f"{name}, a {class_word}," if class_word else name
    if name.lower() in text.lower():
        return text
    if replace_subject:
        text, replaced = GENERIC_SUBJECT.subn(subject, text, count=1)
        if replaced:
            return text[0].upper() + text[1:]
    if not text:
        return subject.rstrip(",")
    first = text if text[:2].isupper() else text[0].lower() + text[1:]  # keep acronyms ("TV studio")
    return f"{subject.rstrip(',')}, {first}"


def fit_tokens(text: str, count_tokens: Callable[[str], int], max_tokens: int) -> str:
    """Shorten to `max_tokens`: cut after the last sentence or clause that fits, else after the last word."""
    if count_tokens(text) <= max_tokens:
        return text
    for boundary in (r"[.!?](?=\s)", r"[;,](?=\s)", r"\s"):
        cuts = [m.start() + (0 if boundary == r"\s" else 1) for m in re.finditer(boundary, text)]
        for cut in reversed(cuts):
            candidate = text[:cut].rstrip(" ,;")
            if candidate and count_tokens(candidate) <= max_tokens:
                return candidate
    return ""


def finish_caption(
    raw: str,
    name: str,
    class_word: str | None = None,
    count_tokens: Callable[[str], int] | None = None,
    max_tokens: int = 75,
) -> str:
    text = clean(raw)
    if not text:
        return ""
    text = insert_name(text, name, class_word)
    if count_tokens is not None:
        text = fit_tokens(text, count_tokens, max_tokens)
        if name.lower() not in text.lower():  # the cut took the name with it: lead with it instead
            text = fit_tokens(insert_name(text, name, class_word, replace_subject=False), count_tokens, max_tokens)
    return text


def clip_token_counter(source: str, revision: str | None = None) -> Callable[[str], int]:
    """Count CLIP tokens (without start/end) with the base model's own tokenizer."""
    from transformers import CLIPTokenizer

    if Path(source).suffix in {".safetensors", ".ckpt"}:
        # A single-file checkpoint carries no tokenizer; SDXL's first tokenizer is CLIP ViT-L's.
        tokenizer = CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")
    else:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision)
    return lambda text: len(tokenizer(text, add_special_tokens=False, truncation=False).input_ids)
