"""Review: automatic rules over every caption, then a person where the settings ask for one.

Clean captions are approved and written as .txt sidecars (the kohya convention). Flagged ones (or all,
with approval "all") wait for a person: the flow pauses for a form in the Prefect UI, or a person runs
`lorapipe review WORKSPACE`. Their decisions are stored by content and applied here on every run.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import defaultdict
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from captioners import clip_token_counter
from captioners.review_rules import caption_problems
from lorapipe.config import ReviewConfig
from lorapipe.fsutil import atomic_write_text
from lorapipe.manifest import CaptionEdit, ImageRecord, read_manifest
from lorapipe.review_decisions import DecisionStore, ReviewDecision
from lorapipe.workspace import Workspace
from tasks.stage import code_version, finish_manifest_stage, manifest_digest, stage_key, stage_task

log = logging.getLogger("lorapipe.review")

def display_name(record: ImageRecord) -> str:
    return Path(record.source).name


def find_records(records: list[ImageRecord], names: list[str]) -> dict[str, int]:
    """Reviewers name images by file name or image id (or its first 8+ characters)."""
    found = {}
    for name in names:
        matches = [i for i, r in enumerate(records)
                   if r.kept and (display_name(r) == name or (len(name) >= 8 and r.id.startswith(name)))]
        if len(matches) != 1:
            raise ValueError(f"{name!r} names {len(matches)} kept images; use the image id to disambiguate")
        found[name] = matches[0]
    return found


def record_decisions(records: list[ImageRecord], ws: Workspace, decision: ReviewDecision) -> int:
    """Store what a reviewer decided about the captions waiting for one; returns how many decisions."""
    store, who, count = DecisionStore(ws.cache), decision.reviewer or "reviewer", 0
    for name, i in find_records(records, decision.drop).items():
        store.put(records[i].id, records[i].caption, "drop", who)
        count += 1
    for name, i in find_records(records, list(decision.edits)).items():
        store.put(records[i].id, records[i].caption, "edit", who, decision.edits[name].strip())
        count += 1
    touched = set(find_records(records, decision.drop + list(decision.edits)).values())
    approve = set(find_records(records, decision.approve).values()) - touched
    if decision.approve_all:
        approve |= {i for i, r in enumerate(records) if r.kept and r.review == "pending" and i not in touched}
    for i in sorted(approve):
        store.put(records[i].id, records[i].caption, "approve", who)
        count += 1
    return count


REVIEW_CSV_FIELDS = ["file", "id", "action", "caption", "why"]


def write_review_csv(records: list[ImageRecord], path: Path) -> Path:
    """The captions waiting for a person, to edit in any spreadsheet or editor."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=REVIEW_CSV_FIELDS)
    writer.writeheader()
    for r in waiting_for_review(records):
        writer.writerow({"file": display_name(r), "id": r.id, "action": "", "caption": r.caption,
                         "why": "; ".join(r.review_reasons) or "approval: all"})
    return atomic_write_text(path, buf.getvalue())


def decision_from_csv(records: list[ImageRecord], path: Path, reviewer: str) -> ReviewDecision:
    """Rows: a changed caption is an edit; action "drop" leaves the image out; "approve" keeps it as written."""
    captions = {r.id: r.caption for r in records}
    decision = ReviewDecision(reviewer=reviewer)
    with open(path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.DictReader(f), 2):
            image = (row.get("id") or row.get("file") or "").strip()
            action = (row.get("action") or "").strip().lower()
            if not image:
                raise ValueError(f"{path}:{line}: no id or file")
            if action not in ("", "approve", "drop", "edit"):
                raise ValueError(f"{path}:{line}: action {action!r} is not approve, edit or drop")
            caption = (row.get("caption") or "").strip()
            if action == "drop":
                decision.drop.append(image)
            elif caption and caption != (captions.get(image) or "").strip():
                decision.edits[image] = caption
            elif action == "approve":
                decision.approve.append(image)
    return decision


def decision_from_sidecars(records: list[ImageRecord], ws: Workspace, reviewer: str) -> ReviewDecision:
    """Captions changed by hand in the .txt sidecars (the kohya way) become edits."""
    edits = {}
    for r in records:
        sidecar = ws.path(r.image_path).with_suffix(".txt") if r.kept and r.image_path else None
        if r.review == "approved" and sidecar and sidecar.exists():
            text = sidecar.read_text(encoding="utf-8").strip()
            if text and text != (r.caption or "").strip():
                edits[r.id] = text
    return ReviewDecision(edits=edits, reviewer=reviewer)


