"""Caption review from a terminal, as people do it: `lorapipe review` with flags, a CSV from a spreadsheet, the
caption files edited in a text editor, then `lorapipe train`: what they changed is what the LoRA learns."""

from __future__ import annotations

import csv
import json
import re
import shutil
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from flows.cli import app, main
from lorapipe.manifest import read_manifest

runner = CliRunner()


@pytest.fixture(scope="module")
def captioned_master(tmp_path_factory, tiny_models, demo_photos_master, prefect_harness):
    """A workspace taken through collect → caption by the stage commands, every caption waiting for a person."""
    root = tmp_path_factory.mktemp("review-cli")
    ws = root / "ws"
    job = root / "job.yaml"
    job.write_text(
        f"name: Jane Doe\nimages: {demo_photos_master[0]}\n"
        "dataset:\n  crop:\n    resolution: 256\n    bucket_step: 32\n"
        f"caption:\n  model: {tiny_models.llava}\n  device: cpu\nreview:\n  approval: all\n"
        f"train:\n  base_model: {tiny_models.sdxl}\n  epochs: 1\n  effective_batch_size: 4\n  sample_steps: 2\n"
        "  device: cpu\nevaluate:\n  steps: 2\n  prompts: ['a photo of {name}']\n")
    for argv in (["collect", str(ws), "--config", str(job)], ["validate", str(ws)], ["dedup", str(ws)],
                 ["crop", str(ws)], ["caption", str(ws)]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, (argv, result.output)
    return ws


@pytest.fixture
def ws(captioned_master, tmp_path) -> Path:
    """A private copy of the captioned workspace."""
    ws = tmp_path / "ws"
    shutil.copytree(captioned_master, ws)
    config = json.loads((ws / "config.json").read_text())
    (ws / "config.json").write_text(json.dumps({**config, "workspace": str(ws)}))
    return ws


def without_logging_noise(text: str) -> str:
    # Prefect's console log handler, left over from earlier flows, writing to CliRunner's closed streams.
    return re.sub(r"--- Logging error ---\n.*?(\nArguments: [^\n]*(\n|$)|\Z)", "", text, flags=re.S)


def lorapipe(*argv, code: int = 0) -> dict:
    """The `lorapipe` command's entry point (its error handling included), in this process."""
    with runner.isolation() as (out, err, _), mock.patch.object(sys, "argv", ["lorapipe", *map(str, argv)]):
        try:
            main()
            exit_code = 0
        except SystemExit as exc:
            exit_code = exc.code or 0
        stdout, stderr = out.getvalue().decode(), without_logging_noise(err.getvalue().decode())
    assert exit_code == code, (stdout, stderr)
    assert "Traceback" not in stderr, stderr
    return {**(json.loads(stdout) if stdout.strip().startswith("{") else {}), "stderr": stderr}


def records_by_file(ws: Path) -> dict:
    return {Path(r.source).name: r for r in read_manifest(ws / "manifests" / "review.jsonl") if r.kept}


def caption_file(ws: Path, record) -> Path:
    return (ws / record.image_path).with_suffix(".txt")


def test_caption_files_edited_by_hand_are_recorded_and_never_rewritten(ws):
    listed = lorapipe("review", ws)
    assert listed["waiting"] == 10 and not list((ws / "images").glob("*.txt"))
    records = records_by_file(ws)
    # A file made for a caption that waits (the kohya way) is an edit, and approves it.
    new = caption_file(ws, records["portrait_05.jpg"])
    new.write_text("Jane Doe reading by a window, written by hand")
    assert lorapipe("review", ws, "--reviewer", "ada")["decisions_recorded"] == 1
    assert lorapipe("review", ws, "--approve-all", "--reviewer", "ada")["waiting"] == 0

    notepad, plain = caption_file(ws, records["portrait_00.jpg"]), caption_file(ws, records["portrait_01.jpg"])
    notepad.write_bytes("\ufeffJane Doe in a café, by hand\r\n".encode())  # Notepad: UTF-8 with BOM, CRLF
    plain.write_text("Jane Doe on a bench, edited\n")
    saved = {p: p.read_bytes() for p in (notepad, plain, new)}
    summary = lorapipe("review", ws, "--reviewer", "bob")
    assert summary["decisions_recorded"] == 2 and summary["waiting"] == 0
    assert {p: p.read_bytes() for p in saved} == saved  # as the person saved them: nothing rewritten
    records = records_by_file(ws)
    assert records["portrait_00.jpg"].caption == "Jane Doe in a café, by hand"
    assert records["portrait_01.jpg"].caption == "Jane Doe on a bench, edited"
    assert records["portrait_05.jpg"].caption == "Jane Doe reading by a window, written by hand"
    assert [(e.who, e.after) for e in records["portrait_00.jpg"].caption_edits] == [
        ("bob", "Jane Doe in a café, by hand")]
    assert lorapipe("review", ws)["decisions_recorded"] == 0  # read once


def test_an_edit_of_an_edit_is_kept_through_every_terminal_door(ws):
    lorapipe("review", ws, "--approve-all")
    target = caption_file(ws, records_by_file(ws)["portrait_02.jpg"])
    texts = ["Jane Doe in a blue shirt, first", "Jane Doe in a blue shirt, second", "Jane Doe in blue, third",
             "Jane Doe in blue, fourth", "Jane Doe in blue, fifth"]
    sheet = ws / "mine.csv"
    for who, text in zip("ab", texts[:2]):  # a CSV, twice
        sheet.write_text(f'file,action,caption\nportrait_02.jpg,edit,"{text}"\n')
        lorapipe("review", ws, "--csv", sheet, "--reviewer", who)
        assert (records_by_file(ws)["portrait_02.jpg"].caption, target.read_text()) == (text, text)
    for who, text in zip("cd", texts[2:4]):  # the caption file, twice
        target.write_text(text)
        lorapipe("review", ws, "--reviewer", who)
        assert (records_by_file(ws)["portrait_02.jpg"].caption, target.read_text()) == (text, text)
    lorapipe("review", ws, "--edit", f"portrait_02.jpg={texts[4]}", "--reviewer", "e")  # a flag
    edited = records_by_file(ws)["portrait_02.jpg"]
    assert (edited.caption, target.read_text()) == (texts[4], texts[4])
    assert [(e.who, e.after) for e in edited.caption_edits] == list(zip("abcde", texts))


def training_captions(lora: str | Path) -> dict:
    with safe_open(str(lora), "pt") as f:  # what kohya's tools show as the training captions
        return json.loads(f.metadata()["ss_tag_frequency"])["images"]


def test_training_uses_the_caption_files_as_edited(ws):
    from lorapipe.config import PipelineConfig
    from lorapipe.retrain import training_fingerprint
    from lorapipe.workspace import Workspace

    lorapipe("review", ws, "--approve-all")
    edited = caption_file(ws, records_by_file(ws)["portrait_04.jpg"])
    edited.write_text("Jane Doe under an orange umbrella")  # then straight to training, no `lorapipe review`
    trained = lorapipe("train", ws, "--json")
    assert "jane doe under an orange umbrella" in training_captions(trained["lora"])
    assert records_by_file(ws)["portrait_04.jpg"].caption == "Jane Doe under an orange umbrella"
    assert lorapipe("train", ws, "--json")["cached"]  # nothing changed since: cached

    # `lorapipe run` (and the nightly, whose "anything new?" fingerprint counts the file) see an edit too.
    config = PipelineConfig.model_validate(json.loads((ws / "config.json").read_text()))
    fingerprint = lambda: training_fingerprint(Workspace.at(ws), ws / "manifests" / "collect.jsonl", config)  # noqa
    before = fingerprint()
    caption_file(ws, records_by_file(ws)["portrait_06.jpg"]).write_bytes(b"\xef\xbb\xbfJane Doe on a red bike\r\n")
    assert fingerprint() != before
    lorapipe("run", "--config", ws / "config.json")
    lora = ws / "loras" / "jane-doe.safetensors"
    assert "jane doe on a red bike" in training_captions(lora)
    assert "jane doe under an orange umbrella" in training_captions(lora)


def test_text_from_windows_tools_is_read_or_refused_in_one_line(ws):
    listed = lorapipe("review", ws)
    sheet = ws / "review.csv"
    rows = list(csv.DictReader(sheet.open(encoding="utf-8-sig")))
    rows[0]["caption"] = "Jane Doe au café, édité"
    rows[1]["action"] = "drop"
    for row in rows[2:]:
        row["action"] = "approve"

    def save(path: Path, encoding: str, delimiter: str) -> Path:
        with path.open("w", newline="", encoding=encoding) as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter, lineterminator="\r\n")
            writer.writeheader()
            writer.writerows(rows)
        return path

    western = save(ws / "excel-1252.csv", "cp1252", ";")  # Excel's "CSV (semicolon)" in Windows-1252
    refused = lorapipe("review", ws, "--csv", western, code=2)
    assert f"lorapipe: {western}: not UTF-8 text (byte 0xe9" in refused["stderr"]
    assert "CSV UTF-8" in refused["stderr"] and refused["stderr"].count("lorapipe:") == 1

    excel_utf8 = save(ws / "excel-utf8.csv", "utf-8-sig", ";")  # Excel's "CSV UTF-8" in a German locale
    applied = lorapipe("review", ws, "--csv", excel_utf8)
    assert (applied["waiting"], applied["stats"]["rejected_by_reviewer"]) == (0, 1)
    assert records_by_file(ws)[rows[0]["file"]].caption == "Jane Doe au café, édité"

    job = ws / "job.yaml"
    job.write_bytes("review:\r\n  approval: all\r\nname: Zoë Doe\r\n".encode("cp1252"))
    refused = lorapipe("review", ws, "--config", job, code=2)
    assert f"lorapipe: {job}: not UTF-8 text" in refused["stderr"]
    job.write_bytes("\ufeffreview:\r\n  approval: all\r\n".encode())
    assert lorapipe("review", ws, "--config", job)["waiting"] == 0

    bad = caption_file(ws, records_by_file(ws)[rows[2]["file"]])
    bad.write_bytes("Jane Doe, crème brûlée".encode("cp1252"))
    told = lorapipe("review", ws, code=2)
    assert f"not applied: caption_file: images/{bad.name}: not UTF-8 text" in told["stderr"]
    assert bad.read_bytes() == "Jane Doe, crème brûlée".encode("cp1252")
    assert listed["waiting"] == 10


def test_review_waits_while_a_run_holds_the_review_stage(ws, caplog):
    """`lorapipe review` writes what the review stage writes: it takes that stage's workspace lock, so a run's
    review stage and the command never write the manifest, caption files and decision logs at once."""
    import threading

    from lorapipe.workspace import Workspace

    out: dict = {}
    command = threading.Thread(target=lambda: out.update(lorapipe("review", ws, "--approve-all")))
    with caplog.at_level("WARNING", logger="lorapipe"), Workspace.at(ws).lock("review"):  # a run's review stage
        command.start()
        deadline = time.monotonic() + 120
        while "waiting for the review stage of" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "waiting for the review stage of" in caplog.text
        assert command.is_alive() and not (ws / "manifests" / "review.jsonl").exists()
    command.join(timeout=120)
    assert out["waiting"] == 0 and out["decisions_recorded"] == 10
