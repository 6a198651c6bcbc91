"""Review: automatic rules over every caption. Clean captions are approved and written as .txt sidecars
(the kohya convention); flagged ones wait for a person and are left out of training until then.
"""

from __future__ import annotations

import logging
import re

from captioners import clip_token_counter
from lorapipe.config import ReviewConfig
from lorapipe.fsutil import atomic_write_text
from lorapipe.manifest import ImageRecord, read_manifest
from lorapipe.workspace import Workspace
from tasks.stage import code_version, finish_manifest_stage, manifest_digest, stage_key, stage_task

log = logging.getLogger("lorapipe.review")


def caption_problems(caption: str | None, name: str, config: ReviewConfig, count_tokens) -> list[str]:
    """Every rule the caption breaks, as reasons for the manifest (empty list: clean)."""
    if not caption or not caption.strip():
        return ["empty: no caption"]
    problems = []
    if name.lower() not in caption.lower():
        problems.append(f"name_missing: {name!r} is not in the caption")
    tokens = count_tokens(caption)
    if tokens > config.max_tokens:
        problems.append(f"too_long: {tokens} CLIP tokens > {config.max_tokens}")
    words = len(caption.split())
    if words < config.min_words:
        problems.append(f"too_short: {words} words < {config.min_words}")
    for token in config.placeholder_tokens:
        if re.search(rf"(?<!\w){re.escape(token)}(?!\w)", caption, re.IGNORECASE):
            problems.append(f"placeholder: {token!r} (use the person's real name)")
    return problems


def review_records(
    records: list[ImageRecord], ws: Workspace, config: ReviewConfig, name: str, tokenizer_from: str
) -> tuple[list, dict]:
    count_tokens = clip_token_counter(tokenizer_from) if any(r.kept for r in records) else None
    out = []
    for record in records:
        if not record.kept:
            out.append(record)
            continue
        problems = caption_problems(record.caption, name, config, count_tokens)
        decision = "pending" if problems else "approved"
        sidecar = ws.path(record.image_path).with_suffix(".txt")
        if decision == "approved":
            if not sidecar.exists() or sidecar.read_text(encoding="utf-8") != record.caption:
                atomic_write_text(sidecar, record.caption)
        else:
            sidecar.unlink(missing_ok=True)  # a flagged caption must not be picked up by other tools either
            log.warning("%s: caption needs review (%s): %r", record.source, "; ".join(problems), record.caption)
        out.append(record.model_copy(update={"review": decision, "review_reasons": problems}))
    approved = sum(1 for r in out if r.review == "approved")
    pending = sum(1 for r in out if r.review == "pending")
    return out, {"approved": approved, "pending": pending}


CODE = code_version(__name__)


def review_key(manifest: str, workspace: str, config: ReviewConfig, name: str, tokenizer_from: str) -> str:
    return stage_key("review", CODE, manifest_digest(manifest), workspace, config, name, tokenizer_from)


def run_review(manifest: str, workspace: str, config: ReviewConfig, name: str, tokenizer_from: str) -> dict:
    ws = Workspace.at(workspace)
    records, stats = review_records(read_manifest(manifest), ws, config, name, tokenizer_from)
    result = finish_manifest_stage(ws, "review", review_key(manifest, workspace, config, name, tokenizer_from),
                                   records, stats)
    result["outputs"] += [str(ws.path(r.image_path).with_suffix(".txt")) for r in records if r.review == "approved"]
    return result


review_task = stage_task(run_review, review_key, name="review")
