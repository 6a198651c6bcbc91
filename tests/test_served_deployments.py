"""`lorapipe serve` against a real `prefect server start`: runs triggered as the UI triggers them, the run
form in a real browser, artifacts, idempotent reruns, the nightly schedule, "nothing new", and a nightly run
that suspends for a caption review, notifies, and finishes once a person answers.

The tests share one served demo (a module fixture) and run in the order written: the first run trains,
later ones rely on what it left (as a user's second run would).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from browser import browser_page
from flows.demo import demo_config, write_job_file
from lorapipe.demo_data import extra_photo
from lorapipe.manifest import read_manifest
from served import (api, artifacts_of, embedded_images, table, task_runs_under, trigger, wait_final,
                    wait_for_deployment, wait_until)

pytestmark = pytest.mark.slow
DOCS = Path(__file__).parent.parent / "docs"
FLOWS = ("pipeline", "dataset", "train", "nightly", "rank-comparison")
TIMEZONE = "Europe/Berlin"


class Webhook:
    """A local HTTP endpoint standing in for Slack & co: records what the notification block posts."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def served(prefect_server, tiny_models, demo_photos_master, tmp_path_factory):
    """`lorapipe serve --config job.yaml` for the demo, with a webhook told when a review waits."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    root = tmp_path_factory.mktemp("served")
    shutil.copytree(demo_photos_master[0], root / "photos")
    config = demo_config(root / "photos", root / "workspace", tiny_models)
    job = write_job_file(config, root / "job.yaml")
    hook = Webhook()
    with api(prefect_server):
        CustomWebhookNotificationBlock(name="review", url=hook.url,
                                       json_data={"subject": "{{subject}}", "body": "{{body}}"}).save(
            "lorapipe-review", overwrite=True)
    lorapipe = Path(sys.executable).with_name("lorapipe")
    log = open(root / "serve.log", "w")
    process = subprocess.Popen(
        [str(lorapipe), "serve", "--config", str(job), "--timezone", TIMEZONE, "--notify",
         "custom-webhook/lorapipe-review"], env=prefect_server.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with api(prefect_server) as client:
            deployments = {f: wait_for_deployment(client, f"{f}/lorapipe", process) for f in FLOWS}
        yield type("Served", (), {"config": config, "deployments": deployments, "hook": hook, "root": root,
                                  "server": prefect_server, "log": root / "serve.log"})
    finally:
        process.terminate()
        process.wait(timeout=30)
        hook.server.shutdown()


@pytest.fixture(scope="module")
def first_run(served):
    """The pipeline deployment triggered with the form's defaults (the demo job), run to the end."""
    with api(served.server) as client:
        run_id = trigger(client, served.deployments["pipeline"])
        run = wait_final(client, run_id, timeout=400)
    assert run.state.is_completed(), (run.state, served.log.read_text()[-3000:])
    return run_id


def test_triggered_pipeline_completes_with_tables_images_and_progress(served, first_run):
    with api(served.server) as client:
        artifacts = artifacts_of(client, first_run)

    dataset = {row["file"]: row for row in table(artifacts["jane-doe-dataset"])}
    assert len(dataset) == 14 and sum(r["status"] == "kept" for r in dataset.values()) == 10
    assert dataset["broken_download.jpg"]["reason"].startswith("corrupt:")
    assert dataset["thumbnail.jpg"]["reason"] == "too_small: 400x300 < 768 px"
    assert dataset["portrait_00_resized.jpg"]["duplicate_of"] == "portrait_00.jpg"
    assert all(r["bucket"] for r in dataset.values() if r["status"] == "kept")

    captions = table(artifacts["jane-doe-captions"])
    assert len(captions) == 10 and all("Jane Doe" in c["caption"] and c["review"] == "approved" for c in captions)

    summary = artifacts["jane-doe-summary"].data
    latest = Path(served.config.workspace) / "loras" / "jane-doe.safetensors"
    assert f"`{latest}`" in summary and latest.exists()
    steps = int(re.search(r"\| optimizer steps \| (\d+) \(4 epochs\) \|", summary).group(1))
    [curve] = embedded_images(artifacts["jane-doe-loss-curve"].data)
    assert curve.format == "PNG" and curve.size == (720, 400)
    [grid] = embedded_images(artifacts["jane-doe-samples"].data)
    # Base model over LoRA, 4 samples of 256 px (a prompt with the name and one without, 2 seeds each), plus
    # the label bands; scaled to 1024 px wide for the artifact.
    assert grid.format == "JPEG" and grid.width == 1024 and 512 * 1024 / (4 * 256) < grid.height < 600
    assert "| identity, with the LoRA" in summary and "| style pollution | 1 − SSIM" in summary

    # Progress artifacts, updated while the stages ran, end at 100 % with the numbers.
    caption, train = artifacts["jane-doe-caption-progress"], artifacts["jane-doe-train-progress"]
    assert caption.data == 100 and "caption: 10/10 images" in caption.description
    assert train.data == 100 and f"train: {steps}/{steps} steps · epoch 4/4 · loss " in train.description


