"""Waiting for a person to review captions: the run pauses (or suspends) with a form in the Prefect UI.

The form is `ReviewInput`; above it the UI shows the captions waiting, as markdown. `lorapipe review
WORKSPACE` resumes the same run from a terminal.
"""

from __future__ import annotations

import logging

import pydantic
from prefect import get_run_logger
from prefect.context import FlowRunContext
from prefect._flow_run_suspension import raise_if_flow_run_suspension_requested  # 3.9: no public equivalent
from prefect.exceptions import FlowPauseTimeout, Pause
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput, keyset_from_base_key, read_flow_run_input

from lorapipe.config import ReviewConfig
from lorapipe.fsutil import atomic_write_json, stable_hash
from lorapipe.manifest import read_manifest
from lorapipe.review_decisions import ReviewDecision
from lorapipe.workspace import Workspace
from tasks.progress import root_flow_run_id
from tasks.review import review_markdown, waiting_for_review

log = logging.getLogger("lorapipe.review")
PAUSE_FILE = "review-pause.json"


class ReviewInput(RunInput, ReviewDecision):
    """The caption review form."""


def input_type_with(description: str) -> type[ReviewInput]:
    # A subclass carrying the markdown; RunInput.with_initial_data would drop the fields' descriptions.
    model = pydantic.create_model("ReviewInput", __base__=ReviewInput)
    model._description = description
    return model


def ask_a_person(ws: Workspace, manifest: str, config: ReviewConfig) -> ReviewDecision | None:
    """Pause until a reviewer answers; None when nobody did in time and the settings say carry on."""
    logger = get_run_logger()
    records = read_manifest(manifest)
    waiting = waiting_for_review(records)
    context = FlowRunContext.get()
    # The run a person started: the review is often in a subflow (pipeline → dataset), and only a
    # top-level run of a deployment can be suspended and started again.
    root = context.flow_run if not context.flow_run.parent_task_run_id else _read_flow_run(root_flow_run_id())
    wait = config.wait
    if wait == "auto":  # suspending frees the worker (and the GPU machine), but only a deployment can restart
        wait = "suspend" if root.deployment_id else "pause"
    key = "review-" + stable_hash([(r.id, r.caption) for r in waiting])[:16]
    waiting_run = root if wait == "suspend" else context.flow_run
    atomic_write_json(ws.root / PAUSE_FILE, {"flow_run_id": str(waiting_run.id), "key": key,
                                             "waiting": len(waiting)})
    logger.warning(
        "%d captions wait for a person: open this run in the Prefect UI and press Resume, or run "
        "`lorapipe review %s` in a terminal", len(waiting), ws.root,
    )
    form = input_type_with(review_markdown(records))
    timeout = int(config.timeout_hours * 3600)
    try:
        if wait == "pause":
            answer = pause_flow_run(wait_for_input=form, timeout=timeout, key=key)
        elif waiting_run is context.flow_run:
            answer = suspend_flow_run(wait_for_input=form, timeout=timeout, key=key)
        else:
            answer = suspend_parent_run(waiting_run.id, form, timeout, key)
    except Pause:
        raise  # suspended: the pause file tells `lorapipe review` which run to resume
    except FlowPauseTimeout:
        (ws.root / PAUSE_FILE).unlink(missing_ok=True)
        if config.on_timeout == "fail":
            raise RuntimeError(f"nobody reviewed {len(waiting)} captions within {config.timeout_hours} hours")
        logger.warning("nobody reviewed the captions in time: training on the approved ones only")
        return None
    (ws.root / PAUSE_FILE).unlink(missing_ok=True)
    return ReviewDecision.model_validate(answer.model_dump(include=set(ReviewDecision.model_fields)))


def suspend_parent_run(run_id, form: type[ReviewInput], timeout: int, key: str) -> ReviewInput:
    """Suspend the run a person started from inside its subflow; after the resume, return their answer.

    Prefect (3.9) suspends another run and stops this process at the next step (a Pause), but keeps the form
    and reads the answer under the *current* (sub)flow run, which a restarted run no longer has: the form
    and the answer are kept under the suspended run itself, where the UI's Resume dialog looks.
    """
    keyset = keyset_from_base_key(f"suspended-{key}")  # what Prefect names a Suspended state's inputs
    answer = read_flow_run_input(keyset["response"], flow_run_id=run_id)
    if answer is not None:  # resumed: this run restarted from the top and reached the same review again
        return form(**answer)
    suspend_flow_run(wait_for_input=form, flow_run_id=run_id, timeout=timeout, key=key)
    form.save(keyset, flow_run_id=run_id)
    raise_if_flow_run_suspension_requested()  # Pause: this process ends; the run waits, holding nothing
    raise RuntimeError(f"flow run {run_id} could not be suspended for the review")


def _read_flow_run(flow_run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def resume_paused_run(ws: Workspace, reviewer: str) -> str | None:
    """Resume the run that paused for this workspace's review; its review stage applies the stored decisions."""
    from prefect.exceptions import ObjectNotFound
    from prefect.flow_runs import resume_flow_run

    from lorapipe.fsutil import read_json

    pause = ws.root / PAUSE_FILE
    if not pause.exists():
        return None
    flow_run_id = read_json(pause)["flow_run_id"]
    try:
        resume_flow_run(flow_run_id, run_input=ReviewDecision(reviewer=reviewer).model_dump())
    except (ObjectNotFound, RuntimeError) as err:  # gone, or no longer paused
        pause.unlink(missing_ok=True)
        log.warning("could not resume flow run %s: %s", flow_run_id, err)
        return None
    return flow_run_id
