"""Helpers for tests of deployments on a real Prefect server: trigger as the UI does, wait, read what it shows."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import time
from contextlib import contextmanager

from PIL import Image


@contextmanager
def api(server):
    """A sync client for the test server (the tests' own process talks to it too)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
        yield client


def wait_for_deployment(client, name: str, process: subprocess.Popen | None = None, timeout: float = 120):
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the serving process exited with {process.returncode}")
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            time.sleep(1)
    raise TimeoutError(f"deployment {name} did not appear")


def trigger(client, deployment, parameters: dict | None = None):
    """What the UI's Run button does: POST /deployments/{id}/create_flow_run (parameters merged over defaults)."""
    return client.create_flow_run_from_deployment(deployment.id, parameters=parameters or {}).id


def wait_until(client, run_id, done, timeout: float = 300, what: str = "a final state"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state and done(run.state):
            return run
        time.sleep(1)
    raise TimeoutError(f"flow run {run_id} did not reach {what} in {timeout} s; last state {run.state}")


def wait_final(client, run_id, timeout: float = 300):
    return wait_until(client, run_id, lambda s: s.is_final(), timeout)


def flow_runs_under(client, run_id) -> list:
    """The run and its subflow runs, any depth."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    runs = [client.read_flow_run(run_id)]
    children = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(
        any_=[run_id])))
    for child in children:
        runs += flow_runs_under(client, child.id)
    return runs


def task_runs_under(client, run_id) -> list:
    """Every task run of the run and its subflows (not the subflows' own placeholder tasks)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    ids = [r.id for r in flow_runs_under(client, run_id)]
    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    return [t for t in runs if not (t.state and t.state.state_details.child_flow_run_id)]


def artifacts_of(client, run_id) -> dict:
    """The run's keyed artifacts by key (the newest of each)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import ArtifactSort

    artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
                                      sort=ArtifactSort.CREATED_DESC)
    out: dict = {}
    for a in artifacts:
        out.setdefault(a.key, a)
    return out


def table(artifact) -> list[dict]:
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def embedded_images(markdown: str) -> list[Image.Image]:
    """The images a markdown artifact carries as data URLs, decoded."""
    found = re.findall(r"!\[[^\]]*\]\(data:image/(?:png|jpeg);base64,([A-Za-z0-9+/=]+)\)", markdown)
    return [Image.open(io.BytesIO(base64.b64decode(data))) for data in found]



def waiting_run(client, run_id, after: str | None = None, timeout: float = 300):
    """The run once it waits for a person's answer (a new question: a pause key other than `after`), or ends."""
    def waiting(state):
        return state.is_final() or (state.is_paused() and state.state_details.pause_key != after and
                                    state.state_details.run_input_keyset is not None)
    return wait_until(client, run_id, waiting, timeout=timeout, what="a review form")


def run_logs(client, run_id, until: str, timeout: float = 60) -> str:
    """The run's log lines (they reach the server in batches, after its state: wait for the one expected)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    deadline = time.monotonic() + timeout
    while True:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200,
                                sort=LogSort.TIMESTAMP_DESC)  # the last 200
        text = "\n".join(log.message for log in logs)
        if re.search(until, text) or time.monotonic() > deadline:
            return text
        time.sleep(1)


def newest_logs_first(page) -> None:
    """The V2 run page's log, newest first: where a run's last words are."""
    page.get_by_text("Oldest to newest").click()
    page.get_by_role("option", name="Newest to oldest").click()


def open_resume_form(page, ui_url: str, run_id):
    """The run's page in the V2 UI, ⋮ menu → Resume: the dialog with the review form."""
    page.goto(f"{ui_url}/v2/runs/flow-run/{run_id}")
    page.get_by_role("button", name="Open menu").click()
    page.get_by_role("menuitem", name="Resume").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("captions need a person").wait_for(timeout=30_000)
    return dialog


def type_json(page, dialog, title: str, text: str) -> None:
    """Type into a JSON field of a V2 form (a code editor under the field's label)."""
    editor = dialog.locator(f"xpath=.//label[normalize-space()='{title}']/ancestor::div[fieldset][1]"
                            "//*[@contenteditable='true']")
    editor.click()
    page.keyboard.insert_text(text)


def log_lines(client, run_id) -> dict[str, list[str]]:
    """What each run's Logs tab shows, read through the API: flow name → "logger | message" lines, for the
    run and each of its subflows."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    out: dict[str, list[str]] = {}
    for run in flow_runs_under(client, run_id):
        flow = client.read_flow(run.flow_id).name
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])),
                                sort=LogSort.TIMESTAMP_ASC)
        out[flow] = [f"{log.name} | {log.message}" for log in logs]
    return out
