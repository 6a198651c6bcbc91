"""What the nightly retrain says changed since the last LoRA: photos by name, decisions, settings by path."""

from __future__ import annotations

from lorapipe.config import PipelineConfig
from lorapipe.manifest import ImageRecord, write_manifest
from lorapipe.retrain import record_trained, training_fingerprint, training_inputs, what_changed
from lorapipe.review_decisions import Decision, DecisionStore, now_iso


def records(*names: str, archive: str = "") -> list[ImageRecord]:
    return [ImageRecord(id=f"id-{name}", source=f"{archive}/photos/{name}", fetched_at="2026-11-29T00:00:00Z",
                        caption=f"Jane Doe, {name}") for name in names]


def test_what_changed_names_photos_decisions_and_settings(workspace, tmp_path):
    config = PipelineConfig(name="Jane Doe", images=str(tmp_path / "photos"))
    before = write_manifest(tmp_path / "before.jsonl", records("a.jpg", "b.jpg", "c.jpg"))
    record_trained(workspace, training_fingerprint(workspace, before, config), {"lora": "x"},
                   training_inputs(workspace, before, config))
    last = {"inputs": training_inputs(workspace, before, config)}

    now_records = records("a.jpg", "c.jpg", *[f"new{i:02}.jpg" for i in range(12)])
    DecisionStore(workspace.cache).record("id-a.jpg", Decision(action="drop", who="ana", when=now_iso(),
                                                               before="Jane Doe, a.jpg"))
    (workspace.root / "images").mkdir(exist_ok=True)
    (workspace.root / "images" / "c.txt").write_text("Jane Doe in a red coat, by hand", encoding="utf-8")
    changed = config.model_copy(update={"train": config.train.model_copy(update={"epochs": 4, "vae": "org/vae"})})
    now = training_inputs(workspace, write_manifest(tmp_path / "now.jsonl", now_records), changed)
    assert what_changed(last, now, now_records) == [
        "photos added: 12 (new00.jpg, new01.jpg, new02.jpg, new03.jpg, new04.jpg, new05.jpg, new06.jpg, "
        "new07.jpg, new08.jpg, new09.jpg and 2 more)",
        "photos removed: 1 (b.jpg)",
        "review decisions: 1 new or changed, 0 withdrawn (a.jpg: drop)",
        "caption files edited by hand: 1 (c.txt)",
        'settings: train.epochs 12 → 4; train.vae (not set) → "org/vae"',
    ]
    assert what_changed(last, last["inputs"]) == ["review decisions recorded again (same actions and captions)"]
    # A record from before lorapipe kept the inputs says so instead of guessing.
    assert what_changed({"fingerprint": "abc"}, now)[0].startswith("photos, review decisions or settings")


def test_a_photo_inside_an_archive_is_named_by_its_own_file_name(workspace, tmp_path):
    config = PipelineConfig(name="Jane Doe", images=str(tmp_path / "photos.zip"))
    empty = training_inputs(workspace, write_manifest(tmp_path / "empty.jsonl", []), config)
    inside = records("d.jpg", archive=f"{tmp_path}/photos.zip!")
    now = training_inputs(workspace, write_manifest(tmp_path / "zip.jsonl", inside), config)
    assert what_changed({"inputs": empty}, now) == ["photos added: 1 (d.jpg)"]