def test_run_form_in_a_browser_starts_a_run_that_completes(served, first_run, tmp_path):
    """Headless Chromium: the deployment's Run form, a nested setting changed (train → epochs), Submit."""
    deployment = served.deployments["pipeline"]
    started = datetime.now(timezone.utc)
    with browser_page() as page:
        page.goto(f"{served.server.url}/deployments/deployment/{deployment.id}/run")
        epochs = page.get_by_text("Epochs (Optional)", exact=True)
        epochs.wait_for(timeout=60_000)
        assert "The person's real name: the trigger in every caption" in page.inner_text("body")  # descriptions
        page.wait_for_load_state("networkidle")
        page.wait_for_timeout(1000)  # the form fades in
        page.screenshot(path=tmp_path / "run-form.png")  # the top of the form: name, photos, workspace...
        if os.environ.get("LORAPIPE_UPDATE_SCREENSHOTS"):
            shutil.copy(tmp_path / "run-form.png", DOCS / "run-form.png")
        field = epochs.locator("xpath=ancestor::div[contains(concat(' ', @class, ' '), ' schema-form-property ')][1]")
        assert field.locator("input").input_value() == "4"  # the served job's value, not the recipe's 12
        field.locator("input").fill("2")
        page.get_by_role("button", name="Submit").click()
        page.wait_for_url(f"**/deployments/deployment/{deployment.id}**", timeout=30_000)

        with api(served.server) as client:
            run_id = wait_for_run_with_epochs(client, deployment.id, 2, started)
            run = wait_final(client, run_id, timeout=300)
            assert run.state.is_completed(), run.state
            artifacts = artifacts_of(client, run_id)
        assert re.search(r"\| optimizer steps \| \d+ \(2 epochs\) \|", artifacts["jane-doe-summary"].data)

        # The UI shows the loss curve itself (an image inside the artifact), not just a link.
        page.goto(f"{served.server.url}/artifacts/artifact/{artifacts['jane-doe-loss-curve'].id}")
        page.get_by_alt_text("loss curve").wait_for(timeout=30_000)
        assert page.get_by_alt_text("loss curve").evaluate("img => img.naturalWidth") == 720


def wait_for_run_with_epochs(client, deployment_id, epochs: int, since: datetime, timeout: float = 60):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
        for run in runs:
            if run.created >= since and run.parameters["config"]["train"]["epochs"] == epochs:
                return run.id
        time.sleep(1)
    raise TimeoutError(f"no run with epochs={epochs} was created from the form")


def stage(task_run) -> str:
    return task_run.name.rsplit("-", 1)[0]  # task run names are "<task>-<3 random characters>"


def gpu_task_runs(client, run_id) -> list:
    return [t for t in task_runs_under(client, run_id) if "gpu" in t.tags]


def test_same_input_twice_trains_once_and_the_nightly_finds_nothing_new(served, first_run):
    with api(served.server) as client:
        again = trigger(client, served.deployments["pipeline"])
        assert wait_final(client, again).state.is_completed()
        gpu = {stage(t): t.state.name for t in gpu_task_runs(client, again)}
        assert gpu == {"caption": "Cached", "probe": "Cached", "train": "Cached", "evaluate": "Cached"}  # no GPU work

        nightly = trigger(client, served.deployments["nightly"])
        run = wait_final(client, nightly)
        assert run.state.is_completed()
        assert run.total_run_time < timedelta(seconds=30)
        tasks = task_runs_under(client, nightly)
        assert [stage(t) for t in tasks] == ["collect"]  # stopped after collecting: no GPU stage
        assert "nothing new: the 14 files collected" in artifacts_of(client, nightly)["jane-doe-nightly"].data


def test_nightly_is_scheduled_at_three_in_the_configured_time_zone(served):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter

    deployment = served.deployments["nightly"]
    [schedule] = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 3 * * *", TIMEZONE, True)

    now = datetime.now(ZoneInfo(TIMEZONE))
    expected = now.replace(hour=3, minute=0, second=0, microsecond=0)
    expected += timedelta(days=1) if expected <= now else timedelta()
    with api(served.server) as client:
        def scheduled():
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                flow_run_filter=FlowRunFilter(state={"type": {"any_": ["SCHEDULED"]}}))

        deadline = time.monotonic() + 120
        while not (runs := scheduled()) and time.monotonic() < deadline:  # the server's scheduler makes them
            time.sleep(2)
    assert runs, "the server scheduled no nightly runs"
    assert min(r.expected_start_time for r in runs) == expected.astimezone(timezone.utc)


