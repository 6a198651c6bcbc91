"""Start the dataset flow against a real Prefect server with every caption waiting for a person."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from flows.demo import demo_config

RUN_DATASET_FLOW = """
import json, sys
import flows
from flows.pipeline import dataset_flow
from lorapipe.config import PipelineConfig
result = dataset_flow(PipelineConfig.model_validate_json(open(sys.argv[1]).read()))
print(json.dumps(result))
"""


def start_paused_review(server, tiny_models, photos: Path, root: Path, timeout: float = 180):
    """Returns (process, flow_run_id, workspace) once the run is paused waiting for the review form."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    config = demo_config(photos, root / "ws", tiny_models)
    config = config.model_copy(update={"review": config.review.model_copy(update={"approval": "all"})})
    (root / "config.json").write_text(config.model_dump_json())
    (root / "run.py").write_text(RUN_DATASET_FLOW)
    process = subprocess.Popen([sys.executable, str(root / "run.py"), str(root / "config.json")], env=server.env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pause_file = root / "ws" / "review-pause.json"
    deadline = time.monotonic() + timeout
    with temporary_settings({PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the flow ended before pausing:\n{process.stdout.read()[-3000:]}")
            if pause_file.exists():
                run_id = json.loads(pause_file.read_text())["flow_run_id"]
                run = client.read_flow_run(run_id)
                if run.state and run.state.is_paused() and run.state.state_details.run_input_keyset:
                    return process, run_id, root / "ws"
            time.sleep(0.5)
    process.kill()
    raise TimeoutError("no flow run paused for review")
