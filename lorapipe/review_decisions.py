"""A person's caption decisions, kept by content: (image id, the caption they saw) → approve, edit, drop.

Stored in the workspace, so a decision survives reruns: the review stage applies it whenever the same
image comes with the same caption again, and asks again only when either changes.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lorapipe.fsutil import atomic_write_json, sha256_file, stable_hash

Action = Literal["approve", "edit", "drop"]


class ReviewDecision(BaseModel):
    """What a reviewer sends back: the Prefect UI renders this as a form."""

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


class Decision(BaseModel):
    action: Action
    caption: str | None = None  # the new caption, for "edit"
    who: str
    when: str


class DecisionStore:
    def __init__(self, root: str | Path):
        self.dir = Path(root) / "review-decisions"

    @staticmethod
    def key(image_id: str, caption: str | None) -> str:
        return stable_hash(image_id, caption or "")

    def get(self, image_id: str, caption: str | None) -> Decision | None:
        path = self.dir / f"{self.key(image_id, caption)}.json"
        return Decision.model_validate_json(path.read_text()) if path.exists() else None

    def put(self, image_id: str, caption: str | None, action: Action, who: str, new_caption: str | None = None):
        decision = Decision(action=action, caption=new_caption, who=who or "unknown",
                            when=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        atomic_write_json(self.dir / f"{self.key(image_id, caption)}.json", json.loads(decision.model_dump_json()))
        return decision

    def digest(self) -> str:
        """Changes whenever a decision is added or changed: part of the review stage's cache key."""
        files = sorted(self.dir.glob("*.json")) if self.dir.exists() else []
        return stable_hash([(p.name, sha256_file(p)) for p in files])