def review_form_description(client, run, timeout: float = 30) -> str:
    """The markdown above the Resume form (saved just after the Suspended state is accepted)."""
    from prefect.exceptions import PrefectHTTPStatusError

    keyset = run.state.state_details.run_input_keyset
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.read_flow_run_input(run.id, keyset["description"])
        except PrefectHTTPStatusError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_new_photo_needing_review_suspends_the_nightly_notifies_and_trains_after_resume(served, first_run):
    from prefect.flow_runs import resume_flow_run

    photo = extra_photo(served.config.images)
    config = served.config.model_dump(mode="json", by_alias=True)
    config["review"]["approval"] = "all"  # every caption needs a person: the run must wait for one
    config["train"]["epochs"] = 1  # the retrain is what is tested, not its length
    with api(served.server) as client:
        run_id = trigger(client, served.deployments["nightly"], {"config": config})
        run = wait_until(client, run_id, lambda s: s.is_paused() or s.is_final(), timeout=300, what="Suspended")
        # Suspended (not Paused): the run's process has exited, holding no worker or GPU while it waits.
        assert run.state.name == "Suspended", (run.state, served.log.read_text()[-3000:])
        assert "11 captions need a person" in review_form_description(client, run)

        deadline = time.monotonic() + 120
        while not served.hook.received and time.monotonic() < deadline:
            time.sleep(1)
        [message] = served.hook.received
        assert message["subject"] == "lorapipe: captions wait for review" and run.name in message["body"]

        resume_flow_run(run_id, run_input={"approve_all": True, "reviewer": "night-owl"})  # the UI's Resume form
        run = wait_final(client, run_id, timeout=400)
        assert run.state.is_completed(), (run.state, served.log.read_text()[-3000:])
        artifacts = artifacts_of(client, run_id)
    # Only the new photo was captioned; the LoRA was trained again, on all 11.
    assert "caption: 1/1 images" in artifacts["jane-doe-caption-progress"].description
    assert "| images trained on | 11 |" in artifacts["jane-doe-summary"].data
    records = read_manifest(Path(served.config.workspace) / "manifests" / "review.jsonl")
    new = next(r for r in records if Path(r.source).name == photo.name)
    assert new.review == "approved" and new.reviewed_by == "night-owl"


def test_a_missing_photo_folder_fails_a_served_run_in_one_line_before_any_stage(served):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    missing = Path(served.config.images) / "no-such-folder"  # inside the served paths: the policy allows it
    config = {**served.config.model_dump(mode="json", by_alias=True), "images": str(missing)}
    expected = f"images: {missing}: no such folder, archive or URL list"
    with api(served.server) as client:
        run = wait_final(client, trigger(client, served.deployments["pipeline"], {"config": config}), timeout=120)
        assert run.state.is_failed() and expected in run.state.message
        deadline, lines = time.monotonic() + 30, []
        while not any(expected in line for line in lines) and time.monotonic() < deadline:  # logs arrive in batches
            time.sleep(1)
            lines = [log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))]
        assert task_runs_under(client, run.id) == []  # no stage ran (no collect retried twice)
    assert any(expected in line for line in lines) and not any("Traceback" in line for line in lines), lines


def test_rank_comparison_deployment_reports_in_the_ui_and_reuses_a_trained_rank(served, first_run):
    """Triggered as the UI does, with the settings of the retrain above (epochs 1): its rank-8 LoRA is that
    training, cached; rank 2 trains. The report is an artifact on the run and a file in the workspace."""
    config = served.config.model_dump(mode="json", by_alias=True)
    config["train"]["epochs"] = 1
    with api(served.server) as client:
        run_id = trigger(client, served.deployments["rank-comparison"],
                         {"config": config, "comparison": {"ranks": [2, 8]}})
        run = wait_final(client, run_id, timeout=400)
        assert run.state.is_completed(), (run.state, served.log.read_text()[-3000:])
        trains = sorted(t.state.name for t in task_runs_under(client, run_id) if stage(t) == "train")
        report = artifacts_of(client, run_id)["jane-doe-rank-comparison"].data
    assert trains == ["Cached", "Completed"]
    assert "| rank 2 | 2 |" in report and "| rank 8 | 8 |" in report and "No verdict" in report
    [grid] = embedded_images(report)
    assert grid.height > 3 * 128  # base model, rank 2, rank 8: one labelled row each
    written = Path(served.config.workspace) / "reports" / "rank-comparison.md"
    assert "| rank 8 | 8 |" in written.read_text()
