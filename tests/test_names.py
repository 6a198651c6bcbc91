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
