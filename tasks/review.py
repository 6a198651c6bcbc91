"""Review: automatic rules over every caption, then a person where the settings ask for one.

Clean captions are approved and written as .txt sidecars (the kohya convention). Flagged ones (or all,
with approval "all") wait for a person: the run asks in the Prefect UI (flows/review.py), or a person runs
`lorapipe review WORKSPACE`. A caption file a person changed by hand is read first, on every run of this
stage (`lorapipe run`, `train`, the nightly, a UI run), as their edit; then every decision is replayed from
the workspace's log (lorapipe/review_decisions.py) and the sidecars are written to match what training uses.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from captioners import clip_token_counter
from captioners.review_rules import caption_problems
from lorapipe.config import ReviewConfig
from lorapipe.errors import UserError
from lorapipe.fsutil import atomic_write_text
from lorapipe.manifest import CaptionEdit, ImageRecord, read_manifest
from lorapipe.review_decisions import (DecisionStore, Resolved, ReviewDecision, SidecarLedger, resolve,
                                       review_inputs_digest, same_text, sha256_bytes)
from lorapipe.textio import decode_user_text
from lorapipe.workspace import Workspace
from tasks.review_answers import REFUSED_EDIT_KINDS, display_name, record_answer, record_decision
from tasks.stage import code_version, finish_manifest_stage, manifest_digest, stage_key, stage_task

log = logging.getLogger("lorapipe.review")


def edit_check(name: str, config: ReviewConfig, count_tokens):
    """What a person's own caption must pass before it is used: not empty, the name in it. Their word stands
    against every other rule (its findings stay on record in review_reasons)."""

    def check(text: str) -> str | None:
        refused = [p for p in caption_problems(text, name, config, count_tokens) if p.startswith(REFUSED_EDIT_KINDS)]
        return refused[0] if refused else None

    return check


def sidecar_of(ws: Workspace, record: ImageRecord) -> Path:
    return ws.path(record.image_path).with_suffix(".txt")


def file_owner(path: Path) -> str:
    try:
        return path.owner()
    except (KeyError, NotImplementedError, OSError):  # a uid with no name (containers), or no owners (Windows)
        return "unknown"


def pick_up_caption_files(records: list[ImageRecord], ws: Workspace, store: DecisionStore, ledger: SidecarLedger,
                          check, reviewer: str | None = None) -> tuple[list[str], dict[str, str]]:
    """Read the `images/*.txt` files a person changed (the kohya way) as their edits, before anything rewrites them.

    Returns (the files recorded as edits, problems by image id). A file that cannot be used (not UTF-8, empty,
    without the name) is left untouched and its image waits for a person with the reason.
    """
    recorded, problems = [], {}
    for r in records:
        path = sidecar_of(ws, r) if r.kept and r.image_path else None
        if path is None or not path.is_file():
            continue
        rel, data = ws.relative(path), path.read_bytes()
        if ledger.known(rel) == sha256_bytes(data):
            continue  # as lorapipe wrote it (or already read)
        current = resolve(r.caption, store.history(r.id, r.caption))
        try:
            text = decode_user_text(data, rel).strip()
        except UserError as err:
            problems[r.id] = str(err)
            continue
        if same_text(text, current.caption):  # saved again unchanged (a BOM, CRLF): nothing to decide
            ledger.accept(rel, data)
            continue
        when = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
        problem = record_decision(store, r.model_copy(update={"caption": current.caption}), "edit",
                                  reviewer or file_owner(path), "sidecar", after=text, when=when, check=check)
        if problem:
            problems[r.id] = f"{rel}: {problem}; fix the file (or delete it to get the caption back)"
        else:
            recorded.append(rel)
            ledger.accept(rel, data)
    return recorded, problems


def sync_caption_file(ws: Workspace, ledger: SidecarLedger, record: ImageRecord, approved: bool) -> None:
    """The sidecar says what training uses: written for approved captions; lorapipe's own file removed for the
    others (so other tools don't pick them up). A file a person wrote is never overwritten or deleted."""
    path = sidecar_of(ws, record)
    rel = ws.relative(path)
    data = path.read_bytes() if path.is_file() else None
    ours = data is not None and ledger.known(rel) == sha256_bytes(data)
    if approved:
        if data is None or (ours and not same_text(decode_user_text(data, rel), record.caption)):
            atomic_write_text(path, record.caption)
            ledger.accept(rel, record.caption.encode("utf-8"))
    elif ours:
        path.unlink()
        ledger.forget(rel)


def review_records(
    records: list[ImageRecord], ws: Workspace, config: ReviewConfig, name: str, tokenizer_from: str,
    reviewer: str | None = None, read_files: list[str] | None = None,
) -> tuple[list, dict]:
    """The rules and every decision over `records`; `read_files` (if given) receives the caption files read as
    edits, `reviewer` is who made them (default: each file's owner)."""
    count_tokens = clip_token_counter(tokenizer_from) if any(r.kept for r in records) else None
    store, ledger = DecisionStore(ws.cache), SidecarLedger(ws.root)
    from_files, file_problems = pick_up_caption_files(records, ws, store, ledger,
                                                      edit_check(name, config, count_tokens), reviewer)
    resolved: dict[str, Resolved] = {r.id: resolve(r.caption, store.history(r.id, r.caption)) for r in records
                                     if r.kept}
    by_caption = defaultdict(list)
    for r in records:
        if r.kept and (caption := resolved[r.id].caption):
            by_caption[caption.strip().lower()].append(r)
    out = []
    for record in records:
        if not record.kept:
            out.append(record)
            continue
        res = resolved[record.id]
        if res.edits:
            edits = [CaptionEdit(who=d.who, when=d.when, before=d.before, after=d.after) for d in res.edits]
            record = record.model_copy(update={"caption": res.caption,
                                               "caption_edits": [*record.caption_edits, *edits]})
        if res.dropped_by:
            who = res.dropped_by.who
            record = record.model_copy(update={
                "status": "rejected", "reason": f"dropped_by_reviewer: {who}", "review": "rejected",
                "reviewed_by": who})
            sync_caption_file(ws, ledger, record, approved=False)
            out.append(record)
            continue
        problems = caption_problems(record.caption, name, config, count_tokens)
        if record.caption_error and not res.edits:  # nothing to train on until a person writes a caption
            problems = [f"caption_failed: {record.caption_error}", *(p for p in problems if not p.startswith("empty"))]
        twins = [r for r in by_caption.get((record.caption or "").strip().lower(), []) if r.id != record.id]
        if twins and not res.approved_by:
            problems.append(f"duplicate: the same caption as {display_name(twins[0])}")
        if record.id in file_problems:
            problems.append(f"caption_file: {file_problems[record.id]}")
        if res.approved_by and record.id not in file_problems and (record.caption or "").strip():
            review, who = "approved", res.approved_by.who  # a person looked at it: their word stands
        else:
            review = "pending" if problems or config.approval == "all" else "approved"
            who = None
        sync_caption_file(ws, ledger, record, approved=review == "approved")
        if review == "pending" and problems:
            log.warning("%s: caption needs review (%s): %r", record.source, "; ".join(problems), record.caption)
        out.append(record.model_copy(update={"review": review, "review_reasons": problems, "reviewed_by": who}))
    ledger.save()
    if read_files is not None:
        read_files += from_files
    stats = {
        "approved": sum(1 for r in out if r.review == "approved"),
        "pending": sum(1 for r in out if r.review == "pending"),
        "rejected_by_reviewer": sum(1 for r in out if r.review == "rejected"),
    }
    return out, stats


CODE = code_version(__name__, "lorapipe.review_decisions", "tasks.review_answers", "captioners.review_rules",
                    "captioners.caption_text", "captioners.caption_subject")


def review_key(manifest: str, workspace: str, config: ReviewConfig, name: str, tokenizer_from: str,
               reviewer: str | None = None) -> str:
    # The decisions and the caption files people edited are inputs: an edited images/*.txt is never "cached".
    return stage_key("review", CODE, manifest_digest(manifest), workspace, config, name, tokenizer_from,
                     review_inputs_digest(workspace))


def run_review(manifest: str, workspace: str, config: ReviewConfig, name: str, tokenizer_from: str,
               reviewer: str | None = None) -> dict:
    """The review stage; `reviewer` names who edited caption files (default: each file's owner)."""
    ws = Workspace.at(workspace)
    key, read_files = review_key(manifest, workspace, config, name, tokenizer_from), []
    records, stats = review_records(read_manifest(manifest), ws, config, name, tokenizer_from, reviewer, read_files)
    result = finish_manifest_stage(ws, "review", key, records, stats)
    result["caption_files_read"] = read_files  # as edits, this run
    result["outputs"] += [str(sidecar_of(ws, r)) for r in records if r.review == "approved"]
    return result


review_task = stage_task(run_review, review_key, name="review")


def run_record_answer(manifest: str, workspace: str, answer: ReviewDecision, config: ReviewConfig, name: str,
                      tokenizer_from: str, source: str = "form", ref: str | None = None,
                      scope: list[str] | None = None) -> dict:
    """Record a person's answer about the captions in `manifest` (the review manifest they saw)."""
    ws, records = Workspace.at(workspace), read_manifest(manifest)
    check = edit_check(name, config, clip_token_counter(tokenizer_from))
    with ws.lock("review"):  # beside `lorapipe review` in a terminal, writing the same logs
        outcome = record_answer(records, DecisionStore(ws.cache), answer, source, check=check, ref=ref,
                                scope=set(scope) if scope else None)
    return {"recorded": outcome.recorded, "problems": outcome.problems}


# Never cached: each answer from a person is new information.
record_answer_task = task(run_record_answer, name="record-review-decisions", cache_policy=NO_CACHE)
