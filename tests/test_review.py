"""Caption review: the rules, a person's decisions (one log per image), and each door into it: answers, the CSV,
the caption files (images/*.txt). The `lorapipe review` / `lorapipe train` doors are in test_review_cli.py."""

from __future__ import annotations

import csv

import pytest

from captioners import clip_token_counter
from helpers import cropped_demo_records
from lorapipe.config import ReviewConfig
from lorapipe.errors import UserError
from lorapipe.fsutil import atomic_write_json, stable_hash
from lorapipe.review_decisions import DecisionStore, ReviewDecision
from tasks.review import caption_problems, edit_check, review_records
from tasks.review_answers import decision_from_csv, record_answer, waiting_for_review, write_review_csv

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


def answer(records, workspace, tiny_models, decision, **options):
    check = edit_check(NAME, ReviewConfig(), clip_token_counter(str(tiny_models.sdxl)))
    return record_answer(records, DecisionStore(workspace.cache), decision, "form", check=check, **options)


def sidecar(workspace, record):
    return workspace.path(record.image_path).with_suffix(".txt")


def test_clean_captions_are_approved_and_only_theirs_get_sidecars(captioned, workspace, tiny_models):
    reviewed, stats = review(captioned, workspace, tiny_models)
    assert stats == {"approved": 2, "pending": 1, "rejected_by_reviewer": 0}
    assert [r.review for r in reviewed] == ["approved", "pending", "approved"]
    assert sidecar(workspace, reviewed[0]).read_text() == captioned[0].caption
    assert not sidecar(workspace, reviewed[1]).exists()


def test_duplicate_captions_across_images_are_flagged(captioned, workspace, tiny_models):
    same = [r.model_copy(update={"caption": "Jane Doe smiling in a park"}) for r in captioned[:2]]
    reviewed, _ = review(same, workspace, tiny_models)
    assert all(any(p.startswith("duplicate:") for p in r.review_reasons) for r in reviewed)


def test_approval_all_waits_for_a_person_even_when_clean(captioned, workspace, tiny_models):
    reviewed, stats = review(captioned, workspace, tiny_models, approval="all")
    assert stats["pending"] == 3 and len(waiting_for_review(reviewed)) == 3


def test_a_persons_decisions_are_applied_recorded_and_kept(captioned, workspace, tiny_models):
    reviewed, _ = review(captioned, workspace, tiny_models, approval="all")
    names = [r.source.split("/")[-1] for r in reviewed]
    decision = ReviewDecision(edits={names[1]: "Jane Doe in a studio, arms crossed"}, drop=[reviewed[2].id[:8]],
                              approve=[names[0]], reviewer="ada")
    outcome = answer(reviewed, workspace, tiny_models, decision)
    assert (outcome.recorded, outcome.problems) == (3, [])

    again, stats = review(captioned, workspace, tiny_models, approval="all")
    assert stats == {"approved": 2, "pending": 0, "rejected_by_reviewer": 1}
    edited = again[1]
    assert edited.caption == "Jane Doe in a studio, arms crossed" and edited.review == "approved"
    assert (edited.caption_edits[0].who, edited.caption_edits[0].before) == ("ada", "sks person in a studio")
    assert sidecar(workspace, edited).read_text() == edited.caption
    assert again[2].status == "rejected" and again[2].reason == "dropped_by_reviewer: ada"
    assert not sidecar(workspace, again[2]).exists()
    assert again[0].reviewed_by == "ada"

    # A new machine caption is a new question for an approval; a person's own caption stays theirs.
    recaptioned = [captioned[0].model_copy(update={"caption": "Jane Doe in a blue coat"}),
                   captioned[1].model_copy(update={"caption": "a person in a studio, new model"})]
    fresh, _ = review(recaptioned, workspace, tiny_models, approval="all")
    assert fresh[0].review == "pending"
    assert (fresh[1].caption, fresh[1].review) == ("Jane Doe in a studio, arms crossed", "approved")


