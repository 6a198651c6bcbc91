"""The caption review against a real Prefect server: the run pauses with a form; a second process resumes
it with edits (as the UI does); the edits reach the manifest and the .txt sidecars.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.demo import demo_config
from lorapipe.manifest import read_manifest

pytestmark = pytest.mark.slow

RUN_DATASET_FLOW = """
import json, sys
import flows
from flows.pipeline import dataset_flow
from lorapipe.config import PipelineConfig
result = dataset_flow(PipelineConfig.model_validate_json(open(sys.argv[1]).read()))
print(json.dumps(result))
"""


def paused_run(server, timeout=180):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
            if runs:
                return runs[0]
            time.sleep(1)
    raise TimeoutError("no flow run paused for review")


def test_review_pauses_and_a_second_process_resumes_it_with_edits(prefect_server, tiny_models, demo_photos,
                                                                  tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    photos, _ = demo_photos
    config = demo_config(photos, tmp_path / "ws", tiny_models)
    config = config.model_copy(update={"review": config.review.model_copy(update={"approval": "all"})})
    (tmp_path / "config.json").write_text(config.model_dump_json())
    (tmp_path / "run.py").write_text(RUN_DATASET_FLOW)
    flow = subprocess.Popen([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "config.json")],
                            env=prefect_server.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server.api_url}):
            run = paused_run(prefect_server)
            keyset = run.state.state_details.run_input_keyset
            with get_client(sync_client=True) as client:
                description = client.read_flow_run_input(run.id, keyset["description"])
                schema = json.loads(client.read_flow_run_input(run.id, keyset["schema"]))
            assert "10 captions need a person" in description and "portrait_00.jpg" in description
            assert set(schema["properties"]) == {"approve_all", "approve", "edits", "drop", "reviewer"}
            assert schema["properties"]["edits"]["description"].startswith("File name")

            resume_flow_run(run.id, run_input={
                "approve_all": True, "reviewer": "reviewer@test",
                "edits": {"portrait_02.jpg": "Jane Doe in a blue shirt, edited in the UI"},
                "drop": ["portrait_03.png"],
            })
        output, _ = flow.communicate(timeout=240)
    finally:
        flow.kill()
    assert flow.returncode == 0, output[-3000:]

    records = {Path(r.source).name: r for r in read_manifest(tmp_path / "ws" / "manifests" / "review.jsonl")}
    edited = records["portrait_02.jpg"]
    assert edited.caption == "Jane Doe in a blue shirt, edited in the UI" and edited.review == "approved"
    assert edited.caption_edits[-1].who == "reviewer@test"
    sidecar = (tmp_path / "ws" / edited.image_path).with_suffix(".txt")
    assert sidecar.read_text() == edited.caption
    assert records["portrait_03.png"].reason == "dropped_by_reviewer: reviewer@test"
    assert sum(r.review == "approved" for r in records.values()) == 9
