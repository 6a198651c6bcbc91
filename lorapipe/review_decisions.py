"""A person's caption decisions, one log per image, and the caption files (`images/*.txt`) people edit by hand.

Every decision (approve, edit, drop) is appended to its image's log with who, when, the caption the person
saw (`before`) and, for an edit, the caption they wrote (`after`). The review stage replays the log over the
caption the captioner gave (`resolve`):

- an edit replaces the caption whatever the captioner says now, and the latest edit wins, so an edit of an
  edit is kept (a person's words are never replaced by a new machine caption);
- an approval approves the text it was given for: a new machine caption is a new question;
- a drop leaves the photo out until a later edit or approval brings it back.

`SidecarLedger` remembers what lorapipe itself last wrote to (or accepted in) each sidecar, so a file a
person changed is told apart from one lorapipe wrote, and is read before anything rewrites it.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lorapipe.fsutil import atomic_write_json, read_json, sha256_file, stable_hash

Action = Literal["approve", "edit", "drop"]
Source = Literal["form", "cli", "csv", "sidecar"]


class ReviewDecision(BaseModel):
    """What a reviewer sends back (the Prefect UI's Resume form, `lorapipe review` flags, a CSV)."""

    model_config = ConfigDict(extra="forbid")

    approve_all: bool = Field(False, description="Approve every caption that is waiting, as written (after edits)")
    approve: list[str] = Field(default_factory=list, description="File names (or image ids) to approve as written")
    edits: dict[str, str] = Field(
        default_factory=dict, description="File name (or image id) → the caption to use instead"
    )
    drop: list[str] = Field(default_factory=list, description="File names (or image ids) to leave out of training")
    reviewer: str = Field("", description="Your name, recorded with each decision")

    def is_empty(self) -> bool:
        return not (self.approve_all or self.approve or self.edits or self.drop)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Decision(BaseModel):
    """One entry of an image's log."""

    model_config = ConfigDict(extra="ignore")  # older logs may carry fields this version no longer writes

    action: Action
    who: str
    when: str
    before: str | None = Field(None, description="The caption the person saw")
    after: str | None = Field(None, description="The caption they wrote (edit)")
    source: str = Field("cli", description="form, cli, csv or sidecar")
    ref: str | None = Field(None, description="The answer it came from (a flow run's form): recorded once")


class Resolved(BaseModel):
    """An image's log replayed over the captioner's caption."""

    caption: str | None
    approved_by: Decision | None = None  # the approval or edit that approved `caption`
    dropped_by: Decision | None = None
    edits: list[Decision] = Field(default_factory=list)

    @property
    def decided(self) -> Decision | None:
        return self.dropped_by or self.approved_by


def same_text(a: str | None, b: str | None) -> bool:
    return (a or "").strip() == (b or "").strip()


def resolve(machine_caption: str | None, log: list[Decision]) -> Resolved:
    """The caption and review outcome a log gives, in the order the decisions were made."""
    out = Resolved(caption=machine_caption)
    for d in log:
        if d.action == "edit":
            out.caption, out.approved_by, out.dropped_by = d.after, d, None
            out.edits.append(d)
        elif d.action == "approve" and same_text(d.before, out.caption):
            out.approved_by, out.dropped_by = d, None
        elif d.action == "drop":
            out.dropped_by = d
    return out


class DecisionStore:
    """`WORKSPACE/cache/review-decisions/images/<image id>.json`: each image's decisions, oldest first."""

    def __init__(self, root: str | Path):
        self.dir = Path(root) / "review-decisions"

    def _log_path(self, image_id: str) -> Path:
        return self.dir / "images" / f"{image_id}.json"

    def _legacy_path(self, image_id: str, caption: str | None) -> Path:
        # Before per-image logs, a decision was one file keyed by (image id, the caption it was made on).
        return self.dir / f"{stable_hash(image_id, caption or '')}.json"

    def history(self, image_id: str, machine_caption: str | None = None) -> list[Decision]:
        path = self._log_path(image_id)
        log = [Decision.model_validate(d) for d in read_json(path)] if path.exists() else []
        # An older lorapipe's decisions come first. It keyed each by the caption it was made on, so an edit of an
        # edit sits under the first edit's text: follow that chain, and such an edit is found again.
        older, caption, seen = [], machine_caption, set()
        while (legacy := self._legacy_path(image_id, caption)).exists() and caption not in seen:
            seen.add(caption)
            old = read_json(legacy)
            after = old.get("caption") if old["action"] == "edit" else None
            older.append(Decision(action=old["action"], who=old["who"], when=old["when"], before=caption,
                                  after=after, source="cli"))
            if old["action"] != "edit":
                break
            caption = after
        return older + log

    def record(self, image_id: str, decision: Decision) -> bool:
        """Append one decision; False (nothing written) when the answer it came from is already recorded."""
        path = self._log_path(image_id)
        log = read_json(path) if path.exists() else []
        if decision.ref and any(d.get("ref") == decision.ref and d.get("action") == decision.action for d in log):
            return False
        log.append(json.loads(decision.model_dump_json()))
        atomic_write_json(path, log)
        return True

    def digest(self) -> str:
        """Changes whenever a decision is added: part of the review stage's cache key."""
        files = sorted(self.dir.rglob("*.json")) if self.dir.exists() else []
        return stable_hash([(str(p.relative_to(self.dir)), sha256_file(p)) for p in files])


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class SidecarLedger:
    """What lorapipe last wrote to, or accepted in, each caption file (path relative to the workspace → sha256).

    A sidecar whose bytes differ from the ledger's (or that the ledger never saw and whose text is not the
    caption lorapipe would write) was written by a person: the review stage reads it as their decision and
    never overwrites or deletes it.
    """

    def __init__(self, workspace: str | Path):
        self.root = Path(workspace)
        self.path = self.root / "cache" / "sidecars.json"
        self.entries: dict[str, str] = read_json(self.path) if self.path.exists() else {}
        self.changed = False

    def known(self, rel: str) -> str | None:
        return self.entries.get(rel)

    def accept(self, rel: str, data: bytes) -> None:
        digest = sha256_bytes(data)
        if self.entries.get(rel) != digest:
            self.entries[rel], self.changed = digest, True

    def forget(self, rel: str) -> None:
        if self.entries.pop(rel, None) is not None:
            self.changed = True

    def save(self) -> None:
        if self.changed:
            atomic_write_json(self.path, self.entries)
            self.changed = False

    def person_changes(self) -> list[tuple[str, str]]:
        """(path, sha256) of every sidecar in images/ that lorapipe did not write as it is now."""
        images = self.root / "images"
        found = []
        for path in sorted(images.glob("*.txt")) if images.exists() else []:
            rel = str(path.relative_to(self.root))
            digest = sha256_file(path)
            if self.entries.get(rel) != digest:
                found.append((rel, digest))
        return found


def review_inputs_digest(workspace: str | Path) -> str:
    """The decisions and the hand-edited caption files: what a person gave the review stage.

    Part of the review stage's cache key and of the nightly retrain's fingerprint, so an edited
    `images/*.txt` is never skipped as "unchanged".
    """
    root = Path(workspace)
    decisions, edited = DecisionStore(root / "cache").digest(), SidecarLedger(root).person_changes()
    return stable_hash(decisions, edited) if edited else decisions  # as before caption files counted