def test_an_edit_of_an_edit_is_kept_whatever_door_it_came_through(captioned, workspace, tiny_models):
    reviewed, _ = review(captioned, workspace, tiny_models, approval="all")
    texts = ["Jane Doe in a studio, first edit", "Jane Doe in a studio, second edit", "Jane Doe, third edit, studio"]
    answer(reviewed, workspace, tiny_models, ReviewDecision(edits={reviewed[1].id: texts[0]}, reviewer="a"))
    reviewed, _ = review(captioned, workspace, tiny_models, approval="all")
    answer(reviewed, workspace, tiny_models, ReviewDecision(edits={reviewed[1].id: texts[1]}, reviewer="b"))
    reviewed, _ = review(captioned, workspace, tiny_models, approval="all")
    sidecar(workspace, reviewed[1]).write_text(texts[2])  # the kohya way
    reviewed, _ = review(captioned, workspace, tiny_models, approval="all")
    assert reviewed[1].caption == texts[2] and sidecar(workspace, reviewed[1]).read_text() == texts[2]
    assert [(e.before, e.after) for e in reviewed[1].caption_edits] == [
        ("sks person in a studio", texts[0]), (texts[0], texts[1]), (texts[1], texts[2])]


def test_a_typo_in_an_answer_is_sent_back_and_holds_approve_all_only_for_what_it_meant(captioned, workspace,
                                                                                         tiny_models):
    reviewed, _ = review(captioned, workspace, tiny_models, approval="all")
    p1 = reviewed[1].source.split("/")[-1]  # p1.png
    decision = ReviewDecision(approve_all=True, reviewer="ada", edits={"p_1.png": "Jane Doe in a studio"})
    outcome = answer(reviewed, workspace, tiny_models, decision)
    assert outcome.problems == [f"no kept image named 'p_1.png' — did you mean {p1}? (your caption: "
                                "'Jane Doe in a studio')"]
    after, _ = review(captioned, workspace, tiny_models, approval="all")
    assert [r.review for r in after] == ["approved", "pending", "approved"]  # approve_all kept, p1 still waits

    # Empty captions and captions without the name are not applied, and their image keeps waiting.
    outcome = answer(after, workspace, tiny_models, ReviewDecision(
        approve_all=True, edits={p1: "a woman in a studio"}, reviewer="ada"))
    assert outcome.recorded == 0 and "name_missing" in outcome.problems[0] and "'a woman in a studio'" in \
        outcome.problems[0]
    outcome = answer(after, workspace, tiny_models, ReviewDecision(edits={p1: "  "}, reviewer="ada"))
    assert outcome.recorded == 0 and outcome.problems == [f"{p1}: caption not applied (empty: no caption): ''"]

    # A name that matches nothing at all: approve_all cannot know what was meant, so it waits too.
    outcome = answer(after, workspace, tiny_models, ReviewDecision(approve_all=True, drop=["holiday.jpg"]))
    assert outcome.recorded == 0 and outcome.problems[-1].startswith("approve_all not applied")


def test_a_failed_caption_waits_for_a_person_and_their_caption_outlives_a_recaption(captioned, workspace,
                                                                                  tiny_models):
    failed = [captioned[0].model_copy(update={"caption": "", "caption_error": "refusal: I can't help with that"})]
    reviewed, stats = review(failed, workspace, tiny_models, approval="auto")
    assert reviewed[0].review == "pending" and reviewed[0].review_reasons == [
        "caption_failed: refusal: I can't help with that"]
    outcome = answer(reviewed, workspace, tiny_models, ReviewDecision(approve_all=True, reviewer="ada"))
    assert outcome.recorded == 0 and "no caption to approve (the captioner gave none" in outcome.problems[0]

    answer(reviewed, workspace, tiny_models, ReviewDecision(edits={reviewed[0].id: "Jane Doe on a red sofa"}))
    recaptioned = [captioned[0].model_copy(update={"caption": "Jane Doe smiling, a new caption"})]
    for records in (failed, recaptioned):
        again, _ = review(records, workspace, tiny_models, approval="auto")
        assert (again[0].caption, again[0].review) == ("Jane Doe on a red sofa", "approved")


