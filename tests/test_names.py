"""Names people recognise: a person's name in any script becomes its own folder, files and artifact keys."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter

from lorapipe.config import PipelineConfig
from lorapipe.workspace import slugify

NAMES = {
    "Jane Doe": "jane-doe",
    "Zoë Laurent": "zoe-laurent",
    "王小明": "wang-xiao-ming",
    "Ольга Петрова": "olga-petrova",
    "김민지": "gim-min-ji",
    "Σωκράτης Παππάς": "sokratis-pappas",
    "José Núñez": "jose-nunez",
    "Søren Kierkegaard": "soren-kierkegaard",
    "さくら": "sakura",
    "Anne-Marie O'Neil": "anne-marie-oneil",
}


@pytest.mark.parametrize("name, slug", NAMES.items())
def test_names_in_any_script_are_transliterated(name, slug):
    assert slugify(name) == slug
    assert PipelineConfig(name=name, images="photos").workspace_path().name == slug


def test_no_two_names_share_a_workspace_or_an_artifact_key():
    from prefect.types.names import ArtifactKey

    names = [*NAMES, "王小红", "Ольга Иванова", "!!!", "???", "🙂"]
    slugs = [slugify(n) for n in names]
    assert len(set(slugs)) == len(names)  # never a shared constant such as "dataset"
    for slug in slugs:
        TypeAdapter(ArtifactKey).validate_python(f"{slug}-summary")  # Prefect's rule for artifact keys


def _latin1_sources(tmp_path):
    """A folder with a Latin-1 file name beside a UTF-8 one, and a tar whose member name is Latin-1."""
    import io
    import os
    import tarfile

    from helpers import jpeg_bytes, photo

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "IMG_0042.jpg").write_bytes(jpeg_bytes(photo(900, 800, seed=1)))
    (photos / "王小明 2019.jpg").write_bytes(jpeg_bytes(photo(900, 800, seed=2)))
    with open(os.fsencode(photos) + b"/caf\xe9.jpg", "wb") as f:  # an old Windows copy's name
        f.write(jpeg_bytes(photo(900, 800, seed=3)))
    with tarfile.open(tmp_path / "old.tar", "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for name, seed in (("Zo\xeb.jpg", 4), ("fine.jpg", 5)):
            data = jpeg_bytes(photo(900, 800, seed=seed))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return photos, tmp_path / "old.tar"


def test_file_names_that_are_not_utf8_are_collected_and_training_images_keep_their_names(tmp_path, prefect_harness):
    import json

    from typer.testing import CliRunner

    from flows.cli import app
    from lorapipe.manifest import read_manifest

    runner = CliRunner()
    photos, tar = _latin1_sources(tmp_path)
    ws = tmp_path / "ws"
    job = tmp_path / "job.yaml"
    job.write_text("name: Jane Doe\nimages: []\ndataset: {crop: {resolution: 256, bucket_step: 32, face_aware: false}}\n")
    result = runner.invoke(app, ["collect", str(ws), "--images", str(photos), "--images", str(tar), "--config", str(job)])
    assert result.exit_code == 0, result.output
    records = read_manifest(ws / "manifests" / "collect.jsonl")
    names = sorted(r.source.rsplit("/", 1)[-1] for r in records)
    assert names == ["IMG_0042.jpg", "Zo\\xeb.jpg", "caf\\xe9.jpg", "fine.jpg", "王小明 2019.jpg"]
    assert all(r.kept for r in records)  # every photo is there, the odd names escaped
    for stage in ("validate", "dedup", "crop"):
        result = runner.invoke(app, [stage, str(ws)])
        assert result.exit_code == 0, result.output
    images = sorted(p.name for p in (ws / "images").glob("*.png"))
    by_id = {r.id[:8]: r for r in read_manifest(ws / "manifests" / "crop.jsonl")}
    assert len(images) == 5 and all(name.rsplit("-", 1)[-1][:8] in by_id for name in images)
    assert [n.rsplit("-", 1)[0] for n in images] == ["IMG_0042", "Zo-xeb", "caf-xe9", "fine", "王小明-2019"]
    assert json.loads((ws / "config.json").read_text())["name"] == "Jane Doe"


def test_a_caption_edited_in_an_image_named_by_sha256_moves_with_the_image(tmp_path):
    from lorapipe.config import CollectConfig, CropConfig, ValidateConfig
    from lorapipe.workspace import Workspace
    from tasks.collect import collect_folder
    from tasks.crop import crop_records
    from tasks.validate import validate_records

    ws = Workspace.at(tmp_path / "ws")
    photos, _ = _latin1_sources(tmp_path)
    records, _ = validate_records(collect_folder(photos, ws, CollectConfig())[0], ws, ValidateConfig())
    first = records[0]
    (ws.images / f"{first.id}.png").write_bytes(b"an old crop")  # how images/ was laid out before
    (ws.images / f"{first.id}.txt").write_text("Jane Doe in a red coat, edited by hand")
    cropped, _ = crop_records(records, ws, CropConfig(resolution=256, bucket_step=32, face_aware=False))
    image = ws.path(cropped[0].image_path)
    assert image.name.startswith("IMG_0042-") and image.with_suffix(".txt").read_text().endswith("by hand")
    assert not list(ws.images.glob(f"{first.id}*"))
