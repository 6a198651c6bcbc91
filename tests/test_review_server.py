"""The caption review against a real Prefect server: the run pauses with a form; a second process resumes
it with edits (as the UI does); the edits reach the manifest and the .txt sidecars.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorapipe.manifest import read_manifest
from paused_review import start_paused_review

pytestmark = pytest.mark.slow


def test_review_pauses_and_a_second_process_resumes_it_with_edits(prefect_server, tiny_models, demo_photos,
                                                                  tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    process, run_id, ws = start_paused_review(prefect_server, tiny_models, demo_photos[0], tmp_path)
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server.api_url}):
            with get_client(sync_client=True) as client:
                keyset = client.read_flow_run(run_id).state.state_details.run_input_keyset
                description = client.read_flow_run_input(run_id, keyset["description"])
                schema = json.loads(client.read_flow_run_input(run_id, keyset["schema"]))
            assert "10 captions need a person" in description and "portrait_00.jpg" in description
            assert set(schema["properties"]) == {"approve_all", "approve", "edits", "drop", "reviewer"}
            assert schema["properties"]["edits"]["description"].startswith("File name")

            resume_flow_run(run_id, run_input={
                "approve_all": True, "reviewer": "reviewer@test",
                "edits": {"portrait_02.jpg": "Jane Doe in a blue shirt, edited in the UI"},
                "drop": ["portrait_03.png"],
            })
        output, _ = process.communicate(timeout=240)
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]

    records = {Path(r.source).name: r for r in read_manifest(ws / "manifests" / "review.jsonl")}
    edited = records["portrait_02.jpg"]
    assert edited.caption == "Jane Doe in a blue shirt, edited in the UI" and edited.review == "approved"
    assert edited.caption_edits[-1].who == "reviewer@test"
    assert (ws / edited.image_path).with_suffix(".txt").read_text() == edited.caption
    assert records["portrait_03.png"].reason == "dropped_by_reviewer: reviewer@test"
    assert sum(r.review == "approved" for r in records.values()) == 9
    assert not (ws / "review-pause.json").exists()
