"""Caption review in the Prefect UI that `prefect server start` serves by default (V2), on runs of the deployments
`lorapipe serve` makes: the run's log says what to do, the Resume form shows the photos with a field per caption,
a typo in an answer is sent back (the run waits again, never fails), and `review.on_timeout` is honoured for
suspended and paused runs.

Each test works in its own workspace (the flows' `workspace` parameter), on one served process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from browser import browser_page
from flows.demo import demo_config, write_job_file
from lorapipe.demo_data import extra_photo
from lorapipe.manifest import read_manifest
from served import api, trigger, wait_final, wait_for_deployment, wait_until

pytestmark = pytest.mark.slow
DOCS = Path(__file__).parent.parent / "docs"
UPDATE_SCREENSHOTS = bool(os.environ.get("LORAPIPE_UPDATE_SCREENSHOTS"))
WORKSPACE = "ws"  # shared by the tests, in order: later ones add photos, so only those wait
TIMEOUT_HOURS = 0.004  # 14.4 s (Prefect's proactive triggers wait at least 10 s)


@pytest.fixture(scope="module")
def served(prefect_server, tiny_models, demo_photos_master, tmp_path_factory):
    """`lorapipe serve --config job.yaml` for the demo (the flows' form defaults)."""
    root = tmp_path_factory.mktemp("review-served")
    shutil.copytree(demo_photos_master[0], root / "photos")
    config = demo_config(root / "photos", root / "workspace", tiny_models)
    job = write_job_file(config, root / "job.yaml")
    log = open(root / "serve.log", "w")
    lorapipe = Path(sys.executable).with_name("lorapipe")
    process = subprocess.Popen([str(lorapipe), "serve", "--config", str(job), "--no-nightly"],
                               env=prefect_server.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with api(prefect_server) as client:
            dataset = wait_for_deployment(client, "dataset/lorapipe", process)
        yield type("Served", (), {"config": config, "dataset": dataset, "root": root, "server": prefect_server,
                                  "log": root / "serve.log"})
    finally:
        process.terminate()
        process.wait(timeout=30)


def parameters(served, workspace: str, **review) -> dict:
    config = served.config.model_dump(mode="json", by_alias=True)
    config["workspace"] = str(served.root / workspace)
    config["review"] = {**config["review"], **review}
    return {"config": config}


def waiting_run(client, served, run_id, after=None, timeout: float = 300):
    """The run once it waits for a person (a new question: a pause key other than `after`'s)."""
    def waiting(state):
        return state.is_final() or (state.is_paused() and state.state_details.pause_key != after and
                                    state.state_details.run_input_keyset is not None)
    run = wait_until(client, run_id, waiting, timeout=timeout, what="a review form")
    assert run.state.is_paused(), (run.state, served.log.read_text()[-3000:])
    return run


def open_resume_form(page, served, run_id):
    """The run's page in the V2 UI, ⋮ menu → Resume: the dialog."""
    page.goto(f"{served.server.url}/v2/runs/flow-run/{run_id}")
    page.get_by_role("button", name="Open menu").click()
    page.get_by_role("menuitem", name="Resume").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("captions need a person").wait_for(timeout=30_000)
    return dialog


def captions(ws: Path) -> dict[str, str]:
    """The captioner's captions by file name."""
    return {Path(r.source).name: r.caption for r in read_manifest(ws / "manifests" / "caption.jsonl") if r.kept}


def json_field(page, dialog, title: str, text: str) -> None:
    """Type into a JSON field of the V2 form (a code editor under the field's label)."""
    editor = dialog.locator(f"xpath=.//label[normalize-space()='{title}']/ancestor::div[fieldset][1]"
                            "//*[@contenteditable='true']")
    editor.click()
    page.keyboard.insert_text(text)


def test_review_in_the_v2_ui_photos_fields_and_a_typo_sent_back(served):
    with api(served.server) as client:
        run_id = trigger(client, served.dataset, parameters(served, WORKSPACE, approval="all"))
        run = waiting_run(client, served, run_id)
        assert run.state.name == "Suspended"  # a deployment's run: no process held while it waits
        first_key = run.state.state_details.pause_key

        with browser_page() as page:
            # The run's log says what to do, in the UI Prefect serves by default.
            page.goto(f"{served.server.url}/v2/runs/flow-run/{run_id}")
            page.get_by_text("Oldest to newest").click()
            page.get_by_role("option", name="Newest to oldest").click()  # the run's last words first
            page.get_by_text("captions wait for a person", exact=False).first.wait_for(timeout=60_000)
            log_text = page.inner_text("body")
            assert f"Runs → {run.name}, then the ⋮ menu (top right) → Resume" in log_text
            assert "lorapipe review" in log_text
            page.screenshot(path=served.root / "review-log.png")

            dialog = open_resume_form(page, served, run_id)
            photos = dialog.locator("img")
            photos.nth(9).wait_for(timeout=30_000)
            assert photos.count() == 10 and all(photos.nth(i).evaluate("i => i.complete && i.naturalWidth > 0")
                                                 for i in range(10))
            assert "1. portrait_00.jpg" in dialog.inner_text()
            page.screenshot(path=served.root / "review-form.png")

            dialog.get_by_label("Approve All (Optional)").click()
            json_field(page, dialog, "Edits (Optional)",
                       '{"portrait_2.jpg": "Jane Doe in a blue shirt, typed under a wrong name"}')
            dialog.get_by_role("button", name="Resume").click()

            # The answer is applied where it can be; the typo comes back on a new form, the run never fails.
            run = waiting_run(client, served, run_id, after=first_key)
            dialog = open_resume_form(page, served, run_id)
            text = dialog.inner_text()
            assert "no kept image named 'portrait_2.jpg' — did you mean portrait_02.jpg?" in text
            assert "Jane Doe in a blue shirt, typed under a wrong name" in text  # their words, quoted back
            assert "1 captions need a person" in text and dialog.locator("img").count() == 1
            page.screenshot(path=served.root / "review-sent-back.png")

            caption = dialog.get_by_label("1. portrait_02.jpg (Optional)")
            assert caption.input_value() == captions(served.root / WORKSPACE)["portrait_02.jpg"]  # prefilled
            caption.fill("Jane Doe in a blue shirt, edited in its own field")  # no file name to type
            dialog.get_by_label("Reviewer (Optional)").fill("ui-reviewer")
            dialog.get_by_role("button", name="Resume").click()
            run = wait_final(client, run_id)
        assert run.state.is_completed(), (run.state, served.log.read_text()[-3000:])

    records = {Path(r.source).name: r for r in read_manifest(served.root / WORKSPACE / "manifests" / "review.jsonl")
               if r.kept}
    assert all(r.review == "approved" for r in records.values())
    edited = records["portrait_02.jpg"]
    assert (edited.caption, edited.reviewed_by) == ("Jane Doe in a blue shirt, edited in its own field", "ui-reviewer")
    assert records["portrait_00.jpg"].caption_edits == []
    if UPDATE_SCREENSHOTS:
        for name in ("review-form.png", "review-log.png"):
            shutil.copy(served.root / name, DOCS / name)


def reviewed(served) -> dict:
    return {Path(r.source).name: r for r in read_manifest(served.root / WORKSPACE / "manifests" / "review.jsonl")
            if r.kept}


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


def test_a_paused_review_answered_from_a_terminal_then_timed_out_continues(served):
    """A run that pauses (in its process): `lorapipe review --resume` answers part of it; nobody answers the rest
    in time, and the run carries on with what is approved."""
    first, second = (extra_photo(served.root / "photos", index=i).name for i in (60, 61))
    lorapipe = Path(sys.executable).with_name("lorapipe")
    with api(served.server) as client:
        run_id = trigger(client, served.dataset, parameters(
            served, WORKSPACE, approval="all", wait="pause", timeout_hours=0.01, on_timeout="continue"))
        run = waiting_run(client, served, run_id)
        assert run.state.name == "Paused"
        answered = subprocess.run([str(lorapipe), "review", str(served.root / WORKSPACE), "--approve", first,
                                   "--resume", "--reviewer", "terminal"], env=served.server.env,
                                  capture_output=True, text=True, timeout=120)
        assert answered.returncode == 0, answered.stderr[-3000:]
        assert json.loads(answered.stdout)["resumed_flow_run"] == str(run_id)
        run = wait_final(client, run_id)
        assert run.state.is_completed(), (run.state, served.log.read_text()[-3000:])
        logs = run_logs(client, run_id, until=r"nobody reviewed")
    assert re.search(r"nobody reviewed \d+ captions within 0.01 hours \(review.timeout_hours\): carrying on with "
                     r"the \d+ approved captions only", logs), served.log.read_text()[-5000:]
    records = reviewed(served)
    assert (records[first].review, records[first].reviewed_by) == ("approved", "terminal")
    assert records[second].review == "pending"


@pytest.mark.parametrize("on_timeout", ["continue", "fail"])
def test_a_suspended_review_nobody_answers_honours_on_timeout(served, on_timeout):
    """The run is suspended (no process): a Prefect automation resumes it at the deadline, then
    `review.on_timeout` decides, instead of the server failing it with "paused and never resumed"."""
    photo = extra_photo(served.root / "photos", index=70 if on_timeout == "continue" else 71).name
    with api(served.server) as client:
        run_id = trigger(client, served.dataset, parameters(
            served, WORKSPACE, approval="all", timeout_hours=TIMEOUT_HOURS, on_timeout=on_timeout))
        run = waiting_run(client, served, run_id)
        assert run.state.name == "Suspended"
        run = wait_final(client, run_id, timeout=300)
        logs = run_logs(client, run_id, until=r"nobody reviewed")
        assert not client.read_automations_by_name(f"lorapipe: review timeout of flow run {run_id}")
    waited = sum(r.review == "pending" for r in reviewed(served).values())
    message = f"nobody reviewed {waited} captions within {TIMEOUT_HOURS} hours (review.timeout_hours)"
    assert reviewed(served)[photo].review == "pending"
    if on_timeout == "continue":
        assert run.state.is_completed(), (run.state, served.log.read_text()[-3000:])
        assert f"{message}: carrying on with the" in logs
    else:
        assert run.state.is_failed() and run.state.message.startswith(message) and "\n" not in run.state.message
        # A reviewer's absence is no crash: no exception in the flow (the log's only traceback is the one Prefect's
        # engine prints for every Failed run of a deployment).
        assert "Encountered exception during execution" not in logs
        with browser_page() as page:  # what a person sees on the run's page: its last log lines
            page.goto(f"{served.server.url}/v2/runs/flow-run/{run_id}")
            page.get_by_text("Oldest to newest").click()
            page.get_by_role("option", name="Newest to oldest").click()
            page.get_by_text(f"Finished in state Failed('{message}", exact=False).first.wait_for(timeout=60_000)
