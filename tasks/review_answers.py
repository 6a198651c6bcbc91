"""A person's review answers into decisions: one function records each decision, whatever the door.

The doors are the Prefect UI's Resume form (flows/review.py), `lorapipe review` flags, the review CSV and the
`images/*.txt` caption files (tasks/review.py picks those up). Each part of an answer is checked on its own:
valid parts are recorded, each invalid one (a name that matches no image, an empty caption, a caption without
the person's name) comes back as one line naming the part, the reason and the nearest image names, so the
person can fix it. Nothing a person typed is dropped without a word.
"""

from __future__ import annotations

import csv
import difflib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lorapipe.errors import UserError
from lorapipe.fsutil import atomic_write_bytes
from lorapipe.manifest import ImageRecord
from lorapipe.review_decisions import Action, Decision, DecisionStore, ReviewDecision, Source, now_iso, same_text
from lorapipe.textio import read_user_text

# A person's caption is refused only where training on it would be wrong: rule findings of these kinds.
REFUSED_EDIT_KINDS = ("empty", "name_missing")


def display_name(record: ImageRecord) -> str:
    return record.file_name


def waiting_for_review(records: list[ImageRecord]) -> list[ImageRecord]:
    return [r for r in records if r.kept and r.review == "pending"]


def _numbers_unpadded(name: str) -> str:
    return re.sub(r"\d+", lambda m: str(int(m.group())), name.lower())


def nearest_names(name: str, kept: list[tuple[int, ImageRecord]]) -> list[int]:
    """The images a mistyped name most likely meant: the same name but for zero padding (portrait_2.jpg for
    portrait_02.jpg), else the closest spellings (difflib's ratio, within 0.05 of the best, at least 0.6)."""
    unpadded = [i for i, r in kept if _numbers_unpadded(display_name(r)) == _numbers_unpadded(name)]
    if unpadded:
        return unpadded
    scored = [(difflib.SequenceMatcher(None, name.lower(), display_name(r).lower()).ratio(), i) for i, r in kept]
    best = max((s for s, _ in scored), default=0.0)
    return [i for s, i in sorted(scored, reverse=True) if s >= max(0.6, best - 0.05)][:3]


def find_image(records: list[ImageRecord], name: str) -> tuple[int | None, str | None, list[int]]:
    """(index, None, []) for the one kept image `name` means (file name, image id or its first 8+ characters);
    else (None, the problem in one line, indexes of the images it may have meant)."""
    name = name.strip()
    kept = [(i, r) for i, r in enumerate(records) if r.kept]
    matches = [i for i, r in kept if display_name(r) == name or (len(name) >= 8 and r.id.startswith(name))]
    if not matches:  # Windows users type PORTRAIT_02.JPG for portrait_02.jpg: unambiguous, so accepted
        matches = [i for i, r in kept if display_name(r).lower() == name.lower()]
    if len(matches) == 1:
        return matches[0], None, []
    if matches:
        ids = ", ".join(records[i].id[:12] for i in matches)
        return None, f"{name!r} names {len(matches)} kept images (ids {ids}): use the image id", matches
    guesses = nearest_names(name, kept)
    hint = f" — did you mean {' or '.join(display_name(records[i]) for i in guesses)}?" if guesses else ""
    return None, f"no kept image named {name!r}{hint}", guesses


def record_decision(store: DecisionStore, record: ImageRecord, action: Action, who: str, source: Source, *,
                    after: str | None = None, when: str | None = None, ref: str | None = None,
                    check: Callable[[str], str | None] | None = None) -> str | None:
    """Check one decision about `record` (as the person saw it) and append it to the image's log.

    Every door goes through here. Returns None when recorded, else why not in one line (nothing is written):
    an edit whose text `check` refuses (empty, no name), or an approval of an image that has no caption.
    """
    label = display_name(record)
    if action == "edit":
        after = (after or "").strip()
        if problem := (check(after) if check else None) or (None if after else "empty: no caption"):
            return f"{label}: caption not applied ({problem}): {after!r}"
    if action == "approve" and not (record.caption or "").strip():
        why = f"the captioner gave none: {record.caption_error}" if record.caption_error else "it is empty"
        return f"{label}: no caption to approve ({why}): type one, or drop the photo"
    store.record(record.id, Decision(action=action, who=who.strip() or "unknown", when=when or now_iso(),
                                     before=record.caption, after=after, source=source, ref=ref))
    return None


@dataclass
class AnswerOutcome:
    recorded: int = 0
    problems: list[str] = field(default_factory=list)