def review_records(
    records: list[ImageRecord], ws: Workspace, config: ReviewConfig, name: str, tokenizer_from: str
) -> tuple[list, dict]:
    count_tokens = clip_token_counter(tokenizer_from) if any(r.kept for r in records) else None
    store = DecisionStore(ws.cache)
    by_caption = defaultdict(list)
    for r in records:
        if r.kept and r.caption:
            by_caption[r.caption.strip().lower()].append(r)
    out = []
    for record in records:
        if not record.kept:
            out.append(record)
            continue
        decision = store.get(record.id, record.caption)
        if decision and decision.action == "drop":
            out.append(record.model_copy(update={
                "status": "rejected", "reason": f"dropped_by_reviewer: {decision.who}", "review": "rejected",
                "reviewed_by": decision.who}))
            continue
        update = {}
        if decision and decision.action == "edit":
            edit = CaptionEdit(who=decision.who, when=decision.when, before=record.caption, after=decision.caption)
            update = {"caption": decision.caption, "caption_edits": [*record.caption_edits, edit]}
        record = record.model_copy(update=update)
        problems = caption_problems(record.caption, name, config, count_tokens)
        twins = [r for r in by_caption.get((record.caption or "").strip().lower(), []) if r.id != record.id]
        if twins and not decision:
            problems.append(f"duplicate: the same caption as {display_name(twins[0])}")
        if decision:  # a person looked at it: their word stands; the rules' findings stay on record
            review, who = "approved", decision.who
        else:
            review = "pending" if problems or config.approval == "all" else "approved"
            who = None
        sidecar = ws.path(record.image_path).with_suffix(".txt")
        if review == "approved":
            if not sidecar.exists() or sidecar.read_text(encoding="utf-8") != record.caption:
                atomic_write_text(sidecar, record.caption)
        else:
            sidecar.unlink(missing_ok=True)  # a caption nobody approved must not be picked up by other tools
            if problems:
                log.warning("%s: caption needs review (%s): %r", record.source, "; ".join(problems), record.caption)
        out.append(record.model_copy(update={"review": review, "review_reasons": problems, "reviewed_by": who}))
    stats = {
        "approved": sum(1 for r in out if r.review == "approved"),
        "pending": sum(1 for r in out if r.review == "pending"),
        "rejected_by_reviewer": sum(1 for r in out if r.review == "rejected"),
    }
    return out, stats


def waiting_for_review(records: list[ImageRecord]) -> list[ImageRecord]:
    return [r for r in records if r.kept and r.review == "pending"]


def review_markdown(records: list[ImageRecord], limit: int = 200) -> str:
    """The captions waiting for a person, as the Prefect UI shows them above the review form."""
    waiting = waiting_for_review(records)
    lines = [
        f"### {len(waiting)} captions need a person",
        "Approve them as they are (**approve_all**), give a new caption per file (**edits**: file name → caption), "
        "or leave images out of training (**drop**). Anything not approved stays out of this run.",
        "",
        "| file | id | caption | why |",
        "| --- | --- | --- | --- |",
    ]
    for r in waiting[:limit]:
        why = "; ".join(r.review_reasons) or "approval: all"
        caption = (r.caption or "").replace("|", "\\|")
        lines.append(f"| {display_name(r)} | {r.id[:8]} | {caption} | {why.replace('|', '/')} |")
    if len(waiting) > limit:
        lines.append(f"\n…and {len(waiting) - limit} more (see the review manifest).")
    return "\n".join(lines)


CODE = code_version(__name__, "lorapipe.review_decisions", "captioners.review_rules", "captioners.caption_text",
                    "captioners.caption_subject")


def review_key(manifest: str, workspace: str, config: ReviewConfig, name: str, tokenizer_from: str) -> str:
    decisions = DecisionStore(Workspace(Path(workspace)).cache).digest()
    return stage_key("review", CODE, manifest_digest(manifest), workspace, config, name, tokenizer_from, decisions)


def run_review(manifest: str, workspace: str, config: ReviewConfig, name: str, tokenizer_from: str) -> dict:
    ws = Workspace.at(workspace)
    records, stats = review_records(read_manifest(manifest), ws, config, name, tokenizer_from)
    result = finish_manifest_stage(ws, "review", review_key(manifest, workspace, config, name, tokenizer_from),
                                   records, stats)
    result["outputs"] += [str(ws.path(r.image_path).with_suffix(".txt")) for r in records if r.review == "approved"]
    return result


review_task = stage_task(run_review, review_key, name="review")


def run_record_decisions(manifest: str, workspace: str, decision: ReviewDecision) -> dict:
    return {"decisions": record_decisions(read_manifest(manifest), Workspace.at(workspace), decision)}


# Never cached: each answer from a person is new information.
record_decisions_task = task(run_record_decisions, name="record-review-decisions", cache_policy=NO_CACHE)
