"""Caption review: the rules, a person's decisions (stored by content), the CSV and sidecar ways, the CLI."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from captioners import clip_token_counter
from helpers import cropped_demo_records
from lorapipe.config import ReviewConfig
from lorapipe.review_decisions import ReviewDecision
from tasks.review import (
    caption_problems,
    decision_from_csv,
    decision_from_sidecars,
    record_decisions,
    review_markdown,
    review_records,
    write_review_csv,
)

NAME = "Jane Doe"


@pytest.mark.parametrize(
    "caption, problem",
    [
        ("a woman in a red coat outdoors", "name_missing"),
        ("ohwx woman, Jane Doe, in a park", "placeholder"),
        ("Jane Doe", "too_short"),
        ("Jane Doe " + "smiling " * 80, "too_long"),
        ("", "empty"),
        ("Jane Doe. I'm sorry, I can't identify people.", "refusal"),
        ("The image shows Jane Doe in a park", "boilerplate"),
        ("Jane Doe in a park, a watermark in the corner", "mentions_text"),
        ("Jane Doe holding a sign, the text reads 'hello'", "mentions_text"),
    ],
)
def test_each_rule_flags_with_a_reason(caption, problem, tiny_models):
    count = clip_token_counter(str(tiny_models.sdxl))
    problems = caption_problems(caption, NAME, ReviewConfig(), count)
    assert [p.split(":")[0] for p in problems] == [problem]


@pytest.fixture
def captioned(tmp_path, workspace):
    records = cropped_demo_records(tmp_path / "photos", workspace, 3)
    captions = ["Jane Doe smiling in a red coat outdoors", "sks person in a studio", "Jane Doe laughing in a park"]
    return [r.model_copy(update={"caption": c}) for r, c in zip(records, captions)]


def review(records, workspace, tiny_models, **settings):
    return review_records(records, workspace, ReviewConfig(**settings), NAME, str(tiny_models.sdxl))


def test_clean_captions_are_approved_and_only_theirs_get_sidecars(captioned, workspace, tiny_models):
    reviewed, stats = review(captioned, workspace, tiny_models)
    assert stats == {"approved": 2, "pending": 1, "rejected_by_reviewer": 0}
    assert [r.review for r in reviewed] == ["approved", "pending", "approved"]
    sidecars = [workspace.path(r.image_path).with_suffix(".txt") for r in reviewed]
    assert sidecars[0].read_text() == captioned[0].caption and not sidecars[1].exists()


def test_duplicate_captions_across_images_are_flagged(captioned, workspace, tiny_models):
    same = [r.model_copy(update={"caption": "Jane Doe smiling in a park"}) for r in captioned[:2]]
    reviewed, _ = review(same, workspace, tiny_models)
    assert all(any(p.startswith("duplicate:") for p in r.review_reasons) for r in reviewed)


def test_approval_all_waits_for_a_person_even_when_clean(captioned, workspace, tiny_models):
    reviewed, stats = review(captioned, workspace, tiny_models, approval="all")
    assert stats["pending"] == 3
    assert "3 captions need a person" in review_markdown(reviewed)


def test_a_persons_decisions_are_applied_recorded_and_kept(captioned, workspace, tiny_models):
    reviewed, _ = review(captioned, workspace, tiny_models, approval="all")
    names = [r.source.split("/")[-1] for r in reviewed]
    decision = ReviewDecision(edits={names[1]: "Jane Doe in a studio, arms crossed"}, drop=[reviewed[2].id[:8]],
                              approve=[names[0]], reviewer="ada")
    assert record_decisions(reviewed, workspace, decision) == 3

    again, stats = review(captioned, workspace, tiny_models, approval="all")
    assert stats == {"approved": 2, "pending": 0, "rejected_by_reviewer": 1}
    edited = again[1]
    assert edited.caption == "Jane Doe in a studio, arms crossed" and edited.review == "approved"
    assert (edited.caption_edits[0].who, edited.caption_edits[0].before) == ("ada", "sks person in a studio")
    assert workspace.path(edited.image_path).with_suffix(".txt").read_text() == edited.caption
    assert again[2].status == "rejected" and again[2].reason == "dropped_by_reviewer: ada"
    assert again[0].reviewed_by == "ada"

    # A new caption for the same image is a new question: the old decision does not apply to it.
    changed = [captioned[0].model_copy(update={"caption": "Jane Doe in a blue coat"})]
    fresh, _ = review(changed, workspace, tiny_models, approval="all")
    assert fresh[0].review == "pending"


def test_an_unknown_file_name_is_an_error(captioned, workspace, tiny_models):
    reviewed, _ = review(captioned, workspace, tiny_models)
    with pytest.raises(ValueError, match="'nope.jpg' names 0 kept images"):
        record_decisions(reviewed, workspace, ReviewDecision(drop=["nope.jpg"]))


def test_csv_and_sidecar_edits_become_decisions(captioned, workspace, tiny_models, tmp_path):
    reviewed, _ = review(captioned, workspace, tiny_models)
    sheet = write_review_csv(reviewed, tmp_path / "review.csv")
    rows = list(csv.DictReader(sheet.open()))
    assert [r["file"] for r in rows] == ["p1.png"] and "placeholder" in rows[0]["why"]
    rows[0]["caption"] = "Jane Doe in a studio"
    with sheet.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert decision_from_csv(reviewed, sheet, "ada").edits == {reviewed[1].id: "Jane Doe in a studio"}

    workspace.path(reviewed[0].image_path).with_suffix(".txt").write_text("Jane Doe in a red coat, by hand")
    assert decision_from_sidecars(reviewed, workspace, "ada").edits == {reviewed[0].id: "Jane Doe in a red coat, by hand"}


def test_terminal_review_lists_then_applies(tmp_path, tiny_models, demo_photos):
    from flows.cli import app

    photos, _ = demo_photos
    ws = tmp_path / "ws"
    config = tmp_path / "job.yaml"
    config.write_text(
        f"name: Jane Doe\nimages: {photos}\ndataset:\n  crop:\n    resolution: 256\n    bucket_step: 32\n"
        f"caption:\n  model: {tiny_models.llava}\n  device: cpu\nreview:\n  approval: all\n"
        f"train:\n  base_model: {tiny_models.sdxl}\n"
    )
    runner = CliRunner()
    for argv in (["collect", str(ws), "--images", str(photos), "--config", str(config)], ["validate", str(ws)],
                 ["dedup", str(ws)], ["crop", str(ws)], ["caption", str(ws)]):
        assert runner.invoke(app, argv).exit_code == 0, argv

    listed = runner.invoke(app, ["review", str(ws)])
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.stdout)["waiting"] == 10 and (ws / "review.csv").exists()
    assert "10 captions wait for review" in listed.stderr

    rows = list(csv.DictReader((ws / "review.csv").open()))
    for row in rows:
        row["action"] = "approve"
    rows[0]["caption"] = "Jane Doe, edited in the sheet"
    rows[1]["action"] = "drop"
    with (ws / "review.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    applied = runner.invoke(app, ["review", str(ws), "--csv", str(ws / "review.csv"), "--reviewer", "ada"])
    assert applied.exit_code == 0, applied.output
    summary = json.loads(applied.stdout)
    assert summary["waiting"] == 0 and summary["stats"] == {"approved": 9, "pending": 0, "rejected_by_reviewer": 1}
    edited = next(p for p in (ws / "images").glob("*.txt") if p.read_text() == "Jane Doe, edited in the sheet")
    assert edited.exists()