def record_answer(records: list[ImageRecord], store: DecisionStore, answer: ReviewDecision, source: Source, *,
                  check: Callable[[str], str | None] | None = None, ref: str | None = None,
                  scope: set[str] | None = None) -> AnswerOutcome:
    """Record every valid part of a person's answer about `records` (the review manifest they saw).

    `approve_all` approves the waiting captions (those with ids in `scope`, if given) except any image an
    invalid part may have meant: an edit typed under a misspelt file name must not approve the old caption of
    the file it was meant for. A misspelt name with no near match holds `approve_all` back entirely.
    """
    out, held, touched, blind = AnswerOutcome(), set(), set(), False

    def image(name: str, part: str) -> int | None:
        nonlocal blind
        i, problem, guesses = find_image(records, name)
        if problem:
            out.problems.append(f"{problem} ({part})")
            held.update(guesses)
            blind = blind or not guesses
        return i

    def decide(i: int, action: Action, after: str | None = None) -> None:
        problem = record_decision(store, records[i], action, answer.reviewer, source, after=after, ref=ref,
                                  check=check)
        touched.add(i)
        if problem:
            out.problems.append(problem)
            held.add(i)
        else:
            out.recorded += 1

    for name, text in answer.edits.items():
        if (i := image(name, f"your caption: {text.strip()!r}")) is not None:
            decide(i, "edit", text)
    for name in answer.drop:
        if (i := image(name, "drop")) is not None:
            decide(i, "drop")
    approve = {i for name in answer.approve if (i := image(name, "approve")) is not None}
    if answer.approve_all and blind:
        out.problems.append("approve_all not applied: a name above matches no image, so it is not known which "
                            "caption you meant to change; fix the name and approve again")
    elif answer.approve_all:
        approve |= {i for i, r in enumerate(records)
                    if r.kept and r.review == "pending" and (scope is None or r.id in scope)} - held
    for i in sorted(approve - touched):
        decide(i, "approve")
    return out


REVIEW_CSV_FIELDS = ["file", "id", "action", "caption", "why"]


def write_review_csv(records: list[ImageRecord], path: Path) -> Path:
    """The captions waiting for a person, to edit in any spreadsheet or editor.

    UTF-8 with a byte-order mark: Excel shows accented names right only then; every reader here accepts it.
    """
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=REVIEW_CSV_FIELDS)
    writer.writeheader()
    for r in waiting_for_review(records):
        writer.writerow({"file": display_name(r), "id": r.id, "action": "", "caption": r.caption or "",
                         "why": "; ".join(r.review_reasons) or "approval: all"})
    return atomic_write_bytes(path, buf.getvalue().encode("utf-8-sig"))


def decision_from_csv(records: list[ImageRecord], path: Path, reviewer: str) -> tuple[ReviewDecision, list[str]]:
    """A review CSV (as written by `write_review_csv`, then edited) as an answer, plus the rows it could not read.

    A changed caption is an edit; action "drop" leaves the image out; "approve" (or "edit" with the caption
    unchanged) approves it as written. Comma, semicolon (Excel in much of Europe) and tab separators are read;
    text is UTF-8 with or without BOM.

    Raises:
        UserError: not UTF-8, or no file/id column (one line naming the file).
    """
    text = read_user_text(path, "review CSV")
    header = text.split("\n", 1)[0]
    delimiter = max(",;\t", key=header.count)
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    columns = {(c or "").strip().lower() for c in reader.fieldnames or []}
    if not columns & {"file", "id"} or not columns & {"caption", "action"}:
        raise UserError(f"{path}: no file/id and caption/action columns (found {sorted(columns)}); edit the "
                        f"review.csv that `lorapipe review` writes, keeping its header: {','.join(REVIEW_CSV_FIELDS)}")
    decision, problems = ReviewDecision(reviewer=reviewer), []
    for row in reader:
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items() if isinstance(v, str)}
        where = f"{path}:{reader.line_num}"
        image, action = row.get("id") or row.get("file") or "", row.get("action", "").lower()
        caption = row.get("caption", "")
        if not image:
            if any(row.values()):
                problems.append(f"{where}: no id or file in this row")
            continue
        if action not in ("", "approve", "drop", "edit"):
            problems.append(f"{where}: action {action!r} is not approve, edit or drop ({image})")
            continue
        i, _, _ = find_image(records, image)
        changed = "caption" in row and (caption if i is None else not same_text(caption, records[i].caption))
        if action == "drop":
            decision.drop.append(image)
        elif changed:  # an emptied caption is sent back by record_answer, like an unknown name
            decision.edits[image] = caption
        elif action in ("approve", "edit"):
            decision.approve.append(image)
    return decision, problems