def test_decisions_of_an_older_lorapipe_still_apply_even_its_lost_edits_of_edits(captioned, workspace, tiny_models):
    # It keyed a decision by (image id, the caption it was made on): an edit of an edit was never looked up.
    r, old = captioned[1], workspace.cache / "review-decisions"
    atomic_write_json(old / f"{stable_hash(r.id, r.caption)}.json",
                      {"action": "edit", "caption": "Jane Doe in a studio, from before", "who": "a", "when": "2026"})
    atomic_write_json(old / f"{stable_hash(r.id, 'Jane Doe in a studio, from before')}.json",
                      {"action": "edit", "caption": "Jane Doe in a studio, edited again", "who": "b", "when": "2026"})
    reviewed, _ = review(captioned, workspace, tiny_models)
    assert (reviewed[1].caption, reviewed[1].review, reviewed[1].reviewed_by) == (
        "Jane Doe in a studio, edited again", "approved", "b")
    assert [e.who for e in reviewed[1].caption_edits] == ["a", "b"]


def test_caption_files_a_person_changed_are_read_never_overwritten(captioned, workspace, tiny_models):
    reviewed, _ = review(captioned, workspace, tiny_models)
    notepad, bad, new = sidecar(workspace, reviewed[0]), sidecar(workspace, reviewed[2]), sidecar(workspace,
                                                                                                  reviewed[1])
    notepad.write_bytes("\ufeffJane Doe in a café, by hand\r\n".encode())  # Notepad: BOM, CRLF
    bad.write_bytes("Jane Doe in a café".encode("cp1252"))  # not UTF-8
    new.write_text("Jane Doe in a studio, a file for a flagged caption\n")
    saved = {p: p.read_bytes() for p in (notepad, bad, new)}
    again, stats = review(captioned, workspace, tiny_models)
    assert [r.caption for r in again] == ["Jane Doe in a café, by hand", "Jane Doe in a studio, a file for a "
                                          "flagged caption", "Jane Doe laughing in a park"]
    assert [r.review for r in again] == ["approved", "approved", "pending"]
    assert "not UTF-8" in again[2].review_reasons[-1] and again[2].review_reasons[-1].startswith("caption_file:")
    assert {p: p.read_bytes() for p in saved} == saved  # a person's files, as they saved them

    bad.write_text("Jane Doe laughing in a park, fixed")  # fixed: read on the next run
    again, _ = review(captioned, workspace, tiny_models)
    assert (again[2].caption, again[2].review) == ("Jane Doe laughing in a park, fixed", "approved")


def test_review_csv_from_excel_with_semicolons_and_bom(captioned, workspace, tiny_models, tmp_path):
    reviewed, _ = review(captioned, workspace, tiny_models)
    sheet = write_review_csv(reviewed, tmp_path / "review.csv")
    assert sheet.read_bytes().startswith(b"\xef\xbb\xbf")  # Excel shows accents right only with a BOM
    rows = list(csv.DictReader(sheet.open(encoding="utf-8-sig")))
    assert [r["file"] for r in rows] == ["p1.png"] and "placeholder" in rows[0]["why"]
    rows[0]["caption"] = "Jane Doe in a studio, café"
    rows.append({"file": "p_9.png", "id": "", "action": "drop", "caption": "", "why": ""})
    rows.append({"file": "p0.png", "id": "", "action": "maybe", "caption": "", "why": ""})
    german_excel = tmp_path / "excel.csv"
    with german_excel.open("w", newline="", encoding="utf-8-sig") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=";", lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(rows)
    decision, problems = decision_from_csv(reviewed, german_excel, "ada")
    assert decision.edits == {reviewed[1].id: "Jane Doe in a studio, café"} and decision.drop == ["p_9.png"]
    assert problems == [f"{german_excel}:4: action 'maybe' is not approve, edit or drop (p0.png)"]

    german_excel.write_bytes(german_excel.read_bytes().decode("utf-8-sig").encode("cp1252"))  # "CSV (;)" in 1252
    with pytest.raises(UserError, match=r"excel.csv: not UTF-8 text \(byte 0xe9 .*CSV UTF-8"):
        decision_from_csv(reviewed, german_excel, "ada")
