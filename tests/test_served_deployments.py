"""`lorapipe serve` against a real `prefect server start`: runs triggered as the UI triggers them, the run
form in a real browser (the V2 UI Prefect serves by default), what a run's Logs tab shows, artifacts,
idempotent reruns, the nightly schedule, "nothing new" and what changed, a nightly run that suspends for a
caption review, notifies, and finishes once a person answers; and the caption review in the V2 UI (the log
says what to do, photos in the form, a typo sent back) and its timeouts.

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
from PIL import Image

from browser import browser_page
from deployments.serve import deployment_name
from flows.demo import demo_config, write_job_file
from lorapipe.demo_data import extra_photo
from lorapipe.manifest import read_manifest
from lorapipe.plots import MAX_DATA_URL_CHARS
from lorapipe.policy import local_models
from served import (api, artifacts_of, embedded_images, log_lines, newest_logs_first, open_resume_form, run_logs,
                    table, task_runs_under, trigger, type_json, wait_final, wait_for_deployment, wait_until,
                    waiting_run)

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
    # The operator lets runs use any folder under the test's (the review tests' own workspaces) and the models.
    allowed = [root, *(path for _, path in local_models(config))]
    process = subprocess.Popen(
        [str(lorapipe), "serve", "--config", str(job), "--timezone", TIMEZONE, "--notify",
         "custom-webhook/lorapipe-review", *(f"--allow-path={p}" for p in allowed)], env=prefect_server.env,
        stdout=log, stderr=subprocess.STDOUT)
    try:
        with api(prefect_server) as client:
            deployments = {f: wait_for_deployment(client, deployment_name(f), process) for f in FLOWS}
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
    # A preview of the grid file (base model over LoRA, a prompt with the name and one without, 2 seeds each,
    # 256 px, plus the label bands): the same picture, scaled down to fit the artifact's budget.
    full = Image.open(re.search(r"\| sample grid \| `([^`]+)` \|", summary).group(1))
    assert full.size[1] > 512 and grid.format == "JPEG" and grid.width <= 768 < full.width
    assert abs(grid.width / grid.height - full.width / full.height) < 0.02
    assert "| identity, with the LoRA" in summary and "| style pollution | 1 − SSIM" in summary

    # Per-image work, not whole stages: a first run computed every latent and caption.
    assert "| work done (per image: new, re-used from cache) | latents 10 new, 0 re-used; stages re-used whole 0 of" \
        in summary
    assert "Work done: files 14 new, 0 re-used; " in artifacts["jane-doe-dataset"].description
    assert "captions 10 new, 0 re-used" in artifacts["jane-doe-dataset"].description
    # Previews, not full images: every image an artifact embeds fits the budget per run.
    for key in ("jane-doe-loss-curve", "jane-doe-samples"):
        assert all(len(url) <= MAX_DATA_URL_CHARS for url in re.findall(r"\(data:image/[^)]+\)", artifacts[key].data))

    # Progress artifacts, updated while the stages ran, end at 100 % with the numbers.
    caption, train = artifacts["jane-doe-caption-progress"], artifacts["jane-doe-train-progress"]
    assert caption.data == 100 and "caption: 10/10 images" in caption.description
    assert train.data == 100 and f"train: {steps}/{steps} steps · epoch 4/4 · loss " in train.description


def test_served_run_logs_carry_the_numbers(served, first_run):
    """What the Logs tabs show: lorapipe's INFO lines (stage numbers, each training step, where the LoRA went),
    not only its warnings."""
    with api(served.server) as client:
        deadline = time.monotonic() + 30  # the run's process sends its last lines as it exits
        while "LoRA file" not in " ".join((logs := log_lines(client, first_run)).get("pipeline", [])):
            assert time.monotonic() < deadline, logs
            time.sleep(1)
    train, dataset, run = "\n".join(logs["train"]), "\n".join(logs["dataset"]), "\n".join(logs["pipeline"])
    assert "lorapipe.collect | collected 14 files" in dataset
    assert "lorapipe.caption | captioning 10 images" in dataset
    assert "preflight" in train and "lorapipe.export | LoRA written to" in train
    steps = re.findall(r"step (\d+)/(\d+) +loss \d", train)
    assert steps and steps[-1][0] == steps[-1][1], train  # every training step, to the last
    # The run a person started ends with the summary `lorapipe run` prints.
    assert "prefect.flow_runs | LoRA file: jane-doe.safetensors" in run and "work done (per image" in run


def field(page, label: str):
    """The input of the form field labelled `label` (the V2 UI's labels name their input)."""
    title = page.get_by_text(label, exact=True)
    return page.locator(f"[id='{title.get_attribute('for')}']")


def test_run_form_in_a_browser_starts_a_run_that_completes(served, first_run, tmp_path):
    """Headless Chromium, the V2 UI Prefect serves by default: the deployments named for what they do, the
    Run form with what people change first (Epochs changed), Submit; the run completes with it."""
    deployment = served.deployments["pipeline"]
    started = datetime.now(timezone.utc)
    with browser_page() as page:
        page.goto(f"{served.server.url}/")  # the UI's front door: Prefect 3.9 sends it to the V2 UI
        page.wait_for_url("**/v2/**", timeout=60_000)
        page.goto(f"{served.server.url}/v2/deployments")
        page.get_by_text("photos-to-lora", exact=True).wait_for(timeout=60_000)
        listed = page.inner_text("main")
        assert all(name in listed for name in ("photos-to-dataset", "dataset-to-lora", "nightly-retrain",
                                               "compare-ranks"))
        screenshot(page, tmp_path, "deployments.png")

        page.get_by_text("photos-to-lora", exact=True).click()  # its page: Run → Custom run opens the form
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Custom run", exact=True).click()
        page.wait_for_url(f"**/v2/deployments/deployment/{deployment.id}/run**", timeout=60_000)
        page.get_by_text("Epochs (Optional)", exact=True).wait_for(timeout=60_000)
        page.set_viewport_size({"width": 1400, "height": 1400})  # the screenshot: to the advanced settings
        page.wait_for_load_state("networkidle")
        text = page.inner_text("main")
        labels = ["Name", "Photos", "LoRA rank (Optional)", "Epochs (Optional)", "Learning rate (Optional)",
                  "Captioner (Optional)", "Caption approval (Optional)", "Workspace (Optional)",
                  "Advanced settings (Optional)", "Training (Optional)", "Images per forward pass (Optional)"]
        positions = [text.index(f"\n{label}\n") for label in labels]
        assert positions == sorted(positions), text[:2000]  # what people change first, the rest after
        assert "Property is type" not in text and "Config (Optional)" not in text  # no None, no class names
        assert "The person's real name: the trigger in every caption" in text  # descriptions
        screenshot(page, tmp_path, "run-form.png")  # the top of the form
        assert field(page, "Epochs (Optional)").input_value() == "4"  # the served job's value, not the recipe's 12
        assert field(page, "Caption approval (Optional)").inner_text().strip() == "auto"
        field(page, "Epochs (Optional)").fill("2")
        page.get_by_role("button", name="Submit").click()
        page.wait_for_url(f"**/deployments/deployment/{deployment.id}**", timeout=30_000)

        with api(served.server) as client:
            run_id = wait_for_run_with_epochs(client, deployment.id, 2, started)
            run = wait_final(client, run_id, timeout=300)
            assert run.state.is_completed(), run.state
            artifacts = artifacts_of(client, run_id)
        assert re.search(r"\| optimizer steps \| \d+ \(2 epochs\) \|", artifacts["jane-doe-summary"].data)

        # The UI shows the loss curve itself (an image inside the artifact), not just a link.
        page.goto(f"{served.server.url}/v2/artifacts/artifact/{artifacts['jane-doe-loss-curve'].id}")
        page.get_by_alt_text("loss curve").wait_for(timeout=30_000)
        assert page.get_by_alt_text("loss curve").evaluate("img => img.naturalWidth") == 720


def screenshot(page, folder: Path, name: str) -> None:
    """Into docs/ for README when LORAPIPE_UPDATE_SCREENSHOTS is set."""
    page.wait_for_timeout(1000)  # the page fades in
    page.screenshot(path=folder / name)
    if os.environ.get("LORAPIPE_UPDATE_SCREENSHOTS"):
        shutil.copy(folder / name, DOCS / name)


def wait_for_run_with_epochs(client, deployment_id, epochs: int, since: datetime, timeout: float = 60):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
        for run in runs:
            if run.created >= since and run.parameters["config"].get("epochs") == epochs:  # the form's values
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
        reused = artifacts_of(client, again)  # ...and the artifacts say so, per image
        assert "captions 0 new, 10 re-used" in reused["jane-doe-dataset"].description
        assert "latents 0 new, 10 re-used" in reused["jane-doe-summary"].data

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
    # The nightly run said what changed, and the summary what was computed again: the new photo's work only.
    changed = artifacts["jane-doe-nightly"].data
    assert "- photos added: 1 (new_portrait_50.jpg)\n" in changed
    assert re.search(r'- settings: review.approval "auto" → "all"; train.epochs \d+ → 1\n', changed), changed
    assert "latents 1 new, 10 re-used;" in artifacts["jane-doe-summary"].data
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


# Caption review in the UI Prefect serves by default (V2). Each test works in its own workspace (the flows'
# `workspace` parameter); later ones add photos, so only those wait.

REVIEW_WS = "review-ws"
TIMEOUT_HOURS = 0.004  # 14.4 s (Prefect's proactive triggers wait at least 10 s)


def parameters(served, workspace: str, **review) -> dict:
    config = served.config.model_dump(mode="json", by_alias=True)
    config["workspace"] = str(served.root / workspace)
    config["review"] = {**config["review"], **review}
    return {"config": config}


def captions(ws: Path) -> dict[str, str]:
    """The captioner's captions by file name."""
    return {Path(r.source).name: r.caption for r in read_manifest(ws / "manifests" / "caption.jsonl") if r.kept}


def test_review_in_the_v2_ui_photos_fields_and_a_typo_sent_back(served):
    with api(served.server) as client:
        run_id = trigger(client, served.deployments["dataset"], parameters(served, REVIEW_WS, approval="all"))
        run = waiting_run(client, run_id)
        assert run.state.name == "Suspended", served.log.read_text()[-3000:]  # no process held while it waits
        first_key = run.state.state_details.pause_key

        with browser_page() as page:
            # The run's log says what to do, in the UI Prefect serves by default.
            page.goto(f"{served.server.url}/v2/runs/flow-run/{run_id}")
            newest_logs_first(page)
            page.get_by_text("captions wait for a person", exact=False).first.wait_for(timeout=60_000)
            log_text = page.inner_text("body")
            assert f"Runs → {run.name}, then the ⋮ menu (top right) → Resume" in log_text
            assert "lorapipe review" in log_text
            page.screenshot(path=served.root / "review-log.png")

            dialog = open_resume_form(page, served.server.url, run_id)
            kept = captions(served.root / REVIEW_WS)  # the demo's ten, and the nightly test's new photo
            first, kept = next(iter(kept)), len(kept)
            assert f"{kept} captions need a person" in dialog.inner_text()
            photos = dialog.locator("img")
            photos.nth(kept - 1).wait_for(timeout=30_000)
            assert photos.count() == kept and all(photos.nth(i).evaluate("i => i.complete && i.naturalWidth > 0")
                                                   for i in range(kept))
            assert f"1. {first}" in dialog.inner_text()  # numbered as the fields below
            page.screenshot(path=served.root / "review-form.png")

            dialog.get_by_label("Approve All (Optional)").click()
            type_json(page, dialog, "Edits (Optional)",
                       '{"portrait_2.jpg": "Jane Doe in a blue shirt, typed under a wrong name"}')
            dialog.get_by_role("button", name="Resume").click()

            # The answer is applied where it can be; the typo comes back on a new form, the run never fails.
            run = waiting_run(client, run_id, after=first_key)
            assert run.state.is_paused(), (run.state, served.log.read_text()[-3000:])
            dialog = open_resume_form(page, served.server.url, run_id)
            text = dialog.inner_text()
            assert "no kept image named 'portrait_2.jpg' — did you mean portrait_02.jpg?" in text
            assert "Jane Doe in a blue shirt, typed under a wrong name" in text  # their words, quoted back
            assert "1 captions need a person" in text and dialog.locator("img").count() == 1
            page.screenshot(path=served.root / "review-sent-back.png")

            caption = dialog.get_by_label("1. portrait_02.jpg (Optional)")
            assert caption.input_value() == captions(served.root / REVIEW_WS)["portrait_02.jpg"]  # prefilled
            caption.fill("Jane Doe in a blue shirt, edited in its own field")  # no file name to type
            dialog.get_by_label("Reviewer (Optional)").fill("ui-reviewer")
            dialog.get_by_role("button", name="Resume").click()
            run = wait_final(client, run_id)
        assert run.state.is_completed(), (run.state, served.log.read_text()[-3000:])

    records = {Path(r.source).name: r for r in read_manifest(served.root / REVIEW_WS / "manifests" / "review.jsonl")
               if r.kept}
    assert all(r.review == "approved" for r in records.values())
    edited = records["portrait_02.jpg"]
    assert (edited.caption, edited.reviewed_by) == ("Jane Doe in a blue shirt, edited in its own field", "ui-reviewer")
    assert records["portrait_00.jpg"].caption_edits == []
    if os.environ.get("LORAPIPE_UPDATE_SCREENSHOTS"):
        for name in ("review-form.png", "review-log.png"):
            shutil.copy(served.root / name, DOCS / name)


def reviewed(served) -> dict:
    return {Path(r.source).name: r for r in read_manifest(served.root / REVIEW_WS / "manifests" / "review.jsonl")
            if r.kept}


def test_a_paused_review_answered_from_a_terminal_then_timed_out_continues(served):
    """A run that pauses (in its process): `lorapipe review --resume` answers part of it; nobody answers the rest
    in time, and the run carries on with what is approved."""
    first, second = (extra_photo(served.root / "photos", index=i).name for i in (60, 61))
    lorapipe = Path(sys.executable).with_name("lorapipe")
    with api(served.server) as client:
        run_id = trigger(client, served.deployments["dataset"], parameters(
            served, REVIEW_WS, approval="all", wait="pause", timeout_hours=0.01, on_timeout="continue"))
        run = waiting_run(client, run_id)
        assert run.state.name == "Paused", served.log.read_text()[-3000:]
        answered = subprocess.run([str(lorapipe), "review", str(served.root / REVIEW_WS), "--approve", first,
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
        run_id = trigger(client, served.deployments["dataset"], parameters(
            served, REVIEW_WS, approval="all", timeout_hours=TIMEOUT_HOURS, on_timeout=on_timeout))
        run = waiting_run(client, run_id)
        assert run.state.name == "Suspended", served.log.read_text()[-3000:]
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
            newest_logs_first(page)
            page.get_by_text(f"Finished in state Failed('{message}", exact=False).first.wait_for(timeout=60_000)
